"""Checks for notebook 02, deep prefix tuning in its key/value form: ``PrefixEncoder``,
``build_prefix_cache``, ``prefix_forward``, ``generate_with_prefix``, training, equivalence with
PEFT's PrefixTuning, and a float32 prefix in a bfloat16 model.

Each check is an *observe* / *judge* pair (see :mod:`autograder.checks.protocol`). Observing runs
the student's objects on the tiny GPT-2 and Llama-GQA models of the current variant under a
recording attention implementation and returns what every layer's attention received: how many
keys for how many queries, the prefix keys/values themselves, their gradients with respect to
the prefix (keys and values separately), the mask and the position ids, plus the logits, the
loss and its gradient. Judging rebuilds the same models and inputs and compares with
:mod:`autograder.reference` on the very same prefix values.

The prefix values are the grader's: the student's ``PrefixEncoder`` is built (its own output is
recorded, and its shape checked), then its ``forward()`` is replaced by one returning a
trainable parameter drawn from :func:`~autograder.checks.harness.seeded`, so the judge knows
exactly what ``encoder()`` gave. Only :func:`check_prefix_encoder` and the training check judge
values the student's encoder drew itself (their shape, scale, seeding, per-layer distinctness).

Notation: ``L`` layers, ``H`` key/value heads (``num_key_value_heads`` under GQA), ``P`` prefix
length, ``D`` head dim, ``B`` batch, ``T`` real tokens, ``d`` hidden size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Cache

from autograder.checks import fixtures
from autograder.checks.frozen import judge_training, observe_training
from autograder.checks.harness import CheckFailure, describe, max_diff, seeded, student_call
from autograder.checks.models import KINDS, Batch, tiny_models
from autograder.checks.protocol import MalformedObservation, Observed, run_check
from autograder.checks.recording import Recording, record
from course.compat import kv_geometry

__all__ = [
    "FixedPrefix",
    "check_bf16",
    "check_build_prefix_cache",
    "check_generate_with_prefix",
    "check_peft_equivalence",
    "check_prefix_encoder",
    "check_prefix_forward",
    "check_prefix_training",
    "judge_bf16",
    "judge_build_prefix_cache",
    "judge_generate_with_prefix",
    "judge_peft_equivalence",
    "judge_prefix_encoder",
    "judge_prefix_forward",
    "judge_prefix_training",
    "observe_bf16",
    "observe_build_prefix_cache",
    "observe_generate_with_prefix",
    "observe_peft_equivalence",
    "observe_prefix_encoder",
    "observe_prefix_forward",
    "observe_prefix_training",
]

_ATOL = 1e-5
_GRAD_ATOL = 1e-4
"""Gradients of the same loss through the same frozen model, summed in another order."""


def _reference():
    """:mod:`autograder.reference`, imported only where a judge needs it (it does not exist in a
    grading kernel's sandbox; a student package replays its stored results,
    :mod:`autograder.checks.fixtures`)."""
    return fixtures.reference()


class FixedPrefix(nn.Module):
    """A stand-in encoder returning given prefix values ``(L, 2, H, P, D)``: lets the reference
    run on exactly the values the student's code was given. ``trainable``: hold them as a
    parameter, so that the reference's gradient can be compared."""

    def __init__(self, values: torch.Tensor, trainable: bool = False) -> None:
        super().__init__()
        if trainable:
            self.values = nn.Parameter(values.detach().clone())
        else:
            self.values = values.detach()
        self.prefix_len = values.shape[3]

    def forward(self) -> torch.Tensor:
        return self.values


def _geometry(model: nn.Module) -> tuple[int, int, int, int, int]:
    """``(L, H_kv, D, n_heads, d)`` of ``model``."""
    g = kv_geometry(model.config)
    return g["n_layers"], g["n_kv_heads"], g["head_dim"], g["n_heads"], g["hidden_size"]


def _prefix_shape(model: nn.Module, p: int) -> tuple[int, ...]:
    n_layers, h, dim, _, _ = _geometry(model)
    return (n_layers, 2, h, p, dim)


def _grader_values(model: nn.Module, p: int, n: int) -> torch.Tensor:
    """Prefix values ``(L, 2, H, P, D)`` chosen by the grader: input ``n`` of the variant."""
    gen = torch.Generator().manual_seed(seeded(n))
    return torch.randn(*_prefix_shape(model, p), generator=gen)


def _per_model(obs: Observed) -> Iterator[tuple[str, nn.Module, Observed]]:
    """The tiny models of the variant, each with its observation (checked to be for it)."""
    for (label, model), o in zip(tiny_models(), obs.subs("models", len(KINDS)), strict=True):
        if o.str("label") != label:
            raise MalformedObservation(f"observation for {o.str('label')!r}, expected {label!r}")
        yield label, model, o


def _freeze(model: nn.Module) -> None:
    """The grader's own freezing (observe cannot use the reference's)."""
    for t in model.parameters():
        t.requires_grad_(False)


def _maybe_tensor(value: Any) -> torch.Tensor | None:
    return value.detach() if isinstance(value, torch.Tensor) else None


def _make_encoder(PrefixEncoder: type, model: nn.Module, prefix_len: int, **kwargs) -> nn.Module:
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return student_call(
        f"PrefixEncoder(config, {prefix_len}{args})", PrefixEncoder, model.config, prefix_len,
        **kwargs,
    )  # fmt: skip


def _shape_hint(model: nn.Module, shape: tuple[int, ...] | None, p: int) -> str:
    n_layers, h, dim, n_heads, _ = _geometry(model)
    if shape is not None and len(shape) == 5 and shape[2] == n_heads != h:
        return (
            f" — this model uses grouped-query attention: num_key_value_heads={h} < "
            f"num_attention_heads={n_heads}, and the cache holds one key/value per KV head"
        )
    if shape == (n_layers, 2, p, h, dim):
        return " — heads come before prefix positions: (L, 2, H, P, D)"
    if shape is not None and len(shape) == 5 and shape[4] != dim:
        return f" — head_dim is {dim} here (config.head_dim), not hidden_size // n_heads"
    return ""


def _prefix_values(
    label: str, model: nn.Module, encoder: nn.Module, p: int, how: str
) -> torch.Tensor:
    """``encoder()``, checked to be ``(L, 2, H_kv, P, D)`` (fails early with a hint)."""
    want = _prefix_shape(model, p)
    values = student_call("encoder()", encoder)
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != want:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else None
        raise AssertionError(
            f"{label}: PrefixEncoder({how})() returned {describe(values)}, expected shape {want} "
            f"(L, 2, H_kv, P, D){_shape_hint(model, shape, p)}"
        )
    return values


def _inject(label: str, encoder: nn.Module, values: torch.Tensor) -> nn.Parameter:
    """Make ``encoder()`` return a trainable parameter holding ``values``; returns it.

    The parameter is registered on the encoder (so ``encoder.to(...)`` reaches it as it would
    the student's own) and everything else about the student's encoder is kept."""
    if not isinstance(encoder, nn.Module):
        raise AssertionError(
            f"{label}: PrefixEncoder(...) gave {describe(encoder)}, expected a torch.nn.Module"
        )
    param = nn.Parameter(values.detach().clone())
    encoder.register_parameter("grader_prefix", param)
    encoder.forward = lambda: encoder.grader_prefix
    return param


def _student_encoder(
    label: str, PrefixEncoder: type, model: nn.Module, p: int, seed: int, n: int
) -> tuple[nn.Module, nn.Parameter, torch.Tensor]:
    """``(encoder, grader parameter, the encoder's own values)``: the student's encoder built
    with ``seed``, then given the grader's values of input ``n``."""
    encoder = _make_encoder(PrefixEncoder, model, p, seed=seed)
    own = _prefix_values(label, model, encoder, p, f"config, {p}, seed={seed}").detach().clone()
    return encoder, _inject(label, encoder, _grader_values(model, p, n)), own


def _own_values(label: str, model: nn.Module, o: Observed, p: int) -> torch.Tensor:
    """The student's encoder's own output, recorded by observe: ``(L, 2, H, P, D)``."""
    own = o.tensor("encoder_values")
    want = _prefix_shape(model, p)
    if tuple(own.shape) != want:
        raise AssertionError(
            f"{label}: PrefixEncoder(config, {p})() returned a tensor of shape "
            f"{tuple(own.shape)}, expected {want} (L, 2, H_kv, P, D)"
            f"{_shape_hint(model, tuple(own.shape), p)}"
        )
    return own


