"""Checks for notebook 02, deep prefix tuning in its key/value form: ``PrefixEncoder``,
``build_prefix_cache``, ``prefix_forward``, ``generate_with_prefix``, training, equivalence with
PEFT's PrefixTuning, and a float32 prefix in a bfloat16 model.

Each check runs the student's objects on tiny GPT-2 and Llama-GQA models under a recording
attention implementation, so it sees what every layer's attention received: how many keys for
how many queries, the prefix keys/values themselves (and whether they have a gradient path to a
trainable parameter), the mask and the position ids. Logits are compared with
:mod:`autograder.reference` fed the very same prefix values.

Notation: ``L`` layers, ``H`` key/value heads (``num_key_value_heads`` under GQA), ``P`` prefix
length, ``D`` head dim, ``B`` batch, ``T`` real tokens, ``d`` hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Cache

from autograder import reference
from autograder.checks.frozen import verify_training
from autograder.checks.harness import CheckFailure, describe, max_diff, sandbox, student_call
from autograder.checks.models import Batch, tiny_model, tiny_models
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
]

_ATOL = 1e-5


class FixedPrefix(nn.Module):
    """A stand-in encoder returning given prefix values ``(L, 2, H, P, D)``: lets the reference
    run on exactly the values the student's encoder produced."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.values = values.detach()
        self.prefix_len = values.shape[3]

    def forward(self) -> torch.Tensor:
        return self.values


def _geometry(model: nn.Module) -> tuple[int, int, int, int, int]:
    """``(L, H_kv, D, n_heads, d)`` of ``model``."""
    g = kv_geometry(model.config)
    return g["n_layers"], g["n_kv_heads"], g["head_dim"], g["n_heads"], g["hidden_size"]


def _make_encoder(PrefixEncoder: type, model: nn.Module, prefix_len: int, **kwargs) -> nn.Module:
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return student_call(
        f"PrefixEncoder(config, {prefix_len}{args})", PrefixEncoder, model.config, prefix_len,
        **kwargs,
    )  # fmt: skip


def _prefix_values(
    label: str, model: nn.Module, encoder: nn.Module, p: int, how: str
) -> torch.Tensor:
    """``encoder()``, checked to be ``(L, 2, H_kv, P, D)``."""
    n_layers, h, dim, n_heads, _ = _geometry(model)
    want = (n_layers, 2, h, p, dim)
    values = student_call("encoder()", encoder)
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != want:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else None
        hint = ""
        if shape is not None and len(shape) == 5 and shape[2] == n_heads != h:
            hint = (
                f" — this model uses grouped-query attention: num_key_value_heads={h} < "
                f"num_attention_heads={n_heads}, and the cache holds one key/value per KV head"
            )
        elif shape == (n_layers, 2, p, h, dim):
            hint = " — heads come before prefix positions: (L, 2, H, P, D)"
        elif shape is not None and len(shape) == 5 and shape[4] != dim:
            hint = f" — head_dim is {dim} here (config.head_dim), not hidden_size // n_heads"
        raise AssertionError(
            f"{label}: PrefixEncoder({how})() returned {describe(values)}, expected shape {want} "
            f"(L, 2, H_kv, P, D){hint}"
        )
    return values


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# PrefixEncoder
# ---------------------------------------------------------------------------------------------
def _check_direct(label: str, PrefixEncoder: type, model: nn.Module) -> None:
    n_layers, h, dim, _, _ = _geometry(model)
    p = 5
    encoder = _make_encoder(PrefixEncoder, model, p)
    values = _prefix_values(label, model, encoder, p, f"config, {p}")
    want = n_layers * 2 * h * p * dim
    if _count(encoder) != want:
        raise AssertionError(
            f"{label}: PrefixEncoder(config, {p}) has {_count(encoder)} parameter values, expected "
            f"L·2·H_kv·P·D = {n_layers}·2·{h}·{p}·{dim} = {want}: one key and one value vector "
            "per layer, KV head and prefix position, and nothing else"
        )
    if torch.equal(values[0], values[1]):
        raise AssertionError(
            f"{label}: layers 0 and 1 of the prefix are identical: every layer needs its own "
            "independently initialised prefix"
        )
    again = _make_encoder(PrefixEncoder, model, p)()
    other = _make_encoder(PrefixEncoder, model, p, seed=1)()
    if not torch.equal(again, values) or torch.equal(other, values):
        raise AssertionError(
            f"{label}: PrefixEncoder's initialisation is not determined by `seed` (same seed must "
            "give the same prefix, another seed another one): draw from a seeded torch.Generator"
        )
    small = _make_encoder(PrefixEncoder, model, p, init_std=0.25)().detach().std().item()
    if not 0.15 < small < 0.4:
        raise AssertionError(
            f"{label}: PrefixEncoder(config, {p}, init_std=0.25) has values with std {small:.3f}, "
            "expected about 0.25"
        )
    values.sum().backward()
    missing = [n for n, t in encoder.named_parameters() if t.grad is None]
    if missing or not any(t.requires_grad for t in encoder.parameters()):
        raise AssertionError(
            f"{label}: encoder().sum().backward() leaves no gradient on {missing}: return the "
            "parameter itself (or a view of it), not a detached copy"
        )


