"""Checks in two halves: *observe* the student's code, then *judge* what was observed.

Every check ``check_<x>(*objects)`` is a pair of functions in its module:

* ``observe_<x>(*objects) -> dict`` calls the student's objects on inputs the grader builds from
  the current **variant** seed (:func:`autograder.checks.harness.seeded`) and returns what came
  out as plain data: tensors, numbers, strings, lists and dicts. It never needs the reference
  implementation. It may raise ``AssertionError`` early (a crash of the student's code, a wrong
  shape) for a precise message; a pass of ``observe`` proves nothing.
* ``judge_<x>(obs: Observed) -> None`` decides from that data alone, rebuilding the same inputs
  from the same variant and computing what the reference gives on them; it raises
  ``AssertionError`` with the message the student sees. Everything a pass requires is
  established here, from the data: ``observe`` may have been bypassed or forged.

Outside grading, :func:`run_check` runs both halves in one process (variant 0, the visible
checks). Under grading the halves run in different processes: the student's kernel observes on
a secret variant and writes the observation to a channel only the grader reads
(:func:`capture`); the grader judges it in its own process, where no student code runs
(:func:`judge_file`). A kernel that tampers with anything it can reach (names, modules, hooks,
displays) can only change the observation, and the only observation that passes is the one a
correct implementation produces on inputs the kernel did not know in advance.

Observations travel as one safetensors file: the tensors, plus the rest as JSON in the header's
metadata, parsed with size limits and no pickle.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from autograder.checks.harness import CheckFailure, sandbox, variant, with_grader_secret

__all__ = [
    "CHANNEL_ENV",
    "FAILED",
    "MAX_BYTES",
    "SEED_ENV",
    "MalformedObservation",
    "Observed",
    "capture",
    "decode",
    "encode",
    "grading_channel",
    "judge_file",
    "judge_observation",
    "observe_safely",
    "resolve",
    "run_check",
]

CHANNEL_ENV = "COURSE_VERDICT_DIR"
"""Set in a grading kernel: the folder its observations go to (the grader empties it)."""
SEED_ENV = "COURSE_VERDICT_SEED"
"""Set in a grading kernel: the secret variant of this grading run."""
FAILED = "__failed__"
"""Observation key: the check already failed while observing; the value is the message."""
MAX_BYTES = 64 * 1024 * 1024
"""Largest observation file the grader reads."""
_JSON_KEY = "observation"
_MAX_JSON = 4 * 1024 * 1024


class MalformedObservation(AssertionError):
    """The observation lacks a field or has one of the wrong type: it was not written by the
    grader's own ``observe`` (or that code has a bug). Reported as suspected tampering."""


# ------------------------------------------------------------------------------- serialisation


def encode(obs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors, json_text)``: tensors moved out of the structure, replaced by references."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if isinstance(value, Mapping):
            if not all(isinstance(k, str) for k in value):
                raise TypeError("observation dict keys must be strings")
            if "__tensor__" in value or "__float__" in value:
                raise TypeError("observation dicts may not use the reserved keys")
            return {k: walk(v) for k, v in value.items()}
        raise TypeError(f"cannot put a {type(value).__name__} in an observation")

    return tensors, json.dumps(walk(dict(obs)), allow_nan=False)


