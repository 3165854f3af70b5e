"""Checks for notebook 00 (backbone tour): counting, freezing, hidden states, cache shapes.

Every check takes the student's function, runs it on tiny random models built from configs
(GPT-2, and Llama with grouped-query attention and an explicit ``head_dim``), compares what it
returns with what the model really does, and raises ``AssertionError`` with a message that says
what was observed, what was expected and the likely mistake.

Each check is an *observe* / *judge* pair (see :mod:`autograder.checks.protocol`): observing
calls the student's function and records what it returned; judging rebuilds the same models and
inputs and compares with what the models really hold and compute. Besides the two fixed tiny
models, every check also runs on one GPT-2 and one Llama whose architecture (layers, widths,
heads, key/value heads, ``head_dim``, tied or untied output head) is drawn from the variant, so
no answer can be written down in advance: counts and cache shapes depend on the architecture.
"""

from __future__ import annotations

import copy
import functools
import numbers
from collections.abc import Callable, Iterator

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from autograder.checks import fixtures
from autograder.checks.harness import (
    CheckFailure,
    current_variant,
    describe,
    sandbox,
    seeded,
    student_call,
)
from autograder.checks.models import tiny_models
from autograder.checks.protocol import MalformedObservation, Observed, run_check

__all__ = [
    "GROUP_KEYS",
    "check_count_parameters_by_group",
    "check_freeze_except",
    "check_layer_hidden_states",
    "check_predict_cache_shapes",
    "expected_groups",
    "judge_count_parameters_by_group",
    "judge_freeze_except",
    "judge_layer_hidden_states",
    "judge_predict_cache_shapes",
    "observe_count_parameters_by_group",
    "observe_freeze_except",
    "observe_layer_hidden_states",
    "observe_predict_cache_shapes",
]

GROUP_KEYS: tuple[str, ...] = ("lm_head", "embeddings", "norm", "attention", "mlp")
"""The groups of notebook 00, in order (the rule itself is in ``autograder.reference.tour``,
hidden from grading kernels)."""


# ---------------------------------------------------------------------------------------------
# the models: the two fixed tiny ones, and two drawn from the variant
# ---------------------------------------------------------------------------------------------
def _pick(gen: torch.Generator, options: list) -> object:
    return options[int(torch.randint(len(options), (1,), generator=gen))]


@functools.lru_cache(maxsize=4)
def _drawn_templates(variant: int) -> tuple[tuple[str, PreTrainedModel], ...]:
    """A GPT-2 and a Llama whose architecture is drawn from ``variant`` (built once)."""
    with sandbox():
        gen = torch.Generator().manual_seed(seeded(50))
        common = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
        common["initializer_range"] = 0.2
        layers, heads, size = _pick(gen, [2, 3, 4]), _pick(gen, [2, 4]), _pick(gen, [4, 8])
        tied = bool(_pick(gen, [True, False]))
        vocab = 64 + int(torch.randint(17, (1,), generator=gen))
        gpt2 = GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=heads * size, n_layer=layers, n_head=heads,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied, **common,
        )  # fmt: skip
        gpt2_label = (
            f"GPT-2 (drawn: {layers} layers, d={heads * size}, {heads} heads, "
            f"{'tied' if tied else 'untied'} head)"
        )
        layers, heads = _pick(gen, [2, 3, 4]), _pick(gen, [4, 6])
        kv_heads = _pick(gen, [1, 2] if heads == 4 else [1, 2, 3])
        hidden = _pick(gen, [24, 48])
        head_dim = _pick(gen, [d for d in (8, 12, 16) if d != hidden // heads])
        tied = bool(_pick(gen, [True, False]))
        vocab = 64 + int(torch.randint(17, (1,), generator=gen))
        llama = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, max_position_embeddings=64, tie_word_embeddings=tied, **common,
        )  # fmt: skip
        llama_label = (
            f"Llama (drawn: {layers} layers, d={hidden}, {heads} heads, {kv_heads} KV heads, "
            f"head_dim={head_dim}, {'tied' if tied else 'untied'} head)"
        )
        templates = []
        torch.manual_seed(seeded(51))
        for label, model in (
            (gpt2_label, GPT2LMHeadModel(gpt2)),
            (llama_label, LlamaForCausalLM(llama)),
        ):
            model.set_attn_implementation("eager")
            templates.append((label, model.eval()))
        return tuple(templates)


def _models() -> Iterator[tuple[str, PreTrainedModel]]:
    """``(label, model)``: the fixed tiny GPT-2 and Llama-GQA, then the two drawn ones; each a
    fresh copy."""
    yield from tiny_models()
    for label, template in _drawn_templates(current_variant()):
        yield label, copy.deepcopy(template)


def _labels() -> list[str]:
    return [label for label, _ in _models()]


def _per_model(obs: Observed) -> list[tuple[str, PreTrainedModel, Observed]]:
    """The models of the variant, each with its observation (checked to be for it)."""
    models = list(_models())
    pairs = []
    for (label, model), o in zip(models, obs.subs("models", len(models)), strict=True):
        if o.str("label") != label:
            raise MalformedObservation(f"observation for {o.str('label')!r}, expected {label!r}")
        pairs.append((label, model, o))
    return pairs


def _is_gpt2(model: PreTrainedModel) -> bool:
    return model.config.model_type == "gpt2"


# ---------------------------------------------------------------------------------------------
# count_parameters_by_group
# ---------------------------------------------------------------------------------------------
def expected_groups(model: torch.nn.Module) -> dict[str, int]:
    """What ``count_parameters_by_group(model)`` must return (judge side only)."""
    return fixtures.reference().count_parameters_by_group(model)


def _half_frozen(model: torch.nn.Module) -> None:
    """Freeze every other parameter: a count must not depend on requires_grad."""
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)


