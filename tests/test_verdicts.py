"""Graded cells are scored from what the GRADER judges, never from what the kernel shows.

Each case runs a small graded notebook through :class:`GradedExecute` in a real kernel: one
graded function (``freeze_backbone``, 2 points) and one multiple-choice answer (1 point),
optionally with an "attack" cell placed before them that tampers with something a verdict used
to pass through. The score is what nbgrader would give from the resulting outputs.
"""

from __future__ import annotations

import nbformat
import pytest
from nbgrader.utils import determine_grade

from autograder.pipeline.verdicts import TAMPERING, Expected, GradedExecute, expected_checks

GOOD = (
    "def freeze_backbone(model):\n    for p in model.parameters():\n        p.requires_grad_(False)"
)
WRONG = "def freeze_backbone(model):\n    model.eval()  # freezes nothing"
SETUP = "import autograder.checks.frozen\nfrom autograder import checks, selfcheck"
TEST_FREEZE = (
    "selfcheck.run(checks.frozen.check_freeze_backbone, freeze_backbone)\n"
    "### BEGIN HIDDEN TESTS\n"
    'selfcheck.hidden("check_freeze_backbone", freeze_backbone)\n'
    "### END HIDDEN TESTS"
)
TEST_QUIZ = 'selfcheck.check_answer("nb01_q1", answer_q1)'


def _cell(source: str, grade_id: str | None = None, points: int = 0, solution: bool = False):
    cell = nbformat.v4.new_code_cell(source)
    if grade_id:
        cell.metadata["nbgrader"] = {
            "grade": points > 0,
            "grade_id": grade_id,
            "locked": not solution,
            "points": points,
            "schema_version": 3,
            "solution": solution,
        }
    return cell


def _notebook(freeze: str = GOOD, answer: str = '"b"', attack: str = "") -> nbformat.NotebookNode:
    cells = [_cell(SETUP, "setup")]
    if attack:
        cells.append(_cell(attack))
    cells += [
        _cell(freeze, "freeze", solution=True),
        _cell(TEST_FREEZE, "test_freeze", points=2),
        _cell(f"answer_q1 = {answer}", "answer_q1", solution=True),
        _cell(TEST_QUIZ, "test_q1", points=1),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    return nb


def _grade(nb: nbformat.NotebookNode, tmp_path) -> dict[str, tuple[float, list]]:
    run = GradedExecute(timeout=60)
    nb, _ = run.preprocess(nb, {"metadata": {"path": str(tmp_path)}})
    out = {}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade"):
            out[meta["grade_id"]] = (determine_grade(cell)[0], cell.outputs)
    return out


def _text(outputs: list) -> str:
    return "\n".join(str(o.get("text") or o.get("evalue") or o.get("data")) for o in outputs)


def test_expected_checks_come_from_the_cell_source() -> None:
    assert expected_checks(TEST_FREEZE) == [Expected("check_freeze_backbone")]
    assert expected_checks(TEST_QUIZ) == [Expected("check_answer", (("question", "nb01_q1"),))]
    hidden = 'selfcheck.hidden("check_prompt_artifact", prompt, model, task="data_to_text")'
    assert expected_checks(hidden) == [
        Expected("check_prompt_artifact", (("task", "data_to_text"),))
    ]
    assert expected_checks("assert square(2) == 4") == []
    assert expected_checks("this is not python (") == []


def test_a_correct_notebook_gets_every_point(tmp_path) -> None:
    graded = _grade(_notebook(), tmp_path)
    assert graded["test_freeze"][0] == 2 and graded["test_q1"][0] == 1
    assert "✓ freeze_backbone: no parameter" in _text(graded["test_freeze"][1])
    assert "✓ nb01_q1: correct" in _text(graded["test_q1"][1])


def test_wrong_code_and_a_wrong_answer_get_nothing(tmp_path) -> None:
    graded = _grade(_notebook(WRONG, '"a"'), tmp_path)
    assert graded["test_freeze"][0] == 0 and graded["test_q1"][0] == 0
    assert "still require grad" in _text(graded["test_freeze"][1])
    assert "is not the answer" in _text(graded["test_q1"][1])


ATTACKS = {
    "selfcheck replaced": (
        "selfcheck.run = lambda *a, **k: print('✓ all good')\n"
        "selfcheck.hidden = lambda *a, **k: print('✓ all good')\n"
        "selfcheck.check_answer = lambda *a, **k: True"
    ),
    "check function replaced": (
        "checks.frozen.check_freeze_backbone = lambda *a: None\n"
        "import autograder.answers\nautograder.answers.is_correct = lambda *a: True"
    ),
    "custom exception handler": (
        "get_ipython().set_custom_exc((BaseException,), lambda *a, **k: None)"
    ),
    "display 'ok' after every cell": (
        "from IPython.display import display\n"
        "get_ipython().events.register('post_run_cell', lambda r: display('ok'))"
    ),
    "excepthook and showtraceback": (
        "import sys\nsys.excepthook = lambda *a: None\n"
        "get_ipython().showtraceback = lambda *a, **k: None"
    ),
    "observation recorded outside the test cell": (
        "def _good(model):\n    for p in model.parameters():\n        p.requires_grad_(False)\n"
        "selfcheck.run(checks.frozen.check_freeze_backbone, _good)\n"
        "selfcheck.check_answer('nb01_q1', 'b')\n"
        "selfcheck.run = lambda *a, **k: None\nselfcheck.hidden = lambda *a, **k: None\n"
        "selfcheck.check_answer = lambda *a, **k: True"
    ),
    "torch.equal patched": "import torch\ntorch.equal = lambda *a: True",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tampering_never_raises_a_score(attack: str, tmp_path) -> None:
    graded = _grade(_notebook(WRONG, '"a"', attack=ATTACKS[attack]), tmp_path)
    assert graded["test_freeze"][0] == 0, _text(graded["test_freeze"][1])
    assert graded["test_q1"][0] == 0, _text(graded["test_q1"][1])


def test_withheld_observations_are_reported_as_tampering(tmp_path) -> None:
    graded = _grade(_notebook(GOOD, '"b"', attack=ATTACKS["selfcheck replaced"]), tmp_path)
    for grade_id in ("test_freeze", "test_q1"):
        score, outputs = graded[grade_id]
        assert score == 0
        errors = [o for o in outputs if o.get("output_type") == "error"]
        assert errors and errors[0].ename == TAMPERING, outputs
        assert "review by hand" in errors[0].evalue


def test_hooks_that_only_hide_errors_do_not_cost_a_correct_notebook(tmp_path) -> None:
    """Tampering with the display or the exception hooks changes nothing the grader uses."""
    attack = ATTACKS["display 'ok' after every cell"] + "\n" + ATTACKS["custom exception handler"]
    graded = _grade(_notebook(GOOD, '"b"', attack=attack), tmp_path)
    assert graded["test_freeze"][0] == 2 and graded["test_q1"][0] == 1
