"""Checks for notebook 03, experiments: every adaptation method behind one interface
(``make_method``) and the equal-budget sweep harness (``run_sweep``).

``make_method(name, model, tok, length=..., hidden=..., rank=..., ...)`` returns a method with
``params``, ``loss_fn``, ``generate_fn``, ``n_trainable`` and ``n_stored``. The checks build every
method on tiny random GPT-2 and Llama-GQA models and look at what the method really does:

* :func:`check_method_parameters` — which tensors are trainable (the backbone frozen for all but
  ``"full"``; LoRA trains only its adapters), whether ``params`` lists exactly those, whether
  ``n_trainable`` counts them (a reparameterisation MLP included) and ``n_stored`` what is kept
  after training (the exported prefix only), that the grader's own optimizer over every
  trainable tensor leaves the backbone bit-identical, and that ``init`` sets the starting values
  (a text's embeddings or activations, sampled vocabulary rows, a random draw);
* :func:`check_method_functions` — ``loss_fn`` and ``generate_fn`` compute what the reference
  computes WITH THE STUDENT'S OWN VALUES: the soft prompt in ``params``, the prefix every layer
  received, the effective weights of every LoRA-adapted projection, the fine-tuned weights. The
  loss, its gradient (the prefix's keys and values separately) and the greedy continuation of a
  left-padded batch must match.

:func:`check_run_sweep` hands the student's harness a spying ``make_method`` (a tiny method of
the grader's own: a trainable logit bias), a ``load`` that returns a fresh tiny model and a
spying task, and watches every run: which backbone it got, the random state it started from, the
options it was built with, how many steps it trained at which learning rate, on which batches,
what it generated and which predictions were scored on which examples.

:func:`check_sweep_artifact` (hidden tests only) judges the saved study ``sweep.pt`` for
structure and plausibility: every sweep present and in order, equal steps everywhere, counts that
follow from the backbone and the configurations, and a best method above the frozen backbone's
score, which the judge recomputes itself for the bundled tiny LM.

Each check is an *observe* / *judge* pair (see :mod:`autograder.checks.protocol`): observing runs
the student's objects on inputs drawn from the current variant and records what came out; judging
rebuilds the same inputs and computes the reference's answer on the recorded values.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import math
import numbers
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from autograder.checks import fixtures
from autograder.checks.harness import CheckFailure, describe, seeded, student_call
from autograder.checks.models import KINDS, VOCAB, tiny_model
from autograder.checks.protocol import MalformedObservation, Observed, run_check
from autograder.checks.recording import record
from course.compat import kv_geometry
from course.data import Example

__all__ = [
    "check_method_functions",
    "check_method_parameters",
    "check_run_sweep",
    "check_sweep_artifact",
    "expected_counts",
    "judge_method_functions",
    "judge_method_parameters",
    "judge_run_sweep",
    "judge_sweep_artifact",
    "observe_method_functions",
    "observe_method_parameters",
    "observe_run_sweep",
    "observe_sweep_artifact",
    "tiny_tokenizer",
]

METHODS = ("prompt", "prefix", "prefix_reparam", "lora", "full")
"""The five methods of ``make_method`` (the reference's ``METHODS``)."""
OPTIONS = {"length": 3, "hidden": 16, "rank": 2}
"""The options every method is built with here (each method ignores those it does not use)."""
FIELDS = ("params", "loss_fn", "generate_fn", "n_trainable", "n_stored")
CHARS = " abcdefghijklmnopqrstuvwxyz0123456789=>.,|[]"
PAD, EOS = 0, 2
GREEDY = {"do_sample": False, "pad_token_id": PAD, "eos_token_id": EOS}
N_NEW = 4
"""New tokens asked of ``generate_fn``."""
_LOSS_TOL = 1e-5
_GRAD_TOL = 1e-4


def _reference():
    """The reference implementation (grader side only: it is not in the student's sandbox; a
    student package replays its stored results, :mod:`autograder.checks.fixtures`)."""
    return fixtures.reference()


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


def _digest(t: torch.Tensor) -> str:
    """A short fingerprint of a tensor's dtype, shape and bytes."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _state_digest(model: nn.Module) -> str:
    """A fingerprint of every named parameter of ``model`` (names, shapes, values)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{_digest(p)};".encode())
    return h.hexdigest()[:20]


def _until_eos(row: Sequence[int]) -> list[int]:
    tokens = []
    for t in row:
        tokens.append(int(t))
        if t == EOS:
            break
    return tokens


def _rows(t: torch.Tensor) -> list[list[int]]:
    return [_until_eos(row) for row in t.tolist()]


def _nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool(t.detach().float().abs().sum() > 0)


def _integer(label: str, what: str, value: object) -> int:
    """``value`` as an int (observe side); a readable failure for anything else."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise CheckFailure(f"{label}: {what} is {describe(value)}, expected an int")


def expected_counts(
    name: str, geometry: dict[str, int], length: int, hidden: int, total: int
) -> tuple[int | None, int | None]:
    """``(n_trainable, n_stored)`` of method ``name`` (judge side only: the rule lives in the
    reference, hidden from grading kernels)."""
    return fixtures.reference().method_counts(name, geometry, length, hidden, total)


# ---------------------------------------------------------------------------------------------
# Inputs, all drawn from the variant
# ---------------------------------------------------------------------------------------------
def _right_padded_batch() -> dict[str, torch.Tensor]:
    """``(2, 6)`` training batch; row 1 ends in 2 padding positions (mask 0, label -100)."""
    gen = torch.Generator().manual_seed(seeded(3))
    ids = torch.randint(3, VOCAB, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    ids[1, 4:], mask[1, 4:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts ``(2, 5)``, the second LEFT-padded by two positions (pad id 0), and the mask."""
    gen = torch.Generator().manual_seed(seeded(4))
    ids = torch.randint(3, VOCAB, (2, 5), generator=gen)
    ids[1, :2] = PAD
    return ids, (ids != PAD).long()


def _init_text() -> str:
    """Two characters (P = 3 cycles them) for ``init="text"``."""
    gen = torch.Generator().manual_seed(seeded(12))
    letters = CHARS[1:27]
    return "".join(letters[int(i)] for i in torch.randint(0, len(letters), (2,), generator=gen))


def _linear_modules(model: nn.Module) -> dict[str, int]:
    """Every ``nn.Linear`` / GPT-2 ``Conv1D`` of ``model``: its path and input width."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[path] = module.in_features
        elif isinstance(module, Conv1D):
            out[path] = module.weight.shape[0]
    return out


def _probe(model: nn.Module, widths: dict[str, int], call=None) -> list[dict]:
    """The effective weight of each module at ``widths``' paths, as the module computes it now:
    ``module(I) - module(0)`` ``(in, out)`` and ``module(0)`` (the bias) — whatever wraps it."""
    call = call or (lambda what, fn, *args: fn(*args))
    out = []
    with torch.no_grad():
        for path, n_in in widths.items():
            module = model.get_submodule(path)
            dtype = next(model.parameters()).dtype
            zero = call(f"{path}(x)", module, torch.zeros(1, n_in, dtype=dtype))
            eye = call(f"{path}(x)", module, torch.eye(n_in, dtype=dtype))
            out.append({"path": path, "weight": (eye - zero).clone(), "bias": zero[0].clone()})
    return out


# ---------------------------------------------------------------------------------------------
# Building the student's method
# ---------------------------------------------------------------------------------------------
@dataclass
class _Built:
    model: nn.Module
    tok: object
    originals: list[tuple[str, nn.Parameter]]
    linear: dict[str, int]
    method: object
    params: list
    label: str


def _build(make_method: Callable, kind: str, name: str, **extra) -> _Built:
    """A fresh tiny ``kind`` model and ``make_method(name, model, tok, ...)`` on it."""
    model, tok = tiny_model(kind), tiny_tokenizer()
    originals = list(model.named_parameters())
    linear = _linear_modules(model)
    options = {**OPTIONS, **extra}
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
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
    params = method.params
    if not isinstance(params, (list, tuple)) or not all(
        isinstance(p, torch.Tensor) for p in params
    ):
        raise CheckFailure(
            f"{label}: params is {describe(params)}, expected a list of tensors (a "
            "generator would be used up by the first reader: wrap it in list(...))"
        )
    return _Built(model, tok, originals, linear, method, list(params), label)


# ---------------------------------------------------------------------------------------------
# make_method: parameters, counts, training, initial values
# ---------------------------------------------------------------------------------------------
INITS = (
    ("prompt", "text"),
    ("prompt", "vocab"),
    ("prompt", "random"),
    ("prefix", "text"),
)
"""``(method, init)`` pairs whose starting values are judged."""


def _grader_training(b: _Built) -> dict:
    """Two AdamW steps over every tensor that requires grad (the model's and params)."""
    seen: dict[int, torch.Tensor] = {}
    for p in [*b.model.parameters(), *b.params]:
        if p.requires_grad:
            seen.setdefault(id(p), p)
    before = [_digest(p) for p in b.params]
    losses = []
    if seen:
        optimizer = torch.optim.AdamW(list(seen.values()), lr=0.05)
        for _ in range(2):
            loss = student_call("loss_fn(batch)", b.method.loss_fn, _right_padded_batch())
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise CheckFailure(
                    f"{b.label}: loss_fn returned {describe(loss)}, expected a scalar"
                )
            optimizer.zero_grad()
            student_call("loss.backward()", loss.backward)
            optimizer.step()
            losses.append(float(loss.detach()))
    return {
        "losses": losses,
        "params_before": before,
        "params_after": [_digest(p) for p in b.params],
        "backbone_after": {n: _digest(p) for n, p in b.originals},
    }


def _observe_parameters_run(make_method: Callable, kind: str, name: str) -> dict:
    b = _build(make_method, kind, name)
    backbone = {id(p): n for n, p in b.originals}
    listed = {id(p) for p in b.params}
    first: dict[int, int] = {}
    params = []
    for i, p in enumerate(b.params):
        params.append(
            {
                "shape": list(p.shape),
                "requires_grad": bool(p.requires_grad),
                "backbone": backbone.get(id(p)),
                "same_as": first.get(id(p)),
            }
        )
        first.setdefault(id(p), i)
    return {
        "kind": kind,
        "name": name,
        "backbone_trainable": [n for n, p in b.originals if p.requires_grad],
        "params": params,
        "model_params": [
            {"name": n, "requires_grad": bool(p.requires_grad), "listed": id(p) in listed}
            for n, p in b.model.named_parameters()
        ],
        "n_trainable": _integer(b.label, "n_trainable", b.method.n_trainable),
        "n_stored": _integer(b.label, "n_stored", b.method.n_stored),
        **_grader_training(b),
    }


def _observe_init(make_method: Callable, kind: str, name: str, init: str) -> dict:
    extra = {"init": init, "init_text": _init_text() if init == "text" else ""}
    b = _build(make_method, kind, name, **extra)
    return {
        "kind": kind,
        "name": name,
        "init": init,
        "params": [p.detach().to("cpu", torch.float32).clone() for p in b.params],
    }


def observe_method_parameters(make_method: Callable) -> dict:
    """Per tiny model and method: the trainable flags, what ``params`` holds, the counts, the
    backbone after two steps of the grader's AdamW; and the starting values per ``init``."""
    runs = [_observe_parameters_run(make_method, k, n) for k in KINDS for n in METHODS]
    inits = [_observe_init(make_method, k, n, i) for k in KINDS for n, i in INITS]
    return {"runs": runs, "inits": inits}


def _checked(o: Observed, kind: str, name: str) -> None:
    if o.str("kind") != kind or o.str("name") != name:
        raise MalformedObservation(f"observation for {o.str('kind')}/{o.str('name')}")


def _judge_flags(label: str, name: str, o: Observed, originals: dict) -> list[Observed]:
    trainable = o.strings("backbone_trainable")
    if any(n not in originals for n in trainable):
        raise MalformedObservation(f"{label}: unknown backbone parameters {trainable[:3]}")
    if name != "full" and trainable:
        if name == "lora":
            raise AssertionError(
                f"{label}: the base weights {_short(trainable)} still require grad. LoRA trains "
                "only its adapters (lora_A, lora_B): get_peft_model freezes every base weight — "
                "do not set requires_grad=True on the model afterwards"
            )
        raise AssertionError(
            f"{label}: after make_method, {len(trainable)} backbone parameter tensors still "
            f"require grad ({_short(trainable)}): freeze the whole backbone (every method but "
            "'full' trains only its own new tensors)"
        )
    if name == "full" and len(set(trainable)) < len(originals):
        frozen = [n for n in originals if n not in trainable]
        raise AssertionError(
            f"{label}: full fine-tuning trains every parameter, but {_short(frozen)} have "
            "requires_grad=False: set it to True on all of model.parameters()"
        )
    params = o.subs("params")
    if not params:
        raise AssertionError(f"{label}: params is empty: list the tensors that train")
    for i, p in enumerate(params):
        source, same = p.maybe_str("backbone"), p.raw("same_as")
        if (source is not None and source not in originals) or not (
            same is None or (type(same) is int and 0 <= same < i)
        ):
            raise MalformedObservation(f"{label}: params[{i}] is described inconsistently")
        if not all(type(s) is int and s >= 0 for s in p.list("shape")) or (
            same is not None and p.list("shape") != params[same].list("shape")
        ):
            raise MalformedObservation(f"{label}: params[{i}] has a bad shape")
    dead = [i for i, p in enumerate(params) if not p.bool("requires_grad")]
    if dead:
        raise AssertionError(
            f"{label}: params[{dead[0]}] (of {len(params)}) has requires_grad=False: params must "
            "list exactly the tensors that train"
        )
    if name == "lora" and any(p.maybe_str("backbone") is not None for p in params):
        raise AssertionError(
            f"{label}: params hold base weights of the backbone: LoRA trains only the adapter "
            "matrices it adds (lora_A, lora_B)"
        )
    unlisted = [
        m.str("name")
        for m in o.subs("model_params")
        if m.bool("requires_grad") and not m.bool("listed")
    ]
    if unlisted:
        raise AssertionError(
            f"{label}: {_short(unlisted)} require grad but are not in params: params must list "
            "every tensor that trains, or the optimizer never updates it"
        )
    return params


_COUNT_HINTS = {
    "prefix_reparam": " The reparameterisation MLP is trained too: it counts in "
    "n_trainable; only n_stored (the exported prefix) leaves it out.",
    "lora": " Count only the adapters that require grad: the frozen base weights are not trained.",
    "full": " A tied output head shares the embedding's weight: count every tensor once "
    "(model.parameters() does, model.state_dict() does not).",
}


def _judge_counts(label: str, name: str, o: Observed, params: list[Observed], model) -> None:
    total = sum(p.numel() for p in model.parameters())
    counted = sum(math.prod(p.list("shape")) for p in params if p.raw("same_as") is None)
    geometry = kv_geometry(model.config)
    want_trained, want_stored = expected_counts(
        name, geometry, OPTIONS["length"], OPTIONS["hidden"], total
    )
    n_trainable, n_stored = o.int("n_trainable"), o.int("n_stored")
    hint = _COUNT_HINTS.get(name, "")
    if n_trainable != counted:
        raise AssertionError(
            f"{label}: n_trainable = {n_trainable:,}, but params hold {counted:,} values: "
            f"n_trainable counts what the optimizer updates.{hint}"
        )
    if want_trained is not None and counted != want_trained:
        raise AssertionError(
            f"{label}: the method trains {counted:,} values, expected {want_trained:,} "
            f"(P = {OPTIONS['length']}, MLP width {OPTIONS['hidden']}, d = "
            f"{geometry['hidden_size']}).{hint}"
        )
    if name == "lora" and not 0 < counted < total // 4:
        raise AssertionError(
            f"{label}: LoRA trains {counted:,} values of a {total:,}-value backbone: expected a "
            "small number of adapter values (rank r on the attention projections)"
        )
    stored = counted if name == "lora" else want_stored
    if n_stored != stored:
        what = {
            "prefix_reparam": "only the exported prefix L·2·H·P·D is stored — the MLP is "
            "dropped after training",
            "lora": "the adapters are what is stored",
            "full": "a fine-tuned copy stores every parameter",
        }.get(name, "what is trained is what is stored")
        raise AssertionError(f"{label}: n_stored = {n_stored:,}, expected {stored:,}: {what}")


def _judge_training(label: str, name: str, o: Observed, params: list[Observed], model) -> None:
    losses = o.list("losses")
    if len(losses) != 2 or not all(isinstance(x, (int, float)) for x in losses):
        raise MalformedObservation(f"{label}: expected the losses of two training steps")
    after = o.sub("backbone_after")
    originals = dict(model.named_parameters())
    if sorted(after.keys()) != sorted(originals):
        raise MalformedObservation(f"{label}: the backbone after training has other parameters")
    changed = [n for n, p in originals.items() if after.str(n) != _digest(p)]
    if name != "full" and changed:
        raise AssertionError(
            f"{label}: two AdamW steps over every tensor that requires grad changed the "
            f"backbone ({_short(changed)}): it must stay bit-identical"
        )
    if name == "full" and not changed:
        raise AssertionError(f"{label}: two training steps left every backbone weight unchanged")
    before = o.strings("params_before")
    if len(before) != len(params) or len(o.strings("params_after")) != len(params):
        raise MalformedObservation(f"{label}: params before and after training differ in number")
    if before == o.strings("params_after"):
        raise AssertionError(
            f"{label}: two training steps did not change params: does loss_fn use them?"
        )


def _flat(label: str, tensors: list[torch.Tensor], numel: int, what: str) -> torch.Tensor:
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]) if tensors else None
    if flat is None or flat.numel() != numel:
        have = 0 if flat is None else flat.numel()
        raise AssertionError(f"{label}: params hold {have:,} values, expected {what} = {numel:,}")
    return flat


