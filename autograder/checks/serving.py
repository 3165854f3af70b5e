"""Checks for notebook 04, many tenants on one frozen backbone: prefix files (``save_prefix`` /
``load_prefix``), one forward pass over a mixed-tenant batch (``mixed_prefix_forward``) and
greedy generation in such a batch (``mixed_generate``).

Each check is an *observe* / *judge* pair (see :mod:`autograder.checks.protocol`). Observing
feeds the student's code prefixes, encoders and batches drawn from the current variant and
records what came out: the bytes of the files ``save_prefix`` wrote, what ``load_prefix``
returned (for those files, for a file the grader rewrote with other values, for files of
another backbone), the logits, loss and prefix gradients of ``mixed_prefix_forward`` with a
recording of what every layer's attention received, the tokens ``mixed_generate`` chose, and the
errors raised. Judging rebuilds the same inputs and decides from that data alone: a prefix file
is parsed with safetensors only (never unpickled); a mixed batch is judged row by row against the
reference's SINGLE-tenant forward pass given the same prefix values (to 1e-5), and its gradients
against the reference's on the same values, keys and values separately; each generated token
must be the greedy choice of the row's own tenant alone.

Prefixes of different lengths in one batch may be handled either way, as long as it is done
clearly: rejected with a ``ValueError`` that says the lengths differ, or padded into masked
slots (in front of the prefix or behind it) with each row's tokens at its own positions
``P_b .. P_b+T-1`` (rows then must equal the single-tenant runs too).

Notation: ``L`` layers, ``H`` key/value heads, ``P`` prefix length, ``D`` head dim, ``B`` batch,
``T`` tokens. A prefix is a tensor ``(L, 2, H, P, D)``.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GPT2Config, PretrainedConfig

from autograder.checks import fixtures
from autograder.checks.harness import (
    CheckFailure,
    describe,
    max_diff,
    seeded,
    student_call,
)
from autograder.checks.models import KINDS, Batch, tiny_model, tiny_models
from autograder.checks.prefix import _mask_check
from autograder.checks.protocol import MalformedObservation, Observed, run_check
from autograder.checks.recording import record
from course.compat import kv_geometry

__all__ = [
    "check_mixed_generate",
    "check_mixed_prefix_forward",
    "check_save_load_prefix",
    "judge_mixed_generate",
    "judge_mixed_prefix_forward",
    "judge_save_load_prefix",
    "observe_mixed_generate",
    "observe_mixed_prefix_forward",
    "observe_save_load_prefix",
]

_ATOL = 1e-5
_BF16_ATOL = 2e-2
EQUAL = {"acme": 4, "bistro": 4, "cafe": 4}
MIXED = {"acme": 4, "bistro": 2, "cafe": 3}
_MAX_FILE = 1 << 20
"""Largest prefix file whose bytes are recorded (a tiny model's prefix takes a few KB)."""
_MAX_VALUES = 1 << 16
"""Largest tensor returned by the student that is recorded as is."""
_MAX_TEXT = 2000
_REJECTS = re.compile(r"length|\bP\b|size", re.I)


def _reference():
    """The reference implementation: the grader's process only (judges), never observers (a
    student package replays its stored results, :mod:`autograder.checks.fixtures`)."""
    return fixtures.reference()


def _tenants(model: nn.Module, lengths: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Random prefixes ``(L, 2, H, P_t, D)`` for the tenants named in ``lengths``."""
    g = kv_geometry(model.config)
    gen = torch.Generator().manual_seed(seeded(seed))
    return {
        name: torch.randn(g["n_layers"], 2, g["n_kv_heads"], p, g["head_dim"], generator=gen)
        for name, p in lengths.items()
    }


def _shape(config: PretrainedConfig, p: int | None) -> tuple:
    """``(L, 2, H_kv, P, D)`` of ``config``; ``p=None`` leaves ``P`` out (``"P"``)."""
    g = kv_geometry(config)
    return (g["n_layers"], 2, g["n_kv_heads"], "P" if p is None else p, g["head_dim"])


def _shape_pattern(shape: tuple[int, ...], wildcard: int | None = None) -> re.Pattern:
    """A regex finding ``shape``'s numbers in order in a message (``3, 2, 4, 4, 8`` or
    ``[3, 2, 4, 4, 8]``); position ``wildcard`` may also be written as a letter (``P``)."""
    parts = [rf"(?:{n}|[A-Za-z_]\w*)" if i == wildcard else str(n) for i, n in enumerate(shape)]
    return re.compile(r"(?<!\d)" + r"\D{1,4}".join(parts) + r"(?!\d)")


def _text(value: object) -> str:
    """``str(value)``, cut to a readable length (a student's exception may say anything)."""
    try:
        text = str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ of the student's exception
        text = f"<{type(value).__name__}>"
    return text[:_MAX_TEXT]


# ------------------------------------------------------------------------------- observing
def _error(failure: CheckFailure) -> dict[str, Any]:
    """A failed call as data: the check's text, and the student's exception (its class names,
    most specific first, and message), absent when the stub raised ``NotImplementedError``."""
    cause = failure.__cause__
    return {
        "text": _text(failure),
        "types": [] if cause is None else [c.__name__ for c in type(cause).__mro__],
        "message": "" if cause is None else _text(cause),
    }


def _attempt(what: str, fn: Callable, *args: Any) -> tuple[Any, dict[str, Any] | None]:
    """``(result, None)``, or ``(None, error)`` when the student's call failed."""
    try:
        return student_call(what, fn, *args), None
    except CheckFailure as failure:
        return None, _error(failure)


def _raised(fn: Callable, *args: Any) -> dict[str, Any]:
    """What ``fn(*args)`` did when it should have refused: ``{"raised": name, "message"}`` or
    ``{"returned": description}``."""
    try:
        out = fn(*args)
    except Exception as err:  # noqa: BLE001 - any refusal is recorded
        return {"raised": type(err).__name__, "message": _text(err)}
    return {"returned": describe(getattr(out, "logits", out))}


def _small(value: object) -> torch.Tensor | None:
    """A detached CPU copy of a tensor of at most :data:`_MAX_VALUES` values, else None."""
    if isinstance(value, torch.Tensor) and value.numel() <= _MAX_VALUES:
        return value.detach().cpu()
    return None


def _output(out: object) -> dict[str, Any]:
    """The logits and loss of a forward pass's output."""
    logits, loss = getattr(out, "logits", None), getattr(out, "loss", None)
    scalar = isinstance(loss, torch.Tensor) and loss.numel() == 1
    return {
        "logits": _small(logits),
        "logits_type": describe(logits),
        "loss": float(loss.detach().float().item()) if scalar else None,
        "loss_type": describe(loss),
    }


def _stored(prefixes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The caller's prefix dict after the student's calls (what a registry would hold)."""
    return {str(k): _small(v) if isinstance(v, torch.Tensor) else None for k, v in prefixes.items()}


# ------------------------------------------------------------------------------- judging
def _models(obs: Observed) -> list[tuple[str, nn.Module, Observed]]:
    """The tiny models of the variant, each with its observation (checked to be for it)."""
    pairs = []
    for (label, model), o in zip(tiny_models(), obs.subs("models", len(KINDS)), strict=True):
        if o.str("label") != label:
            raise MalformedObservation(f"observation for {o.str('label')!r}, expected {label!r}")
        pairs.append((label, model, o))
    return pairs


@dataclass
class _Error:
    """A recorded failure of the student's code (see :func:`_error`)."""

    text: str
    types: list[str]
    message: str

    @classmethod
    def of(cls, o: Observed) -> _Error:
        return cls(o.str("text"), o.strings("types"), o.str("message"))

    def is_a(self, name: str) -> bool:
        return name in self.types

    def raise_it(self) -> None:
        raise CheckFailure(self.text)


def _maybe_error(o: Observed) -> _Error | None:
    return _Error.of(o.sub("error")) if o.raw("error") is not None else None


def _unchanged(label: str, o: Observed, prefixes: dict[str, torch.Tensor], fn: str) -> None:
    """The caller's prefix dict still holds exactly the tenants' prefixes."""
    stored = o.sub("prefixes_after")
    changed = sorted(set(stored.keys()) ^ set(prefixes))
    for name, values in prefixes.items():
        if name in stored.keys():
            now = stored.maybe_tensor(name)
            if now is None or now.shape != values.shape or not torch.equal(now, values):
                changed.append(name)
    if changed:
        raise AssertionError(
            f"{label}: {fn} changed the stored prefixes of {sorted(set(changed))}: serving must "
            "never write to a tenant's prefix (nor replace the entries of the dict it is given, "
            "e.g. with padded or cast copies)"
        )


# ---------------------------------------------------------------------------------------------
# save_prefix / load_prefix
# ---------------------------------------------------------------------------------------------
class _ReparamPrefix(nn.Module):
    """A reparameterised prefix encoder: ``P`` embeddings through ``Linear -> Tanh -> Linear``,
    viewed as ``(L, 2, H, P, D)`` (a non-contiguous permute). Its state dict holds far more than
    the prefix it returns; every weight is drawn from ``seed``."""

    def __init__(self, config: PretrainedConfig, prefix_len: int, hidden: int, seed: int) -> None:
        super().__init__()
        g = kv_geometry(config)
        self.geometry = (g["n_layers"], g["n_kv_heads"], g["head_dim"])
        self.prefix_len = prefix_len
        self.reparam = True
        d, out = g["hidden_size"], g["n_layers"] * 2 * g["n_kv_heads"] * g["head_dim"]
        self.embedding = nn.Parameter(torch.empty(prefix_len, d))
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, out))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1))

    def forward(self) -> torch.Tensor:
        n_layers, heads, dim = self.geometry
        flat = self.mlp(self.embedding)  # (P, L*2*H*D)
        return flat.view(self.prefix_len, n_layers, 2, heads, dim).permute(1, 2, 3, 0, 4)


