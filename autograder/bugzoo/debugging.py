"""The debugging lab (notebook 05): its incidents, and the mistakes around gradient
checkpointing.

:data:`INCIDENTS` are the broken releases the lab shows by their code and their symptoms
(:mod:`autograder.bugzoo.releases`, where each is also a bug of notebook 05: the release handed
in unpatched). :data:`BUGS` are the known-buggy twins of the lab's one new graded object,
``checkpoint_safe_prefix_forward``.
"""

from __future__ import annotations

import contextvars
import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from autograder import reference
from autograder.bugzoo import Bug, Variant
from autograder.bugzoo.incidents import INCIDENTS

__all__ = ["BUGS", "INCIDENTS", "VARIANTS"]


# --- the cache-based forward, under checkpointing ----------------------------------------------
def forward_with_cache(model, encoder, input_ids, attention_mask, labels=None):
    """The ordinary cache-based prefix_forward: checkpointing drops the cache."""
    return reference.prefix_forward(model, encoder, input_ids, attention_mask, labels)


# --- attention-function injections gone wrong --------------------------------------------------
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("lab_prefix", default=None)
_INSTALLED: list[torch.Tensor] = []


def _with_prefix(module, query, key, value, attention_mask, prefix_kv, **kwargs):
    """Eager attention with ``prefix_kv`` (or nothing) in front of the keys and values."""
    if prefix_kv is not None:
        batch = key.shape[0]
        layer = prefix_kv[module.layer_idx].to(key.dtype)
        key = torch.cat([layer[0].unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([layer[1].unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
        if attention_mask is not None:
            shape = (*attention_mask.shape[:-1], layer.shape[2])
            attention_mask = torch.cat([attention_mask.new_zeros(shape), attention_mask], dim=-1)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, **kwargs)


def _from_keyword(module, query, key, value, attention_mask, prefix_kv=None, **kwargs):
    return _with_prefix(module, query, key, value, attention_mask, prefix_kv, **kwargs)


def _from_context(module, query, key, value, attention_mask, **kwargs):
    return _with_prefix(module, query, key, value, attention_mask, _CURRENT.get(), **kwargs)


def _from_global(module, query, key, value, attention_mask, **kwargs):
    prefix_kv = _INSTALLED[-1] if _INSTALLED else None
    return _with_prefix(module, query, key, value, attention_mask, prefix_kv, **kwargs)


def _use_attention(model, fn) -> None:
    name = f"bugzoo_lab{fn.__name__}"
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, eager_mask)
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def _positions(encoder, input_ids):
    batch, length = input_ids.shape
    p = encoder.prefix_len
    return torch.arange(p, p + length).expand(batch, -1)


def forward_prefix_in_context(model, encoder, input_ids, attention_mask, labels=None):
    """Puts the prefix in a context variable for the duration of forward only: checkpointing
    recomputes the layers in backward, when the prefix is gone."""
    _use_attention(model, _from_context)
    token = _CURRENT.set(encoder())
    try:
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_positions(encoder, input_ids),
            labels=labels,
            use_cache=False,
        )
    finally:
        _CURRENT.reset(token)


def forward_prefix_left_installed(model, encoder, input_ids, attention_mask, labels=None):
    """Installs the prefix globally for the attention function and never removes it: every
    later request through this model runs with it."""
    _use_attention(model, _from_global)
    _INSTALLED.append(encoder())
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_positions(encoder, input_ids),
        labels=labels,
        use_cache=False,
    )


def forward_injected_positions_from_zero(model, encoder, input_ids, attention_mask, labels=None):
    """Injects the prefix inside attention but lets the tokens take positions 0..T-1."""
    _use_attention(model, _from_keyword)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        use_cache=False,
        prefix_kv=encoder(),
    )


def forward_checkpointing_left_off(model, encoder, input_ids, attention_mask, labels=None):
    """Switches gradient checkpointing off to use the cache, and never back on: right for this
    call, but every later training step keeps all activations again."""
    model.gradient_checkpointing_disable()
    return reference.prefix_forward(model, encoder, input_ids, attention_mask, labels)


def forward_checkpointing_forced_on(model, encoder, input_ids, attention_mask, labels=None):
    """Switches checkpointing off for the call and back ON afterwards, whether it was on or
    not: a model that trained without it now checkpoints (an adversary's finding)."""
    model.gradient_checkpointing_disable()
    try:
        return reference.prefix_forward(model, encoder, input_ids, attention_mask, labels)
    finally:
        model.gradient_checkpointing_enable()


