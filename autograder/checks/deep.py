"""Checks for notebook 02, the literal "prepend to the hidden states at every layer" form
(VPT-deep style): ``DeepPrompt`` and ``deep_prompt_forward``.

The grader watches the hidden states entering every decoder layer (at the layer's first norm,
so after any pre-hook the student registered) and leaving it, plus every layer's attention:
layer ``l > 0`` must see exactly ``deep.weight[l]`` at the ``P`` prompt positions (replaced,
not added), the token positions untouched, and no key/value prefix anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from autograder import reference
from autograder.checks.harness import describe, max_diff, sandbox, student_call
from autograder.checks.models import Batch, tiny_models
from autograder.checks.recording import Recording, decoder_layers, record
from course.compat import kv_geometry

__all__ = ["check_deep_prompt"]

IGNORE_INDEX = -100


class _FixedDeep(nn.Module):
    """The reference's view of a deep prompt: ``weight (L, P, d)`` and ``prompt_len``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.prompt_len = weight.shape[1]


def _hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in decoder_layers(model)]


def _no_kv_prefix(label: str, rec: Recording, p: int, t: int) -> None:
    for call in rec.calls:
        if call.key_len != call.query_len:
            raise AssertionError(
                f"{label}: layer {call.layer}: attention saw {call.key_len} keys for "
                f"{call.query_len} queries — a key/value prefix. The hidden-state form puts the "
                "vectors INTO the hidden states: every layer has P+T queries and P+T keys"
            )
        if call.query_len != p + t:
            raise AssertionError(
                f"{label}: layer {call.layer}: attention saw {call.query_len} positions, expected "
                f"P+T = {p + t}: prepend the P vectors of layer 0 to the token embeddings"
            )


def _layer_inputs(label: str, rec: Recording, weight: torch.Tensor, b: int) -> None:
    """Before every layer ``l > 0`` the prompt positions hold ``weight[l]``."""
    p = weight.shape[1]
    for i in range(1, weight.shape[0]):
        seen = rec.layer_inputs[i][0].detach()
        prev = rec.layer_outputs[i - 1][0].detach()
        want = weight[i].detach().expand(b, -1, -1)
        if torch.allclose(seen[:, :p], want, atol=1e-6):
            if not torch.allclose(seen[:, p:], prev[:, p:], atol=1e-6):
                raise AssertionError(
                    f"{label}: layer {i}: the hidden states at the token positions P.. are not "
                    f"layer {i - 1}'s outputs: replace only the first P positions"
                )
            continue
        if torch.allclose(seen[:, :p], prev[:, :p] + want, atol=1e-5):
            hint = (
                f"it is layer {i - 1}'s output PLUS deep.weight[{i}]: replace the prompt "
                "positions, don't add to them"
            )
        elif torch.allclose(seen[:, :p], prev[:, :p], atol=1e-6):
            hint = (
                f"it is still layer {i - 1}'s output there: only the first layer got its vectors "
                "(that is prompt tuning) — replace the prompt positions before every layer > 0"
            )
        else:
            hint = f"max |diff| {max_diff(seen[:, :p], want):.3g}"
        raise AssertionError(
            f"{label}: layer {i}: the hidden states at the {p} prompt positions are not "
            f"deep.weight[{i}] — {hint}"
        )


def check_deep_prompt(DeepPrompt: type, deep_prompt_forward: Callable) -> None:
    """DeepPrompt + deep_prompt_forward: (L, P, d) vectors; layer 0 gets weight[0] as input
    embeddings and every later layer's prompt positions are REPLACED by its own weight[l]; no
    key/value prefix; every layer's vectors get a gradient; labels extended; hooks removed."""
    p = 3
    with sandbox():
        for label, model in tiny_models():
            reference.freeze_backbone(model)
            g = kv_geometry(model.config)
            n_layers, d = g["n_layers"], g["hidden_size"]
            deep = student_call(f"DeepPrompt(config, {p})", DeepPrompt, model.config, p)
            weight = getattr(deep, "weight", None)
            if not isinstance(weight, nn.Parameter) or tuple(weight.shape) != (n_layers, p, d):
                raise AssertionError(
                    f"{label}: DeepPrompt(config, {p}).weight is {describe(weight)}, expected an "
                    f"nn.Parameter of shape {(n_layers, p, d)} (L, P, d): P vectors per layer"
                )
            count = sum(t.numel() for t in deep.parameters())
            if count != weight.numel():
                raise AssertionError(
                    f"{label}: DeepPrompt has {count} parameter values, expected L·P·d = "
                    f"{weight.numel()}"
                )
            batch = Batch()
            b, t = batch.shape
            hooks = _hook_counts(model)
            with record(model) as rec:
                out = student_call(
                    "deep_prompt_forward(model, deep, input_ids, attention_mask, labels)",
                    deep_prompt_forward, model, deep, batch.input_ids, batch.attention_mask,
                    batch.labels,
                )  # fmt: skip
            left = [a - b_ for a, b_ in zip(_hook_counts(model), hooks)]
            if any(left):
                raise AssertionError(
                    f"{label}: deep_prompt_forward left {sum(left)} hooks on the decoder layers: "
                    "remove them before returning (handle.remove() in a finally block), or every "
                    "later forward pass is altered"
                )
            _no_kv_prefix(label, rec, p, t)
            embeds = rec.model_inputs[0].get("inputs_embeds") if rec.model_inputs else None
            first = weight[0].detach().expand(b, -1, -1)
            if not isinstance(embeds, torch.Tensor) or not torch.allclose(
                embeds[:, :p].detach(), first, atol=1e-6
            ):
                raise AssertionError(
                    f"{label}: layer 0 did not receive deep.weight[0] as the first {p} input "
                    "embeddings: pass inputs_embeds = cat(weight[0] per row, token embeddings)"
                )
            _layer_inputs(label, rec, weight, b)
            labels = rec.model_inputs[0].get("labels")
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (b, p + t):
                raise AssertionError(
                    f"{label}: the model received labels {describe(labels)}, expected ({b}, "
                    f"{p + t}) (B, P+T): extend the labels with -100 over the prompt"
                )
            if not (labels[:, :p] == IGNORE_INDEX).all():
                raise AssertionError(
                    f"{label}: labels at the prompt positions are {labels[0, :p].tolist()}, "
                    "expected -100"
                )
            with torch.no_grad():
                want = reference.deep_prompt_forward(
                    model, _FixedDeep(weight.detach()), batch.input_ids, batch.attention_mask,
                    batch.labels,
                )  # fmt: skip
            diff = max_diff(out.logits, want.logits) if out.logits.shape == want.logits.shape else 1
            if diff > 1e-5:
                raise AssertionError(
                    f"{label}: logits {tuple(out.logits.shape)} differ from the reference "
                    f"{tuple(want.logits.shape)} (max |diff| {diff:.3g})"
                )
            out.loss.backward()
            grad = weight.grad
            dead = [
                i for i in range(n_layers) if grad is None or not grad[i].abs().sum() > 0
            ]  # fmt: skip
            if dead:
                raise AssertionError(
                    f"{label}: no gradient reaches the vectors of layers {dead}: they must enter "
                    "the hidden states through the graph (no .detach() or .data)"
                )
