"""Checks for notebook 02, section 10: a prompt compiled into a key/value prefix.

``soft_prompt_to_prefix(model, prompt) -> (L, 2, H_kv, P, D)`` compiles a soft prompt
``(P, d)``; ``deep_prompt_to_prefix(model, deep) -> (L, 2, H_kv, P, D)`` compiles hidden-state
prompts (a ``DeepPrompt``). In a causal decoder the keys and values every layer computes at the
prompt positions do not depend on the request, so computing them once gives a prefix that,
served through ``prefix_forward`` (tokens at positions ``P..P+T-1``), gives the real tokens
exactly the logits the prompt gives them.

An *observe* / *judge* pair (see :mod:`autograder.checks.protocol`). Observing calls the
student's function on grader-chosen prompts for each tiny model (two different prompts, so a
result computed once and reused shows), and records what the model gives without a prompt
afterwards (a hook left behind shows). Judging decides on behaviour: the compiled prefix, served
through the reference's ``prefix_forward``, must give the real tokens the logits that the
reference's ``prepend_prompt`` (or ``deep_prompt_forward``) gives them; comparing the tensor with
the reference's compiled prefix, layer by layer, explains a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from autograder.checks import fixtures
from autograder.checks.harness import describe, max_diff, seeded, student_call
from autograder.checks.models import Batch, tiny_models
from autograder.checks.prefix import FixedPrefix, _freeze, _geometry, _maybe_tensor, _per_model
from autograder.checks.protocol import Observed, run_check

__all__ = [
    "FixedDeep",
    "FixedPrompt",
    "check_deep_prompt_to_prefix",
    "check_soft_prompt_to_prefix",
    "judge_deep_prompt_to_prefix",
    "judge_soft_prompt_to_prefix",
    "observe_deep_prompt_to_prefix",
    "observe_soft_prompt_to_prefix",
]

_P = 3
_SCALE = 0.5
"""The grader's prompt vectors are drawn at this std: large enough that every layer's keys and
values differ clearly from a model run without them."""
_LOGITS_ATOL = 5e-5
"""Logits of the same computation done in another order (all at once, or through a cache)."""
_TENSOR_ATOL = 1e-4
_SOFT = "soft_prompt_to_prefix(model, prompt)"
_DEEP = "deep_prompt_to_prefix(model, deep)"


def _reference():
    """:mod:`autograder.reference` (or, in a student package, its stored results)."""
    return fixtures.reference()


class FixedPrompt(nn.Module):
    """The reference's view of a soft prompt: ``weight (P, d)``; ``forward(B)`` -> ``(B, P, d)``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class FixedDeep(nn.Module):
    """The reference's (and the student's) view of a deep prompt: ``weight (L, P, d)`` and
    ``prompt_len``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.prompt_len = weight.shape[1]


def _soft_values(model: nn.Module, n: int) -> torch.Tensor:
    """A soft prompt ``(P, d)`` chosen by the grader: input ``n`` of the variant."""
    d = _geometry(model)[4]
    gen = torch.Generator().manual_seed(seeded(n))
    return torch.randn(_P, d, generator=gen) * _SCALE


def _deep_values(model: nn.Module, n: int) -> torch.Tensor:
    """Hidden-state prompts ``(L, P, d)`` chosen by the grader: input ``n`` of the variant."""
    n_layers, _, _, _, d = _geometry(model)
    gen = torch.Generator().manual_seed(seeded(n))
    return torch.randn(n_layers, _P, d, generator=gen) * _SCALE


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# observe
# ---------------------------------------------------------------------------------------------
def _observe(fn: Callable, what: str, make_input: Callable, inputs: tuple[int, int]) -> dict:
    """Per tiny model (frozen): ``fn(model, make_input(values))`` for two grader inputs, the
    hooks left on the model, and its logits without a prompt afterwards."""
    models = []
    for label, model in tiny_models():
        _freeze(model)
        hooks = _hooks(model)
        observed: dict[str, Any] = {"label": label}
        for key, n in zip(("first", "second"), inputs, strict=True):
            out = student_call(what, fn, model, make_input(model, n))
            observed[key] = _maybe_tensor(out)
            observed[f"{key}_type"] = describe(out)
        batch = Batch()
        with torch.no_grad():
            after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        observed.update(after=_maybe_tensor(after.logits), hooks_left=_hooks(model) - hooks)
        models.append(observed)
    return {"models": models}


def observe_soft_prompt_to_prefix(soft_prompt_to_prefix: Callable) -> dict:
    """Per tiny model: the student's compiled prefix for two grader-chosen soft prompts
    ``(P, d)``, and the model's logits without a prompt afterwards."""
    return _observe(
        soft_prompt_to_prefix, _SOFT, lambda model, n: _soft_values(model, n).clone(), (50, 51)
    )