def _judge_init(o: Observed) -> None:
    kind, name, init = o.str("kind"), o.str("name"), o.str("init")
    if (name, init) not in INITS or kind not in KINDS:
        raise MalformedObservation(f"unexpected init observation {kind}/{name}/{init}")
    label = f"{kind}, {name!r}, init={init!r}"
    model, tok, p = tiny_model(kind), tiny_tokenizer(), OPTIONS["length"]
    table = model.get_input_embeddings().weight.detach().float()
    tensors = o.tensors("params")
    if name == "prefix":
        from course.serving import prefix_from_text

        text = _init_text()
        with torch.no_grad():
            want = prefix_from_text(model, tok, text, p)
        flat = _flat(label, tensors, want.numel(), "the prefix L·2·H·P·D")
        if not torch.allclose(flat.sort().values, want.reshape(-1).sort().values, atol=1e-5):
            raise AssertionError(
                f"{label}: the prefix does not start from the keys and values the frozen model "
                f"computes for init_text={text!r}: with init='text' the direct prefix starts "
                "from real activations (course.serving.prefix_from_text(model, tok, init_text, "
                "length))"
            )
        return
    values = _flat(label, tensors, p * table.shape[1], "the soft prompt P·d").view(p, -1)
    nearest = torch.cdist(values, table, compute_mode="donot_use_mm_for_euclid_dist")
    nearest = nearest.min(dim=1).values
    if init == "text":
        text = _init_text()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want = table[[ids[i % len(ids)] for i in range(p)]]
        if not torch.allclose(values, want, atol=1e-6):
            raise AssertionError(
                f"{label}: with init_text={text!r} (token ids {ids}), the soft prompt should "
                f"start at the embeddings of those tokens, cycled to P = {p}; its rows are "
                f"{'embedding rows, but not those' if bool((nearest < 1e-5).all()) else 'not'} "
                "— tokenize init_text (add_special_tokens=False) and pass the ids to SoftPrompt"
            )
    elif init == "vocab":
        if not bool((nearest < 1e-5).all()):
            raise AssertionError(
                f"{label}: with init='vocab' every row of the soft prompt is a row of the "
                f"embedding table (sampled vocabulary); {int((nearest >= 1e-5).sum())} of {p} "
                "rows are not — pass init to SoftPrompt"
            )
    else:
        ratio = values.std().item() / table.std().item()
        if bool((nearest < 1e-5).any()) or not 1 / 3 < ratio < 3:
            raise AssertionError(
                f"{label}: with init='random' the soft prompt is a normal draw at the scale of "
                f"the embedding rows; its std is {ratio:.2f}× theirs"
                + (" and it copies embedding rows" if bool((nearest < 1e-5).any()) else "")
                + " — pass init to SoftPrompt"
            )