def _meta() -> dict[str, Any]:
    return {"tenant": "acme", "task": "sentiment", "steps": seeded(40)}


def _encoder(config: PretrainedConfig) -> _ReparamPrefix:
    return _ReparamPrefix(config, 4, 16, seeded(8))


def _tensor_prefix(config: PretrainedConfig) -> nn.Parameter:
    """A P = 3 prefix as a trainable tensor (as the notebook saves its tenants)."""
    gen = torch.Generator().manual_seed(seeded(9))
    return nn.Parameter(torch.randn(_shape(config, 3), generator=gen))


def _other_values(config: PretrainedConfig) -> torch.Tensor:
    """The P = 4 values the grader writes into its copy of the student's file."""
    gen = torch.Generator().manual_seed(seeded(10))
    return torch.randn(_shape(config, 4), generator=gen)


def _foreign_configs() -> list[tuple[str, PretrainedConfig]]:
    """Configs a GPT-2 prefix ``(3, 2, 4, P, 8)`` does not fit: each differs in one of L, H, D,
    and the Llama-GQA one has exactly as many values per position."""

    def gpt2(**kwargs: int) -> GPT2Config:
        return GPT2Config(vocab_size=64, n_positions=64, **kwargs)

    return [
        ("GPT-2 prefix, Llama-GQA model", tiny_model("Llama-GQA").config),
        ("GPT-2 prefix, 2-layer model", gpt2(n_layer=2, n_embd=32, n_head=4)),
        ("GPT-2 prefix, model with 8 heads of 8", gpt2(n_layer=3, n_embd=64, n_head=8)),
        ("GPT-2 prefix, model with 4 heads of 16", gpt2(n_layer=3, n_embd=64, n_head=4)),
    ]


def _file(path: Path) -> dict[str, Any]:
    """The file at ``path`` as data: whether it exists, its size, its bytes (when small)."""
    if not path.is_file():
        return {"exists": False, "size": 0, "bytes": None}
    size = path.stat().st_size
    data = path.read_bytes() if size <= _MAX_FILE else b""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
    return {"exists": True, "size": size, "bytes": raw}


def _loaded(what: str, load_prefix: Callable, path: Path | str, config) -> dict[str, Any]:
    """What ``load_prefix(path, config)`` returned, as data."""
    result, error = _attempt(what, load_prefix, path, config)
    if error is not None:
        return {"error": error}
    if not (isinstance(result, tuple) and len(result) == 2):
        return {"error": None, "returned": describe(result)}
    prefix, meta = result
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError):
        meta_json = None
    return {
        "error": None,
        "returned": "tuple",
        "prefix": _small(prefix),
        "prefix_type": describe(prefix),
        "meta": meta_json,
        "meta_text": _text(meta) if meta_json is None else meta_json[:_MAX_TEXT],
    }