def _number(value: object) -> int | float | None:
    """``value`` as a plain number (a Python or NumPy number, a one-element tensor), else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real)):
        return None
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def observe_count_parameters_by_group(count_parameters_by_group: Callable) -> dict:
    """Per model (half of its parameters frozen): the dict the student's function returned."""
    models = []
    for label, model in _models():
        _half_frozen(model)
        got = student_call("count_parameters_by_group(model)", count_parameters_by_group, model)
        if not isinstance(got, dict):
            raise AssertionError(
                f"{label}: count_parameters_by_group returned {type(got).__name__}, expected a "
                f"dict with keys {[*GROUP_KEYS, 'total']}"
            )
        result = {}
        for key, value in got.items():
            if not isinstance(key, str):
                raise AssertionError(
                    f"{label}: the result has the key {key!r}; expected exactly the string keys "
                    f"{[*GROUP_KEYS, 'total']}"
                )
            number = _number(value)
            if number is None:
                raise AssertionError(
                    f"{label}: count_parameters_by_group(model)[{key!r}] is {describe(value)}, "
                    "expected an int (a number of scalar parameters)"
                )
            result[key] = number
        models.append({"label": label, "result": result})
    return {"models": models}


def judge_count_parameters_by_group(obs: Observed) -> None:
    for label, model, o in _per_model(obs):
        _half_frozen(model)
        expected = expected_groups(model)
        result = o.sub("result")
        got = {key: result.float(key) for key in result.keys()}
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
                f"{label}: total is {got['total']:g}, the number of parameter TENSORS; count "
                f"scalars with p.numel() (expected {expected['total']})"
            )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if got["total"] == trainable and trainable != expected["total"]:
            raise AssertionError(
                f"{label}: total is {got['total']:g}, only the parameters with "
                f"requires_grad=True; the model has {expected['total']}: count frozen "
                "parameters too"
            )
        if expected["lm_head"] == 0 and got["lm_head"] != 0:
            head = model.get_output_embeddings().weight
            embedding = next(n for n, p in model.named_parameters() if p is head)
            hint = (
                f" This model ties lm_head.weight to {embedding}: it is ONE tensor, listed once "
                "by named_parameters() but twice by state_dict()"
                if got["lm_head"] == head.numel()
                else ""
            )
            raise AssertionError(f"{label}: lm_head counts {got['lm_head']:g}, expected 0.{hint}")
        if got["lm_head"] == 0 != expected["lm_head"]:
            raise AssertionError(
                f"{label}: lm_head counts 0, expected {expected['lm_head']}: this model's output "
                "head is NOT tied to the embedding; count the whole model (model.named_parameters()"
                ", not only the decoder's)"
            )
        for key, want in expected.items():
            if got[key] != want:
                raise AssertionError(
                    f"{label}: group {key!r} counts {got[key]:g}, expected {want}; the rule: a "
                    "parameter joins the FIRST group (lm_head, embeddings, norm, attention, mlp) "
                    "one of whose substrings is in its name"
                )