def observe_deep_prompt_to_prefix(deep_prompt_to_prefix: Callable) -> dict:
    """Per tiny model: the student's compiled prefix for two grader-chosen deep prompts (a
    module with ``weight (L, P, d)`` and ``prompt_len``), and the model's logits without a prompt
    afterwards."""
    return _observe(
        deep_prompt_to_prefix, _DEEP, lambda model, n: FixedDeep(_deep_values(model, n)), (52, 53)
    )


# ---------------------------------------------------------------------------------------------
# judge
# ---------------------------------------------------------------------------------------------
def _judge_shape(label: str, what: str, o: Observed, key: str, shape: tuple[int, ...]) -> None:
    got = o.maybe_tensor(key)
    if got is None or tuple(got.shape) != shape:
        shown = describe(got) if got is not None else o.str(f"{key}_type")
        hint = ""
        if got is not None and got.dim() == 6 and got.shape[2] == 1:
            hint = (
                ": drop the batch dimension (the cache of a batch-1 pass holds keys "
                "(1, H_kv, P, D) per layer)"
            )
        raise AssertionError(
            f"{label}: {what} returned {shown}, expected a tensor of shape {shape} "
            f"(L, 2, H_kv, P, D): per layer, the P keys then the P values{hint}"
        )
    if got.dtype != torch.float32:
        raise AssertionError(
            f"{label}: {what} returned {describe(got)}, expected the model's dtype float32"
        )
    if not torch.isfinite(got).all():
        raise AssertionError(f"{label}: {what} returned non-finite values")


def _explain(label: str, what: str, got: torch.Tensor, want: torch.Tensor, deep: bool) -> None:
    """Raise, saying what differs, when ``got`` is not the reference's compiled prefix."""
    if max_diff(got, want) <= _TENSOR_ATOL:
        return
    if max_diff(got.flip(1), want) <= _TENSOR_ATOL:
        raise AssertionError(
            f"{label}: {what}: keys and values are swapped: index 0 of the second dimension "
            "holds the keys, index 1 the values (as prefix_forward reads them)"
        )
    for layer in range(want.shape[0]):
        dk = max_diff(got[layer, 0], want[layer, 0])
        dv = max_diff(got[layer, 1], want[layer, 1])
        if dk <= _TENSOR_ATOL and dv <= _TENSOR_ATOL:
            continue
        if deep and layer > 0 and max_diff(got[0], want[0]) <= _TENSOR_ATOL:
            raise AssertionError(
                f"{label}: {what}: layer 0 is right but layer {layer} is not (keys off by "
                f"{dk:.3g}, values by {dv:.3g}): before every later layer l the prompt positions "
                "must hold deep.weight[l] (replace them, as deep_prompt_forward does), not what "
                "layer l-1 computed from the previous vectors"
            )
        if dv <= _TENSOR_ATOL:
            raise AssertionError(
                f"{label}: {what}: layer {layer}: the values are right but the keys differ by "
                f"{dk:.3g}: store the keys as the layer's cache holds them, after the position "
                "encoding of positions 0..P-1 (on Llama, the rotary embedding is applied to the "
                "keys after k_proj)"
            )
        source = (
            "the prompt positions run through the model alone, deep.weight[l] entering layer l"
            if deep
            else "the model runs on the prompt alone"
        )
        raise AssertionError(
            f"{label}: {what}: layer {layer} holds keys off by {dk:.3g} and values off by "
            f"{dv:.3g} from what the frozen layer computes at the prompt positions: they must "
            f"be the keys and values of the P prompt positions when {source} (the layer's "
            "norm, key/value projections and position encoding included)"
        )