def _rewritten(source: Path, values: torch.Tensor, other: torch.Tensor, target: Path) -> bool:
    """Copy the student's safetensors file ``source`` to ``target`` with the tensor that holds
    ``values`` replaced by ``other`` (same name, dtype and metadata): a file in the student's own
    format that ``save_prefix`` never wrote. False when ``source`` holds no such tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    try:
        with safe_open(str(source), framework="pt") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception:  # noqa: BLE001 - not a safetensors file: the judge says so
        return False
    fits = [k for k, t in tensors.items() if t.shape == values.shape and t.is_floating_point()]
    if not fits:
        return False
    key = min(fits, key=lambda k: max_diff(tensors[k], values))
    tensors[key] = other.to(tensors[key].dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(target), metadata=metadata)
    return True


def observe_save_load_prefix(save_prefix: Callable, load_prefix: Callable) -> dict:
    """Per tiny model: the files ``save_prefix`` wrote for a reparameterised encoder (with meta)
    and for a trainable tensor (without), and what ``load_prefix`` returned for them and for a
    copy the grader rewrote with other values; then what ``load_prefix`` did with the GPT-2 file
    and configs it does not fit."""
    meta = _meta()
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label, model in tiny_models():
            encoder = _encoder(model.config)
            with torch.no_grad():
                values = encoder().detach().clone()
            path = folder / f"{label}-acme.safetensors"
            student_call("save_prefix(encoder, path, meta)", save_prefix, encoder, path, meta)
            o: dict[str, Any] = {"label": label, "file": _file(path)}
            how = "load_prefix(path, model.config)"
            o["loaded"] = _loaded(how, load_prefix, path, model.config)

            copy = folder / "copy" / path.name
            if _rewritten(path, values, _other_values(model.config), copy):
                how = "load_prefix(a copy of that file holding other values, model.config)"
                o["loaded_copy"] = _loaded(how, load_prefix, copy, model.config)
            else:
                o["loaded_copy"] = None

            tensor = _tensor_prefix(model.config)
            second = folder / f"{label}-bistro.safetensors"
            _, error = _attempt("save_prefix(tensor, str(path))", save_prefix, tensor, str(second))
            o["save_tensor_error"] = error
            o["file_no_meta"] = _file(second)
            how = "load_prefix(str(path), model.config)"
            o["loaded_no_meta"] = _loaded(how, load_prefix, str(second), model.config)
            models.append(o)

        path = folder / "GPT-2-acme.safetensors"
        refusals = []
        for label, config in _foreign_configs():
            result, error = _attempt("load_prefix", load_prefix, path, config)
            refusals.append(
                {"label": label, "error": error, "returned": None if error else describe(result)}
            )
    return {"models": models, "refusals": refusals}


def _parse(label: str, o: Observed, what: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of the file ``what`` wrote, parsed by safetensors (never unpickled)."""
    from safetensors.torch import load

    if not o.bool("exists"):
        raise AssertionError(f"{label}: {what} wrote no file at the path it was given")
    size = o.int("size")
    if size > _MAX_FILE:
        raise AssertionError(
            f"{label}: the file {what} wrote is {size} bytes, while the prefix "
            f"{tuple(values.shape)} takes {values.numel() * 4} in float32: a tenant's file holds "
            "the prefix values and nothing else"
        )
    raw = o.maybe_tensor("bytes")
    if raw is None and size == 0:
        raw = torch.zeros(0, dtype=torch.uint8)
    if raw is None or raw.dtype != torch.uint8 or tuple(raw.shape) != (size,):
        raise MalformedObservation(f"{label}: the recorded file does not have its {size} bytes")
    data = raw.numpy().tobytes()
    try:
        return load(data)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same explanation
        hint = ""
        if data[:2] == b"PK" or data[:1] == b"\x80":
            hint = " (it is a torch.save pickle)"
        raise AssertionError(
            f"{label}: the file {what} wrote is not a safetensors file{hint} ({_text(err)}). Use "
            "safetensors.torch.save_file: torch.save writes a pickle, and loading a pickle from "
            "a tenant can run arbitrary code, while a safetensors file holds only tensors"
        ) from None


def _check_file(label: str, tensors: dict[str, torch.Tensor], values: torch.Tensor) -> None:
    total = sum(t.numel() for t in tensors.values())
    if total != values.numel():
        raise AssertionError(
            f"{label}: the prefix file holds {total} values in tensors {sorted(tensors)}, "
            f"expected only the prefix: L·2·H_kv·P·D = {values.numel()}. Save the values "
            "encoder() returns, not the encoder's state dict (a reparameterisation MLP is for "
            "training only; a tenant's file is just its prefix)"
        )
    if not any(t.shape == values.shape and max_diff(t, values) <= 1e-6 for t in tensors.values()):
        raise AssertionError(
            f"{label}: no tensor in the prefix file equals encoder() "
            f"{tuple(values.shape)} (L, 2, H_kv, P, D); found "
            + ", ".join(f"{k}: {describe(t)}" for k, t in tensors.items())
        )


_UNCHANGED = (
    "save_prefix must store the values unchanged, and load_prefix read the values from the file "
    "it is given"
)


def _check_loaded(
    label: str, o: Observed, values: torch.Tensor, meta: dict, how: str, hint: str = ""
) -> None:
    error = _maybe_error(o)
    if error is not None:
        error.raise_it()
    returned = o.str("returned")
    if returned != "tuple":
        raise AssertionError(
            f"{label}: load_prefix({how}) returned {returned}, expected a tuple "
            "(prefix (L, 2, H_kv, P, D), meta dict)"
        )
    prefix = o.maybe_tensor("prefix")
    if prefix is None or prefix.shape != values.shape:
        raise AssertionError(
            f"{label}: load_prefix({how}) gave the prefix as {o.str('prefix_type')}, expected "
            f"{tuple(values.shape)} (L, 2, H_kv, P, D)"
        )
    if not (prefix.is_floating_point() and max_diff(prefix, values) <= 1e-6):
        diff = max_diff(prefix, values)
        raise AssertionError(
            f"{label}: load_prefix({how}) gave values that differ from the ones in the file by up "
            f"to {diff:.3g}: {hint or _UNCHANGED}"
        )
    text = o.maybe_str("meta")
    try:
        got = None if text is None else json.loads(text)
    except ValueError:
        raise MalformedObservation(f"{label}: the recorded meta is not JSON") from None
    if text is None or got != meta:
        shown = o.str("meta_text")
        raise AssertionError(
            f"{label}: load_prefix({how}) gave meta {shown}, expected {json.dumps(meta)} (what was "
            "passed to save_prefix, or {} when nothing was): store the meta dict as JSON in "
            "the file's metadata (safetensors metadata holds strings only)"
        )


