"""Serving many tenants (notebook 04): prefix files and mixed-tenant batches."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel  # noqa: F401

from autograder.reference.prefix import _max_positions, _model_dtype
from course.compat import cache_keyword, kv_geometry, make_cache

# ---------------------------------------------------------------------------------------------
# Serving many tenants (notebook 04): prefix files, mixed-tenant batches
# ---------------------------------------------------------------------------------------------
PREFIX_FORMAT = "soft-prompts-course/prefix-v1"


def save_prefix(encoder_or_tensor, path: str | Path, meta: dict | None = None) -> Path:
    """Save one tenant's prefix values ``(L, 2, H, P, D)`` as a safetensors file.

    Args:
        encoder_or_tensor: a prefix encoder (called to get its values; a reparameterised
            encoder's MLP is NOT saved) or the ``(L, 2, H, P, D)`` tensor itself.
        path: the file to write.
        meta: JSON-serialisable facts about the prefix (tenant, task, steps ...), stored as JSON
            in the file's metadata and returned by :func:`load_prefix`.
    """
    from safetensors.torch import save_file

    values = encoder_or_tensor if isinstance(encoder_or_tensor, torch.Tensor) else None
    if values is None:
        with torch.no_grad():
            values = encoder_or_tensor()
    if values.dim() != 5 or values.shape[1] != 2:
        raise ValueError(f"a prefix is (L, 2, H, P, D), got shape {tuple(values.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"prefix": values.detach().float().cpu().contiguous()},
        str(path),
        metadata={"format": PREFIX_FORMAT, "meta": json.dumps(meta or {})},
    )
    return path


def load_prefix(path: str | Path, config) -> tuple[torch.Tensor, dict]:
    """Load a prefix saved by :func:`save_prefix` for a model with ``config``.

    Returns ``(prefix (L, 2, H, P, D) float32 on the CPU, meta)``. Raises ``ValueError`` naming
    both shapes when the file's geometry does not fit ``config`` (another number of layers,
    key/value heads or head dim): such a prefix would crash or silently misbehave.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if "prefix" not in f.keys():
            raise ValueError(f"{path} holds no prefix (tensors: {sorted(f.keys())})")
        values = f.get_tensor("prefix")
    g = kv_geometry(config)
    want = (g["n_layers"], 2, g["n_kv_heads"], values.shape[3] if values.dim() == 5 else "P",
            g["head_dim"])  # fmt: skip
    if tuple(values.shape) != want:
        raise ValueError(
            f"{path}: the prefix has shape {tuple(values.shape)} but this model needs "
            f"{want} (L, 2, H_kv, P, D): it was trained for another backbone"
        )
    return values, json.loads(metadata.get("meta", "{}"))


def _gather_prefixes(model, prefixes, tenant_ids, batch: int, device):
    """Per-row prefixes as one fresh cache, plus the visible prefix slots and lengths.

    Tenants whose prefixes are shorter than the longest one in the batch are LEFT-padded with
    zero keys/values in masked slots, so each row's real prefix sits right before its tokens.
    Returns ``(cache with (B, H, P_max, D) per layer, slots (B, P_max) bool, lengths (B,))``.
    """
    if len(tenant_ids) != batch:
        raise ValueError(f"{len(tenant_ids)} tenant ids for a batch of {batch} rows")
    unknown = sorted({t for t in tenant_ids if t not in prefixes})
    if unknown:
        raise KeyError(f"unknown tenant(s) {unknown}; known tenants: {sorted(prefixes)}")
    rows = [prefixes[t] for t in tenant_ids]
    lengths = torch.tensor([r.shape[3] for r in rows], device=device)
    p = int(lengths.max())
    dtype = _model_dtype(model)
    padded = [
        nn.functional.pad(r.to(device=device, dtype=dtype), (0, 0, p - r.shape[3], 0)) for r in rows
    ]
    stacked = torch.stack(padded, dim=2)  # (L, 2, B, H, P_max, D)
    cache = make_cache([(layer[0], layer[1]) for layer in stacked])
    slots = torch.arange(p, device=device)[None, :] >= (p - lengths)[:, None]
    return cache, slots, lengths


def mixed_prefix_forward(
    model: PreTrainedModel,
    prefixes: dict[str, torch.Tensor],
    tenant_ids: list[str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
):
    """One forward pass over a batch whose row ``b`` uses ``prefixes[tenant_ids[b]]``.

    Each layer's cache holds ``(B, H, P_max, D)`` keys/values gathered row by row; shorter
    prefixes are left-padded into masked slots and each row's tokens take positions
    ``P_b .. P_b+T-1``, so every row equals :func:`prefix_forward` with its own tenant alone.
    """
    batch, length = input_ids.shape
    cache, slots, lengths = _gather_prefixes(model, prefixes, tenant_ids, batch, input_ids.device)
    limit = _max_positions(model)
    if limit is not None and int(lengths.max()) + length > limit:
        raise ValueError(
            f"prefix ({int(lengths.max())}) + tokens ({length}) exceeds the model's {limit} "
            "positions: shorten the input or the prefix"
        )
    mask = torch.cat([slots.to(attention_mask.dtype), attention_mask], dim=1)
    positions = lengths[:, None] + torch.arange(length, device=input_ids.device)[None, :]
    return model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        labels=labels,
        use_cache=False,
        **{cache_keyword(model): cache},
    )


@torch.no_grad()
def mixed_generate(
    model: PreTrainedModel,
    prefixes: dict[str, torch.Tensor],
    tenant_ids: list[str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int = 20,
    **generate_kwargs,
) -> torch.Tensor:
    """Greedy generation for a mixed-tenant batch (prompts left-padded); returns only the new
    tokens ``(B, <= max_new_tokens)``. ``generate`` derives each row's positions from the mask,
    so padded prefix slots shift nothing."""
    batch = input_ids.shape[0]
    cache, slots, _ = _gather_prefixes(model, prefixes, tenant_ids, batch, input_ids.device)
    mask = torch.cat([slots.to(attention_mask.dtype), attention_mask], dim=1)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", model.config.eos_token_id)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        **{cache_keyword(model): cache},
        **generate_kwargs,
    )
    return out[:, input_ids.shape[1] :]
