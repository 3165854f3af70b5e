"""Checks for notebook 02, the "prepend to the hidden states at every layer" form (VPT-deep
style): ``DeepPrompt`` and ``deep_prompt_forward``.

An *observe* / *judge* pair (see :mod:`autograder.checks.protocol`). Observing builds the
student's ``DeepPrompt`` (its own initial draws are recorded), loads grader-chosen vectors into
its ``weight``, and runs ``deep_prompt_forward`` on the tiny models of the current variant while
recording what every layer's attention received and the hidden states entering and leaving
every layer; it also records the gradient of the loss with respect to ``weight`` and what the
model gives without a prompt afterwards.

Judging rests on behaviour: the logits over the ``P+T`` positions, the loss and its gradient
must equal the reference's on the same vectors, and the model must be unchanged afterwards. The
form of the computation is free. Before every layer ``l > 0`` the prompt positions' hidden
states are replaced by ``weight[l]``, so the keys and values the tokens attend to at layer
``l`` depend on ``weight[l]`` alone: computing them once into a key/value cache (the frozen
layer's projections of ``weight[l]``) and running only the tokens against it is the same
computation. The recordings only explain a failure: a wrong hidden state entering a layer, or a
key/value prefix that is not what the frozen layer computes from its vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from autograder.checks import fixtures
from autograder.checks.harness import describe, max_diff, seeded, student_call
from autograder.checks.models import KINDS, Batch, tiny_models
from autograder.checks.prefix import _grad_of, _maybe_tensor, _pick, _run_recorded
from autograder.checks.protocol import MalformedObservation, Observed, run_check
from autograder.checks.recording import decoder_layers, record
from course.compat import kv_geometry

__all__ = ["check_deep_prompt", "judge_deep_prompt", "observe_deep_prompt"]

_P = 3
_ATOL = 5e-5
"""Logits of the same computation done in another order (hooks, or a precomputed cache)."""
_GRAD_ATOL = 1e-4
_WHAT = "deep_prompt_forward(model, deep, input_ids, attention_mask, labels)"


def _reference():
    """:mod:`autograder.reference`, imported only where the judge needs it (a student package
    replays its stored results, :mod:`autograder.checks.fixtures`)."""
    return fixtures.reference()


class _FixedDeep(nn.Module):
    """The reference's view of a deep prompt: ``weight (L, P, d)`` and ``prompt_len``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.prompt_len = weight.shape[1]


def _grader_weight(model: nn.Module) -> torch.Tensor:
    """The vectors ``(L, P, d)`` the grader loads into the student's ``DeepPrompt``."""
    g = kv_geometry(model.config)
    gen = torch.Generator().manual_seed(seeded(20))
    return torch.randn(g["n_layers"], _P, g["hidden_size"], generator=gen)


def _wide_std() -> float:
    """The ``init_std`` the check passes besides the default (0.25 in variant 0)."""
    return _pick(33, (0.25, 0.1, 0.5))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in decoder_layers(model))


# ---------------------------------------------------------------------------------------------
# observe
# ---------------------------------------------------------------------------------------------
def _weight_of(deep: Any) -> torch.Tensor | None:
    weight = getattr(deep, "weight", None)
    return weight.detach().clone() if isinstance(weight, torch.Tensor) else None