def _check_refused(label: str, o: Observed, have: tuple, want: tuple) -> None:
    what = f"load_prefix(a prefix file of shape {have}, the config of a model that needs {want})"
    error = _maybe_error(o)
    if error is None:
        raise AssertionError(
            f"{label}: {what} returned {o.str('returned')} instead of raising: a prefix trained "
            "for another backbone must be refused with a ValueError. Compare the file's (L, 2, "
            "H_kv, P, D) with course.kv_geometry(config) (a matching NUMBER of values is not "
            "enough, nor matching layers and heads: compare every dimension but P)"
        )
    if not error.types:
        error.raise_it()  # the stub: "not implemented yet"
    if not error.is_a("ValueError"):
        raise AssertionError(
            f"{label}: {what} raised {error.types[0]}: {error.message} — refuse it with a "
            "ValueError that names both shapes, before anything else touches the tensor"
        )
    missing = [
        name
        for name, shape, wild in (("the file's shape", have, None), ("the model's", want, 3))
        if not _shape_pattern(shape, wild).search(error.message)
    ]
    if missing:
        raise AssertionError(
            f"{label}: {what} raised ValueError({error.message!r}), which does not name "
            f"{' and '.join(missing)}: say what the file holds and what the model needs, "
            f"e.g. 'prefix {have} does not fit this model: it needs {want} (L, 2, H_kv, P, D)'"
        )


def judge_save_load_prefix(obs: Observed) -> None:
    meta = _meta()
    for label, model, o in _models(obs):
        with torch.no_grad():
            values = _encoder(model.config)().detach()
        what = "save_prefix(encoder, path, meta)"
        _check_file(label, _parse(label, o.sub("file"), what, values), values)
        _check_loaded(label, o.sub("loaded"), values, meta, "path, model.config")
        if o.raw("loaded_copy") is None:
            raise MalformedObservation(f"{label}: no load of the grader's copy was recorded")
        _check_loaded(
            label, o.sub("loaded_copy"), _other_values(model.config), meta,
            "a copy of the file in another folder, holding other values",
            "load_prefix must read the values from the file at `path`, every time (no cache "
            "keyed by file name or tenant: a tenant's updated file would never be served)",
        )  # fmt: skip
        tensor = _tensor_prefix(model.config).detach()
        error = _maybe_error(Observed({"error": o.raw("save_tensor_error")}))
        if error is not None:
            error.raise_it()
        what = "save_prefix(tensor, str(path))"
        _check_file(label, _parse(label, o.sub("file_no_meta"), what, tensor), tensor)
        _check_loaded(label, o.sub("loaded_no_meta"), tensor, {}, "a file saved without meta")

    have = _shape(tiny_model("GPT-2").config, 4)
    configs = _foreign_configs()
    for (label, config), o in zip(configs, obs.subs("refusals", len(configs)), strict=True):
        if o.str("label") != label:
            raise MalformedObservation(f"refusal observed for {o.str('label')!r}, not {label!r}")
        _check_refused(label, o, have, _shape(config, have[3]))


def check_save_load_prefix(save_prefix: Callable, load_prefix: Callable) -> None:
    """save_prefix/load_prefix: a safetensors file holding only the prefix values (no MLP), meta
    kept as given, values read back unchanged from the file; a prefix whose geometry does not fit
    the model (other layers, KV heads or head dim — even with as many values) is refused with a
    ValueError that names both shapes."""
    run_check(observe_save_load_prefix, judge_save_load_prefix, save_prefix, load_prefix)


# ---------------------------------------------------------------------------------------------
# mixed_prefix_forward
# ---------------------------------------------------------------------------------------------
_FORWARD_IDS = ("bistro", "acme", "cafe", "acme")
_MIXED_FORWARD_IDS = ("bistro", "acme", "cafe", "bistro")
_FORWARD = "mixed_prefix_forward(model, prefixes, tenant_ids, input_ids, mask, labels)"


def _recorded(model: nn.Module, what: str, fn: Callable, *args: Any) -> dict[str, Any]:
    """Run the student's ``fn`` under a recording: ``{"error"}`` or ``{"recording", "out"}``."""
    with record(model) as rec:
        out, error = _attempt(what, fn, *args)
    if error is not None:
        return {"error": error}
    return {"error": None, "recording": rec.to_data(), "out": _output(out)}


def _gradients(mixed_prefix_forward: Callable, model, prefixes, tenant_ids, batch) -> dict:
    """A training step's view: ``loss.backward()`` with trainable prefixes; their gradients."""
    leaves = {t: v.clone().requires_grad_() for t, v in prefixes.items()}
    what = "mixed_prefix_forward(model, prefixes requiring grad, tenant_ids, ids, mask, labels)"
    out, error = _attempt(
        what, mixed_prefix_forward, model, leaves, list(tenant_ids), batch.input_ids,
        batch.attention_mask, batch.labels,
    )  # fmt: skip
    if error is not None:
        return {"error": error}
    loss = getattr(out, "loss", None)
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
        return {"error": None, "backward": False, "loss_type": describe(loss), "grads": None}
    _, error = _attempt("loss.backward()", loss.backward)
    if error is not None:
        return {"error": error}
    grads = {t: _small(leaf.grad) for t, leaf in leaves.items()}
    return {"error": None, "backward": True, "loss_type": describe(loss), "grads": grads}


def observe_mixed_prefix_forward(mixed_prefix_forward: Callable) -> dict:
    """Per tiny model (frozen): a recorded mixed batch of equal prefix lengths and a second
    identical call; a training step's prefix gradients; a recorded batch of different prefix
    lengths; a row of an unknown tenant; the equal batch in a bfloat16 copy of the model."""
    models = []
    for label, model in tiny_models():
        model.requires_grad_(False)
        prefixes = _tenants(model, EQUAL, 7)
        batch = Batch(batch=4, length=6, pad=2, seed=5)
        args = (list(_FORWARD_IDS), batch.input_ids, batch.attention_mask, batch.labels)
        with record(model) as rec:
            out = student_call(_FORWARD, mixed_prefix_forward, model, prefixes, *args)
        o: dict[str, Any] = {"label": label, "recording": rec.to_data(), "out": _output(out)}
        again, error = _attempt(_FORWARD, mixed_prefix_forward, model, prefixes, *args)
        o["again"] = {"error": error, "out": None if error else _output(again)}

        half = tiny_model(label).to(torch.bfloat16).requires_grad_(False)
        what = "mixed_prefix_forward(bfloat16 model, float32 prefixes, tenant_ids, ids, mask)"
        out16, error = _attempt(what, mixed_prefix_forward, half, prefixes, *args[:3])
        o["bf16"] = {"error": error, "out": None if error else _output(out16)}
        o["prefixes_after"] = _stored(prefixes)

        o["gradient"] = _gradients(mixed_prefix_forward, model, prefixes, _FORWARD_IDS, batch)

        mixed = _tenants(model, MIXED, 11)
        batch = Batch(batch=4, length=6, pad=2, seed=6)
        o["different"] = _recorded(
            model, "mixed_prefix_forward with prefixes of different lengths",
            mixed_prefix_forward, model, mixed, list(_MIXED_FORWARD_IDS), batch.input_ids,
            batch.attention_mask, batch.labels,
        )  # fmt: skip
        o["different"]["prefixes_after"] = _stored(mixed)

        batch = Batch(batch=2, length=5, pad=0, seed=7)
        o["unknown"] = _raised(
            mixed_prefix_forward, model, _tenants(model, EQUAL, 7), ["acme", "nobody"],
            batch.input_ids, batch.attention_mask,
        )  # fmt: skip
        models.append(o)
    return {"models": models}


