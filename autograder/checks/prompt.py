"""Checks for notebook 01, prompt tuning: ``SoftPrompt``, ``prepend_prompt``, training,
save/load, and equivalence with a hard prompt and with PEFT's PromptTuning.

Prompt tuning puts ``P`` trainable vectors in front of the token embeddings and nowhere else:
the checks run the student's objects on tiny GPT-2 and Llama-GQA models and record every
layer's attention, so a prompt that sneaks in as a key/value prefix is caught, as are a wrong
mask, unmasked labels, a detached prompt or an initialisation at the wrong scale.

Each check is an *observe* / *judge* pair (see :mod:`autograder.checks.protocol`). Where the
spec fixes the values, the grader feeds its own: prompt values drawn from the variant are
copied into the student's ``SoftPrompt`` before ``prepend_prompt`` sees it, text-init ids are
drawn from the variant, and the judge computes what the reference gives on the same values
(model inputs, logits, the prompt's gradient, three steps of training, PEFT's PromptTuning).
Where the spec leaves values free (the random init), the judge validates what was recorded:
its scale against the judge's own embedding table, distinct rows, determinism per seed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autograder.checks import fixtures
from autograder.checks.frozen import judge_training, observe_training, train_with_grader_optimizer
from autograder.checks.harness import CheckFailure, describe, max_diff, seeded, student_call
from autograder.checks.models import KINDS, VOCAB, Batch, tiny_model, tiny_models
from autograder.checks.protocol import MalformedObservation, Observed, run_check
from autograder.checks.recording import record

__all__ = [
    "check_peft_prompt_equivalence",
    "check_prepend_prompt",
    "check_prompt_equivalence",
    "check_prompt_training",
    "check_save_load_prompt",
    "check_soft_prompt",
    "judge_peft_prompt_equivalence",
    "judge_prepend_prompt",
    "judge_prompt_equivalence",
    "judge_prompt_training",
    "judge_save_load_prompt",
    "judge_soft_prompt",
    "observe_peft_prompt_equivalence",
    "observe_prepend_prompt",
    "observe_prompt_equivalence",
    "observe_prompt_training",
    "observe_save_load_prompt",
    "observe_soft_prompt",
]

IGNORE_INDEX = -100
_CACHE_KEYS = ("cache", "past_key_values")
_SCALARS = ("bool", "int", "float", "str")
"""Types of extra model inputs (flags like ``use_cache=False``) a judge may leave out."""
_ATOL = 1e-5
_PROMPT_STD = 0.2
"""Scale of the prompt values the grader copies into a student's prompt (the tiny models'
embedding rows have std 0.2 too)."""


def _reference() -> Any:
    """The reference implementation: judges only (it does not exist in a grading kernel; a
    student package replays its stored results, :mod:`autograder.checks.fixtures`)."""
    return fixtures.reference()


def _make_prompt(SoftPrompt: type, n_tokens: int, embedding: nn.Embedding, **kwargs) -> nn.Module:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return student_call(
        f"SoftPrompt({n_tokens}, embedding{', ' + args if args else ''})",
        SoftPrompt,
        n_tokens,
        embedding,
        **kwargs,
    )


def _model_inputs(label: str, out: object) -> Mapping:
    if not isinstance(out, Mapping):
        raise CheckFailure(
            f"{label}: prepend_prompt returned {describe(out)}, expected a dict of model inputs "
            "(inputs_embeds, attention_mask, labels) for model(**inputs)"
        )
    return out


def _weight(label: str, prompt: nn.Module, shape: tuple[int, int], how: str) -> torch.Tensor:
    weight = getattr(prompt, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise CheckFailure(
            f"{label}: SoftPrompt({how}).weight is {describe(weight)}, expected an nn.Parameter "
            f"of shape {shape} (P, d)"
        )
    if tuple(weight.shape) != shape:
        raise CheckFailure(
            f"{label}: SoftPrompt({how}).weight has shape {tuple(weight.shape)}, expected "
            f"{shape} (P, d): one row of the hidden size d per prompt token"
        )
    return weight


def _prompt_values(p: int, d: int, n: int) -> torch.Tensor:
    """``(p, d)`` prompt values drawn from input ``n`` of the variant."""
    gen = torch.Generator().manual_seed(seeded(n))
    return torch.randn(p, d, generator=gen) * _PROMPT_STD


def _set_values(label: str, prompt: nn.Module, values: torch.Tensor, how: str) -> nn.Parameter:
    """Copy the grader's ``values`` into the student's prompt (its ``weight``)."""
    weight = _weight(label, prompt, tuple(values.shape), how)
    with torch.no_grad():
        weight.copy_(values)
    return weight


def _per_model(obs: Observed, labels: tuple[str, ...] = KINDS) -> list[Observed]:
    """The per-model observations, checked to be for ``labels`` in order."""
    subs = obs.subs("models", len(labels))
    for label, o in zip(labels, subs, strict=True):
        if o.str("label") != label:
            raise MalformedObservation(f"observation for {o.str('label')!r}, expected {label!r}")
    return subs


# ---------------------------------------------------------------------------------------------
# what prepend_prompt returned, as data
# ---------------------------------------------------------------------------------------------
def _inputs_data(label: str, out: object) -> dict:
    """The model inputs ``out`` as data: ``tensors`` (name -> tensor) and ``others`` (name ->
    type name, for anything else that is not None, a cache object say)."""
    tensors, others = {}, {}
    for key, value in _model_inputs(label, out).items():
        if not isinstance(key, str):
            raise AssertionError(
                f"{label}: prepend_prompt returned a dict with the key {key!r}; model inputs are "
                "keyword arguments, named by strings"
            )
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach()
        elif value is not None:
            others[key] = type(value).__name__
    return {"tensors": tensors, "others": others}


def _no_cache(label: str, inputs: Observed) -> None:
    tensors, others = inputs.sub("tensors"), inputs.sub("others")
    for key in _CACHE_KEYS:
        if tensors.has(key) or others.has(key):
            raise AssertionError(
                f"{label}: prepend_prompt returned a key/value cache ({key!r}): that is prefix "
                "tuning. Prompt tuning only prepends P vectors to inputs_embeds; the model "
                "computes every layer's keys and values from them"
            )


def _no_kv_prefix(label: str, calls: list[Observed]) -> None:
    """Prompt tuning leaves every layer with as many keys as queries."""
    for call in calls:
        if call.int("key_len") != call.int("query_len"):
            raise AssertionError(
                f"{label}: layer {call.int('layer')}: attention saw {call.int('key_len')} keys "
                f"for {call.int('query_len')} queries — the soft prompt became a key/value prefix "
                "(prefix tuning). Prompt tuning feeds it ONLY as input embeddings, so every layer "
                "has as many keys as queries"
            )


def _tensor_inputs(label: str, inputs: Observed) -> dict[str, torch.Tensor]:
    """The tensors of recorded model inputs, after refusing a cache and any other object."""
    _no_cache(label, inputs)
    others = inputs.sub("others")
    objects = [key for key in others.keys() if others.str(key) not in _SCALARS]
    if objects:
        key = objects[0]
        raise AssertionError(
            f"{label}: prepend_prompt returned {key!r} = a {others.str(key)}; expected tensors "
            "only: inputs_embeds (B, P+T, d), attention_mask (B, P+T) and labels (B, P+T)"
        )
    tensors = inputs.sub("tensors")
    return {key: tensors.tensor(key) for key in tensors.keys()}


def _shapes_or_fail(
    label: str, tensors: Mapping[str, torch.Tensor], b: int, p: int, t: int, d: int, labels: bool
) -> None:
    """``inputs_embeds (b, p+t, d)``, ``attention_mask (b, p+t)`` and, when ``labels``,
    ``labels (b, p+t)``, and no ``input_ids``."""
    embeds = tensors.get("inputs_embeds")
    if "input_ids" in tensors or embeds is None:
        raise AssertionError(
            f"{label}: prepend_prompt returned keys {sorted(tensors)}, expected 'inputs_embeds' "
            "(B, P+T, d) and 'attention_mask' (B, P+T) (and 'labels' when labels are given), "
            "no 'input_ids': the model reads the embeddings you built instead of the ids"
        )
    if tuple(embeds.shape) != (b, p + t, d) or not embeds.is_floating_point():
        raise AssertionError(
            f"{label}: inputs_embeds is {describe(embeds)}, expected a float tensor "
            f"{(b, p + t, d)} (B, P+T, d): the {p} prompt vectors followed by the {t} token "
            "embeddings"
        )
    mask = tensors.get("attention_mask")
    if mask is None or tuple(mask.shape) != (b, p + t):
        raise AssertionError(
            f"{label}: attention_mask is {describe(mask)}, expected shape {(b, p + t)} (B, P+T): "
            f"extend the mask with {p} ones in front, one per prompt vector"
        )
    got = tensors.get("labels")
    if labels and (got is None or tuple(got.shape) != (b, p + t)):
        raise AssertionError(
            f"{label}: labels is {describe(got)}, expected shape {(b, p + t)} (B, P+T): "
            f"extend the labels with {p} entries of -100 in front"
        )


def _judge_forward(label: str, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> object:
    """The judge's own ``model(**tensors)``, without gradients."""
    try:
        with torch.no_grad():
            return model(**tensors)
    except Exception as err:  # noqa: BLE001 - reported as the check's failure
        raise AssertionError(
            f"{label}: model(**prepend_prompt(...)) raised {type(err).__name__}: {err}"
        ) from None