def judge_method_parameters(obs: Observed) -> None:
    runs = obs.subs("runs", len(KINDS) * len(METHODS))
    pairs = [(k, n) for k in KINDS for n in METHODS]
    for (kind, name), o in zip(pairs, runs, strict=True):
        _checked(o, kind, name)
        label = f"{kind}, {name!r}"
        model = tiny_model(kind)
        params = _judge_flags(label, name, o, dict(model.named_parameters()))
        _judge_counts(label, name, o, params, model)
        _judge_training(label, name, o, params, model)
    for o in obs.subs("inits", len(KINDS) * len(INITS)):
        _judge_init(o)


def check_method_parameters(make_method: Callable) -> None:
    """make_method: for every method on GPT-2 and Llama-GQA, the backbone is frozen (all but
    'full'; LoRA trains only its adapters), params lists exactly what trains, n_trainable counts
    it (a reparameterisation MLP included), n_stored counts what is kept (the exported prefix),
    and training leaves the backbone bit-identical.

    Also: ``init="text"`` starts the soft prompt at the text's embeddings and the direct prefix at
    its activations, ``"vocab"`` at embedding rows, ``"random"`` at a draw of their scale.
    """
    run_check(observe_method_parameters, judge_method_parameters, make_method)


# ---------------------------------------------------------------------------------------------
# make_method: loss_fn and generate_fn, against the reference on the student's own values
# ---------------------------------------------------------------------------------------------
PREFIXES = ("prefix", "prefix_reparam")


def _path_grads(rec, params: list, part: str) -> list[torch.Tensor | None]:
    """d(sum of the first P keys, or values, at every layer)/d(each of params)."""
    p = OPTIONS["length"]
    parts = [getattr(c, part)[:, :, :p].sum() for c in rec.calls]
    wanted = [t for t in params if t.requires_grad]
    total = torch.stack(parts).sum() if parts else None
    if total is None or not total.requires_grad or not wanted:
        return [None] * len(params)
    grads = dict(
        zip(
            map(id, wanted),
            torch.autograd.grad(total, wanted, retain_graph=True, allow_unused=True),
        )
    )
    return [None if grads.get(id(t)) is None else grads[id(t)].detach().clone() for t in params]


def _calls_with_gradients(rec, loss: torch.Tensor) -> list[dict]:
    """Each attention call: its layer, query length, keys and values, and the loss's gradient
    with respect to those keys and values (None where there is none)."""
    tensors = [t for c in rec.calls for t in (c.key, c.value) if t.requires_grad]
    grads = (
        torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True) if tensors else []
    )
    found = {id(t): g for t, g in zip(tensors, grads)}

    def grad(t: torch.Tensor) -> torch.Tensor | None:
        g = found.get(id(t))
        return None if g is None else g.detach().clone()

    return [
        {"layer": c.layer, "query_len": c.query_len, "key": c.key.detach().clone(),
         "value": c.value.detach().clone(), "key_grad": grad(c.key), "value_grad": grad(c.value)}
        for c in rec.calls
    ]  # fmt: skip