def forward_in_eval_mode(model, encoder, input_ids, attention_mask, labels=None):
    """Puts the model in eval mode, where transformers does not checkpoint, and leaves it
    there: right for this call, silently no checkpointing afterwards (an adversary's
    finding)."""
    model.eval()
    return reference.prefix_forward(model, encoder, input_ids, attention_mask, labels)


def forward_checkpointing_paused(model, encoder, input_ids, attention_mask, labels=None):
    """Switches gradient checkpointing off for this call only (the cache-based forward) and back
    on afterwards: correct, it only gives up checkpointing's memory saving for the call."""
    was_on = model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    try:
        return reference.prefix_forward(model, encoder, input_ids, attention_mask, labels)
    finally:
        if was_on:
            model.gradient_checkpointing_enable()


BUGS = [
    Bug(
        name="checkpointing_forced_on",
        description="checkpointing switched back on after the call even where it was off",
        notebook="05",
        replaces={"checkpoint_safe_prefix_forward": forward_checkpointing_forced_on},
        caught_by=("check_checkpointed_prefix_forward",),
        message_contains="WITHOUT gradient checkpointing",
    ),
    Bug(
        name="checkpointing_eval_mode_left",
        description="the model is put in eval mode (no checkpointing there) and left in it",
        notebook="05",
        replaces={"checkpoint_safe_prefix_forward": forward_in_eval_mode},
        caught_by=("check_checkpointed_prefix_forward",),
        message_contains="eval mode",
    ),
    Bug(  # notebook 02's graded object, installed the checkpoint-safe way and never removed
        name="prefix_attention_left_installed",
        description=(
            "prefix_forward installs the prefix for a registered attention function and never "
            "removes it: the next request without a prefix runs with it"
        ),
        notebook="02",
        replaces={"prefix_forward": forward_prefix_left_installed},
        caught_by=("check_prefix_forward",),
        message_contains="stays active",
    ),
    Bug(
        name="checkpointing_drops_cache",
        description=(
            "the cache-based prefix_forward on a model with gradient checkpointing: the cache "
            "is dropped and attention fails with a size mismatch"
        ),
        notebook="05",
        replaces={"checkpoint_safe_prefix_forward": forward_with_cache},
        caught_by=("check_checkpointed_prefix_forward",),
        message_contains="gradient checkpointing",
    ),
    Bug(
        name="checkpointing_prefix_in_context",
        description=(
            "the prefix reaches attention through state that is reset when forward returns: "
            "checkpointing's recomputation in backward runs without it and fails"
        ),
        notebook="05",
        replaces={"checkpoint_safe_prefix_forward": forward_prefix_in_context},
        caught_by=("check_checkpointed_prefix_forward",),
        message_contains="replays",
    ),
    Bug(
        name="checkpointing_prefix_left_installed",
        description=(
            "the prefix is installed globally for the attention function and never removed: "
            "later requests without a prefix (other tenants) run with it"
        ),
        notebook="05",
        replaces={"checkpoint_safe_prefix_forward": forward_prefix_left_installed},
        caught_by=("check_checkpointed_prefix_forward",),
        message_contains="stays active",
    ),
    Bug(
        name="checkpointing_positions_from_zero",
        description=(
            "the prefix is injected inside attention, but without a cache the tokens take "
            "positions 0..T-1 instead of P..P+T-1"
        ),
        notebook="05",
        replaces={"checkpoint_safe_prefix_forward": forward_injected_positions_from_zero},
        caught_by=("check_checkpointed_prefix_forward",),
        message_contains="positions",
    ),
    Bug(
        name="checkpointing_left_off",
        description=(
            "gradient checkpointing is switched off to use the cache and never switched back on"
        ),
        notebook="05",
        replaces={"checkpoint_safe_prefix_forward": forward_checkpointing_left_off},
        caught_by=("check_checkpointed_prefix_forward",),
        message_contains="checkpointing is off",
    ),
]

VARIANTS = [
    Variant(  # notebook 05's reference, so it lives here (a package with 02 unlocked lacks it)
        name="prefix_inside_attention",
        description=(
            "prefix_forward is the checkpoint-safe form of notebook 05: a registered attention "
            "function puts the prefix in front of the keys/values (no cache at all)"
        ),
        notebook="02",
        replaces={"prefix_forward": reference.checkpoint_safe_prefix_forward},
    ),
    Variant(
        name="checkpointing_paused_for_the_call",
        description=(
            "gradient checkpointing is switched off for the call (the cache-based forward) and "
            "back on in a finally block, as the check's own hint allows"
        ),
        notebook="05",
        replaces={"checkpoint_safe_prefix_forward": forward_checkpointing_paused},
    ),
]
