"""A prefix that survives gradient checkpointing (notebook 05)."""

from __future__ import annotations

import sys

import torch
from transformers import PreTrainedModel  # noqa: F401

from autograder.reference.prefix import PrefixEncoder, prefix_forward  # noqa: F401

# ---------------------------------------------------------------------------------------------
# A prefix that survives gradient checkpointing (notebook 05)
# ---------------------------------------------------------------------------------------------
PREFIX_ATTENTION = "reference_prefix_attention"


def _prefix_attention(module, query, key, value, attention_mask, prefix_kv=None, **kwargs):
    """Eager attention with ``prefix_kv[layer, 0]`` / ``[layer, 1]`` put in front of the keys and
    values (and the mask opened over them). Without ``prefix_kv`` it is plain eager attention."""
    if prefix_kv is not None:
        batch = key.shape[0]
        layer = prefix_kv[module.layer_idx].to(key.dtype)
        key = torch.cat([layer[0].unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([layer[1].unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
        if attention_mask is not None:
            shape = (*attention_mask.shape[:-1], layer.shape[2])
            visible = (
                attention_mask.new_ones(shape)
                if attention_mask.dtype == torch.bool
                else attention_mask.new_zeros(shape)
            )
            attention_mask = torch.cat([visible, attention_mask], dim=-1)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, **kwargs)


def checkpoint_safe_prefix_forward(
    model: PreTrainedModel,
    encoder: PrefixEncoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
):
    """:func:`prefix_forward` that also works under gradient checkpointing.

    Checkpointing recomputes each layer in backward and drops a cache passed to ``forward``.
    Here the prefix travels as a forward keyword (``prefix_kv``), which the model hands to every
    layer's attention and checkpointing replays, and a registered attention function puts it in
    front of the keys/values. No state outlives the call: the model switches to that attention
    function, which is plain eager attention whenever no ``prefix_kv`` is given.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(PREFIX_ATTENTION, _prefix_attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, eager_mask)
    if model.config._attn_implementation != PREFIX_ATTENTION:
        model.set_attn_implementation(PREFIX_ATTENTION)
    batch, length = input_ids.shape
    p = encoder.prefix_len
    positions = torch.arange(p, p + length, device=input_ids.device).expand(batch, -1)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        labels=labels,
        use_cache=False,
        prefix_kv=encoder(),
    )