@dataclass
class _Call:
    """One recorded attention call (see :meth:`Recording.to_data`)."""

    layer: int
    query_len: int
    key: torch.Tensor  # (B, H, Tk, D)
    value: torch.Tensor
    visible: torch.Tensor | None  # (B, Tq, Tk) bool

    @property
    def key_len(self) -> int:
        return self.key.shape[2]


def _calls(rec: Observed, model: nn.Module) -> list[_Call]:
    """The recorded attention calls, checked against ``model``'s geometry."""
    g = kv_geometry(model.config)
    calls = []
    for c in rec.subs("calls"):
        key = c.tensor("key", (None, g["n_kv_heads"], None, g["head_dim"]))
        value = c.tensor("value", tuple(key.shape))
        q, layer = c.int("query_len"), c.int("layer")
        visible = c.maybe_tensor("visible")
        if visible is not None and (
            visible.dtype != torch.bool or tuple(visible.shape) != (key.shape[0], q, key.shape[2])
        ):
            raise MalformedObservation(f"attention call of layer {layer}: malformed mask")
        if c.int("key_len") != key.shape[2] or not 0 <= layer < g["n_layers"] or q < 1:
            raise MalformedObservation(f"attention call of layer {layer}: inconsistent sizes")
        calls.append(_Call(layer, q, key.float(), value.float(), visible))
    return calls


def _positions(rec: Observed) -> torch.Tensor | None:
    """The position ids the model embedded first (``(B or 1, T)``), if any were recorded."""
    positions = rec.tensors("positions")
    if not positions:
        return None
    if positions[0].dim() != 2 or positions[0].is_floating_point():
        raise MalformedObservation("recorded position ids are not (B, T) integers")
    return positions[0]


def _who(prefixes: dict[str, torch.Tensor], keys: torch.Tensor, layer: int) -> str | None:
    """Which tenant's layer-``layer`` (or layer-0) keys ``keys (H, P, D)`` are, if any."""
    for at, what in ((layer, "the prefix"), (0, "the LAYER-0 prefix")):
        for name, values in prefixes.items():
            if values.shape[3] == keys.shape[1] and max_diff(keys, values[at, 0]) <= 1e-6:
                return f"{what} of tenant {name!r}"
    return None


def _slot_hint(prefixes, keys: torch.Tensor, layer: int) -> str:
    got = _who(prefixes, keys, layer)
    if got is not None and "LAYER-0" in got:
        return f"got {got}: one prefix shared by all layers, but layer l needs prefixes[tenant][l]"
    if got is not None:
        return (
            f"received {got} — gather prefixes[tenant_ids[row]] for every row, in row order "
            "(the batch is not sorted by tenant)"
        )
    return (
        "got keys/values that are no tenant's prefix: per layer stack "
        "prefixes[tenant_ids[b]][layer, 0] (keys) and [layer, 1] (values) over b"
    )


def _one_call_per_layer(label: str, calls: list[_Call], n_layers: int, b: int, t: int) -> None:
    """Every layer ran once, over the whole batch, with ``T`` queries."""
    for layer in range(n_layers):
        mine = [c for c in calls if c.layer == layer]
        if not mine:
            raise AssertionError(f"{label}: the attention of layer {layer} never ran")
        sizes = [c.key.shape[0] for c in mine]
        if sizes != [b]:
            raise AssertionError(
                f"{label}: layer {layer} ran {len(mine)} time(s) with batch sizes {sizes}, "
                f"expected ONE forward pass over all {b} rows: gather every row's prefix into "
                "one (B, H_kv, P, D) cache per layer instead of running tenant by tenant"
            )
        if mine[0].query_len != t or mine[0].key_len <= t:
            raise AssertionError(
                f"{label}: layer {layer}: attention saw {mine[0].key_len} keys for "
                f"{mine[0].query_len} queries, expected the prefix slots + {t} tokens for {t}: "
                "every layer's cache holds the batch's prefixes, (B, H_kv, P, D) per layer"
            )


def _rows_got_their_prefix(
    label: str, calls: list[_Call], prefixes: dict[str, torch.Tensor], tenant_ids, t: int
) -> None:
    """Equal prefix lengths: every layer has ``P + T`` keys; row ``b``'s prefix keys/values
    are its tenant's, for that layer."""
    n_layers = next(iter(prefixes.values())).shape[0]
    p = max(v.shape[3] for v in prefixes.values())
    _one_call_per_layer(label, calls, n_layers, len(tenant_ids), t)
    for layer in range(n_layers):
        call = next(c for c in calls if c.layer == layer)
        if call.key_len != p + t:
            raise AssertionError(
                f"{label}: layer {layer}: attention saw {call.key_len} keys for "
                f"{call.query_len} queries, expected {p + t} ({p} prefix + {t} tokens) for {t}: "
                "every layer's cache holds the batch's prefixes, (B, H_kv, P, D) per layer"
            )
        for row, tenant in enumerate(tenant_ids):
            want = prefixes[tenant][layer]
            keys, vals = call.key[row, :, :p], call.value[row, :, :p]
            if max_diff(keys, want[0]) <= 1e-6 and max_diff(vals, want[1]) <= 1e-6:
                continue
            hint = _slot_hint(prefixes, keys, layer)
            raise AssertionError(f"{label}: layer {layer}, row {row} (tenant {tenant!r}) {hint}")


