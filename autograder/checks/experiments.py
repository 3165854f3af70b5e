"""Checks for notebook 03, experiments: every adaptation method behind one interface
(``make_method``) and the equal-budget sweep harness (``run_sweep``).

``make_method(name, model, tok, length=..., hidden=..., rank=..., ...)`` returns a method with
``params``, ``loss_fn``, ``generate_fn``, ``n_trainable`` and ``n_stored``. The checks build every
method on tiny random GPT-2 and Llama-GQA models and look at what the method really does:

* :func:`check_method_parameters` — which tensors are trainable (the backbone frozen for all but
  ``"full"``; LoRA trains only its adapters), whether ``params`` lists exactly those, whether
  ``n_trainable`` counts them (a reparameterisation MLP included) and ``n_stored`` what is kept
  after training (the exported prefix only), and that the grader's own optimizer over every
  trainable tensor leaves the backbone bit-identical;
* :func:`check_method_functions` — ``loss_fn`` reaches every parameter, and ``generate_fn`` uses
  the adaptation: its output is not the unadapted backbone's, a left-padded row generates what it
  generates alone, and (the soft prompt on GPT-2, whose generation feeds ``inputs_embeds`` rather
  than token ids) the first new token is the one ``loss_fn`` finds most likely.

:func:`check_run_sweep` hands the student's harness a spying ``make_method`` (the reference's,
wrapped), a ``load`` that returns a fresh tiny model and a spying task, and watches every run:
which backbone it got, the random state it started from, how many steps it trained, on which
batches, and which examples it was scored on.

:func:`check_sweep_artifact` (hidden tests only) judges the saved study ``sweep.pt`` for
structure and plausibility: equal steps everywhere, parameter counts that fit the backbone.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from autograder import reference
from autograder.checks.harness import CheckFailure, describe, sandbox, student_call
from autograder.checks.models import KINDS, VOCAB, tiny_model
from course.compat import kv_geometry
from course.data import Example

__all__ = [
    "check_method_functions",
    "check_method_parameters",
    "check_run_sweep",
    "check_sweep_artifact",
    "expected_counts",
    "tiny_tokenizer",
]

OPTIONS = {"length": 3, "hidden": 16, "rank": 2}
"""The options every method is built with here (each method ignores those it does not use)."""
FIELDS = ("params", "loss_fn", "generate_fn", "n_trainable", "n_stored")
CHARS = " abcdefghijklmnopqrstuvwxyz0123456789=>.,|[]"


@functools.cache
def _tokenizer_template():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", *CHARS])}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    tok.padding_side = "right"
    return tok


def tiny_tokenizer():
    """A character-level tokenizer for the tiny models: pad 0, bos 1, eos 2, then one id per
    character of :data:`CHARS` (fewer than the models' 64 ids)."""
    return copy.deepcopy(_tokenizer_template())


def _short(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def expected_counts(
    name: str, geometry: dict[str, int], length: int, hidden: int, total: int
) -> tuple[int | None, int | None]:
    """``(n_trainable, n_stored)`` of method ``name`` on a backbone of ``total`` parameters whose
    ``course.kv_geometry`` is ``geometry``; ``None`` where it depends on the adapters (LoRA)."""
    g = geometry
    d = g["hidden_size"]
    kv = g["n_layers"] * 2 * g["n_kv_heads"] * g["head_dim"]  # one prefix position, all layers
    if name == "prompt":
        return length * d, length * d
    if name == "prefix":
        return length * kv, length * kv
    if name == "prefix_reparam":
        return length * d + d * hidden + hidden + hidden * kv + kv, length * kv
    if name == "full":
        return total, total
    return None, None


def _right_padded_batch() -> dict[str, torch.Tensor]:
    """``(2, 6)`` training batch; row 1 ends in 2 padding positions (mask 0, label -100)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    ids[1, 4:], mask[1, 4:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _build(make_method: Callable, kind: str, name: str, **extra):
    """A fresh tiny ``kind`` model, its original parameters and ``make_method(name, ...)``."""
    model, tok = tiny_model(kind), tiny_tokenizer()
    originals = list(model.named_parameters())
    options = {**OPTIONS, **extra}
    shown = ", ".join(f"{k}={v}" for k, v in options.items())
    method = student_call(
        f'make_method("{name}", model, tok, {shown})', make_method, name, model, tok, **options
    )
    label = f"{kind}, {name!r}"
    missing = [f for f in FIELDS if not hasattr(method, f)]
    if missing:
        raise CheckFailure(
            f"{label}: make_method returned {describe(method)} without {', '.join(missing)}: "
            "return a Method(name, params, loss_fn, generate_fn, n_trainable, n_stored)"
        )
    if not isinstance(method.params, (list, tuple)) or not all(
        isinstance(p, torch.Tensor) for p in method.params
    ):
        raise CheckFailure(
            f"{label}: params is {describe(method.params)}, expected a list of tensors (a "
            "generator would be used up by the first reader: wrap it in list(...))"
        )
    return model, tok, originals, method, label


def _trainable_flags(label: str, name: str, model: nn.Module, originals, method) -> None:
    frozen_expected = name != "full"
    trainable = [n for n, p in originals if p.requires_grad]
    if frozen_expected and trainable:
        if name == "lora":
            raise CheckFailure(
                f"{label}: the base weights {_short(trainable)} still require grad. LoRA trains "
                "only its adapters (lora_A, lora_B): get_peft_model freezes every base weight — "
                "do not set requires_grad=True on the model afterwards"
            )
        raise CheckFailure(
            f"{label}: after make_method, {len(trainable)} backbone parameter tensors still "
            f"require grad ({_short(trainable)}): freeze the whole backbone (every method but "
            "'full' trains only its own new tensors)"
        )
    if not frozen_expected and len(trainable) < len(originals):
        frozen = [n for n, p in originals if not p.requires_grad]
        raise CheckFailure(
            f"{label}: full fine-tuning trains every parameter, but {_short(frozen)} have "
            "requires_grad=False: set it to True on all of model.parameters()"
        )
    backbone = {id(p) for _, p in originals}
    params = list(method.params)
    dead = [i for i, p in enumerate(params) if not p.requires_grad]
    if dead:
        raise CheckFailure(
            f"{label}: params[{dead[0]}] (of {len(params)}) has requires_grad=False: params must "
            "list exactly the tensors that train"
        )
    if name == "lora" and any(id(p) in backbone for p in params):
        raise CheckFailure(
            f"{label}: params hold base weights of the backbone: LoRA trains only the adapter "
            "matrices it adds (lora_A, lora_B)"
        )
    listed = {id(p) for p in params}
    unlisted = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in listed]
    if unlisted:
        raise CheckFailure(
            f"{label}: {_short(unlisted)} require grad but are not in params: params must list "
            "every tensor that trains, or the optimizer never updates it"
        )


def _counts(label: str, name: str, model: nn.Module, originals, method) -> None:
    total = sum(p.numel() for _, p in originals)
    unique = {id(p): p for p in method.params}
    counted = sum(p.numel() for p in unique.values())
    want_trained, want_stored = expected_counts(
        name, kv_geometry(model.config), OPTIONS["length"], OPTIONS["hidden"], total
    )
    hints = {
        "prefix_reparam": " The reparameterisation MLP is trained too: it counts in "
        "n_trainable; only n_stored (the exported prefix) leaves it out.",
        "lora": " Count only the adapters that require grad: the frozen base weights are not "
        "trained.",
        "full": " A tied output head shares the embedding's weight: count every tensor once "
        "(model.parameters() does, model.state_dict() does not).",
    }
    if method.n_trainable != counted:
        raise CheckFailure(
            f"{label}: n_trainable = {method.n_trainable:,}, but params hold {counted:,} values: "
            f"n_trainable counts what the optimizer updates.{hints.get(name, '')}"
        )
    if want_trained is not None and counted != want_trained:
        raise CheckFailure(
            f"{label}: the method trains {counted:,} values, expected {want_trained:,} "
            f"(P = {OPTIONS['length']}, MLP width {OPTIONS['hidden']}, d = "
            f"{kv_geometry(model.config)['hidden_size']}).{hints.get(name, '')}"
        )
    if name == "lora" and not 0 < counted < total // 4:
        raise CheckFailure(
            f"{label}: LoRA trains {counted:,} values of a {total:,}-value backbone: expected a "
            "small number of adapter values (rank r on the attention projections)"
        )
    stored = counted if name == "lora" else want_stored
    if method.n_stored != stored:
        what = {
            "prefix_reparam": "only the exported prefix L·2·H·P·D is stored — the MLP is "
            "dropped after training",
            "lora": "the adapters are what is stored",
            "full": "a fine-tuned copy stores every parameter",
        }.get(name, "what is trained is what is stored")
        raise CheckFailure(f"{label}: n_stored = {method.n_stored:,}, expected {stored:,}: {what}")


def _snapshot(originals) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in originals}


def _grader_training(label: str, name: str, model: nn.Module, originals, method) -> None:
    """Two AdamW steps over every tensor that requires grad (the model's and params)."""
    before = _snapshot(originals)
    start = [p.detach().clone() for p in method.params]
    seen: dict[int, torch.Tensor] = {}
    for p in [*model.parameters(), *method.params]:
        if p.requires_grad:
            seen.setdefault(id(p), p)
    optimizer = torch.optim.AdamW(list(seen.values()), lr=0.05)
    batch = _right_padded_batch()
    for _ in range(2):
        loss = student_call("loss_fn(batch)", method.loss_fn, dict(batch))
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise CheckFailure(f"{label}: loss_fn returned {describe(loss)}, expected a scalar")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = [n for n, p in originals if not torch.equal(p, before[n])]
    if name != "full" and changed:
        raise CheckFailure(
            f"{label}: two AdamW steps over every tensor that requires grad changed the "
            f"backbone ({_short(changed)}): it must stay bit-identical"
        )
    if name == "full" and not changed:
        raise CheckFailure(f"{label}: two training steps left every backbone weight unchanged")
    if all(torch.equal(p, s) for p, s in zip(method.params, start)):
        raise CheckFailure(
            f"{label}: two training steps did not change params: does loss_fn use them?"
        )


def check_method_parameters(make_method: Callable) -> None:
    """make_method: for every method on GPT-2 and Llama-GQA, the backbone is frozen (all but
    'full'; LoRA trains only its adapters), params lists exactly what trains, n_trainable counts
    it (a reparameterisation MLP included), n_stored counts what is kept (the exported prefix),
    and training leaves the backbone bit-identical."""
    with sandbox():
        for kind in KINDS:
            for name in reference.METHODS:
                model, _, originals, method, label = _build(make_method, kind, name)
                _trainable_flags(label, name, model, originals, method)
                _counts(label, name, model, originals, method)
                _grader_training(label, name, model, originals, method)


# ---------------------------------------------------------------------------------------------
# loss_fn and generate_fn
# ---------------------------------------------------------------------------------------------
def _new_tokens(label: str, out, max_new: int, batch: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != batch:
        raise CheckFailure(
            f"{label}: generate_fn returned {describe(out)}, expected new token ids "
            f"({batch}, <= {max_new})"
        )
    if out.shape[1] > max_new:
        raise CheckFailure(
            f"{label}: generate_fn returned {out.shape[1]} tokens per row for max_new_tokens="
            f"{max_new}: return only the NEW tokens (cut the prompt off: out[:, T:])"
        )
    if out.shape[1] == 0:
        raise CheckFailure(f"{label}: generate_fn returned no token at all")
    return out


def _until_eos(row: torch.Tensor, eos: int) -> list[int]:
    tokens = []
    for t in row.tolist():
        tokens.append(t)
        if t == eos:
            break
    return tokens


@torch.no_grad()
def _most_likely_next(method, prompt: torch.Tensor) -> tuple[int, list[float]]:
    """The token ``loss_fn`` finds most likely after ``prompt (T,)``: one call per candidate,
    the label only on the candidate."""
    losses = []
    for token in range(VOCAB):
        ids = torch.cat([prompt, torch.tensor([token])]).unsqueeze(0)
        labels = torch.full_like(ids, -100)
        labels[0, -1] = token
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        losses.append(float(method.loss_fn(batch)))
    return min(range(VOCAB), key=losses.__getitem__), losses


PROMPTS = ((5, 9, 14, 20, 7), (0, 0, 31, 12, 8))
"""Two prompts, the second left-padded by two positions (pad id 0)."""


@functools.cache
def _bare_greedy(kind: str, n: int, eos: int) -> list[list[int]]:
    """What the tiny ``kind`` model WITHOUT any adaptation generates greedily from
    :data:`PROMPTS`, row by row."""
    with torch.no_grad():
        ids = torch.tensor(PROMPTS)
        out = tiny_model(kind).generate(
            input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=n, do_sample=False,
            pad_token_id=0, eos_token_id=eos,
        )  # fmt: skip
    return [_until_eos(row, eos) for row in out[:, ids.shape[1] :]]


def _check_functions(kind: str, name: str, make_method: Callable, against_loss: bool) -> None:
    model, tok, _, method, label = _build(make_method, kind, name, seed=1)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # move far from the initial values, so that the adaptation matters
        for p in method.params:
            p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.5)
    loss = student_call("loss_fn(batch)", method.loss_fn, _right_padded_batch())
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.isfinite():
        raise CheckFailure(f"{label}: loss_fn returned {describe(loss)}, expected a finite scalar")
    if not loss.requires_grad:
        raise CheckFailure(f"{label}: the loss has no gradient path to params: are they detached?")
    loss.backward()
    cold = [i for i, p in enumerate(method.params) if p.grad is None]
    if cold:
        raise CheckFailure(
            f"{label}: no gradient reaches {len(cold)} of the {len(method.params)} tensors in "
            "params: loss_fn must use every one of them"
        )
    ids = torch.tensor(PROMPTS)
    mask = (ids != 0).long()
    eos = tok.eos_token_id
    what = "generate_fn(left-padded ids (2, 5), mask, 4)"
    out = _new_tokens(label, student_call(what, method.generate_fn, ids, mask, 4), 4, 2)
    alone = student_call(
        "generate_fn(ids (1, 3), mask, 4)", method.generate_fn, ids[1:, 2:], mask[1:, 2:], 4
    )
    alone = _new_tokens(label, alone, 4, 1)
    rows = [_until_eos(row, eos) for row in out]
    if rows[1] != _until_eos(alone[0], eos):
        raise CheckFailure(
            f"{label}: a left-padded row generated {rows[1]}, the same prompt alone "
            f"{_until_eos(alone[0], eos)}: pass the attention mask (extended over any prompt or "
            "prefix positions)"
        )
    if rows == _bare_greedy(kind, 4, eos):
        raise CheckFailure(
            f"{label}: generate_fn generates exactly what the backbone WITHOUT the adaptation "
            f"generates ({rows}), although the trained tensors were moved far from their start: "
            "generate_fn must generate with the soft prompt / the prefix / the adapters"
        )
    if against_loss:
        best, losses = _most_likely_next(method, ids[0])
        first = int(out[0, 0])
        if first != best:
            raise CheckFailure(
                f"{label}: generate_fn's first new token is {first}, but loss_fn finds token "
                f"{best} the most likely continuation (loss {losses[best]:.3f} vs "
                f"{losses[first]:.3f}): generate_fn must generate WITH the adaptation that "
                "loss_fn trains (the soft prompt, the prefix, the adapters)"
            )


def check_method_functions(make_method: Callable) -> None:
    """make_method: loss_fn gives a scalar loss whose gradient reaches every trainable tensor, and
    generate_fn generates with the same adaptation: only new tokens come back, a left-padded row
    equals the row alone, the output is not the unadapted backbone's, and (soft prompt) the first
    new token is the one loss_fn finds most likely."""
    with sandbox():
        for kind in KINDS:
            for name in reference.METHODS:
                against_loss = kind == KINDS[0] and name == "prompt"
                _check_functions(kind, name, make_method, against_loss)


# ---------------------------------------------------------------------------------------------
# run_sweep
# ---------------------------------------------------------------------------------------------
class _ReverseTask:
    """A tiny generation task (``"abc>"`` -> ``"cba"``) that records what it was asked to score."""

    name = "reverse"
    max_new_tokens = 6
    primary_metric = "accuracy"

    def __init__(self) -> None:
        self.scored: list[list[str]] = []

    def score(self, predictions: list[str], examples: list) -> dict[str, float]:
        self.scored.append([ex.prompt for ex in examples])
        hits = [p.strip() == ex.target.strip() for p, ex in zip(predictions, examples)]
        return {"accuracy": 100.0 * sum(hits) / max(1, len(hits))}


def _reverse_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < n:
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 5)))
        if word in seen:
            continue
        seen.add(word)
        out.append(Example(f"{word}>", word[::-1], {}))
    return out