def _count(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters())


# ---------------------------------------------------------------------------------------------
# PrefixEncoder
# ---------------------------------------------------------------------------------------------
def _pick(n: int, options: tuple) -> Any:
    """One of ``options``, chosen by input ``n`` of the variant (``options[n % len]`` in variant
    0): an observation made on another variant, replayed, then has the wrong sizes or scale."""
    return options[seeded(n) % len(options)]


def _encoder_inputs() -> tuple[int, int, float]:
    """``(P, hidden, init_std)`` the PrefixEncoder check uses (5, 16 and 0.25 in variant 0)."""
    return _pick(31, (4, 5, 6)), _pick(36, (16, 12, 20)), _pick(33, (0.25, 0.1, 0.5))


def _observe_direct(label: str, PrefixEncoder: type, model: nn.Module) -> dict:
    p, _, std = _encoder_inputs()
    encoder = _make_encoder(PrefixEncoder, model, p)
    if not isinstance(encoder, nn.Module):
        raise AssertionError(
            f"{label}: PrefixEncoder(config, {p}) gave {describe(encoder)}, expected a "
            "torch.nn.Module"
        )
    values = _prefix_values(label, model, encoder, p, f"config, {p}")
    params = list(encoder.parameters())
    grads: list[torch.Tensor | None] = [None] * len(params)
    trainable = [i for i, t in enumerate(params) if t.requires_grad]
    if values.requires_grad and trainable:
        got = torch.autograd.grad(values.sum(), [params[i] for i in trainable], allow_unused=True)
        for i, g in zip(trainable, got, strict=True):
            grads[i] = _maybe_tensor(g)

    def drawn(**kwargs) -> torch.Tensor | None:
        made = _make_encoder(PrefixEncoder, model, p, **kwargs)
        return _maybe_tensor(student_call("encoder()", made))

    return {
        "values": values.detach(),
        "count": _count(encoder),
        "requires_grad": [t.requires_grad for t in params],
        "grads": grads,
        "again": drawn(),
        "other": drawn(seed=1),
        "small": drawn(init_std=std),
    }


def _observe_reparam(label: str, PrefixEncoder: type, model: nn.Module) -> dict:
    (p, hidden, _), d = _encoder_inputs(), _geometry(model)[4]
    how = f"config, {p}, reparam=True, hidden={hidden}"
    encoder = _make_encoder(PrefixEncoder, model, p, reparam=True, hidden=hidden)
    if not isinstance(encoder, nn.Module):
        raise AssertionError(
            f"{label}: PrefixEncoder({how}) gave {describe(encoder)}, expected a torch.nn.Module"
        )
    values = _prefix_values(label, model, encoder, p, how)
    rows = [t for t in encoder.parameters() if tuple(t.shape) == (p, d)]
    dependence = None
    if rows and rows[0].requires_grad and values.requires_grad:
        # dependence[k, r]: how much prefix position k depends on embedding row r
        dependence = torch.zeros(p, p)
        for k in range(p):
            (g,) = torch.autograd.grad(
                values[:, :, :, k].sum(), rows[0], allow_unused=True, retain_graph=True
            )
            if g is not None:
                dependence[k] = g.detach().abs().sum(-1)
    plain = student_call("encoder.export()", getattr(encoder, "export", None))
    if not isinstance(plain, nn.Module):
        raise AssertionError(
            f"{label}: export() returned {describe(plain)}, expected a PrefixEncoder without MLP"
        )
    exported = _maybe_tensor(student_call("encoder.export()()", plain))
    with torch.no_grad():
        for t in encoder.parameters():
            t.add_(1.0)
    return {
        "values": values.detach(),
        "count": _count(encoder),
        "dependence": dependence,
        "exported": exported,
        "exported_count": _count(plain),
        "exported_after_change": _maybe_tensor(student_call("encoder.export()()", plain)),
    }


def observe_prefix_encoder(PrefixEncoder: type) -> dict:
    """Per tiny model: a direct encoder's values (default, same seed again, ``seed=1``, another
    ``init_std``), its parameter count and the gradient of ``encoder().sum()``; a
    reparameterised encoder's values, count, which embedding rows each prefix position depends
    on, and its export (before and after the original changes). ``P``, the MLP's width and the
    other ``init_std`` are chosen by the variant."""
    models = []
    for label, model in tiny_models():
        models.append(
            {
                "label": label,
                "direct": _observe_direct(label, PrefixEncoder, model),
                "reparam": _observe_reparam(label, PrefixEncoder, model),
            }
        )
    return {"models": models}


def _distinct_layers(label: str, values: torch.Tensor, what: str) -> None:
    """Every layer's prefix differs from every other layer's, and keys from values."""
    n_layers = values.shape[0]
    for i in range(n_layers):
        for j in range(i):
            if torch.equal(values[i], values[j]):
                raise AssertionError(
                    f"{label}: layers {j} and {i} of {what} are identical: every layer needs its "
                    "own independently initialised prefix"
                )
        if torch.equal(values[i, 0], values[i, 1]):
            raise AssertionError(
                f"{label}: layer {i} of {what} has identical keys and values: [:, 0] (keys) and "
                "[:, 1] (values) are separate trainable tensors"
            )


def _judge_direct(label: str, model: nn.Module, o: Observed) -> None:
    n_layers, h, dim, _, _ = _geometry(model)
    p, _, init_std = _encoder_inputs()
    shape = _prefix_shape(model, p)
    values = o.tensor("values", shape)
    want = n_layers * 2 * h * p * dim
    count = o.int("count")
    if count != want:
        raise AssertionError(
            f"{label}: PrefixEncoder(config, {p}) has {count} parameter values, expected "
            f"L·2·H_kv·P·D = {n_layers}·2·{h}·{p}·{dim} = {want}: one key and one value vector "
            "per layer, KV head and prefix position, and nothing else"
        )
    _distinct_layers(label, values, f"PrefixEncoder(config, {p})()")
    again, other = o.tensor("again", shape), o.tensor("other", shape)
    if not torch.equal(again, values) or torch.equal(other, values):
        raise AssertionError(
            f"{label}: PrefixEncoder's initialisation is not determined by `seed` (same seed must "
            "give the same prefix, another seed another one): draw from a seeded torch.Generator"
        )
    std = values.float().std().item()
    if not 0.7 < std < 1.4:
        raise AssertionError(
            f"{label}: PrefixEncoder(config, {p}) has values with std {std:.3f}, expected about "
            "1 (init_std defaults to 1.0): draw from a normal distribution times init_std"
        )
    small = o.tensor("small", shape).float().std().item()
    if not 0.6 * init_std < small < 1.6 * init_std:
        raise AssertionError(
            f"{label}: PrefixEncoder(config, {p}, init_std={init_std}) has values with std "
            f"{small:.3f}, expected about {init_std}"
        )
    flags = o.list("requires_grad")
    grads = o.list("grads", len(flags))
    if not all(isinstance(f, bool) for f in flags) or not all(
        g is None or isinstance(g, torch.Tensor) for g in grads
    ):
        raise MalformedObservation(f"{label}: malformed parameter gradients")
    if not flags or not any(flags) or any(g is None for g in grads):
        raise AssertionError(
            f"{label}: encoder().sum().backward() leaves some parameter without a gradient: "
            "return the parameter itself (or a view of it), not a detached copy"
        )
    if sum(g.numel() for g in grads) != count:
        raise MalformedObservation(f"{label}: gradients do not cover the {count} parameters")
    unused = sum(int((g == 0).sum()) for g in grads)
    if unused:
        raise AssertionError(
            f"{label}: {unused} of the encoder's {count} parameter values do not reach "
            "encoder()'s output (zero gradient): every value must be one key or value entry of "
            "the prefix, each used exactly once"
        )