def _rows_got_their_slots(
    label: str, calls: list[_Call], prefixes: dict[str, torch.Tensor], tenant_ids, t: int
) -> None:
    """Different prefix lengths: in every layer, the prefix slots row ``b``'s tokens can see are
    exactly ``P_b``, and hold its tenant's keys/values in order (hidden slots may hold
    anything, in front of the prefix or behind it)."""
    n_layers = next(iter(prefixes.values())).shape[0]
    _one_call_per_layer(label, calls, n_layers, len(tenant_ids), t)
    for layer in range(n_layers):
        call = next(c for c in calls if c.layer == layer)
        slots = call.key_len - t
        for row, tenant in enumerate(tenant_ids):
            want = prefixes[tenant][layer]
            n = want.shape[2]
            seen = (
                torch.ones(slots, dtype=torch.bool)
                if call.visible is None
                else call.visible[row, -1, :slots]
            )
            count = int(seen.sum())
            if count > n:
                raise AssertionError(
                    f"{label}: layer {layer}, row {row} (P={n}) can attend to {count} prefix "
                    f"slots, {count - n} of them padded prefix slots: padded slots must be "
                    "masked (0 in the mask), or the row attends to keys its tenant never trained"
                )
            if count < n:
                raise AssertionError(
                    f"{label}: layer {layer}, row {row} (tenant {tenant!r}, P={n}) can attend "
                    f"to only {count} prefix slots: the mask must open all {n} slots of its "
                    "prefix (and hide only the padded ones)"
                )
            keys, vals = call.key[row, :, :slots][:, seen], call.value[row, :, :slots][:, seen]
            if max_diff(keys, want[0]) <= 1e-6 and max_diff(vals, want[1]) <= 1e-6:
                continue
            hint = _slot_hint(prefixes, keys, layer)
            raise AssertionError(
                f"{label}: layer {layer}, row {row} (tenant {tenant!r}): the prefix slots it can "
                f"see {hint}"
            )


def _mask_is_extended(label: str, calls: list[_Call], batch: Batch, p: int) -> None:
    visible = next(c for c in calls if c.layer == 0).visible
    _mask_check(label, visible, batch.attention_mask, p)


def _positions_per_row(label: str, got: torch.Tensor | None, lengths: list[int], t: int) -> None:
    if got is None:
        return
    if got.shape[-1] != t or got.shape[0] not in (1, len(lengths)):
        raise AssertionError(
            f"{label}: the model embedded position ids of shape {tuple(got.shape)}, expected "
            f"({len(lengths)}, {t}): one position per token of each row"
        )
    for row, p in enumerate(lengths):
        want = list(range(p, p + t))
        seen = got[min(row, got.shape[0] - 1)].tolist()
        if seen != want:
            raise AssertionError(
                f"{label}: row {row} (its prefix has P={p}) took positions {seen}, expected "
                f"{want}: with prefixes of different lengths each row's tokens start at its OWN "
                "P, exactly where they would be if that tenant ran alone"
            )


class _Fixed(nn.Module):
    """An encoder returning given prefix values, for the reference's ``prefix_forward``."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.values = values.detach()
        self.prefix_len = values.shape[3]

    def forward(self) -> torch.Tensor:
        return self.values


def _alone(model: nn.Module, values: torch.Tensor, ids, mask, labels=None):
    """The reference single-tenant forward pass of rows ``ids (b, T)`` with ``values``."""
    with torch.no_grad():
        return _reference().prefix_forward(model, _Fixed(values), ids, mask, labels)


def _logits(label: str, o: Observed, shape: tuple[int, int, int], what: str) -> torch.Tensor:
    logits = o.maybe_tensor("logits")
    if logits is None or tuple(logits.shape) != shape or not logits.is_floating_point():
        raise AssertionError(
            f"{label}: {what} returned logits {o.str('logits_type')}, expected {shape} (B, T, "
            "vocab): one row per request, one position per real token"
        )
    return logits


def _compare_rows(
    label: str, model, o: Observed, prefixes, tenant_ids, batch: Batch, what: str, hint: str
) -> None:
    """Row ``b`` of the output equals the reference run of tenant ``tenant_ids[b]`` alone, and
    the loss is the batch's."""
    b, t = batch.shape
    vocab = model.config.vocab_size
    logits = _logits(label, o, (b, t, vocab), what)
    wants = []
    for row, tenant in enumerate(tenant_ids):
        sl = slice(row, row + 1)
        want = _alone(model, prefixes[tenant], batch.input_ids[sl], batch.attention_mask[sl])
        real = batch.attention_mask[row].bool()
        diff = max_diff(logits[row, real], want.logits[0, real])
        if not diff <= _ATOL:
            raise AssertionError(
                f"{label}: {what}: row {row} (tenant {tenant!r}, P={prefixes[tenant].shape[3]}) "
                f"differs from running tenant {tenant!r} alone by up to {diff:.3g} — {hint}"
            )
        wants.append(want.logits[0])
    stacked = torch.stack(wants)
    expected = nn.functional.cross_entropy(
        stacked[:, :-1].reshape(-1, vocab), batch.labels[:, 1:].reshape(-1), ignore_index=-100
    )
    loss = o.raw("loss")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        raise MalformedObservation(f"{label}: the recorded loss is not a number")
    if loss is None or not abs(loss - expected.item()) <= _ATOL:
        shown = o.str("loss_type") if loss is None else round(loss, 6)
        raise AssertionError(
            f"{label}: {what}: loss {shown} differs from the batch's loss {expected.item():.6f}: "
            "pass labels (B, T) to the model"
        )


def _judge_unknown(label: str, o: Observed, fn: str) -> None:
    if o.has("raised"):
        if "nobody" in o.str("message"):
            return
        raise AssertionError(
            f"{label}: a row for the unknown tenant 'nobody' raised {o.str('raised')}: "
            f"{o.str('message')} — name the unknown tenant in the error (a KeyError on "
            "prefixes[tenant] does)"
        )
    raise AssertionError(
        f"{label}: {fn} served a row for the unknown tenant 'nobody' (returned "
        f"{o.str('returned')}) instead of raising: never give a request another tenant's prefix "
        "(or none)"
    )


def _rejected_clearly(error: _Error) -> bool:
    return error.is_a("ValueError") and bool(_REJECTS.search(error.message))


def _judge_different(label: str, model, o: Observed) -> None:
    prefixes = _tenants(model, MIXED, 11)
    tenant_ids = list(_MIXED_FORWARD_IDS)
    batch = Batch(batch=4, length=6, pad=2, seed=6)
    lengths = [prefixes[t].shape[3] for t in tenant_ids]
    what = f"mixed_prefix_forward with prefix lengths {lengths}"
    error = _maybe_error(o)
    if error is not None:
        if _rejected_clearly(error):
            return
        raise AssertionError(
            f"{label}: {what} failed ({error.text}). Tenants' prefixes may differ in length: "
            "either reject such a batch with a ValueError that says the prefix lengths differ, "
            "or pad the shorter prefixes into masked slots"
        )
    rec = o.sub("recording")
    _rows_got_their_slots(label, _calls(rec, model), prefixes, tenant_ids, batch.shape[1])
    _positions_per_row(label, _positions(rec), lengths, batch.shape[1])
    hint = "pad each shorter prefix into masked slots and start each row's positions at its own P"
    _compare_rows(label, model, o.sub("out"), prefixes, tenant_ids, batch, what, hint)
    _unchanged(label, o, prefixes, "mixed_prefix_forward")