def _fingerprint() -> str:
    return hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()[:12]


class _Spy:
    """A ``make_method`` that builds the reference's method and records each run."""

    def __init__(self, template: dict[str, torch.Tensor]) -> None:
        self.template = template
        self.runs: list[dict] = []
        self.models: list[nn.Module] = []  # kept alive so that ids stay unique

    def __call__(self, name, model, tok, **options):
        state = {n: p.detach() for n, p in model.named_parameters()}
        fresh = state.keys() == self.template.keys() and all(
            torch.equal(state[n], t) for n, t in self.template.items()
        )
        run = {
            "name": name,
            "model": id(model),
            "same_object": any(m is model for m in self.models),
            "fresh": fresh,
            "rng": _fingerprint(),
            "steps": 0,
            "batches": [],
        }
        self.models.append(model)
        method = reference.make_method(name, model, tok, **options)

        def loss_fn(batch):
            run["steps"] += 1
            run["batches"].append(batch["input_ids"].detach().cpu().clone())
            return method.loss_fn(batch)

        run["n_trainable"], run["n_stored"] = method.n_trainable, method.n_stored
        self.runs.append(run)
        return reference.Method(
            method.name, method.params, loss_fn, method.generate_fn, method.n_trainable,
            method.n_stored,
        )  # fmt: skip