def observe_deep_prompt(DeepPrompt: type, deep_prompt_forward: Callable) -> dict:
    """Per tiny model (frozen): the student's ``DeepPrompt(config, 3)`` initial weight (and with
    the same seed again, ``seed=1``, a larger ``init_std``) and parameter count; then, with the
    grader's vectors loaded into its weight, one recorded ``deep_prompt_forward`` on a
    left-padded batch (attention calls, hidden states, logits, loss, the loss's gradient with
    respect to the weight) and the model's logits without a prompt afterwards."""
    p = _P
    models = []
    for label, model in tiny_models():
        for t in model.parameters():
            t.requires_grad_(False)
        g = kv_geometry(model.config)
        n_layers, d = g["n_layers"], g["hidden_size"]
        deep = student_call(f"DeepPrompt(config, {p})", DeepPrompt, model.config, p)
        weight = getattr(deep, "weight", None)
        if not isinstance(weight, nn.Parameter) or tuple(weight.shape) != (n_layers, p, d):
            raise AssertionError(
                f"{label}: DeepPrompt(config, {p}).weight is {describe(weight)}, expected an "
                f"nn.Parameter of shape {(n_layers, p, d)} (L, P, d): P vectors per layer"
            )
        observed: dict[str, Any] = {
            "label": label,
            "init": weight.detach().clone(),
            "count": sum(t.numel() for t in deep.parameters()),
        }
        wide = {"init_std": _wide_std()}
        for key, kwargs in (("again", {}), ("other", {"seed": 1}), ("wide", wide)):
            args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
            call = f"DeepPrompt(config, {p}{args})"
            observed[key] = _weight_of(student_call(call, DeepPrompt, model.config, p, **kwargs))
        with torch.no_grad():
            weight.copy_(_grader_weight(model))
        batch = Batch()
        hooks = _hook_count(model)
        rec, out, failure = _run_recorded(
            model, _WHAT, deep_prompt_forward, model, deep, batch.input_ids,
            batch.attention_mask, batch.labels,
        )  # fmt: skip
        loss = getattr(out, "loss", None)
        scalar = isinstance(loss, torch.Tensor) and loss.numel() == 1
        observed.update(
            failure=None if failure is None else str(failure),
            recording=rec.to_data(keys=True, hidden=True),
            logits=_maybe_tensor(getattr(out, "logits", None)),
            loss=_maybe_tensor(loss),
            grad=_grad_of(loss.sum(), weight) if scalar else None,
            hooks_left=_hook_count(model) - hooks,
        )
        with torch.no_grad():
            after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        observed["after"] = _maybe_tensor(getattr(after, "logits", None))
        models.append(observed)
    return {"models": models}


# ---------------------------------------------------------------------------------------------
# judge
# ---------------------------------------------------------------------------------------------
def _judge_init(label: str, o: Observed, n_layers: int, d: int) -> None:
    p = _P
    shape = (n_layers, p, d)
    init = o.tensor("init")
    if tuple(init.shape) != shape:
        raise AssertionError(
            f"{label}: DeepPrompt(config, {p}).weight is {describe(init)}, expected an "
            f"nn.Parameter of shape {shape} (L, P, d): P vectors per layer"
        )
    count = o.int("count")
    if count != init.numel():
        raise AssertionError(
            f"{label}: DeepPrompt has {count} parameter values, expected L·P·d = {init.numel()}"
        )
    for i in range(n_layers):
        for j in range(i):
            if torch.equal(init[i], init[j]):
                raise AssertionError(
                    f"{label}: DeepPrompt's vectors of layers {j} and {i} are identical: every "
                    "layer needs its own independently drawn vectors"
                )
    again, other, wide = (o.maybe_tensor(k) for k in ("again", "other", "wide"))
    if (
        again is None
        or other is None
        or again.shape != shape
        or other.shape != shape
        or (not torch.equal(again, init) or torch.equal(other, init))
    ):
        raise AssertionError(
            f"{label}: DeepPrompt's initialisation is not determined by `seed` (same seed must "
            "give the same vectors, another seed others): draw from a seeded torch.Generator"
        )
    std = init.float().std().item()
    if not 0.012 < std < 0.03:
        raise AssertionError(
            f"{label}: DeepPrompt(config, {p}) has vectors with std {std:.4f}, expected about "
            "0.02 (init_std defaults to 0.02): a normal draw times init_std"
        )
    want = _wide_std()
    if (
        wide is None
        or wide.shape != shape
        or not (0.6 * want < wide.float().std().item() < 1.6 * want)
    ):
        shown = "?" if wide is None or wide.numel() < 2 else f"{wide.float().std().item():.3f}"
        raise AssertionError(
            f"{label}: DeepPrompt(config, {p}, init_std={want}) has vectors with std {shown}, "
            f"expected about {want}"
        )


def _reference_run(model: nn.Module, weight: torch.Tensor, batch: Batch):
    """``(output, d loss / d weight, recording)`` of the reference on ``weight``."""
    deep = _FixedDeep(weight)
    with record(model) as rec:
        out = _reference().deep_prompt_forward(
            model, deep, batch.input_ids, batch.attention_mask, batch.labels
        )
    (grad,) = torch.autograd.grad(out.loss, deep.weight)
    return out, grad, rec


