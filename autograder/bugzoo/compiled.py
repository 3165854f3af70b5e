"""Mistakes in compiling a prompt into a key/value prefix (notebook 02, section 10), and valid
but unusual ways of doing it."""

from __future__ import annotations

import weakref

import torch

from autograder.bugzoo import Bug, Variant
from autograder.bugzoo.deep import _replace_before_layers
from autograder.checks.recording import decoder_layers
from autograder.reference import soft_prompt_to_prefix
from course.compat import kv_geometry, output_cache

__all__ = ["BUGS", "VARIANTS"]


def _stack(cache, row: int = 0) -> torch.Tensor:
    return torch.stack([torch.stack([lay.keys[row], lay.values[row]]) for lay in cache.layers])


# --- soft_prompt_to_prefix --------------------------------------------------------------------
def soft_kv_swapped(model, prompt):
    """Stacks each layer's values before its keys."""
    return soft_prompt_to_prefix(model, prompt).flip(1)


def soft_batch_dim_kept(model, prompt):
    """Stacks the cache's keys and values as they are, ``(1, H, P, D)``: a batch dimension too
    many."""
    prompt = prompt.to(model.dtype)
    with torch.no_grad():
        out = model(inputs_embeds=prompt.unsqueeze(0), use_cache=True)
    return torch.stack([torch.stack([lay.keys, lay.values]) for lay in output_cache(out).layers])


def _projection_outputs(model, run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``run()`` with forward hooks on every layer's key/value projections; what they output,
    as ``(H, P, D)`` keys and values per layer (batch row 0)."""
    g = kv_geometry(model.config)
    h, dim = g["n_kv_heads"], g["head_dim"]
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def keep(i, name):
        def hook(module, args, output):
            seen.setdefault(i, {})[name] = output[0].detach()

        return hook

    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None) or layer.attn
        if hasattr(attn, "k_proj"):
            handles.append(attn.k_proj.register_forward_hook(keep(i, "k")))
            handles.append(attn.v_proj.register_forward_hook(keep(i, "v")))
        else:  # GPT-2: one projection for queries, keys and values
            handles.append(attn.c_attn.register_forward_hook(keep(i, "qkv")))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    layers = []
    for i in sorted(seen):
        if "qkv" in seen[i]:
            _, k, v = seen[i]["qkv"].split(h * dim, dim=-1)
        else:
            k, v = seen[i]["k"], seen[i]["v"]
        layers.append(tuple(x.view(-1, h, dim).transpose(0, 1) for x in (k, v)))
    return layers


def soft_keys_unrotated(model, prompt):
    """Reads the keys and values off the key/value projections (forward hooks on ``k_proj``
    and ``v_proj``): on Llama the keys miss the rotary embedding the cache applies after them
    (right on GPT-2, whose positions enter with the input)."""
    prompt = prompt.to(model.dtype)
    layers = _projection_outputs(model, lambda: model(inputs_embeds=prompt.unsqueeze(0)))
    return torch.stack([torch.stack(pair) for pair in layers])


_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def soft_memoised_per_model(model, prompt):
    """Compiles "once": keeps the first prefix it computed for a model and returns it for every
    later prompt."""
    if model not in _MEMO or _MEMO[model].shape[3] != prompt.shape[0]:
        _MEMO[model] = soft_prompt_to_prefix(model, prompt)
    return _MEMO[model]


def soft_left_in_eval(model, prompt):
    """Puts the model in eval mode to compile and leaves it there: a model in the middle of
    training stops training as it was (an adversary's finding)."""
    model.eval()
    return soft_prompt_to_prefix(model, prompt)


def soft_model_upcast(model, prompt):
    """Compiles in float32 by converting the model itself (``model.float()``) and never converts
    it back: a bfloat16 model stays float32 (an adversary's finding)."""
    dtype = model.get_input_embeddings().weight.dtype
    model.float()
    return soft_prompt_to_prefix(model, prompt.float()).to(dtype)


def soft_always_float32(model, prompt):
    """Returns the prefix as float32 whatever the model's dtype."""
    return soft_prompt_to_prefix(model, prompt).float()


def soft_not_cast(model, prompt):
    """Feeds the prompt to the model in its own dtype: a float32 prompt into a bfloat16 model
    fails."""
    with torch.no_grad():
        out = model(inputs_embeds=prompt.unsqueeze(0), use_cache=True)
    return _stack(output_cache(out))


def soft_prompt_zeroed(model, prompt):
    """Compiles correctly, then clears the prompt it was given "to free memory" (in place)."""
    prefix = soft_prompt_to_prefix(model, prompt)
    with torch.no_grad():
        prompt.zero_()
    return prefix


def soft_layers_by_prompt_len(model, prompt):
    """Confuses L and P: stacks ``prompt.shape[0]`` layers of the cache."""
    prompt = prompt.to(model.dtype)
    with torch.no_grad():
        out = model(inputs_embeds=prompt.unsqueeze(0), use_cache=True)
    cache = output_cache(out)
    layers = [cache.layers[i % len(cache.layers)] for i in range(prompt.shape[0])]
    return torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in layers])