def _same_run(label: str, kernel: torch.Tensor, judged: torch.Tensor) -> None:
    """The logits the model gave in the student's session are the ones it gives the judge on
    the same inputs (prepend_prompt left the model as it was)."""
    if kernel.shape != judged.shape or max_diff(kernel, judged) > _ATOL:
        raise AssertionError(
            f"{label}: model(**prepend_prompt(...)) in your session gave other logits than the "
            "same model gives on those inputs_embeds, attention_mask and labels alone: "
            "prepend_prompt must return only these inputs (no extra ones such as position_ids) "
            "and must not change the model (no hooks, no patched modules or attention)"
        )


# ---------------------------------------------------------------------------------------------
# SoftPrompt
# ---------------------------------------------------------------------------------------------
_P_RANDOM = 5


def _embeddings() -> Iterator[tuple[str, nn.Embedding]]:
    """The embeddings a SoftPrompt is built on: each tiny model's, and a plain table of another
    width at a scale drawn from the variant (about that of real models, 0.01 to 0.05)."""
    for label, model in tiny_models():
        yield label, model.get_input_embeddings()
    gen = torch.Generator().manual_seed(seeded(40))
    std = 0.01 + 0.04 * torch.rand((), generator=gen).item()
    table = torch.randn(50, 24, generator=gen) * std
    embedding = nn.Embedding(50, 24)
    with torch.no_grad():
        embedding.weight.copy_(table)
    yield f"nn.Embedding(50, 24) at std {std:.3f}", embedding


def _text_ids(vocab: int) -> tuple[list[int], list[int]]:
    """Token ids for ``init='text'``: 5 ids, and 3 ids to be cycled to P = 7."""
    gen = torch.Generator().manual_seed(seeded(42))
    ids = torch.randint(3, vocab, (8,), generator=gen).tolist()
    return ids[:5], ids[5:]


