"""Serving mistakes (notebook 04): prefix files, mixed-tenant batches and their generation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from autograder.bugzoo import Bug
from autograder.reference import _gather_prefixes
from course.compat import cache_keyword, kv_geometry

__all__ = ["BUGS"]


def _values(encoder_or_tensor) -> torch.Tensor:
    if isinstance(encoder_or_tensor, torch.Tensor):
        return encoder_or_tensor.detach()
    with torch.no_grad():
        return encoder_or_tensor()


def _dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


# --- prefix files ------------------------------------------------------------------------------
def save_prefix_pickled(encoder_or_tensor, path, meta=None):
    """Writes the prefix with torch.save (a pickle) under a .safetensors name."""
    torch.save({"prefix": _values(encoder_or_tensor).cpu(), "meta": meta or {}}, Path(path))
    return Path(path)


def save_prefix_state_dict(encoder_or_tensor, path, meta=None):
    """Saves the encoder's whole state dict: a reparameterised encoder ships its MLP."""
    if isinstance(encoder_or_tensor, torch.Tensor):
        tensors = {"prefix": encoder_or_tensor.detach()}
    else:
        tensors = {k: v.detach() for k, v in encoder_or_tensor.state_dict().items()}
    tensors = {k: v.float().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta or {})})
    return Path(path)


def save_prefix_without_meta(encoder_or_tensor, path, meta=None):
    """Saves the prefix but drops the meta dict."""
    save_file({"prefix": _values(encoder_or_tensor).float().cpu().contiguous()}, str(path))
    return Path(path)


