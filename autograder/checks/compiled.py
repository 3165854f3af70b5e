"""Checks for notebook 02, section 10: a prompt compiled into a key/value prefix.

``soft_prompt_to_prefix(model, prompt) -> (L, 2, H_kv, P, D)`` compiles a soft prompt
``(P, d)``; ``deep_prompt_to_prefix(model, deep) -> (L, 2, H_kv, P, D)`` compiles hidden-state
prompts (a ``DeepPrompt``). In a causal decoder the keys and values every layer computes at the
prompt positions do not depend on the request, so computing them once gives a prefix that,
served through ``prefix_forward`` (tokens at positions ``P..P+T-1``), gives the real tokens
exactly the logits the prompt gives them.

An *observe* / *judge* pair (see :mod:`autograder.checks.protocol`). Observing calls the
student's function on grader-chosen prompts for each tiny model: two prompts of one length (a
result computed once and reused shows), one of another length (``P`` never equals the models'
``L``, so the two cannot be confused), and the last one again on a bfloat16 copy of the model (the
prefix must come in the model's dtype). It records whether a call changed the prompt it was
given, and the state of the model afterwards: hooks left, parameters changed or unfrozen, train
mode, its logits without a prompt. Judging decides on behaviour: each compiled prefix must equal
the reference's, and, served through the reference's ``prefix_forward``, give the real tokens the
logits the reference's ``prepend_prompt`` (or ``deep_prompt_forward``) gives them; comparing the
tensors layer by layer explains a failure.
"""

from __future__ import annotations

import copy
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

_CALLS = (("first", 50, 2), ("second", 51, 2), ("third", 52, 5))
"""``(observation key, grader input, P)``: two prompts of one length, one of another; ``P`` is
never the tiny models' ``L`` (3)."""
_HALF = ("bf16", 52, 5)
"""The third prompt (float32) again, on a bfloat16 copy of the model."""
_HALF_RTOL = 0.02
"""bfloat16 keeps 8 bits of mantissa: a valid implementation that rounds at another step
differs by about 1% of the values' scale."""
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


def _soft_values(model: nn.Module, n: int, p: int) -> torch.Tensor:
    """A soft prompt ``(P, d)`` chosen by the grader: input ``n`` of the variant (float32)."""
    d = _geometry(model)[4]
    gen = torch.Generator().manual_seed(seeded(n))
    return torch.randn(p, d, generator=gen) * _SCALE


def _deep_values(model: nn.Module, n: int, p: int) -> torch.Tensor:
    """Hidden-state prompts ``(L, P, d)`` chosen by the grader: input ``n`` of the variant."""
    n_layers, _, _, _, d = _geometry(model)
    gen = torch.Generator().manual_seed(seeded(n))
    return torch.randn(n_layers, p, d, generator=gen) * _SCALE


def _prompt_tensor(given: Any) -> torch.Tensor:
    return given.weight if isinstance(given, nn.Module) else given


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# observe
# ---------------------------------------------------------------------------------------------
def _call(observed: dict, key: str, what: str, fn: Callable, model: nn.Module, given) -> None:
    before = _prompt_tensor(given).detach().clone()
    out = student_call(what, fn, model, given)
    observed[key] = _maybe_tensor(out)
    observed[f"{key}_type"] = describe(out)
    observed[f"{key}_input_changed"] = not torch.equal(_prompt_tensor(given).detach(), before)