def _check_reparam(label: str, PrefixEncoder: type, model: nn.Module) -> None:
    n_layers, h, dim, _, d = _geometry(model)
    p, hidden = 5, 16
    out_dim = n_layers * 2 * h * dim
    how = f"config, {p}, reparam=True, hidden={hidden}"
    encoder = _make_encoder(PrefixEncoder, model, p, reparam=True, hidden=hidden)
    values = _prefix_values(label, model, encoder, p, how)
    mlp = d * hidden + hidden + hidden * out_dim + out_dim
    if _count(encoder) != p * d + mlp:
        raise AssertionError(
            f"{label}: PrefixEncoder({how}) has {_count(encoder)} parameter values, expected "
            f"{p * d + mlp}: P·d = {p * d} prefix embeddings plus the MLP Linear(d={d}, "
            f"{hidden}) -> Tanh -> Linear({hidden}, L·2·H_kv·D = {out_dim}) with biases = {mlp}"
        )
    rows = [t for t in encoder.parameters() if tuple(t.shape) == (p, d)]
    if not rows:
        raise AssertionError(
            f"{label}: PrefixEncoder({how}) has no ({p}, {d}) parameter: the MLP's input is P "
            "trainable embeddings of size d"
        )
    (grad,) = torch.autograd.grad(values[:, :, :, 0].sum(), rows[0], allow_unused=True)
    used = [] if grad is None else grad.abs().sum(-1).nonzero().flatten().tolist()
    if used != [0]:
        raise AssertionError(
            f"{label}: with reparam=True, prefix position 0 (values[:, :, :, 0]) depends on "
            f"embedding rows {used}, expected only row 0: view the MLP output (P, L·2·H·D) as "
            "(P, L, 2, H, D) and permute to (L, 2, H, P, D) — a direct .view(L, 2, H, P, D) "
            "mixes positions, layers and heads"
        )
    plain = student_call("encoder.export()", encoder.export)
    if not isinstance(plain, nn.Module):
        raise AssertionError(
            f"{label}: export() returned {describe(plain)}, expected a PrefixEncoder without MLP"
        )
    exported = student_call("encoder.export()()", plain)
    if not isinstance(exported, torch.Tensor) or exported.shape != values.shape:
        raise AssertionError(
            f"{label}: export()() returned {describe(exported)}, expected {tuple(values.shape)}"
        )
    if max_diff(exported, values) > 1e-6:
        raise AssertionError(
            f"{label}: export() changed the prefix values (max |diff| "
            f"{max_diff(exported, values):.3g}): store the MLP's current output"
        )
    if _count(plain) != n_layers * 2 * h * p * dim:
        raise AssertionError(
            f"{label}: the exported encoder has {_count(plain)} parameter values, expected "
            f"L·2·H_kv·P·D = {n_layers * 2 * h * p * dim}: export() must drop the MLP and the "
            "embeddings and keep only the prefix itself"
        )
    with torch.no_grad():
        for t in encoder.parameters():
            t.add_(1.0)
    if max_diff(student_call("encoder.export()()", plain), values) > 1e-6:
        raise AssertionError(
            f"{label}: changing the original encoder after export() changed the exported prefix: "
            "copy the values (detach().clone()) into the new encoder"
        )


