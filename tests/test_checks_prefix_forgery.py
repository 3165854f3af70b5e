"""The prefix (notebook 02), deep-prompt (02) and checkpointing (05) checks are decided by their
judges from the observation alone: a genuine observation passes, a forged one of the right
structure but wrong values fails, a missing field is reported as malformed, an observation made
on another variant fails, and the observing half runs where the reference does not exist."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from forgery_tools import assert_forgery_refused, observe_in_a_fresh_kernel
from forgery_tools import judge as _judge
from forgery_tools import observation as _observation

from autograder.bugzoo import VARIANTS, graded_objects
from autograder.checks import protocol

GRADING_VARIANT = 918273  # as in test_bugzoo

MY_CHECKS = (
    "check_prefix_encoder",
    "check_build_prefix_cache",
    "check_prefix_forward",
    "check_prefix_training",
    "check_generate_with_prefix",
    "check_peft_equivalence",
    "check_bf16",
    "check_deep_prompt",
    "check_soft_prompt_to_prefix",
    "check_deep_prompt_to_prefix",
    "check_checkpointed_prefix_forward",
)


def _nudge(value: torch.Tensor, by: float = 1e-3) -> torch.Tensor:
    return value + by


def _at(data: dict, *path: Any) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data, path[-1]


def _nudged(*path: Any, by: float = 1e-3) -> Callable[[dict], None]:
    def forge(data: dict) -> None:
        parent, key = _at(data, *path)
        parent[key] = _nudge(parent[key], by)

    forge.__name__ = "nudge_" + "_".join(str(p) for p in path)
    return forge


def _set(*path: Any, value: Any) -> Callable[[dict], None]:
    def forge(data: dict) -> None:
        parent, key = _at(data, *path)
        parent[key] = value(parent[key]) if callable(value) else value

    forge.__name__ = "set_" + "_".join(str(p) for p in path)
    return forge


def _swapped(path: tuple, a: Any, b: Any) -> Callable[[dict], None]:
    def forge(data: dict) -> None:
        parent, _ = _at(data, *path, None)
        parent[a], parent[b] = parent[b], parent[a]

    forge.__name__ = "swap_" + "_".join(str(p) for p in path) + f"_{a}_{b}"
    return forge


def _first_call(data: dict, model: int, layer: int) -> dict:
    calls = data["models"][model]["first"]["recording"]["calls"]
    return next(c for c in calls if c["layer"] == layer)


def _swap_call_key_value(data: dict) -> None:
    call = _first_call(data, 1, 2)
    call["key"], call["value"] = call["value"], call["key"]


def _copy_layer_prefix(data: dict) -> None:
    """Layer 2 reports layer 1's prefix keys (what a shared prefix would look like)."""
    source, target = _first_call(data, 0, 1), _first_call(data, 0, 2)
    target["key"] = target["key"].clone()
    target["key"][:, :, :4] = source["key"][:, :, :4]


def _other_token(data: dict) -> None:
    new = data["models"][1]["new"].clone()
    new[1, 0] = (new[1, 0] + 1) % 64
    data["models"][1]["new"] = new


def _forge_module_unchanged(data: dict) -> None:
    """The trained module reported unchanged: nothing was trained."""
    model = data["models"][0]
    model["module_after"] = dict(model["module_before"])


def _prefix_dependence_everywhere(data: dict) -> None:
    dep = data["models"][0]["reparam"]["dependence"]
    data["models"][0]["reparam"]["dependence"] = dep + 1.0