def check_count_parameters_by_group(count_parameters_by_group: Callable) -> None:
    """count_parameters_by_group: every group and the total, tied and frozen weights included."""
    run_check(
        observe_count_parameters_by_group,
        judge_count_parameters_by_group,
        count_parameters_by_group,
    )


# ---------------------------------------------------------------------------------------------
# freeze_except
# ---------------------------------------------------------------------------------------------
_FIXED_CASES = {
    "GPT-2": [["ln_f"], ["wpe", "h.1.mlp"]],
    "Llama-GQA": [["self_attn.k_proj"], ["model.norm", "layers.2"]],
}


def _freeze_cases(label: str, model: torch.nn.Module) -> list[list[str]]:
    """The ``names`` lists given to freeze_except: fixed for the fixed models, drawn from the
    variant for the drawn ones (parts of parameter names, never whole names)."""
    if label in _FIXED_CASES:
        return _FIXED_CASES[label]
    n = model.config.num_hidden_layers
    if _is_gpt2(model):
        pool = ["ln_f", "wpe", "c_proj", "c_fc", *(f"h.{i}.mlp" for i in range(n))]
        pool += [f"h.{i}.attn" for i in range(n)] + [f"h.{i}.ln_1" for i in range(n)]
    else:
        pool = ["model.norm", "self_attn.k_proj", "mlp.up_proj", "v_proj"]
        pool += [f"layers.{i}" for i in range(n)]
        pool += [f"layers.{i}.input_layernorm" for i in range(n)]
    gen = torch.Generator().manual_seed(seeded(53 if _is_gpt2(model) else 54))
    order = torch.randperm(len(pool), generator=gen).tolist()
    return [[pool[order[0]]], [pool[order[1]], pool[order[2]]]]


def _mixed_state(model: torch.nn.Module) -> None:
    """Some parameters frozen, including some of those to keep."""
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 0)


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _show(names: set[str], limit: int = 4) -> str:
    shown = sorted(names)[:limit]
    return "{" + ", ".join(shown) + (", ..." if len(names) > limit else "") + "}"


def _freeze(freeze_except: Callable, model: torch.nn.Module, names: list[str]) -> tuple:
    """``(returned, None)`` from ``freeze_except(model, names)``, or ``(None, message)`` when it
    raised ``ValueError`` (part of the contract); any other failure is an AssertionError naming
    the call."""

    def call(m, n):
        try:
            return freeze_except(m, n), None
        except ValueError as err:
            return None, str(err) or "ValueError"

    return student_call(f"freeze_except(model, {names})", call, model, list(names))


def observe_freeze_except(freeze_except: Callable) -> dict:
    """Per model and per ``names`` case (from a mixed frozen state): whether freeze_except
    refused, whether it returned the model, which parameters are trainable afterwards; then
    every parameter's value, and whether a name that matches nothing is refused."""
    models = []
    for label, model in _models():
        cases = []
        for names in _freeze_cases(label, model):
            _mixed_state(model)
            with torch.no_grad():
                out, refused = _freeze(freeze_except, model, names)
            cases.append(
                {
                    "names": list(names),
                    "refused": refused,
                    "same_object": out is model,
                    "returned": type(out).__name__,
                    "trainable": sorted(_trainable(model)),
                }
            )
        values = {n: p.detach() for n, p in model.named_parameters()}
        _, refused = _freeze(freeze_except, model, ["no_such_layer"])
        models.append(
            {"label": label, "cases": cases, "values": values, "typo_refused": refused is not None}
        )
    return {"models": models}