def _observe_random_init(label: str, SoftPrompt: type, embedding: nn.Embedding) -> dict:
    p, d = _P_RANDOM, embedding.weight.shape[1]
    prompt = _make_prompt(SoftPrompt, p, embedding, init="random", seed=0)
    weight = _weight(label, prompt, (p, d), "5, embedding, init='random'")
    params = list(prompt.named_parameters())
    again = _make_prompt(SoftPrompt, p, embedding, init="random", seed=0)
    other = _make_prompt(SoftPrompt, p, embedding, init="random", seed=1)
    again_w = _weight(label, again, (p, d), "5, embedding, init='random', seed=0")
    other_w = _weight(label, other, (p, d), "5, embedding, init='random', seed=1")
    out = student_call("prompt(3)", prompt, 3)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (3, p, d):
        raise AssertionError(
            f"{label}: prompt(3) returned {describe(out)}, expected a tensor (3, {p}, {d}) "
            "(batch_size, P, d)"
        )
    grad = None
    if out.requires_grad:
        upstream = torch.randn(3, p, d, generator=torch.Generator().manual_seed(seeded(41)))
        try:
            (out * upstream).sum().backward()
        except RuntimeError:
            pass
        grad = weight.grad
    return {
        "weight": weight.detach(),
        "parameter_names": [n for n, _ in params],
        "parameter_sizes": [t.numel() for _, t in params],
        "requires_grad": weight.requires_grad,
        "again": again_w.detach(),
        "other": other_w.detach(),
        "out": out.detach(),
        "grad": grad,
        "table_after": embedding.weight.detach(),
    }


def _judge_random_init(label: str, o: Observed, table: torch.Tensor) -> None:
    p, d = _P_RANDOM, table.shape[1]
    weight = o.tensor("weight", (p, d))
    names, sizes = (
        o.strings("parameter_names"),
        o.list("parameter_sizes", len(o.list("parameter_names"))),
    )
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise MalformedObservation("observation field parameter_sizes holds non-integers")
    if sum(sizes) != p * d:
        raise AssertionError(
            f"{label}: SoftPrompt(5, embedding) has {sum(sizes)} parameter values "
            f"({', '.join(names)}), expected P·d = {p * d}. Store only the (P, d) "
            "prompt: read the embedding in __init__ to size and initialise the prompt, but do "
            "not keep it as an attribute (it would become a submodule, and its whole vocabulary "
            "table would count as prompt parameters)"
        )
    if not o.bool("requires_grad"):
        raise AssertionError(f"{label}: SoftPrompt.weight does not require grad")
    std, target = weight.float().std().item(), table.float().std().item()
    if not 0.5 * target < std < 2.0 * target:
        hint = (
            " — it looks like N(0, 1): multiply by the std of the real embedding rows"
            if 0.7 < std < 1.4
            else ""
        )
        raise AssertionError(
            f"{label}: init='random' gives values with std {std:.3f}, expected about the std of "
            f"the real embedding rows, {target:.3f}{hint}. Vectors far larger or smaller than "
            "real token embeddings train badly"
        )
    same = [(i, j) for i in range(p) for j in range(i) if torch.equal(weight[i], weight[j])]
    if same:
        raise AssertionError(
            f"{label}: init='random' gives identical rows {same[0][1]} and {same[0][0]}: draw "
            "every value of the (P, d) prompt independently"
        )
    if not torch.equal(o.tensor("again", (p, d)), weight):
        raise AssertionError(
            f"{label}: two SoftPrompt(5, embedding, init='random', seed=0) differ: seed a "
            "torch.Generator with `seed` and draw from it"
        )
    if torch.equal(o.tensor("other", (p, d)), weight):
        raise AssertionError(
            f"{label}: seed=0 and seed=1 give the same random prompt: the seed is ignored"
        )
    out = o.tensor("out", (3, p, d))
    if not all(torch.equal(row, weight) for row in out):
        raise AssertionError(f"{label}: prompt(3)[b] is not prompt.weight for every b")
    grad = o.maybe_tensor("grad")
    if grad is None or tuple(grad.shape) != (p, d) or not grad.abs().sum() > 0:
        raise AssertionError(
            f"{label}: a loss on prompt(3) leaves no gradient on prompt.weight: return "
            "the weight itself expanded (weight.unsqueeze(0).expand(...)), not a detached copy"
        )
    upstream = torch.randn(3, p, d, generator=torch.Generator().manual_seed(seeded(41)))
    if max_diff(grad, upstream.sum(0)) > _ATOL:
        raise AssertionError(
            f"{label}: the gradient reaching prompt.weight through prompt(3) is not the batch's "
            f"gradients summed (max |diff| {max_diff(grad, upstream.sum(0)):.3g}): every row "
            "prompt(B)[b] must be prompt.weight itself, unscaled"
        )
    if not torch.equal(o.tensor("table_after", tuple(table.shape)), table):
        raise AssertionError(f"{label}: building a SoftPrompt changed the embedding table")


def _observe_vocab_init(label: str, SoftPrompt: type, embedding: nn.Embedding) -> dict:
    p, d = _P_RANDOM, embedding.weight.shape[1]
    table = embedding.weight.detach().clone()
    prompt = _make_prompt(SoftPrompt, p, embedding, init="vocab", seed=0)
    weight = _weight(label, prompt, (p, d), "5, embedding, init='vocab'")
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
        edited = embedding.weight.detach().clone()
        embedding.weight.copy_(table)
    again = _make_prompt(SoftPrompt, p, embedding, init="vocab", seed=0)
    other = _make_prompt(SoftPrompt, p, embedding, init="vocab", seed=1)
    return {
        "weight": original,
        "table_after_edit": edited,
        "again": _weight(label, again, (p, d), "5, embedding, init='vocab', seed=0").detach(),
        "other": _weight(label, other, (p, d), "5, embedding, init='vocab', seed=1").detach(),
    }