def _observe(fn: Callable, what: str, make_input: Callable) -> dict:
    """Per tiny model (frozen): ``fn(model, make_input(model, n, p))`` for the grader inputs of
    :data:`_CALLS` and, on a bfloat16 copy of the model, :data:`_HALF`; whether each call changed
    the prompt it was given; then the model's state: hooks left, parameters changed or
    trainable, train mode, and its logits without a prompt."""
    models = []
    for label, model in tiny_models():
        _freeze(model)
        model.train()  # a model in the middle of training: compiling must not change its mode
        half = copy.deepcopy(model).to(torch.bfloat16)
        hooks = _hooks(model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        observed: dict[str, Any] = {"label": label}
        for key, n, p in _CALLS:
            _call(observed, key, what, fn, model, make_input(model, n, p))
        key, n, p = _HALF
        on_half = (
            f"{what} on a bfloat16 model, given a float32 prompt (cast it to the model's dtype),"
        )
        _call(observed, key, on_half, fn, half, make_input(model, n, p))
        training = bool(model.training)
        half_dtypes = sorted({str(t.dtype) for t in half.parameters()})
        batch = Batch()
        model.eval()
        with torch.no_grad():
            after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        now = model.state_dict()
        observed.update(
            after=_maybe_tensor(after.logits),
            hooks_left=_hooks(model) - hooks,
            training=training,
            half_dtypes=half_dtypes,
            trainable=sorted(n for n, t in model.named_parameters() if t.requires_grad),
            changed=sorted(k for k, v in state.items() if not torch.equal(now[k], v)),
        )
        models.append(observed)
    return {"models": models}


def observe_soft_prompt_to_prefix(soft_prompt_to_prefix: Callable) -> dict:
    """Per tiny model: the student's compiled prefix for two grader-chosen soft prompts
    ``(P, d)``, and the model's logits without a prompt afterwards."""
    return _observe(soft_prompt_to_prefix, _SOFT, _soft_values)


def observe_deep_prompt_to_prefix(deep_prompt_to_prefix: Callable) -> dict:
    """Per tiny model: the student's compiled prefix for two grader-chosen deep prompts (a
    module with ``weight (L, P, d)`` and ``prompt_len``), and the model's logits without a prompt
    afterwards."""
    return _observe(
        deep_prompt_to_prefix, _DEEP, lambda model, n, p: FixedDeep(_deep_values(model, n, p))
    )


# ---------------------------------------------------------------------------------------------
# judge
# ---------------------------------------------------------------------------------------------
def _judge_shape(
    label: str, what: str, o: Observed, key: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
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
    if got.dtype != dtype:
        model_dtype = str(dtype).removeprefix("torch.")
        raise AssertionError(
            f"{label}: {what} returned {describe(got)} for a {model_dtype} model (given a float32 "
            f"prompt), expected the model's dtype {model_dtype}: the prefix is served in the "
            "model's dtype"
        )
    if not torch.isfinite(got).all():
        raise AssertionError(f"{label}: {what} returned non-finite values")
    if o.bool(f"{key}_input_changed"):
        raise AssertionError(
            f"{label}: {what} changed the prompt it was given (in place): compiling must leave "
            "the trained prompt as it was"
        )
    return got


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
    """The compiled prefix through ``prefix_forward`` gives the real tokens ``want``. Skipped
    where the reference is replayed (a student package): the stored results answer only the
    inputs they were recorded for (within 1e-6), and the prefix has already been compared with
    the reference's; grading always has the reference and runs it."""
    if fixtures.is_replay():
        return
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


def _judge_model_state(label: str, what: str, model: nn.Module, o: Observed) -> None:
    """The model as it was: no hook left, no parameter changed or unfrozen, still in train mode
    (as it was given), the bfloat16 copy still bfloat16, and the same logits without a
    prompt."""
    hooks = o.int("hooks_left")
    if hooks != 0:
        raise AssertionError(
            f"{label}: {what} left {hooks} hooks on the model: every later forward pass would "
            "run them; remove each one before returning (handle.remove() in a finally block)"
        )
    changed, trainable = o.strings("changed"), o.strings("trainable")
    half_dtypes = o.strings("half_dtypes")
    if changed or trainable or not o.bool("training") or half_dtypes != ["torch.bfloat16"]:
        what_changed = (
            f"parameters or buffers {changed[:3]} changed"
            if changed
            else f"parameters {trainable[:3]} require grad again"
            if trainable
            else "the model, which was training, was left in eval mode"
            if not o.bool("training")
            else f"the bfloat16 model now holds {', '.join(half_dtypes)} parameters"
        )
        raise AssertionError(
            f"{label}: after {what} returned, {what_changed}: compiling reads the frozen model "
            "and must leave it exactly as it was"
        )
    batch = Batch()
    with torch.no_grad():
        plain = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    after = o.maybe_tensor("after")
    if after is None or after.shape != plain.shape or not max_diff(after, plain) <= 1e-5:
        raise AssertionError(
            f"{label}: after {what} returned, the model WITHOUT a prompt gives other logits: "
            "compiling must leave the model exactly as it was"
        )


def _judge(obs: Observed, what: str, make_input: Callable, compile_ref: Callable,
           forward_ref: Callable, deep: bool) -> None:  # fmt: skip
    ref = _reference()
    for label, model, o in _per_model(obs):
        ref.freeze_backbone(model)
        n_layers, h, dim, _, _ = _geometry(model)
        batch = Batch()
        results: dict[str, torch.Tensor] = {}
        for key, n, p in _CALLS:
            got = _judge_shape(label, what, o, key, (n_layers, 2, h, p, dim), torch.float32)
            given = make_input(model, n, p)
            with torch.no_grad():
                want = compile_ref(model, given)
                logits = forward_ref(model, given, batch).logits[:, p:]
            if key == "second" and max_diff(got, results["first"]) <= _TENSOR_ATOL:
                raise AssertionError(
                    f"{label}: {what} gave the same prefix for two different prompts: compile "
                    "the prompt it is given (nothing kept from an earlier call)"
                )
            _explain(label, what, got, want, deep)
            _judge_logits(label, what, model, got, logits)
            results[key] = got
        key, n, p = _HALF
        got = _judge_shape(label, what, o, key, (n_layers, 2, h, p, dim), torch.bfloat16)
        with torch.no_grad():
            want = compile_ref(copy.deepcopy(model).to(torch.bfloat16), make_input(model, n, p))
        scale = want.float().abs().max().item()
        if not max_diff(got, want) <= _HALF_RTOL * scale:
            raise AssertionError(
                f"{label}: {what} on a bfloat16 model (given a float32 prompt) differs from the "
                f"keys and values the model computes by up to {max_diff(got, want):.3g} (their "
                f"scale {scale:.3g}): cast the prompt to the model's dtype and compile in it"
            )
        _judge_model_state(label, what, model, o)


def judge_soft_prompt_to_prefix(obs: Observed) -> None:
    ref = _reference()
    _judge(
        obs,
        _SOFT,
        _soft_values,
        ref.soft_prompt_to_prefix,
        lambda model, values, b: ref.prompt_forward(
            model, FixedPrompt(values), b.input_ids, b.attention_mask
        ),
        deep=False,
    )


def judge_deep_prompt_to_prefix(obs: Observed) -> None:
    ref = _reference()
    _judge(
        obs,
        _DEEP,
        lambda model, n, p: FixedDeep(_deep_values(model, n, p)),
        ref.deep_prompt_to_prefix,
        lambda model, deep, b: ref.deep_prompt_forward(model, deep, b.input_ids, b.attention_mask),
        deep=True,
    )


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