def _generated(label: str, out: object, batch: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != batch:
        raise CheckFailure(
            f"{label}: generate_fn returned {describe(out)}, expected new token ids "
            f"({batch}, <= {N_NEW})"
        )
    return out.detach().to("cpu").clone()


def _observe_functions_run(make_method: Callable, kind: str, name: str) -> dict:
    # what make_method draws from the global generator (a reparameterisation MLP's or LoRA's
    # initial weights) is drawn from the variant too, so that the values the judge compares with
    # the reference are reproducible (a student package replays the reference's results for
    # them, autograder.checks.fixtures); the sandbox restores the student's generator afterwards
    torch.manual_seed(seeded(13))
    b = _build(make_method, kind, name, seed=1)
    gen = torch.Generator().manual_seed(seeded(11))
    with torch.no_grad():  # move far from the initial values, so that the adaptation matters
        for p in b.params:
            p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.5)
    obs: dict = {"kind": kind, "name": name, "shapes": [list(p.shape) for p in b.params]}
    with record(b.model) if name in PREFIXES else contextlib.nullcontext() as rec:
        loss = student_call("loss_fn(batch)", b.method.loss_fn, _right_padded_batch())
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.isfinite():
        raise CheckFailure(
            f"{b.label}: loss_fn returned {describe(loss)}, expected a finite scalar"
        )
    if not loss.requires_grad:
        raise CheckFailure(
            f"{b.label}: the loss has no gradient path to params: are they detached?"
        )
    if name in PREFIXES:
        obs["calls"] = _calls_with_gradients(rec, loss)
        obs["key_grads"] = _path_grads(rec, b.params, "key")
        obs["value_grads"] = _path_grads(rec, b.params, "value")
    student_call("loss.backward()", loss.backward)
    obs["loss"] = float(loss.detach())
    obs["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in b.params]
    if name in ("prompt", *PREFIXES):
        obs["params"] = [p.detach().clone() for p in b.params]
    elif name == "full":
        names = {id(p): n for n, p in b.model.named_parameters()}
        obs["names"] = [names.get(id(p)) for p in b.params]
        obs["state"] = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    else:
        obs["probes"] = _probe(b.model, b.linear, student_call)
    ids, mask = _prompts()
    what = f"generate_fn(left-padded ids (2, 5), mask, {N_NEW})"
    out = student_call(what, b.method.generate_fn, ids, mask, N_NEW)
    obs["generated"] = _generated(b.label, out, 2)
    what = f"generate_fn(ids (1, 3), mask, {N_NEW})"
    alone = student_call(what, b.method.generate_fn, ids[1:, 2:], mask[1:, 2:], N_NEW)
    obs["alone"] = _generated(b.label, alone, 1)
    return obs


def observe_method_functions(make_method: Callable) -> dict:
    """Per tiny model and method, with params moved far from their start: the loss on a
    right-padded batch and its gradients, the values the loss used (the soft prompt, the prefix
    every layer received, the effective LoRA weights, the fine-tuned weights), and the tokens
    generated for a left-padded batch and for its padded row alone."""
    return {"runs": [_observe_functions_run(make_method, k, n) for k in KINDS for n in METHODS]}


def _same_loss(label: str, loss: float, want: torch.Tensor, what: str, fix: str) -> None:
    if not math.isclose(loss, float(want), rel_tol=_LOSS_TOL, abs_tol=_LOSS_TOL):
        raise AssertionError(
            f"{label}: loss_fn gives {loss:.5f} on a right-padded batch, but the model with "
            f"{what} gives {float(want):.5f}: {fix}"
        )


def _same_grad(mine: torch.Tensor, want: torch.Tensor) -> bool:
    scale = want.abs().max().item()
    return bool((mine - want).abs().max().item() <= _GRAD_TOL * max(scale, 1e-3))


def _grads(o: Observed, shapes: list[tuple[int, ...]]) -> list[torch.Tensor | None]:
    grads = o.list("grads", len(shapes))
    for g, shape in zip(grads, shapes, strict=True):
        if g is not None and (not isinstance(g, torch.Tensor) or tuple(g.shape) != shape):
            raise MalformedObservation("a gradient does not match its parameter")
    return grads


def _params(o: Observed, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    params = o.tensors("params", len(shapes))
    if any(tuple(t.shape) != shape for t, shape in zip(params, shapes, strict=True)):
        raise MalformedObservation("a parameter does not match its shape")
    return params


def _judge_prompt(label: str, model, o: Observed, shapes, batch) -> tuple[Callable, str]:
    ref, p, d = _reference(), OPTIONS["length"], model.config.hidden_size
    values = _flat(label, _params(o, shapes), p * d, "the soft prompt P·d")
    prompt = ref.SoftPrompt(p, model.get_input_embeddings())
    with torch.no_grad():
        prompt.weight.copy_(values.view(p, d))
    want = ref.prompt_forward(model, prompt, **batch).loss
    _same_loss(
        label, o.float("loss"), want, "the soft prompt of params (as (P, d)) in front of it",
        "prepend the prompt to the token embeddings, extend the attention mask with P ones and "
        "the labels with P times -100 in FRONT (prepend_prompt(model, prompt, **batch))",
    )  # fmt: skip
    (grad,) = torch.autograd.grad(want, prompt.weight)
    mine = torch.cat([g.reshape(-1) for g in _grads(o, shapes)])
    if not _same_grad(mine.float(), grad.reshape(-1)):
        raise AssertionError(
            f"{label}: the gradient of loss_fn with respect to the soft prompt differs from the "
            "reference's on the same values: the prompt must enter the model once, in front of "
            "the token embeddings"
        )

    def generate(ids, mask):
        inputs = ref.prepend_prompt(model, prompt, ids, mask)
        return model.generate(**inputs, max_new_tokens=N_NEW, **GREEDY)

    return generate, "the soft prompt of params"


def _received_prefix(
    label: str, model, o: Observed, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix ``(L, 2, H, P, D)`` every layer's attention received during ``loss_fn``, and
    the loss's gradient with respect to it (summed over the batch rows that share it)."""
    g, p = kv_geometry(model.config), OPTIONS["length"]
    first: dict[int, Observed] = {}
    for c in o.subs("calls"):
        layer = c.int("layer")
        if not 0 <= layer < g["n_layers"]:
            raise MalformedObservation(f"{label}: attention call of an unknown layer {layer}")
        first.setdefault(layer, c)
    layers, grads = [], []
    for layer in range(g["n_layers"]):
        if layer not in first:
            raise AssertionError(
                f"{label}: loss_fn ran no attention at layer {layer} of the model it was given: "
                "loss_fn must run make_method's own model"
            )
        c = first[layer]
        key = c.tensor("key", (2, g["n_kv_heads"], None, g["head_dim"]))
        if key.shape[2] != p + width or c.int("query_len") != width:
            raise AssertionError(
                f"{label}: during loss_fn, layer {layer}'s attention got {key.shape[2]} keys for "
                f"{c.int('query_len')} tokens, expected {p + width} ({p} prefix positions + "
                f"{width} tokens): run prefix_forward with the method's encoder"
            )
        value = c.tensor("value", tuple(key.shape))
        kv = torch.stack([key[:, :, :p], value[:, :, :p]], dim=1).float()  # (B, 2, H, P, D)
        if not torch.equal(kv[0], kv[1]):
            raise AssertionError(
                f"{label}: layer {layer} received a different prefix for each row of the batch: "
                "one prefix is shared by every row"
            )
        layers.append(kv[0])
        grad = []
        for part in ("key", "value"):
            d = c.maybe_tensor(f"{part}_grad")
            if d is not None and tuple(d.shape) != tuple(key.shape):
                raise MalformedObservation(f"{label}: a {part} gradient of another shape")
            if d is None or not _nonzero(d[:, :, :p]):
                raise AssertionError(
                    f"{label}: the prefix {part.upper()}S the layers receive have no gradient path "
                    f"from the loss (layer {layer}): the {part}s must stay in the graph (not "
                    "detached, not a copy)"
                )
            grad.append(d[:, :, :p].float().sum(0))
        grads.append(torch.stack(grad))
    return torch.stack(layers), torch.stack(grads)


def _judge_prefix(label: str, model, o: Observed, shapes, batch, reparam: bool):
    ref, p = _reference(), OPTIONS["length"]
    values, received = _received_prefix(label, model, o, batch["input_ids"].shape[1])
    grads = _grads(o, shapes)
    for part in ("key", "value"):
        path = o.list(f"{part}_grads", len(shapes))
        if not all(g is None or isinstance(g, torch.Tensor) for g in path):
            raise MalformedObservation(f"{label}: bad {part} gradients")
        if not any(_nonzero(g) for g in path):
            raise AssertionError(
                f"{label}: the prefix {part.upper()}S the layers receive have no gradient path to "
                f"params: the {part}s must come from the trained tensors (not detached, not a "
                "copy)"
            )
    encoder = ref.PrefixEncoder(model.config, p)
    with torch.no_grad():
        encoder.prefix.copy_(values)
    want = ref.prefix_forward(model, encoder, **batch).loss
    _same_loss(
        label, o.float("loss"), want, "the prefix its layers received",
        "the mask must be extended by P ones in front and the tokens take positions P..P+T-1 "
        "(prefix_forward(model, encoder, **batch))",
    )  # fmt: skip
    (grad,) = torch.autograd.grad(want, encoder.prefix)
    for i, part in enumerate(("keys", "values")):
        if not _same_grad(received[:, i], grad[:, i]):
            raise AssertionError(
                f"{label}: the gradient of loss_fn with respect to the prefix {part} the layers "
                "received differs from the reference's on the same values: run prefix_forward "
                "with the method's encoder, once"
            )
    if not reparam:
        flat = _flat(label, _params(o, shapes), values.numel(), "the prefix")
        order, target = flat.argsort(), values.reshape(-1).argsort()
        if not torch.equal(flat[order], values.reshape(-1)[target]):
            raise AssertionError(
                f"{label}: the keys and values the layers receive are not the values in params: "
                "loss_fn must use the trained prefix itself"
            )
        mine = torch.cat([g.reshape(-1) for g in grads]).float()[order]
        if not _same_grad(mine, grad.reshape(-1)[target]):
            raise AssertionError(
                f"{label}: the gradient of loss_fn with respect to params differs from its "
                "gradient with respect to the prefix the layers received: params must be that "
                "prefix, used once"
            )

    def generate(ids, mask):
        return ref.generate_with_prefix(model, encoder, ids, mask, N_NEW, **GREEDY)

    return generate, "the prefix its layers received in loss_fn"


def _plain_generate(model: nn.Module) -> Callable:
    """Greedy ``model.generate`` returning only the new tokens."""

    def generate(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, **GREEDY)
        return out[:, ids.shape[1] :]

    return generate


def _set_weight(module: nn.Module, effective: torch.Tensor) -> None:
    with torch.no_grad():
        if isinstance(module, Conv1D):
            module.weight.copy_(effective)
        else:
            module.weight.copy_(effective.T)


def _judge_lora(label: str, model, o: Observed, shapes, batch):
    widths = _linear_modules(model)
    probes = o.subs("probes", len(widths))
    plain = dict(zip(widths, _probe(model, widths), strict=True))
    changed = []
    for probe, path in zip(probes, widths, strict=True):
        if probe.str("path") != path:
            raise MalformedObservation(f"{label}: probe of {probe.str('path')}, expected {path}")
        base = plain[path]
        weight = probe.tensor("weight", tuple(base["weight"].shape))
        bias = probe.tensor("bias", tuple(base["bias"].shape))
        if not torch.allclose(bias.float(), base["bias"], atol=1e-5):
            raise AssertionError(f"{label}: LoRA changed the bias of {path}: only add B·A·x")
        delta = weight.float() - base["weight"]
        if delta.abs().max().item() > 1e-5:
            rank = int((torch.linalg.svdvals(delta) > 1e-4 * delta.abs().max()).sum())
            if rank > OPTIONS["rank"]:
                raise AssertionError(
                    f"{label}: the adapters change {path} by a matrix of rank {rank}, expected "
                    f"at most r = {OPTIONS['rank']} (the rank option): LoraConfig(r=rank, ...)"
                )
            changed.append((path, weight.float()))
    if not changed:
        raise AssertionError(
            f"{label}: with lora_A and lora_B moved far from their start, no projection of the "
            "model computes anything different: the adapters must live in the model's own "
            "modules (get_peft_model(model, config) injects them in place)"
        )
    for path, weight in changed:
        _set_weight(model.get_submodule(path), weight)
    want = model(**batch).loss
    _same_loss(
        label, o.float("loss"), want, "the adapted projections' effective weights",
        "loss_fn must run the adapted model on the batch as it is (model(**batch).loss)",
    )  # fmt: skip

    return _plain_generate(model), "its adapted projections"


def _judge_full(label: str, model, o: Observed, shapes, batch):
    named = dict(model.named_parameters())
    state = o.sub("state")
    if sorted(state.keys()) != sorted(named):
        extra = sorted(set(state.keys()) ^ set(named))
        raise AssertionError(
            f"{label}: full fine-tuning changed which parameters the model has ({_short(extra)}):"
            " train the model's own parameters"
        )
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(state.tensor(n, tuple(p.shape)))
    names = o.list("names", len(shapes))
    if not all(isinstance(n, str) and n in named for n in names):
        raise AssertionError(f"{label}: params hold tensors that are not parameters of the model")
    for n, shape in zip(names, shapes, strict=True):
        if tuple(named[n].shape) != shape:
            raise MalformedObservation(f"{label}: {n} has another shape")
    want = model(**batch).loss
    _same_loss(
        label, o.float("loss"), want, "the fine-tuned weights",
        "loss_fn must run the model on the batch as it is (model(**batch).loss)",
    )  # fmt: skip
    unique = list(dict.fromkeys(names))
    reference_grads = dict(zip(unique, torch.autograd.grad(want, [named[n] for n in unique])))
    for n, g in zip(names, _grads(o, shapes), strict=True):
        if not _same_grad(g.float(), reference_grads[n]):
            raise AssertionError(
                f"{label}: the gradient of loss_fn with respect to {n} differs from the "
                "reference's: loss_fn must be model(**batch).loss"
            )

    return _plain_generate(model), "the fine-tuned weights"


_ADAPTATIONS = {
    "prompt": _judge_prompt,
    "prefix": functools.partial(_judge_prefix, reparam=False),
    "prefix_reparam": functools.partial(_judge_prefix, reparam=True),
    "lora": _judge_lora,
    "full": _judge_full,
}


def _judge_generation(label: str, kind: str, o: Observed, generate: Callable, what: str) -> None:
    ids, mask = _prompts()
    out, alone = o.tensor("generated"), o.tensor("alone")
    for t, rows in ((out, 2), (alone, 1)):
        if t.dim() != 2 or t.shape[0] != rows:
            raise MalformedObservation(f"{label}: generated tokens of shape {tuple(t.shape)}")
        if t.shape[1] > N_NEW:
            raise AssertionError(
                f"{label}: generate_fn returned {t.shape[1]} tokens per row for max_new_tokens="
                f"{N_NEW}: return only the NEW tokens (cut the prompt off: out[:, T:])"
            )
        if t.shape[1] == 0:
            raise AssertionError(f"{label}: generate_fn returned no token at all")
    rows, single = _rows(out), _rows(alone)[0]
    if rows[1] != single:
        raise AssertionError(
            f"{label}: a left-padded row generated {rows[1]}, the same prompt alone {single}: "
            "pass the attention mask (extended over any prompt or prefix positions)"
        )
    with torch.no_grad():
        want = _rows(generate(ids, mask))
    if rows != want:
        if rows == _rows(_plain_generate(tiny_model(kind))(ids, mask)):
            raise AssertionError(
                f"{label}: generate_fn generates exactly what the backbone WITHOUT the adaptation "
                f"generates ({rows}), although the trained tensors were moved far from their "
                "start: generate_fn must generate with the soft prompt / the prefix / the adapters"
            )
        raise AssertionError(
            f"{label}: generate_fn generated {rows} for a left-padded batch, but greedy decoding "
            f"with {what} gives {want}: generate_fn must generate greedily WITH the adaptation "
            "that loss_fn trains, its current values, and the mask extended over any prompt or "
            "prefix positions"
        )


def judge_method_functions(obs: Observed) -> None:
    pairs = [(k, n) for k in KINDS for n in METHODS]
    batch = _right_padded_batch()
    for (kind, name), o in zip(pairs, obs.subs("runs", len(pairs)), strict=True):
        _checked(o, kind, name)
        label = f"{kind}, {name!r}"
        shapes = []
        for s in o.list("shapes"):
            if not isinstance(s, list) or not all(type(x) is int and x >= 0 for x in s):
                raise MalformedObservation(f"{label}: bad parameter shape {s!r}")
            shapes.append(tuple(s))
        loss = o.float("loss")
        if not math.isfinite(loss):
            raise AssertionError(f"{label}: loss_fn returned {loss}, expected a finite scalar")
        grads = _grads(o, shapes)
        cold = [i for i, g in enumerate(grads) if not _nonzero(g)]
        if cold:
            raise AssertionError(
                f"{label}: no gradient reaches {len(cold)} of the {len(grads)} tensors in "
                "params: loss_fn must use every one of them"
            )
        model = tiny_model(kind)
        generate, what = _ADAPTATIONS[name](label, model, o, shapes, batch)
        _judge_generation(label, kind, o, generate, what)


def check_method_functions(make_method: Callable) -> None:
    """make_method: loss_fn gives a scalar loss whose gradient reaches every trainable tensor, and
    generate_fn generates with the same adaptation: only new tokens come back, a left-padded row
    equals the row alone, the output is not the unadapted backbone's, and (soft prompt) the first
    new token is the one loss_fn finds most likely.

    Both are compared with the reference on the method's own current values: the loss, its
    gradient (a prefix's keys and values separately) and the greedy continuation.
    """
    run_check(observe_method_functions, judge_method_functions, make_method)


# ---------------------------------------------------------------------------------------------
# run_sweep
# ---------------------------------------------------------------------------------------------
SWEEP_CONFIGS = [
    {"method": "prefix_reparam", "lr": 1e-2, "length": 3, "hidden": 16, "label": "reparam"},
    {"method": "full", "lr": 2e-3, "label": "full"},
    {"method": "prompt", "lr": 3e-2, "length": 3, "n_train": 6, "label": "prompt n=6"},
    {"method": "lora", "lr": 5e-3, "rank": 2, "label": "lora"},
    {"method": "prefix_reparam", "lr": 1e-2, "length": 3, "hidden": 16, "label": "reparam again"},
]
STEPS, BATCH, SEED = 3, 4, 5
METRICS = ("accuracy", "overlap")
REQUIRED = ("label", "method", "trainable", "stored", "pct", "steps", "seconds", *METRICS)
_HARNESS_KEYS = ("method", "lr", "label", "n_train")
_KEEP = 50
"""At most this many batches, losses, generations or scorings are recorded per run."""


class _ReverseTask:
    """A tiny generation task (``"abc>"`` -> ``"cba"``) that records what it was asked to score."""

    name = "reverse"
    max_new_tokens = 6
    primary_metric = "accuracy"

    def __init__(self) -> None:
        self.scored: list[dict] = []

    def score(self, predictions: list[str], examples: list) -> dict[str, float]:
        if len(self.scored) < _KEEP:
            self.scored.append(
                {
                    "prompts": [str(getattr(ex, "prompt", "")) for ex in examples],
                    "predictions": [p if isinstance(p, str) else repr(p) for p in predictions],
                }
            )
        return _reverse_scores(predictions, examples)


def _reverse_scores(predictions: Sequence[str], examples: Sequence) -> dict[str, float]:
    """``accuracy``: exact matches; ``overlap``: characters in place, both in percent."""
    hits, chars = [], []
    for p, ex in zip(predictions, examples):
        p, t = str(p).strip(), ex.target.strip()
        hits.append(p == t)
        chars.append(sum(a == b for a, b in zip(p, t)) / max(1, len(t)))
    n = max(1, len(hits))
    return {"accuracy": 100.0 * sum(hits) / n, "overlap": 100.0 * sum(chars) / n}


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


def _sweep_data() -> tuple[list[Example], list[Example]]:
    """The training examples and the held-out ones (never a training prompt)."""
    train = _reverse_examples(24, seed=seeded(1))
    prompts = {e.prompt for e in train}
    held_out = [ex for ex in _reverse_examples(30, seed=seeded(2))[24:] if ex.prompt not in prompts]
    return train, held_out


def _spy_rows(name: str, options: dict) -> tuple[int, int]:
    """The spy method's bias rows ``m`` (trained) and ``j`` (stored): from the variant, the
    method and its options, so that every configuration reports its own counts."""
    key = f"{name}/{sorted((str(k), str(v)) for k, v in options.items())}"
    n = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    m = 2 + seeded(n) % 6
    return m, 1 + seeded(n + 1) % (m - 1)


def _spy_counts(name: str, options: dict, total: int) -> tuple[int, int]:
    """``(n_trainable, n_stored)`` the spy's method reports."""
    m, j = _spy_rows(name, options)
    extra = total if name == "full" else 0
    return m * VOCAB + extra, j * VOCAB + extra


@dataclass
class _SpyMethod:
    name: str
    params: list
    loss_fn: Callable
    generate_fn: Callable
    n_trainable: int
    n_stored: int


def _plain(value: object, budget: list[int], depth: int = 0) -> object:
    """``value`` as observation data: numbers, strings, None, lists and dicts with string keys;
    a one-element tensor becomes its number; anything else the string ``<type>``."""
    budget[0] -= 1
    if budget[0] < 0 or depth > 8:
        raise CheckFailure("the object to check is too large or too deeply nested")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v, budget, depth + 1) for v in value]
    if isinstance(value, dict):
        return {
            str(k): _plain(v, budget, depth + 1)
            for k, v in value.items()
            if str(k) not in ("__tensor__", "__float__")
        }
    return f"<{describe(value)}>"


class _Spy:
    """A ``make_method`` of the grader's own that records each run: a trainable logit bias
    ``(m, vocab)`` (its rows summed), drawn from the global random state when it is built;
    ``"full"`` trains the backbone as well."""

    def __init__(self) -> None:
        self.runs: list[dict] = []
        self.models: list[nn.Module] = []  # kept alive so that identities stay unique

    def __call__(self, name, model, tok, **options):
        same = next((i for i, m in enumerate(self.models) if m is model), None)
        run = {
            "name": str(name),
            "options": _plain(options, [1000]),
            "same_as": same,
            "backbone": _state_digest(model),
            "rng": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:20],
            "steps": 0,
            "batches": [],
            "losses": [],
            "biases": [],
            "masks": [],
            "generated": [],
        }
        self.models.append(model)
        self.runs.append(run)
        m, _ = _spy_rows(str(name), options)
        total = sum(p.numel() for p in model.parameters())
        full = name == "full"
        for p in model.parameters():
            p.requires_grad_(full)
        bias = nn.Parameter(torch.randn(m, VOCAB) * 0.5)

        def loss_fn(batch):
            run["steps"] += 1
            ids = batch["input_ids"]
            if len(run["batches"]) < _KEEP:
                run["batches"].append(ids.detach().to("cpu").clone())
            if len(run["biases"]) < 2:
                run["biases"].append(bias.detach().clone())
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
            logits = logits + bias.sum(0)
            labels = batch["labels"][:, 1:].reshape(-1)
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels)
            if len(run["losses"]) < _KEEP:
                run["losses"].append(float(loss.detach()))
            return loss

        @torch.no_grad()
        def generate_fn(ids, mask, n):
            if len(run["masks"]) < _KEEP:
                run["masks"].append(mask.detach().to("cpu").clone())
            shift, done, new = bias.sum(0), torch.zeros(ids.shape[0], dtype=torch.bool), []
            for _ in range(n):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                nxt = (logits[:, -1] + shift).argmax(-1).masked_fill(done, PAD)
                new.append(nxt)
                done = done | (nxt == EOS)
                ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, mask[:, -1:]], 1)
                if bool(done.all()):
                    break
            out = torch.stack(new, 1)
            if len(run["generated"]) < _KEEP:
                run["generated"].append(out.clone())
            return out

        trained, stored = _spy_counts(str(name), options, total)
        params = [bias, *model.parameters()] if full else [bias]
        return _SpyMethod(str(name), params, loss_fn, generate_fn, trained, stored)


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