def _judge_vocab_init(label: str, o: Observed, table: torch.Tensor) -> None:
    p, d = _P_RANDOM, table.shape[1]
    weight = o.tensor("weight", (p, d))
    is_row = (weight[:, None, :] == table[None]).all(-1).any(-1)
    if not is_row.all():
        bad = is_row.logical_not().nonzero().flatten().tolist()
        raise AssertionError(
            f"{label}: init='vocab': prompt rows {bad} are not rows of the embedding table; copy "
            "the rows of randomly sampled token ids"
        )
    if not torch.equal(o.tensor("table_after_edit", tuple(table.shape)), table):
        raise AssertionError(
            f"{label}: init='vocab': changing the prompt changed the embedding table — the prompt "
            "shares memory with the model's weights (a slice/view of embedding.weight). Copy "
            "the rows (.clone()), or training the prompt edits the frozen vocabulary"
        )
    again, other = o.tensor("again", (p, d)), o.tensor("other", (p, d))
    if not torch.equal(again, weight):
        raise AssertionError(
            f"{label}: two SoftPrompt(5, embedding, init='vocab', seed=0) differ: sample the ids "
            "with a torch.Generator seeded with `seed`"
        )
    if torch.equal(other, again):
        raise AssertionError(
            f"{label}: init='vocab' with seed=0 and seed=1 picks the same rows: sample random "
            "token ids with the seeded generator"
        )


def _observe_text_init(label: str, SoftPrompt: type, embedding: nn.Embedding) -> dict:
    d = embedding.weight.shape[1]
    ids, short = _text_ids(embedding.weight.shape[0])
    prompt = _make_prompt(SoftPrompt, 5, embedding, init="text", init_ids=ids)
    weight = _weight(label, prompt, (5, d), f"5, embedding, init='text', init_ids={ids}")
    cycled = _make_prompt(SoftPrompt, 7, embedding, init="text", init_ids=short)
    cycled_w = _weight(label, cycled, (7, d), f"7, embedding, init='text', init_ids={short}")
    return {"weight": weight.detach(), "cycled": cycled_w.detach()}


def _judge_text_init(label: str, o: Observed, table: torch.Tensor) -> None:
    d = table.shape[1]
    ids, short = _text_ids(table.shape[0])
    weight = o.tensor("weight", (5, d))
    if not torch.equal(weight, table[ids]):
        raise AssertionError(
            f"{label}: init='text', init_ids={ids}: the prompt rows are not embedding rows "
            f"{ids} in order (max |diff| {max_diff(weight, table[ids]):.3g}); row i must be "
            "embedding.weight[init_ids[i]]"
        )
    want = [short[i % 3] for i in range(7)]
    if not torch.equal(o.tensor("cycled", (7, d)), table[want]):
        raise AssertionError(
            f"{label}: init='text' with 3 ids for P=7 should repeat the text: rows {want}"
        )


def observe_soft_prompt(SoftPrompt: type) -> dict:
    """Per embedding: the prompts each init builds, prompt(3), the gradient a loss on it leaves
    on the weight (the upstream gradient drawn from the variant), the table afterwards."""
    cases = []
    for label, embedding in _embeddings():
        cases.append(
            {
                "label": label,
                "random": _observe_random_init(label, SoftPrompt, embedding),
                "vocab": _observe_vocab_init(label, SoftPrompt, embedding),
                "text": _observe_text_init(label, SoftPrompt, embedding),
            }
        )
    return {"models": cases}


def judge_soft_prompt(obs: Observed) -> None:
    cases = list(_embeddings())
    for (label, embedding), o in zip(
        cases, _per_model(obs, tuple(c[0] for c in cases)), strict=True
    ):
        table = embedding.weight.detach()
        _judge_random_init(label, o.sub("random"), table)
        _judge_vocab_init(label, o.sub("vocab"), table)
        _judge_text_init(label, o.sub("text"), table)


def check_soft_prompt(SoftPrompt: type) -> None:
    """SoftPrompt: a (P, d) parameter and nothing else; random init at the scale of real
    embeddings, seeded; 'vocab' copies real rows; 'text' copies the text's rows; forward(B) is
    (B, P, d) with a gradient path."""
    run_check(observe_soft_prompt, judge_soft_prompt, SoftPrompt)


# ---------------------------------------------------------------------------------------------
# prepend_prompt
# ---------------------------------------------------------------------------------------------
_P_PREPEND = 4


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def observe_prepend_prompt(prepend_prompt: Callable, SoftPrompt: type) -> dict:
    """Per model (frozen), with the grader's prompt values copied into the student's
    SoftPrompt: the inputs prepend_prompt returns with and without labels, what every layer's
    attention saw and the logits and loss of ``model(**inputs)``, and the prompt's gradient."""
    models = []
    for label, model in tiny_models():
        _freeze(model)
        batch = Batch()
        d = model.get_input_embeddings().weight.shape[1]
        prompt = _make_prompt(SoftPrompt, _P_PREPEND, model.get_input_embeddings(), seed=0)
        weight = _set_values(label, prompt, _prompt_values(_P_PREPEND, d, 43), "4, embedding")
        out = student_call(
            "prepend_prompt(model, prompt, input_ids, attention_mask, labels)",
            prepend_prompt, model, prompt, batch.input_ids, batch.attention_mask, batch.labels,
        )  # fmt: skip
        inputs = _inputs_data(label, out)
        with record(model) as rec:
            try:
                outputs, error = model(**out), None
            except Exception as err:  # noqa: BLE001 - reported after the structural checks
                outputs, error = None, f"{type(err).__name__}: {err}"
        logits = getattr(outputs, "logits", None)
        loss = getattr(outputs, "loss", None)
        bare = student_call(
            "prepend_prompt(model, prompt, input_ids, attention_mask) without labels",
            prepend_prompt, model, prompt, batch.input_ids, batch.attention_mask,
        )  # fmt: skip
        bare_inputs = _inputs_data(label, bare)
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        models.append(
            {
                "label": label,
                "inputs": inputs,
                "calls": [
                    {"layer": c.layer, "query_len": c.query_len, "key_len": c.key_len}
                    for c in rec.calls
                ],
                "error": error,
                "logits": logits.detach() if isinstance(logits, torch.Tensor) else None,
                "loss": loss.detach() if isinstance(loss, torch.Tensor) else None,
                "bare": bare_inputs,
                "grad": weight.grad,
            }
        )
    return {"models": models}