def judge_freeze_except(obs: Observed) -> None:
    for label, model, o in _per_model(obs):
        params = dict(model.named_parameters())
        cases = _freeze_cases(label, model)
        for names, c in zip(cases, o.subs("cases", len(cases)), strict=True):
            if c.strings("names") != names:
                raise MalformedObservation(f"{label}: observation for names {c.strings('names')}")
            _mixed_state(model)
            pre = _trainable(model)
            want = {n for n in params if any(k in n for k in names)}
            refused = c.maybe_str("refused")
            if refused is not None:
                raise AssertionError(
                    f"{label}: freeze_except(model, {names}) raised ValueError ({refused}), but "
                    f"the names match {_show(want)}: a name counts when it is a SUBSTRING of the "
                    "parameter's name (`key in name`), not only when equal"
                )
            if not c.bool("same_object"):
                raise AssertionError(
                    f"{label}: freeze_except returned {c.str('returned')}, expected the same "
                    "model object (return model at the end)"
                )
            got = set(c.strings("trainable"))
            if not got <= set(params):
                raise MalformedObservation(
                    f"{label}: unknown parameters {sorted(got - set(params))[:3]}"
                )
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
        values = o.sub("values")
        for n, p in params.items():
            if not torch.equal(values.tensor(n, tuple(p.shape)), p.detach()):
                raise AssertionError(f"{label}: freeze_except changed the VALUES of {n}")
        if not o.bool("typo_refused"):
            raise AssertionError(
                f"{label}: freeze_except(model, ['no_such_layer']) matched no parameter and raised "
                "nothing: raise ValueError, or a typo silently freezes the whole model"
            )


def check_freeze_except(freeze_except: Callable) -> None:
    """freeze_except: exactly the named parameters stay trainable (substring match), frozen ones
    named are unfrozen, values untouched, unknown names refused."""
    run_check(observe_freeze_except, judge_freeze_except, freeze_except)


# ---------------------------------------------------------------------------------------------
# layer_hidden_states
# ---------------------------------------------------------------------------------------------
_HIDDEN_SHAPE = (2, 7)


def _hidden_ids(model: PreTrainedModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seeded(1))
    return torch.randint(1, model.config.vocab_size, _HIDDEN_SHAPE, generator=gen)


def observe_layer_hidden_states(layer_hidden_states: Callable) -> dict:
    """Per model: what the student's function returned for token ids drawn from the variant
    (each element a tensor, or its type's name), and whether each element requires grad."""
    models = []
    for label, model in _models():
        ids = _hidden_ids(model)
        got = student_call("layer_hidden_states(model, input_ids)", layer_hidden_states, model, ids)
        if isinstance(got, torch.Tensor):
            n = model.config.num_hidden_layers
            raise AssertionError(
                f"{label}: got one tensor of shape {tuple(got.shape)}, expected a list of "
                f"{n + 1} tensors (B, T, d): the embedding output, then one per layer"
            )
        got = student_call("list(layer_hidden_states(model, input_ids))", list, got)
        models.append(
            {
                "label": label,
                "hidden": [h.detach() if isinstance(h, torch.Tensor) else describe(h) for h in got],
                "requires_grad": [isinstance(h, torch.Tensor) and h.requires_grad for h in got],
            }
        )
    return {"models": models}


def judge_layer_hidden_states(obs: Observed) -> None:
    for label, model, o in _per_model(obs):
        ids = _hidden_ids(model)
        t = ids.shape[1]
        with torch.no_grad():
            ref = model(input_ids=ids, output_hidden_states=True).hidden_states
            embeds = model.get_input_embeddings()(ids)
            if _is_gpt2(model):
                embeds = embeds + model.transformer.wpe(torch.arange(t))[None]
        n_layers = len(ref) - 1
        got = o.list("hidden")
        grads = o.list("requires_grad", len(got))
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
        for i, (h, r) in enumerate(zip(got, ref, strict=True)):
            if not isinstance(h, torch.Tensor) or h.shape != r.shape:
                shape = tuple(h.shape) if isinstance(h, torch.Tensor) else h
                if not isinstance(shape, (tuple, str)):
                    raise MalformedObservation(f"observation field hidden[{i}] is malformed")
                raise AssertionError(
                    f"{label}: element {i} has shape {shape}, expected {tuple(r.shape)} (B, T, d)"
                )
            if not isinstance(grads[i], bool):
                raise MalformedObservation(f"observation field requires_grad[{i}] is not a bool")
            if grads[i]:
                raise AssertionError(
                    f"{label}: element {i} requires grad: run the model under torch.no_grad() "
                    "(inspection must not build an autograd graph)"
                )
        if not torch.allclose(got[0], embeds, atol=1e-5):
            raise AssertionError(
                f"{label}: element 0 is not the embedding output (token"
                + (" + position" if _is_gpt2(model) else "")
                + " embeddings)"
            )
        for i, (h, r) in enumerate(zip(got, ref, strict=True)):
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