FORGERIES: list[tuple[str, Callable[[dict], None]]] = [
    ("check_prefix_encoder", _swapped(("models", 0, "direct"), "again", "other")),
    ("check_prefix_encoder", _set("models", 1, "direct", "small", value=lambda t: 3 * t)),
    ("check_prefix_encoder", _prefix_dependence_everywhere),
    ("check_prefix_encoder", _nudged("models", 1, "reparam", "exported")),
    ("check_prefix_encoder", _set("models", 0, "direct", "count", value=lambda c: c + 1)),
    ("check_build_prefix_cache", _swapped(("models", 0), "keys", "values")),
    ("check_build_prefix_cache", _nudged("models", 1, "value_grad")),
    ("check_build_prefix_cache", _set("models", 1, "keys", 2, value=lambda t: t + 1e-3)),
    ("check_build_prefix_cache", _set("models", 0, "second_len", value=4)),
    ("check_prefix_forward", _nudged("models", 1, "first", "logits")),
    ("check_prefix_forward", _nudged("models", 0, "first", "loss")),
    ("check_prefix_forward", _nudged("models", 1, "first", "loss_grad")),
    ("check_prefix_forward", _set("models", 1, "first", "value_grads", 2, value=torch.zeros_like)),
    ("check_prefix_forward", _nudged("models", 0, "second", "logits")),
    ("check_prefix_forward", _swap_call_key_value),
    ("check_prefix_forward", _copy_layer_prefix),
    ("check_prefix_forward", _set("models", 1, "second", "backward_error", value="boom")),
    ("check_prefix_training", _nudged("models", 1, "state", "parameter lm_head.weight")),
    ("check_prefix_training", _forge_module_unchanged),
    ("check_generate_with_prefix", _other_token),
    ("check_peft_equivalence", _nudged("models", 0, "logits")),
    ("check_peft_equivalence", _nudged("models", 1, "loss")),
    ("check_bf16", _nudged("models", 1, "call", "logits", by=0.1)),
    ("check_bf16", _set("models", 0, "encoder_dtypes", "grader_prefix", value="bfloat16")),
    ("check_deep_prompt", _nudged("models", 1, "logits")),
    ("check_deep_prompt", _nudged("models", 0, "loss")),
    ("check_deep_prompt", _nudged("models", 1, "grad")),
    ("check_deep_prompt", _nudged("models", 0, "after")),
    ("check_deep_prompt", _swapped(("models", 1), "again", "other")),
    ("check_soft_prompt_to_prefix", _nudged("models", 1, "first", by=1e-3)),
    ("check_soft_prompt_to_prefix", _nudged("models", 0, "second")),
    ("check_soft_prompt_to_prefix", _nudged("models", 0, "after")),
    ("check_soft_prompt_to_prefix", _swapped(("models", 1), "first", "second")),
    ("check_deep_prompt_to_prefix", _nudged("models", 0, "first")),
    ("check_deep_prompt_to_prefix", _nudged("models", 1, "second")),
    ("check_deep_prompt_to_prefix", _nudged("models", 1, "after")),
    ("check_checkpointed_prefix_forward", _nudged("models", 0, "calls", 1, "logits")),
    ("check_checkpointed_prefix_forward", _nudged("models", 1, "calls", 0, "grad")),
    ("check_checkpointed_prefix_forward", _set("models", 1, "checkpointing", value=False)),
    ("check_checkpointed_prefix_forward", _nudged("models", 0, "after")),
]


@pytest.mark.parametrize("check", MY_CHECKS)
def test_genuine_observation_passes_on_the_grading_variant(check: str) -> None:
    _judge(check, _observation(check, GRADING_VARIANT), GRADING_VARIANT)


@pytest.mark.parametrize(
    ("check", "forge"), FORGERIES, ids=[f"{c}-{f.__name__}" for c, f in FORGERIES]
)
def test_judge_refuses_a_forged_observation(check: str, forge) -> None:
    assert_forgery_refused(check, _observation(check, GRADING_VARIANT), forge, GRADING_VARIANT)


@pytest.mark.parametrize("check", MY_CHECKS)
def test_observation_made_on_another_variant_fails(check: str) -> None:
    with pytest.raises(AssertionError):
        _judge(check, _observation(check, 0), GRADING_VARIANT)


_MISSING = {
    "check_prefix_encoder": ("direct",),
    "check_build_prefix_cache": ("key_grad",),
    "check_prefix_forward": ("first", "key_grads"),
    "check_prefix_training": ("module_trainable",),
    "check_generate_with_prefix": ("encoder_values",),
    "check_peft_equivalence": ("logits",),
    "check_bf16": ("encoder_dtypes",),
    "check_deep_prompt": ("grad",),
    "check_soft_prompt_to_prefix": ("second",),
    "check_deep_prompt_to_prefix": ("after",),
    "check_checkpointed_prefix_forward": ("checkpointing",),
}