def _read(path) -> tuple[torch.Tensor, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        return f.get_tensor("prefix"), meta


def load_prefix_unchecked(path, config):
    """Loads whatever the file holds, without comparing it with the model's geometry."""
    return _read(path)


def load_prefix_reshaped(path, config):
    """Compares only the NUMBER of values and reshapes to the model's geometry: a GPT-2 prefix
    with as many values as a Llama-GQA one is silently scrambled into it."""
    values, meta = _read(path)
    g = kv_geometry(config)
    shape = (g["n_layers"], 2, g["n_kv_heads"], -1, g["head_dim"])
    per_position = g["n_layers"] * 2 * g["n_kv_heads"] * g["head_dim"]
    if values.numel() % per_position:
        raise ValueError("prefix does not fit")
    return values.reshape(shape), meta


def load_prefix_vague_error(path, config):
    """Refuses a mismatching prefix with a message that says nothing useful."""
    values, meta = _read(path)
    g = kv_geometry(config)
    if (values.shape[0], values.shape[2], values.shape[4]) != (
        g["n_layers"],
        g["n_kv_heads"],
        g["head_dim"],
    ):
        raise ValueError("invalid prefix file")
    return values, meta


def _gather(model, prefixes, tenant_ids, input_ids):
    """The reference's per-row prefix cache, visible slots and lengths for ``tenant_ids``."""
    return _gather_prefixes(model, prefixes, tenant_ids, len(tenant_ids), input_ids.device)


# --- mixed_prefix_forward ----------------------------------------------------------------------
def _run(model, input_ids, attention_mask, labels, cache, slots, lengths, *, extend=True):
    length = input_ids.shape[1]
    mask = attention_mask
    if extend:
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


def mixed_first_tenant_only(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
    """Serves the whole batch with the first row's tenant's prefix."""
    first = [tenant_ids[0]] * len(tenant_ids)
    cache, slots, lengths = _gather(model, prefixes, first, input_ids)
    return _run(model, input_ids, attention_mask, labels, cache, slots, lengths)


def mixed_grouped_by_tenant(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
    """Builds the prefix rows tenant by tenant ("one expand per tenant"), so the prefixes come
    grouped by tenant while the token rows keep the request order."""
    grouped = [t for t, n in Counter(tenant_ids).items() for _ in range(n)]
    cache, slots, lengths = _gather(model, prefixes, grouped, input_ids)
    return _run(model, input_ids, attention_mask, labels, cache, slots, lengths)


def mixed_mask_not_extended(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
    """Passes the (B, T) mask with a P-long prefix cache."""
    cache, slots, lengths = _gather(model, prefixes, tenant_ids, input_ids)
    return _run(model, input_ids, attention_mask, labels, cache, slots, lengths, extend=False)


def mixed_positions_of_longest(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
    """Left-pads shorter prefixes correctly but starts every row at the LONGEST prefix's length."""
    cache, slots, lengths = _gather(model, prefixes, tenant_ids, input_ids)
    longest = torch.full_like(lengths, int(lengths.max()))
    return _run(model, input_ids, attention_mask, labels, cache, slots, longest)


def mixed_pad_slots_visible(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
    """Left-pads shorter prefixes with zeros but leaves the padded slots visible (mask 1)."""
    cache, slots, lengths = _gather(model, prefixes, tenant_ids, input_ids)
    return _run(model, input_ids, attention_mask, labels, cache, torch.ones_like(slots), lengths)


# --- mixed_generate ----------------------------------------------------------------------------
def _generate(model, input_ids, mask, cache, max_new_tokens, keep_prompt=False):
    kwargs = {} if cache is None else {cache_keyword(model): cache}
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
        **kwargs,
    )
    return out if keep_prompt else out[:, input_ids.shape[1] :]


@torch.no_grad()
def generate_first_tenant_only(
    model, prefixes, tenant_ids, input_ids, attention_mask, max_new_tokens=20
):
    """Generates every row with the first row's tenant's prefix."""
    first = [tenant_ids[0]] * len(tenant_ids)
    cache, slots, _ = _gather(model, prefixes, first, input_ids)
    mask = torch.cat([slots.to(attention_mask.dtype), attention_mask], dim=1)
    return _generate(model, input_ids, mask, cache, max_new_tokens)


@torch.no_grad()
def generate_mixed_without_prefix(
    model, prefixes, tenant_ids, input_ids, attention_mask, max_new_tokens=20
):
    """Never passes the gathered prefix cache (nor its mask slots) to generate."""
    _gather(model, prefixes, tenant_ids, input_ids)  # validates tenants
    return _generate(model, input_ids, attention_mask, None, max_new_tokens)


@torch.no_grad()
def generate_mixed_returns_prompt(
    model, prefixes, tenant_ids, input_ids, attention_mask, max_new_tokens=20
):
    """Returns the prompt tokens followed by the new ones."""
    cache, slots, _ = _gather(model, prefixes, tenant_ids, input_ids)
    mask = torch.cat([slots.to(attention_mask.dtype), attention_mask], dim=1)
    return _generate(model, input_ids, mask, cache, max_new_tokens, keep_prompt=True)


@torch.no_grad()
def generate_pad_slots_visible(
    model, prefixes, tenant_ids, input_ids, attention_mask, max_new_tokens=20
):
    """Left-pads shorter prefixes with zeros and leaves those slots visible in the mask."""
    cache, slots, _ = _gather(model, prefixes, tenant_ids, input_ids)
    mask = torch.cat([torch.ones_like(slots).to(attention_mask.dtype), attention_mask], dim=1)
    return _generate(model, input_ids, mask, cache, max_new_tokens)


BUGS = [
    Bug(
        name="save_prefix_pickled",
        description="save_prefix writes a torch pickle under a .safetensors name",
        notebook="04",
        replaces={"save_prefix": save_prefix_pickled},
        caught_by=("check_save_load_prefix",),
        message_contains="not a safetensors file",
    ),
    Bug(
        name="save_prefix_state_dict",
        description=(
            "save_prefix saves the encoder's state dict: a reparameterised encoder ships its "
            "training-only MLP in every tenant's file"
        ),
        notebook="04",
        replaces={"save_prefix": save_prefix_state_dict},
        caught_by=("check_save_load_prefix",),
        message_contains="state dict",
    ),
    Bug(
        name="save_prefix_without_meta",
        description="save_prefix drops the meta dict (tenant, task, steps)",
        notebook="04",
        replaces={"save_prefix": save_prefix_without_meta},
        caught_by=("check_save_load_prefix",),
        message_contains="meta",
    ),
    Bug(
        name="load_prefix_unchecked",
        description="load_prefix never compares the file's geometry with the model's",
        notebook="04",
        replaces={"load_prefix": load_prefix_unchecked},
        caught_by=("check_save_load_prefix",),
        message_contains="must be refused",
    ),
    Bug(
        name="load_prefix_reshaped",
        description=(
            "load_prefix compares only the number of values and reshapes: a GPT-2 prefix with "
            "as many values as a Llama-GQA one is silently scrambled into it"
        ),
        notebook="04",
        replaces={"load_prefix": load_prefix_reshaped},
        caught_by=("check_save_load_prefix",),
        message_contains="must be refused",
    ),
    Bug(
        name="load_prefix_vague_error",
        description="load_prefix refuses a mismatching prefix with 'invalid prefix file'",
        notebook="04",
        replaces={"load_prefix": load_prefix_vague_error},
        caught_by=("check_save_load_prefix",),
        message_contains="does not name",
    ),
    Bug(
        name="mixed_first_tenant_only",
        description="mixed_prefix_forward serves every row with the first row's tenant",
        notebook="04",
        replaces={"mixed_prefix_forward": mixed_first_tenant_only},
        caught_by=("check_mixed_prefix_forward",),
        message_contains="tenant_ids[row]",
    ),
    Bug(
        name="mixed_grouped_by_tenant",
        description=(
            "mixed_prefix_forward stacks the prefixes grouped by tenant while the token rows "
            "keep the request order: rows get other tenants' prefixes"
        ),
        notebook="04",
        replaces={"mixed_prefix_forward": mixed_grouped_by_tenant},
        caught_by=("check_mixed_prefix_forward",),
        message_contains="tenant_ids[row]",
    ),
    Bug(
        name="mixed_mask_not_extended",
        description="mixed_prefix_forward passes the (B, T) mask with the prefix cache",
        notebook="04",
        replaces={"mixed_prefix_forward": mixed_mask_not_extended},
        caught_by=("check_mixed_prefix_forward",),
        message_contains="extended by",
    ),
    Bug(
        name="mixed_positions_of_longest",
        description=(
            "with prefixes of different lengths, every row's tokens start at the longest "
            "prefix's length instead of their own"
        ),
        notebook="04",
        replaces={"mixed_prefix_forward": mixed_positions_of_longest},
        caught_by=("check_mixed_prefix_forward",),
        message_contains="OWN",
    ),
    Bug(
        name="mixed_pad_slots_visible",
        description="shorter prefixes are left-padded with zeros that stay visible in the mask",
        notebook="04",
        replaces={"mixed_prefix_forward": mixed_pad_slots_visible},
        caught_by=("check_mixed_prefix_forward",),
        message_contains="padded prefix slots",
    ),
    Bug(
        name="generate_first_tenant_only",
        description="mixed_generate generates every row with the first row's tenant",
        notebook="04",
        replaces={"mixed_generate": generate_first_tenant_only},
        caught_by=("check_mixed_generate",),
        message_contains="tenant_ids[row]",
    ),
    Bug(
        name="generate_mixed_without_prefix",
        description="mixed_generate never passes the gathered prefix cache to generate",
        notebook="04",
        replaces={"mixed_generate": generate_mixed_without_prefix},
        caught_by=("check_mixed_generate",),
        message_contains="WITHOUT",
    ),
    Bug(
        name="generate_mixed_returns_prompt",
        description="mixed_generate returns the prompt followed by the new tokens",
        notebook="04",
        replaces={"mixed_generate": generate_mixed_returns_prompt},
        caught_by=("check_mixed_generate",),
        message_contains="only the new ones",
    ),
    Bug(
        name="generate_pad_slots_visible",
        description="mixed_generate leaves left-padded prefix slots visible in the mask",
        notebook="04",
        replaces={"mixed_generate": generate_pad_slots_visible},
        caught_by=("check_mixed_generate",),
        message_contains="MASKED",
    ),
]