def observe_run_sweep(run_sweep: Callable) -> dict:
    """Run the student's harness on :data:`SWEEP_CONFIGS` with the spy; record the rows it
    returned, every run the spy saw and everything the task scored."""
    with _quiet_harness():
        tok = tiny_tokenizer()
        spy, task = _Spy(), _ReverseTask()
        train, held_out = _sweep_data()

        def load():
            return tiny_model("GPT-2"), tok

        torch.manual_seed(seeded(12345))  # a state no run should start from
        rows = student_call(
            "run_sweep(configs, load, make_method, task, train_examples, eval_examples, "
            f"steps={STEPS}, batch_size={BATCH}, seed={SEED})",
            run_sweep, [dict(c) for c in SWEEP_CONFIGS], load, spy, task, train, held_out,
            steps=STEPS, batch_size=BATCH, seed=SEED,
        )  # fmt: skip
    return {"rows": _plain(rows, [20_000]), "runs": spy.runs, "scored": task.scored}


def _plain_data(value: object, where: str) -> object:
    """``value`` unchanged if it is plain data as :func:`_plain` makes it (no tensors: a
    genuine observation converted them), else :class:`MalformedObservation`."""
    if isinstance(value, torch.Tensor):
        raise MalformedObservation(f"observation field {where} holds a tensor")
    if isinstance(value, list):
        for v in value:
            _plain_data(v, where)
    elif isinstance(value, dict):
        for v in value.values():
            _plain_data(v, where)
    return value