def _explain_kv_prefix(label: str, calls: list[Observed], rec, p: int) -> None:
    """A call with more keys than queries is a key/value prefix: its first ``p`` keys/values
    must be what the frozen layer computes from its vectors (the reference's prompt keys)."""
    for c in calls:
        q, k = c.int("query_len"), c.int("key_len")
        if k <= q:
            continue
        layer = c.int("layer")
        ref = rec.layer_calls(layer)
        if not ref:
            raise MalformedObservation(f"a call of layer {layer}, which the model does not have")
        want_k, want_v = ref[0].key[:, :, :p].detach(), ref[0].value[:, :, :p].detach()
        key, value = c.tensor("key"), c.tensor("value")
        if key.dim() != 4 or value.dim() != 4:
            raise MalformedObservation(f"layer {layer}: recorded keys/values are not 4-D")
        key, value = key[:, :, :p], value[:, :, :p]
        if key.shape != want_k.shape or value.shape != want_v.shape:
            raise AssertionError(
                f"{label}: layer {layer}: attention received a key/value prefix of shape "
                f"{tuple(key.shape)}, expected {tuple(want_k.shape)} (B, H_kv, P, D)"
            )
        diff = max(max_diff(key, want_k), max_diff(value, want_v))
        if diff > 1e-4:
            raise AssertionError(
                f"{label}: layer {layer}: attention received a key/value prefix that is not what "
                f"layer {layer} computes from deep.weight[{layer}] (max |diff| {diff:.3g}). The "
                "vectors are hidden states: the frozen layer's norm and key/value projections "
                "(and, at layer 0, the position embeddings) turn them into the keys and values "
                "the tokens attend to — feed them to the layer, or precompute exactly those"
            )


def _explain_hidden(label: str, o: Observed, rec, weight: torch.Tensor, b: int, t: int) -> None:
    """Hidden-state form: the states entering each layer, compared with the reference's."""
    p, n_layers = _P, weight.shape[0]
    recording = o.sub("recording")
    inputs, outputs = recording.sub("layer_inputs"), recording.sub("layer_outputs")
    for i in range(n_layers):
        if not inputs.has(str(i)) or not inputs.tensors(str(i)):
            raise AssertionError(f"{label}: layer {i} never ran")
        seen = inputs.tensors(str(i))[0]
        want = rec.layer_inputs[i][0].detach()
        if seen.shape != want.shape:
            raise AssertionError(
                f"{label}: layer {i} received hidden states {describe(seen)}, expected "
                f"{tuple(want.shape)} (B, P+T, d): prepend the P vectors of layer 0 to the token "
                "embeddings"
            )
        if torch.allclose(seen, want, atol=1e-5):
            continue
        if i == 0:
            raise AssertionError(
                f"{label}: layer 0 did not receive deep.weight[0] as the first {p} input "
                "embeddings followed by the tokens' (max |diff| "
                f"{max_diff(seen, want):.3g}): pass inputs_embeds = cat(weight[0] per row, token "
                "embeddings)"
            )
        before = outputs.tensors(str(i - 1)) if outputs.has(str(i - 1)) else []
        prev = before[0] if before else None
        vec = weight[i].expand(b, -1, -1)
        if torch.allclose(seen[:, :p], vec, atol=1e-6):
            raise AssertionError(
                f"{label}: layer {i}: the hidden states at the token positions P.. are not "
                f"layer {i - 1}'s outputs: replace only the first P positions"
            )
        if prev is not None and prev.shape == seen.shape:
            if torch.allclose(seen[:, :p], prev[:, :p] + vec, atol=1e-5):
                hint = (
                    f"it is layer {i - 1}'s output PLUS deep.weight[{i}]: replace the prompt "
                    "positions, don't add to them"
                )
            elif torch.allclose(seen[:, :p], prev[:, :p], atol=1e-6):
                hint = (
                    f"it is still layer {i - 1}'s output there: only the first layer got its "
                    "vectors (that is prompt tuning) — replace the prompt positions before "
                    "every layer > 0"
                )
            else:
                hint = f"max |diff| {max_diff(seen[:, :p], vec):.3g}"
        else:
            hint = f"max |diff| {max_diff(seen[:, :p], vec):.3g}"
        raise AssertionError(
            f"{label}: layer {i}: the hidden states at the {p} prompt positions are not "
            f"deep.weight[{i}] — {hint}"
        )


