"""Deep prefix-tuning mistakes (notebook 02): where the prefix goes, the mask, positions,
gradients, the cache's life cycle, dtype, head layout, export and generation."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers import DynamicCache

from autograder.bugzoo import Bug, Variant
from autograder.reference import (
    IGNORE_INDEX,
    PrefixEncoder,
    build_prefix_cache,
)
from course.compat import cache_keyword, kv_geometry, make_cache

__all__ = ["BUGS", "VARIANTS"]


def _run(
    model, input_ids, attention_mask, labels, cache, *, extend_mask=True, positions=None, mask=None
):
    """The model call every prefix_forward variant shares: mask extended by the cache length
    (or ``mask`` as given), real tokens at positions P..P+T-1 unless ``positions`` says
    otherwise."""
    batch, length = input_ids.shape
    p = cache.get_seq_length()
    if mask is not None:
        attention_mask = mask
    elif extend_mask:
        attention_mask = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)
    if positions is None:
        positions = torch.arange(p, p + length).unsqueeze(0).expand(batch, -1)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        labels=labels,
        use_cache=False,
        **{cache_keyword(model): cache},
    )


def _dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _expand(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.unsqueeze(0).expand(batch, -1, -1, -1)


# --- where the prefix goes ---------------------------------------------------------------------
def prefix_layer0_only(model, encoder, input_ids, attention_mask, labels=None):
    """Puts the prefix into layer 0's cache only."""
    prefix = encoder().to(_dtype(model))
    batch = input_ids.shape[0]
    cache = make_cache([(_expand(prefix[0, 0], batch), _expand(prefix[0, 1], batch))])
    return _run(model, input_ids, attention_mask, labels, cache)


def prefix_zeros_after_layer0(model, encoder, input_ids, attention_mask, labels=None):
    """Gives layer 0 the prefix and every later layer zeros of the right shape."""
    prefix = encoder().to(_dtype(model))
    batch = input_ids.shape[0]
    layers = [(_expand(prefix[0, 0], batch), _expand(prefix[0, 1], batch))]
    for _ in range(1, prefix.shape[0]):
        zeros = torch.zeros_like(layers[0][0])
        layers.append((zeros, zeros))
    return _run(model, input_ids, attention_mask, labels, make_cache(layers))


def prefix_shared_by_layers(model, encoder, input_ids, attention_mask, labels=None):
    """Uses layer 0's prefix for every layer."""
    prefix = encoder().to(_dtype(model))
    batch = input_ids.shape[0]
    pair = (_expand(prefix[0, 0], batch), _expand(prefix[0, 1], batch))
    return _run(model, input_ids, attention_mask, labels, make_cache([pair] * prefix.shape[0]))


def prefix_keys_values_swapped(model, encoder, input_ids, attention_mask, labels=None):
    """Stores prefix[l, 1] as keys and prefix[l, 0] as values."""
    prefix = encoder().to(_dtype(model)).flip(1)
    cache = build_prefix_cache(prefix, input_ids.shape[0], _dtype(model))
    return _run(model, input_ids, attention_mask, labels, cache)


def prefix_as_input_embeddings(model, encoder, input_ids, attention_mask, labels=None):
    """Prefix tuning submitted as prompt tuning: layer 0's keys, flattened to P vectors of size
    H*D, are prepended to the input embeddings; nothing reaches the later layers."""
    prefix = encoder().to(_dtype(model))
    batch, p = input_ids.shape[0], prefix.shape[3]
    soft = prefix[0, 0].permute(1, 0, 2).reshape(p, -1).unsqueeze(0).expand(batch, -1, -1)
    embeds = torch.cat([soft, model.get_input_embeddings()(input_ids)], dim=1)
    mask = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)
    if labels is not None:
        labels = torch.cat([labels.new_full((batch, p), IGNORE_INDEX), labels], dim=1)
    out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    out.logits = out.logits[:, p:]
    return out


# --- mask, positions, gradients, cache life cycle ----------------------------------------------
def prefix_mask_not_extended(model, encoder, input_ids, attention_mask, labels=None):
    """Passes the (B, T) mask with a P-long cache: the last P real tokens are silently hidden."""
    cache = build_prefix_cache(encoder(), input_ids.shape[0], _dtype(model))
    return _run(model, input_ids, attention_mask, labels, cache, extend_mask=False)