SWEEP_CONFIGS = [
    {"method": "prefix_reparam", "lr": 1e-2, "length": 3, "hidden": 16, "label": "reparam"},
    {"method": "full", "lr": 1e-2, "label": "full"},
    {"method": "prompt", "lr": 1e-2, "length": 3, "n_train": 6, "label": "prompt n=6"},
    {"method": "lora", "lr": 1e-2, "rank": 2, "label": "lora"},
    {"method": "prefix_reparam", "lr": 1e-2, "length": 3, "hidden": 16, "label": "reparam again"},
]
STEPS, BATCH, SEED = 3, 4, 5
REQUIRED = ("label", "method", "trainable", "stored", "pct", "steps", "seconds", "accuracy")


def _rows_of(rows, configs) -> list[dict]:
    if not isinstance(rows, list) or len(rows) != len(configs):
        raise CheckFailure(
            f"run_sweep returned {describe(rows)}"
            + (f" of {len(rows)} rows" if isinstance(rows, list) else "")
            + f" for {len(configs)} configurations: return a list with one row (a dict) per "
            "configuration, in order"
        )
    for i, (row, config) in enumerate(zip(rows, configs)):
        if not isinstance(row, dict):
            raise CheckFailure(f"row {i} is {describe(row)}, expected a dict")
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise CheckFailure(
                f"row {i} ({config['label']!r}) has no {', '.join(missing)}: each row holds "
                f"{', '.join(REQUIRED[:-1])} and the task's metrics (here 'accuracy')"
            )
        if row["label"] != config["label"] or row["method"] != config["method"]:
            raise CheckFailure(
                f"row {i} is labelled {row['label']!r} / method {row['method']!r}, expected "
                f"{config['label']!r} / {config['method']!r}: keep the configurations' order "
                "and labels"
            )
    return rows


