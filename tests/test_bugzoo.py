"""The checks are not vacuous: the reference passes every check, every known-buggy variant
fails the checks it names with the message it names, and blank stubs fail every check with
"not implemented yet"."""

from __future__ import annotations

import pytest

from autograder.bugzoo import BUGS, GRADED, VARIANTS, graded_objects
from autograder.bugzoo.stubs import STUBS
from autograder.checks import CHECKS, artifacts, get_check, protocol

# Grading draws every check input from a secret variant; the checks must hold on any of them.
GRADING_VARIANT = 918273

# The spec's required mistakes, by bug name.
REQUIRED = {
    "prefix_layer0_only",
    "prefix_zeros_after_layer0",
    "prefix_shared_by_layers",
    "freeze_misses_lm_head",
    "freeze_skips_biases_and_norms",
    "backbone_never_frozen",
    "prefix_mask_not_extended",
    "prefix_positions_from_zero",
    "prefix_detached",
    "prefix_cache_reused",
    "prompt_built_as_prefix",
    "prefix_built_as_prompt",
    "deep_added_not_replaced",
    "deep_first_layer_only",
    "prompt_labels_not_masked",
    "prefix_fp32_into_bf16",
    "encoder_query_heads_under_gqa",
    "encoder_reparam_wrong_layout",
    "prompt_init_unit_normal",
}

# check_generate_with_prefix judges generation against the REFERENCE forward; the student's
# prefix_forward only sharpens its failure message, so a stubbed prefix_forward alone passes it.
HINT_ONLY = {("check_generate_with_prefix", "prefix_forward")}


def _run(check: str, objects: dict[str, object], seed: int = 0) -> None:
    args = [objects[name] for name in CHECKS[check][1]]
    if seed == 0:
        get_check(check)(*args)
    else:
        protocol.run_check(*protocol.resolve(check), *args, seed=seed)


def _failure(check: str, objects: dict[str, object], seed: int = 0) -> str:
    with pytest.raises(AssertionError) as info:
        _run(check, objects, seed)
    return str(info.value)


def test_registry_is_well_formed() -> None:
    assert len(BUGS) >= 15
    assert REQUIRED <= set(BUGS), REQUIRED - set(BUGS)
    for bug in BUGS.values():
        assert bug.notebook in {"01", "02", "03", "04", "05"}, bug.name
        assert bug.replaces and set(bug.replaces) <= set(GRADED), bug.name
        assert bug.caught_by and set(bug.caught_by) <= set(CHECKS), bug.name
        assert bug.message_contains, bug.name
        assert set(bug.also_fails) <= set(CHECKS) - set(bug.caught_by), bug.name
        notebook_checks = set(CHECKS) | {n for n in dir(artifacts) if n.startswith("check_")}
        assert set(bug.downstream) <= notebook_checks - set(bug.fails), bug.name
        for check in bug.fails:
            assert set(bug.replaces) & set(CHECKS[check][1]), (bug.name, check)
    twins = {check for bug in BUGS.values() for check in bug.caught_by}
    assert twins == set(CHECKS), f"checks without a buggy twin: {set(CHECKS) - twins}"
    assert set(STUBS) == set(GRADED)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_reference_passes(check: str) -> None:
    _run(check, graded_objects())


@pytest.mark.parametrize(
    ("bug", "check"), [(b.name, c) for b in BUGS.values() for c in b.caught_by]
)
def test_bug_is_caught(bug: str, check: str) -> None:
    message = _failure(check, graded_objects(BUGS[bug]))
    assert BUGS[bug].message_contains in message, message


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_reference_passes_on_a_grading_variant(check: str) -> None:
    _run(check, graded_objects(), seed=GRADING_VARIANT)


@pytest.mark.parametrize(
    ("bug", "check"), [(b.name, c) for b in BUGS.values() for c in b.caught_by]
)
def test_bug_is_caught_on_a_grading_variant(bug: str, check: str) -> None:
    message = _failure(check, graded_objects(BUGS[bug]), seed=GRADING_VARIANT)
    assert BUGS[bug].message_contains in message, message


@pytest.mark.parametrize(
    ("variant", "check"),
    [
        (v.name, c)
        for v in VARIANTS.values()
        for c, (_, names) in sorted(CHECKS.items())
        if set(names) & set(v.replaces)
    ],
)
@pytest.mark.parametrize("seed", [0, GRADING_VARIANT])
def test_valid_variant_passes(variant: str, check: str, seed: int) -> None:
    _run(check, graded_objects(VARIANTS[variant]), seed=seed)


@pytest.mark.parametrize(
    ("bug", "check"), [(b.name, c) for b in BUGS.values() for c in b.also_fails]
)
def test_bug_also_fails(bug: str, check: str) -> None:
    """The collateral failures ``verify`` expects are real (any message will do)."""
    _failure(check, graded_objects(BUGS[bug]))


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_blank_stubs_fail_helpfully(check: str) -> None:
    message = _failure(check, STUBS)
    names = CHECKS[check][1]
    assert any(
        message.startswith(f"not implemented yet: fill in the YOUR CODE HERE cell of {n}")
        for n in names
    ), message


@pytest.mark.parametrize(
    ("check", "name"),
    [
        (check, name)
        for check, (_, names) in sorted(CHECKS.items())
        for name in names
        if (check, name) not in HINT_ONLY
    ],
)
def test_each_stub_is_named(check: str, name: str) -> None:
    objects = graded_objects()
    objects[name] = STUBS[name]
    message = _failure(check, objects)
    assert f"YOUR CODE HERE cell of {name}" in message, message
