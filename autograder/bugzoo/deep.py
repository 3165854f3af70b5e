"""Mistakes in the hidden-state ("deep prompt") form of notebook 02, and valid but unusual
implementations of it (a precomputed key/value cache among them)."""

from __future__ import annotations

import torch
from torch import nn

from autograder.bugzoo import Bug, Variant
from autograder.checks.recording import decoder_layers
from autograder.reference import IGNORE_INDEX, DeepPrompt
from course.compat import cache_keyword, kv_geometry, make_cache, output_cache

__all__ = ["BUGS", "VARIANTS"]


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


# --- DeepPrompt --------------------------------------------------------------------------------
class FixedStdDeepPrompt(DeepPrompt):
    """Ignores ``init_std``: always draws at std 0.02."""

    def __init__(self, config, prompt_len, init_std=0.02, seed=0):
        super().__init__(config, prompt_len, 0.02, seed)


class UnseededDeepPrompt(DeepPrompt):
    """Draws from the global random state: ``seed`` changes nothing, and the same seed gives
    other vectors every time."""

    def __init__(self, config, prompt_len, init_std=0.02, seed=0):
        super().__init__(config, prompt_len, init_std, seed)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape) * init_std)


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
    Bug(
        name="deep_init_std_ignored",
        description="DeepPrompt ignores init_std and always draws at std 0.02",
        notebook="02",
        replaces={"DeepPrompt": FixedStdDeepPrompt},
        caught_by=("check_deep_prompt",),
        message_contains="init_std=",
    ),
    Bug(
        name="deep_init_unseeded",
        description="DeepPrompt draws from the global random state instead of a seeded generator",
        notebook="02",
        replaces={"DeepPrompt": UnseededDeepPrompt},
        caught_by=("check_deep_prompt",),
        message_contains="seed",
    ),
]


# --- valid but unusual implementations (every check must pass them) ---------------------------
def _replace_before_layers(model, deep):
    """Pre-hooks on every layer > 0 that replace the prompt positions by ``deep.weight[l]``."""
    p = deep.prompt_len

    def make_hook(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            vec = deep.weight[i].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([vec, hidden[:, p:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    return [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(decoder_layers(model))
        if i > 0
    ]


def deep_prefilled_cache(model, deep, input_ids, attention_mask, labels=None):
    """The hidden-state form as a key/value prefix. Before every layer > 0 the prompt
    positions are overwritten, so what the tokens attend to at layer l (the keys and values the
    frozen layer computes at the prompt positions) depends on ``weight[l]`` alone: one pass over
    the P prompt vectors (batch 1, their states replaced before every layer) fills a cache with
    exactly those keys and values and gives the prompt positions' logits; the tokens then run
    against that cache at positions P..P+T-1, with only T queries per layer. The loss is taken
    over the P+T logits with -100 over the prompt (the last prompt position predicts the first
    token)."""
    p, (batch, length) = deep.prompt_len, input_ids.shape
    handles = _replace_before_layers(model, deep)
    try:
        prompt = model(inputs_embeds=deep.weight[:1], use_cache=True)
    finally:
        for h in handles:
            h.remove()
    layers = [
        (layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1))
        for layer in output_cache(prompt).layers
    ]
    out = model(
        input_ids=input_ids,
        attention_mask=torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1),
        position_ids=torch.arange(p, p + length).unsqueeze(0).expand(batch, -1),
        use_cache=False,
        **{cache_keyword(model): make_cache(layers)},
    )
    out.logits = torch.cat([prompt.logits.expand(batch, -1, -1), out.logits], dim=1)
    out.loss = None
    if labels is not None:
        full = torch.cat([labels.new_full((batch, p), IGNORE_INDEX), labels], dim=1)
        out.loss = nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1), full[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
    return out


def deep_replaced_after_previous_layer(model, deep, input_ids, attention_mask, labels=None):
    """Replaces the prompt positions in the OUTPUT of layer l-1 (a forward hook) rather than in
    the input of layer l (a pre-hook): the same hidden states enter every layer."""
    p = deep.prompt_len
    inputs = _inputs(model, deep, input_ids, attention_mask, labels)
    layers = decoder_layers(model)

    def make_hook(i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            vec = deep.weight[i].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([vec, hidden[:, p:]], dim=1)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    handles = [layers[i - 1].register_forward_hook(make_hook(i)) for i in range(1, len(layers))]
    try:
        return model(**inputs)
    finally:
        for h in handles:
            h.remove()


class TruncatedNormalDeepPrompt(DeepPrompt):
    """Draws the vectors from a normal truncated at two standard deviations (their std is
    about 0.88 init_std), with its own seeded generator."""

    def __init__(self, config, prompt_len, init_std=0.02, seed=0):
        super().__init__(config, prompt_len, init_std, seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            nn.init.trunc_normal_(
                self.weight, std=init_std, a=-2 * init_std, b=2 * init_std, generator=gen
            )


VARIANTS = [
    Variant(
        name="deep_prefilled_cache",
        description=(
            "the hidden-state form computed as a precomputed key/value cache: one pass over the "
            "prompt vectors fills the cache, then the T tokens run against it"
        ),
        notebook="02",
        replaces={"deep_prompt_forward": deep_prefilled_cache},
    ),
    Variant(
        name="deep_replaced_after_previous_layer",
        description="the prompt positions are replaced in layer l-1's output, not layer l's input",
        notebook="02",
        replaces={"deep_prompt_forward": deep_replaced_after_previous_layer},
    ),
    Variant(
        name="deep_truncated_normal_init",
        description="DeepPrompt draws from a truncated normal (std about 0.88 init_std)",
        notebook="02",
        replaces={"DeepPrompt": TruncatedNormalDeepPrompt},
    ),
]