def prefix_positions_from_zero(model, encoder, input_ids, attention_mask, labels=None):
    """Numbers the real tokens 0..T-1 although the prefix occupies positions 0..P-1."""
    cache = build_prefix_cache(encoder(), input_ids.shape[0], _dtype(model))
    batch, length = input_ids.shape
    positions = torch.arange(length).unsqueeze(0).expand(batch, -1)
    return _run(model, input_ids, attention_mask, labels, cache, positions=positions)


def prefix_detached(model, encoder, input_ids, attention_mask, labels=None):
    """Builds the cache from ``encoder().detach()``: the prefix never trains."""
    cache = build_prefix_cache(encoder().detach(), input_ids.shape[0], _dtype(model))
    return _run(model, input_ids, attention_mask, labels, cache)


_CACHES: weakref.WeakKeyDictionary[nn.Module, DynamicCache] = weakref.WeakKeyDictionary()


def prefix_cache_reused(model, encoder, input_ids, attention_mask, labels=None):
    """Builds the prefix cache once per encoder and reuses it: the model appends every call's
    tokens to it, so it grows and holds a stale graph."""
    if encoder not in _CACHES:
        _CACHES[encoder] = build_prefix_cache(encoder(), input_ids.shape[0], _dtype(model))
    cache = _CACHES[encoder]
    batch, length = input_ids.shape
    p = encoder.prefix_len
    mask = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)
    positions = torch.arange(p, p + length).unsqueeze(0).expand(batch, -1)
    return model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        labels=labels,
        use_cache=False,
        **{cache_keyword(model): cache},
    )


def prefix_no_dtype_cast(model, encoder, input_ids, attention_mask, labels=None):
    """Builds the cache in the prefix's own dtype (float32), whatever the model's dtype."""
    prefix = encoder()
    cache = build_prefix_cache(prefix, input_ids.shape[0], prefix.dtype)
    return _run(model, input_ids, attention_mask, labels, cache)


def _half_detached(model, encoder, input_ids, attention_mask, labels, kv: int):
    """The cache with prefix[:, kv] detached (keys for 0, values for 1)."""
    prefix = encoder().to(_dtype(model))
    batch = input_ids.shape[0]
    layers = []
    for layer in prefix:
        pair = [_expand(layer[0], batch), _expand(layer[1], batch)]
        pair[kv] = pair[kv].detach()
        layers.append(tuple(pair))
    return _run(model, input_ids, attention_mask, labels, make_cache(layers))


def prefix_keys_detached(model, encoder, input_ids, attention_mask, labels=None):
    """Detaches the prefix keys (say, to "save memory"): only the values ever train."""
    return _half_detached(model, encoder, input_ids, attention_mask, labels, 0)


def prefix_values_detached(model, encoder, input_ids, attention_mask, labels=None):
    """Detaches the prefix values: only the keys ever train."""
    return _half_detached(model, encoder, input_ids, attention_mask, labels, 1)


def prefix_reads_parameter(model, encoder, input_ids, attention_mask, labels=None):
    """Reads ``encoder.prefix`` instead of calling ``encoder()``: right for a direct encoder as
    built, wrong for a reparameterised one (and for any other encoder)."""
    cache = build_prefix_cache(encoder.prefix, input_ids.shape[0], _dtype(model))
    return _run(model, input_ids, attention_mask, labels, cache)


def prefix_needs_labels(model, encoder, input_ids, attention_mask, labels=None):
    """Computes the loss itself and assumes labels are always given: prefix_forward without
    labels (evaluation, generation by hand) crashes."""
    cache = build_prefix_cache(encoder(), input_ids.shape[0], _dtype(model))
    out = _run(model, input_ids, attention_mask, None, cache)
    shifted = labels[:, 1:].flatten()
    out.loss = nn.functional.cross_entropy(  # in float32, as transformers computes it
        out.logits[:, :-1].float().flatten(0, 1), shifted, ignore_index=IGNORE_INDEX
    )
    return out


def prefix_mask_ones_from_mask(model, encoder, input_ids, attention_mask, labels=None):
    """Makes the P mask ones with ``ones_like(attention_mask[:, :p])``: P columns only while T
    >= P; a shorter input gets a mask too short for the cache (an adversary's finding)."""
    p = encoder.prefix_len
    mask = torch.cat([torch.ones_like(attention_mask[:, :p]), attention_mask], dim=1)
    cache = build_prefix_cache(encoder(), input_ids.shape[0], _dtype(model))
    return _run(model, input_ids, attention_mask, labels, cache, mask=mask)