def _judge_gradient(label: str, model, o: Observed, prefixes, batch: Batch) -> None:
    error = _maybe_error(o)
    if error is not None:
        raise AssertionError(
            f"{label}: a training step (prefixes requiring grad, labels, loss.backward()) "
            f"failed: {error.text}"
        )
    if not o.bool("backward"):
        raise AssertionError(
            f"{label}: with prefixes that require grad, mixed_prefix_forward's loss "
            f"({o.str('loss_type')}) has no gradient path to them: the notebook trains every "
            "tenant's prefix through this function — build the cache from the prefix tensors "
            "themselves (no .detach(), .data, torch.no_grad() or copies through numpy)"
        )
    leaves = {t: v.clone().requires_grad_() for t, v in prefixes.items()}
    out = _reference().mixed_prefix_forward(
        model, leaves, list(_FORWARD_IDS), batch.input_ids, batch.attention_mask, batch.labels
    )
    out.loss.backward()
    grads = o.sub("grads")
    for tenant in sorted(prefixes):
        want = leaves[tenant].grad
        got = grads.maybe_tensor(tenant)
        if got is not None and tuple(got.shape) != tuple(want.shape):
            raise MalformedObservation(f"{label}: gradient of {tenant!r} has the wrong shape")
        for part, name in ((0, "keys"), (1, "values")):
            if got is None or not bool(got[:, part].abs().max() > 0):
                raise AssertionError(
                    f"{label}: no gradient reaches the {name} of the prefix of tenant {tenant!r} "
                    f"(prefixes[{tenant!r}][:, {part}]): the cache's {name} must be computed "
                    "from the prefix tensor itself, not from a detached copy"
                )
            diff = max_diff(got[:, part], want[:, part])
            scale = want[:, part].abs().max().item()
            if not diff <= _ATOL + 1e-3 * scale:
                raise AssertionError(
                    f"{label}: the gradient of the {name} of the prefix of tenant {tenant!r} "
                    f"differs from the reference's by up to {diff:.3g} (its largest entry is "
                    f"{scale:.3g}): "
                    "each row's loss must flow into its own tenant's prefix, at every layer"
                )


def _judge_bf16(label: str, o: Observed, prefixes, tenant_ids, batch: Batch) -> None:
    what = "mixed_prefix_forward on a bfloat16 copy of the model (float32 prefixes)"
    error = _maybe_error(o)
    if error is not None:
        raise AssertionError(
            f"{label}: {what} failed ({error.text}): cast each prefix to the model's dtype "
            "(model.get_input_embeddings().weight.dtype) and device when you build the cache"
        )
    half = tiny_model(label).to(torch.bfloat16)
    with torch.no_grad():
        want = (
            _reference()
            .mixed_prefix_forward(half, prefixes, tenant_ids, batch.input_ids, batch.attention_mask)
            .logits
        )
    b, t = batch.shape
    logits = _logits(label, o.sub("out"), (b, t, half.config.vocab_size), what)
    real = batch.attention_mask.bool()
    diff = max_diff(logits[real], want[real])
    if not diff <= _BF16_ATOL:
        raise AssertionError(
            f"{label}: {what}: logits differ from the reference's by up to {diff:.3g}: cast the "
            "prefixes to the model's dtype, and nothing else"
        )


def judge_mixed_prefix_forward(obs: Observed) -> None:
    for label, model, o in _models(obs):
        model.requires_grad_(False)
        prefixes = _tenants(model, EQUAL, 7)
        tenant_ids = list(_FORWARD_IDS)
        batch = Batch(batch=4, length=6, pad=2, seed=5)
        rec = o.sub("recording")
        calls = _calls(rec, model)
        _rows_got_their_prefix(label, calls, prefixes, tenant_ids, batch.shape[1])
        _mask_is_extended(label, calls, batch, 4)
        _positions_per_row(label, _positions(rec), [4] * 4, batch.shape[1])
        hint = "check the mask (P ones in front) and the positions (P..P+T-1)"
        _compare_rows(label, model, o.sub("out"), prefixes, tenant_ids, batch, _FORWARD, hint)
        again = o.sub("again")
        error = _maybe_error(again)
        if error is not None:
            error.raise_it()
        what = "a second call with the same prefixes"
        _compare_rows(label, model, again.sub("out"), prefixes, tenant_ids, batch, what,
                      "fresh cache?")  # fmt: skip
        _unchanged(label, o, prefixes, "mixed_prefix_forward")
        _judge_different(label, model, o.sub("different"))
        _judge_unknown(label, o.sub("unknown"), "mixed_prefix_forward")
        _judge_gradient(label, model, o.sub("gradient"), prefixes, batch)
        _judge_bf16(label, o.sub("bf16"), prefixes, tenant_ids, batch)


def check_mixed_prefix_forward(mixed_prefix_forward: Callable) -> None:
    """mixed_prefix_forward: one forward pass over a mixed-tenant batch; at every layer row b
    gets its own tenant's prefix keys/values, the mask is extended, and every row equals that
    tenant's single-tenant prefix_forward (1e-5), loss included; the loss's gradients reach each
    tenant's prefix keys and values as the reference's do; a bfloat16 model works; prefixes of
    different lengths are rejected clearly or padded into masked slots; an unknown tenant is
    refused."""
    run_check(observe_mixed_prefix_forward, judge_mixed_prefix_forward, mixed_prefix_forward)


# ---------------------------------------------------------------------------------------------
# mixed_generate
# ---------------------------------------------------------------------------------------------
_GENERATE_IDS = ("cafe", "acme", "bistro", "acme")
_N_NEW = 4


def _tokens(new: object) -> dict[str, Any]:
    return {"tokens": _small(new), "type": describe(new)}


def observe_mixed_generate(mixed_generate: Callable) -> dict:
    """Per tiny model: the tokens generated for a left-padded mixed batch (equal prefix
    lengths, then different ones), the prefix dict afterwards, and a row of an unknown tenant."""
    models = []
    for label, model in tiny_models():
        prefixes = _tenants(model, EQUAL, 12)
        batch = Batch(batch=4, length=6, pad=2, seed=8)
        args = (list(_GENERATE_IDS), batch.input_ids, batch.attention_mask, _N_NEW)
        what = f"mixed_generate(model, prefixes, tenant_ids, input_ids, mask, {_N_NEW})"
        new = student_call(what, mixed_generate, model, prefixes, *args)
        o: dict[str, Any] = {"label": label, "new": _tokens(new)}
        o["prefixes_after"] = _stored(prefixes)
        mixed = _tenants(model, MIXED, 13)
        new, error = _attempt("mixed_generate", mixed_generate, model, mixed, *args)
        o["different"] = {
            "error": error,
            "new": None if error else _tokens(new),
            "prefixes_after": _stored(mixed),
        }
        o["unknown"] = _raised(
            mixed_generate, model, _tenants(model, EQUAL, 12), ["acme", "nobody", "cafe", "acme"],
            batch.input_ids, batch.attention_mask, 2,
        )  # fmt: skip
        models.append(o)
    return {"models": models}


