"""The notebook-03 prompt-function and verbalizer checks are decided by their judges from the
observation alone: a genuine observation passes on the grading variant, a forged one of the right
structure but wrong values fails, one made on another variant fails, a missing field is
malformed, and the observing half runs in a kernel where the reference does not exist."""

from __future__ import annotations

import pytest
from forgery_tools import assert_forgery_refused, observe_in_a_fresh_kernel
from forgery_tools import judge as _judge
from forgery_tools import observation as _observation

from autograder.checks import protocol
from autograder.checks.prompting import _inputs

GRADING_VARIANT = 918273  # as in test_bugzoo
MY_CHECKS = ("check_prompt_function", "check_label_scores")


def _case(i: int, **fields):
    def forge(data: dict) -> None:
        data["cases"][i].update(fields)

    forge.__name__ = f"case_{i}_" + "_".join(fields)
    return forge


def _first_invalid() -> int:
    from autograder.checks.prompting import _VALID

    return len(_VALID)


def _nudge(key: str):
    def forge(data: dict) -> None:
        data[key] = data[key] + 1e-3

    forge.__name__ = f"nudge_{key}"
    return forge


FORGERIES = [
    ("check_prompt_function", _case(0, value="not the filled template")),
    ("check_prompt_function", _case(_first_invalid(), value="accepted", value_error=False)),
    ("check_prompt_function", _case(0, value=None, error="ValueError")),
    ("check_label_scores", _nudge("scores")),
    ("check_label_scores", _nudge("grad")),
]


@pytest.mark.parametrize("check", MY_CHECKS)
def test_genuine_observation_passes_on_the_grading_variant(check: str) -> None:
    _judge(check, _observation(check, GRADING_VARIANT), GRADING_VARIANT)


@pytest.mark.parametrize(
    ("check", "forge"), FORGERIES, ids=[f"{c}-{f.__name__}" for c, f in FORGERIES]
)
def test_judge_refuses_a_forged_observation(check: str, forge) -> None:
    assert_forgery_refused(check, _observation(check, GRADING_VARIANT), forge, GRADING_VARIANT)


def test_the_variant_changes_the_inputs() -> None:
    from autograder.checks.harness import variant

    with variant(0):
        visible = _inputs()
    with variant(GRADING_VARIANT):
        secret = _inputs()
    assert len(visible) == len(secret)
    assert [x for _, x in visible] != [x for _, x in secret]


@pytest.mark.parametrize("check", MY_CHECKS)
def test_observation_made_on_another_variant_fails(check: str) -> None:
    with pytest.raises(AssertionError):
        _judge(check, _observation(check, 0), GRADING_VARIANT)


@pytest.mark.parametrize(("check", "field"), [(MY_CHECKS[0], "cases"), (MY_CHECKS[1], "grad")])
def test_missing_field_is_malformed(check: str, field: str) -> None:
    data = _observation(check, 0)
    del data[field]
    with pytest.raises(protocol.MalformedObservation):
        _judge(check, data, 0)


_KERNEL = """
import sys
from pathlib import Path

sys.modules["autograder.reference"] = None  # as in a grading kernel: no reference, no bug zoo
sys.modules["autograder.bugzoo"] = None
import torch

from autograder.checks import protocol

student = {"torch": torch}
exec(compile(sys.stdin.read(), "notebook 03", "exec"), student)
folder, seed = Path(sys.argv[1]), int(sys.argv[2])
protocol.capture("check_prompt_function", (student["prompt_function"],), (folder, seed))
protocol.capture("check_label_scores", (student["label_scores"],), (folder, seed))
assert "autograder.reference" not in {m for m, v in sys.modules.items() if v is not None}
"""


def test_observes_without_the_reference_and_is_judged_elsewhere(tmp_path) -> None:
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cells = json.loads((root / "solutions/03_experiments/03_experiments.ipynb").read_text())
    code = "\n\n".join(
        "".join(c["source"])
        for c in cells["cells"]
        if c["metadata"].get("nbgrader", {}).get("grade_id") in ("prompt_function", "label_scores")
    )
    observe_in_a_fresh_kernel(_KERNEL, tmp_path, GRADING_VARIANT, 2, code)