def prefix_mask_ones_from_last_column(model, encoder, input_ids, attention_mask, labels=None):
    """Makes the P mask ones by repeating the mask's last column: right for left padding (the
    last token is real), but a right-padded row cannot see the prefix (an adversary's
    finding)."""
    p = encoder.prefix_len
    mask = torch.cat([attention_mask[:, -1:].expand(-1, p), attention_mask], dim=1)
    cache = build_prefix_cache(encoder(), input_ids.shape[0], _dtype(model))
    return _run(model, input_ids, attention_mask, labels, cache, mask=mask)


# --- build_prefix_cache ------------------------------------------------------------------------
def cache_ignores_dtype(prefix: torch.Tensor, batch_size: int, dtype: torch.dtype):
    """Never casts to ``dtype``."""
    return make_cache(
        [(_expand(layer[0], batch_size), _expand(layer[1], batch_size)) for layer in prefix]
    )


_BUILT: dict[tuple[int, torch.dtype], tuple[weakref.ref, DynamicCache]] = {}


def cache_batch_from_kv_axis(prefix: torch.Tensor, batch_size: int, dtype: torch.dtype):
    """Expands over ``len(layer)``, the key/value axis (always 2), not ``batch_size``: right
    only for batches of 2 (an adversary's finding)."""
    layers = []
    for layer in prefix.to(dtype):
        rows = len(layer)
        layers.append((_expand(layer[0], rows), _expand(layer[1], rows)))
    return make_cache(layers)


def cache_layers_by_prefix_len(prefix: torch.Tensor, batch_size: int, dtype: torch.dtype):
    """Loops over ``range(prefix.shape[-2])``, the P axis, to visit the layers: right only when
    P equals L (an adversary's finding)."""
    prefix = prefix.to(dtype)
    layers = []
    for i in range(prefix.shape[-2]):
        layers.append((_expand(prefix[i, 0], batch_size), _expand(prefix[i, 1], batch_size)))
    return make_cache(layers)


def cache_memoised(prefix: torch.Tensor, batch_size: int, dtype: torch.dtype):
    """Returns the same cache object for the same prefix tensor and dtype (to "save time")."""
    ref, cache = _BUILT.get((id(prefix), dtype), (None, None))
    if ref is None or ref() is not prefix:
        cache = build_prefix_cache(prefix, batch_size, dtype)
        _BUILT[(id(prefix), dtype)] = (weakref.ref(prefix), cache)
    return cache


def cache_positions_before_heads(prefix: torch.Tensor, batch_size: int, dtype: torch.dtype):
    """Lays keys/values out as (B, P, H, D) instead of (B, H, P, D)."""
    layers = []
    for layer in prefix.to(dtype):
        key = _expand(layer[0].transpose(0, 1), batch_size)
        value = _expand(layer[1].transpose(0, 1), batch_size)
        layers.append((key, value))
    return make_cache(layers)


def cache_values_detached(prefix: torch.Tensor, batch_size: int, dtype: torch.dtype):
    """Detaches the values (keys keep their graph): the prefix values never train."""
    layers = [
        (_expand(layer[0], batch_size), _expand(layer[1], batch_size).detach())
        for layer in prefix.to(dtype)
    ]
    return make_cache(layers)


# --- PrefixEncoder -----------------------------------------------------------------------------
class QueryHeadsPrefixEncoder(PrefixEncoder):
    """Sizes the prefix with num_attention_heads: wrong under grouped-query attention."""

    def __init__(self, config, prefix_len, reparam=False, hidden=512, init_std=1.0, seed=0):
        super().__init__(config, prefix_len, reparam, hidden, init_std, seed)
        g = kv_geometry(config)
        self.n_kv_heads = g["n_heads"]
        gen = torch.Generator().manual_seed(seed)
        shape = (self.n_layers, 2, g["n_heads"], prefix_len, self.head_dim)
        if reparam:
            out = self.n_layers * 2 * g["n_heads"] * self.head_dim
            self.mlp[2] = nn.Linear(hidden, out)
        else:
            self.prefix = nn.Parameter(torch.randn(*shape, generator=gen) * init_std)