def _judge_logits(label: str, what: str, model: nn.Module, got: torch.Tensor, want) -> None:
    """The compiled prefix through ``prefix_forward`` gives the real tokens ``want``."""
    batch = Batch()
    with torch.no_grad():
        served = _reference().prefix_forward(
            model, FixedPrefix(got), batch.input_ids, batch.attention_mask
        )
    real = batch.attention_mask.bool()
    diff = max_diff(served.logits[real], want[real])
    if not diff <= _LOGITS_ATOL:
        raise AssertionError(
            f"{label}: served through prefix_forward, the compiled prefix gives the real tokens "
            f"logits that differ from the prompt's by up to {diff:.3g}"
        )


def _judge_after(label: str, what: str, model: nn.Module, o: Observed) -> None:
    batch = Batch()
    with torch.no_grad():
        plain = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    after = o.maybe_tensor("after")
    if after is None or after.shape != plain.shape or not max_diff(after, plain) <= 1e-5:
        raise AssertionError(
            f"{label}: after {what} returned, the model WITHOUT a prompt gives other logits "
            f"({o.int('hooks_left')} hooks were left on it): remove every hook before returning "
            "(handle.remove() in a finally block)"
        )


def judge_soft_prompt_to_prefix(obs: Observed) -> None:
    ref = _reference()
    for label, model, o in _per_model(obs):
        ref.freeze_backbone(model)
        batch = Batch()
        for key, n in (("first", 50), ("second", 51)):
            values = _soft_values(model, n)
            n_layers, h, dim, _, _ = _geometry(model)
            shape = (n_layers, 2, h, _P, dim)
            _judge_shape(label, _SOFT, o, key, shape)
            got = o.tensor(key, shape)
            if key == "second" and max_diff(got, o.tensor("first", shape)) <= _TENSOR_ATOL:
                raise AssertionError(
                    f"{label}: {_SOFT} gave the same prefix for two different prompts: compile "
                    "the prompt it is given (nothing kept from an earlier call)"
                )
            with torch.no_grad():
                want = ref.soft_prompt_to_prefix(model, values)
                logits = ref.prompt_forward(
                    model, FixedPrompt(values), batch.input_ids, batch.attention_mask
                ).logits[:, _P:]
            _explain(label, _SOFT, got, want, deep=False)
            _judge_logits(label, _SOFT, model, got, logits)
        _judge_after(label, _SOFT, model, o)


def judge_deep_prompt_to_prefix(obs: Observed) -> None:
    ref = _reference()
    for label, model, o in _per_model(obs):
        ref.freeze_backbone(model)
        batch = Batch()
        for key, n in (("first", 52), ("second", 53)):
            deep = FixedDeep(_deep_values(model, n))
            n_layers, h, dim, _, _ = _geometry(model)
            shape = (n_layers, 2, h, _P, dim)
            _judge_shape(label, _DEEP, o, key, shape)
            got = o.tensor(key, shape)
            if key == "second" and max_diff(got, o.tensor("first", shape)) <= _TENSOR_ATOL:
                raise AssertionError(
                    f"{label}: {_DEEP} gave the same prefix for two different deep prompts: "
                    "compile the vectors it is given (nothing kept from an earlier call)"
                )
            with torch.no_grad():
                want = ref.deep_prompt_to_prefix(model, deep)
                logits = ref.deep_prompt_forward(
                    model, deep, batch.input_ids, batch.attention_mask
                ).logits[:, _P:]
            _explain(label, _DEEP, got, want, deep=True)
            _judge_logits(label, _DEEP, model, got, logits)
        _judge_after(label, _DEEP, model, o)


def check_soft_prompt_to_prefix(soft_prompt_to_prefix: Callable) -> None:
    """soft_prompt_to_prefix(model, prompt (P, d)) -> (L, 2, H_kv, P, D): the keys and values
    every layer computes at the prompt's positions; served through prefix_forward it gives the
    real tokens exactly the prompt's logits; no hook left behind."""
    run_check(observe_soft_prompt_to_prefix, judge_soft_prompt_to_prefix, soft_prompt_to_prefix)


def check_deep_prompt_to_prefix(deep_prompt_to_prefix: Callable) -> None:
    """deep_prompt_to_prefix(model, deep) -> (L, 2, H_kv, P, D): the keys and values every layer
    computes from deep.weight[l]; served through prefix_forward it gives the real tokens exactly
    deep_prompt_forward's logits; no hook left behind."""
    run_check(observe_deep_prompt_to_prefix, judge_deep_prompt_to_prefix, deep_prompt_to_prefix)