def _values_or_fail(
    label: str,
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    weight: torch.Tensor,
) -> None:
    """The recorded inputs hold the reference's values (``expected``) for prompt ``weight``."""
    embeds, want = tensors["inputs_embeds"], expected["inputs_embeds"]
    p, b, t = weight.shape[0], want.shape[0], want.shape[1] - weight.shape[0]
    prompt = weight.expand(b, -1, -1)
    if torch.allclose(embeds[:, t:], prompt):
        raise AssertionError(
            f"{label}: the prompt sits AFTER the tokens in inputs_embeds; it must come first: "
            "torch.cat([prompt(B), token_embeddings], dim=1)"
        )
    if not torch.allclose(embeds[:, :p], prompt):
        raise AssertionError(
            f"{label}: inputs_embeds[:, :P] is not the prompt (max |diff| "
            f"{max_diff(embeds[:, :p], prompt):.3g}); put prompt(B), unscaled, in front"
        )
    if not torch.allclose(embeds[:, p:], want[:, p:]):
        raise AssertionError(
            f"{label}: inputs_embeds[:, P:] is not the token embeddings "
            "model.get_input_embeddings()(input_ids)"
        )
    mask = tensors["attention_mask"]
    if not torch.equal(mask.double(), expected["attention_mask"].double()):
        front = mask[:, :p].tolist()
        raise AssertionError(
            f"{label}: attention_mask is wrong: its first P columns are {front}, expected all 1 "
            "(the prompt is always visible), followed by the original mask"
        )
    if "labels" in expected:
        labels, want_labels = tensors["labels"], expected["labels"]
        if not torch.equal(labels[:, :p].double(), want_labels[:, :p].double()):
            raise AssertionError(
                f"{label}: labels at the {p} soft-prompt positions are "
                f"{labels[0, :p].tolist()}, expected -100 (no loss there: the prompt has no "
                "target token)"
            )
        if labels.dtype != torch.long or not torch.equal(labels, want_labels):
            raise AssertionError(
                f"{label}: labels[:, P:] are not the original labels (a {labels.dtype} tensor, "
                "expected the labels given, torch.long)"
            )


def judge_prepend_prompt(obs: Observed) -> None:
    ref = _reference()
    for (label, model), o in zip(tiny_models(), _per_model(obs), strict=True):
        ref.freeze_backbone(model)
        batch = Batch()
        (b, t), d, p = batch.shape, model.get_input_embeddings().weight.shape[1], _P_PREPEND
        values = _prompt_values(p, d, 43)
        prompt = ref.SoftPrompt(p, model.get_input_embeddings())
        with torch.no_grad():
            prompt.weight.copy_(values)
        inputs = o.sub("inputs")
        _no_cache(label, inputs)
        _no_kv_prefix(label, o.subs("calls"))
        tensors = _tensor_inputs(label, inputs)
        _shapes_or_fail(label, tensors, b, p, t, d, labels=True)
        args = (model, prompt, batch.input_ids, batch.attention_mask)
        expected = ref.prepend_prompt(*args, batch.labels)
        _values_or_fail(label, tensors, expected, values)
        error = o.maybe_str("error")
        if error is not None:
            raise AssertionError(f"{label}: model(**prepend_prompt(...)) raised {error}")
        bare = o.sub("bare")
        if bare.sub("tensors").has("labels") or bare.sub("others").has("labels"):
            raise AssertionError(
                f"{label}: without labels, prepend_prompt still returned labels: leave them "
                "out (or None) so the model computes no loss"
            )
        bare_tensors = _tensor_inputs(label, bare)
        _shapes_or_fail(label, bare_tensors, b, p, t, d, labels=False)
        _values_or_fail(label, bare_tensors, ref.prepend_prompt(*args), values)
        outputs = model(**expected)
        logits = o.maybe_tensor("logits")
        if logits is None:
            raise AssertionError(f"{label}: model(**prepend_prompt(...)) gave no logits")
        _same_run(label, logits, outputs.logits.detach())
        loss = o.maybe_tensor("loss")
        if loss is None or loss.numel() != 1 or abs(loss.item() - outputs.loss.item()) > _ATOL:
            raise AssertionError(
                f"{label}: model(**prepend_prompt(..., labels)) gave the loss {describe(loss)}, "
                f"expected {outputs.loss.item():.5f}: pass the extended labels to the model"
            )
        outputs.loss.backward()
        want = prompt.weight.grad
        grad = o.maybe_tensor("grad")
        if grad is None or tuple(grad.shape) != (p, d) or not grad.abs().sum() > 0:
            raise AssertionError(
                f"{label}: after loss.backward() the prompt has no gradient: the soft vectors "
                "must enter inputs_embeds through the graph (no .detach(), .data or "
                "torch.no_grad())"
            )
        if not torch.allclose(grad, want, rtol=1e-4, atol=1e-6):
            raise AssertionError(
                f"{label}: after loss.backward() the prompt's gradient differs from the "
                f"reference's (max |diff| {max_diff(grad, want):.3g}, largest |grad| "
                f"{want.abs().max().item():.3g}): the prompt must enter inputs_embeds exactly "
                "once per row, unscaled, with the gradient flowing through it"
            )