def check_prefix_encoder(PrefixEncoder: type) -> None:
    """PrefixEncoder: (L, 2, H_kv, P, D) prefixes (KV heads under GQA), exactly L·2·H_kv·P·D
    parameters when direct; with reparam=True an MLP over P embeddings, position-preserving,
    and export() gives the same values with no MLP left."""
    with sandbox():
        for label, model in tiny_models():
            _check_direct(label, PrefixEncoder, model)
            _check_reparam(label, PrefixEncoder, model)


# ---------------------------------------------------------------------------------------------
# build_prefix_cache
# ---------------------------------------------------------------------------------------------
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


def check_build_prefix_cache(build_prefix_cache: Callable) -> None:
    """build_prefix_cache: a NEW DynamicCache per call holding every layer's keys and values as
    (B, H_kv, P, D), in the requested dtype, with gradients flowing back to the prefix."""
    b, p = 2, 3
    with sandbox():
        for label, model in tiny_models():
            n_layers, h, dim, _, _ = _geometry(model)
            prefix = torch.randn(n_layers, 2, h, p, dim, requires_grad=True)
            cache = _cache(label, build_prefix_cache, prefix, b, torch.float32)
            if len(cache.layers) != n_layers:
                raise AssertionError(
                    f"{label}: the cache has {len(cache.layers)} layers, expected {n_layers}: add "
                    "the prefix to EVERY layer"
                )
            for i, layer in enumerate(cache.layers):
                keys, values = layer.keys, layer.values
                if tuple(keys.shape) != (b, h, p, dim) or tuple(values.shape) != (b, h, p, dim):
                    raise AssertionError(
                        f"{label}: layer {i}: keys {describe(keys)}, values {describe(values)}, "
                        f"expected ({b}, {h}, {p}, {dim}) (B, H_kv, P, D): expand prefix[layer, 0] "
                        "(keys) and prefix[layer, 1] (values) over the batch"
                    )
                want_k = prefix[i, 0].detach().expand(b, -1, -1, -1)
                want_v = prefix[i, 1].detach().expand(b, -1, -1, -1)
                if torch.equal(keys, want_v) and torch.equal(values, want_k):
                    raise AssertionError(
                        f"{label}: layer {i}: keys and values are swapped: prefix[:, 0] are the "
                        "keys, prefix[:, 1] the values"
                    )
                if not (torch.equal(keys, want_k) and torch.equal(values, want_v)):
                    raise AssertionError(
                        f"{label}: layer {i}: the cache does not hold prefix[{i}, 0] as keys and "
                        f"prefix[{i}, 1] as values for every batch row"
                    )
            total = sum(layer.keys.sum() + layer.values.sum() for layer in cache.layers)
            if not total.requires_grad:
                raise AssertionError(
                    f"{label}: the cached keys/values carry no gradient: do not detach the prefix"
                )
            total.backward()
            dead = [
                (i, kv) for i in range(n_layers) for kv in range(2)
                if prefix.grad is None or not prefix.grad[i, kv].abs().sum() > 0
            ]  # fmt: skip
            if dead:
                raise AssertionError(
                    f"{label}: no gradient reaches prefix[layer, k/v] for {dead}: the cache must "
                    "hold (views of) the prefix itself"
                )
            half = _cache(label, build_prefix_cache, prefix, b, torch.bfloat16)
            if half.layers[0].keys.dtype != torch.bfloat16:
                raise AssertionError(
                    f"{label}: build_prefix_cache(prefix, {b}, torch.bfloat16) holds "
                    f"{half.layers[0].keys.dtype} keys, expected torch.bfloat16: cast the prefix "
                    "to `dtype` (a float32 prefix breaks a bfloat16 model's attention)"
                )
            cache.update(torch.zeros(b, h, 1, dim), torch.zeros(b, h, 1, dim), 0)
            again = _cache(label, build_prefix_cache, prefix, b, torch.float32)
            if again is cache or again.layers[0].keys.shape[-2] != p:
                raise AssertionError(
                    f"{label}: a second call returned a cache that already holds "
                    f"{again.layers[0].keys.shape[-2]} positions in layer 0 (expected {p}): the "
                    "model appends to a cache in place, so build a NEW DynamicCache every call"
                )


