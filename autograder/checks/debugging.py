"""Checks for notebook 05, the debugging lab.

Most fixes in the lab are graded by the checks of notebook 02 and the freezing checks
(``check_build_prefix_cache``, ``check_prefix_forward``, ``check_bf16``,
``check_freeze_backbone``, ``check_prefix_training``). The one new behaviour is a deep prefix
that survives **gradient checkpointing**: checkpointing recomputes every layer during backward
and drops a key/value cache passed to ``forward`` (transformers logs "Caching is incompatible
with gradient checkpointing"), so a cache-based prefix crashes with a size mismatch.

:func:`check_checkpointed_prefix_forward` is an *observe* / *judge* pair (see
:mod:`autograder.checks.protocol`). Observing runs the student's function on the tiny GPT-2 and
Llama-GQA models of the current variant, training with gradient checkpointing, twice, each time
with the student's encoder given other grader-chosen prefix values; it records the logits, the
loss, the gradient that ``loss.backward()`` leaves on the prefix (or the error it raised) and,
at the end, whether checkpointing is still on and what the model gives without a prefix.
Judging compares them with the reference ``prefix_forward`` on an identical model without
checkpointing, fed the same prefix values, and with the untouched model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from autograder.checks.harness import CheckFailure, max_diff, student_call
from autograder.checks.models import KINDS, Batch, tiny_model, tiny_models
from autograder.checks.prefix import (
    _freeze,
    _grader_values,
    _logits_match,
    _maybe_tensor,
    _own_values,
    _reference,
    _reference_forward,
    _student_encoder,
)
from autograder.checks.protocol import MalformedObservation, Observed, run_check

__all__ = [
    "check_checkpointed_prefix_forward",
    "judge_checkpointed_prefix_forward",
    "observe_checkpointed_prefix_forward",
]

_ATOL = 1e-5
_P = 4
_CALLS = ((6, 16), (7, 17))
"""``(seed given to the student's PrefixEncoder, grader input of the prefix values)`` per call."""
_WHAT = (
    "checkpoint_safe_prefix_forward(model_with_gradient_checkpointing, encoder, input_ids, "
    "attention_mask, labels)"
)

_WHAT_PLAIN = (
    "checkpoint_safe_prefix_forward(model_training_without_checkpointing, encoder, input_ids, "
    "attention_mask, labels)"
)


def _checkpointed(label: str) -> nn.Module:
    """A frozen tiny model in training mode with gradient checkpointing switched on."""
    model = tiny_model(label)
    _freeze(model)
    model.gradient_checkpointing_enable()
    model.train()
    return model


def _why_forward_failed(label: str, failure: CheckFailure) -> AssertionError:
    text = str(failure.__cause__ or failure)
    if "must match" in text or "size" in text:
        return AssertionError(
            f"{label}: {failure} — the model trains with gradient checkpointing, which drops a "
            "key/value cache passed to forward: the mask counts P+T keys while the layers "
            "compute T. Put the prefix in front of the keys/values INSIDE attention (a function "
            "registered with transformers.AttentionInterface, the prefix handed to it as a "
            "forward keyword), or switch checkpointing off for this call"
        )
    return AssertionError(str(failure))


def observe_checkpointed_prefix_forward(
    checkpoint_safe_prefix_forward: Callable, PrefixEncoder: type
) -> dict:
    """Per tiny model training with gradient checkpointing: two calls, each with the student's
    encoder given other grader-chosen prefix values (logits, loss, the prefix's gradient after
    ``loss.backward()`` or the error it raised), then whether checkpointing is still on, whether
    the model still trains, and the model's logits without a prefix; and a call on a model
    training without checkpointing (is checkpointing still off, the mode unchanged?)."""
    models = []
    for label, _ in tiny_models():
        model = _checkpointed(label)
        batch = Batch()
        args = (batch.input_ids, batch.attention_mask, batch.labels)
        calls = []
        for seed, n in _CALLS:
            encoder, param, own = _student_encoder(label, PrefixEncoder, model, _P, seed, n)
            try:
                out = student_call(_WHAT, checkpoint_safe_prefix_forward, model, encoder, *args)
            except CheckFailure as failure:
                raise _why_forward_failed(label, failure) from None
            loss = getattr(out, "loss", None)
            error = None
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                try:
                    loss.sum().backward()
                except RuntimeError as err:
                    error = (str(err).splitlines() or ["RuntimeError"])[0]
            calls.append(
                {
                    "encoder_values": own,
                    "logits": _maybe_tensor(getattr(out, "logits", None)),
                    "loss": _maybe_tensor(loss),
                    "backward_error": error,
                    "grad": _maybe_tensor(param.grad),
                }
            )
        checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
        training = bool(model.training)
        plain = tiny_model(label)  # a model training WITHOUT checkpointing: left as it was?
        _freeze(plain)
        plain.train()
        encoder, _, _ = _student_encoder(label, PrefixEncoder, plain, _P, *_CALLS[0])
        student_call(_WHAT_PLAIN, checkpoint_safe_prefix_forward, plain, encoder, *args)
        model.eval()
        with torch.no_grad():
            after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        models.append(
            {
                "label": label,
                "calls": calls,
                "checkpointing": checkpointing,
                "training": training,
                "plain_checkpointing": bool(getattr(plain, "is_gradient_checkpointing", False)),
                "plain_training": bool(plain.training),
                "after": _maybe_tensor(getattr(after, "logits", None)),
            }
        )
    return {"models": models}


def judge_checkpointed_prefix_forward(obs: Observed) -> None:
    for (label, plain), o in zip(tiny_models(), obs.subs("models", len(KINDS)), strict=True):
        if o.str("label") != label:
            raise MalformedObservation(f"observation for {o.str('label')!r}, expected {label!r}")
        _reference().freeze_backbone(plain)
        batch = Batch()
        with torch.no_grad():
            untouched = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        for (seed, n), c in zip(_CALLS, o.subs("calls", len(_CALLS)), strict=True):
            _own_values(label, plain, c, _P)
            values = _grader_values(plain, _P, n)
            want, grad = _reference_forward(plain, values, batch, grad=True)
            what = f"{_WHAT} (encoder seed {seed})"
            _logits_match(label, c.maybe_tensor("logits"), c.maybe_tensor("loss"), want, what)
            error = c.maybe_str("backward_error")
            if error is not None:
                raise AssertionError(
                    f"{label}: loss.backward() failed ({error}): checkpointing recomputes every "
                    "layer during backward, and by then the prefix was gone (state reset when "
                    "forward returned). Hand the prefix to the layers as a forward keyword: "
                    "checkpointing replays the keywords"
                )
            mine = c.maybe_tensor("grad")
            for i in range(values.shape[0]):
                for kv, name in enumerate(("keys", "values")):
                    if mine is None or mine.shape != grad.shape or not mine[i, kv].abs().sum() > 0:
                        raise AssertionError(
                            f"{label}: after loss.backward() no gradient reached encoder()[{i}, "
                            f"{kv}], layer {i}'s prefix {name}: the prefix must enter the "
                            "attention with its graph (no .detach(), no torch.no_grad())"
                        )
            if not max_diff(mine, grad) <= _ATOL:
                raise AssertionError(
                    f"{label}: the gradient with respect to encoder() differs from the reference "
                    f"(no checkpointing) by up to {max_diff(mine, grad):.3g}"
                )
        if not o.bool("checkpointing"):
            raise AssertionError(
                f"{label}: after checkpoint_safe_prefix_forward returned, gradient checkpointing "
                "is off: switching it off for a call is fine, but switch it back on (in a "
                "finally block), or the next training step runs out of the memory it was saving"
            )
        if not o.bool("training"):
            raise AssertionError(
                f"{label}: after checkpoint_safe_prefix_forward returned, the model is in eval "
                "mode: it was training, and transformers checkpoints only in training mode, so "
                "checkpointing is silently off from then on — leave the mode as you found it"
            )
        if o.bool("plain_checkpointing") or not o.bool("plain_training"):
            raise AssertionError(
                f"{label}: called on a model training WITHOUT gradient checkpointing, "
                "checkpoint_safe_prefix_forward left it "
                + ("with checkpointing on" if o.bool("plain_checkpointing") else "in eval mode")
                + ": switch checkpointing back on only if it was on "
                "(model.is_gradient_checkpointing before the call), and leave the mode alone"
            )
        after = o.maybe_tensor("after")
        same = after is not None and after.shape == untouched.logits.shape
        diff = max_diff(after, untouched.logits) if same else float("inf")
        if not diff <= _ATOL:
            raise AssertionError(
                f"{label}: after checkpoint_safe_prefix_forward returned, the model WITHOUT a "
                f"prefix gives logits off by up to {diff:.3g}: something you installed (a "
                "hook, a global prefix read by the attention function) stays active, so the "
                "next request — another tenant's — would run with this prefix"
            )


def check_checkpointed_prefix_forward(
    checkpoint_safe_prefix_forward: Callable, PrefixEncoder: type
) -> None:
    """checkpoint_safe_prefix_forward: on a model training with gradient checkpointing, logits,
    loss and the encoder's gradients equal the reference prefix_forward without checkpointing;
    a second call with another prefix is right too, and afterwards the model without a prefix
    gives its original outputs (nothing stays installed)."""
    run_check(
        observe_checkpointed_prefix_forward,
        judge_checkpointed_prefix_forward,
        checkpoint_safe_prefix_forward,
        PrefixEncoder,
    )
