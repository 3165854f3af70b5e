"""Checks for notebook 00 (backbone tour): counting, freezing, hidden states, cache shapes.

Every check takes the student's function, runs it on tiny random models built from configs
(GPT-2, and Llama with grouped-query attention and an explicit ``head_dim``), compares what it
returns with what the model really does, and raises ``AssertionError`` with a message that says
what was observed, what was expected and the likely mistake.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from autograder.checks.harness import sandbox, student_call
from autograder.checks.models import tiny_models

__all__ = [
    "GROUP_KEYS",
    "check_count_parameters_by_group",
    "check_freeze_except",
    "check_layer_hidden_states",
    "check_predict_cache_shapes",
    "expected_groups",
]

GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "lm_head": ("lm_head",),
    "embeddings": ("wte", "wpe", "embed"),
    "norm": ("ln_", "norm"),
    "attention": ("attn",),
    "mlp": ("mlp",),
}
"""The grouping rule notebook 00 states: a parameter belongs to the FIRST group (in this order)
one of whose substrings occurs in its name."""


def _sandboxed(check: Callable) -> Callable:
    """Run ``check`` inside :func:`sandbox` (quiet, nothing on stderr, RNG restored)."""

    @functools.wraps(check)
    def run(*args, **kwargs):
        with sandbox():
            return check(*args, **kwargs)

    return run


class _Refused:
    """What :func:`_freeze` returns when the student's ``freeze_except`` raised ``ValueError``."""

    def __init__(self, err: ValueError) -> None:
        self.err = err


def _freeze(freeze_except: Callable, model: torch.nn.Module, names: list[str]):
    """``freeze_except(model, names)``; a ValueError (part of the contract) comes back as
    :class:`_Refused`, any other failure as an AssertionError naming the call."""

    def call(m, n):
        try:
            return freeze_except(m, n)
        except ValueError as err:
            return _Refused(err)

    return student_call(f"freeze_except(model, {names})", call, model, names)


# ---------------------------------------------------------------------------------------------
# count_parameters_by_group
# ---------------------------------------------------------------------------------------------
def expected_groups(model: torch.nn.Module) -> dict[str, int]:
    """What ``count_parameters_by_group(model)`` must return."""
    counts = dict.fromkeys([*GROUP_KEYS, "total"], 0)
    for name, p in model.named_parameters():
        group = next(g for g, keys in GROUP_KEYS.items() if any(k in name for k in keys))
        counts[group] += p.numel()
        counts["total"] += p.numel()
    return counts


@_sandboxed
def check_count_parameters_by_group(count_parameters_by_group: Callable) -> None:
    """count_parameters_by_group: every group and the total, tied and frozen weights included."""
    for label, model in tiny_models():
        # freeze half the model: a count must not depend on requires_grad
        for i, p in enumerate(model.parameters()):
            p.requires_grad_(i % 2 == 0)
        expected = expected_groups(model)
        got = student_call("count_parameters_by_group(model)", count_parameters_by_group, model)
        if not isinstance(got, dict):
            raise AssertionError(
                f"{label}: count_parameters_by_group returned {type(got).__name__}, expected a "
                f"dict with keys {list(expected)}"
            )
        missing = [k for k in expected if k not in got]
        if missing:
            raise AssertionError(
                f"{label}: the result lacks the keys {missing}; expected exactly {list(expected)}"
            )
        extra = [k for k in got if k not in expected]
        if extra:
            raise AssertionError(
                f"{label}: unexpected keys {extra}; expected exactly {list(expected)} "
                "(every parameter belongs to one of the five groups)"
            )
        n_tensors = sum(1 for _ in model.parameters())
        if got["total"] == n_tensors:
            raise AssertionError(
                f"{label}: total is {got['total']}, the number of parameter TENSORS; count "
                f"scalars with p.numel() (expected {expected['total']})"
            )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if got["total"] == trainable and trainable != expected["total"]:
            raise AssertionError(
                f"{label}: total is {got['total']}, only the parameters with requires_grad=True; "
                f"the model has {expected['total']}: count frozen parameters too"
            )
        if label == "GPT-2" and got["lm_head"] != 0:
            tied = model.get_output_embeddings().weight.numel()
            hint = (
                " GPT-2 ties lm_head.weight to transformer.wte.weight: it is ONE tensor, listed "
                "once by named_parameters() but twice by state_dict()"
                if got["lm_head"] == tied
                else ""
            )
            raise AssertionError(f"{label}: lm_head counts {got['lm_head']}, expected 0.{hint}")
        if got["lm_head"] == 0 != expected["lm_head"]:
            raise AssertionError(
                f"{label}: lm_head counts 0, expected {expected['lm_head']}: this model's output "
                "head is NOT tied to the embedding; count the whole model (model.named_parameters()"
                ", not only the decoder's)"
            )
        for key, want in expected.items():
            if got[key] != want:
                raise AssertionError(
                    f"{label}: group {key!r} counts {got[key]}, expected {want}; the rule: a "
                    "parameter joins the FIRST group (lm_head, embeddings, norm, attention, mlp) "
                    "one of whose substrings is in its name"
                )
        if sum(got[k] for k in GROUP_KEYS) != got["total"]:
            raise AssertionError(f"{label}: the groups do not add up to total")