# ---------------------------------------------------------------------------------------------
# prefix_forward
# ---------------------------------------------------------------------------------------------
def _run_recorded(model: nn.Module, what: str, fn: Callable, *args) -> tuple[Recording, Any, Any]:
    """``(recording, output, failure)``: the call's failure is returned, not raised, so that
    what the layers saw before it can be reported first."""
    with record(model) as rec:
        try:
            return rec, student_call(what, fn, *args), None
        except CheckFailure as failure:
            return rec, None, failure


def _layers_saw_prefix(label: str, rec: Recording, n_layers: int, p: int, t: int) -> None:
    """Every layer: ``T`` queries against ``P + T`` keys."""
    for i in range(n_layers):
        calls = rec.layer_calls(i)
        if not calls:
            continue
        call = calls[0]
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


def _prefix_matches(label: str, rec: Recording, values: torch.Tensor, b: int) -> None:
    """Layer ``l`` received ``values[l, 0]`` as prefix keys and ``values[l, 1]`` as values."""
    p = values.shape[3]
    seen = []
    for i in range(values.shape[0]):
        call = rec.layer_calls(i)[0]
        keys, vals = call.key[:, :, :p].detach(), call.value[:, :, :p].detach()
        want_k = values[i, 0].detach().to(keys.dtype).expand(b, -1, -1, -1)
        want_v = values[i, 1].detach().to(keys.dtype).expand(b, -1, -1, -1)
        tol = 1e-6 if keys.dtype == torch.float32 else 1e-2
        if not (keys.abs().sum() > 0 or vals.abs().sum() > 0):
            raise AssertionError(
                f"{label}: layer {i}: the prefix keys and values are all zeros, expected "
                f"encoder()[{i}] — every layer needs its own slice of the prefix"
            )
        if i > 0 and torch.allclose(keys, seen[0][0], atol=tol):
            raise AssertionError(
                f"{label}: layer {i} received the same prefix keys as layer 0: one prefix shared "
                f"by all layers. Layer {i} must get its own encoder()[{i}]"
            )
        if torch.allclose(keys, want_v, atol=tol) and torch.allclose(vals, want_k, atol=tol):
            raise AssertionError(
                f"{label}: layer {i}: keys and values are swapped: encoder()[:, 0] are the keys"
            )
        if not (torch.allclose(keys, want_k, atol=tol) and torch.allclose(vals, want_v, atol=tol)):
            diff = max(max_diff(keys, want_k), max_diff(vals, want_v))
            raise AssertionError(
                f"{label}: layer {i}: the prefix keys/values differ from encoder()[{i}, 0] / "
                f"encoder()[{i}, 1] (max |diff| {diff:.3g}): layer l's cache must hold "
                "encoder()[l], laid out (B, H_kv, P, D)"
            )
        seen.append((keys, vals))


def _gradient_paths(label: str, rec: Recording, encoder: nn.Module, n_layers: int, p: int) -> None:
    params = [t for t in encoder.parameters() if t.requires_grad]
    for i in range(n_layers):
        call = rec.layer_calls(i)[0]
        prefix = call.key[:, :, :p].sum() + call.value[:, :, :p].sum()
        grads = []
        if prefix.requires_grad and params:
            grads = torch.autograd.grad(prefix, params, allow_unused=True, retain_graph=True)
        if not any(g is not None and g.abs().sum() > 0 for g in grads):
            raise AssertionError(
                f"{label}: layer {i}: the prefix keys/values have no gradient path to the "
                "encoder's parameters, so training cannot change them — is the prefix detached "
                "(.detach(), .data, torch.no_grad()) before the cache is built?"
            )


def _mask_is_extended(label: str, rec: Recording, batch: Batch, p: int) -> None:
    visible = rec.layer_calls(0)[0].visible()
    b, t = batch.shape
    if visible is None:
        raise AssertionError(f"{label}: attention received no mask although the batch is padded")
    mask = batch.attention_mask.bool()
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