class SharedPrefixEncoder(PrefixEncoder):
    """Holds ONE (2, H, P, D) prefix and repeats it for every layer."""

    def __init__(self, config, prefix_len, reparam=False, hidden=512, init_std=1.0, seed=0):
        super().__init__(config, prefix_len, reparam, hidden, init_std, seed)
        if not reparam:
            self.prefix = nn.Parameter(self.prefix[0].detach().clone())

    def forward(self) -> torch.Tensor:
        if self.reparam:
            return super().forward()
        return self.prefix.unsqueeze(0).expand(self.n_layers, -1, -1, -1, -1)


class ViewingPrefixEncoder(PrefixEncoder):
    """Reparameterised: reshapes the MLP output (P, L*2*H*D) with a direct .view(L, 2, H, P, D),
    mixing prefix positions with layers and heads."""

    def forward(self) -> torch.Tensor:
        if not self.reparam:
            return self.prefix
        flat = self.mlp(self.embedding)
        return flat.view(self.n_layers, 2, self.n_kv_heads, self.prefix_len, self.head_dim)


class LastLayerRepeatedPrefixEncoder(PrefixEncoder):
    """An off-by-one in the per-layer stacking: the last layer gets the previous layer's prefix
    (the parameter count is right, the last layer's own slice is never used)."""

    def forward(self) -> torch.Tensor:
        values = super().forward()
        last = values.shape[0] - 1
        return torch.cat([values[:last], values[last - 1 : last]])


class KeysAsValuesPrefixEncoder(PrefixEncoder):
    """Returns each layer's keys as its values too: ``prefix[:, [0, 0]]``."""

    def forward(self) -> torch.Tensor:
        return super().forward()[:, [0, 0]]


class MLPKeepingPrefixEncoder(PrefixEncoder):
    """``export()`` returns the encoder itself, MLP and all."""

    def export(self) -> PrefixEncoder:
        return self


# --- generate_with_prefix ----------------------------------------------------------------------
@torch.no_grad()
def generate_full_sequence(model, encoder, input_ids, attention_mask, max_new_tokens=20):
    """Returns the prompt followed by the new tokens."""
    batch = input_ids.shape[0]
    mask = torch.cat([attention_mask.new_ones(batch, encoder.prefix_len), attention_mask], dim=1)
    return model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
        **{cache_keyword(model): build_prefix_cache(encoder(), batch, _dtype(model))},
    )


@torch.no_grad()
def generate_without_prefix(model, encoder, input_ids, attention_mask, max_new_tokens=20):
    """Forgets to pass the prefix cache to generate."""
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
    )
    return out[:, input_ids.shape[1] :]


@torch.no_grad()
def generate_mask_not_extended(model, encoder, input_ids, attention_mask, max_new_tokens=20):
    """Passes the prefix cache but the (B, T) mask."""
    cache = build_prefix_cache(encoder(), input_ids.shape[0], _dtype(model))
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
        **{cache_keyword(model): cache},
    )
    return out[:, input_ids.shape[1] :]


@torch.no_grad()
def generate_mask_prefix_after(model, encoder, input_ids, attention_mask, max_new_tokens=20):
    """Appends the P ones AFTER the mask: identical without padding, wrong for left-padded
    rows (their padding zeros now cover prefix slots, and the padding is visible)."""
    batch = input_ids.shape[0]
    ones = attention_mask.new_ones(batch, encoder.prefix_len)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.cat([attention_mask, ones], dim=1),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
        **{cache_keyword(model): build_prefix_cache(encoder(), batch, _dtype(model))},
    )
    return out[:, input_ids.shape[1] :]


@torch.no_grad()
def generate_mask_all_ones(model, encoder, input_ids, attention_mask, max_new_tokens=20):
    """Builds the mask as ones over P+T: the left padding of shorter rows is attended to."""
    batch, length = input_ids.shape
    mask = attention_mask.new_ones(batch, encoder.prefix_len + length)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
        **{cache_keyword(model): build_prefix_cache(encoder(), batch, _dtype(model))},
    )
    return out[:, input_ids.shape[1] :]


@torch.no_grad()
def generate_one_short(model, encoder, input_ids, attention_mask, max_new_tokens=20):
    """An off-by-one: generates ``max_new_tokens - 1`` tokens."""
    batch = input_ids.shape[0]
    mask = torch.cat([attention_mask.new_ones(batch, encoder.prefix_len), attention_mask], dim=1)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens - 1,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
        **{cache_keyword(model): build_prefix_cache(encoder(), batch, _dtype(model))},
    )
    return out[:, input_ids.shape[1] :]


