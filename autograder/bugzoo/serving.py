"""Serving mistakes (notebook 04): prefix files, mixed-tenant batches and their generation; and
valid but unusual designs the checks must pass (``VARIANTS``: another file layout, padding slots
behind the prefix or filled with non-zeros, refusing mixed prefix lengths, greedy decoding by
hand)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from autograder.bugzoo import Bug, Variant
from autograder.reference import _gather_prefixes, mixed_prefix_forward
from course.compat import cache_keyword, kv_geometry, make_cache

__all__ = ["BUGS", "VARIANTS"]


def _values(encoder_or_tensor) -> torch.Tensor:
    if isinstance(encoder_or_tensor, torch.Tensor):
        return encoder_or_tensor.detach()
    with torch.no_grad():
        return encoder_or_tensor()


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


def _refuse_unless(values, want: tuple, dims: tuple[int, ...]) -> None:
    """Refuse ``values`` when the dimensions ``dims`` differ from ``want`` (the others pass)."""
    if any(values.shape[i] != want[i] for i in dims):
        raise ValueError(f"prefix {tuple(values.shape)} does not fit this model: it needs {want}")


def load_prefix_ignores_head_dim(path, config):
    """Compares the file's layers and key/value heads with the model's, but not the head dim."""
    values, meta = _read(path)
    g = kv_geometry(config)
    want = (g["n_layers"], 2, g["n_kv_heads"], values.shape[3], g["head_dim"])
    _refuse_unless(values, want, (0, 1, 2))
    return values, meta


def load_prefix_ignores_kv_heads(path, config):
    """Compares the file's layers and head dim with the model's, but not the key/value heads."""
    values, meta = _read(path)
    g = kv_geometry(config)
    want = (g["n_layers"], 2, g["n_kv_heads"], values.shape[3], g["head_dim"])
    _refuse_unless(values, want, (0, 1, 4))
    return values, meta


_READ: dict[str, tuple[torch.Tensor, dict]] = {}


def load_prefix_cached_by_name(path, config):
    """Checks the geometry every time, but keeps what it read from each file in a cache keyed
    by the file's name: a tenant whose file is replaced (a new version, or the same name in
    another registry) keeps its old values."""
    name = Path(path).name
    if name not in _READ:
        _READ[name] = _read(path)
    values, meta = _READ[name]
    g = kv_geometry(config)
    want = (g["n_layers"], 2, g["n_kv_heads"], values.shape[3], g["head_dim"])
    _refuse_unless(values, want, (0, 1, 2, 3, 4))
    return values, dict(meta)


# valid variant: another file layout
def _save_other_layout(encoder_or_tensor, path, meta=None):
    """Another legal file layout: the tensor is called ``kv`` and the meta lives under another
    metadata key, next to a format tag."""
    path = Path(path)
    save_file(
        {"kv": _values(encoder_or_tensor).float().cpu().contiguous()},
        str(path),
        metadata={"format": "tenant-prefix/2", "tenant_meta": json.dumps(meta or {})},
    )
    return path


def _load_other_layout(path, config):
    with safe_open(str(path), framework="pt") as f:
        (name,) = f.keys()
        values = f.get_tensor(name)
        meta = json.loads((f.metadata() or {}).get("tenant_meta", "{}"))
    g = kv_geometry(config)
    want = [g["n_layers"], 2, g["n_kv_heads"], values.shape[-2], g["head_dim"]]
    if values.dim() != 5 or list(values.shape) != want:
        raise ValueError(f"the file holds a {list(values.shape)} prefix, this model needs {want}")
    return values.clone(), meta


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


def mixed_prefixes_detached(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
    """Builds the cache from detached prefixes: serving works, training them does nothing."""
    frozen = {t: v.detach() for t, v in prefixes.items()}
    cache, slots, lengths = _gather(model, frozen, tenant_ids, input_ids)
    return _run(model, input_ids, attention_mask, labels, cache, slots, lengths)


def mixed_values_detached(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
    """Detaches the values of the gathered cache (keys keep their gradient path)."""
    cache, slots, lengths = _gather(model, prefixes, tenant_ids, input_ids)
    cache = make_cache([(layer.keys, layer.values.detach()) for layer in cache.layers])
    return _run(model, input_ids, attention_mask, labels, cache, slots, lengths)


def mixed_not_cast(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
    """Stacks the prefixes as they come (float32), never cast to the model's dtype."""
    rows = [prefixes[t] for t in tenant_ids]
    lengths = torch.tensor([r.shape[3] for r in rows])
    p = int(lengths.max())
    padded = [torch.nn.functional.pad(r, (0, 0, p - r.shape[3], 0)) for r in rows]
    stacked = torch.stack(padded, dim=2)
    cache = make_cache([(layer[0], layer[1]) for layer in stacked])
    slots = torch.arange(p)[None, :] >= (p - lengths)[:, None]
    return _run(model, input_ids, attention_mask, labels, cache, slots, lengths)


