"""Version plumbing between the course and the installed ``transformers``.

Two facts shape this module (see ``shared/FACTS.md``):

* transformers 5.24 renamed the forward keyword ``past_key_values`` to ``cache``; on 5.17 a
  ``cache=`` keyword is silently swallowed and a prefix would have *no effect*. So the keyword is
  read from the model's own ``forward`` signature, never guessed.
* Tuple-of-tuples caches are rejected on new versions; a :class:`transformers.DynamicCache` is
  built from per-layer ``(key, value)`` pairs instead. A DynamicCache is mutated in place by a
  forward pass, so a fresh one must be built for every forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import transformers
from transformers import DynamicCache

__all__ = [
    "cache_keyword",
    "make_cache",
    "transformers_version",
    "kv_geometry",
    "output_cache",
]


def transformers_version() -> tuple[int, int, int]:
    """The installed transformers version as ``(major, minor, patch)``."""
    parts = transformers.__version__.split(".")
    nums = []
    for part in parts[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    while len(nums) < 3:
        nums.append(0)
    return nums[0], nums[1], nums[2]


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` accepts a key/value cache.

    Returns ``"cache"`` (transformers >= 5.24) or ``"past_key_values"`` (older releases).
    PEFT wrappers and other modules that forward ``**kwargs`` are unwrapped to the base model.
    """
    base = model
    for attr in ("get_base_model",):
        if hasattr(base, attr):
            base = getattr(base, attr)()
    params = inspect.signature(base.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(
        f"{type(base).__name__}.forward accepts neither `cache` nor `past_key_values`; "
        "the course needs a causal LM from transformers (e.g. GPT-2 or Llama)."
    )


def output_cache(outputs: object) -> DynamicCache | None:
    """The cache returned by a forward pass, under whichever field name this version uses."""
    for name in ("cache", "past_key_values"):
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def make_cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """Build a fresh :class:`DynamicCache` holding one ``(key, value)`` pair per layer.

    Args:
        layers: for each decoder layer, ``key`` and ``value`` of shape
            ``(batch, n_kv_heads, prefix_len, head_dim)``.

    The tensors are used as they are (no copy, gradients flow through them). Never reuse the
    returned cache for a second forward: the model appends to it in place.
    """
    if len(layers) == 0:
        raise ValueError("make_cache needs at least one layer of (key, value)")
    for i, pair in enumerate(layers):
        if len(pair) != 2:
            raise ValueError(f"layer {i}: expected a (key, value) pair, got {len(pair)} items")
        key, value = pair
        if key.dim() != 4 or key.shape != value.shape:
            raise ValueError(
                f"layer {i}: key {tuple(key.shape)} and value {tuple(value.shape)} must both be "
                "(batch, n_kv_heads, prefix_len, head_dim)"
            )
    cache = DynamicCache()
    for i, (key, value) in enumerate(layers):
        cache.update(key, value, i)
    return cache


def kv_geometry(config: transformers.PretrainedConfig) -> dict[str, int]:
    """Layer count and key/value head geometry of a decoder config (GPT-2 or Llama family).

    Returns ``{"n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size"}``. With grouped
    query attention ``n_kv_heads < n_heads``; a prefix must use ``n_kv_heads``.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    n_heads = getattr(config, "num_attention_heads", None) or config.n_head
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    return {
        "n_layers": int(n_layers),
        "n_heads": int(n_heads),
        "n_kv_heads": int(n_kv),
        "head_dim": int(head_dim),
        "hidden_size": int(hidden),
    }
