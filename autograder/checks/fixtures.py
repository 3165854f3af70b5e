"""The reference implementation for the judges, or its stored results where it is not installed.

Judges compare what a student's code did with what :mod:`autograder.reference` does on the same
inputs. Every judge reaches the reference through :func:`reference` and nothing else:

* **Instructor install and grading** (``autograder.reference`` importable): :func:`reference`
  returns the real module, so grading behaves exactly as it always did.
* **Student package** (shipped without ``autograder/reference``, ``bugzoo``, ``pipeline``):
  :func:`reference` returns a :class:`Replay`. Each attribute a judge uses
  (``prefix_forward``, ``SoftPrompt``, ``freeze_backbone``, ...) answers a call with what the
  reference returned for the same inputs when the visible checks were recorded
  (``python -m autograder.checks.fixtures --write``), read from ``fixture_data/``. A package
  with ``autograder/reference/__init__.py`` but only some concept modules (``python -m
  autograder package --unlock``) gets the real functions of those and the replay for the rest.

A recorded call is found by its inputs: tensors by dtype, shape and values (an exact hash first,
then within :data:`ATOL` + :data:`RTOL` times the stored tensor's scale), models by a fingerprint
of their config and every parameter and buffer, other modules (the judges' stand-in encoders,
an embedding table) by their tensors and plain attributes. What a replayed call gives back:

* the recorded outputs (tensors, model outputs, numbers, shapes), fresh copies each time;
* where the judge differentiates an output, its recorded derivative with respect to the call's
  trainable inputs, attached as ``recorded + derivative · (input - input.detach())``: the
  value is the recorded one, and the gradient a judge takes is the reference's (a loss's
  gradient; the sparse Jacobian of ``prepend_prompt``'s embeddings);
* a module the reference built (a ``SoftPrompt``, a ``PrefixEncoder``) as a
  :class:`RecordedModule` holding the tensors and plain attributes it had — it cannot compute
  anything;
* the side effects judges rely on: ``requires_grad`` flags the call changed on its arguments
  (``freeze_backbone``), and what a :func:`~autograder.checks.recording.record` block active
  around the call saw.

Nothing here computes what a graded function computes: every answer is a lookup. A call whose
inputs were never recorded — the student's code led the check somewhere a correct
implementation does not go (other prefix values, other generated tokens, another random
start) — fails the check with a :class:`~autograder.checks.harness.CheckFailure` that says so;
only the grader, which has the reference, can judge it. The recording covers the reference's
own objects, every must-pass variant and every known-buggy twin of the bug zoo, on every visible
check at variant 0 (the visible checks; grading draws secret variants and always has the
reference).

``python -m autograder.checks.fixtures --write`` records; ``--check`` records again and exits 1
naming what is stale. The data also stores a hash of what determines it (the sources of the
reference, the bug zoo, the checks and ``course/compat.py``, and the torch, transformers and
peft versions): :func:`stale_reasons` compares it with the installed ones.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autograder.checks.harness import CheckFailure, current_variant

__all__ = [
    "ATOL",
    "RTOL",
    "DATA_DIR",
    "REGENERATE",
    "VISIBLE_CHECKS",
    "RecordedModule",
    "Replay",
    "is_replay",
    "reference",
    "source_fingerprint",
    "stale_reasons",
]

DATA_DIR = Path(__file__).with_name("fixture_data")
"""Where the recorded calls live (shipped as package data)."""
_TENSORS = DATA_DIR / "reference_calls.safetensors"
_INDEX = DATA_DIR / "reference_calls.json"
FORMAT = 1
ATOL = 1e-6
"""Largest absolute difference of a floating-point input that still finds a recorded call, plus
:data:`RTOL` times the stored tensor's largest magnitude."""
RTOL = 2e-6
"""A few float32 ulps of the stored tensor's scale: a correct implementation on another CPU
(other SIMD kernels, another summation order) computes the same inputs a few ulps apart, e.g.
1.2e-6 at magnitude 3.3 for a prefix built on an Intel Xeon against one recorded on an AMD EPYC;
wrong implementations are orders of magnitude further off."""
REGENERATE = "python -m autograder.checks.fixtures --write"

VISIBLE_CHECKS: tuple[str, ...] = (
    "check_count_parameters_by_group",
    "check_freeze_except",
    "check_layer_hidden_states",
    "check_predict_cache_shapes",
    "check_freeze_backbone",
    "check_soft_prompt",
    "check_prepend_prompt",
    "check_prompt_equivalence",
    "check_peft_prompt_equivalence",
    "check_prompt_training",
    "check_save_load_prompt",
    "check_prefix_encoder",
    "check_build_prefix_cache",
    "check_prefix_forward",
    "check_prefix_training",
    "check_generate_with_prefix",
    "check_peft_equivalence",
    "check_bf16",
    "check_deep_prompt",
    "check_soft_prompt_to_prefix",
    "check_deep_prompt_to_prefix",
    "check_prompt_function",
    "check_label_scores",
    "check_method_parameters",
    "check_method_functions",
    "check_run_sweep",
    "check_save_load_prefix",
    "check_mixed_prefix_forward",
    "check_mixed_generate",
    "check_checkpointed_prefix_forward",
)
"""The checks visible cells of notebooks 00-05 call (``selfcheck.run(checks.<module>.<name>``)."""

_JACOBIAN = frozenset({"prepend_prompt", "label_scores"})
"""Calls whose non-scalar outputs a judge differentiates through (``model(**expected)``): their
full Jacobian with respect to the trainable inputs is recorded, sparse. Every other call has the
derivatives of its scalar outputs (a loss) recorded."""

