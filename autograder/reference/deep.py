"""The hidden-state (VPT-deep) form of deep prompts (notebook 02)."""

from __future__ import annotations

import torch
from torch import nn

from autograder.reference.common import IGNORE_INDEX
from course.compat import kv_geometry, output_cache


# ---------------------------------------------------------------------------------------------
# The literal "prepend to the hidden states at every layer" form (VPT-deep style)
# ---------------------------------------------------------------------------------------------
def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("h", "layers"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")


class DeepPrompt(nn.Module):
    """``P`` trainable hidden-state vectors for each of the ``L`` layers: ``(L, P, d)``.

    Layer 0 receives them as input embeddings (like a soft prompt); before every later layer, the
    hidden states at the ``P`` prompt positions (the previous layer's outputs there) are REPLACED
    by that layer's own vectors. Unlike a key/value prefix the vectors are also queries and pass
    through each layer's frozen projections and MLP.
    """

    def __init__(self, config, prompt_len: int, init_std: float = 0.02, seed: int = 0) -> None:
        super().__init__()
        g = kv_geometry(config)
        gen = torch.Generator().manual_seed(seed)
        self.prompt_len = prompt_len
        self.weight = nn.Parameter(
            torch.randn(g["n_layers"], prompt_len, g["hidden_size"], generator=gen) * init_std
        )


def deep_prompt_forward(model, deep: DeepPrompt, input_ids, attention_mask, labels=None):
    """Forward pass with a :class:`DeepPrompt`; hooks are removed afterwards.

    ``logits`` cover ``P+T`` positions; ``labels (B, T)`` are extended with ``-100``.
    """
    p = deep.prompt_len
    batch = input_ids.shape[0]
    embeds = model.get_input_embeddings()(input_ids)
    first = deep.weight[0].to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    inputs = {
        "inputs_embeds": torch.cat([first, embeds], dim=1),
        "attention_mask": torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1),
    }
    if labels is not None:
        inputs["labels"] = torch.cat([labels.new_full((batch, p), IGNORE_INDEX), labels], dim=1)

    handles = _replace_prompt_positions(model, deep, batch)
    try:
        return model(**inputs)
    finally:
        for h in handles:
            h.remove()


def _replace_prompt_positions(model: nn.Module, deep: DeepPrompt, batch: int) -> list:
    """Pre-hooks on every layer > 0 that replace the first ``P`` input positions by
    ``deep.weight[l]``; returns their handles (the caller removes them)."""
    p = deep.prompt_len

    def make_hook(layer_idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            vec = deep.weight[layer_idx].to(hidden.dtype).unsqueeze(0).expand(batch, -1, -1)
            hidden = torch.cat([vec, hidden[:, p:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    return [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(_decoder_layers(model))
        if i > 0
    ]


# ---------------------------------------------------------------------------------------------
# Compiling a prompt into a key/value cache (notebook 02, section 10)
# ---------------------------------------------------------------------------------------------
def _cache_as_prefix(outputs) -> torch.Tensor:
    """The keys and values a batch-1 forward pass left in its cache, as ``(L, 2, H, P, D)``."""
    cache = output_cache(outputs)
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])


@torch.no_grad()
def soft_prompt_to_prefix(model: nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """A soft prompt ``(P, d)`` compiled into the key/value prefix ``(L, 2, H, P, D)`` it gives.

    In a causal decoder the prompt's positions ``0..P-1`` attend only to each other, so the keys
    and values every layer computes there (after the norm, the projections and the position
    encoding of positions ``0..P-1``) do not depend on the request: one forward pass over the
    prompt alone computes them once. Served through ``prefix_forward`` (tokens at positions
    ``P..P+T-1``), the compiled prefix gives the real tokens exactly the logits the prompt gives
    them as ``P`` input positions. In the model's dtype, on its device, without gradient.
    """
    weight = model.get_input_embeddings().weight
    embeds = prompt.detach().to(weight.device, weight.dtype).unsqueeze(0)
    return _cache_as_prefix(model(inputs_embeds=embeds, use_cache=True))


@torch.no_grad()
def deep_prompt_to_prefix(model: nn.Module, deep: DeepPrompt) -> torch.Tensor:
    """Hidden-state prompts compiled into the key/value prefix ``(L, 2, H, P, D)`` they give:
    one forward pass over the ``P`` prompt positions alone (``weight[0]`` as input embeddings,
    the positions replaced by ``weight[l]`` before every later layer ``l``), whose cache holds
    what the frozen layers compute from ``weight[l]``. Hooks are removed afterwards."""
    dtype = model.get_input_embeddings().weight.dtype
    handles = _replace_prompt_positions(model, deep, 1)
    try:
        out = model(inputs_embeds=deep.weight[:1].detach().to(dtype), use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return _cache_as_prefix(out)