def check_prepend_prompt(prepend_prompt: Callable, SoftPrompt: type) -> None:
    """prepend_prompt: the prompt enters ONLY as the first P input embeddings (no layer sees
    extra keys), mask extended with ones, labels -100 over the prompt, a gradient reaches the
    prompt."""
    run_check(observe_prepend_prompt, judge_prepend_prompt, prepend_prompt, SoftPrompt)


# ---------------------------------------------------------------------------------------------
# equivalences
# ---------------------------------------------------------------------------------------------
_P_TEXT = 4


def _equivalence_text() -> list[int]:
    """The hard prompt's token ids, drawn from the variant."""
    gen = torch.Generator().manual_seed(seeded(44))
    return torch.randint(3, VOCAB, (_P_TEXT,), generator=gen).tolist()


def _observe_run(label: str, model: nn.Module, out: object) -> dict:
    """The inputs ``out`` as data, with the logits and loss of ``model(**out)``."""
    inputs = _inputs_data(label, out)
    with torch.no_grad():
        outputs = student_call("model(**prepend_prompt(...))", model, **out)
    logits, loss = getattr(outputs, "logits", None), getattr(outputs, "loss", None)
    return {
        "label": label,
        "inputs": inputs,
        "logits": logits if isinstance(logits, torch.Tensor) else None,
        "loss": loss if isinstance(loss, torch.Tensor) else None,
    }


def _judged_run(
    label: str, model: nn.Module, o: Observed, p: int, labels: bool
) -> tuple[object, dict[str, torch.Tensor]]:
    """The judge's own forward pass on the recorded inputs, after checking their shapes and
    that the session's model gave the same logits on them."""
    batch = Batch()
    (b, t), d = batch.shape, model.get_input_embeddings().weight.shape[1]
    tensors = _tensor_inputs(label, o.sub("inputs"))
    _shapes_or_fail(label, tensors, b, p, t, d, labels=labels)
    outputs = _judge_forward(label, model, tensors)
    logits = o.maybe_tensor("logits")
    if logits is None:
        raise AssertionError(f"{label}: model(**prepend_prompt(...)) gave no logits")
    _same_run(label, logits, outputs.logits)
    return outputs, tensors


def observe_prompt_equivalence(SoftPrompt: type, prepend_prompt: Callable) -> dict:
    """Per model: the inputs prepend_prompt builds for a prompt initialised from the text's
    rows (``init='text'``), and the logits of ``model(**inputs)``."""
    text = _equivalence_text()
    models = []
    for label, model in tiny_models():
        batch = Batch()
        prompt = _make_prompt(
            SoftPrompt, _P_TEXT, model.get_input_embeddings(), init="text", init_ids=text
        )
        out = student_call(
            "prepend_prompt(model, prompt, input_ids, attention_mask)",
            prepend_prompt, model, prompt, batch.input_ids, batch.attention_mask,
        )  # fmt: skip
        models.append(_observe_run(label, model, out))
    return {"models": models}


def judge_prompt_equivalence(obs: Observed) -> None:
    text, p = _equivalence_text(), _P_TEXT
    for (label, model), o in zip(tiny_models(), _per_model(obs), strict=True):
        batch = Batch()
        b = batch.shape[0]
        soft, _ = _judged_run(label, model, o, p, labels=False)
        with torch.no_grad():
            hard = model(
                input_ids=torch.cat([torch.tensor(text).expand(b, -1), batch.input_ids], 1),
                attention_mask=torch.cat(
                    [torch.ones(b, p, dtype=torch.long), batch.attention_mask], 1
                ),
            ).logits
        diff = max_diff(soft.logits[:, p:], hard[:, p:])
        if diff > _ATOL:
            raise AssertionError(
                f"{label}: a soft prompt initialised from the text {text} gives logits that "
                f"differ from the hard prompt's by up to {diff:.3g} on the real positions, "
                "expected equal: init='text' must copy embedding rows init_ids in order, and "
                "prepend_prompt must put them, unscaled, in front of the token embeddings"
            )


def check_prompt_equivalence(SoftPrompt: type, prepend_prompt: Callable) -> None:
    """A soft prompt initialised from a text's embedding rows reproduces the logits of that text
    used as a hard prompt, on every real position."""
    run_check(observe_prompt_equivalence, judge_prompt_equivalence, SoftPrompt, prepend_prompt)


_P_PEFT = 4


def observe_peft_prompt_equivalence(SoftPrompt: type, prepend_prompt: Callable) -> dict:
    """Per model, with the grader's prompt values copied into the student's SoftPrompt: the
    inputs prepend_prompt builds (labels given), and the logits and loss of
    ``model(**inputs)``."""
    models = []
    for label, model in tiny_models():
        batch = Batch()
        d = model.get_input_embeddings().weight.shape[1]
        prompt = _make_prompt(SoftPrompt, _P_PEFT, model.get_input_embeddings(), seed=2)
        _set_values(label, prompt, _prompt_values(_P_PEFT, d, 45), "4, embedding, seed=2")
        out = student_call(
            "prepend_prompt(model, prompt, input_ids, attention_mask, labels)",
            prepend_prompt, model, prompt, batch.input_ids, batch.attention_mask, batch.labels,
        )  # fmt: skip
        models.append(_observe_run(label, model, out))
    return {"models": models}