BUGS = [
    Bug(
        name="prefix_mask_ones_from_mask",
        description="the P mask ones are sliced from the mask: too few when T < P",
        notebook="02",
        replaces={"prefix_forward": prefix_mask_ones_from_mask},
        caught_by=("check_prefix_forward",),
        message_contains="T = 3 tokens",
    ),
    Bug(
        name="prefix_mask_ones_from_last_column",
        description="the P mask ones repeat the mask's last column: right-padded rows lose it",
        notebook="02",
        replaces={"prefix_forward": prefix_mask_ones_from_last_column},
        caught_by=("check_prefix_forward",),
        message_contains="T = 3 tokens",
    ),
    Bug(
        name="cache_batch_from_kv_axis",
        description="build_prefix_cache expands over the key/value axis (2), not batch_size",
        notebook="02",
        replaces={"build_prefix_cache": cache_batch_from_kv_axis},
        caught_by=("check_build_prefix_cache",),
        message_contains="(B, H_kv, P, D)",
        downstream=("check_prefix_forward",),
    ),
    Bug(
        name="cache_layers_by_prefix_len",
        description="build_prefix_cache loops over P (prefix.shape[-2]) to visit the L layers",
        notebook="02",
        replaces={"build_prefix_cache": cache_layers_by_prefix_len},
        caught_by=("check_build_prefix_cache",),
        message_contains="EVERY layer",
        downstream=(
            "check_bf16",
            "check_peft_equivalence",
            "check_prefix_forward",
            "check_prefix_training",
        ),
    ),
    Bug(
        name="prefix_layer0_only",
        description="the prefix is put into layer 0's cache only",
        notebook="02",
        replaces={"prefix_forward": prefix_layer0_only},
        caught_by=("check_prefix_forward",),
        message_contains="every layer's cache",
        also_fails=("check_bf16", "check_peft_equivalence", "check_prefix_training"),
    ),
    Bug(
        name="prefix_zeros_after_layer0",
        description="layer 0 gets the prefix, later layers zeros of the right shape",
        notebook="02",
        replaces={"prefix_forward": prefix_zeros_after_layer0},
        caught_by=("check_prefix_forward",),
        message_contains="all zeros",
        also_fails=("check_bf16", "check_peft_equivalence"),
    ),
    Bug(
        name="prefix_shared_by_layers",
        description="prefix_forward gives every layer layer 0's prefix",
        notebook="02",
        replaces={"prefix_forward": prefix_shared_by_layers},
        caught_by=("check_prefix_forward",),
        message_contains="shared by several layers",
        also_fails=("check_bf16", "check_peft_equivalence"),
    ),
    Bug(
        name="encoder_shared_by_layers",
        description="PrefixEncoder holds one (2, H, P, D) prefix and repeats it for every layer",
        notebook="02",
        replaces={"PrefixEncoder": SharedPrefixEncoder},
        caught_by=("check_prefix_encoder", "check_prefix_training"),
        message_contains="L·2·H_kv·P·D",
    ),
    Bug(
        name="prefix_keys_values_swapped",
        description="prefix[l, 1] is used as keys and prefix[l, 0] as values",
        notebook="02",
        replaces={"prefix_forward": prefix_keys_values_swapped},
        caught_by=("check_prefix_forward",),
        message_contains="swapped",
        also_fails=("check_bf16", "check_peft_equivalence"),
    ),
    Bug(
        name="prefix_built_as_prompt",
        description=(
            "prefix tuning submitted as prompt tuning: the prefix is flattened into P input "
            "embeddings, so only the first layer's input carries it"
        ),
        notebook="02",
        replaces={"prefix_forward": prefix_as_input_embeddings},
        caught_by=("check_prefix_forward",),
        message_contains="prompt tuning",
        also_fails=("check_bf16", "check_peft_equivalence"),
    ),
    Bug(
        name="prefix_mask_not_extended",
        description=(
            "the attention mask is not extended by P: nothing errors, the last P real tokens "
            "are silently hidden"
        ),
        notebook="02",
        replaces={"prefix_forward": prefix_mask_not_extended},
        caught_by=("check_prefix_forward",),
        message_contains="extended by",
        also_fails=("check_bf16", "check_peft_equivalence"),
    ),
    Bug(
        name="prefix_positions_from_zero",
        description="real tokens take positions 0..T-1 instead of P..P+T-1",
        notebook="02",
        replaces={"prefix_forward": prefix_positions_from_zero},
        caught_by=("check_prefix_forward", "check_peft_equivalence"),
        message_contains="positions",
        also_fails=("check_bf16",),
    ),
    Bug(
        name="prefix_detached",
        description="the cache is built from encoder().detach(): the prefix never trains",
        notebook="02",
        replaces={"prefix_forward": prefix_detached},
        caught_by=("check_prefix_forward", "check_prefix_training"),
        message_contains="gradient",
    ),
    Bug(
        name="prefix_cache_reused",
        description=(
            "the prefix cache is built once and reused across calls: the model appends each "
            "call's tokens, the cache grows and the second backward fails"
        ),
        notebook="02",
        replaces={"prefix_forward": prefix_cache_reused},
        caught_by=("check_prefix_forward",),
        message_contains="fresh cache",
        also_fails=("check_prefix_training",),
    ),
    Bug(
        name="prefix_fp32_into_bf16",
        description="a float32 prefix is fed to a bfloat16 model without a cast",
        notebook="02",
        replaces={"prefix_forward": prefix_no_dtype_cast},
        caught_by=("check_bf16",),
        message_contains="bfloat16 model",
    ),
    Bug(
        name="cache_ignores_dtype",
        description="build_prefix_cache ignores its dtype argument",
        notebook="02",
        replaces={"build_prefix_cache": cache_ignores_dtype},
        caught_by=("check_build_prefix_cache",),
        message_contains="torch.bfloat16",
        downstream=("check_bf16",),
    ),
    Bug(
        name="cache_memoised",
        description="build_prefix_cache returns the same cache object for the same prefix",
        notebook="02",
        replaces={"build_prefix_cache": cache_memoised},
        caught_by=("check_build_prefix_cache",),
        message_contains="NEW DynamicCache",
        downstream=("check_prefix_forward", "check_prefix_training"),
    ),
    Bug(
        name="cache_positions_before_heads",
        description="build_prefix_cache lays keys/values out (B, P, H, D)",
        notebook="02",
        replaces={"build_prefix_cache": cache_positions_before_heads},
        caught_by=("check_build_prefix_cache",),
        message_contains="(B, H_kv, P, D)",
        downstream=(
            "check_bf16",
            "check_generate_with_prefix",
            "check_peft_equivalence",
            "check_prefix_forward",
            "check_prefix_training",
        ),
    ),
    Bug(
        name="cache_values_detached",
        description="build_prefix_cache detaches the values: only the prefix keys can train",
        notebook="02",
        replaces={"build_prefix_cache": cache_values_detached},
        caught_by=("check_build_prefix_cache",),
        message_contains="from the cached values",
        downstream=("check_prefix_forward",),
    ),
    Bug(
        name="encoder_query_heads_under_gqa",
        description=(
            "PrefixEncoder sizes the prefix with num_attention_heads; under grouped-query "
            "attention the cache needs num_key_value_heads"
        ),
        notebook="02",
        replaces={"PrefixEncoder": QueryHeadsPrefixEncoder},
        caught_by=("check_prefix_encoder", "check_prefix_forward"),
        message_contains="num_key_value_heads",
        also_fails=(
            "check_bf16",
            "check_checkpointed_prefix_forward",
            "check_generate_with_prefix",
            "check_peft_equivalence",
            "check_prefix_training",
        ),
    ),
    Bug(
        name="encoder_reparam_wrong_layout",
        description=(
            "the reparameterised encoder views the MLP output (P, L*2*H*D) directly as "
            "(L, 2, H, P, D) instead of (P, L, 2, H, D) permuted"
        ),
        notebook="02",
        replaces={"PrefixEncoder": ViewingPrefixEncoder},
        caught_by=("check_prefix_encoder",),
        message_contains="permute",
    ),
    Bug(
        name="encoder_export_keeps_mlp",
        description="export() returns the reparameterised encoder itself, MLP and all",
        notebook="02",
        replaces={"PrefixEncoder": MLPKeepingPrefixEncoder},
        caught_by=("check_prefix_encoder",),
        message_contains="drop the MLP",
    ),
    Bug(
        name="generate_returns_prompt",
        description="generate_with_prefix returns the input tokens followed by the new ones",
        notebook="02",
        replaces={"generate_with_prefix": generate_full_sequence},
        caught_by=("check_generate_with_prefix",),
        message_contains="only the new ones",
    ),
    Bug(
        name="generate_without_prefix",
        description="generate_with_prefix never passes the prefix cache to generate",
        notebook="02",
        replaces={"generate_with_prefix": generate_without_prefix},
        caught_by=("check_generate_with_prefix",),
        message_contains="WITHOUT the prefix",
    ),
    Bug(
        name="generate_mask_not_extended",
        description="generate_with_prefix passes the prefix cache with the (B, T) mask",
        notebook="02",
        replaces={"generate_with_prefix": generate_mask_not_extended},
        caught_by=("check_generate_with_prefix",),
        message_contains="mask",
    ),
    Bug(
        name="prefix_keys_detached",
        description="the prefix keys are detached when the cache is built: only values train",
        notebook="02",
        replaces={"prefix_forward": prefix_keys_detached},
        caught_by=("check_prefix_forward",),
        message_contains="keys have no gradient path",
    ),
    Bug(
        name="prefix_values_detached",
        description="the prefix values are detached when the cache is built: only keys train",
        notebook="02",
        replaces={"prefix_forward": prefix_values_detached},
        caught_by=("check_prefix_forward",),
        message_contains="values have no gradient path",
    ),
    Bug(
        name="prefix_needs_labels",
        description="prefix_forward computes the loss itself and crashes when labels is None",
        notebook="02",
        replaces={"prefix_forward": prefix_needs_labels},
        caught_by=("check_prefix_forward",),
        message_contains="without labels",
    ),
    Bug(
        name="prefix_reads_parameter",
        description=(
            "prefix_forward reads encoder.prefix instead of calling encoder(): a reparameterised "
            "encoder's prefix never reaches the model"
        ),
        notebook="02",
        replaces={"prefix_forward": prefix_reads_parameter},
        caught_by=("check_prefix_forward",),
        message_contains="call encoder()",
        also_fails=("check_bf16", "check_peft_equivalence"),
    ),
    Bug(
        name="encoder_last_layer_repeated",
        description=(
            "an off-by-one in PrefixEncoder.forward gives the last layer the previous layer's "
            "prefix (a check comparing layers with layer 0 only misses it)"
        ),
        notebook="02",
        replaces={"PrefixEncoder": LastLayerRepeatedPrefixEncoder},
        caught_by=("check_prefix_encoder",),
        message_contains="are identical",
    ),
    Bug(
        name="encoder_keys_as_values",
        description="PrefixEncoder returns each layer's keys as its values as well",
        notebook="02",
        replaces={"PrefixEncoder": KeysAsValuesPrefixEncoder},
        caught_by=("check_prefix_encoder",),
        message_contains="identical keys and values",
    ),
    Bug(
        name="generate_mask_prefix_after",
        description=(
            "generate_with_prefix appends the P ones after the mask instead of in front: right "
            "without padding, wrong for left-padded rows"
        ),
        notebook="02",
        replaces={"generate_with_prefix": generate_mask_prefix_after},
        caught_by=("check_generate_with_prefix",),
        message_contains="LEFT-padded",
    ),
    Bug(
        name="generate_with_prefix_one_short",
        description="generate_with_prefix generates max_new_tokens - 1 tokens",
        notebook="02",
        replaces={"generate_with_prefix": generate_one_short},
        caught_by=("check_generate_with_prefix",),
        message_contains="max_new_tokens",
    ),
    Bug(
        name="generate_mask_all_ones",
        description="generate_with_prefix masks nothing: left padding is attended to",
        notebook="02",
        replaces={"generate_with_prefix": generate_mask_all_ones},
        caught_by=("check_generate_with_prefix",),
        message_contains="LEFT-padded",
    ),
]