def _check_runs(spy: _Spy, configs) -> None:
    labels = [c["label"] for c in configs]
    if len(spy.runs) != len(configs):
        raise CheckFailure(
            f"run_sweep called make_method {len(spy.runs)} times for {len(configs)} "
            "configurations: build each configuration's method once, with the make_method given"
        )
    for i, run in enumerate(spy.runs):
        if run["same_object"] or not run["fresh"]:
            how = (
                "the same model object as an earlier run"
                if run["same_object"]
                else "a backbone whose weights differ from a freshly loaded one"
            )
            raise CheckFailure(
                f"run {i + 1} ({labels[i]!r}) was built on {how}: call load() for a FRESH "
                "backbone in every run — a frozen method would otherwise inherit what full "
                "fine-tuning (or LoRA's injected adapters) did to the shared model"
            )
    first = spy.runs[0]["rng"]
    for i, run in enumerate(spy.runs[1:], start=2):
        if run["rng"] != first:
            raise CheckFailure(
                f"run {i} ({labels[i - 1]!r}) built its method from another random state than "
                f"run 1 ({labels[0]!r}): reset the seed (course.seed_everything(seed)) at the "
                "start of EVERY run, before the method is built — its initial values (LoRA's "
                "matrices, the reparameterisation MLP) would otherwise depend on the runs before"
            )
    counts = [run["steps"] for run in spy.runs]
    if any(c != STEPS for c in counts):
        shown = ", ".join(f"{label!r}: {c}" for label, c in zip(labels, counts))
        raise CheckFailure(
            f"with steps={STEPS}, the runs trained for {shown} steps (loss_fn calls): every run "
            "gets the same step budget, whatever its method or training-set size (equal "
            "steps, not equal epochs or equal time)"
        )