def judge_peft_prompt_equivalence(obs: Observed) -> None:
    from peft import PromptTuningConfig, get_peft_model

    p = _P_PEFT
    for (label, model), o in zip(tiny_models(), _per_model(obs), strict=True):
        batch = Batch()
        d = model.get_input_embeddings().weight.shape[1]
        ours, _ = _judged_run(label, model, o, p, labels=True)
        with torch.no_grad():
            peft_model = get_peft_model(
                tiny_model(label), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p)
            )
            peft_model.prompt_encoder["default"].embedding.weight.copy_(_prompt_values(p, d, 45))
            theirs = peft_model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            )
        if ours.logits.shape != theirs.logits.shape:
            raise AssertionError(
                f"{label}: logits {tuple(ours.logits.shape)}, PEFT PromptTuning gives "
                f"{tuple(theirs.logits.shape)} (B, P+T, vocab)"
            )
        if ours.loss is None:
            raise AssertionError(
                f"{label}: model(**prepend_prompt(..., labels)) computed no loss: return the "
                "extended labels"
            )
        kernel_loss = o.maybe_tensor("loss")
        if (
            kernel_loss is None
            or kernel_loss.numel() != 1
            or (abs(kernel_loss.item() - ours.loss.item()) > _ATOL)
        ):
            raise AssertionError(
                f"{label}: the loss in your session ({describe(kernel_loss)}) is not the loss of "
                "the model on the inputs prepend_prompt returned"
            )
        diff = max_diff(ours.logits, theirs.logits)
        loss = abs(ours.loss.item() - theirs.loss.item())
        if diff > _ATOL or loss > _ATOL:
            raise AssertionError(
                f"{label}: PEFT PromptTuning with the same {p} vectors differs: max |Δlogits| "
                f"{diff:.3g}, |Δloss| {loss:.3g}. PEFT prepends the vectors, unscaled, to the "
                "input embeddings, extends the mask with ones and the labels with -100"
            )


def check_peft_prompt_equivalence(SoftPrompt: type, prepend_prompt: Callable) -> None:
    """The same prompt vectors loaded into PEFT's PromptTuning give the same logits and loss as
    model(**prepend_prompt(...))."""
    run_check(
        observe_peft_prompt_equivalence,
        judge_peft_prompt_equivalence,
        SoftPrompt,
        prepend_prompt,
    )


# ---------------------------------------------------------------------------------------------
# training, save / load
# ---------------------------------------------------------------------------------------------
_P_TRAIN = 4


_START_SEED = 47
"""Seeds the soft prompt's values at the start of ``check_prompt_training``."""


def _observe_prompt_training_on(
    label: str,
    model: nn.Module,
    freeze_backbone: Callable,
    SoftPrompt: type,
    prepend_prompt: Callable,
) -> dict:
    built: list[tuple[nn.Module, torch.Tensor]] = []

    def soft_prompt(model: nn.Module) -> nn.Module:
        prompt = _make_prompt(SoftPrompt, _P_TRAIN, model.get_input_embeddings(), seed=0)
        d = model.get_input_embeddings().weight.shape[1]
        # Training starts from the same values whatever the student's random draws (their
        # initialisation is check_soft_prompt's business): the reference's training from that
        # start is then known in advance, which the student package's stored results need.
        start = _prompt_values(_P_TRAIN, d, _START_SEED)
        weight = _set_values(label, prompt, start, "4, embedding")
        built.append((prompt, weight.detach().clone()))
        return prompt

    def forward(model: nn.Module, prompt: nn.Module, input_ids, attention_mask, labels):
        inputs = prepend_prompt(model, prompt, input_ids, attention_mask, labels)
        return model(**_model_inputs(label, inputs))

    o = observe_training(label, model, freeze_backbone, soft_prompt, forward)
    prompt, before = built[-1]
    o["weight_before"] = before.detach()
    o["weight_after"] = prompt.weight.detach().clone()
    return o


def observe_prompt_training(
    freeze_backbone: Callable, SoftPrompt: type, prepend_prompt: Callable
) -> dict:
    """Per model: :func:`~autograder.checks.frozen.observe_training` with the student's
    freezing, SoftPrompt and prepend_prompt, plus the prompt's ``weight`` before and after."""
    models = [
        _observe_prompt_training_on(label, model, freeze_backbone, SoftPrompt, prepend_prompt)
        for label, model in tiny_models()
    ]
    return {"models": models}


def judge_prompt_training(obs: Observed) -> None:
    ref = _reference()

    def forward(model, prompt, input_ids, attention_mask, labels):
        return ref.prompt_forward(model, prompt, input_ids, attention_mask, labels)

    p = _P_TRAIN
    for (label, model), o in zip(tiny_models(), _per_model(obs), strict=True):
        d = model.get_input_embeddings().weight.shape[1]
        replay = ref.freeze_backbone(tiny_model(label))
        judge_training(
            label, model, o, expected_trainable=(p * d, f"P·d = {p}·{d}"), what="the soft prompt"
        )
        prompt = ref.SoftPrompt(p, replay.get_input_embeddings())
        with torch.no_grad():
            prompt.weight.copy_(o.tensor("weight_before", (p, d)))
        train_with_grader_optimizer(label, replay, prompt, forward)
        after = o.tensor("weight_after", (p, d))
        if not torch.allclose(after, prompt.weight, rtol=1e-4, atol=1e-5):
            raise AssertionError(
                f"{label}: after 3 AdamW steps from the same start, the soft prompt differs from "
                f"the reference's training (max |diff| {max_diff(after, prompt.weight):.3g}): "
                "the loss that reaches the prompt is not the reference's — check that "
                "prepend_prompt puts prompt(B) in front, extends the mask with ones and the "
                "labels with -100"
            )


def check_prompt_training(
    freeze_backbone: Callable, SoftPrompt: type, prepend_prompt: Callable
) -> None:
    """Training a soft prompt with the grader's optimizer leaves the backbone bit-identical and
    trains exactly P·d values."""
    run_check(
        observe_prompt_training,
        judge_prompt_training,
        freeze_backbone,
        SoftPrompt,
        prepend_prompt,
    )


