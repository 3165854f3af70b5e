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
    "def freeze_backbone(model):\n    for p in model.parameters():\n"
    "        p.requires_grad_(False)\n    return model"
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


def _grade(nb: nbformat.NotebookNode, tmp_path, **traits) -> dict[str, tuple[float, list]]:
    run = GradedExecute(timeout=60, **traits)
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
    "observation headers nested deeper than json.loads goes": (
        "import os, pathlib\nfrom safetensors.torch import save_file\n"
        "from autograder.checks import protocol\n"
        "def _deep(result, n=[0]):\n"
        "    for name in ('check_answer', 'check_freeze_backbone'):\n"
        "        n[0] += 1\n"
        "        folder = pathlib.Path(os.environ[protocol.CHANNEL_ENV])\n"
        "        path = folder / f'0-{n[0]:04d}-{name}.safetensors'\n"
        "        deep = '[' * 200_000 + ']' * 200_000\n"
        "        save_file({}, str(path), metadata={'observation': deep})\n"
        "get_ipython().events.register('post_run_cell', _deep)"
    ),
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


def test_an_artifact_counts_only_with_the_code_that_makes_it(tmp_path) -> None:
    """(Here the quiz stands in for a trained artifact, freeze_backbone for its code.)"""
    gate = {"requires": {"check_answer": ["check_freeze_backbone"]}}
    graded = _grade(_notebook(WRONG, '"b"'), tmp_path, **gate)
    assert graded["test_q1"][0] == 0
    assert "counts only once the code that makes it passes" in _text(graded["test_q1"][1])
    assert _grade(_notebook(GOOD, '"b"'), tmp_path, **gate)["test_q1"][0] == 1


def test_hooks_that_only_hide_errors_do_not_cost_a_correct_notebook(tmp_path) -> None:
    """Tampering with the display or the exception hooks changes nothing the grader uses."""
    attack = ATTACKS["display 'ok' after every cell"] + "\n" + ATTACKS["custom exception handler"]
    graded = _grade(_notebook(GOOD, '"b"', attack=attack), tmp_path)
    assert graded["test_freeze"][0] == 2 and graded["test_q1"][0] == 1


# --- the released notebooks: every graded cell is judged by the grader ------------------------
import ast  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from autograder.checks import NOTEBOOK_CHECKS, protocol  # noqa: E402

SOLUTIONS = sorted((Path(__file__).resolve().parents[1] / "solutions").glob("*/*.ipynb"))