@pytest.mark.parametrize("check", MY_CHECKS)
def test_missing_field_is_malformed(check: str) -> None:
    data = _observation(check, 0)
    parent, key = _at(data["models"][1], *_MISSING[check])
    del parent[key]
    with pytest.raises(protocol.MalformedObservation):
        _judge(check, data, 0)
    with pytest.raises(protocol.MalformedObservation):
        _judge(check, {"models": []}, 0)


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, (*path, i))]
    return [path]


@pytest.mark.parametrize("check", MY_CHECKS)
def test_mistyped_fields_are_refused_not_crashed_on(check: str) -> None:
    """Replacing a field by a 0-d tensor, a string or None gives an AssertionError (a verdict),
    never another exception in the grader."""
    data = _observation(check, 0)
    rng = random.Random(check)
    paths = rng.sample(_leaves(data), 8)
    for path, junk in zip(paths, [torch.zeros(()), "junk", None, torch.zeros(2, 3)] * 2):
        forged = _observation(check, 0)
        parent, key = _at(forged, *path)
        parent[key] = junk
        try:
            _judge(check, forged, 0)
        except AssertionError:
            continue
        # a field the judge may legitimately ignore (a hint, an optional detail) can pass


def test_deep_prompt_accepts_a_precomputed_key_value_cache() -> None:
    """The expert review's false failure: the hidden-state form computed as a precomputed
    key/value cache (attention sees T queries against P+T keys) passes, on both variants."""
    objects = graded_objects(VARIANTS["deep_prefilled_cache"])
    for seed in (0, GRADING_VARIANT):
        data = _observation("check_deep_prompt", seed, objects)
        calls = data["models"][0]["recording"]["calls"]
        assert any(c["key_len"] > c["query_len"] for c in calls)
        _judge("check_deep_prompt", data, seed)


_KERNEL_WITHOUT_REFERENCE = """
import sys
from pathlib import Path

sys.modules["autograder.reference"] = None  # as in a grading kernel: no reference, no bug zoo
sys.modules["autograder.bugzoo"] = None
import torch

import course
from autograder.checks import protocol

# the student's notebooks: the solution cells of 02 and of 05, each in its own namespace
code = sys.stdin.read().split("# ===== notebook 05 =====")
student02, student05 = {"torch": torch, "course": course}, {"torch": torch, "course": course}
exec(compile(code[0], "notebook 02", "exec"), student02)
exec(compile(code[1], "notebook 05", "exec"), student05)

folder, seed = Path(sys.argv[1]), int(sys.argv[2])
for name, objects in (
    ("check_build_prefix_cache", (student02["build_prefix_cache"],)),
    ("check_prefix_forward", (student02["prefix_forward"], student02["PrefixEncoder"])),
    ("check_deep_prompt", (student02["DeepPrompt"], student02["deep_prompt_forward"])),
    ("check_soft_prompt_to_prefix", (student02["soft_prompt_to_prefix"],)),
    ("check_deep_prompt_to_prefix", (student02["deep_prompt_to_prefix"],)),
    (
        "check_checkpointed_prefix_forward",
        (student05["checkpoint_safe_prefix_forward"], student02["PrefixEncoder"]),
    ),
):
    protocol.capture(name, objects, (folder, seed))
assert "autograder.reference" not in {m for m, v in sys.modules.items() if v is not None}
"""


def _solution_cells(notebook: str) -> str:
    """The code of a solution notebook's answer cells (the student's own definitions)."""
    import json

    root = Path(__file__).resolve().parents[1]
    (path,) = (root / "solutions").glob(f"{notebook}_*/{notebook}_*.ipynb")
    cells = json.loads(path.read_text())["cells"]
    return "\n\n".join(
        "".join(c["source"])
        for c in cells
        if c["cell_type"] == "code"
        and c["metadata"].get("nbgrader", {}).get("solution")
        and not c["metadata"]["nbgrader"]["grade_id"].startswith("answer_")
    )


def test_observes_without_the_reference_and_is_judged_elsewhere(tmp_path) -> None:
    cells = _solution_cells("02") + "\n# ===== notebook 05 =====\n" + _solution_cells("05")
    observe_in_a_fresh_kernel(_KERNEL_WITHOUT_REFERENCE, tmp_path, GRADING_VARIANT, 6, cells)