_P_SAVE = 5
_WIDER = 8
"""A prompt saved for width d is loaded onto an embedding d + _WIDER wide: ValueError."""


def _tensor_or_type(value: object) -> torch.Tensor | str:
    return value.detach() if isinstance(value, torch.Tensor) else describe(value)


def observe_save_load_prompt(
    save_prompt: Callable, load_prompt: Callable, SoftPrompt: type
) -> dict:
    """Per model, a prompt holding the grader's values: the file save_prompt writes (its size),
    what load_prompt gives on the model's embedding and on a bfloat16 one, the loaded prompt's
    output, and what happens when the embedding is wider than the saved prompt."""
    models = []
    for label, model in tiny_models():
        embedding = model.get_input_embeddings()
        v, d = embedding.weight.shape
        prompt = _make_prompt(SoftPrompt, _P_SAVE, embedding, seed=3)
        _set_values(label, prompt, _prompt_values(_P_SAVE, d, 46), "5, embedding, seed=3")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "prompt.pt"
            student_call("save_prompt(prompt, path)", save_prompt, prompt, path)
            if not path.is_file():
                found = sorted(x.name for x in Path(tmp).iterdir())
                raise AssertionError(
                    f"{label}: save_prompt(prompt, path) wrote no file at path (found "
                    f"{found}); save exactly to the path given"
                )
            size = path.stat().st_size
            loaded = student_call("load_prompt(path, embedding)", load_prompt, path, embedding)
            weight = getattr(loaded, "weight", None)
            half = nn.Embedding(v, d, dtype=torch.bfloat16)
            loaded_half = student_call("load_prompt(path, bf16_embedding)", load_prompt, path, half)
            half_weight = getattr(loaded_half, "weight", None)
            out = student_call("loaded_prompt(2)", loaded, 2)
            try:
                wide = load_prompt(path, nn.Embedding(v, d + _WIDER))
                wide_outcome = f"returned {describe(getattr(wide, 'weight', wide))}"
            except ValueError:
                wide_outcome = "ValueError"
            except Exception as err:  # noqa: BLE001 - reported by the judge
                wide_outcome = f"raised {type(err).__name__}: {err}"
        models.append(
            {
                "label": label,
                "size": size,
                "weight": _tensor_or_type(weight),
                "half_weight": _tensor_or_type(half_weight),
                "half_device": str(getattr(half_weight, "device", None)),
                "out": _tensor_or_type(out),
                "wide": wide_outcome,
            }
        )
    return {"models": models}


def _loaded_or_fail(label: str, o: Observed, key: str, shape: tuple[int, int]) -> torch.Tensor:
    value = o.raw(key)
    if isinstance(value, str):
        raise AssertionError(
            f"{label}: load_prompt returned an object whose .weight is {value}, expected "
            f"{shape} (P, d)"
        )
    weight = o.tensor(key)
    if tuple(weight.shape) != shape:
        raise AssertionError(
            f"{label}: load_prompt returned an object whose .weight is {describe(weight)}, "
            f"expected {shape} (P, d)"
        )
    return weight


def judge_save_load_prompt(obs: Observed) -> None:
    p = _P_SAVE
    for (label, model), o in zip(tiny_models(), _per_model(obs), strict=True):
        d = model.get_input_embeddings().weight.shape[1]
        values = _prompt_values(p, d, 46)
        size, raw = o.int("size"), values.numel() * 4
        if size > 10 * raw + 4096:
            raise AssertionError(
                f"{label}: the prompt file has {size} bytes for a prompt of {raw} bytes: "
                "save only the prompt's weight (not the model, not the embedding table)"
            )
        weight = _loaded_or_fail(label, o, "weight", (p, d))
        if weight.dtype != values.dtype or not torch.equal(weight, values):
            raise AssertionError(
                f"{label}: the loaded prompt differs from the saved one (max |diff| "
                f"{max_diff(weight, values):.3g}, dtype {weight.dtype}): copy the saved values "
                "into the new prompt (a fresh SoftPrompt holds its random init)"
            )
        half = _loaded_or_fail(label, o, "half_weight", (p, d))
        device = o.str("half_device")
        if half.dtype != torch.bfloat16 or device != "cpu":
            raise AssertionError(
                f"{label}: load_prompt(path, embedding) with a bfloat16 embedding gave a "
                f"{half.dtype} prompt on {device}, expected torch.bfloat16 on cpu: use the "
                "embedding's device and dtype"
            )
        if not torch.equal(half, values.to(torch.bfloat16)):
            raise AssertionError(f"{label}: the prompt loaded in bfloat16 has other values")
        out = o.raw("out")
        if isinstance(out, str) or tuple(o.tensor("out").shape) != (2, p, d):
            shape = out if isinstance(out, str) else tuple(out.shape)
            raise AssertionError(
                f"{label}: loaded_prompt(2) has shape {shape}, expected {(2, p, d)}"
            )
        if not all(torch.equal(row, values) for row in o.tensor("out")):
            raise AssertionError(f"{label}: loaded_prompt(2)[b] is not the saved prompt")
        wide = o.str("wide")
        if wide != "ValueError":
            raise AssertionError(
                f"{label}: load_prompt(path, embedding) with an embedding of width {d + _WIDER} "
                f"for a saved prompt of width {d} {wide}; expected a ValueError that says the "
                "widths differ: a prompt trained for one model cannot be used with another"
            )


def check_save_load_prompt(save_prompt: Callable, load_prompt: Callable, SoftPrompt: type) -> None:
    """save_prompt writes a small file (the prompt only); load_prompt restores the exact values
    on the given embedding's device and dtype."""
    run_check(
        observe_save_load_prompt, judge_save_load_prompt, save_prompt, load_prompt, SoftPrompt
    )