def _judge_reparam(label: str, model: nn.Module, o: Observed) -> None:
    n_layers, h, dim, _, d = _geometry(model)
    p, hidden, _ = _encoder_inputs()
    shape = _prefix_shape(model, p)
    out_dim = n_layers * 2 * h * dim
    how = f"config, {p}, reparam=True, hidden={hidden}"
    values = o.tensor("values", shape)
    mlp = d * hidden + hidden + hidden * out_dim + out_dim
    count = o.int("count")
    if count != p * d + mlp:
        raise AssertionError(
            f"{label}: PrefixEncoder({how}) has {count} parameter values, expected "
            f"{p * d + mlp}: P·d = {p * d} prefix embeddings plus the MLP Linear(d={d}, "
            f"{hidden}) -> Tanh -> Linear({hidden}, L·2·H_kv·D = {out_dim}) with biases = {mlp}"
        )
    dependence = o.maybe_tensor("dependence")
    if dependence is None:
        raise AssertionError(
            f"{label}: PrefixEncoder({how}) has no ({p}, {d}) parameter with a gradient path to "
            "its output: the MLP's input is P trainable embeddings of size d"
        )
    dependence = o.tensor("dependence", (p, p))
    for k in range(p):
        used = dependence[k].nonzero().flatten().tolist()
        if used != [k]:
            raise AssertionError(
                f"{label}: with reparam=True, prefix position {k} (values[:, :, :, {k}]) depends "
                f"on embedding rows {used}, expected only row {k}: view the MLP output "
                "(P, L·2·H·D) as (P, L, 2, H, D) and permute to (L, 2, H, P, D) — a direct "
                ".view(L, 2, H, P, D) mixes positions, layers and heads"
            )
    _distinct_layers(label, values, f"PrefixEncoder({how})()")
    exported = o.maybe_tensor("exported")
    if exported is None or tuple(exported.shape) != shape:
        raise AssertionError(f"{label}: export()() returned {describe(exported)}, expected {shape}")
    if max_diff(exported, values) > 1e-6:
        raise AssertionError(
            f"{label}: export() changed the prefix values (max |diff| "
            f"{max_diff(exported, values):.3g}): store the MLP's current output"
        )
    if o.int("exported_count") != n_layers * 2 * h * p * dim:
        raise AssertionError(
            f"{label}: the exported encoder has {o.int('exported_count')} parameter values, "
            f"expected L·2·H_kv·P·D = {n_layers * 2 * h * p * dim}: export() must drop the MLP "
            "and the embeddings and keep only the prefix itself"
        )
    later = o.maybe_tensor("exported_after_change")
    if later is None or tuple(later.shape) != shape or max_diff(later, values) > 1e-6:
        raise AssertionError(
            f"{label}: changing the original encoder after export() changed the exported prefix: "
            "copy the values (detach().clone()) into the new encoder"
        )


def judge_prefix_encoder(obs: Observed) -> None:
    for label, model, o in _per_model(obs):
        _judge_direct(label, model, o.sub("direct"))
        _judge_reparam(label, model, o.sub("reparam"))


def check_prefix_encoder(PrefixEncoder: type) -> None:
    """PrefixEncoder: (L, 2, H_kv, P, D) prefixes (KV heads under GQA), exactly L·2·H_kv·P·D
    parameters when direct; with reparam=True an MLP over P embeddings, position-preserving,
    and export() gives the same values with no MLP left."""
    run_check(observe_prefix_encoder, judge_prefix_encoder, PrefixEncoder)


# ---------------------------------------------------------------------------------------------
# build_prefix_cache
# ---------------------------------------------------------------------------------------------
_B_CACHE, _P_CACHE = 3, 2  # B is not 2 (the key/value axis), P is not L (3 layers)


def _cache(label: str, build_prefix_cache: Callable, prefix, batch: int, dtype) -> Cache:
    cache = student_call(
        f"build_prefix_cache(prefix, {batch}, {dtype})", build_prefix_cache, prefix, batch, dtype
    )
    if not isinstance(cache, Cache):
        raise AssertionError(
            f"{label}: build_prefix_cache returned {describe(cache)}, expected a transformers "
            "DynamicCache (tuples of tuples are rejected by recent transformers): build "
            "DynamicCache() and cache.update(key, value, layer_idx) for every layer"
        )
    return cache


