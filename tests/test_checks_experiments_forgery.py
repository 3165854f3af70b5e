"""The notebook-03 checks (make_method, run_sweep, the saved study) are decided by their judges
from the observation alone: a genuine observation passes, a forged one of the right structure but
wrong values fails, a missing field is reported as malformed, junk in any field gives a verdict
(never a crash of the grader), an observation made on another variant fails, and the observing
half runs where the reference does not exist."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from forgery_tools import assert_forgery_refused, observe_in_a_fresh_kernel
from forgery_tools import judge as _judge
from forgery_tools import observation as _observation

from autograder.checks import experiments, protocol

GRADING_VARIANT = 918273  # as in test_bugzoo
MY_CHECKS = ("check_method_parameters", "check_method_functions", "check_run_sweep")


def _run(data: dict, kind: str, name: str) -> dict:
    runs = data["runs"]
    return next(r for r in runs if r.get("kind") == kind and r.get("name") == name)


def _nudge_loss(data: dict) -> None:
    _run(data, "Llama-GQA", "prefix")["loss"] += 1e-3


def _nudge_prefix_key(data: dict) -> None:
    call = _run(data, "GPT-2", "prefix_reparam")["calls"][1]
    call["key"] = call["key"] + 1e-3


def _nudge_prompt_grad(data: dict) -> None:
    grads = _run(data, "Llama-GQA", "prompt")["grads"]
    grads[0] = grads[0] * 1.01


def _swap_generated_rows(data: dict) -> None:
    run = _run(data, "GPT-2", "full")
    run["generated"] = run["generated"].flip(0)


def _nudge_lora_weight(data: dict) -> None:
    probe = next(p for p in _run(data, "GPT-2", "lora")["probes"] if "c_attn" in p["path"])
    probe["weight"] = probe["weight"] + 1e-3 * torch.randn(probe["weight"].shape)


def _nudge_full_state(data: dict) -> None:
    state = _run(data, "Llama-GQA", "full")["state"]
    state["lm_head.weight"] = state["lm_head.weight"] * 1.001


def _swap_backbone_digest(data: dict) -> None:
    after = _run(data, "GPT-2", "prefix")["backbone_after"]
    first, second = list(after)[:2]
    after[first], after[second] = after[second], after[first]


def _nudge_count(data: dict) -> None:
    _run(data, "Llama-GQA", "prefix")["n_trainable"] += 1


def _nudge_init(data: dict) -> None:
    init = data["inits"][0]  # GPT-2, prompt, init="text"
    init["params"][0] = init["params"][0] + 1e-3


def _untouched_params(data: dict) -> None:
    run = _run(data, "GPT-2", "lora")
    run["params_after"] = list(run["params_before"])


def _nudge_accuracy(data: dict) -> None:
    data["rows"][2]["overlap"] += 1e-3


def _other_rng(data: dict) -> None:
    data["runs"][3]["rng"] = "0" * 20


def _other_batch(data: dict) -> None:
    batch = data["runs"][1]["batches"][2]
    data["runs"][1]["batches"][2] = batch.roll(1, dims=0)


def _other_learning_rate(data: dict) -> None:
    first, second = data["runs"][2]["biases"]
    data["runs"][2]["biases"][1] = first + 2 * (second - first)


def _swap_rows(data: dict) -> None:
    data["rows"][1], data["rows"][3] = data["rows"][3], data["rows"][1]


def _other_prediction(data: dict) -> None:
    data["scored"][0]["predictions"][0] += "x"


FORGERIES: dict[str, list[Callable[[dict], None]]] = {
    "check_method_functions": [
        _nudge_loss,
        _nudge_prefix_key,
        _nudge_prompt_grad,
        _swap_generated_rows,
        _nudge_lora_weight,
        _nudge_full_state,
    ],
    "check_method_parameters": [
        _swap_backbone_digest,
        _nudge_count,
        _nudge_init,
        _untouched_params,
    ],
    "check_run_sweep": [
        _nudge_accuracy,
        _other_rng,
        _other_batch,
        _other_learning_rate,
        _swap_rows,
        _other_prediction,
    ],
}


@pytest.mark.parametrize("check", MY_CHECKS)
def test_genuine_observation_passes_on_the_grading_variant(check: str) -> None:
    _judge(check, _observation(check, GRADING_VARIANT), GRADING_VARIANT)


@pytest.mark.parametrize(
    ("check", "forge"), [(c, f) for c, forges in FORGERIES.items() for f in forges]
)
def test_judge_refuses_a_forged_observation(check: str, forge) -> None:
    assert_forgery_refused(check, _observation(check, GRADING_VARIANT), forge, GRADING_VARIANT)


@pytest.mark.parametrize("check", MY_CHECKS)
def test_observation_made_on_another_variant_fails(check: str) -> None:
    with pytest.raises(AssertionError):
        _judge(check, _observation(check, 0), GRADING_VARIANT)


_MISSING: dict[str, list[tuple]] = {
    "check_method_functions": [("runs", 3, "loss"), ("runs", 1, "calls"), ("runs", 9, "state")],
    "check_method_parameters": [("inits",), ("runs", 4, "backbone_after"), ("runs", 0, "params")],
    "check_run_sweep": [("scored",), ("runs", 2, "biases"), ("runs", 0, "rng")],
}


def _at(data: Any, *path) -> tuple[Any, Any]:
    for key in path[:-1]:
        data = data[key]
    return data, path[-1]


@pytest.mark.parametrize("check", MY_CHECKS)
def test_missing_field_is_malformed(check: str) -> None:
    for path in _MISSING[check]:
        data = _observation(check, 0)
        parent, key = _at(data, *path)
        del parent[key]
        with pytest.raises(protocol.MalformedObservation):
            _judge(check, data, 0)
    with pytest.raises(protocol.MalformedObservation):
        _judge(check, {"runs": []}, 0)


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(value, list) and value:
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, (*path, i))]
    return [path]


@pytest.mark.parametrize("check", [*MY_CHECKS, "check_sweep_artifact"])
def test_mistyped_fields_are_refused_not_crashed_on(check: str) -> None:
    """Replacing any field by a 0-d tensor, a string, None, a (2, 3) tensor or a bool tensor gives
    an AssertionError (a verdict), never another exception in the grader."""
    fresh = _study_observation if check == "check_sweep_artifact" else None
    data = fresh() if fresh else _observation(check, 0)
    rng = random.Random(check)
    paths = rng.sample(_leaves(data), 24)
    junks = [torch.zeros(()), "junk", None, torch.zeros(2, 3), torch.ones(64, dtype=torch.bool)]
    for i, path in enumerate(paths):
        forged = fresh() if fresh else _observation(check, 0)
        parent, key = _at(forged, *path)
        parent[key] = junks[i % len(junks)]
        try:
            _judge(check, forged, 0)
        except AssertionError:
            continue
        # a field the judge may legitimately ignore (a hint, an optional detail) can pass


def _study_observation() -> dict:
    from test_checks_experiments import _study

    return protocol.decode(*protocol.encode(experiments.observe_sweep_artifact(_study(), None)))


def test_sweep_artifact_missing_field_is_malformed() -> None:
    with pytest.raises(protocol.MalformedObservation):
        _judge("check_sweep_artifact", {"model": None}, 0)


_KERNEL_WITHOUT_REFERENCE = """
import importlib.util
import sys
from pathlib import Path

# as in notebook 03's grading sandbox: no reference for make_method/run_sweep, no bug zoo
sys.modules["autograder.reference.experiments"] = None
sys.modules["autograder.bugzoo"] = None

from autograder.checks import protocol

# the student's notebook: the reference's code, loaded as a module of the student's own
spec = importlib.util.spec_from_file_location(
    "student_solution", "autograder/reference/experiments.py"
)
student = importlib.util.module_from_spec(spec)
sys.modules["student_solution"] = student
spec.loader.exec_module(student)

folder, seed = Path(sys.argv[1]), int(sys.argv[2])
for name, objects in (
    ("check_method_parameters", (student.make_method,)),
    ("check_method_functions", (student.make_method,)),
    ("check_run_sweep", (student.run_sweep,)),
):
    protocol.capture(name, objects, (folder, seed))
assert "autograder.reference.experiments" not in {m for m, v in sys.modules.items() if v}
"""


def test_observes_without_the_reference_and_is_judged_elsewhere(tmp_path) -> None:
    observe_in_a_fresh_kernel(_KERNEL_WITHOUT_REFERENCE, tmp_path, GRADING_VARIANT, 3)