def _greedy_row(model, values: torch.Tensor, prompt: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether ``new (N,)`` are the greedy choices (ties within 1e-4) of the reference forward
    with ``values`` over ``prompt + new``, up to and including the first eos."""
    full = torch.cat([prompt, new])[None]
    logits = _alone(model, values, full, torch.ones_like(full)).logits[0, len(prompt) - 1 : -1]
    eos = model.config.eos_token_id
    for token, step in zip(new.tolist(), logits, strict=True):
        if step.max() - step[token] > 1e-4:
            return False
        if token == eos:
            break
    return True


def _rows_agree(model, prefixes, tenant_ids, batch: Batch, new: torch.Tensor) -> list[int]:
    """The rows whose new tokens are NOT their tenant's greedy choices."""
    wrong = []
    for row, tenant in enumerate(tenant_ids):
        prompt = batch.input_ids[row, batch.attention_mask[row].bool()]
        if not _greedy_row(model, prefixes[tenant], prompt, new[row]):
            wrong.append(row)
    return wrong


def _generated(label: str, model, o: Observed, batch: Batch, what: str) -> torch.Tensor:
    """The recorded new tokens, checked: ``(B, N)`` ids of the vocabulary, only new ones,
    ``N = max_new_tokens`` unless every row has ended with eos."""
    new = o.maybe_tensor("tokens")
    b, t = batch.shape
    if new is None or new.dim() != 2 or new.shape[0] != b or new.is_floating_point():
        raise AssertionError(
            f"{label}: {what} returned {o.str('type')}, expected the new token ids ({b}, <= "
            f"{_N_NEW})"
        )
    if new.shape[1] > t and torch.equal(new[:, :t], batch.input_ids):
        raise AssertionError(
            f"{label}: {what} returned {new.shape[1]} tokens per row, starting with the {t} "
            "prompt tokens: return only the new ones (out[:, input_ids.shape[1]:])"
        )
    if not 0 < new.shape[1] <= _N_NEW:
        raise AssertionError(
            f"{label}: {what} returned {new.shape[1]} tokens per row, expected 1..{_N_NEW}"
        )
    vocab = model.config.vocab_size
    if bool(((new < 0) | (new >= vocab)).any()):
        raise AssertionError(f"{label}: {what} returned ids outside the vocabulary 0..{vocab - 1}")
    eos = model.config.eos_token_id
    if new.shape[1] < _N_NEW and not bool((new == eos).any(dim=1).all()):
        raise AssertionError(
            f"{label}: {what} returned {new.shape[1]} tokens per row although not every row "
            f"ended with eos: expected max_new_tokens = {_N_NEW} (pass max_new_tokens, not "
            "max_length, and return every new token)"
        )
    return new.long()


def _why_wrong(model, prefixes, tenant_ids, batch: Batch, new: torch.Tensor) -> str:
    with torch.no_grad():
        plain = model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            max_new_tokens=new.shape[1], do_sample=False, pad_token_id=model.config.eos_token_id,
        )[:, batch.shape[1] :]  # fmt: skip
    if torch.equal(plain, new):
        return (
            "they are what the model generates WITHOUT any prefix: pass the gathered prefix "
            "cache to generate (course.cache_keyword(model))"
        )
    first = {t: prefixes[tenant_ids[0]] for t in prefixes}
    if not _rows_agree(model, first, tenant_ids, batch, new):
        return (
            f"every row was generated with the prefix of tenant {tenant_ids[0]!r}: gather "
            "prefixes[tenant_ids[row]] row by row"
        )
    return (
        "is the mask extended by the prefix slots in front, (B, P+T)? generate derives "
        "positions from it"
    )


def judge_mixed_generate(obs: Observed) -> None:
    for label, model, o in _models(obs):
        prefixes = _tenants(model, EQUAL, 12)
        tenant_ids = list(_GENERATE_IDS)
        batch = Batch(batch=4, length=6, pad=2, seed=8)
        what = f"mixed_generate(model, prefixes, tenant_ids, input_ids, mask, {_N_NEW})"
        new = _generated(label, model, o.sub("new"), batch, what)
        wrong = _rows_agree(model, prefixes, tenant_ids, batch, new)
        if wrong:
            row = wrong[0]
            raise AssertionError(
                f"{label}: row {row} (tenant {tenant_ids[row]!r}) generated {new[row].tolist()}, "
                "which are not the greedy choices of its own tenant's prefix alone (rows "
                f"{wrong} disagree): {_why_wrong(model, prefixes, tenant_ids, batch, new)}"
            )
        _unchanged(label, o, prefixes, "mixed_generate")

        mixed = _tenants(model, MIXED, 13)
        lengths = [mixed[t].shape[3] for t in tenant_ids]
        what = f"mixed_generate with prefix lengths {lengths}"
        different = o.sub("different")
        error = _maybe_error(different)
        if error is not None:
            if not _rejected_clearly(error):
                error.raise_it()
        else:
            new = _generated(label, model, different.sub("new"), batch, what)
            wrong = _rows_agree(model, mixed, tenant_ids, batch, new)
            if wrong:
                raise AssertionError(
                    f"{label}: {what}: rows {wrong} are not their tenant's greedy choices: pad "
                    "shorter prefixes into MASKED slots (generate then places each row's "
                    "tokens right after its own prefix), or reject such a batch with a "
                    "ValueError"
                )
            _unchanged(label, different, mixed, "mixed_generate")
        _judge_unknown(label, o.sub("unknown"), "mixed_generate")


def check_mixed_generate(mixed_generate: Callable) -> None:
    """mixed_generate: greedy generation for a mixed-tenant, left-padded batch returns only the
    new tokens, max_new_tokens of them, and each row's tokens are the greedy choices of its own
    tenant's prefix alone; prefixes of different lengths are rejected clearly or handled
    row-exactly; the stored prefixes are left as they were; an unknown tenant is refused."""
    run_check(observe_mixed_generate, judge_mixed_generate, mixed_generate)