def _sum_grad(tensors: list[Any], prefix: torch.Tensor) -> torch.Tensor:
    """d(sum of ``tensors``)/d ``prefix`` (zeros where there is no path)."""
    parts = [t.sum() for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    if not parts:
        return torch.zeros_like(prefix)
    (g,) = torch.autograd.grad(sum(parts), prefix, allow_unused=True, retain_graph=True)
    return torch.zeros_like(prefix) if g is None else g.detach()


def observe_build_prefix_cache(build_prefix_cache: Callable) -> dict:
    """Per tiny model, for a grader-chosen prefix ``(L, 2, H, P, D)``: every layer's keys and
    values in the float32 cache, the gradients of all keys and of all values with respect to
    the prefix, every layer of a bfloat16 cache, and the length of layer 0 of a second cache
    built after the first one was appended to."""
    b, p = _B_CACHE, _P_CACHE
    models = []
    for label, model in tiny_models():
        prefix = _grader_values(model, p, 10).requires_grad_()
        cache = _cache(label, build_prefix_cache, prefix, b, torch.float32)
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        half = _cache(label, build_prefix_cache, prefix, b, torch.bfloat16)
        observed: dict[str, Any] = {
            "label": label,
            "keys": [_maybe_tensor(k) for k in keys],
            "values": [_maybe_tensor(v) for v in values],
            "key_grad": _sum_grad(keys, prefix),
            "value_grad": _sum_grad(values, prefix),
            "half_keys": [_maybe_tensor(layer.keys) for layer in half.layers],
            "half_values": [_maybe_tensor(layer.values) for layer in half.layers],
        }
        if not keys or not isinstance(keys[0], torch.Tensor) or keys[0].shape[0] != b:
            observed.update(same_object=False, second_len=None)  # the shape is judged first
        else:
            shape = (b, keys[0].shape[1], 1, keys[0].shape[-1])
            try:
                cache.update(torch.zeros(shape), torch.zeros(shape), 0)
            except Exception as err:  # noqa: BLE001 - reported as the student's failure
                raise AssertionError(
                    f"{label}: appending to the cache failed ({type(err).__name__}: {err}): "
                    "build it with DynamicCache() and cache.update(key, value, layer_idx)"
                ) from None
            again = _cache(label, build_prefix_cache, prefix, b, torch.float32)
            first = again.layers[0].keys if again.layers else None
            observed.update(
                same_object=again is cache,
                second_len=first.shape[-2] if isinstance(first, torch.Tensor) else None,
            )
        models.append(observed)
    return {"models": models}


def judge_build_prefix_cache(obs: Observed) -> None:
    b, p = _B_CACHE, _P_CACHE
    for label, model, o in _per_model(obs):
        n_layers, h, dim, _, _ = _geometry(model)
        prefix = _grader_values(model, p, 10)
        keys, values = o.list("keys"), o.list("values")
        if len(keys) != n_layers or len(values) != n_layers:
            raise AssertionError(
                f"{label}: the cache has {len(keys)} layers, expected {n_layers}: add the prefix "
                "to EVERY layer"
            )
        for i, (key, value) in enumerate(zip(keys, values, strict=True)):
            if (
                not isinstance(key, torch.Tensor)
                or not isinstance(value, torch.Tensor)
                or (tuple(key.shape) != (b, h, p, dim) or tuple(value.shape) != (b, h, p, dim))
            ):
                raise AssertionError(
                    f"{label}: layer {i}: keys {describe(key)}, values {describe(value)}, "
                    f"expected ({b}, {h}, {p}, {dim}) (B, H_kv, P, D): expand prefix[layer, 0] "
                    "(keys) and prefix[layer, 1] (values) over the batch"
                )
            want_k = prefix[i, 0].expand(b, -1, -1, -1)
            want_v = prefix[i, 1].expand(b, -1, -1, -1)
            if torch.equal(key, want_v) and torch.equal(value, want_k):
                raise AssertionError(
                    f"{label}: layer {i}: keys and values are swapped: prefix[:, 0] are the "
                    "keys, prefix[:, 1] the values"
                )
            if not (torch.equal(key, want_k) and torch.equal(value, want_v)):
                raise AssertionError(
                    f"{label}: layer {i}: the cache does not hold prefix[{i}, 0] as keys and "
                    f"prefix[{i}, 1] as values for every batch row"
                )
        shape = tuple(prefix.shape)
        grads = {"keys": o.tensor("key_grad", shape), "values": o.tensor("value_grad", shape)}
        for kv, name in enumerate(("keys", "values")):
            want = torch.zeros(shape)
            want[:, kv] = b
            dead = [i for i in range(n_layers) if not grads[name][i, kv].abs().min() > 0]
            if dead:
                raise AssertionError(
                    f"{label}: no gradient reaches prefix[layer, {kv}] from the cached {name} of "
                    f"layers {dead}: the cache must hold (views of) the prefix itself, not a "
                    "detached copy"
                )
            if max_diff(grads[name], want) > 1e-6:
                raise AssertionError(
                    f"{label}: the gradient of the cached {name} with respect to the prefix is "
                    f"not that of prefix[:, {kv}] expanded over the batch (max |diff| "
                    f"{max_diff(grads[name], want):.3g})"
                )
        half_keys, half_values = o.list("half_keys"), o.list("half_values")
        if len(half_keys) != n_layers or len(half_values) != n_layers:
            raise AssertionError(
                f"{label}: build_prefix_cache(prefix, {b}, torch.bfloat16) has "
                f"{len(half_keys)} layers, expected {n_layers}"
            )
        for i, (half_key, half_value) in enumerate(zip(half_keys, half_values, strict=True)):
            if (
                not isinstance(half_key, torch.Tensor)
                or half_key.dtype != torch.bfloat16
                or not isinstance(half_value, torch.Tensor)
                or half_value.dtype != torch.bfloat16
            ):
                raise AssertionError(
                    f"{label}: build_prefix_cache(prefix, {b}, torch.bfloat16) holds "
                    f"{describe(half_key)} keys at layer {i}, expected torch.bfloat16: cast the "
                    "prefix to `dtype` (a float32 prefix breaks a bfloat16 model's attention)"
                )
            want_half = prefix[i].to(torch.bfloat16)
            if tuple(half_key.shape) != (b, h, p, dim) or not (
                torch.equal(half_key, want_half[0].expand(b, -1, -1, -1))
                and torch.equal(half_value, want_half[1].expand(b, -1, -1, -1))
            ):
                raise AssertionError(
                    f"{label}: in bfloat16, layer {i} of the cache is not prefix[{i}] cast to "
                    "bfloat16"
                )
        second = None if o.raw("second_len") is None else o.int("second_len")
        if o.bool("same_object") or second != p:
            raise AssertionError(
                f"{label}: a second call returned a cache that already holds {second} positions "
                f"in layer 0 (expected {p}): the model appends to a cache in place, so build a "
                "NEW DynamicCache every call"
            )


def check_build_prefix_cache(build_prefix_cache: Callable) -> None:
    """build_prefix_cache: a NEW DynamicCache per call holding every layer's keys and values as
    (B, H_kv, P, D), in the requested dtype, with gradients flowing back to the prefix."""
    run_check(observe_build_prefix_cache, judge_build_prefix_cache, build_prefix_cache)


# ---------------------------------------------------------------------------------------------
# prefix_forward: observing a call
# ---------------------------------------------------------------------------------------------
def _run_recorded(model: nn.Module, what: str, fn: Callable, *args) -> tuple[Recording, Any, Any]:
    """``(recording, output, failure)``: the call's failure is returned, not raised, so that
    what the layers saw before it can be reported first."""
    with record(model) as rec:
        try:
            return rec, student_call(what, fn, *args), None
        except CheckFailure as failure:
            return rec, None, failure


def _grad_of(scalar: torch.Tensor, param: nn.Parameter) -> torch.Tensor | None:
    """d ``scalar`` / d ``param`` (zeros where there is no path; None if autograd fails)."""
    if not scalar.requires_grad:
        return torch.zeros_like(param)
    try:
        (g,) = torch.autograd.grad(scalar, param, allow_unused=True, retain_graph=True)
    except RuntimeError:
        return None
    return torch.zeros_like(param) if g is None else g.detach()


def _observe_call(
    model: nn.Module,
    what: str,
    fn: Callable,
    args: tuple,
    param: nn.Parameter,
    p: int,
    paths: bool = False,
    backward: bool = False,
) -> dict:
    """One recorded call of ``fn(*args)``: what every layer's attention received (keys and
    values included) and the output's logits and loss. With ``paths``, per layer the gradients
    of the sum of the first ``p`` keys and of the first ``p`` values (separately) with respect
    to the grader's prefix ``param``; with ``backward``, the loss's gradient with respect to
    ``param`` and the error ``loss.backward()`` raised (None when it worked)."""
    rec, out, failure = _run_recorded(model, what, fn, *args)
    loss = getattr(out, "loss", None)
    data: dict[str, Any] = {
        "failure": None if failure is None else str(failure),
        "recording": rec.to_data(keys=True),
        "logits": _maybe_tensor(getattr(out, "logits", None)),
        "loss": _maybe_tensor(loss),
    }
    if paths:
        key_grads, value_grads = [], []
        for i in range(_geometry(model)[0]):
            calls = rec.layer_calls(i)
            key_grads.append(_grad_of(calls[0].key[:, :, :p].sum(), param) if calls else None)
            value_grads.append(_grad_of(calls[0].value[:, :, :p].sum(), param) if calls else None)
        data["key_grads"], data["value_grads"] = key_grads, value_grads
    if backward:
        data["loss_grad"] = data["backward_error"] = None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            data["loss_grad"] = _grad_of(loss.sum(), param)
            try:
                loss.sum().backward()
            except RuntimeError as err:
                data["backward_error"] = (str(err).splitlines() or ["RuntimeError"])[0]
    return data


# ---------------------------------------------------------------------------------------------
# prefix_forward: judging a call
# ---------------------------------------------------------------------------------------------
@dataclass
class _Seen:
    """One recorded attention call, read from an observation."""

    layer: int
    query_len: int
    key_len: int
    key: torch.Tensor | None
    value: torch.Tensor | None
    visible: torch.Tensor | None


def _seen(o: Observed, keys: bool = True) -> list[_Seen]:
    """The recorded attention calls of call observation ``o``, validated."""
    calls = []
    for c in o.sub("recording").subs("calls"):
        q, k = c.int("query_len"), c.int("key_len")
        key = value = None
        if keys:
            key, value = c.tensor("key"), c.tensor("value")
            if key.dim() != 4 or value.dim() != 4 or key.shape[-2] != k:
                raise MalformedObservation("recorded keys/values do not fit their lengths")
        visible = c.maybe_tensor("visible")
        if visible is not None and (visible.dtype != torch.bool or visible.dim() != 3):
            raise MalformedObservation("recorded mask is not a boolean (B, Tq, Tk) tensor")
        calls.append(_Seen(c.int("layer"), q, k, key, value, visible))
    return calls


def _first_calls(calls: list[_Seen]) -> dict[int, _Seen]:
    first: dict[int, _Seen] = {}
    for call in calls:
        first.setdefault(call.layer, call)
    return first


def _layers_saw_prefix(label: str, first: dict[int, _Seen], n_layers: int, p: int, t: int) -> None:
    """Every layer: ``T`` queries against ``P + T`` keys."""
    for i in range(n_layers):
        call = first.get(i)
        if call is None:
            continue
        if call.query_len == call.key_len == p + t:
            raise AssertionError(
                f"{label}: layer {i}: attention saw {p + t} queries and {p + t} keys: the prefix "
                "entered as input embeddings (that is prompt tuning). Prefix tuning hands it to "
                "every layer as keys/values (a cache); the queries are the T tokens only"
            )
        if call.query_len != t or call.key_len != p + t:
            hint = (
                "the cache holds more than the prefix: a cache kept from an earlier call still "
                "holds that call's tokens (the model appends to it) — build a fresh cache in "
                "every call"
                if call.key_len > p + t
                else "is the prefix added to every layer's cache?"
            )
            raise AssertionError(
                f"{label}: layer {i}: attention saw {call.key_len} keys for {call.query_len} "
                f"queries, expected {p + t} keys ({p} prefix + {t} tokens) for {t} queries — "
                f"{hint}"
            )


def _prefix_matches(
    label: str,
    first: dict[int, _Seen],
    values: torch.Tensor,
    b: int,
    own: torch.Tensor | None = None,
) -> None:
    """Layer ``l`` received ``values[l, 0]`` as prefix keys and ``values[l, 1]`` as values,
    compared across all layers: a layer that got another layer's prefix is named."""
    p = values.shape[3]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(values.shape[0]):
        call = first[i]
        want_shape = (b, values.shape[2], call.key_len, values.shape[4])
        if tuple(call.key.shape) != want_shape:
            raise AssertionError(
                f"{label}: layer {i}: attention received keys of shape {tuple(call.key.shape)}, "
                f"expected {want_shape} (B, H_kv, P+T, D)"
            )
        if call.value.shape != call.key.shape:
            raise MalformedObservation(f"layer {i}: recorded values do not match the keys")
        keys, vals = call.key[:, :, :p], call.value[:, :, :p]
        dtype = keys.dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        want_k = values[i, 0].to(dtype).expand(b, -1, -1, -1)
        want_v = values[i, 1].to(dtype).expand(b, -1, -1, -1)
        if not (keys.abs().sum() > 0 or vals.abs().sum() > 0):
            raise AssertionError(
                f"{label}: layer {i}: the prefix keys and values are all zeros, expected "
                f"encoder()[{i}] — every layer needs its own slice of the prefix"
            )
        for j, (other_k, other_v) in enumerate(seen):
            if torch.allclose(keys, other_k, atol=tol) and torch.allclose(vals, other_v, atol=tol):
                raise AssertionError(
                    f"{label}: layer {i} received the same prefix keys and values as layer {j}: "
                    f"one prefix shared by several layers. Layer {i} must get its own "
                    f"encoder()[{i}]"
                )
        if torch.allclose(keys, want_v, atol=tol) and torch.allclose(vals, want_k, atol=tol):
            raise AssertionError(
                f"{label}: layer {i}: keys and values are swapped: encoder()[:, 0] are the keys"
            )
        if not (torch.allclose(keys, want_k, atol=tol) and torch.allclose(vals, want_v, atol=tol)):
            hint = ""
            if own is not None and torch.allclose(
                keys, own[i, 0].to(dtype).expand(b, -1, -1, -1), atol=tol
            ):
                hint = (
                    " They are your encoder's parameters as built: call encoder() to get the "
                    "prefix (a reparameterised encoder has no such parameter)."
                )
            for j in range(values.shape[0]):
                if j != i and torch.allclose(
                    keys, values[j, 0].to(dtype).expand(b, -1, -1, -1), atol=tol
                ):
                    hint = f" They are encoder()[{j}]: layer {i} must get encoder()[{i}]."
            diff = max(max_diff(keys, want_k), max_diff(vals, want_v))
            raise AssertionError(
                f"{label}: layer {i}: the prefix keys/values differ from encoder()[{i}, 0] / "
                f"encoder()[{i}, 1] (max |diff| {diff:.3g}): layer l's cache must hold "
                f"encoder()[l], laid out (B, H_kv, P, D).{hint}"
            )
        seen.append((keys, vals))


def _gradient_paths(label: str, o: Observed, values: torch.Tensor, b: int) -> None:
    """For every layer, the prefix keys and (separately) the prefix values have the gradient
    of ``values[l, 0]`` / ``values[l, 1]`` expanded over the batch."""
    n_layers = values.shape[0]
    shape = tuple(values.shape)
    key_grads = o.list("key_grads", n_layers)
    value_grads = o.list("value_grads", n_layers)
    for i in range(n_layers):
        for kv, name, grads in ((0, "keys", key_grads), (1, "values", value_grads)):
            if not isinstance(grads[i], torch.Tensor) or tuple(grads[i].shape) != shape:
                raise MalformedObservation(f"layer {i}: the recorded {name} gradient is missing")
            want = torch.zeros(shape)
            want[i, kv] = b
            got = grads[i]
            if not got[i, kv].abs().sum() > 0:
                raise AssertionError(
                    f"{label}: layer {i}: the prefix {name} have no gradient path to the "
                    f"encoder's output, so training cannot change them — are the {name} "
                    "detached (.detach(), .data, torch.no_grad()) before the cache is built?"
                )
            if max_diff(got, want) > 1e-4:
                raise AssertionError(
                    f"{label}: layer {i}: the gradient of the prefix {name} with respect to "
                    f"encoder() is not that of encoder()[{i}, {kv}] expanded over the batch (max "
                    f"|diff| {max_diff(got, want):.3g}): the cache must hold (views of) "
                    "encoder()'s output itself"
                )


def _mask_check(
    label: str, visible: torch.Tensor | None, attention_mask: torch.Tensor, p: int
) -> None:
    """The mask layer 0 received, ``(B, T, P+T)`` booleans: every real token sees the prefix
    and the real tokens before it."""
    b, t = attention_mask.shape
    if visible is None:
        raise AssertionError(f"{label}: attention received no mask although the batch is padded")
    if tuple(visible.shape) != (b, t, p + t):
        raise AssertionError(
            f"{label}: attention received a mask of shape {tuple(visible.shape)} (B, T, keys), "
            f"expected ({b}, {t}, {p + t}) — is attention_mask extended by {p} ones in front "
            f"(shape (B, P+T) = ({b}, {p + t}))?"
        )
    mask = attention_mask.bool()
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    want = torch.cat(
        [torch.ones(b, t, p, dtype=torch.bool), causal[None] & mask[:, None, :]], dim=2
    )
    for row in range(b):
        for q in range(t):
            if not mask[row, q]:
                continue
            wrong = (visible[row, q] != want[row, q]).nonzero().flatten().tolist()
            if wrong:
                k = wrong[0]
                what = f"prefix position {k}" if k < p else f"token {k - p}"
                should = "see" if want[row, q, k] else "not see"
                raise AssertionError(
                    f"{label}: row {row}, token {q} should {should} {what}, but the mask says "
                    f"otherwise — is attention_mask extended by {p} ones in front (shape (B, P+T) "
                    f"= ({b}, {p + t})) so that the mask lines up with the cache?"
                )


def _mask_is_extended(label: str, rec: Recording, batch: Batch, p: int) -> None:
    """:func:`_mask_check` on the mask layer 0 received in a live recording."""
    _mask_check(label, rec.layer_calls(0)[0].visible(), batch.attention_mask, p)


def _positions(label: str, positions: list[torch.Tensor], b: int, p: int, t: int) -> None:
    want = torch.arange(p, p + t).expand(b, -1)
    if not positions:
        return
    got = positions[0]
    rows = got.shape[0] if got.dim() == 2 else 1
    if got.dim() not in (1, 2) or got.shape[-1] != t or rows not in (1, b):
        raise AssertionError(
            f"{label}: the model embedded positions of shape {tuple(got.shape)}, expected "
            f"({b}, {t}): one position per real token"
        )
    got = got.expand(b, -1)
    if not torch.equal(got, want):
        hint = ""
        if torch.equal(got, torch.arange(t).expand(b, -1)):
            hint = (
                " — the real tokens come after the P prefix positions (the convention of "
                "transformers and PEFT, which training and serving must share): pass "
                "position_ids = arange(P, P+T) (or none: the model derives them from the cache)"
            )
        raise AssertionError(
            f"{label}: the real tokens took positions {got[0].tolist()}, expected "
            f"{want[0].tolist()}{hint}"
        )


def _logits_match(
    label: str,
    logits: torch.Tensor | None,
    loss: torch.Tensor | None,
    want,
    what: str,
    against: str = "the reference",
    atol: float = _ATOL,
) -> None:
    """The student's ``logits`` and ``loss`` equal ``want``'s (a model output) within ``atol``."""
    if not isinstance(logits, torch.Tensor) or logits.shape != want.logits.shape:
        raise AssertionError(
            f"{label}: {what} returned logits {describe(logits)}, expected "
            f"{tuple(want.logits.shape)} (B, T, vocab): one row per real token"
        )
    diff = max_diff(logits, want.logits)
    if not diff <= atol:
        raise AssertionError(
            f"{label}: {what}: logits differ from {against} given the same prefix values by up "
            f"to {diff:.3g}: check the mask (P ones in front), the positions (P..P+T-1) and "
            "that layer l's cache holds encoder()[l]"
        )
    if want.loss is None:
        return
    if loss is None or loss.numel() != 1 or not abs(loss.item() - want.loss.item()) <= atol:
        shown = None if loss is None or loss.numel() != 1 else round(loss.item(), 6)
        raise AssertionError(
            f"{label}: {what}: loss {shown} differs from {against}'s {want.loss.item():.6f}: "
            "pass labels (B, T) to the model"
        )


@dataclass
class _Output:
    """What a model output offers the comparisons: logits and (maybe) a loss."""

    logits: torch.Tensor
    loss: torch.Tensor | None


def _reference_forward(
    model: nn.Module, values: torch.Tensor, batch: Batch, grad: bool = False
) -> tuple[Any, torch.Tensor | None]:
    """``(output, d loss / d values)`` of the reference ``prefix_forward`` on ``values``."""
    encoder = FixedPrefix(values, trainable=grad)
    args = (batch.input_ids, batch.attention_mask, batch.labels)
    if not grad:
        with torch.no_grad():
            return _reference().prefix_forward(model, encoder, *args), None
    out = _reference().prefix_forward(model, encoder, *args)
    (g,) = torch.autograd.grad(out.loss, encoder.values)
    return out, g


def _loss_grad_matches(label: str, o: Observed, want: torch.Tensor, what: str) -> None:
    """The loss's gradient with respect to ``encoder()`` equals the reference's, element by
    element: every layer's keys and values, separately."""
    got = o.maybe_tensor("loss_grad")
    if got is None or got.shape != want.shape:
        raise AssertionError(f"{label}: {what}: the loss has no gradient with respect to encoder()")
    for i in range(want.shape[0]):
        for kv, name in enumerate(("keys", "values")):
            if want[i, kv].abs().sum() > 0 and not got[i, kv].abs().sum() > 0:
                raise AssertionError(
                    f"{label}: {what}: no gradient of the loss reaches encoder()[{i}, {kv}], "
                    f"layer {i}'s prefix {name}: they have no gradient path to the loss — are "
                    "they detached (.detach(), .data, torch.no_grad()) or never used?"
                )
    diff = max_diff(got, want)
    if not diff <= _GRAD_ATOL:
        raise AssertionError(
            f"{label}: {what}: the loss's gradient with respect to encoder() differs from the "
            f"reference's by up to {diff:.3g}: every layer's prefix must enter that layer's "
            "attention with its graph"
        )


def _judge_call(
    label: str, o: Observed, values: torch.Tensor, batch: Batch, what: str
) -> dict[int, _Seen]:
    """What the layers of one recorded call saw: the right number of keys, then (checked here)
    the failure of the call itself; returns the first call of each layer.

    Empty when no attention call was recorded at all: the student's code switched the model to
    an attention function of its own (a prefix put in front of the keys inside attention, as in
    notebook 05), which the recording cannot see into. The verdict then rests on the logits, the
    loss and its gradient with respect to every layer's keys and values."""
    n_layers, p = values.shape[0], values.shape[3]
    b, t = batch.shape
    first = _first_calls(_seen(o))
    _layers_saw_prefix(label, first, n_layers, p, t)
    failure = o.maybe_str("failure")
    if failure is not None:
        raise CheckFailure(failure)
    missing = [i for i in range(n_layers) if i not in first]
    if first and missing:
        raise AssertionError(f"{label}: {what}: the attention of layers {missing} never ran")
    return first


# ---------------------------------------------------------------------------------------------
# prefix_forward
# ---------------------------------------------------------------------------------------------
_P_FWD = 4
_WHAT_FWD = "prefix_forward(model, encoder, input_ids, attention_mask, labels)"
_AGAIN = "a second prefix_forward call with the same encoder"
_NO_LABELS = "prefix_forward(model, encoder, input_ids, attention_mask) without labels"


_MIXED = (
    "prefix_forward(model, encoder, input_ids, attention_mask) on 3 rows of T = 3 tokens "
    "(fewer than P = 4): one unpadded, one right-padded, one left-padded"
)


def _mixed_batch() -> Batch:
    """3 rows of 3 tokens: row 0 unpadded, row 1 right-padded, row 2 left-padded; no labels."""
    batch = Batch(batch=3, length=3, pad=0, seed=3)
    batch.input_ids[1, 2] = batch.input_ids[2, 0] = 0
    batch.attention_mask[1, 2] = batch.attention_mask[2, 0] = 0
    batch.labels = None
    return batch


def observe_prefix_forward(prefix_forward: Callable, PrefixEncoder: type) -> dict:
    """Per tiny model (frozen), the student's encoder given the grader's prefix values: two
    recorded ``prefix_forward`` calls on a left-padded batch, each with what every layer
    received, the logits, the loss, the gradient paths and whether backward works; then a call
    without labels (its logits), one on a batch of 3 rows shorter than P with both padding
    sides, and the model's logits without a prefix afterwards."""
    p = _P_FWD
    models = []
    for label, model in tiny_models():
        _freeze(model)
        batch = Batch()
        encoder, param, own = _student_encoder(label, PrefixEncoder, model, p, seed=1, n=11)
        args = (model, encoder, batch.input_ids, batch.attention_mask, batch.labels)
        first = _observe_call(model, _WHAT_FWD, prefix_forward, args, param, p, True, True)
        second = _observe_call(model, _AGAIN, prefix_forward, args, param, p, backward=True)
        with torch.no_grad():
            unlabelled = _observe_call(model, _NO_LABELS, prefix_forward, args[:4], param, p)
            mixed = _mixed_batch()
            try:
                out, mixed_failure = (
                    student_call(
                        _MIXED,
                        prefix_forward,
                        model,
                        encoder,
                        mixed.input_ids,
                        mixed.attention_mask,
                    ),
                    None,
                )
            except CheckFailure as failure:  # judged after the calls above: their hints first
                out, mixed_failure = None, str(failure)
            plain = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        models.append(
            {
                "label": label,
                "encoder_values": own,
                "first": first,
                "second": second,
                "unlabelled": unlabelled,
                "mixed_logits": _maybe_tensor(getattr(out, "logits", None)),
                "mixed_failure": mixed_failure,
                "plain_after": _maybe_tensor(plain.logits),
            }
        )
    return {"models": models}


def judge_prefix_forward(obs: Observed) -> None:
    p = _P_FWD
    for label, model, o in _per_model(obs):
        _reference().freeze_backbone(model)
        batch = Batch()
        b, t = batch.shape
        values = _grader_values(model, p, 11)
        own = _own_values(label, model, o, p)
        first = o.sub("first")
        calls = _judge_call(label, first, values, batch, _WHAT_FWD)
        if calls:
            _prefix_matches(label, calls, values, b, own)
            _gradient_paths(label, first, values, b)
            _mask_check(label, calls[0].visible, batch.attention_mask, p)
        _positions(label, first.sub("recording").tensors("positions"), b, p, t)
        want, grad = _reference_forward(model, values, batch, grad=True)
        _logits_match(
            label, first.maybe_tensor("logits"), first.maybe_tensor("loss"), want, "prefix_forward"
        )
        _loss_grad_matches(label, first, grad, "prefix_forward")
        error = first.maybe_str("backward_error")
        if error is not None:
            raise AssertionError(f"{label}: loss.backward() failed: {error}")
        second = o.sub("second")
        _judge_call(label, second, values, batch, _AGAIN)
        _logits_match(
            label, second.maybe_tensor("logits"), second.maybe_tensor("loss"), want, _AGAIN
        )
        error = second.maybe_str("backward_error")
        if error is not None:
            raise AssertionError(
                f"{label}: the second loss.backward() failed ({error}): the second call reused "
                "the first call's cache and graph — build a fresh cache inside every "
                "prefix_forward call"
            )
        _loss_grad_matches(label, second, grad, _AGAIN)
        unlabelled = o.sub("unlabelled")
        _judge_call(label, unlabelled, values, batch, _NO_LABELS)
        logits = unlabelled.maybe_tensor("logits")
        _logits_match(label, logits, None, _Output(want.logits, None), _NO_LABELS)
        mixed = _mixed_batch()
        want_mixed, _ = _reference_forward(model, values, mixed)
        failure = o.maybe_str("mixed_failure")
        if failure is not None:
            raise AssertionError(
                f"{label}: {failure} — it must work for any batch size, either padding side and "
                "T shorter than P"
            )
        got = o.maybe_tensor("mixed_logits")
        real = mixed.attention_mask.bool()
        if got is None or got.shape != want_mixed.logits.shape:
            raise AssertionError(
                f"{label}: {_MIXED} returned logits {describe(got)}, expected "
                f"{tuple(want_mixed.logits.shape)}: one row per input row, one position per token"
            )
        diff = max_diff(got[real], want_mixed.logits[real])
        if not diff <= _ATOL:
            raise AssertionError(
                f"{label}: {_MIXED}: the real tokens' logits differ from the reference by up to "
                f"{diff:.3g}. Build the P mask ones with attention_mask.new_ones(B, P), whatever "
                "the batch size, the padding side or T (which may be shorter than P)"
            )
        with torch.no_grad():
            untouched = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        after = o.maybe_tensor("plain_after")
        if (
            after is None
            or after.shape != untouched.logits.shape
            or not max_diff(after, untouched.logits) <= _ATOL
        ):
            raise AssertionError(
                f"{label}: after prefix_forward returned, the model WITHOUT a prefix gives other "
                "logits: something it installed (a hook, an attention function reading a global "
                "prefix) stays active, and the next request, another tenant's, would use it"
            )


def check_prefix_forward(prefix_forward: Callable, PrefixEncoder: type) -> None:
    """prefix_forward: every layer's attention sees that layer's own P prefix keys/values before
    the T tokens, with a gradient path to the encoder; mask extended, positions P..P+T-1, logits
    and loss equal the reference; a second call and a second backward behave the same."""
    run_check(observe_prefix_forward, judge_prefix_forward, prefix_forward, PrefixEncoder)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
_P_TRAIN = 4


def observe_prefix_training(
    freeze_backbone: Callable, PrefixEncoder: type, prefix_forward: Callable
) -> dict:
    """Per tiny model: the backbone's state and the student's direct encoder's parameters
    before and after 3 steps of the grader's AdamW (:func:`frozen.observe_training`)."""

    def encoder(model: nn.Module) -> nn.Module:
        return _make_encoder(PrefixEncoder, model, _P_TRAIN)

    models = [
        observe_training(label, model, freeze_backbone, encoder, prefix_forward)
        for label, model in tiny_models()
    ]
    return {"models": models}


def judge_prefix_training(obs: Observed) -> None:
    p = _P_TRAIN
    for label, model, o in _per_model(obs):
        n_layers, h, dim, _, _ = _geometry(model)
        judge_training(
            label, model, o,
            expected_trainable=(
                n_layers * 2 * h * p * dim, f"L·2·H_kv·P·D = {n_layers}·2·{h}·{p}·{dim}"
            ),
            what="the prefix encoder",
        )  # fmt: skip


def check_prefix_training(
    freeze_backbone: Callable, PrefixEncoder: type, prefix_forward: Callable
) -> None:
    """Training a direct prefix with the grader's optimizer leaves the backbone bit-identical
    and trains exactly L·2·H_kv·P·D values."""
    run_check(
        observe_prefix_training,
        judge_prefix_training,
        freeze_backbone,
        PrefixEncoder,
        prefix_forward,
    )


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
_P_GEN, _NEW, _T_GEN, _PAD_GEN = 3, 4, 5, 2
_WHAT_GEN = f"generate_with_prefix(model, encoder, input_ids, attention_mask, {_NEW})"


def _rows(batch: Batch) -> list[torch.Tensor]:
    """Each row's real tokens, padding removed: ``(1, T_b)``."""
    return [ids[mask.bool()][None] for ids, mask in zip(batch.input_ids, batch.attention_mask)]


def _teacher_forced(
    forward: Callable, model: nn.Module, encoder: nn.Module, ids: torch.Tensor, new: torch.Tensor
) -> torch.Tensor:
    """Logits ``(1, N, V)`` that predict ``new (1, N)`` when ``ids + new`` (one unpadded row)
    is fed at once."""
    full = torch.cat([ids, new], dim=1)
    with torch.no_grad():
        out = forward(model, encoder, full, torch.ones_like(full))
    return out.logits[:, ids.shape[1] - 1 : -1].detach()


def _greedy_agrees(tokens: torch.Tensor, logits: torch.Tensor, eos: int) -> bool:
    """Whether ``tokens (N,)`` are the argmax of ``logits (N, V)`` (ties within 1e-4 allowed)
    up to and including the first ``eos``."""
    for token, step in zip(tokens.tolist(), logits):
        if step.max() - step[token] > 1e-4:
            return False
        if token == eos:
            break
    return True


def observe_generate_with_prefix(
    generate_with_prefix: Callable, PrefixEncoder: type, prefix_forward: Callable
) -> dict:
    """Per tiny model, the student's encoder given the grader's prefix values: the tokens
    ``generate_with_prefix`` returns for a LEFT-padded batch and, only for a hint, the logits
    the student's own ``prefix_forward`` gives each row (unpadded) teacher-forced on them."""
    p = _P_GEN
    models = []
    for label, model in tiny_models():
        batch = Batch(length=_T_GEN, pad=_PAD_GEN)
        encoder, _, own = _student_encoder(label, PrefixEncoder, model, p, seed=2, n=12)
        new = student_call(
            _WHAT_GEN, generate_with_prefix, model, encoder, batch.input_ids,
            batch.attention_mask, _NEW,
        )  # fmt: skip
        hint: list[torch.Tensor | None] | None = None
        if isinstance(new, torch.Tensor) and new.dim() == 2 and new.shape[0] == batch.shape[0]:
            hint = []
            for row, ids in enumerate(_rows(batch)):
                try:
                    hint.append(
                        _teacher_forced(prefix_forward, model, encoder, ids, new[row : row + 1])
                    )
                except Exception:  # noqa: BLE001 - only a hint; check_prefix_forward reports it
                    hint.append(None)
        models.append(
            {
                "label": label,
                "encoder_values": own,
                "returned": describe(new),
                "new": _maybe_tensor(new),
                "own_forward": hint,
            }
        )
    return {"models": models}


def judge_generate_with_prefix(obs: Observed) -> None:
    ref = _reference()
    p = _P_GEN
    for label, model, o in _per_model(obs):
        batch = Batch(length=_T_GEN, pad=_PAD_GEN)
        ids, t = batch.input_ids, batch.shape[1]
        _own_values(label, model, o, p)
        new = o.maybe_tensor("new")
        if new is None or new.dim() != 2 or new.shape[0] != ids.shape[0]:
            shown = describe(new) if new is not None else o.str("returned")
            raise AssertionError(
                f"{label}: generate_with_prefix returned {shown}, expected the new token ids "
                f"({ids.shape[0]}, <= {_NEW})"
            )
        if new.shape[1] == t + _NEW or (new.shape[1] > t and torch.equal(new[:, :t], ids)):
            raise AssertionError(
                f"{label}: generate_with_prefix returned {new.shape[1]} tokens per row, "
                f"starting with the {t} input tokens: return only the new ones "
                "(out[:, input_ids.shape[1]:])"
            )
        if not 0 < new.shape[1] <= _NEW:
            raise AssertionError(
                f"{label}: generate_with_prefix(..., max_new_tokens={_NEW}) returned "
                f"{new.shape[1]} tokens per row, expected 1..{_NEW}"
            )
        vocab = model.config.vocab_size
        if (
            new.dtype.is_floating_point
            or new.dtype == torch.bool
            or not (0 <= int(new.min()) and int(new.max()) < vocab)
        ):
            raise AssertionError(
                f"{label}: generate_with_prefix returned {describe(new)} with values "
                f"{new.tolist()}, expected token ids in 0..{vocab - 1}"
            )
        new = new.long()
        eos = model.config.eos_token_id
        unfinished = [row for row in range(new.shape[0]) if not (new[row] == eos).any()]
        if new.shape[1] < _NEW and unfinished:
            raise AssertionError(
                f"{label}: generate_with_prefix(..., max_new_tokens={_NEW}) returned "
                f"{new.shape[1]} tokens per row, although rows {unfinished} never produced the "
                f"end-of-sequence token {eos}: generate max_new_tokens tokens unless every row "
                "has finished"
            )
        fixed = FixedPrefix(_grader_values(model, p, 12))
        wants = [
            _teacher_forced(ref.prefix_forward, model, fixed, row_ids, new[row : row + 1])[0]
            for row, row_ids in enumerate(_rows(batch))
        ]
        wrong = [row for row, want in enumerate(wants) if not _greedy_agrees(new[row], want, eos)]
        if not wrong:
            continue
        hint = ""
        padded = [row for row in range(len(wants)) if not batch.attention_mask[row].all()]
        if set(wrong) <= set(padded):
            hint = (
                f" Rows without padding are right, but LEFT-padded rows {wrong} are not: the "
                "mask must be torch.cat([ones(B, P), attention_mask], dim=1) — P ones in front "
                "of the row's own mask, padding zeros included."
            )
        else:
            with torch.no_grad():
                plain = model.generate(
                    input_ids=ids, attention_mask=batch.attention_mask,
                    max_new_tokens=new.shape[1], do_sample=False, pad_token_id=eos,
                )[:, t:]  # fmt: skip
            hint = (
                " They are what the model generates WITHOUT the prefix: pass the fresh prefix "
                "cache to generate under the keyword model.forward accepts "
                "(course.compat.cache_keyword(model))."
                if torch.equal(plain, new)
                else " Is the mask extended by P ones in front (generate derives positions from "
                "it)?"
            )
        own = o.raw("own_forward")
        if isinstance(own, list) and len(own) == len(wants):
            agree = all(
                isinstance(own[row], torch.Tensor)
                and own[row].dim() == 3
                and own[row].shape[1] == new.shape[1]
                and _greedy_agrees(new[row], own[row][0], eos)
                for row in wrong
            )
            if agree:
                hint += (
                    " They agree with YOUR prefix_forward, so fix prefix_forward first "
                    "(check_prefix_forward says how)."
                )
        expected = [want.argmax(-1).tolist() for want in wants]
        raise AssertionError(
            f"{label}: generate_with_prefix produced {new.tolist()}, which are not the greedy "
            "choices of a teacher-forced forward pass of each row (without its padding) with the "
            f"same prefix (expected {expected}).{hint}"
        )


def check_generate_with_prefix(
    generate_with_prefix: Callable, PrefixEncoder: type, prefix_forward: Callable
) -> None:
    """generate_with_prefix: returns only the new tokens, and they are the greedy choices of a
    teacher-forced reference forward with the same prefix.

    The batch is left-padded: each row must continue as it would alone, without its padding. The
    student's ``prefix_forward`` does not decide the verdict; on a failure it tells whether
    the generation at least agrees with it (then the bug is in ``prefix_forward``).
    """
    run_check(
        observe_generate_with_prefix,
        judge_generate_with_prefix,
        generate_with_prefix,
        PrefixEncoder,
        prefix_forward,
    )


# ---------------------------------------------------------------------------------------------
# PEFT, bfloat16
# ---------------------------------------------------------------------------------------------
_P_PEFT = 4


def observe_peft_equivalence(PrefixEncoder: type, prefix_forward: Callable) -> dict:
    """Per tiny model, the student's encoder given the grader's prefix values: the logits and
    loss of ``prefix_forward`` on a left-padded batch."""
    p = _P_PEFT
    models = []
    for label, model in tiny_models():
        batch = Batch()
        encoder, _, own = _student_encoder(label, PrefixEncoder, model, p, seed=3, n=13)
        with torch.no_grad():
            out = student_call(
                _WHAT_FWD, prefix_forward, model, encoder, batch.input_ids, batch.attention_mask,
                batch.labels,
            )  # fmt: skip
        models.append(
            {
                "label": label,
                "encoder_values": own,
                "logits": _maybe_tensor(getattr(out, "logits", None)),
                "loss": _maybe_tensor(getattr(out, "loss", None)),
            }
        )
    return {"models": models}


def judge_peft_equivalence(obs: Observed) -> None:
    from peft import PrefixTuningConfig, get_peft_model

    p = _P_PEFT
    for label, model, o in _per_model(obs):
        _own_values(label, model, o, p)
        batch = Batch()
        values = _grader_values(model, p, 13)
        with torch.no_grad():
            peft_model = get_peft_model(
                model,
                PrefixTuningConfig(
                    task_type="CAUSAL_LM", num_virtual_tokens=p, prefix_projection=False
                ),
            )
            peft_model.prompt_encoder["default"].load_prompt_embeddings(
                _reference().prefix_to_peft_weights(values)
            )
            theirs = peft_model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            )
        _logits_match(
            label, o.maybe_tensor("logits"), o.maybe_tensor("loss"), theirs, "prefix_forward",
            against="PEFT PrefixTuning",
        )  # fmt: skip


