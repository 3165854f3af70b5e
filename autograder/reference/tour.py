"""Notebook 00 (backbone tour): what its graded functions must return, for the judges.

Kept here, with the other reference implementations, rather than in ``autograder/checks/tour.py``:
grading kernels can import the checks (they observe with them) but not these (hidden by the
sandbox), so no submission can call them in place of its own code.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "lm_head": ("lm_head",),
    "embeddings": ("wte", "wpe", "embed"),
    "norm": ("ln_", "norm"),
    "attention": ("attn",),
    "mlp": ("mlp",),
}
"""The grouping rule notebook 00 states: a parameter belongs to the FIRST group (in this order)
one of whose substrings occurs in its name."""


def count_parameters_by_group(model: nn.Module) -> dict[str, int]:
    """Scalar parameters per group of :data:`GROUP_KEYS`, plus ``"total"`` (tied tensors once)."""
    counts = dict.fromkeys([*GROUP_KEYS, "total"], 0)
    for name, p in model.named_parameters():
        group = next(g for g, keys in GROUP_KEYS.items() if any(k in name for k in keys))
        counts[group] += p.numel()
        counts["total"] += p.numel()
    return counts


@torch.no_grad()
def cache_shapes(model: nn.Module, input_ids: torch.Tensor) -> list[tuple]:
    """``[(key_shape, value_shape)]`` per layer of the cache ``model`` builds for ``input_ids``."""
    out = model(input_ids=input_ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return [(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers]