# --- valid but unusual implementations (every check must pass them) ---------------------------
class PeftLayoutPrefixEncoder(PrefixEncoder):
    """The direct prefix stored as PEFT stores it, an ``nn.Embedding(P, L*2*H*D)`` whose rows
    are prefix positions, viewed and permuted to ``(L, 2, H, P, D)`` in ``forward``; the initial
    values are drawn in that layout, so they differ from the reference's."""

    def __init__(self, config, prefix_len, reparam=False, hidden=512, init_std=1.0, seed=0):
        super().__init__(config, prefix_len, reparam, hidden, init_std, seed)
        if not reparam:
            del self.prefix
            width = self.n_layers * 2 * self.n_kv_heads * self.head_dim
            self.table = nn.Embedding(prefix_len, width)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                self.table.weight.normal_(0.0, init_std, generator=gen)

    def forward(self) -> torch.Tensor:
        if self.reparam:
            return super().forward()
        rows = self.table.weight.view(
            self.prefix_len, self.n_layers, 2, self.n_kv_heads, self.head_dim
        )
        return rows.permute(1, 2, 3, 0, 4)


class SplitKeyValuePrefixEncoder(PrefixEncoder):
    """Keys and values as two parameters ``(L, H, P, D)``, stacked in ``forward``."""

    def __init__(self, config, prefix_len, reparam=False, hidden=512, init_std=1.0, seed=0):
        super().__init__(config, prefix_len, reparam, hidden, init_std, seed)
        if not reparam:
            keys, values = self.prefix.detach().unbind(1)
            del self.prefix
            self.keys = nn.Parameter(keys.clone())
            self.values = nn.Parameter(values.clone())

    def forward(self) -> torch.Tensor:
        if self.reparam:
            return super().forward()
        return torch.stack([self.keys, self.values], dim=1)


