"""Mistakes in the hidden-state ("deep prompt") form of notebook 02."""

from __future__ import annotations

import torch

from autograder.bugzoo import Bug
from autograder.checks.recording import decoder_layers
from autograder.reference import IGNORE_INDEX
from course.compat import cache_keyword, kv_geometry, make_cache

__all__ = ["BUGS"]


def _inputs(model, deep, input_ids, attention_mask, labels, soft_label=IGNORE_INDEX):
    p, batch = deep.prompt_len, input_ids.shape[0]
    embeds = model.get_input_embeddings()(input_ids)
    first = deep.weight[0].to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    inputs = {
        "inputs_embeds": torch.cat([first, embeds], dim=1),
        "attention_mask": torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1),
    }
    if labels is not None:
        inputs["labels"] = torch.cat([labels.new_full((batch, p), soft_label), labels], dim=1)
    return inputs


def _with_hooks(model, deep, inputs, combine, remove=True):
    """Run ``model(**inputs)`` with a pre-hook on every layer > 0 that sets the prompt positions
    to ``combine(previous_hidden_at_prompt_positions, layer_vectors)``."""
    p = deep.prompt_len

    def make_hook(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            vec = deep.weight[i].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([combine(hidden[:, :p], vec), hidden[:, p:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    handles = [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(decoder_layers(model))
        if i > 0
    ]
    try:
        return model(**inputs)
    finally:
        if remove:
            for h in handles:
                h.remove()


def deep_added(model, deep, input_ids, attention_mask, labels=None):
    """Adds each layer's vectors to the previous layer's output instead of replacing it."""
    inputs = _inputs(model, deep, input_ids, attention_mask, labels)
    return _with_hooks(model, deep, inputs, lambda prev, vec: prev + vec)


def deep_first_layer_only(model, deep, input_ids, attention_mask, labels=None):
    """Prepends weight[0] to the input embeddings and never touches the later layers."""
    return model(**_inputs(model, deep, input_ids, attention_mask, labels))


def deep_hooks_left(model, deep, input_ids, attention_mask, labels=None):
    """Correct forward pass, but the layer hooks are never removed."""
    inputs = _inputs(model, deep, input_ids, attention_mask, labels)
    return _with_hooks(model, deep, inputs, lambda prev, vec: vec, remove=False)


def deep_labels_not_masked(model, deep, input_ids, attention_mask, labels=None):
    """Extends the labels with token 0 over the prompt positions instead of -100."""
    inputs = _inputs(model, deep, input_ids, attention_mask, labels, soft_label=0)
    return _with_hooks(model, deep, inputs, lambda prev, vec: vec)


def deep_as_kv_prefix(model, deep, input_ids, attention_mask, labels=None):
    """Feeds each layer's vectors as that layer's keys AND values (a key/value prefix)."""
    g = kv_geometry(model.config)
    batch, p = input_ids.shape[0], deep.prompt_len
    layers = []
    for i in range(g["n_layers"]):
        kv = deep.weight[i].view(p, g["n_kv_heads"], g["head_dim"]).transpose(0, 1)
        kv = kv.unsqueeze(0).expand(batch, -1, -1, -1)
        layers.append((kv, kv))
    mask = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)
    positions = torch.arange(p, p + input_ids.shape[1]).unsqueeze(0).expand(batch, -1)
    return model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        labels=labels,
        use_cache=False,
        **{cache_keyword(model): make_cache(layers)},
    )


BUGS = [
    Bug(
        name="deep_added_not_replaced",
        description="each layer's vectors are added to the prompt positions, not substituted",
        notebook="02",
        replaces={"deep_prompt_forward": deep_added},
        caught_by=("check_deep_prompt",),
        message_contains="PLUS",
    ),
    Bug(
        name="deep_first_layer_only",
        description=(
            "only weight[0] is used (as input embeddings): the 'deep' prompt is plain prompt "
            "tuning and layers > 0 never see their vectors"
        ),
        notebook="02",
        replaces={"deep_prompt_forward": deep_first_layer_only},
        caught_by=("check_deep_prompt",),
        message_contains="only the first layer",
    ),
    Bug(
        name="deep_hooks_left_behind",
        description="the per-layer hooks are never removed: every later forward is altered",
        notebook="02",
        replaces={"deep_prompt_forward": deep_hooks_left},
        caught_by=("check_deep_prompt",),
        message_contains="hooks",
    ),
    Bug(
        name="deep_labels_not_masked",
        description="labels over the prompt positions are token 0 instead of -100",
        notebook="02",
        replaces={"deep_prompt_forward": deep_labels_not_masked},
        caught_by=("check_deep_prompt",),
        message_contains="-100",
    ),
    Bug(
        name="deep_as_kv_prefix",
        description="the per-layer vectors are fed as a key/value prefix, not as hidden states",
        notebook="02",
        replaces={"deep_prompt_forward": deep_as_kv_prefix},
        caught_by=("check_deep_prompt",),
        message_contains="key/value prefix",
    ),
]