def _judge_rows(rows: object) -> list[Observed]:
    configs = SWEEP_CONFIGS
    _plain_data(rows, "rows")
    if not isinstance(rows, list) or len(rows) != len(configs):
        shown = f"{len(rows)} rows" if isinstance(rows, list) else rows
        raise AssertionError(
            f"run_sweep returned {shown} for {len(configs)} configurations: return a list with "
            "one row (a dict) per configuration, in order"
        )
    out = []
    for i, (row, config) in enumerate(zip(rows, configs)):
        if not isinstance(row, dict):
            raise AssertionError(f"row {i} is {describe(row)}, expected a dict")
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise AssertionError(
                f"row {i} ({config['label']!r}) has no {', '.join(missing)}: each row holds "
                f"{', '.join(REQUIRED[: -len(METRICS)])} and the task's metrics (here "
                f"{', '.join(METRICS)})"
            )
        if row["label"] != config["label"] or row["method"] != config["method"]:
            raise AssertionError(
                f"row {i} is labelled {row['label']!r} / method {row['method']!r}, expected "
                f"{config['label']!r} / {config['method']!r}: keep the configurations' order "
                "and labels"
            )
        out.append(Observed(row, f"rows[{i}]."))
    return out


def _judge_runs(runs: list[Observed]) -> None:
    configs, labels = SWEEP_CONFIGS, [c["label"] for c in SWEEP_CONFIGS]
    if len(runs) != len(configs):
        raise AssertionError(
            f"run_sweep called make_method {len(runs)} times for {len(configs)} "
            "configurations: build each configuration's method once, with the make_method given"
        )
    fresh = _state_digest(tiny_model("GPT-2"))
    for i, (run, config) in enumerate(zip(runs, configs)):
        where = f"run {i + 1} ({labels[i]!r})"
        options = {k: v for k, v in config.items() if k not in _HARNESS_KEYS}
        got = _plain_data(run.raw("options"), "options")
        if run.str("name") != config["method"] or got != options:
            raise AssertionError(
                f"{where} built make_method({run.str('name')!r}, model, tok, **{got!r}), "
                f"expected make_method({config['method']!r}, model, tok, **{options!r}): pass "
                "every option of the configuration (all but method, lr, label and n_train) "
                "to make_method"
            )
        same = run.raw("same_as")
        if same is not None and not (type(same) is int and 0 <= same < i):
            raise MalformedObservation(f"{where}: bad model identity")
        if same is not None or run.str("backbone") != fresh:
            how = (
                "the same model object as an earlier run"
                if same is not None
                else "a backbone whose weights differ from a freshly loaded one"
            )
            raise AssertionError(
                f"{where} was built on {how}: call load() for a FRESH backbone in every run — "
                "a frozen method would otherwise inherit what full fine-tuning (or LoRA's "
                "injected adapters) did to the shared model"
            )
    first = runs[0].str("rng")
    for i, run in enumerate(runs[1:], start=1):
        if run.str("rng") != first:
            raise AssertionError(
                f"run {i + 1} ({labels[i]!r}) built its method from another random state than "
                f"run 1 ({labels[0]!r}): reset the seed (course.seed_everything(seed)) at the "
                "start of EVERY run, before the method is built — its initial values (LoRA's "
                "matrices, the reparameterisation MLP) would otherwise depend on the runs before"
            )
    counts = [run.int("steps") for run in runs]
    if any(c != STEPS for c in counts):
        shown = ", ".join(f"{label!r}: {c}" for label, c in zip(labels, counts))
        raise AssertionError(
            f"with steps={STEPS}, the runs trained for {shown} steps (loss_fn calls): every run "
            "gets the same step budget, whatever its method or training-set size (equal "
            "steps, not equal epochs or equal time)"
        )