def _pad_registry(prefixes, tenant_ids) -> None:
    """Replaces the dict's shorter entries with left-padded copies (in the caller's dict)."""
    p = max(prefixes[t].shape[3] for t in tenant_ids)
    for t in set(tenant_ids):
        prefixes[t] = torch.nn.functional.pad(prefixes[t], (0, 0, p - prefixes[t].shape[3], 0))


def mixed_pads_registry(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
    """Correct for this call, but pads the shorter prefixes IN the caller's dict: the registry
    now holds padded prefixes, and the next batch serves them unmasked."""
    cache, slots, lengths = _gather(model, prefixes, tenant_ids, input_ids)
    _pad_registry(prefixes, tenant_ids)
    return _run(model, input_ids, attention_mask, labels, cache, slots, lengths)


# valid variants: other padding of shorter prefixes, refusing mixed lengths, decoding by hand
def _gather_padded(model, prefixes, tenant_ids, input_ids, fill_front: bool):
    """A legal gather: shorter prefixes padded BEHIND (``fill_front=False``) or in front with
    copies of their first slot (``True``); either way the padding slots are masked."""
    rows = [prefixes[t] for t in tenant_ids]
    lengths = torch.tensor([r.shape[3] for r in rows], device=input_ids.device)
    p = int(lengths.max())
    dtype = model.get_input_embeddings().weight.dtype
    padded, slots = [], []
    for r in rows:
        r = r.to(device=input_ids.device, dtype=dtype)
        n = r.shape[3]
        if fill_front:
            padded.append(torch.cat([r[:, :, :, :1].expand(-1, -1, -1, p - n, -1), r], dim=3))
            slots.append(torch.arange(p) >= p - n)
        else:
            padded.append(torch.nn.functional.pad(r, (0, 0, 0, p - n)))
            slots.append(torch.arange(p) < n)
    stacked = torch.stack(padded, dim=2)
    cache = make_cache([(layer[0], layer[1]) for layer in stacked])
    return cache, torch.stack(slots).to(input_ids.device), lengths


def _mixed_padded(fill_front: bool):
    def forward(model, prefixes, tenant_ids, input_ids, attention_mask, labels=None):
        cache, slots, lengths = _gather_padded(model, prefixes, tenant_ids, input_ids, fill_front)
        return _run(model, input_ids, attention_mask, labels, cache, slots, lengths)

    @torch.no_grad()
    def generate(model, prefixes, tenant_ids, input_ids, attention_mask, max_new_tokens=20):
        cache, slots, _ = _gather_padded(model, prefixes, tenant_ids, input_ids, fill_front)
        mask = torch.cat([slots.to(attention_mask.dtype), attention_mask], dim=1)
        return _generate(model, input_ids, mask, cache, max_new_tokens)

    return forward, generate


_behind_forward, _behind_generate = _mixed_padded(fill_front=False)
_filled_forward, _filled_generate = _mixed_padded(fill_front=True)


def _rejecting(fn):
    """``fn`` that refuses a batch whose tenants' prefixes differ in length."""

    def wrapped(model, prefixes, tenant_ids, input_ids, attention_mask, *args, **kwargs):
        lengths = sorted({prefixes[t].shape[3] for t in tenant_ids if t in prefixes})
        if len(lengths) > 1:
            raise ValueError(f"prefix lengths differ in this batch: P in {lengths}")
        return fn(model, prefixes, tenant_ids, input_ids, attention_mask, *args, **kwargs)

    return wrapped


@torch.no_grad()
def _generate_by_hand(model, prefixes, tenant_ids, input_ids, attention_mask, max_new_tokens=20):
    """Greedy decoding as a loop of full forward passes with a fresh gathered cache each (no
    generate, no cache reuse); each row's real tokens at positions P_b, P_b + 1, ... as
    generate places them (left padding does not count)."""
    ids, mask, new = input_ids, attention_mask, []
    for _ in range(max_new_tokens):
        cache, slots, lengths = _gather(model, prefixes, tenant_ids, ids)
        positions = lengths[:, None] + (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids,
            attention_mask=torch.cat([slots.to(mask.dtype), mask], dim=1),
            position_ids=positions,
            use_cache=False,
            **{cache_keyword(model): cache},
        ).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        new.append(token)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return torch.cat(new, dim=1)


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


@torch.no_grad()
def generate_one_short(model, prefixes, tenant_ids, input_ids, attention_mask, max_new_tokens=20):
    """Off by one: generates ``max_new_tokens - 1`` tokens."""
    cache, slots, _ = _gather(model, prefixes, tenant_ids, input_ids)
    mask = torch.cat([slots.to(attention_mask.dtype), attention_mask], dim=1)
    return _generate(model, input_ids, mask, cache, max_new_tokens - 1)


@torch.no_grad()
def generate_unknown_as_first(
    model, prefixes, tenant_ids, input_ids, attention_mask, max_new_tokens=20
):
    """Serves a request of an unknown tenant with the registry's first prefix."""
    first = next(iter(prefixes))
    known = [t if t in prefixes else first for t in tenant_ids]
    cache, slots, _ = _gather(model, prefixes, known, input_ids)
    mask = torch.cat([slots.to(attention_mask.dtype), attention_mask], dim=1)
    return _generate(model, input_ids, mask, cache, max_new_tokens)


@torch.no_grad()
def generate_pads_registry(
    model, prefixes, tenant_ids, input_ids, attention_mask, max_new_tokens=20
):
    """Correct tokens, but pads the shorter prefixes IN the caller's dict: the registry is
    rewritten by a read."""
    cache, slots, _ = _gather(model, prefixes, tenant_ids, input_ids)
    mask = torch.cat([slots.to(attention_mask.dtype), attention_mask], dim=1)
    _pad_registry(prefixes, tenant_ids)
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
    Bug(
        name="load_prefix_ignores_head_dim",
        description=(
            "load_prefix compares the file's layers and key/value heads with the model's but not "
            "the head dim: a prefix with 4 heads of 8 loads into a model with 4 heads of 16"
        ),
        notebook="04",
        replaces={"load_prefix": load_prefix_ignores_head_dim},
        caught_by=("check_save_load_prefix",),
        message_contains="must be refused",
    ),
    Bug(
        name="load_prefix_ignores_kv_heads",
        description=(
            "load_prefix compares the file's layers and head dim with the model's but not the "
            "number of key/value heads"
        ),
        notebook="04",
        replaces={"load_prefix": load_prefix_ignores_kv_heads},
        caught_by=("check_save_load_prefix",),
        message_contains="must be refused",
    ),
    Bug(
        name="load_prefix_cached_by_name",
        description=(
            "load_prefix caches what it loaded by file name: a tenant's updated file (or the "
            "same name in another registry) keeps serving the old values"
        ),
        notebook="04",
        replaces={"load_prefix": load_prefix_cached_by_name},
        caught_by=("check_save_load_prefix",),
        message_contains="read the values from the file",
    ),
    Bug(
        name="mixed_prefixes_detached",
        description=(
            "mixed_prefix_forward builds the cache from detached prefixes: the notebook's "
            "mixed-batch training never changes them"
        ),
        notebook="04",
        replaces={"mixed_prefix_forward": mixed_prefixes_detached},
        caught_by=("check_mixed_prefix_forward",),
        message_contains="no gradient path",
    ),
    Bug(
        name="mixed_values_detached",
        description="mixed_prefix_forward detaches the cache's values (keys still train)",
        notebook="04",
        replaces={"mixed_prefix_forward": mixed_values_detached},
        caught_by=("check_mixed_prefix_forward",),
        message_contains="no gradient reaches the values of the prefix",
    ),
    Bug(
        name="mixed_prefix_not_cast",
        description=(
            "mixed_prefix_forward never casts the float32 prefixes to the model's dtype: a "
            "bfloat16 model fails"
        ),
        notebook="04",
        replaces={"mixed_prefix_forward": mixed_not_cast},
        caught_by=("check_mixed_prefix_forward",),
        message_contains="model's dtype",
    ),
    Bug(
        name="mixed_pads_registry",
        description=(
            "mixed_prefix_forward pads the shorter prefixes inside the caller's dict: the "
            "registry's prefixes change length, and later batches serve the padding unmasked"
        ),
        notebook="04",
        replaces={"mixed_prefix_forward": mixed_pads_registry},
        caught_by=("check_mixed_prefix_forward",),
        message_contains="changed the stored prefixes",
    ),
    Bug(
        name="generate_one_short",
        description="mixed_generate generates max_new_tokens - 1 tokens",
        notebook="04",
        replaces={"mixed_generate": generate_one_short},
        caught_by=("check_mixed_generate",),
        message_contains="max_new_tokens",
    ),
    Bug(
        name="generate_unknown_as_first",
        description="mixed_generate serves a request of an unknown tenant with another prefix",
        notebook="04",
        replaces={"mixed_generate": generate_unknown_as_first},
        caught_by=("check_mixed_generate",),
        message_contains="unknown tenant 'nobody'",
    ),
    Bug(
        name="generate_pads_registry",
        description="mixed_generate pads the shorter prefixes inside the caller's dict",
        notebook="04",
        replaces={"mixed_generate": generate_pads_registry},
        caught_by=("check_mixed_generate",),
        message_contains="changed the stored prefixes",
    ),
]

