"""Checks for notebook 05, the debugging lab.

Most fixes in the lab are graded by the checks of notebook 02 and the freezing checks
(``check_build_prefix_cache``, ``check_prefix_forward``, ``check_bf16``,
``check_freeze_backbone``, ``check_prefix_training``). The one new behaviour is a deep prefix
that survives **gradient checkpointing**: checkpointing recomputes every layer during backward
and drops a key/value cache passed to ``forward`` (transformers logs "Caching is incompatible
with gradient checkpointing"), so a cache-based prefix crashes with a size mismatch.

:func:`check_checkpointed_prefix_forward` runs the student's function on tiny GPT-2 and
Llama-GQA models that train with gradient checkpointing, and compares logits, loss and the
encoder's gradients with the reference ``prefix_forward`` on an identical model without
checkpointing, fed an identically initialised encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from autograder import reference
from autograder.checks.harness import CheckFailure, max_diff, sandbox, student_call
from autograder.checks.models import Batch, tiny_model, tiny_models
from autograder.checks.prefix import _logits_match, _make_encoder, _prefix_values

__all__ = ["check_checkpointed_prefix_forward"]

_ATOL = 1e-5


def _checkpointed(label: str) -> nn.Module:
    """A frozen tiny model in training mode with gradient checkpointing switched on."""
    model = tiny_model(label)
    reference.freeze_backbone(model)
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


def _grads(encoder: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if t.grad is None else t.grad.clone()) for n, t in encoder.named_parameters()}


def check_checkpointed_prefix_forward(
    checkpoint_safe_prefix_forward: Callable, PrefixEncoder: type
) -> None:
    """checkpoint_safe_prefix_forward: on a model training with gradient checkpointing, logits,
    loss and the encoder's gradients equal the reference prefix_forward without checkpointing;
    a second call with another prefix is right too, and afterwards the model without a prefix
    gives its original outputs (nothing stays installed)."""
    p = 4
    with sandbox():
        for label, _ in tiny_models():
            model, plain = _checkpointed(label), tiny_model(label)
            reference.freeze_backbone(plain)
            batch = Batch()
            args = (batch.input_ids, batch.attention_mask, batch.labels)
            with torch.no_grad():
                untouched = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            what = (
                "checkpoint_safe_prefix_forward(model_with_gradient_checkpointing, encoder, "
                "input_ids, attention_mask, labels)"
            )
            for seed in (6, 7):
                encoder = _make_encoder(PrefixEncoder, model, p, seed=seed)
                _prefix_values(label, model, encoder, p, f"config, {p}, seed={seed}")
                twin = _make_encoder(PrefixEncoder, model, p, seed=seed)
                try:
                    out = student_call(what, checkpoint_safe_prefix_forward, model, encoder, *args)
                except CheckFailure as failure:
                    raise _why_forward_failed(label, failure) from None
                want = reference.prefix_forward(plain, twin, *args)
                _logits_match(label, out, want, f"{what} (encoder seed {seed})")
                try:
                    out.loss.backward()
                except RuntimeError as err:
                    raise AssertionError(
                        f"{label}: loss.backward() failed ({str(err).splitlines()[0]}): "
                        "checkpointing recomputes every layer during backward, and by then the "
                        "prefix was gone (state reset when forward returned). Hand the prefix to "
                        "the layers as a forward keyword: checkpointing replays the keywords"
                    ) from None
                want.loss.backward()
                got, expected = _grads(encoder), _grads(twin)
                for name, grad in expected.items():
                    if grad is None:
                        continue
                    mine = got.get(name)
                    if mine is None or not mine.abs().sum() > 0:
                        raise AssertionError(
                            f"{label}: after loss.backward() the encoder's {name} has no "
                            "gradient: the prefix must enter the attention with its graph (no "
                            ".detach(), no torch.no_grad())"
                        )
                    if max_diff(mine, grad) > _ATOL:
                        raise AssertionError(
                            f"{label}: the gradient of the encoder's {name} differs from the "
                            f"reference (no checkpointing) by up to {max_diff(mine, grad):.3g}"
                        )
            model.eval()
            with torch.no_grad():
                after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            diff = max_diff(after.logits, untouched.logits)
            if diff > _ATOL:
                raise AssertionError(
                    f"{label}: after checkpoint_safe_prefix_forward returned, the model WITHOUT a "
                    f"prefix gives logits off by up to {diff:.3g}: something you installed (a "
                    "hook, a global prefix read by the attention function) stays active, so the "
                    "next request — another tenant's — would run with this prefix"
                )