def _judge_batches(runs: list[Observed]) -> list[list[torch.Tensor]]:
    import course

    configs, tok = SWEEP_CONFIGS, tiny_tokenizer()
    train, _ = _sweep_data()
    encoded = course.encode_examples(tok, train)["input_ids"]
    allowed = [tuple(r[r != PAD].tolist()) for r in encoded]
    batches = []
    for i, (run, config) in enumerate(zip(runs, configs)):
        mine = run.tensors("batches", STEPS)
        where = f"run {i + 1} ({config['label']!r})"
        if any(b.dim() != 2 or b.shape[0] != BATCH for b in mine):
            sizes = sorted({b.shape[0] if b.dim() == 2 else -1 for b in mine})
            raise AssertionError(
                f"{where} trained on batches of {sizes} examples, but batch_size={BATCH}: draw "
                "them with course.batches(tok, examples, batch_size, seed=seed)"
            )
        n = config.get("n_train", len(train))
        seen = [tuple(r[r != PAD].tolist()) for b in mine for r in b]
        if any(r not in allowed[:n] for r in seen):
            where_from = "beyond the first " + str(n) if n < len(train) else "outside the training"
            raise AssertionError(
                f"{where} trained on examples {where_from} examples: train on "
                "train_examples[:n_train] (all of them without n_train), encoded by "
                "course.batches"
            )
        batches.append(mine)
    plain = [i for i, c in enumerate(configs) if "n_train" not in c]
    for i in plain[1:]:
        if any(not torch.equal(a, b) for a, b in zip(batches[plain[0]], batches[i])):
            raise AssertionError(
                f"runs {plain[0] + 1} ({configs[plain[0]]['label']!r}) and {i + 1} "
                f"({configs[i]['label']!r}) trained on different batches: draw them in the same "
                "seeded data order in every run (course.batches(..., seed=seed)), so only the "
                "method differs"
            )
    return batches


def _judge_learning_rates(runs: list[Observed]) -> None:
    for i, (run, config) in enumerate(zip(runs, SWEEP_CONFIGS)):
        m, _ = _spy_rows(
            config["method"], {k: v for k, v in config.items() if k not in _HARNESS_KEYS}
        )
        first, second = run.tensors("biases", 2)
        if first.shape != (m, VOCAB) or second.shape != (m, VOCAB):
            raise MalformedObservation(f"run {i + 1}: bias of another shape")
        step = (second.float() - first.float()).abs()
        moved = step[step > 0]
        size = moved.median().item() if moved.numel() else 0.0
        if not 0.8 * config["lr"] <= size <= 1.25 * config["lr"]:
            raise AssertionError(
                f"run {i + 1} ({config['label']!r}): the first AdamW step moved the parameters "
                f"by {size:.3g}, as lr = {size:.3g} would, but the configuration's lr is "
                f"{config['lr']:g}: train every run with its own config['lr'] "
                "(course.train(..., lr=lr))"
            )


def _judge_evaluation(runs: list[Observed], scored: list[Observed]) -> list[dict[str, float]]:
    configs, tok = SWEEP_CONFIGS, tiny_tokenizer()
    _, held_out = _sweep_data()
    want = [ex.prompt for ex in held_out]
    if len(scored) != len(configs):
        raise AssertionError(
            f"the task scored {len(scored)} evaluations for {len(configs)} runs: evaluate "
            "every run once (course.evaluate(task, None, tok, eval_examples, generate=...))"
        )
    metrics = []
    for i, (run, score) in enumerate(zip(runs, scored)):
        where = f"run {i + 1} ({configs[i]['label']!r})"
        prompts, predictions = score.strings("prompts"), score.strings("predictions")
        if prompts != want:
            raise AssertionError(
                f"{where} was scored on {len(prompts)} examples that are not eval_examples "
                "(training examples?): evaluate on the held-out examples given, never on the "
                "training split"
            )
        for mask in run.tensors("masks"):
            left = mask.dim() == 2 and bool((mask[:, 1:] >= mask[:, :-1]).all())
            if not left:
                raise AssertionError(
                    f"{where} called generate_fn with prompts that are not LEFT-padded: "
                    "generate_fn continues the last position of every row (course.evaluate(..., "
                    "generate=method.generate_fn) pads them on the left)"
                )
        generated = []
        for t in run.tensors("generated"):
            valid = t.dim() == 2 and not t.is_floating_point() and not t.is_complex()
            if not valid or (t.numel() and not 0 <= t.min() <= t.max() < VOCAB):
                raise MalformedObservation(f"{where}: generated tokens {describe(t)}")
            generated += [tok.decode(row, skip_special_tokens=True).strip() for row in t.tolist()]
        if len(predictions) != len(want) or [p.strip() for p in predictions] != generated:
            raise AssertionError(
                f"{where} was scored on predictions that are not what its method's generate_fn "
                "generated for eval_examples: evaluate with generate=method.generate_fn"
            )
        metrics.append(_reverse_scores(predictions, held_out))
    return metrics