def _positions(label: str, rec: Recording, b: int, p: int, t: int) -> None:
    want = torch.arange(p, p + t).expand(b, -1)
    if not rec.positions:
        return
    got = rec.positions[0]
    if tuple(got.shape[-1:]) != (t,) or not torch.equal(got.expand(b, -1), want):
        hint = ""
        if torch.equal(got.expand(b, -1), torch.arange(t).expand(b, -1)):
            hint = (
                " — the prefix occupies positions 0..P-1, so the real tokens come after it: pass "
                "position_ids = arange(P, P+T) (or none: the model derives them from the cache)"
            )
        raise AssertionError(
            f"{label}: the real tokens took positions {got[0].tolist()}, expected "
            f"{want[0].tolist()}{hint}"
        )


def _logits_match(
    label: str, out, want, what: str, against: str = "the reference", atol: float = _ATOL
) -> None:
    """``out`` (the student's model output) has ``want``'s logits and loss within ``atol``."""
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.shape != want.logits.shape:
        raise AssertionError(
            f"{label}: {what} returned logits {describe(logits)}, expected "
            f"{tuple(want.logits.shape)} (B, T, vocab): one row per real token"
        )
    diff = max_diff(logits, want.logits)
    if diff > atol:
        raise AssertionError(
            f"{label}: {what}: logits differ from {against} given the same prefix values by up "
            f"to {diff:.3g}: check the mask (P ones in front), the positions (P..P+T-1) and "
            "that layer l's cache holds encoder()[l]"
        )
    loss = getattr(out, "loss", None)
    if want.loss is not None and (loss is None or abs(loss.item() - want.loss.item()) > atol):
        raise AssertionError(
            f"{label}: {what}: loss {None if loss is None else round(loss.item(), 6)} differs "
            f"from {against}'s {want.loss.item():.6f}: pass labels (B, T) to the model"
        )


def _call_forward(
    label: str,
    model: nn.Module,
    prefix_forward: Callable,
    encoder: nn.Module,
    p: int,
    batch: Batch,
    what: str,
) -> tuple[Recording, Any]:
    """Run ``prefix_forward`` under recording and check what the layers saw."""
    n_layers = _geometry(model)[0]
    b, t = batch.shape
    rec, out, failure = _run_recorded(
        model, what, prefix_forward, model, encoder, batch.input_ids, batch.attention_mask,
        batch.labels,
    )  # fmt: skip
    _layers_saw_prefix(label, rec, n_layers, p, t)
    if failure is not None:
        raise failure
    missing = [i for i in range(n_layers) if not rec.layer_calls(i)]
    if missing:
        raise AssertionError(f"{label}: {what}: the attention of layers {missing} never ran")
    return rec, out


def check_prefix_forward(prefix_forward: Callable, PrefixEncoder: type) -> None:
    """prefix_forward: every layer's attention sees that layer's own P prefix keys/values before
    the T tokens, with a gradient path to the encoder; mask extended, positions P..P+T-1, logits
    and loss equal the reference; a second call and a second backward behave the same."""
    p = 4
    with sandbox():
        for label, model in tiny_models():
            reference.freeze_backbone(model)
            n_layers = _geometry(model)[0]
            batch = Batch()
            encoder = _make_encoder(PrefixEncoder, model, p, seed=1)
            values = _prefix_values(label, model, encoder, p, f"config, {p}, seed=1")
            what = "prefix_forward(model, encoder, input_ids, attention_mask, labels)"
            rec, out = _call_forward(label, model, prefix_forward, encoder, p, batch, what)
            b, t = batch.shape
            _prefix_matches(label, rec, values, b)
            _gradient_paths(label, rec, encoder, n_layers, p)
            _mask_is_extended(label, rec, batch, p)
            _positions(label, rec, b, p, t)
            with torch.no_grad():
                want = reference.prefix_forward(
                    model, FixedPrefix(values), batch.input_ids, batch.attention_mask, batch.labels
                )
            _logits_match(label, out, want, "prefix_forward")
            try:
                out.loss.backward()
            except RuntimeError as err:
                raise AssertionError(f"{label}: loss.backward() failed: {err}") from err
            again = "a second prefix_forward call with the same encoder"
            _, out2 = _call_forward(label, model, prefix_forward, encoder, p, batch, again)
            _logits_match(label, out2, want, again)
            try:
                out2.loss.backward()
            except RuntimeError as err:
                raise AssertionError(
                    f"{label}: the second loss.backward() failed ({err}): the second call reused "
                    "the first call's cache and graph — build a fresh cache inside every "
                    "prefix_forward call"
                ) from err