# ---------------------------------------------------------------------------------------------
# freeze_except
# ---------------------------------------------------------------------------------------------
def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _show(names: set[str], limit: int = 4) -> str:
    shown = sorted(names)[:limit]
    return "{" + ", ".join(shown) + (", ..." if len(names) > limit else "") + "}"


@_sandboxed
def check_freeze_except(freeze_except: Callable) -> None:
    """freeze_except: exactly the named parameters stay trainable (substring match), frozen ones
    named are unfrozen, values untouched, unknown names refused."""
    cases = {
        "GPT-2": [["ln_f"], ["wpe", "h.1.mlp"]],
        "Llama-GQA": [["self_attn.k_proj"], ["model.norm", "layers.2"]],
    }
    for label, model in tiny_models():
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for names in cases[label]:
            # start from a mixed state: some parameters frozen, including some to keep
            for i, p in enumerate(model.parameters()):
                p.requires_grad_(i % 3 != 0)
            pre = _trainable(model)
            want = {n for n, _ in model.named_parameters() if any(k in n for k in names)}
            with torch.no_grad():
                out = _freeze(freeze_except, model, names)
            if isinstance(out, _Refused):
                raise AssertionError(
                    f"{label}: freeze_except(model, {names}) raised ValueError ({out.err}), but "
                    f"the names match {_show(want)}: a name counts when it is a SUBSTRING of the "
                    "parameter's name (`key in name`), not only when equal"
                )
            if out is not model:
                raise AssertionError(
                    f"{label}: freeze_except returned {type(out).__name__}, expected the same "
                    "model object (return model at the end)"
                )
            got = _trainable(model)
            if got == pre:
                raise AssertionError(
                    f"{label}: freeze_except(model, {names}) changed no requires_grad flag: set "
                    "p.requires_grad = False on every other parameter (and True on the named ones)"
                )
            if not got:
                raise AssertionError(
                    f"{label}: freeze_except(model, {names}) left nothing trainable, expected "
                    f"{_show(want)}: a name counts when it is a SUBSTRING of the parameter's name "
                    "(`key in name`), not only when equal"
                )
            if got != want:
                lost, kept = want - got, got - want
                hint = ""
                if lost:
                    hint = (
                        f" {_show(lost)} should be trainable but are frozen: set "
                        "requires_grad=True on the named parameters (they may have been frozen "
                        "before the call)"
                    )
                if kept:
                    hint += f" {_show(kept)} should be frozen but are trainable."
                raise AssertionError(
                    f"{label}: freeze_except(model, {names}) left {len(got)} parameters trainable, "
                    f"expected {len(want)}.{hint}"
                )
        for n, p in model.named_parameters():
            if not torch.equal(p, before[n]):
                raise AssertionError(f"{label}: freeze_except changed the VALUES of {n}")
        if not isinstance(_freeze(freeze_except, model, ["no_such_layer"]), _Refused):
            raise AssertionError(
                f"{label}: freeze_except(model, ['no_such_layer']) matched no parameter and raised "
                "nothing: raise ValueError, or a typo silently freezes the whole model"
            )


