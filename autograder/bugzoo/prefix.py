"""Deep prefix-tuning mistakes (notebook 02): where the prefix goes, the mask, positions,
gradients, the cache's life cycle, dtype, head layout, export and generation."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers import DynamicCache

from autograder.bugzoo import Bug
from autograder.reference import (
    IGNORE_INDEX,
    PrefixEncoder,
    build_prefix_cache,
)
from course.compat import cache_keyword, kv_geometry, make_cache

__all__ = ["BUGS"]


def _run(model, input_ids, attention_mask, labels, cache, *, extend_mask=True, positions=None):
    """The model call every prefix_forward variant shares: mask extended by the cache length,
    real tokens at positions P..P+T-1 unless ``positions`` says otherwise."""
    batch, length = input_ids.shape
    p = cache.get_seq_length()
    if extend_mask:
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


# --- build_prefix_cache ------------------------------------------------------------------------
def cache_ignores_dtype(prefix: torch.Tensor, batch_size: int, dtype: torch.dtype):
    """Never casts to ``dtype``."""
    return make_cache(
        [(_expand(layer[0], batch_size), _expand(layer[1], batch_size)) for layer in prefix]
    )


_BUILT: dict[tuple[int, torch.dtype], tuple[weakref.ref, DynamicCache]] = {}


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


BUGS = [
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
        message_contains="shared by all layers",
        also_fails=("check_bf16", "check_peft_equivalence"),
    ),
    Bug(
        name="encoder_shared_by_layers",
        description="PrefixEncoder holds one (2, H, P, D) prefix and repeats it for every layer",
        notebook="02",
        replaces={"PrefixEncoder": SharedPrefixEncoder},
        caught_by=("check_prefix_encoder", "check_prefix_training"),
        message_contains="L·2·H_kv·P·D",
        also_fails=("check_prefix_forward",),
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
]
