"""Behaviour-based checks of the graded objects, one module per notebook.

Each ``check_*`` function takes the student's objects (functions or classes, never their
variable names), runs them on tiny random GPT-2 and Llama-GQA models it builds itself
(:mod:`autograder.checks.models`), watches what every layer receives
(:mod:`autograder.checks.recording`), returns ``None`` on success and raises ``AssertionError``
with a message that says what was observed, what was expected and the likely mistake.

* :mod:`~autograder.checks.frozen` — the backbone stays frozen and bit-identical.
* :mod:`~autograder.checks.prompt` — notebook 01, prompt tuning.
* :mod:`~autograder.checks.prefix` — notebook 02, deep prefix tuning (key/value form).
* :mod:`~autograder.checks.deep` — notebook 02, the hidden-state ("deep prompt") form.
* :mod:`~autograder.checks.compiled` — notebook 02, a soft prompt or hidden-state prompts
  compiled into a key/value prefix.
* :mod:`~autograder.checks.prompting` — notebook 03, prompt functions and verbalizers.
* :mod:`~autograder.checks.experiments` — notebook 03, every method behind one interface and
  the equal-budget sweep harness.
* :mod:`~autograder.checks.serving` — notebook 04, prefix files and mixed-tenant batches.
* :mod:`~autograder.checks.debugging` — notebook 05, a prefix under gradient checkpointing.
* :mod:`~autograder.checks.protocol` — every check as an *observe* half (student code, in the
  kernel) and a *judge* half (the grader's process, from data only).

Visible notebook cells call them through :func:`autograder.selfcheck.run`; hidden tests call
``selfcheck.hidden("check_prefix_forward", ...)``; under grading both only observe, and the
grader judges (:mod:`autograder.pipeline.verdicts`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["CHECKS", "NOTEBOOK_CHECKS", "get_check"]

CHECKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "check_freeze_backbone": ("frozen", ("freeze_backbone",)),
    "check_soft_prompt": ("prompt", ("SoftPrompt",)),
    "check_prepend_prompt": ("prompt", ("prepend_prompt", "SoftPrompt")),
    "check_prompt_equivalence": ("prompt", ("SoftPrompt", "prepend_prompt")),
    "check_peft_prompt_equivalence": ("prompt", ("SoftPrompt", "prepend_prompt")),
    "check_prompt_training": ("prompt", ("freeze_backbone", "SoftPrompt", "prepend_prompt")),
    "check_save_load_prompt": ("prompt", ("save_prompt", "load_prompt", "SoftPrompt")),
    "check_prefix_encoder": ("prefix", ("PrefixEncoder",)),
    "check_build_prefix_cache": ("prefix", ("build_prefix_cache",)),
    "check_prefix_forward": ("prefix", ("prefix_forward", "PrefixEncoder")),
    "check_prefix_training": ("prefix", ("freeze_backbone", "PrefixEncoder", "prefix_forward")),
    "check_generate_with_prefix": (
        "prefix",
        ("generate_with_prefix", "PrefixEncoder", "prefix_forward"),
    ),
    "check_peft_equivalence": ("prefix", ("PrefixEncoder", "prefix_forward")),
    "check_bf16": ("prefix", ("prefix_forward", "PrefixEncoder")),
    "check_deep_prompt": ("deep", ("DeepPrompt", "deep_prompt_forward")),
    "check_soft_prompt_to_prefix": ("compiled", ("soft_prompt_to_prefix",)),
    "check_deep_prompt_to_prefix": ("compiled", ("deep_prompt_to_prefix",)),
    "check_prompt_function": ("prompting", ("prompt_function",)),
    "check_label_scores": ("prompting", ("label_scores",)),
    "check_method_parameters": ("experiments", ("make_method",)),
    "check_method_functions": ("experiments", ("make_method",)),
    "check_run_sweep": ("experiments", ("run_sweep",)),
    "check_save_load_prefix": ("serving", ("save_prefix", "load_prefix")),
    "check_mixed_prefix_forward": ("serving", ("mixed_prefix_forward",)),
    "check_mixed_generate": ("serving", ("mixed_generate",)),
    "check_checkpointed_prefix_forward": (
        "debugging",
        ("checkpoint_safe_prefix_forward", "PrefixEncoder"),
    ),
}
"""Every notebook-facing check: name -> (module under ``autograder.checks``, the names of the
graded objects it takes, in order). ``check_backbone_unchanged_after_training`` is not listed:
it takes adapters, and the training checks above call it for the students."""


NOTEBOOK_CHECKS: dict[str, tuple[str, tuple[str, ...]]] = {
    **CHECKS,
    "check_answer": ("quiz", ("question_id", "answer")),
    "check_prompt_artifact": ("artifacts", ("prompt", "model")),
    "check_prefix_artifact": ("artifacts", ("encoder", "model")),
    "check_sweep_artifact": ("experiments", ("study", "model")),
    "check_count_parameters_by_group": ("tour", ("count_parameters_by_group",)),
    "check_freeze_except": ("tour", ("freeze_except",)),
    "check_layer_hidden_states": ("tour", ("layer_hidden_states",)),
    "check_predict_cache_shapes": ("tour", ("predict_cache_shapes",)),
}
"""Every check a notebook cell may call: :data:`CHECKS` (each has known-buggy twins in the bug
zoo) plus the multiple-choice answers, the trained artifacts (they take what the notebook
produced rather than graded code) and notebook 00's tour checks."""


def get_check(name: str) -> Callable[..., None]:
    """The check function called ``name`` (a key of :data:`NOTEBOOK_CHECKS`)."""
    module, _ = NOTEBOOK_CHECKS[name]
    return getattr(importlib.import_module(f"autograder.checks.{module}"), name)