def _rebuild(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_rebuild(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            key = value["__tensor__"]
            if not isinstance(key, str) or key not in tensors:
                raise MalformedObservation(f"observation refers to a missing tensor {key!r}")
            return tensors[key]
        if set(value) == {"__float__"}:
            text = value["__float__"]
            if text not in ("nan", "inf", "-inf"):
                raise MalformedObservation(f"observation holds a bad float {text!r}")
            return float(text)
        return {k: _rebuild(v, tensors) for k, v in value.items()}
    return value


def decode(tensors: Mapping[str, torch.Tensor], text: str) -> dict[str, Any]:
    """The observation :func:`encode` split up; :class:`MalformedObservation` if it is not one."""
    if len(text) > _MAX_JSON:
        raise MalformedObservation("observation header is too large")
    try:
        data = json.loads(text)
    except ValueError as err:
        raise MalformedObservation(f"observation is not valid JSON: {err}") from None
    except RecursionError:  # "[[[[...]]]]": deeper than Python's parser goes
        raise MalformedObservation("observation header is nested too deeply") from None
    if not isinstance(data, dict):
        raise MalformedObservation("observation is not a mapping")
    try:
        return _rebuild(data, tensors)
    except RecursionError:
        raise MalformedObservation("observation is nested too deeply") from None


def write(path: Path, obs: Mapping[str, Any]) -> None:
    """Write ``obs`` to ``path`` (a safetensors file), atomically."""
    tensors, text = encode(obs)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={_JSON_KEY: text})
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any]:
    """The observation in ``path``; :class:`MalformedObservation` for anything else."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise MalformedObservation(f"observation file is {size} bytes, more than {MAX_BYTES}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any parse failure of an untrusted file
        raise MalformedObservation(f"observation file unreadable: {err}") from None
    if _JSON_KEY not in meta:
        raise MalformedObservation("observation file has no observation header")
    return decode(tensors, meta[_JSON_KEY])


# ------------------------------------------------------------------------------- typed access


class Observed:
    """Read-only, typed access to an observation: every getter raises
    :class:`MalformedObservation` when the field is missing or of the wrong kind."""

    def __init__(self, data: Mapping[str, Any], where: str = "") -> None:
        if not isinstance(data, Mapping):
            raise MalformedObservation(f"{where or 'observation'} is not a mapping")
        self._data = data
        self._where = where

    def _get(self, key: str) -> Any:
        if key not in self._data:
            raise MalformedObservation(f"observation has no field {self._where}{key}")
        return self._data[key]

    def _bad(self, key: str, want: str) -> MalformedObservation:
        got = type(self._data.get(key)).__name__
        return MalformedObservation(f"observation field {self._where}{key} is {got}, not {want}")

    def has(self, key: str) -> bool:
        return key in self._data

    def keys(self) -> list[str]:
        return list(self._data)

    def tensor(
        self,
        key: str,
        shape: tuple[int | None, ...] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A tensor field, checked against ``shape`` (``None`` entries match anything)."""
        value = self._get(key)
        if not isinstance(value, torch.Tensor):
            raise self._bad(key, "a tensor")
        if shape is not None and (
            value.dim() != len(shape)
            or any(w is not None and w != s for w, s in zip(shape, value.shape, strict=True))
        ):
            raise MalformedObservation(
                f"observation field {self._where}{key} has shape {tuple(value.shape)}, not {shape}"
            )
        if dtype is not None and value.dtype != dtype:
            raise MalformedObservation(
                f"observation field {self._where}{key} has dtype {value.dtype}, not {dtype}"
            )
        return value

    def maybe_tensor(self, key: str) -> torch.Tensor | None:
        value = self._get(key)
        if value is not None and not isinstance(value, torch.Tensor):
            raise self._bad(key, "a tensor or None")
        return value

    def int(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an int")
        return value

    def float(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, "a number")
        return float(value)

    def bool(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._bad(key, "a bool")
        return value

    def str(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def maybe_str(self, key: str) -> str | None:
        value = self._get(key)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string or None")
        return value

    def list(self, key: str, length: int | None = None) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._bad(key, "a list")
        if length is not None and len(value) != length:
            raise MalformedObservation(
                f"observation field {self._where}{key} has {len(value)} items, not {length}"
            )
        return value

    def strings(self, key: str) -> list[str]:
        value = self.list(key)
        if not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of strings")
        return value

    def tensors(self, key: str, length: int | None = None) -> list[torch.Tensor]:
        value = self.list(key, length)
        if not all(isinstance(v, torch.Tensor) for v in value):
            raise self._bad(key, "a list of tensors")
        return value

    def sub(self, key: str) -> Observed:
        """A nested mapping, itself :class:`Observed`."""
        return Observed(self._get(key), f"{self._where}{key}.")

    def subs(self, key: str, length: int | None = None) -> list[Observed]:
        """A list of nested mappings."""
        return [
            Observed(v, f"{self._where}{key}[{i}].") for i, v in enumerate(self.list(key, length))
        ]

    def raw(self, key: str) -> Any:
        """The field as stored (validate it yourself)."""
        return self._get(key)


# ------------------------------------------------------------------------------- running


def resolve(name: str) -> tuple[Callable[..., dict], Callable[..., None]]:
    """``(observe, judge)`` of the check called ``name`` (``"check_prefix_forward"``)."""
    from autograder.checks import NOTEBOOK_CHECKS

    if name not in NOTEBOOK_CHECKS:
        raise KeyError(f"unknown check {name!r}")
    module = importlib.import_module(f"autograder.checks.{NOTEBOOK_CHECKS[name][0]}")
    stem = name.removeprefix("check_")
    return getattr(module, f"observe_{stem}"), getattr(module, f"judge_{stem}")


def observe_safely(observe: Callable[..., dict], objects: tuple, seed: int) -> dict[str, Any]:
    """``observe(*objects)`` on variant ``seed``, quietly; an early failure becomes
    ``{FAILED: message}`` (a crash of the check itself is reported the same way)."""
    with sandbox(), variant(seed):
        try:
            obs = observe(*objects)
        except AssertionError as err:
            return {FAILED: str(err)}
        except Exception as err:  # noqa: BLE001 - reported as the check's failure
            return {FAILED: f"the check could not run: {type(err).__name__}: {err}"}
    if not isinstance(obs, dict):
        return {FAILED: f"the check could not run: observe returned {type(obs).__name__}"}
    return obs


def judge_observation(
    judge: Callable[..., None],
    data: Mapping[str, Any],
    seed: int,
    params: Mapping[str, Any] | None = None,
    secret: int | None = None,
) -> None:
    """Judge ``data`` on variant ``seed``; raises ``AssertionError`` with the student's message.
    ``secret``: the grader's own secret for this run, which no kernel sees
    (:func:`~autograder.checks.harness.grader_secret`).

    ``params`` are the grader's own settings for this use of the check (a question id, a task
    name), passed to the judge as keywords; under grading they come from the grader's copy of
    the cell, never from the kernel."""
    if FAILED in data:
        message = data[FAILED]
        raise CheckFailure(message if isinstance(message, str) else "the check failed")
    with sandbox(), variant(seed), with_grader_secret(secret):
        judge(Observed(data), **dict(params or {}))


def run_check(
    observe: Callable[..., dict],
    judge: Callable[..., None],
    *objects: object,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
) -> None:
    """Observe then judge in this process, through the same serialisation as grading."""
    obs = observe_safely(observe, objects, seed)
    try:
        tensors, text = encode(obs)
    except TypeError as err:
        raise AssertionError(f"the check could not record its observation: {err}") from None
    judge_observation(judge, decode(tensors, text), seed, params)


# ------------------------------------------------------------------------------- grading


def grading_channel() -> tuple[Path, int] | None:
    """``(folder, seed)`` when this process is a grading kernel, else None."""
    folder, seed = os.environ.get(CHANNEL_ENV), os.environ.get(SEED_ENV)
    if not folder or not seed:
        return None
    try:
        return Path(folder), int(seed)
    except ValueError:
        return None


_COUNTER: Iterator[int] = itertools.count()


def capture(name: str, objects: tuple, channel: tuple[Path, int]) -> Path:
    """In a grading kernel: observe check ``name`` on the secret variant and hand the
    observation to the grader. Returns the file written."""
    folder, seed = channel
    try:
        observe, _ = resolve(name)
    except (KeyError, AttributeError) as err:
        obs = {FAILED: f"unknown check {name!r}: {err}"}
    else:
        obs = observe_safely(observe, objects, seed)
    path = folder / f"{os.getpid()}-{next(_COUNTER):04d}-{name}.safetensors"
    try:
        write(path, obs)
    except TypeError as err:
        write(path, {FAILED: f"the check could not record its observation: {err}"})
    return path


def judge_file(
    name: str,
    path: Path,
    seed: int,
    params: Mapping[str, Any] | None = None,
    secret: int | None = None,
) -> None:
    """In the grader: judge the observation of check ``name`` stored at ``path``."""
    _, judge = resolve(name)
    judge_observation(judge, read(path), seed, params, secret)


def scratch_channel() -> Path:
    """A fresh private folder for a grading kernel's observations."""
    return Path(tempfile.mkdtemp(prefix="verdicts-"))