def _number(row: Observed, key: str) -> float | None:
    value = row.raw(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _judge_reported(
    rows: list[Observed], runs: list[Observed], metrics: list[dict[str, float]]
) -> None:
    total = sum(p.numel() for p in tiny_model("GPT-2").parameters())
    for row, run, config, scores in zip(rows, runs, SWEEP_CONFIGS, metrics):
        label = config["label"]
        options = {k: v for k, v in config.items() if k not in _HARNESS_KEYS}
        trained, stored = _spy_counts(config["method"], options, total)
        if row.raw("trainable") != trained:
            raise AssertionError(
                f"row {label!r}: trainable = {row.raw('trainable')}, but the method trains "
                f"{trained:,} values (its n_trainable): report what the optimizer "
                "updates, not the backbone's size or the stored size"
            )
        if row.raw("stored") != stored:
            raise AssertionError(
                f"row {label!r}: stored = {row.raw('stored')}, expected the method's n_stored = "
                f"{stored:,}"
            )
        pct, want = _number(row, "pct"), 100 * trained / total
        if pct is None or not math.isclose(pct, want, rel_tol=0.02):
            raise AssertionError(
                f"row {label!r}: pct = {row.raw('pct')}, expected 100 · trainable / backbone "
                f"size = {want:.4g} (the backbone as loaded: {total:,} values)"
            )
        if row.raw("steps") != STEPS:
            raise AssertionError(f"row {label!r}: steps = {row.raw('steps')}, expected {STEPS}")
        seconds = _number(row, "seconds")
        if seconds is None or not seconds > 0:
            raise AssertionError(
                f"row {label!r}: seconds = {row.raw('seconds')!r}, the training time"
            )
        for key, value in scores.items():
            got = _number(row, key)
            if got is None or not math.isclose(got, value, abs_tol=1e-6):
                raise AssertionError(
                    f"row {label!r}: {key} = {row.raw(key)!r}, but the task scored this run's "
                    f"predictions {value:.4g}: report the task's metrics of each run's own "
                    "evaluation"
                )
        if row.has("final_loss"):
            losses = [float(x) for x in run.list("losses") if isinstance(x, (int, float))]
            tail = losses[-10:]
            want_loss = sum(tail) / len(tail) if tail else math.nan
            got = _number(row, "final_loss")
            if got is None or not math.isclose(got, want_loss, rel_tol=1e-6, abs_tol=1e-6):
                raise AssertionError(
                    f"row {label!r}: final_loss = {row.raw('final_loss')!r}, but the run's last "
                    f"losses average {want_loss:.5g}: report run.final_loss of course.train"
                )


def _judge_repeat(rows: list[Observed], runs: list[Observed]) -> None:
    twins = [i for i, c in enumerate(SWEEP_CONFIGS) if c["label"] in ("reparam", "reparam again")]
    a, b = twins
    if runs[a].list("losses") != runs[b].list("losses"):
        raise AssertionError(
            f"the same configuration run twice trained with the losses {runs[a].list('losses')} "
            f"and {runs[b].list('losses')}: a sweep must be reproducible (fresh backbone, same "
            "seed, same data order)"
        )
    for key in (*METRICS, "final_loss"):
        if rows[a].has(key) and rows[a].raw(key) != (
            rows[b].raw(key) if rows[b].has(key) else None
        ):
            raise AssertionError(
                f"the same configuration run twice gave {key} {rows[a].raw(key)} and "
                f"{rows[b].raw(key) if rows[b].has(key) else None}: a sweep must be reproducible "
                "(fresh backbone, same seed, same data order)"
            )


def judge_run_sweep(obs: Observed) -> None:
    rows = _judge_rows(obs.raw("rows"))
    runs = obs.subs("runs")
    _judge_runs(runs)
    _judge_batches(runs)
    _judge_learning_rates(runs)
    metrics = _judge_evaluation(runs, obs.subs("scored"))
    _judge_reported(rows, runs, metrics)
    _judge_repeat(rows, runs)


def check_run_sweep(run_sweep: Callable) -> None:
    """run_sweep: every configuration gets a fresh backbone, the same seed before its method is
    built, the same data order, exactly `steps` steps and an evaluation on the held-out
    examples; each row reports the method's trainable and stored counts, its share of the
    backbone, the steps, the time and the task's metrics, and a repeated run repeats exactly.

    Also: each method is built with its configuration's options and trained at its lr on batches
    of batch_size, and the metrics are the task's scores of what that method generated.
    """
    run_check(observe_run_sweep, judge_run_sweep, run_sweep)


# ---------------------------------------------------------------------------------------------
# The saved study (hidden tests only)
# ---------------------------------------------------------------------------------------------
STUDIES = ("methods", "length", "low_data", "init")
MIN_EVAL = 24
"""The fewest validation inputs a study may be scored on (the notebook's CPU setting)."""


def observe_sweep_artifact(study, model: nn.Module | None = None) -> dict:
    """The study as data, and what the notebook's backbone says it is (if it is the course's)."""
    facts = None
    choice = getattr(model, "course_choice", None)
    if choice is not None and isinstance(model, nn.Module):
        facts = {
            "backbone": "tiny" if choice.is_tiny else str(choice.source),
            "params": sum(p.numel() for p in model.parameters()),
            "geometry": dict(kv_geometry(model.config)),
        }
    return {"study": _plain(study, [200_000]), "model": facts}


class _Artifact:
    """Typed reads of the student's study: a wrong structure is the artifact's fault, and the
    message says so (unlike a malformed observation)."""

    def __init__(self, data: object, where: str) -> None:
        self.data, self.where = data, where

    def _fail(self, key: str, want: str) -> AssertionError:
        value = self.data.get(key) if isinstance(self.data, dict) else None
        return AssertionError(
            f"sweep.pt: {self.where}{key} is {value!r:.60}, expected {want} — the file was not "
            "written by this notebook's study cells: run them again and submit the new sweep.pt"
        )

    def get(self, key: str, kind: type | tuple, want: str):
        value = self.data.get(key) if isinstance(self.data, dict) else None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self._fail(key, want)
        return value

    def number(self, key: str) -> float:
        return float(self.get(key, (int, float), "a number"))

    def integer(self, key: str) -> int:
        return self.get(key, int, "an int")

    def sub(self, key: str) -> _Artifact:
        return _Artifact(self.get(key, dict, "a dict"), f"{self.where}{key}.")

    def rows(self, key: str) -> list[_Artifact]:
        items = self.get(key, list, "a list of rows")
        if not all(isinstance(r, dict) for r in items):
            raise self._fail(key, "a list of dicts")
        return [_Artifact(r, f"{self.where}{key}[{i}].") for i, r in enumerate(items)]


@functools.cache
def _tiny_backbone() -> tuple[nn.Module, object]:
    import course

    return course.load_backbone("tiny", device="cpu")


@functools.cache
def _tiny_baseline(task_name: str, n: int) -> dict[str, float]:
    """What the frozen tiny LM scores without any adaptation on the first ``n`` validation
    inputs of ``task_name`` (greedy, as the notebook's baseline)."""
    import course
    from course.data import get_task

    model, tok = _tiny_backbone()
    task = get_task(task_name)

    def bare(ids, mask, new):
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        return out[:, ids.shape[1] :]

    with torch.no_grad():
        scores = course.evaluate(
            task, None, tok, task.examples("validation", n), show_progress=False, generate=bare
        )
    return {k: float(v) for k, v in scores.items() if k != "predictions"}


def _judge_backbone(setup: _Artifact, facts: dict | None) -> tuple[int, dict, float | None]:
    """The backbone's size and geometry (checked against the real one where the judge can load
    it), and the frozen backbone's score the judge computed (tiny LM) or None."""
    from course.data import get_task, list_tasks

    backbone = setup.get("backbone", str, "the backbone's name")
    total = setup.integer("backbone_params")
    geometry = setup.sub("geometry")
    keys = ("n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size")
    geo = {k: geometry.integer(k) for k in keys}
    metric = setup.get("metric", str, "the task's metric")
    task_name = setup.get("task", str, "the task's name")
    if task_name not in list_tasks() or get_task(task_name).primary_metric != metric:
        raise AssertionError(
            f"sweep.pt: the study's task {task_name!r} and metric {metric!r} do not go together"
        )
    n_eval = setup.integer("n_eval")
    if not MIN_EVAL <= n_eval <= 1000:
        raise AssertionError(
            f"sweep.pt: the study was scored on {n_eval} validation inputs, expected at least "
            f"{MIN_EVAL} (the notebook's N_EVAL)"
        )
    if backbone == "tiny":
        model, _ = _tiny_backbone()
        real = (sum(p.numel() for p in model.parameters()), kv_geometry(model.config))
    elif facts is not None and facts.get("backbone") == backbone:
        real = (facts.get("params"), facts.get("geometry"))
    else:
        real = None
    if real is not None and real[0] != total:
        raise AssertionError("the study's backbone size does not match the backbone")
    if real is not None and real[1] != geo:
        raise AssertionError("the study's backbone geometry does not match the backbone")
    recorded = setup.sub("baseline").number(metric)
    if backbone != "tiny":
        return total, geo, None
    computed = _tiny_baseline(task_name, n_eval)[metric]
    if abs(recorded - computed) > 5:
        raise AssertionError(
            f"sweep.pt: the study's frozen-backbone baseline ({metric} {recorded:.1f}) is not what "
            f"the frozen tiny LM scores on those {n_eval} validation inputs ({computed:.1f}): run "
            "the study cells unchanged"
        )
    return total, geo, computed


def _judge_sweep(name: str, rows: list[_Artifact], configs: list[_Artifact], setup: dict) -> None:
    metric, steps, geometry, total = setup["metric"], setup["steps"], setup["geo"], setup["total"]
    if len(rows) != len(configs):
        raise AssertionError(f"{name}: {len(rows)} rows for {len(configs)} configurations")
    for row, config in zip(rows, configs):
        method = config.get("method", str, "a method name")
        label = config.data.get("label", method)
        where = f"{name}, {row.data.get('label')!r}"
        if method not in METHODS:
            raise AssertionError(f"sweep.pt: {name} has a configuration of method {method!r}")
        if row.data.get("label") != label or row.data.get("method") != method:
            raise AssertionError(
                f"{where}: the row is labelled {row.data.get('label')!r} / method "
                f"{row.data.get('method')!r}, but its configuration is {label!r} / {method!r}: "
                "rows follow the configurations, in order"
            )
        if row.data.get("steps") != steps:
            raise AssertionError(
                f"{where}: trained {row.data.get('steps')} steps, the study's budget is {steps}: "
                "every run must get the same number of steps"
            )
        score = row.data.get(metric)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 100:
            raise AssertionError(f"{where}: {metric} = {score!r}, expected a score in [0, 100]")
        trainable, stored = row.integer("trainable"), row.integer("stored")
        options = config.data
        length, hidden = options.get("length", 10), options.get("hidden", 128)
        if not all(type(v) is int and v > 0 for v in (length, hidden)):
            raise AssertionError(f"sweep.pt: {where}: length / hidden must be positive ints")
        want = expected_counts(method, geometry, length, hidden, total)
        if want[0] is not None and (trainable, stored) != want:
            raise AssertionError(
                f"{where}: trainable / stored = {trainable:,} / {stored:,}, "
                f"expected {want[0]:,} / {want[1]:,} for this backbone"
            )
        if method == "lora" and not (trainable == stored and 0 < trainable < total // 4):
            raise AssertionError(
                f"{where}: LoRA trains / stores {trainable:,} / {stored:,} values of a "
                f"{total:,}-value backbone: expected the same small number of adapter values"
            )
        if not math.isclose(row.number("pct"), 100 * trainable / total, rel_tol=0.02):
            raise AssertionError(f"{where}: pct {row.data['pct']} is not 100·trainable/backbone")


def judge_sweep_artifact(obs: Observed) -> None:
    data, facts = _plain_data(obs.raw("study"), "study"), _plain_data(obs.raw("model"), "model")
    if facts is not None and not isinstance(facts, dict):
        raise MalformedObservation("the backbone facts are not a mapping")
    if not isinstance(data, dict) or "setup" not in data:
        raise AssertionError(
            f"the study is {type(data).__name__ if not isinstance(data, str) else data} without "
            "its 'setup': run the study cells and save sweep.pt (submit it with the notebook)"
        )
    study = _Artifact(data, "")
    missing = [s for s in STUDIES if not data.get(s)]
    if missing:
        raise AssertionError(f"the study has no rows for {', '.join(missing)}: run every sweep")
    setup = study.sub("setup")
    steps = setup.integer("steps")
    if steps < 1:
        raise AssertionError(f"sweep.pt: the study's step budget is {steps}")
    total, geometry, computed = _judge_backbone(setup, facts)
    metric = setup.data["metric"]
    configs = setup.sub("configs")
    facts_ = {"metric": metric, "steps": steps, "geo": geometry, "total": total}
    for name in STUDIES:
        _judge_sweep(name, study.rows(name), configs.rows(name), facts_)
    methods = {row["method"] for row in data["methods"]}
    if methods != set(METHODS):
        raise AssertionError(f"the method comparison covers {sorted(methods)}, not all five")
    best = max(row[metric] for row in data["methods"])
    baseline = setup.sub("baseline").number(metric)
    if computed is not None:
        baseline = max(baseline, computed)
    if not best >= baseline + 5:
        raise AssertionError(
            f"no method beats the frozen backbone without adaptation ({metric} "
            f"{baseline:.1f}) by 5 points (best {best:.1f}): did training run?"
        )


def check_sweep_artifact(study, model: nn.Module | None = None) -> None:
    """The saved study (``sweep.pt``): every sweep present, every run at the same step budget,
    parameter counts that fit the backbone, scores in [0, 100], and at least one method well
    above the frozen backbone without adaptation."""
    run_check(observe_sweep_artifact, judge_sweep_artifact, study, model)