def check_peft_equivalence(PrefixEncoder: type, prefix_forward: Callable) -> None:
    """prefix_forward gives the same logits and loss as PEFT's PrefixTuning
    (prefix_projection=False) loaded with the same prefix values."""
    run_check(observe_peft_equivalence, judge_peft_equivalence, PrefixEncoder, prefix_forward)


_P_BF16 = 4
_WHAT_BF16 = "prefix_forward(model_in_bf16, fp32_encoder, input_ids, attention_mask, labels)"


def observe_bf16(prefix_forward: Callable, PrefixEncoder: type) -> dict:
    """Per tiny model cast to bfloat16, the student's float32 encoder given the grader's prefix
    values: one recorded ``prefix_forward`` call (keys and values as attention received them,
    logits, loss) and the dtypes of the encoder's parameters afterwards."""
    p = _P_BF16
    models = []
    for label, model in tiny_models():
        model.to(torch.bfloat16)
        batch = Batch()
        encoder, param, own = _student_encoder(label, PrefixEncoder, model, p, seed=4, n=14)
        args = (model, encoder, batch.input_ids, batch.attention_mask, batch.labels)
        call = _observe_call(model, _WHAT_BF16, prefix_forward, args, param, p)
        dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in encoder.named_parameters()}
        models.append(
            {"label": label, "encoder_values": own, "call": call, "encoder_dtypes": dtypes}
        )
    return {"models": models}