# --- deep_prompt_to_prefix --------------------------------------------------------------------
def deep_compiled_as_soft_prompt(model, deep):
    """Compiles ``weight[0]`` as a soft prompt: the later layers' vectors are never used."""
    return soft_prompt_to_prefix(model, deep.weight[0])


def deep_weights_as_kv(model, deep):
    """Uses each layer's vectors directly as its keys and values, not what the frozen layer's
    norm and projections compute from them."""
    g = kv_geometry(model.config)
    h, dim = g["n_kv_heads"], g["head_dim"]
    kv = deep.weight.detach()[..., : h * dim].unflatten(-1, (h, dim)).transpose(1, 2)
    return torch.stack([kv, kv], dim=1)


def deep_compiled_hooks_left(model, deep):
    """Replaces the prompt positions with pre-hooks that are never removed."""
    _replace_before_layers(model, deep)
    with torch.no_grad():
        out = model(inputs_embeds=deep.weight[:1].to(model.dtype), use_cache=True)
    return _stack(output_cache(out))


BUGS = [
    Bug(
        name="soft_left_in_eval",
        description="soft_prompt_to_prefix leaves a training model in eval mode",
        notebook="02",
        replaces={"soft_prompt_to_prefix": soft_left_in_eval},
        caught_by=("check_soft_prompt_to_prefix",),
        message_contains="left in eval mode",
    ),
    Bug(
        name="soft_model_upcast",
        description="soft_prompt_to_prefix converts the model to float32 and leaves it so",
        notebook="02",
        replaces={"soft_prompt_to_prefix": soft_model_upcast},
        caught_by=("check_soft_prompt_to_prefix",),
        message_contains="now holds torch.float32",
    ),
    Bug(
        name="compile_soft_kv_swapped",
        description="the compiled prefix holds each layer's values where its keys belong",
        notebook="02",
        replaces={"soft_prompt_to_prefix": soft_kv_swapped},
        caught_by=("check_soft_prompt_to_prefix",),
        message_contains="swapped",
    ),
    Bug(
        name="compile_soft_batch_dim_kept",
        description="the compiled prefix keeps the cache's batch dimension: (L, 2, 1, H, P, D)",
        notebook="02",
        replaces={"soft_prompt_to_prefix": soft_batch_dim_kept},
        caught_by=("check_soft_prompt_to_prefix",),
        message_contains="batch dimension",
    ),
    Bug(
        name="compile_soft_keys_unrotated",
        description=(
            "keys read off k_proj by a hook: on Llama they miss the rotary embedding, so served "
            "at positions 0..P-1 they are not the keys the prompt gave"
        ),
        notebook="02",
        replaces={"soft_prompt_to_prefix": soft_keys_unrotated},
        caught_by=("check_soft_prompt_to_prefix",),
        message_contains="the values are right but the keys",
    ),
    Bug(
        name="compile_soft_memoised",
        description="the first prefix compiled for a model is returned for every later prompt",
        notebook="02",
        replaces={"soft_prompt_to_prefix": soft_memoised_per_model},
        caught_by=("check_soft_prompt_to_prefix",),
        message_contains="same prefix for two different prompts",
    ),
    Bug(
        name="compile_soft_always_float32",
        description="the compiled prefix is float32 whatever the model's dtype",
        notebook="02",
        replaces={"soft_prompt_to_prefix": soft_always_float32},
        caught_by=("check_soft_prompt_to_prefix",),
        message_contains="the model's dtype",
    ),
    Bug(
        name="compile_soft_not_cast",
        description="the prompt is not cast to the model's dtype: a bfloat16 model fails",
        notebook="02",
        replaces={"soft_prompt_to_prefix": soft_not_cast},
        caught_by=("check_soft_prompt_to_prefix",),
        message_contains="raised RuntimeError",
    ),
    Bug(
        name="compile_soft_prompt_zeroed",
        description="compiling clears the caller's trained prompt in place",
        notebook="02",
        replaces={"soft_prompt_to_prefix": soft_prompt_zeroed},
        caught_by=("check_soft_prompt_to_prefix",),
        message_contains="changed the prompt it was given",
    ),
    Bug(
        name="compile_soft_layers_by_prompt_len",
        description="L and P confused: the prefix has P layers",
        notebook="02",
        replaces={"soft_prompt_to_prefix": soft_layers_by_prompt_len},
        caught_by=("check_soft_prompt_to_prefix",),
        message_contains="expected a tensor of shape",
    ),
    Bug(
        name="compile_deep_as_soft_prompt",
        description=(
            "hidden-state prompts compiled from weight[0] alone, as if they were a soft prompt: "
            "layers > 0 never see their own vectors"
        ),
        notebook="02",
        replaces={"deep_prompt_to_prefix": deep_compiled_as_soft_prompt},
        caught_by=("check_deep_prompt_to_prefix",),
        message_contains="layer 0 is right",
    ),
    Bug(
        name="compile_deep_weights_as_kv",
        description="each layer's vectors used as its keys and values directly",
        notebook="02",
        replaces={"deep_prompt_to_prefix": deep_weights_as_kv},
        caught_by=("check_deep_prompt_to_prefix",),
        message_contains="what the frozen layer computes",
    ),
    Bug(
        name="compile_deep_hooks_left",
        description="the hooks that replace the prompt positions are never removed",
        notebook="02",
        replaces={"deep_prompt_to_prefix": deep_compiled_hooks_left},
        caught_by=("check_deep_prompt_to_prefix",),
        message_contains="hooks",
    ),
]