_SOURCES = (
    "autograder/reference/*.py",
    "autograder/bugzoo/*.py",
    "autograder/checks/__init__.py",
    "autograder/checks/compiled.py",
    "autograder/checks/debugging.py",
    "autograder/checks/deep.py",
    "autograder/checks/experiments.py",
    "autograder/checks/fixtures.py",
    "autograder/checks/frozen.py",
    "autograder/checks/harness.py",
    "autograder/checks/models.py",
    "autograder/checks/prefix.py",
    "autograder/checks/prompt.py",
    "autograder/checks/prompting.py",
    "autograder/checks/protocol.py",
    "autograder/checks/recording.py",
    "autograder/checks/serving.py",
    "autograder/checks/tour.py",
    "course/compat.py",
)
"""The files whose contents determine the recorded calls (with the library versions)."""
_LIBRARIES = ("torch", "transformers", "peft")


# ---------------------------------------------------------------------------------------------
# the accessor
# ---------------------------------------------------------------------------------------------
_RECORDERS: list[_Recorder] = []


def reference() -> Any:
    """:mod:`autograder.reference` when it is installed, else the :class:`Replay` of its
    recorded results. A package holding only some of its concept modules (the notebooks an
    instructor has unlocked) gets the real functions where their module is present and the
    replay for the others. While recording: the recorder wrapped around the real module."""
    if _RECORDERS:
        return _RECORDERS[-1]
    try:
        real = importlib.import_module("autograder.reference")
    except ModuleNotFoundError as err:
        if err.name not in ("autograder.reference", "autograder"):
            raise
        return _REPLAY
    where = getattr(real, "_WHERE", None)
    if where and all(_present(f"autograder.reference.{m}") for m in set(where.values())):
        return real
    return _Partial(real)


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class _Partial:
    """A reference package without some of its concept modules: the real functions where
    present, the :class:`Replay` for the others."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(self._real, name)
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("autograder.reference"):
                raise
        return getattr(_REPLAY, name)


def is_replay() -> bool:
    """Whether :func:`reference` answers from stored results (a student package)."""
    return reference() is _REPLAY


# ---------------------------------------------------------------------------------------------
# fingerprints and the canonical description of a call's inputs
# ---------------------------------------------------------------------------------------------
def _bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _digest(t: torch.Tensor) -> str:
    """Dtype, shape and bytes of ``t``, hashed."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(_bytes(t))
    return h.hexdigest()[:32]


