"""What every check shares: a quiet sandbox, calling the student's code, comparing tensors.

* :func:`sandbox` silences warnings and transformers' logger, swallows anything written to
  ``sys.stderr`` (nbgrader scores a test cell 0 when it writes to stderr) and restores the global
  random state afterwards, so running a check never changes what the student's next cell does.
* :func:`variant` / :func:`seeded`: every input a check builds (tiny models, batches, prefix
  values) is drawn from ``seeded(n)``. Variant 0, the visible checks, gives ``n`` itself; under
  grading the variant is a secret drawn per run, so no submission can carry answers computed in
  advance for known inputs.
* :func:`student_call` turns the stub's ``NotImplementedError`` into "not implemented yet: fill in
  the YOUR CODE HERE cell of X", and any other exception into an ``AssertionError`` that names
  the call that failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = [
    "CheckFailure",
    "current_variant",
    "describe",
    "grader_secret",
    "max_diff",
    "name_of",
    "sandbox",
    "seeded",
    "student_call",
    "variant",
    "with_grader_secret",
]

NOT_IMPLEMENTED = "not implemented yet: fill in the YOUR CODE HERE cell of {}"

_VARIANT: list[int] = [0]


@contextlib.contextmanager
def variant(seed: int) -> Iterator[None]:
    """Draw every check input from variant ``seed`` while the block runs."""
    _VARIANT.append(int(seed))
    try:
        yield
    finally:
        _VARIANT.pop()


_GRADER_SECRET: list[int | None] = [None]


@contextlib.contextmanager
def with_grader_secret(secret: int | None) -> Iterator[None]:
    """Make ``secret`` — a number only the grader process holds, never given to a kernel (the
    variant is: the kernel needs it to observe) — available to judges while the block runs."""
    _GRADER_SECRET.append(secret)
    try:
        yield
    finally:
        _GRADER_SECRET.pop()


def grader_secret() -> int | None:
    """The grader's own secret in force (None outside grading): what a judge draws inputs from
    when the kernel must not be able to compute them, e.g. the inputs a trained artifact is
    scored on (a kernel that knew them could fit its artifact to them)."""
    return _GRADER_SECRET[-1]


def current_variant() -> int:
    """The variant in force (0 outside :func:`variant`)."""
    return _VARIANT[-1]


def seeded(n: int) -> int:
    """The seed to use for input ``n`` of a check: ``n`` itself in variant 0, else a number
    derived from ``(variant, n)`` (stable across processes)."""
    v = _VARIANT[-1]
    if v == 0:
        return n
    digest = hashlib.sha256(f"{v}/{n}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


class CheckFailure(AssertionError):
    """A failure already explained by a check; :func:`student_call` passes it through as is."""


@contextlib.contextmanager
def sandbox() -> Iterator[None]:
    """Run a check: no warnings, no logging below ERROR, nothing on stderr, RNG restored, one
    CPU thread (tiny tensors: more threads only add contention, easily 10x slower)."""
    log = logging.getLogger("transformers")
    level, threads = log.level, torch.get_num_threads()
    log.setLevel(logging.ERROR)
    torch.set_num_threads(1)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
            torch.random.fork_rng(devices=[]),
            torch.enable_grad(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)
        torch.set_num_threads(threads)


def name_of(obj: Any) -> str:
    """``obj.__name__`` for functions and classes, else the type's name."""
    return getattr(obj, "__name__", type(obj).__name__)


_LIBRARIES = ("torch", "transformers", "peft", "accelerate")


def _raised_by_stub(err: NotImplementedError) -> str | None:
    """The qualified name of the function that raised ``err``, unless a library raised it."""
    tb = err.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    if module.split(".")[0] in _LIBRARIES:
        return None
    code = tb.tb_frame.f_code
    return getattr(code, "co_qualname", code.co_name)


def student_call(what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; failures become ``AssertionError`` messages naming ``what``.

    ``what`` is how the call reads in a message, e.g. ``"prefix_forward(model, encoder, ...)"``.
    """
    try:
        return fn(*args, **kwargs)
    except CheckFailure:
        raise
    except NotImplementedError as err:
        where = _raised_by_stub(err)
        if where is not None:
            if where == "__init__" or "<" in where:
                where = what.split("(")[0]
            raise CheckFailure(NOT_IMPLEMENTED.format(where.removesuffix(".__init__"))) from None
        raise CheckFailure(f"{what} raised NotImplementedError: {err}") from err
    except Exception as err:  # noqa: BLE001 - any crash of the student's code is reported
        raise CheckFailure(f"{what} raised {type(err).__name__}: {err}") from err


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, computed in float32 on detached copies."""
    return (a.detach().float() - b.detach().float()).abs().max().item()


def describe(t: Any) -> str:
    """``"tensor (2, 4, 6) float32"`` or the type's name: for messages about wrong returns."""
    if isinstance(t, torch.Tensor):
        return f"tensor {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
    return type(t).__name__