def _judge_forward(label: str, model: nn.Module, o: Observed) -> None:
    p = _P
    batch = Batch()
    b, t = batch.shape
    weight = _grader_weight(model)
    want, want_grad, rec = _reference_run(model, weight, batch)
    failure = o.maybe_str("failure")
    if failure is not None:
        raise AssertionError(failure)
    logits = o.maybe_tensor("logits")
    right_shape = logits is not None and logits.shape == want.logits.shape
    diff = max_diff(logits, want.logits) if right_shape else float("inf")
    if not diff <= _ATOL:
        calls = o.sub("recording").subs("calls")
        _explain_kv_prefix(label, calls, rec, p)
        if not right_shape:
            hint = ""
            if logits is not None and logits.dim() == 3 and logits.shape[1] == t:
                hint = (
                    ": the logits of the P prompt positions are missing (the last one predicts "
                    "the first token, so the loss needs it)"
                )
            raise AssertionError(
                f"{label}: deep_prompt_forward returned logits {describe(logits)}, expected "
                f"{tuple(want.logits.shape)} (B, P+T, vocab){hint}"
            )
        if calls and all(c.int("query_len") == c.int("key_len") == p + t for c in calls):
            _explain_hidden(label, o, rec, weight, b, t)
        elif calls and not any(c.int("key_len") > c.int("query_len") for c in calls):
            c = calls[0]
            raise AssertionError(
                f"{label}: layer {c.int('layer')}: attention saw {c.int('query_len')} positions, "
                f"expected P+T = {p + t}: prepend the P vectors of layer 0 to the token "
                "embeddings"
            )
        raise AssertionError(
            f"{label}: logits differ from the reference given the same vectors by up to {diff:.3g}"
        )
    loss = o.maybe_tensor("loss")
    if loss is None or loss.numel() != 1 or not abs(loss.item() - want.loss.item()) <= _ATOL:
        shown = None if loss is None or loss.numel() != 1 else round(loss.item(), 6)
        raise AssertionError(
            f"{label}: the loss {shown} differs from the reference's {want.loss.item():.6f} "
            "although the logits agree: the labels must be (B, P+T), -100 over the P prompt "
            "positions followed by the given labels"
        )
    grad = o.maybe_tensor("grad")
    if grad is None or grad.shape != want_grad.shape:
        raise AssertionError(f"{label}: the loss has no gradient with respect to deep.weight")
    dead = [i for i in range(weight.shape[0]) if not grad[i].abs().sum() > 0]
    if dead:
        raise AssertionError(
            f"{label}: no gradient reaches the vectors of layers {dead}: they must enter "
            "the computation through the graph (no .detach() or .data)"
        )
    if not max_diff(grad, want_grad) <= _GRAD_ATOL:
        raise AssertionError(
            f"{label}: the loss's gradient with respect to deep.weight differs from the "
            f"reference's by up to {max_diff(grad, want_grad):.3g}"
        )
    with torch.no_grad():
        plain = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    after = o.maybe_tensor("after")
    if after is None or after.shape != plain.shape or not max_diff(after, plain) <= 1e-5:
        left = o.int("hooks_left")
        raise AssertionError(
            f"{label}: after deep_prompt_forward returned, the model WITHOUT a prompt gives "
            f"other logits ({left} hooks were left on the decoder layers): remove every hook "
            "before returning (handle.remove() in a finally block), or every later forward pass "
            "is altered"
        )


def judge_deep_prompt(obs: Observed) -> None:
    for (label, model), o in zip(tiny_models(), obs.subs("models", len(KINDS)), strict=True):
        if o.str("label") != label:
            raise MalformedObservation(f"observation for {o.str('label')!r}, expected {label!r}")
        _reference().freeze_backbone(model)
        g = kv_geometry(model.config)
        _judge_init(label, o, g["n_layers"], g["hidden_size"])
        _judge_forward(label, model, o)


def check_deep_prompt(DeepPrompt: type, deep_prompt_forward: Callable) -> None:
    """DeepPrompt + deep_prompt_forward: (L, P, d) vectors; layer 0 gets weight[0] as input
    embeddings and every later layer's prompt positions are REPLACED by its own weight[l] (by
    hooks, or as the key/value cache those vectors give); every layer's vectors get a gradient;
    labels extended; hooks removed."""
    run_check(observe_deep_prompt, judge_deep_prompt, DeepPrompt, deep_prompt_forward)