# ---------------------------------------------------------------------------------------------
# layer_hidden_states
# ---------------------------------------------------------------------------------------------
@_sandboxed
def check_layer_hidden_states(layer_hidden_states: Callable) -> None:
    """layer_hidden_states: L+1 detached (B, T, d) tensors, the embedding output first, matching
    transformers' output_hidden_states."""
    for label, model in tiny_models():
        torch.manual_seed(1)
        ids = torch.randint(1, model.config.vocab_size, (2, 7))
        with torch.no_grad():
            ref = model(input_ids=ids, output_hidden_states=True).hidden_states
            embeds = model.get_input_embeddings()(ids)
            if label == "GPT-2":
                embeds = embeds + model.transformer.wpe(torch.arange(7))[None]
        n_layers = len(ref) - 1
        got = student_call("layer_hidden_states(model, input_ids)", layer_hidden_states, model, ids)
        if isinstance(got, torch.Tensor):
            raise AssertionError(
                f"{label}: got one tensor of shape {tuple(got.shape)}, expected a list of "
                f"{n_layers + 1} tensors (B, T, d): the embedding output, then one per layer"
            )
        got = list(got)
        if len(got) != n_layers + 1:
            hint = (
                ": the embedding output (what layer 0 reads) comes first"
                if len(got) == n_layers
                else ""
            )
            raise AssertionError(
                f"{label}: got {len(got)} tensors for a {n_layers}-layer model, expected "
                f"{n_layers + 1}{hint}"
            )
        for i, (h, r) in enumerate(zip(got, ref)):
            if not isinstance(h, torch.Tensor) or h.shape != r.shape:
                shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise AssertionError(
                    f"{label}: element {i} has shape {shape}, expected {tuple(r.shape)} (B, T, d)"
                )
            if h.requires_grad:
                raise AssertionError(
                    f"{label}: element {i} requires grad: run the model under torch.no_grad() "
                    "(inspection must not build an autograd graph)"
                )
        if not torch.allclose(got[0], embeds, atol=1e-5):
            raise AssertionError(
                f"{label}: element 0 is not the embedding output (token"
                + (" + position" if label == "GPT-2" else "")
                + " embeddings)"
            )
        for i, (h, r) in enumerate(zip(got, ref)):
            if not torch.allclose(h, r, atol=1e-5):
                hint = (
                    ": transformers reports the LAST one after the final norm (ln_f / model.norm)"
                    if i == n_layers
                    else ""
                )
                raise AssertionError(
                    f"{label}: element {i} differs from hidden state {i} that "
                    "model(..., output_hidden_states=True) reports (max |diff| "
                    f"{(h - r).abs().max().item():.2e}){hint}"
                )


# ---------------------------------------------------------------------------------------------
# predict_cache_shapes
# ---------------------------------------------------------------------------------------------
def _actual_cache_shapes(model: torch.nn.Module, batch: int, seq: int) -> list[tuple]:
    ids = torch.randint(1, model.config.vocab_size, (batch, seq))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return [(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers]


@_sandboxed
def check_predict_cache_shapes(predict_cache_shapes: Callable) -> None:
    """predict_cache_shapes: per layer (key, value) shapes (B, H_kv, T, head_dim) equal to the
    cache the model really builds, on GPT-2 and on Llama with grouped-query attention."""
    for label, model in tiny_models():
        for batch, seq in ((2, 5), (1, 9)):
            want = _actual_cache_shapes(model, batch, seq)
            got = student_call(
                f"predict_cache_shapes(config, {batch}, {seq})",
                predict_cache_shapes,
                model.config,
                batch,
                seq,
            )
            try:
                got = [(tuple(int(x) for x in k), tuple(int(x) for x in v)) for k, v in got]
            except (TypeError, ValueError) as err:
                raise AssertionError(
                    f"{label}: expected a list with one (key_shape, value_shape) pair per layer, "
                    f"got {got!r:.120}"
                ) from err
            if len(got) != len(want):
                raise AssertionError(
                    f"{label}: {len(got)} layers predicted, the model has {len(want)}: one "
                    "(key_shape, value_shape) pair per layer"
                )
            cfg = model.config
            for i, ((gk, gv), (wk, wv)) in enumerate(zip(got, want)):
                if (gk, gv) == (wk, wv):
                    continue
                b, h, t, d = wk
                hint = ""
                if gk == (b, t, h, d):
                    hint = " — the layout is (batch, heads, seq, head_dim): heads before seq"
                elif len(gk) == 4 and gk[1] == cfg.num_attention_heads != h:
                    hint = (
                        f" — num_key_value_heads={h} < num_attention_heads="
                        f"{cfg.num_attention_heads}: under grouped-query attention the cache "
                        "holds one key/value per KV head"
                    )
                elif len(gk) == 4 and gk[3] == cfg.hidden_size // cfg.num_attention_heads != d:
                    hint = (
                        f" — this config sets head_dim={d} explicitly; hidden_size // "
                        "num_attention_heads is only the default"
                    )
                raise AssertionError(
                    f"{label} (batch={batch}, seq={seq}): layer {i} predicted key {gk} value "
                    f"{gv}, the model's cache holds key {wk} value {wv}{hint}"
                )