def _check_data(spy: _Spy, configs, train: list[Example], tok) -> None:
    import course

    plain = [i for i, c in enumerate(configs) if "n_train" not in c]
    reference_batches = spy.runs[plain[0]]["batches"]
    for i in plain[1:]:
        mine = spy.runs[i]["batches"]
        if any(not torch.equal(a, b) for a, b in zip(reference_batches, mine)):
            raise CheckFailure(
                f"runs 1 ({configs[plain[0]]['label']!r}) and {i + 1} ({configs[i]['label']!r}) "
                "trained on different batches: draw them in the same seeded data order in "
                "every run (course.batches(..., seed=seed)), so only the method differs"
            )
    for i, config in enumerate(configs):
        n = config.get("n_train")
        if n is None:
            continue
        allowed = course.encode_examples(tok, train[:n])["input_ids"]
        rows = {tuple(r[r != 0].tolist()) for r in allowed}
        seen = [tuple(r[r != 0].tolist()) for b in spy.runs[i]["batches"] for r in b]
        if any(r not in rows for r in seen):
            raise CheckFailure(
                f"run {i + 1} ({config['label']!r}) has n_train={n} but trained on examples "
                f"beyond the first {n}: train on train_examples[:n_train] only"
            )


def _check_rows(rows, spy: _Spy, task: _ReverseTask, configs, eval_set, total: int) -> None:
    want = [ex.prompt for ex in eval_set]
    if len(task.scored) != len(configs):
        raise CheckFailure(
            f"the task scored {len(task.scored)} evaluations for {len(configs)} runs: evaluate "
            "every run once (course.evaluate(task, None, tok, eval_examples, generate=...))"
        )
    for i, prompts in enumerate(task.scored):
        if prompts != want:
            raise CheckFailure(
                f"run {i + 1} ({configs[i]['label']!r}) was scored on {len(prompts)} examples "
                "that are not eval_examples (training examples?): evaluate on the held-out "
                "examples given, never on the training split"
            )
    for i, (row, run) in enumerate(zip(rows, spy.runs)):
        label = configs[i]["label"]
        if row["trainable"] != run["n_trainable"]:
            raise CheckFailure(
                f"row {label!r}: trainable = {row['trainable']}, but the method trains "
                f"{run['n_trainable']:,} values (its n_trainable): report what the optimizer "
                "updates, not the backbone's size or the stored size"
            )
        if row["stored"] != run["n_stored"]:
            raise CheckFailure(
                f"row {label!r}: stored = {row['stored']}, expected the method's n_stored = "
                f"{run['n_stored']:,}"
            )
        pct = 100 * run["n_trainable"] / total
        if not isinstance(row["pct"], (int, float)) or not math.isclose(
            row["pct"], pct, rel_tol=0.02
        ):
            raise CheckFailure(
                f"row {label!r}: pct = {row['pct']}, expected 100 · trainable / backbone size = "
                f"{pct:.4g} (the backbone as loaded: {total:,} values)"
            )
        if row["steps"] != STEPS:
            raise CheckFailure(f"row {label!r}: steps = {row['steps']}, expected {STEPS}")
        if not isinstance(row["seconds"], (int, float)) or not row["seconds"] > 0:
            raise CheckFailure(f"row {label!r}: seconds = {row['seconds']!r}, the training time")
    twins = [i for i, c in enumerate(configs) if c["label"] in ("reparam", "reparam again")]
    a, b = (rows[i] for i in twins)
    for key in ("accuracy", "final_loss"):
        if key in a and a[key] != b.get(key):
            raise CheckFailure(
                f"the same configuration run twice gave {key} {a[key]} and {b.get(key)}: a "
                "sweep must be reproducible (fresh backbone, same seed, same data order)"
            )


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """While the student's harness runs: ``TQDM_DISABLE=1`` (course.train reads it), and Python's
    global random state restored afterwards (course.seed_everything reseeds it; the sandbox
    restores torch's)."""
    saved, state = os.environ.get("TQDM_DISABLE"), random.getstate()
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        random.setstate(state)
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved


