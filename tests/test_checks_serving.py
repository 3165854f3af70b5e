"""The checks of notebooks 04 (serving) and 05 (gradient checkpointing): the reference passes,
every buggy twin fails with its message, other correct designs pass too, and the checks write
nothing to stderr."""

from __future__ import annotations

import pytest
import torch

from autograder import reference
from autograder.bugzoo import BUGS, graded_objects
from autograder.bugzoo import debugging as debugging_bugs
from autograder.bugzoo import serving as serving_bugs
from autograder.bugzoo.stubs import STUBS
from autograder.checks import CHECKS, debugging, get_check, serving
from course.compat import kv_geometry

NEW_CHECKS = (
    "check_save_load_prefix",
    "check_mixed_prefix_forward",
    "check_mixed_generate",
    "check_checkpointed_prefix_forward",
)
NEW_BUGS = [  # (debugging.py also holds a notebook 02 twin: a prefix_forward left installed)
    bug.name for bug in (*serving_bugs.BUGS, *debugging_bugs.BUGS) if bug.notebook in ("04", "05")
]


def _run(check: str, objects: dict[str, object]) -> None:
    get_check(check)(*(objects[name] for name in CHECKS[check][1]))


def test_new_checks_are_registered_with_twins() -> None:
    assert set(NEW_CHECKS) <= set(CHECKS)
    assert set(NEW_BUGS) <= set(BUGS)
    twins = {c for name in NEW_BUGS for c in BUGS[name].caught_by}
    assert twins == set(NEW_CHECKS)
    assert {BUGS[name].notebook for name in NEW_BUGS} == {"04", "05"}


@pytest.mark.parametrize("check", NEW_CHECKS)
def test_reference_passes(check: str) -> None:
    _run(check, graded_objects())


@pytest.mark.parametrize(
    ("bug", "check"), [(name, c) for name in NEW_BUGS for c in BUGS[name].caught_by]
)
def test_buggy_twin_fails_with_its_message(bug: str, check: str) -> None:
    with pytest.raises(AssertionError) as info:
        _run(check, graded_objects(BUGS[bug]))
    assert BUGS[bug].message_contains in str(info.value), str(info.value)


@pytest.mark.parametrize("check", NEW_CHECKS)
def test_stubs_fail_with_not_implemented(check: str) -> None:
    with pytest.raises(AssertionError, match="not implemented yet: fill in the YOUR CODE HERE"):
        _run(check, STUBS)


# --- other correct designs pass (more in the bug zoo's VARIANTS) -------------------------------
def test_rejecting_without_saying_why_fails() -> None:
    def vague(model, prefixes, tenant_ids, *args, **kwargs):
        if len({prefixes[t].shape[3] for t in tenant_ids}) > 1:
            raise ValueError("bad batch")
        return reference.mixed_prefix_forward(model, prefixes, tenant_ids, *args, **kwargs)

    with pytest.raises(AssertionError, match="reject such a batch with a ValueError"):
        serving.check_mixed_prefix_forward(vague)


def test_running_tenant_by_tenant_is_not_one_batched_forward() -> None:
    def per_tenant(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
        rows = [reference.mixed_prefix_forward(model, prefixes, [t], input_ids[i : i + 1],
                                               attention_mask[i : i + 1])
                for i, t in enumerate(tenant_ids)]  # fmt: skip
        out = rows[0]
        out.logits = torch.cat([r.logits for r in rows])
        return out

    with pytest.raises(AssertionError, match="ONE forward pass"):
        serving.check_mixed_prefix_forward(per_tenant)


def test_unknown_tenant_served_fails() -> None:
    def lenient(model, prefixes, tenant_ids, *args, **kwargs):
        first = next(iter(prefixes))
        known = [t if t in prefixes else first for t in tenant_ids]
        return reference.mixed_prefix_forward(model, prefixes, known, *args, **kwargs)

    with pytest.raises(AssertionError, match="unknown tenant 'nobody'"):
        serving.check_mixed_prefix_forward(lenient)


def test_torch_size_in_the_refusal_counts_as_naming_the_shapes() -> None:
    def load(path, config):
        try:
            return reference.load_prefix(path, config)
        except ValueError:
            from safetensors.torch import load_file

            have = load_file(str(path))["prefix"].shape
            g = kv_geometry(config)
            need = torch.Size([g["n_layers"], 2, g["n_kv_heads"], have[3], g["head_dim"]])
            raise ValueError(f"file holds {have}, model needs {need}") from None

    serving.check_save_load_prefix(reference.save_prefix, load)


def test_switching_checkpointing_off_for_the_call_passes() -> None:
    def off_for_the_call(model, encoder, input_ids, attention_mask, labels=None):
        was = model.is_gradient_checkpointing
        model.gradient_checkpointing_disable()
        try:
            return reference.prefix_forward(model, encoder, input_ids, attention_mask, labels)
        finally:
            if was:
                model.gradient_checkpointing_enable()

    debugging.check_checkpointed_prefix_forward(off_for_the_call, reference.PrefixEncoder)


def test_serving_checks_write_nothing_to_stderr(capfd) -> None:
    serving.check_save_load_prefix(reference.save_prefix, reference.load_prefix)
    serving.check_mixed_prefix_forward(reference.mixed_prefix_forward)
    serving.check_mixed_generate(reference.mixed_generate)
    assert capfd.readouterr().err == ""


def test_debugging_check_writes_nothing_to_stderr(capfd) -> None:
    debugging.check_checkpointed_prefix_forward(
        reference.checkpoint_safe_prefix_forward, reference.PrefixEncoder
    )
    assert capfd.readouterr().err == ""


def test_incidents_are_zoo_functions() -> None:
    assert set(debugging_bugs.INCIDENTS) == {f"INC-{i}" for i in (*range(1, 9), 10)}
    assert all(callable(fn) for fn in debugging_bugs.INCIDENTS.values())