def _config_fingerprint(config: Any) -> str:
    data = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    data.pop("transformers_version", None)
    data["attn_implementation"] = getattr(config, "_attn_implementation", None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _model_fingerprint(model: nn.Module) -> str:
    """Class, config, mode and every parameter and buffer (names, dtypes, shapes, values)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    h.update(_config_fingerprint(model.config).encode())
    checkpointing = any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
    )
    h.update(f"training={model.training};checkpointing={checkpointing};".encode())
    for kind, named in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in named:
            h.update(f"{kind}:{name}:{_digest(t)};".encode())
    return h.hexdigest()[:32]


def _is_model(value: object) -> bool:
    from transformers import PreTrainedModel

    return isinstance(value, PreTrainedModel)


def _is_config(value: object) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


class _Unsupported(TypeError):
    """An input or output the stored format cannot describe."""


_PLAIN = (bool, int, str, type(None))


def _plain_attributes(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """The public instance attributes of ``module`` (not its parameters, buffers, submodules)."""
    for name, value in sorted(vars(module).items()):
        if not name.startswith("_") and name != "training":
            yield name, value


class _Inputs:
    """A call's inputs, described: ``node`` (JSON, no tensor values), the tensors in walk order,
    the trainable tensors (``leaves``: what a derivative is taken with respect to; a model's own
    parameters are never leaves), and the objects met (``(path, object)``) for identity and side
    effects."""

    def __init__(self, args: tuple, kwargs: dict[str, Any]) -> None:
        self.tensors: list[torch.Tensor] = []
        self.leaves: list[torch.Tensor] = []
        self.objects: list[tuple[list, Any]] = []
        self.models: list[str] = []
        self._leaf_ids: set[int] = set()
        self.node = [
            "call",
            torch.is_grad_enabled(),
            _recording_active(),
            [self._node(a, [i]) for i, a in enumerate(args)],
            [[k, self._node(v, [k])] for k, v in sorted(kwargs.items())],
        ]
        self.digests = [_digest(t) for t in self.tensors]
        text = json.dumps(self.node, separators=(",", ":"))
        self.shape_key = hashlib.sha256(text.encode()).hexdigest()[:32]
        self.key = hashlib.sha256((text + "|" + ",".join(self.digests)).encode()).hexdigest()[:32]

    def _tensor(self, t: torch.Tensor) -> list:
        self.tensors.append(t)
        if t.requires_grad and id(t) not in self._leaf_ids:
            self._leaf_ids.add(id(t))
            self.leaves.append(t)
        return ["T", str(t.dtype), list(t.shape), bool(t.requires_grad)]

    def _node(self, value: Any, path: list) -> Any:
        if isinstance(value, torch.Tensor):
            self.objects.append((path, value))
            return self._tensor(value)
        if isinstance(value, nn.Module) and _is_model(value):
            self.objects.append((path, value))
            fingerprint = _model_fingerprint(value)
            self.models.append(fingerprint)
            return ["M", fingerprint]
        if isinstance(value, nn.Module):
            self.objects.append((path, value))
            parts: list = []
            for name, p in value.named_parameters():
                parts.append(["p", name, self._tensor(p)])
            for name, b in value.named_buffers():
                parts.append(["b", name, self._tensor(b)])
            for name, attr in _plain_attributes(value):
                if isinstance(attr, torch.Tensor):
                    parts.append(["t", name, self._tensor(attr)])
                elif isinstance(attr, (*_PLAIN, float)):
                    parts.append(["a", name, self._node(attr, [*path, name])])
                else:
                    parts.append(["o", name, type(attr).__name__])
            return ["N", parts]
        if _is_config(value):
            return ["C", _config_fingerprint(value)]
        if isinstance(value, _PLAIN):
            return ["V", value]
        if isinstance(value, float):
            return ["F", repr(value)]
        if isinstance(value, torch.dtype):
            return ["Y", str(value)]
        if isinstance(value, torch.device):
            return ["Z", str(value)]
        if isinstance(value, (list, tuple)):
            kind = "L" if isinstance(value, list) else "U"
            return [kind, [self._node(v, [*path, i]) for i, v in enumerate(value)]]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return ["D", [[k, self._node(v, [*path, k])] for k, v in value.items()]]
        raise _Unsupported(f"an argument of type {type(value).__name__}")

    def flags(self) -> dict[int, list[tuple[str, bool]]]:
        """``requires_grad`` of every parameter of every module met, by object index."""
        return {
            i: [(n, p.requires_grad) for n, p in obj.named_parameters()]
            for i, (_, obj) in enumerate(self.objects)
            if isinstance(obj, nn.Module)
        }


def _resolve(path: list, args: tuple, kwargs: dict[str, Any]) -> Any:
    head, *rest = path
    value = args[head] if isinstance(head, int) else kwargs[head]
    for step in rest:
        value = value[step]
    return value


def _recording_active() -> bool:
    from autograder.checks import recording

    return bool(recording._ACTIVE)


# ---------------------------------------------------------------------------------------------
# the stored data
# ---------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    """One recorded call."""

    fn: str
    key: str
    shape_key: str
    inputs: list[str]
    """Stored names of the input tensors, in walk order (for matching within :data:`ATOL`)."""
    out: Any
    lin: list = field(default_factory=list)
    effects: list = field(default_factory=list)
    recording: dict | None = None
    checks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "fn": self.fn,
            "key": self.key,
            "shape_key": self.shape_key,
            "inputs": self.inputs,
            "out": self.out,
            "lin": self.lin,
            "effects": self.effects,
            "recording": self.recording,
            "checks": sorted(self.checks),
        }

    def result(self) -> str:
        """Everything the replay gives back, as text (to compare two recordings)."""
        data = self.to_json()
        data.pop("checks")
        return json.dumps(data, sort_keys=True)


class _Store:
    """Recorded calls by function, exact key and shape key, with their tensors."""

    def __init__(self, entries: list[_Entry], tensors: dict[str, torch.Tensor], meta: dict):
        self.entries = entries
        self.tensors = tensors
        self.meta = meta
        self.by_key = {(e.fn, e.key): e for e in entries}
        self.by_shape: dict[tuple[str, str], list[_Entry]] = {}
        for e in entries:
            self.by_shape.setdefault((e.fn, e.shape_key), []).append(e)
        self.functions = {e.fn for e in entries}
        self.models = set(meta.get("models", []))

    @classmethod
    def load(cls) -> _Store:
        from safetensors.torch import load_file

        index = json.loads(_INDEX.read_text())
        if index.get("format") != FORMAT:
            raise CheckFailure(
                f"the stored reference results in {_INDEX} have format {index.get('format')}, "
                f"this course expects {FORMAT}: reinstall the course package"
            )
        tensors = load_file(str(_TENSORS))
        entries = [_Entry(**e) for e in index["entries"]]
        return cls(entries, tensors, index)

    def find(self, fn: str, inputs: _Inputs) -> tuple[_Entry | None, str]:
        """The recorded call with these inputs (exactly, else within :data:`ATOL`), or
        ``(None, what differs)``."""
        entry = self.by_key.get((fn, inputs.key))
        if entry is not None:
            return entry, ""
        candidates = self.by_shape.get((fn, inputs.shape_key), [])
        if not candidates:
            return None, "no stored call had inputs of these shapes"
        best, best_ratio, best_diff = None, float("inf"), float("inf")
        for candidate in candidates:
            ratio = diff = 0.0  # the largest difference, in tolerances (<= 1 matches) and as is
            for live, name in zip(inputs.tensors, candidate.inputs, strict=True):
                stored = self.tensors[name]
                if live.is_floating_point():
                    d = (live.detach().double() - stored.double()).abs().max().item()
                    d = d if d == d else float("inf")
                    scale = stored.double().abs().max().item() if stored.numel() else 0.0
                    ratio = max(ratio, d / (ATOL + RTOL * scale))
                    diff = max(diff, d)
                elif not torch.equal(live.detach().cpu(), stored):
                    ratio = diff = float("inf")
                if ratio > 1.0:
                    break
            if ratio < best_ratio:
                best, best_ratio, best_diff = candidate, ratio, diff
        if best is not None and best_ratio <= 1.0:
            return best, ""
        if best_ratio == float("inf"):
            return None, "no stored call had these token ids, masks or labels"
        return None, f"the nearest stored call's values differ by up to {best_diff:.3g}"


@functools.cache
def _store() -> _Store:
    if not _INDEX.is_file() or not _TENSORS.is_file():
        raise CheckFailure(
            "this copy of the course has neither the reference implementation nor its stored "
            f"results ({_INDEX.name}): reinstall the course package"
        )
    return _Store.load()


# ---------------------------------------------------------------------------------------------
# outputs: encoding (recording) and rebuilding (replay)
# ---------------------------------------------------------------------------------------------
class RecordedModule(nn.Module):
    """What a reference constructor (``SoftPrompt(...)``, ``PrefixEncoder(...)``) returned, as
    recorded: its parameters, buffers and plain attributes, nothing else. A judge may read and
    overwrite its tensors and hand it back to the reference (a replayed call); it computes
    nothing itself."""

    def __init__(self, recorded_class: str) -> None:
        super().__init__()
        self._recorded_class = recorded_class

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise CheckFailure(
            f"the stored stand-in for the reference's {self._recorded_class} holds recorded "
            "values only and cannot be run: this check needs the reference implementation"
        )

    def extra_repr(self) -> str:
        return f"recorded {self._recorded_class}"


def _module_class(value: object) -> type | None:
    """The ModelOutput / Cache class ``value`` is an instance of (None for anything else)."""
    from transformers import Cache
    from transformers.utils import ModelOutput

    for cls in (ModelOutput, Cache):
        if isinstance(value, cls):
            return cls
    return None


_RENAMED_FIELDS = {"cache": "past_key_values", "past_key_values": "cache"}
"""Output fields transformers renamed within the supported range (5.24 calls the key/value cache
``cache``, 5.17 ``past_key_values``): a recording made on one rebuilds on the other."""


def _fields_for(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` under the field names of the installed ``cls``; a field it does not have (and
    cannot be renamed to) is left out when empty, else kept so that the call fails loudly."""
    import dataclasses

    if not dataclasses.is_dataclass(cls):
        return values
    names = {f.name for f in dataclasses.fields(cls)}
    fitted = {}
    for key, value in values.items():
        if key not in names and _RENAMED_FIELDS.get(key) in names:
            key = _RENAMED_FIELDS[key]
        elif key not in names and value is None:
            continue
        fitted[key] = value
    return fitted


class _Encoder:
    """Turns a call's result into JSON plus stored tensors; remembers the output tensors, in
    order, for the derivatives."""

    def __init__(self, inputs: _Inputs, put: Callable[[torch.Tensor], str]) -> None:
        self.ident = {id(obj): path for path, obj in inputs.objects}
        self.put = put
        self.tensors: list[torch.Tensor] = []

    def node(self, value: Any) -> Any:
        if not isinstance(value, (*_PLAIN, float)) and id(value) in self.ident:
            return ["A", self.ident[id(value)]]
        if isinstance(value, torch.Tensor):
            self.tensors.append(value)
            return ["T", self.put(value), bool(value.requires_grad)]
        if isinstance(value, _PLAIN):
            return ["V", value]
        if isinstance(value, float):
            return ["F", repr(value)]
        if isinstance(value, torch.dtype):
            return ["Y", str(value)]
        kind = _module_class(value)
        if kind is not None and kind.__name__ == "Cache":
            return ["X", type(value).__name__]
        if kind is not None:
            cls = type(value)
            if not cls.__module__.startswith("transformers."):
                raise _Unsupported(f"a model output of class {cls.__module__}.{cls.__qualname__}")
            fields = [[k, self.node(v)] for k, v in value.items()]
            return ["O", cls.__module__, cls.__qualname__, fields]
        if isinstance(value, nn.Module) and not _is_model(value):
            return self._module(value)
        if isinstance(value, (list, tuple)):
            return ["L" if isinstance(value, list) else "U", [self.node(v) for v in value]]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return ["D", [[k, self.node(v)] for k, v in value.items()]]
        raise _Unsupported(f"a result of type {type(value).__name__}")

    def _module(self, module: nn.Module) -> list:
        if any(True for _ in module.children()):
            raise _Unsupported(f"a {type(module).__name__} with submodules")
        params = [[n, self.put(p), bool(p.requires_grad)] for n, p in module.named_parameters()]
        buffers = [[n, self.put(b)] for n, b in module.named_buffers()]
        attrs = []
        for name, attr in _plain_attributes(module):
            if isinstance(attr, torch.Tensor):
                attrs.append([name, ["T", self.put(attr), False]])
            elif isinstance(attr, (*_PLAIN, float)):
                attrs.append([name, self.node(attr)])
            else:
                raise _Unsupported(f"{type(module).__name__}.{name} of type {type(attr).__name__}")
        return ["S", type(module).__name__, bool(module.training), params, buffers, attrs]


class _Builder:
    """Rebuilds a recorded result for one replayed call (fresh tensors every time)."""

    def __init__(
        self, store: _Store, args: tuple, kwargs: dict[str, Any], entry: _Entry, inputs: _Inputs
    ) -> None:
        self.store, self.args, self.kwargs = store, args, kwargs
        self.leaves = inputs.leaves
        grad = torch.is_grad_enabled() and bool(self.leaves)
        self.lin = {lin[0]: lin for lin in entry.lin} if grad else {}
        self.count = 0

    def tensor(self, name: str) -> torch.Tensor:
        return self.store.tensors[name].clone()

    def node(self, node: list) -> Any:
        kind = node[0]
        if kind == "A":
            return _resolve(node[1], self.args, self.kwargs)
        if kind == "T":
            t, index = self.tensor(node[1]), self.count
            self.count += 1
            lin = self.lin.get(index)
            return t if lin is None else _linearised(t, self.leaves, lin, self.store)
        if kind == "V":
            return node[1]
        if kind == "F":
            return float(node[1])
        if kind == "Y":
            return getattr(torch, node[1].removeprefix("torch."))
        if kind == "X":
            return None
        if kind == "O":
            module, qualname, fields = node[1], node[2], node[3]
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            values = {k: self.node(v) for k, v in fields}  # every node, in order (count)
            return cls(**_fields_for(cls, values))
        if kind == "S":
            return self._module(node)
        if kind in ("L", "U"):
            items = [self.node(v) for v in node[1]]
            return items if kind == "L" else tuple(items)
        if kind == "D":
            return {k: self.node(v) for k, v in node[1]}
        raise CheckFailure(f"the stored reference results are damaged (a {kind!r} node)")

    def _module(self, node: list) -> RecordedModule:
        _, cls, training, params, buffers, attrs = node
        module = RecordedModule(cls)
        for name, ref, grad in params:
            module.register_parameter(name, nn.Parameter(self.tensor(ref), requires_grad=grad))
        for name, ref in buffers:
            module.register_buffer(name, self.tensor(ref))
        for name, value in attrs:
            setattr(module, name, self.tensor(value[1]) if value[0] == "T" else self.node(value))
        return module.train(training)


def _linearised(base: torch.Tensor, leaves: list[torch.Tensor], lin: list, store: _Store):
    """``base`` plus the recorded derivative times ``leaves - leaves.detach()``: the recorded
    value, with the reference's gradient flowing back to ``leaves`` (computed in the leaves'
    dtype, so that a leaf receives the recorded gradient exactly)."""
    if lin[1] == "grad":
        terms = [
            (store.tensors[ref] * (leaf - leaf.detach())).sum().float()
            for leaf, ref in zip(leaves, lin[2], strict=True)
            if ref is not None
        ]
        if not terms:
            return base
        return base + torch.stack(terms).sum().to(base.dtype).reshape(base.shape)
    rows, cols, vals = (store.tensors[r] for r in lin[2])
    delta = torch.cat([(leaf - leaf.detach()).reshape(-1).to(vals.dtype) for leaf in leaves])
    flat = torch.zeros(base.numel(), dtype=vals.dtype).index_add(
        0, rows.long(), vals * delta[cols.long()]
    )
    return base + flat.to(base.dtype).view(base.shape)


def _replay_recording(recorded: dict, store: _Store) -> None:
    """Append what a :func:`~autograder.checks.recording.record` block saw during the recorded
    call to the recording active now."""
    from autograder.checks import recording

    if not recording._ACTIVE:
        return
    rec = recording._ACTIVE[-1]

    def t(name: str | None) -> torch.Tensor | None:
        return None if name is None else store.tensors[name].clone()

    for layer, query_len, key, value, mask in recorded["calls"]:
        rec.calls.append(recording.AttentionCall(layer, query_len, t(key), t(value), t(mask)))
    rec.positions.extend(t(name) for name in recorded["positions"])
    for inputs in recorded["model_inputs"]:
        rec.model_inputs.append({k: t(v) if isinstance(v, str) else None for k, v in inputs})
    for attr in ("layer_inputs", "layer_outputs"):
        for index, names in recorded[attr]:
            getattr(rec, attr).setdefault(index, []).extend(t(n) for n in names)


# ---------------------------------------------------------------------------------------------
# the replay
# ---------------------------------------------------------------------------------------------
def _checking() -> str:
    """``"check_x: "`` for the check whose judge is running (from the call stack), else ``""``."""
    for frame in inspect.stack(0)[2:]:
        module = frame.frame.f_globals.get("__name__", "")
        if module.startswith("autograder.checks.") and frame.function.startswith("judge_"):
            return "check_" + frame.function.removeprefix("judge_") + ": "
    return ""


def _versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = str(importlib.import_module(name).__version__)
        except ImportError:
            versions[name] = "not installed"
    return versions


def _unknown_call(fn: str, inputs: _Inputs, store: _Store, detail: str) -> CheckFailure:
    where = _checking()
    if any(m not in store.models for m in inputs.models):
        recorded, installed = store.meta.get("versions", {}), _versions()
        if recorded != installed:
            shown = ", ".join(f"{k} {installed.get(k)}" for k in sorted(installed))
            want = ", ".join(f"{k} {recorded.get(k)}" for k in sorted(recorded))
            fix = (
                f"they were recorded with {want}, and this environment has {shown}: install "
                "the versions the course pins (reinstall the course package), or let the grader "
                "judge it"
            )
        else:
            fix = (
                "although the library versions are the recorded ones: something in this session "
                "changes how models are built (a patched transformers class, torch's default "
                "dtype?) — restart the kernel and run the check again"
            )
        return CheckFailure(
            f"{where}the tiny test models built here differ from the ones the stored reference "
            f"results were recorded with, so this copy of the course cannot judge this check: "
            f"{fix}"
        )
    return CheckFailure(
        f"{where}your code gave this check different inputs than a correct implementation "
        f"does at the step that compares with the reference's {fn}(...) ({detail}). This copy "
        "of the course holds the reference's results only for the inputs correct (and known "
        "incorrect) implementations give there, so it cannot compare yours: only the grader, "
        "which has the reference, can. Look for what differs before that step — values, "
        "shapes, a random initialisation, the tokens your code generated — and compare with "
        "what the notebook asks."
    )


class Replay:
    """:mod:`autograder.reference` as the judges use it, answered from the recorded calls."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)
        store = _store()
        if name not in store.functions:
            raise CheckFailure(
                f"{_checking()}this check needs the reference's {name}, which this copy of "
                "the course neither includes nor has stored results of: only the grader can "
                "judge it"
            )

        def replayed(*args: Any, **kwargs: Any) -> Any:
            return self._call(store, name, args, kwargs)

        replayed.__name__ = replayed.__qualname__ = name
        return replayed

    def __repr__(self) -> str:
        return "<stored results of autograder.reference>"

    @staticmethod
    def _call(store: _Store, fn: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        if current_variant() != 0:
            raise CheckFailure(
                f"{_checking()}the stored reference results cover only the visible inputs "
                f"(variant 0), not variant {current_variant()}: only the grader can judge it"
            )
        try:
            inputs = _Inputs(args, kwargs)
        except _Unsupported as err:
            raise CheckFailure(
                f"{_checking()}the reference's {fn} was given {err}, which the stored results "
                "cannot describe: only the grader can judge this"
            ) from None
        entry, detail = store.find(fn, inputs)
        if entry is None:
            raise _unknown_call(fn, inputs, store, detail)
        out = entry.out
        if out[0] == "E":
            kind = getattr(builtins, out[1], None)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                kind = RuntimeError
            raise kind(out[2])
        result = _Builder(store, args, kwargs, entry, inputs).node(out)
        for path, flags in entry.effects:
            target = _resolve(path, args, kwargs)
            params = dict(target.named_parameters())
            for name, flag in flags:
                params[name].requires_grad_(flag)
        if entry.recording is not None:
            _replay_recording(entry.recording, store)
        return result


_REPLAY = Replay()


# ---------------------------------------------------------------------------------------------
# recording (instructor side: needs the reference and the bug zoo)
# ---------------------------------------------------------------------------------------------
class RecordingError(RuntimeError):
    """The reference did something a replay could not reproduce."""


class _Recorder:
    """The real :mod:`autograder.reference`, with every call the judges make recorded."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.entries: dict[tuple[str, str], _Entry] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.models: set[str] = set()
        self.errors: list[str] = []
        self.check = "?"

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._real, name)
        if not callable(target):
            raise RecordingError(f"a judge read the reference's {name}, which is not a call")

        def recorded(*args: Any, **kwargs: Any) -> Any:
            try:
                return self._record(name, target, args, kwargs)
            except (RecordingError, _Unsupported) as err:  # a judge may turn it into a verdict
                self.errors.append(f"{self.check}: {name}: {err}")
                raise

        return recorded

    def put(self, t: torch.Tensor) -> str:
        t = t.detach().to("cpu").contiguous().clone()
        name = _digest(t)
        self.tensors.setdefault(name, t)
        return name

    def _record(self, fn: str, target: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
        inputs = _Inputs(args, kwargs)
        flags = inputs.flags()
        versions = [t._version for t in inputs.tensors]
        rec = _active_recording()
        marks = _marks(rec)
        try:
            result = target(*args, **kwargs)
        except Exception as err:
            self._add(fn, inputs, ["E", type(err).__name__, str(err)], [], [], None)
            raise
        if [t._version for t in inputs.tensors] != versions or [
            _model_fingerprint(o) for _, o in inputs.objects if _is_model(o)
        ] != inputs.models:
            raise RecordingError(f"the reference's {fn} changed the values of its inputs")
        encoder = _Encoder(inputs, self.put)
        out = encoder.node(result)
        lin = self._derivatives(fn, inputs, encoder.tensors)
        effects = []
        for i, before in flags.items():
            path, obj = inputs.objects[i]
            after = [(n, p.requires_grad) for n, p in obj.named_parameters()]
            changed = [[n, g] for (n, g), (_, g0) in zip(after, before, strict=True) if g != g0]
            if changed:
                effects.append([path, changed])
        recording = None if rec is None else self._recording_since(rec, marks)
        self._add(fn, inputs, out, lin, effects, recording)
        return result

    def _add(self, fn, inputs: _Inputs, out, lin, effects, recording) -> None:
        entry = _Entry(
            fn=fn,
            key=inputs.key,
            shape_key=inputs.shape_key,
            inputs=[self.put(t) for t in inputs.tensors],
            out=out,
            lin=lin,
            effects=effects,
            recording=recording,
            checks=[self.check],
        )
        self.models.update(inputs.models)
        known = self.entries.get((fn, inputs.key))
        if known is None:
            self.entries[(fn, inputs.key)] = entry
            return
        if known.result() != entry.result():
            raise RecordingError(
                f"the reference's {fn} gave two different results for the same inputs "
                f"({known.checks} and {self.check})"
            )
        if self.check not in known.checks:
            known.checks.append(self.check)

    def _derivatives(self, fn: str, inputs: _Inputs, outputs: list[torch.Tensor]) -> list:
        """Per output tensor that requires grad: its gradient (a scalar) or its sparse
        Jacobian (:data:`_JACOBIAN` calls) with respect to the call's leaves."""
        leaves = inputs.leaves
        if not torch.is_grad_enabled() or not leaves:
            return []
        lin = []
        for i, t in enumerate(outputs):
            if not t.requires_grad:
                continue
            if t.numel() == 1:
                grads = torch.autograd.grad(t.sum(), leaves, retain_graph=True, allow_unused=True)
                lin.append([i, "grad", [None if g is None else self.put(g) for g in grads]])
            elif fn in _JACOBIAN:
                lin.append([i, "jacobian", self._jacobian(t, leaves)])
        return lin

    def _jacobian(self, t: torch.Tensor, leaves: list[torch.Tensor]) -> list[str]:
        flat = t.reshape(-1)
        n = flat.numel()
        eye = torch.eye(n, dtype=t.dtype)
        grads = torch.autograd.grad(
            flat, leaves, grad_outputs=eye, retain_graph=True, allow_unused=True,
            is_grads_batched=True,
        )  # fmt: skip
        blocks = [
            torch.zeros(n, leaf.numel(), dtype=t.dtype) if g is None else g.reshape(n, -1)
            for leaf, g in zip(leaves, grads, strict=True)
        ]
        jacobian = torch.cat(blocks, dim=1)
        rows, cols = jacobian.nonzero(as_tuple=True)
        vals = jacobian[rows, cols]
        return [self.put(rows.to(torch.int32)), self.put(cols.to(torch.int32)), self.put(vals)]

    def _recording_since(self, rec: Any, marks: dict) -> dict:
        def name(t: torch.Tensor | None) -> str | None:
            return None if t is None else self.put(t)

        calls = [
            [c.layer, c.query_len, name(c.key), name(c.value), name(c.mask)]
            for c in rec.calls[marks["calls"] :]
        ]
        model_inputs = []
        for kw in rec.model_inputs[marks["model_inputs"] :]:
            model_inputs.append(
                [[k, name(v) if isinstance(v, torch.Tensor) else None] for k, v in kw.items()]
            )
        out = {
            "calls": calls,
            "positions": [name(p) for p in rec.positions[marks["positions"] :]],
            "model_inputs": model_inputs,
        }
        for attr in ("layer_inputs", "layer_outputs"):
            seen = getattr(rec, attr)
            out[attr] = [
                [i, [name(t) for t in ts[marks[attr].get(i, 0) :]]]
                for i, ts in sorted(seen.items())
                if len(ts) > marks[attr].get(i, 0)
            ]
        return out

    def data(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(index, tensors)`` as written: entries sorted, only the tensors they use."""
        entries = sorted(self.entries.values(), key=lambda e: (e.fn, e.key))
        index = {
            "format": FORMAT,
            "sources": source_fingerprint(),
            "versions": _versions(),
            "regenerate": REGENERATE,
            "models": sorted(self.models),
            "entries": [e.to_json() for e in entries],
        }
        used = _tensor_names(index["entries"], self.tensors)
        tensors = {k: v for k, v in sorted(self.tensors.items()) if k in used}
        return index, tensors


def _tensor_names(data: Any, known: dict[str, torch.Tensor] | set[str]) -> set[str]:
    """The stored tensor names ``data`` (an entry's JSON) refers to."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, str):
            if node in known:
                found.add(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for item in node.values():
                walk(item)

    walk(data)
    return found


def _active_recording() -> Any:
    from autograder.checks import recording

    return recording._ACTIVE[-1] if recording._ACTIVE else None


def _marks(rec: Any) -> dict:
    if rec is None:
        return {}
    return {
        "calls": len(rec.calls),
        "positions": len(rec.positions),
        "model_inputs": len(rec.model_inputs),
        "layer_inputs": {i: len(ts) for i, ts in rec.layer_inputs.items()},
        "layer_outputs": {i: len(ts) for i, ts in rec.layer_outputs.items()},
    }


def _roots() -> tuple[Path, Path]:
    import autograder
    import course

    return Path(autograder.__file__).parent.parent, Path(course.__file__).parent.parent


def source_fingerprint() -> str:
    """A hash of the files that determine the recorded calls (:data:`_SOURCES`)."""
    autograder_root, course_root = _roots()
    h = hashlib.sha256()
    for pattern in _SOURCES:
        root = course_root if pattern.startswith("course/") else autograder_root
        for path in sorted(root.glob(pattern)):
            h.update(f"{path.relative_to(root).as_posix()}\n".encode())
            h.update(path.read_bytes().replace(b"\r\n", b"\n"))
    return h.hexdigest()


def recorded_versions() -> dict[str, str]:
    """The torch, transformers and peft versions the stored calls were recorded with."""
    return json.loads(_INDEX.read_text()).get("versions", {}) if _INDEX.is_file() else {}


def stale_reasons(versions: bool = True) -> list[str]:
    """Why the stored calls may not be what a recording now gives (empty when current): the
    sources or (with ``versions``) library versions differ from those they were recorded with.
    A replay needs the same tiny models, not the same versions: CI replays every visible check
    on the oldest transformers of the supported range too."""
    if not _INDEX.is_file() or not _TENSORS.is_file():
        return [f"{_INDEX.name} or {_TENSORS.name} is missing"]
    index = json.loads(_INDEX.read_text())
    reasons = []
    if index.get("format") != FORMAT:
        reasons.append(f"format {index.get('format')} != {FORMAT}")
    if index.get("sources") != source_fingerprint():
        reasons.append(
            "the reference, bug zoo, checks or course/compat.py changed since the recording"
        )
    recorded, installed = index.get("versions", {}), _versions()
    for name in _LIBRARIES if versions else ():
        if recorded.get(name) != installed[name]:
            reasons.append(f"{name} {installed[name]} is installed, {recorded.get(name)} recorded")
    from safetensors.torch import load_file

    tensors = load_file(str(_TENSORS))
    damaged = sorted(name for name, t in tensors.items() if _digest(t) != name)
    if damaged:
        reasons.append(f"{len(damaged)} stored tensors do not match their recorded contents")
    missing = {name for e in index.get("entries", []) for name in _referenced(e)} - set(tensors)
    if missing:
        reasons.append(f"{len(missing)} tensors the stored calls refer to are missing")
    return reasons


def _referenced(entry: dict[str, Any]) -> set[str]:
    """The tensor names one stored entry refers to."""
    names = set(entry.get("inputs", []))
    for lin in entry.get("lin", []):
        names.update(n for n in (lin[2] if lin[1] == "jacobian" else lin[2]) if n is not None)
    names |= _tensor_names([entry.get("out"), entry.get("recording")], _HexNames())
    return names


class _HexNames:
    """Membership test for strings that look like stored tensor names."""

    def __contains__(self, item: object) -> bool:
        return (
            isinstance(item, str) and len(item) == 32 and all(c in "0123456789abcdef" for c in item)
        )


def _tour_cache_calls() -> None:
    """The judge of check_predict_cache_shapes asks the reference for every model's cache at
    every size, as long as the prediction before was right: ask for all of them."""
    from autograder.checks import tour
    from autograder.checks.harness import sandbox, variant

    with sandbox(), variant(0):
        for _, model in tour._models():
            for batch, seq in tour._cache_sizes():
                tour._actual_cache_shapes(model, batch, seq)


def record() -> _Recorder:
    """Run every visible check at variant 0 on the reference's graded objects, on every
    must-pass variant and on every known-buggy twin of the bug zoo (each on the checks that take
    what it replaces), recording every call the judges make to the reference."""
    from autograder import reference as real
    from autograder.bugzoo import BUGS, VARIANTS, graded_objects
    from autograder.checks import CHECKS, get_check

    for name in dir(real):  # load every concept module now (the bug zoo's objects use them)
        getattr(real, name)
    recorder = _Recorder(real)
    sources: list[tuple[dict[str, object], set[str] | None]] = [(graded_objects(), None)]
    sources += [(graded_objects(v), set(v.replaces)) for v in VARIANTS.values()]
    sources += [(graded_objects(b), set(b.replaces)) for b in BUGS.values()]
    _RECORDERS.append(recorder)
    try:
        for objects, replaced in sources:
            for check in VISIBLE_CHECKS:
                if check not in CHECKS:
                    continue
                names = CHECKS[check][1]
                if replaced is not None and not set(names) & replaced:
                    continue
                recorder.check = check
                try:
                    get_check(check)(*(objects[n] for n in names))
                except AssertionError:
                    pass
        recorder.check = "check_count_parameters_by_group"
        get_check("check_count_parameters_by_group")(real.count_parameters_by_group)
        recorder.check = "check_predict_cache_shapes"
        _tour_cache_calls()
    finally:
        _RECORDERS.remove(recorder)
    if recorder.errors:
        shown = "\n  ".join(recorder.errors[:10])
        raise RecordingError(f"{len(recorder.errors)} calls could not be recorded:\n  {shown}")
    return recorder


def _write(index: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    DATA_DIR.mkdir(exist_ok=True)
    save_file(tensors, str(_TENSORS))
    _INDEX.write_text(json.dumps(index, sort_keys=True, indent=None, separators=(",", ":")) + "\n")
    _store.cache_clear()


def _compare(index: dict[str, Any]) -> list[str]:
    """What differs between a fresh recording and the stored one (tensors are named by their
    contents, so equal JSON means equal results)."""
    problems = stale_reasons()
    if not _INDEX.is_file() or not _TENSORS.is_file():
        return problems
    stored = _Store.load()
    fresh = {(e["fn"], e["key"]): _Entry(**e) for e in index["entries"]}
    old = {(e.fn, e.key): e for e in stored.entries}
    by_fn: dict[str, list[str]] = {}
    for key in sorted(set(fresh) | set(old)):
        if key not in old:
            by_fn.setdefault(key[0], []).append("calls not stored")
        elif key not in fresh:
            by_fn.setdefault(key[0], []).append("stored calls no longer made")
        elif fresh[key].result() != old[key].result():
            by_fn.setdefault(key[0], []).append("calls with another result")
    for fn, items in sorted(by_fn.items()):
        counts = {item: items.count(item) for item in items}
        problems.append(f"{fn}: " + "; ".join(f"{n} {item}" for item, n in counts.items()))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m autograder.checks.fixtures",
        description="Record (or check) the reference's results the visible checks replay in a "
        "student package.",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="record and write fixture_data/")
    group.add_argument("--check", action="store_true", help="record again; exit 1 if stale")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    recorder = record()
    index, tensors = recorder.data()
    took = time.perf_counter() - start
    if args.write:
        _write(index, tensors)
        size = _TENSORS.stat().st_size + _INDEX.stat().st_size
        print(
            f"recorded {len(index['entries'])} reference calls ({len(tensors)} tensors, "
            f"{size / 1e6:.2f} MB) in {took:.0f} s into {DATA_DIR}"
        )
        return 0
    problems = _compare(index)
    if problems:
        print(f"the stored reference results are stale (regenerate: {REGENERATE}):")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"the stored reference results are current ({len(index['entries'])} calls)")
    return 0


if __name__ == "__main__":  # run the imported module: the judges must see its recorder
    from autograder.checks import fixtures

    sys.exit(fixtures.main())