# ---------------------------------------------------------------------------------------------
# training, generation, PEFT, bfloat16
# ---------------------------------------------------------------------------------------------
def check_prefix_training(
    freeze_backbone: Callable, PrefixEncoder: type, prefix_forward: Callable
) -> None:
    """Training a direct prefix with the grader's optimizer leaves the backbone bit-identical
    and trains exactly L·2·H_kv·P·D values."""
    p = 4

    def encoder(model: nn.Module) -> nn.Module:
        return _make_encoder(PrefixEncoder, model, p)

    with sandbox():
        for label, model in tiny_models():
            n_layers, h, dim, _, _ = _geometry(model)
            verify_training(
                label, model, freeze_backbone, encoder, prefix_forward,
                expected_trainable=(
                    n_layers * 2 * h * p * dim, f"L·2·H_kv·P·D = {n_layers}·2·{h}·{p}·{dim}"
                ),
                what="the prefix encoder",
            )  # fmt: skip


def _greedy_agrees(tokens: torch.Tensor, logits: torch.Tensor, eos: int) -> bool:
    """Whether each row of ``tokens (B, N)`` is the argmax of ``logits (B, N, V)`` (ties within
    1e-4 allowed) up to and including its first ``eos``."""
    for row, row_logits in zip(tokens, logits):
        for token, step in zip(row.tolist(), row_logits):
            if step.max() - step[token] > 1e-4:
                return False
            if token == eos:
                break
    return True


def _teacher_forced(
    forward: Callable, model: nn.Module, encoder: nn.Module, ids: torch.Tensor, new: torch.Tensor
) -> torch.Tensor:
    """Logits ``(B, N, V)`` that predict ``new (B, N)`` when ``ids + new`` is fed at once."""
    full = torch.cat([ids, new], dim=1)
    with torch.no_grad():
        out = forward(model, encoder, full, torch.ones_like(full))
    return out.logits[:, ids.shape[1] - 1 : -1]


def check_generate_with_prefix(
    generate_with_prefix: Callable, PrefixEncoder: type, prefix_forward: Callable
) -> None:
    """generate_with_prefix: returns only the new tokens, and they are the greedy choices of a
    teacher-forced reference forward with the same prefix.

    The student's ``prefix_forward`` does not decide the verdict; on a failure it tells whether
    the generation at least agrees with it (then the bug is in ``prefix_forward``).
    """
    p, n_new = 3, 4
    with sandbox():
        for label, model in tiny_models():
            batch = Batch(length=5, pad=0)
            ids, t = batch.input_ids, batch.shape[1]
            encoder = _make_encoder(PrefixEncoder, model, p, seed=2)
            values = _prefix_values(label, model, encoder, p, f"config, {p}, seed=2")
            new = student_call(
                f"generate_with_prefix(model, encoder, input_ids, attention_mask, {n_new})",
                generate_with_prefix, model, encoder, ids, batch.attention_mask, n_new,
            )  # fmt: skip
            if not isinstance(new, torch.Tensor) or new.dim() != 2 or new.shape[0] != ids.shape[0]:
                raise AssertionError(
                    f"{label}: generate_with_prefix returned {describe(new)}, expected the new "
                    f"token ids ({ids.shape[0]}, <= {n_new})"
                )
            if new.shape[1] == t + n_new or (new.shape[1] > t and torch.equal(new[:, :t], ids)):
                raise AssertionError(
                    f"{label}: generate_with_prefix returned {new.shape[1]} tokens per row, "
                    f"starting with the {t} input tokens: return only the new ones "
                    "(out[:, input_ids.shape[1]:])"
                )
            if not 0 < new.shape[1] <= n_new:
                raise AssertionError(
                    f"{label}: generate_with_prefix(..., max_new_tokens={n_new}) returned "
                    f"{new.shape[1]} tokens per row, expected 1..{n_new}"
                )
            fixed = FixedPrefix(values)
            want = _teacher_forced(reference.prefix_forward, model, fixed, ids, new)
            if _greedy_agrees(new, want, model.config.eos_token_id):
                continue
            plain = model.generate(
                input_ids=ids, attention_mask=batch.attention_mask, max_new_tokens=new.shape[1],
                do_sample=False, pad_token_id=model.config.eos_token_id,
            )[:, t:]  # fmt: skip
            hint = (
                " They are what the model generates WITHOUT the prefix: pass the fresh prefix "
                "cache to generate under the keyword model.forward accepts "
                "(course.compat.cache_keyword(model))."
                if torch.equal(plain, new)
                else " Is the mask extended by P ones in front (generate derives positions from "
                "it)?"
            )
            try:
                own = _teacher_forced(prefix_forward, model, encoder, ids, new)
            except Exception:  # noqa: BLE001 - only a hint; check_prefix_forward reports it
                own = None
            if own is not None and _greedy_agrees(new, own, model.config.eos_token_id):
                hint += (
                    " They agree with YOUR prefix_forward, so fix prefix_forward first "
                    "(check_prefix_forward says how)."
                )
            raise AssertionError(
                f"{label}: generate_with_prefix produced {new.tolist()}, which are not the greedy "
                "choices of a teacher-forced forward pass with the same prefix (expected "
                f"{want.argmax(-1).tolist()}).{hint}"
            )