def build_prefix_cache_copies(prefix: torch.Tensor, batch_size: int, dtype: torch.dtype):
    """Fills an empty ``DynamicCache`` with ``.repeat`` copies (not views) of each layer."""
    cache = DynamicCache()
    for i, layer in enumerate(prefix.to(dtype)):
        key = layer[0].unsqueeze(0).repeat(batch_size, 1, 1, 1)
        value = layer[1].unsqueeze(0).repeat(batch_size, 1, 1, 1)
        cache.update(key, value, i)
    return cache


def prefix_forward_positions_from_cache(model, encoder, input_ids, attention_mask, labels=None):
    """Passes no position ids: the model numbers the tokens after the cache, P..P+T-1."""
    batch = input_ids.shape[0]
    cache = build_prefix_cache(encoder(), batch, _dtype(model))
    mask = torch.cat([attention_mask.new_ones(batch, encoder.prefix_len), attention_mask], dim=1)
    return model(
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        use_cache=False,
        **{cache_keyword(model): cache},
    )


@torch.no_grad()
def generate_greedy_by_hand(model, encoder, input_ids, attention_mask, max_new_tokens=20):
    """A greedy loop without ``model.generate``: every step runs the whole sequence against a
    fresh prefix cache, numbering each row's real tokens P, P+1, ... from its own mask (so a
    left-padded row continues as it would alone); finished rows get eos."""
    batch, p = input_ids.shape[0], encoder.prefix_len
    eos = model.config.eos_token_id
    ids, mask = input_ids, attention_mask
    done = torch.zeros(batch, dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        positions = p + (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids,
            attention_mask=torch.cat([mask.new_ones(batch, p), mask], dim=1),
            position_ids=positions,
            use_cache=False,
            **{cache_keyword(model): build_prefix_cache(encoder(), batch, _dtype(model))},
        )
        token = out.logits[:, -1].argmax(-1).masked_fill(done, eos)
        done |= token == eos
        new.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        if done.all():
            break
    return torch.stack(new, dim=1)


VARIANTS = [
    Variant(
        name="encoder_peft_layout",
        description=(
            "the direct prefix is an nn.Embedding(P, L*2*H*D) (PEFT's layout) viewed and "
            "permuted in forward, its initial values drawn in that layout"
        ),
        notebook="02",
        replaces={"PrefixEncoder": PeftLayoutPrefixEncoder},
    ),
    Variant(
        name="encoder_split_keys_values",
        description="keys and values are two (L, H, P, D) parameters stacked in forward",
        notebook="02",
        replaces={"PrefixEncoder": SplitKeyValuePrefixEncoder},
    ),
    Variant(
        name="cache_repeated_copies",
        description="build_prefix_cache fills DynamicCache() with .repeat copies, not views",
        notebook="02",
        replaces={"build_prefix_cache": build_prefix_cache_copies},
    ),
    Variant(
        name="prefix_positions_from_cache",
        description="prefix_forward passes no position ids: the model starts after the cache",
        notebook="02",
        replaces={"prefix_forward": prefix_forward_positions_from_cache},
    ),
    Variant(
        name="generate_greedy_by_hand",
        description=(
            "generate_with_prefix is a hand-written greedy loop (no model.generate) that numbers "
            "each row's tokens from its own mask"
        ),
        notebook="02",
        replaces={"generate_with_prefix": generate_greedy_by_hand},
    ),
]