# --- valid but unusual implementations (every check must pass them) ---------------------------
def soft_batched_with_grad(model, prompt):
    """Runs the prompt as a batch of two identical rows with an explicit mask and positions,
    keeps the autograd graph, and returns row 0 (the prefix still requires grad)."""
    p = prompt.shape[0]
    prompt = prompt.to(model.dtype)
    out = model(
        inputs_embeds=prompt.unsqueeze(0).expand(2, -1, -1),
        attention_mask=torch.ones(2, p, dtype=torch.long),
        position_ids=torch.arange(p).unsqueeze(0).expand(2, -1),
        use_cache=True,
    )
    return _stack(output_cache(out), row=0)


def deep_replaced_in_outputs(model, deep):
    """Replaces the prompt positions in the OUTPUT of layer l-1 (forward hooks) rather than in
    the input of layer l; the same hidden states enter every layer."""
    layers = decoder_layers(model)

    def make_hook(i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            vec = deep.weight[i].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            return (vec, *output[1:]) if isinstance(output, tuple) else vec

        return hook

    handles = [layers[i - 1].register_forward_hook(make_hook(i)) for i in range(1, len(layers))]
    try:
        with torch.no_grad():
            out = model(inputs_embeds=deep.weight[:1].to(model.dtype), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return _stack(output_cache(out))


VARIANTS = [
    Variant(
        name="compile_soft_batched_with_grad",
        description="two identical rows, explicit mask and positions, graph kept: row 0 returned",
        notebook="02",
        replaces={"soft_prompt_to_prefix": soft_batched_with_grad},
    ),
    Variant(
        name="compile_deep_replaced_in_outputs",
        description="the prompt positions replaced in layer l-1's output, not layer l's input",
        notebook="02",
        replaces={"deep_prompt_to_prefix": deep_replaced_in_outputs},
    ),
]