def check_peft_equivalence(PrefixEncoder: type, prefix_forward: Callable) -> None:
    """prefix_forward gives the same logits and loss as PEFT's PrefixTuning
    (prefix_projection=False) loaded with the same prefix values."""
    from peft import PrefixTuningConfig, get_peft_model

    p = 4
    with sandbox():
        for label, model in tiny_models():
            batch = Batch()
            encoder = _make_encoder(PrefixEncoder, model, p, seed=3)
            values = _prefix_values(label, model, encoder, p, f"config, {p}, seed=3")
            with torch.no_grad():
                ours = student_call(
                    "prefix_forward(model, encoder, input_ids, attention_mask, labels)",
                    prefix_forward, model, encoder, batch.input_ids, batch.attention_mask,
                    batch.labels,
                )  # fmt: skip
                peft_model = get_peft_model(
                    tiny_model(label),
                    PrefixTuningConfig(
                        task_type="CAUSAL_LM", num_virtual_tokens=p, prefix_projection=False
                    ),
                )
                peft_model.prompt_encoder["default"].load_prompt_embeddings(
                    reference.prefix_to_peft_weights(values.detach())
                )
                theirs = peft_model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    labels=batch.labels,
                )
            _logits_match(label, ours, theirs, "prefix_forward", against="PEFT PrefixTuning")


def check_bf16(prefix_forward: Callable, PrefixEncoder: type) -> None:
    """A float32 prefix into a bfloat16 model: every layer receives bfloat16 keys/values, the
    encoder stays float32, and the logits match the reference."""
    p = 4
    with sandbox():
        for label, model in tiny_models():
            model.to(torch.bfloat16)
            batch = Batch()
            encoder = _make_encoder(PrefixEncoder, model, p, seed=4)
            values = _prefix_values(label, model, encoder, p, f"config, {p}, seed=4")
            what = "prefix_forward(model_in_bf16, fp32_encoder, input_ids, attention_mask, labels)"
            rec, out, failure = _run_recorded(
                model, what, prefix_forward, model, encoder, batch.input_ids,
                batch.attention_mask, batch.labels,
            )  # fmt: skip
            for call in rec.calls:
                if call.key.dtype != torch.bfloat16 or call.value.dtype != torch.bfloat16:
                    raise AssertionError(
                        f"{label}: layer {call.layer}: attention got {call.key.dtype} keys in a "
                        "bfloat16 model — a float32 prefix mixed into the bfloat16 cache; cast "
                        "the prefix to the model's dtype (build_prefix_cache(..., dtype="
                        "model.dtype))"
                    )
            if failure is not None:
                raise failure
            cast = [n for n, t in encoder.named_parameters() if t.dtype != torch.float32]
            if cast:
                raise AssertionError(
                    f"{label}: prefix_forward turned the encoder's parameters {cast} into "
                    "bfloat16 (module.to() works in place): cast the prefix TENSOR for the cache, "
                    "keep the trainable parameters in float32"
                )
            with torch.no_grad():
                want = reference.prefix_forward(
                    model, FixedPrefix(values), batch.input_ids, batch.attention_mask, batch.labels
                )
            _logits_match(label, out, want, "prefix_forward in bfloat16", atol=1e-2)
