"""Reference implementations of everything the notebooks grade, one module per concept.

The solution notebooks implement the same objects; the judges compare what a student's object
did with these, and the benchmarks and demo use them. Shapes follow the course's notation:
``B`` batch, ``T`` real tokens, ``P`` prefix / prompt length, ``L`` layers, ``H`` key/value heads
(``num_key_value_heads`` under grouped-query attention), ``D`` head dim, ``d`` hidden size.

* :mod:`~autograder.reference.common` — ``IGNORE_INDEX``, freezing, counting (notebooks 01–05);
* :mod:`~autograder.reference.prompt` — prompt tuning (01);
* :mod:`~autograder.reference.prefix` — deep prefix tuning, key/value form (02);
* :mod:`~autograder.reference.deep` — the hidden-state form, and compiling a prompt into a
  key/value prefix (02);
* :mod:`~autograder.reference.prompting` — prompt functions and verbalizers (03);
* :mod:`~autograder.reference.experiments` — ``make_method``, ``run_sweep`` (03);
* :mod:`~autograder.reference.serving` — prefix files, mixed-tenant batches (04);
* :mod:`~autograder.reference.debugging` — a prefix under gradient checkpointing (05);
* :mod:`~autograder.reference.tour` — what notebook 00's functions return (00).

``from autograder.reference import prefix_forward`` works as before: names are looked up in the
concept modules on first use (:pep:`562`), so that a grading sandbox can hide the modules of the
concepts a notebook grades while leaving the others importable (notebook 03 builds on 01–02).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE: dict[str, str] = {
    "IGNORE_INDEX": "common",
    "count_trainable": "common",
    "freeze_backbone": "common",
    "SoftPrompt": "prompt",
    "load_prompt": "prompt",
    "prepend_prompt": "prompt",
    "prompt_forward": "prompt",
    "save_prompt": "prompt",
    "PrefixEncoder": "prefix",
    "build_prefix_cache": "prefix",
    "d_kv": "prefix",
    "generate_with_prefix": "prefix",
    "prefix_forward": "prefix",
    "prefix_from_peft_weights": "prefix",
    "prefix_to_peft_weights": "prefix",
    "DeepPrompt": "deep",
    "deep_prompt_forward": "deep",
    "deep_prompt_to_prefix": "deep",
    "soft_prompt_to_prefix": "deep",
    "PREFIX_FORMAT": "serving",
    "_gather_prefixes": "serving",
    "load_prefix": "serving",
    "mixed_generate": "serving",
    "mixed_prefix_forward": "serving",
    "save_prefix": "serving",
    "PREFIX_ATTENTION": "debugging",
    "checkpoint_safe_prefix_forward": "debugging",
    "prompt_function": "prompting",
    "label_scores": "prompting",
    "METHODS": "experiments",
    "Method": "experiments",
    "lora_targets": "experiments",
    "make_method": "experiments",
    "run_sweep": "experiments",
    "method_counts": "experiments",
    "GROUP_KEYS": "tour",
    "cache_shapes": "tour",
    "count_parameters_by_group": "tour",
}

__all__ = sorted(name for name in _WHERE if not name.startswith("_"))


NOTEBOOK_OF: dict[str, str] = {
    "tour": "00_backbone_tour",
    "common": "01_prompt_tuning",
    "prompt": "01_prompt_tuning",
    "prefix": "02_prefix_tuning",
    "deep": "02_prefix_tuning",
    "prompting": "03_experiments",
    "experiments": "03_experiments",
    "serving": "04_serving",
    "debugging": "05_debugging",
}
"""Concept module -> the notebook whose graded objects it implements. A student package holds
only the modules of the notebooks its instructor has unlocked (``python -m autograder package
--unlock``): those already due, whose reference later notebooks build on."""


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'autograder.reference' has no attribute {name!r}")
    try:
        concept = importlib.import_module(f"autograder.reference.{module}")
    except ModuleNotFoundError as err:
        if err.name != f"autograder.reference.{module}":
            raise
        notebook = NOTEBOOK_OF[module]
        raise ModuleNotFoundError(
            f"{name} is the reference of notebook {notebook}, which this course package does not "
            f"include yet: your instructor adds it once {notebook} is due (`python -m autograder "
            f"package --unlock {notebook[:2]}`)",
            name=err.name,
        ) from None
    value = getattr(concept, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