def _calls(source: str) -> list[tuple[str, str, list[str]]]:
    """``(kind, check name, argument names)`` of each selfcheck call in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "selfcheck"):
            continue
        kind, args = node.func.attr, node.args
        if kind == "run" and args and isinstance(args[0], ast.Attribute):
            found.append((kind, args[0].attr, [ast.unparse(a) for a in args[1:]]))
        elif kind == "hidden" and args and isinstance(args[0], ast.Constant):
            found.append((kind, args[0].value, [ast.unparse(a) for a in args[1:]]))
    return found


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_every_graded_cell_is_judged_by_the_grader(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    defined = {
        m for cell in nb.cells for m in re.findall(r"^(?:def|class) (\w+)", cell.source, re.M)
    }
    assigned = {
        m for cell in nb.cells for m in re.findall(r"^(\w+)(?:, \w+)* = ", cell.source, re.M)
    }
    visible, hidden = set(), set()
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type != "code" or not meta.get("grade"):
            continue
        expected = expected_checks(cell.source)
        assert expected, f"{path.stem}/{meta['grade_id']}: the grader would find no check here"
        for item in expected:
            protocol.resolve(item.name)  # observe and judge exist
        for kind, name, args in _calls(cell.source):
            want = list(NOTEBOOK_CHECKS[name][1])
            assert args[: len(want)] == want or name in (
                "check_prompt_artifact",
                "check_prefix_artifact",
                "check_sweep_artifact",
            ), f"{path.stem}: {name}({args}) expects {want}"
            assert set(args[: len(want)]) <= defined | assigned | {"model"}, (name, args)
            (visible if kind == "run" else hidden).add(name)
    assert visible <= hidden, f"{path.stem}: no hidden test for {sorted(visible - hidden)}"


def test_outputs_are_capped_by_bytes_as_nbgrader_runs_the_preprocessor() -> None:
    from autograder.pipeline.outputs import LimitOutputBytes

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('x' * 50_000_000)")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="x" * 5_000_000)]
    nb, _ = LimitOutputBytes()(nb, {})  # nbconvert calls the instance: it must be enabled
    assert len(nb.cells[0].outputs[0].text) < 250_000
    assert "removed by the grader" in nb.cells[0].outputs[0].text


def test_student_html_is_escaped_before_formgrader_renders_it() -> None:
    from autograder.pipeline.outputs import SanitizeStudentContent

    answer = nbformat.v4.new_markdown_cell("My answer <script>steal()</script> <b>bold</b>")
    answer.metadata["nbgrader"] = {"grade": True, "solution": True, "locked": False}
    rule = nbformat.v4.new_markdown_cell("Instructions <sub>kept</sub> <script>ours()</script>")
    rule.metadata["nbgrader"] = {"grade": False, "solution": False, "locked": True}
    code = nbformat.v4.new_code_cell("display(HTML(...))")
    code.outputs = [
        nbformat.v4.new_output(
            "display_data",
            data={
                "text/html": "<img src=x onerror=steal()>",
                "application/javascript": "steal()",
                "text/plain": "<IPython.core.display.HTML object>",
            },
        )
    ]
    nb = nbformat.v4.new_notebook(cells=[answer, rule, code])
    nb, _ = SanitizeStudentContent()(nb, {})
    assert "<script>" not in nb.cells[0].source and "<b>bold</b>" in nb.cells[0].source
    assert nb.cells[1].source == rule.source  # the grader's locked cell is untouched
    data = nb.cells[2].outputs[0].data
    assert "application/javascript" not in data
    assert "<img" not in data["text/html"]


def test_one_cell_the_grader_cannot_judge_costs_that_cell_only(tmp_path, monkeypatch) -> None:
    real = GradedExecute._verdict

    def verdict(self, item, record, kernel_error):
        if item.name == "check_answer":
            raise RecursionError("maximum recursion depth exceeded")
        return real(self, item, record, kernel_error)

    monkeypatch.setattr(GradedExecute, "_verdict", verdict)
    graded = _grade(_notebook(), tmp_path)
    assert graded["test_freeze"][0] == 2
    score, outputs = graded["test_q1"]
    assert score == 0 and outputs[0].ename == "GraderError", outputs
    assert "review by hand" in outputs[0].evalue


def test_a_nested_observation_header_is_malformed(tmp_path) -> None:
    from safetensors.torch import save_file

    from autograder.pipeline.verdicts import _answers_question

    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(protocol.MalformedObservation, match="nested too deeply"):
        protocol.decode({}, deep)
    with pytest.raises(protocol.MalformedObservation, match="nested too deeply"):
        protocol.decode({}, '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}")
    path = tmp_path / "0-0000-check_answer.safetensors"
    save_file({}, str(path), metadata={"observation": deep})
    assert _answers_question(path, "nb01_q1") is False


def test_the_grader_keeps_a_secret_the_kernel_never_sees(tmp_path, monkeypatch) -> None:
    """The variant seed goes to the kernel (it observes on it); artifacts are scored on inputs
    drawn from a second secret that stays in the grader, so a kernel cannot fit to them."""
    from autograder.pipeline import verdicts

    seen = []
    real = protocol.judge_file

    def judge_file(name, path, seed, params=None, secret=None):
        seen.append((seed, secret))
        return real(name, path, seed, params, secret)

    monkeypatch.setattr(verdicts.protocol, "judge_file", judge_file)
    dump = "import os\nprint('ENV', ' '.join(sorted(os.environ.values())))"
    nb = _notebook(attack=dump)
    run = GradedExecute(timeout=60)
    nb, _ = run.preprocess(nb, {"metadata": {"path": str(tmp_path)}})
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    env = next(line for line in printed.splitlines() if line.startswith("ENV"))
    assert seen and all(isinstance(s, int) and s != v for v, s in seen)
    (seed, secret), *_ = seen
    assert str(seed) in env.split()  # the kernel has the variant ...
    assert str(secret) not in env  # ... never the grader's secret


def test_a_kernel_gets_no_credentials_from_the_graders_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_INSTRUCTOR_TOKEN", "planted-token-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-aws-value")
    monkeypatch.setenv("SOME_OTHER_SETTING", "planted-other-value")
    monkeypatch.setenv("HF_TOKEN", "planted-hf-value")
    dump = "import os\nprint('ENV', sorted(os.environ.items()))"
    nb, _ = GradedExecute(timeout=60).preprocess(
        _notebook(attack=dump), {"metadata": {"path": str(tmp_path)}}
    )
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "ENV" in printed and "'PATH'" in printed
    assert "planted" not in printed, printed


def test_kernel_environment_keeps_what_libraries_read_and_drops_credentials() -> None:
    from autograder.pipeline.sandbox import kernel_environment

    env = {
        "PATH": "/bin", "HOME": "/root", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "COURSE_BACKBONE": "tiny", "LC_ALL": "C", "HF_TOKEN": "x", "GITHUB_TOKEN": "x",
        "AWS_SECRET_ACCESS_KEY": "x", "OPENAI_API_KEY": "x", "DATABASE_URL": "x",
    }  # fmt: skip
    assert sorted(kernel_environment(env)) == [
        "COURSE_BACKBONE", "HF_HUB_OFFLINE", "HOME", "LC_ALL", "OMP_NUM_THREADS", "PATH",
        "PYTHONWARNINGS", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY",
    ]  # fmt: skip
    quiet = kernel_environment({"TQDM_DISABLE": "0", "PYTHONWARNINGS": "default"})
    assert quiet["TQDM_DISABLE"] == "1" and quiet["PYTHONWARNINGS"] == "ignore"


def test_loading_the_nbgrader_config_leaves_the_servers_environment_alone() -> None:
    """A JupyterLab or Formgrader server loads nbgrader_config.py; its students' kernels must
    keep their progress bars and warnings (only grading kernels are silenced)."""
    import os
    import subprocess
    import sys

    from autograder.pipeline.coursedir import REPO_ROOT

    config = str(REPO_ROOT / "nbgrader_config.py")
    code = (
        "import json, os; from traitlets.config import Config; before = dict(os.environ); "
        f"ns = {{'get_config': Config, '__file__': {config!r}}}; "
        f"exec(open({config!r}).read(), ns); after = dict(os.environ); "
        "print(json.dumps(sorted(k for k in {*before, *after} if before.get(k) != after.get(k))))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "PYTHONWARNINGS")}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_a_notebook_past_its_time_budget_stops_and_scores_what_ran(tmp_path) -> None:
    slow = "import time\ntime.sleep(4)"
    graded = _grade(_notebook(attack=slow), tmp_path, notebook_timeout=2)
    for grade_id in ("test_freeze", "test_q1"):
        score, outputs = graded[grade_id]
        assert score == 0 and outputs[0].ename == "NotebookTimeUp", outputs
        assert "used up its grading time (2 s)" in outputs[0].evalue
    assert _grade(_notebook(), tmp_path, notebook_timeout=60)["test_freeze"][0] == 2


@pytest.mark.parametrize(
    ("raised", "ename"),
    [
        (RuntimeError("Double did not match Float"), "AssertionError"),
        (KeyError("models"), "GraderError"),
    ],
)
def test_odd_outputs_fail_their_check_and_grader_bugs_are_flagged(
    raised, ename, tmp_path, monkeypatch
) -> None:
    """A dtype or shape the judge cannot compare (float64 tensors) fails that check with a
    hint, never as the grader's fault; anything else stays a grader error for review."""
    from autograder.pipeline import verdicts

    def judge_file(name, path, seed, params=None, secret=None):
        if name == "check_freeze_backbone":
            raise raised

    monkeypatch.setattr(verdicts.protocol, "judge_file", judge_file)
    graded = _grade(_notebook(), tmp_path)
    score, outputs = graded["test_freeze"]
    assert score == 0 and outputs[-1].ename == ename, outputs
    if ename == "AssertionError":
        assert "check the dtype and shape" in outputs[-1].evalue
    assert graded["test_q1"][0] == 1