def check_layer_hidden_states(layer_hidden_states: Callable) -> None:
    """layer_hidden_states: L+1 detached (B, T, d) tensors, the embedding output first, matching
    transformers' output_hidden_states."""
    run_check(observe_layer_hidden_states, judge_layer_hidden_states, layer_hidden_states)


# ---------------------------------------------------------------------------------------------
# predict_cache_shapes
# ---------------------------------------------------------------------------------------------
def _cache_sizes() -> list[tuple[int, int]]:
    """``(batch, seq)`` pairs: two fixed, one drawn from the variant."""
    gen = torch.Generator().manual_seed(seeded(55))
    batch = 1 + int(torch.randint(4, (1,), generator=gen))
    seq = 2 + int(torch.randint(11, (1,), generator=gen))
    return [(2, 5), (1, 9), (batch, seq)]


def _actual_cache_shapes(model: torch.nn.Module, batch: int, seq: int) -> list[tuple]:
    """The cache shapes ``model`` really builds (judge side only)."""
    gen = torch.Generator().manual_seed(seeded(56))
    ids = torch.randint(1, model.config.vocab_size, (batch, seq), generator=gen)
    return fixtures.reference().cache_shapes(model, ids)


def observe_predict_cache_shapes(predict_cache_shapes: Callable) -> dict:
    """Per model and ``(batch, seq)``: the predicted ``[key_shape, value_shape]`` per layer."""
    models = []
    for label, model in _models():
        sizes = []
        for batch, seq in _cache_sizes():
            got = student_call(
                f"predict_cache_shapes(config, {batch}, {seq})",
                predict_cache_shapes,
                copy.deepcopy(model.config),
                batch,
                seq,
            )
            try:
                shapes = [[[int(x) for x in k], [int(x) for x in v]] for k, v in got]
            except (TypeError, ValueError) as err:
                raise CheckFailure(
                    f"{label}: expected a list with one (key_shape, value_shape) pair per layer, "
                    f"got {got!r:.120}"
                ) from err
            sizes.append({"batch": batch, "seq": seq, "shapes": shapes})
        models.append({"label": label, "sizes": sizes})
    return {"models": models}


def _shape_pairs(o: Observed) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    pairs = []
    for pair in o.list("shapes"):
        ok = isinstance(pair, list) and len(pair) == 2
        ok = ok and all(isinstance(s, list) for s in pair)
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for s in pair for x in s)
        if not ok:
            raise MalformedObservation("observation field shapes is not a list of shape pairs")
        pairs.append((tuple(pair[0]), tuple(pair[1])))
    return pairs


def judge_predict_cache_shapes(obs: Observed) -> None:
    for label, model, o in _per_model(obs):
        sizes = _cache_sizes()
        cfg = model.config
        for (batch, seq), s in zip(sizes, o.subs("sizes", len(sizes)), strict=True):
            if (s.int("batch"), s.int("seq")) != (batch, seq):
                raise MalformedObservation(f"{label}: observation for the wrong (batch, seq)")
            want = _actual_cache_shapes(model, batch, seq)
            got = _shape_pairs(s)
            if len(got) != len(want):
                raise AssertionError(
                    f"{label}: {len(got)} layers predicted, the model has {len(want)}: one "
                    "(key_shape, value_shape) pair per layer"
                )
            for i, ((gk, gv), (wk, wv)) in enumerate(zip(got, want, strict=True)):
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


def check_predict_cache_shapes(predict_cache_shapes: Callable) -> None:
    """predict_cache_shapes: per layer (key, value) shapes (B, H_kv, T, head_dim) equal to the
    cache the model really builds, on GPT-2 and on Llama with grouped-query attention."""
    run_check(observe_predict_cache_shapes, judge_predict_cache_shapes, predict_cache_shapes)