def check_run_sweep(run_sweep: Callable) -> None:
    """run_sweep: every configuration gets a fresh backbone, the same seed before its method is
    built, the same data order, exactly `steps` steps and an evaluation on the held-out
    examples; each row reports the method's trainable and stored counts, its share of the
    backbone, the steps, the time and the task's metrics, and a repeated run repeats exactly."""
    with sandbox(), _quiet_harness():
        template_model = tiny_model("GPT-2")
        template = {n: p.detach().clone() for n, p in template_model.named_parameters()}
        total = sum(p.numel() for p in template_model.parameters())
        tok = tiny_tokenizer()
        spy, task = _Spy(template), _ReverseTask()
        train, eval_set = _reverse_examples(24, seed=1), _reverse_examples(30, seed=2)[24:]
        eval_set = [ex for ex in eval_set if ex.prompt not in {e.prompt for e in train}]

        def load():
            return tiny_model("GPT-2"), tok

        torch.manual_seed(12345)  # a state no run should start from
        configs = [dict(c) for c in SWEEP_CONFIGS]
        rows = student_call(
            "run_sweep(configs, load, make_method, task, train_examples, eval_examples, "
            f"steps={STEPS}, batch_size={BATCH}, seed={SEED})",
            run_sweep, [dict(c) for c in configs], load, spy, task, train, eval_set,
            steps=STEPS, batch_size=BATCH, seed=SEED,
        )  # fmt: skip
        _rows_of(rows, configs)
        _check_runs(spy, configs)
        _check_data(spy, configs, train, tok)
        _check_rows(rows, spy, task, configs, eval_set, total)


