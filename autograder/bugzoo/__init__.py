"""Known-buggy implementations of the graded objects: proof that the checks are not vacuous.

Each :class:`Bug` is a realistic student mistake, written as a complete drop-in replacement
with the reference's signature (:mod:`autograder.reference`). ``tests/test_bugzoo.py`` proves,
for every bug, that each check named in ``caught_by`` fails on it with a message containing
``message_contains``, while the reference passes every check. The debugging lab (notebook 05)
and the instructor's "prove the tests" command use the same registry.

Use::

    from autograder.bugzoo import BUGS, graded_objects
    from autograder.checks import CHECKS, get_check

    bug = BUGS["prefix_layer0_only"]
    objects = graded_objects(bug)                      # the reference, with the bug swapped in
    for name in bug.caught_by:
        get_check(name)(*(objects[arg] for arg in CHECKS[name][1]))   # raises AssertionError
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BUGS", "GRADED", "VARIANTS", "Bug", "Variant", "graded_objects"]

GRADED: tuple[str, ...] = (
    "freeze_backbone",
    "SoftPrompt",
    "prepend_prompt",
    "save_prompt",
    "load_prompt",
    "PrefixEncoder",
    "build_prefix_cache",
    "prefix_forward",
    "generate_with_prefix",
    "DeepPrompt",
    "deep_prompt_forward",
    "soft_prompt_to_prefix",
    "deep_prompt_to_prefix",
    "prompt_function",
    "label_scores",
    "save_prefix",
    "load_prefix",
    "mixed_prefix_forward",
    "mixed_generate",
    "checkpoint_safe_prefix_forward",
    "make_method",
    "run_sweep",
)
"""The names of the objects students implement (notebooks 01 to 05)."""


@dataclass(frozen=True)
class Bug:
    """One known mistake.

    Attributes:
        name: registry key.
        description: what the student did wrong (and what it breaks).
        notebook: the notebook whose graded objects it replaces (``"01"`` to ``"05"``).
        replaces: graded object name -> its buggy version.
        caught_by: names of the checks (keys of ``autograder.checks.CHECKS``) that must fail.
        message_contains: a substring every one of those failure messages contains.
        also_fails: further checks that fail on it as a consequence (a mask that is not
            extended also breaks the equivalence with PEFT); they must fail too, with any
            message, and ``autograder verify`` expects their cells to lose points as well.
    """

    name: str
    description: str
    notebook: str
    replaces: dict[str, object] = field(hash=False)
    caught_by: tuple[str, ...]
    message_contains: str
    also_fails: tuple[str, ...] = ()
    downstream: tuple[str, ...] = ()
    """Checks that fail only INSIDE the notebook, where the student's other graded objects call
    this one (their ``prefix_forward`` uses their ``build_prefix_cache``; their loaded prompt is
    the one scored on the hidden split). The unit tests pair each check with the reference's
    other objects, so they cannot show it; ``autograder verify`` does, through nbgrader."""

    @property
    def fails(self) -> tuple[str, ...]:
        """Every check this bug fails on its own: ``caught_by`` then ``also_fails``."""
        return self.caught_by + self.also_fails


@dataclass(frozen=True)
class Variant:
    """A valid but unusual implementation: every check must PASS it (no false failures).

    Attributes:
        name: registry key.
        description: how it differs from the reference, and why that is still correct.
        notebook: the notebook whose graded objects it replaces.
        replaces: graded object name -> the variant.
    """

    name: str
    description: str
    notebook: str
    replaces: dict[str, object] = field(hash=False)


def graded_objects(bug: Bug | Variant | None = None) -> dict[str, object]:
    """The reference's graded objects by name, with ``bug``'s replacements swapped in."""
    from autograder import reference

    objects = {name: getattr(reference, name) for name in GRADED}
    if bug is not None:
        objects.update(bug.replaces)
    return objects


_MODULES = (
    "frozen",
    "prompt",
    "prefix",
    "deep",
    "compiled",
    "prompting",
    "experiments",
    "serving",
    "debugging",
    "releases",
)
"""The zoo's parts, in notebook order."""


def _modules() -> list[Any]:
    return [importlib.import_module(f"autograder.bugzoo.{name}") for name in _MODULES]


def _registry() -> dict[str, Bug]:
    bugs: dict[str, Bug] = {}
    for bug in (bug for module in _modules() for bug in module.BUGS):
        if bug.name in bugs:
            raise ValueError(f"duplicate bug name {bug.name!r}")
        bugs[bug.name] = bug
    return bugs


def _variants() -> dict[str, Variant]:
    variants: dict[str, Variant] = {}
    for module in _modules():
        for variant in getattr(module, "VARIANTS", ()):
            if variant.name in variants or variant.name in __getattr__("BUGS"):
                raise ValueError(f"duplicate variant name {variant.name!r}")
            variants[variant.name] = variant
    return variants


_LAZY = {"BUGS": _registry, "VARIANTS": _variants}
"""``BUGS`` (every known mistake) and ``VARIANTS`` (valid-but-unusual implementations every
check must pass) are built on first use, so that one part of the zoo (the broken releases of
notebook 05, :mod:`autograder.bugzoo.incidents`) imports without the others."""


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'autograder.bugzoo' has no attribute {name!r}")
    value = _LAZY[name]()
    globals()[name] = value
    return value