def judge_bf16(obs: Observed) -> None:
    p = _P_BF16
    for label, model, o in _per_model(obs):
        model.to(torch.bfloat16)
        own = _own_values(label, model, o, p)
        batch = Batch()
        b, t = batch.shape
        values = _grader_values(model, p, 14)
        call = o.sub("call")
        for seen in _seen(call):
            if seen.key.dtype != torch.bfloat16 or seen.value.dtype != torch.bfloat16:
                raise AssertionError(
                    f"{label}: layer {seen.layer}: attention got {seen.key.dtype} keys in a "
                    "bfloat16 model — a float32 prefix mixed into the bfloat16 cache; cast "
                    "the prefix to the model's dtype (build_prefix_cache(..., dtype="
                    "model.dtype))"
                )
        calls = _judge_call(label, call, values, batch, _WHAT_BF16)
        dtypes = o.sub("encoder_dtypes")
        if "grader_prefix" not in dtypes.keys():
            raise MalformedObservation(f"{label}: the encoder's dtypes are incomplete")
        cast = [n for n in dtypes.keys() if dtypes.str(n) != "float32"]
        if cast:
            raise AssertionError(
                f"{label}: prefix_forward turned the encoder's parameters {cast} into "
                "bfloat16 (module.to() works in place): cast the prefix TENSOR for the cache, "
                "keep the trainable parameters in float32"
            )
        if calls:
            _prefix_matches(label, calls, values, b, own)
        want, _ = _reference_forward(model, values, batch)
        _logits_match(
            label, call.maybe_tensor("logits"), call.maybe_tensor("loss"), want,
            "prefix_forward in bfloat16", atol=1e-2,
        )  # fmt: skip


def check_bf16(prefix_forward: Callable, PrefixEncoder: type) -> None:
    """A float32 prefix into a bfloat16 model: every layer receives bfloat16 keys/values, the
    encoder stays float32, and the logits match the reference."""
    run_check(observe_bf16, judge_bf16, prefix_forward, PrefixEncoder)