# ---------------------------------------------------------------------------------------------
# The saved study (hidden tests only)
# ---------------------------------------------------------------------------------------------
STUDIES = ("methods", "length", "low_data", "init")


def check_sweep_artifact(study, model: nn.Module | None = None) -> None:
    """The saved study (``sweep.pt``): every sweep present, every run at the same step budget,
    parameter counts that fit the backbone, scores in [0, 100], and at least one method well
    above the frozen backbone without adaptation."""
    if not isinstance(study, dict) or "setup" not in study:
        raise AssertionError(
            f"the study is {describe(study)} without its 'setup': run the study cells and save "
            "sweep.pt (submit it with the notebook)"
        )
    setup = study["setup"]
    missing = [s for s in STUDIES if not study.get(s)]
    if missing:
        raise AssertionError(f"the study has no rows for {', '.join(missing)}: run every sweep")
    metric, steps = setup["metric"], setup["steps"]
    geometry, total = setup["geometry"], setup["backbone_params"]
    choice = getattr(model, "course_choice", None)
    if choice is not None:  # the study was run on this notebook's backbone: it must fit it
        if ("tiny" if choice.is_tiny else choice.source) == setup.get("backbone"):
            if sum(p.numel() for p in model.parameters()) != total:
                raise AssertionError("the study's backbone size does not match the backbone")
            if kv_geometry(model.config) != geometry:
                raise AssertionError("the study's backbone geometry does not match the backbone")

    for name in STUDIES:
        rows, configs = study[name], setup["configs"][name]
        if len(rows) != len(configs):
            raise AssertionError(f"{name}: {len(rows)} rows for {len(configs)} configurations")
        for row, config in zip(rows, configs):
            where = f"{name}, {row.get('label')!r}"
            if row.get("steps") != steps:
                raise AssertionError(
                    f"{where}: trained {row.get('steps')} steps, the study's budget is {steps}: "
                    "every run must get the same number of steps"
                )
            score = row.get(metric)
            if not isinstance(score, (int, float)) or not 0 <= score <= 100:
                raise AssertionError(f"{where}: {metric} = {score!r}, expected a score in [0, 100]")
            trained, stored = expected_counts(
                config["method"], geometry, config.get("length", 10), config.get("hidden", 128),
                total,
            )  # fmt: skip
            if trained is not None and (row["trainable"], row["stored"]) != (trained, stored):
                raise AssertionError(
                    f"{where}: trainable / stored = {row['trainable']:,} / {row['stored']:,}, "
                    f"expected {trained:,} / {stored:,} for this backbone"
                )
            if not math.isclose(row["pct"], 100 * row["trainable"] / total, rel_tol=0.02):
                raise AssertionError(f"{where}: pct {row['pct']} is not 100·trainable/backbone")
    methods = {row["method"] for row in study["methods"]}
    if methods != set(reference.METHODS):
        raise AssertionError(f"the method comparison covers {sorted(methods)}, not all five")
    best = max(row[metric] for row in study["methods"])
    floor = setup["baseline"][metric] + 5
    if not best >= floor:
        raise AssertionError(
            f"no method beats the frozen backbone without adaptation ({metric} "
            f"{setup['baseline'][metric]:.1f}) by 5 points (best {best:.1f}): did training run?"
        )