VARIANTS = [
    Variant(
        name="prefix_file_other_layout",
        description=(
            "the file's tensor is called 'kv' and the meta sits under another metadata key: the "
            "layout is the student's choice, only the round trip and the refusals are specified"
        ),
        notebook="04",
        replaces={"save_prefix": _save_other_layout, "load_prefix": _load_other_layout},
    ),
    Variant(
        name="mixed_prefix_padded_behind",
        description=(
            "shorter prefixes are padded BEHIND their values (slots P_b..P_max-1 masked) instead "
            "of in front: the row still sees exactly its prefix, at positions P_b.."
        ),
        notebook="04",
        replaces={"mixed_prefix_forward": _behind_forward, "mixed_generate": _behind_generate},
    ),
    Variant(
        name="mixed_prefix_padding_not_zero",
        description=(
            "the masked padding slots hold copies of the prefix's first slot instead of zeros: "
            "masked keys are never attended to, whatever they hold"
        ),
        notebook="04",
        replaces={"mixed_prefix_forward": _filled_forward, "mixed_generate": _filled_generate},
    ),
    Variant(
        name="mixed_rejects_different_lengths",
        description=(
            "a batch whose prefixes differ in length is refused with a ValueError that says so "
            "(the scheduler batches tenants by P)"
        ),
        notebook="04",
        replaces={
            "mixed_prefix_forward": _rejecting(mixed_prefix_forward),
            "mixed_generate": _rejecting(_generate_by_hand),
        },
    ),
    Variant(
        name="mixed_generate_by_hand",
        description=(
            "greedy decoding written as a loop of full mixed forward passes instead of "
            "model.generate: always max_new_tokens tokens, no early stop at eos"
        ),
        notebook="04",
        replaces={"mixed_generate": _generate_by_hand},
    ),
]
