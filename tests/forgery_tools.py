"""Shared by the judges' tests: the reference's observation of a check, and judging data.

``observation(check, seed)`` is what the grader receives from a kernel running the reference
implementation on variant ``seed`` (encoded, then decoded: a fresh copy every call, so a test
may forge it freely); ``judge`` runs the check's judge half on such data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from autograder.bugzoo import graded_objects
from autograder.checks import CHECKS, protocol

_CACHE: dict[tuple[str, int], tuple[dict[str, torch.Tensor], str]] = {}


def observation(check: str, seed: int = 0, objects: dict[str, object] | None = None) -> dict:
    """The observation of ``check`` on ``objects`` (default: the reference's graded objects)."""
    key = (check, seed)
    if objects is not None or key not in _CACHE:
        observe, _ = protocol.resolve(check)
        given = graded_objects() if objects is None else objects
        obs = protocol.observe_safely(observe, tuple(given[n] for n in CHECKS[check][1]), seed)
        assert protocol.FAILED not in obs, obs[protocol.FAILED]
        if objects is not None:
            return protocol.decode(*protocol.encode(obs))
        _CACHE[key] = protocol.encode(obs)
    return protocol.decode(*_CACHE[key])


def judge(check: str, data: dict, seed: int = 0) -> None:
    """Judge ``data`` as the grader would (raises ``AssertionError`` on a failure)."""
    protocol.judge_observation(protocol.resolve(check)[1], data, seed)


def assert_forgery_refused(check: str, data: dict, forge, seed: int) -> None:
    """``forge(data)`` (a genuine observation of ``check`` on variant ``seed``) must fail its
    judge as a wrong answer: an ``AssertionError`` that is not merely "malformed"."""
    forge(data)
    try:
        judge(check, data, seed)
    except protocol.MalformedObservation as err:
        raise AssertionError(f"the forgery was only refused as malformed: {err}") from None
    except AssertionError:
        return
    raise AssertionError(f"{check}: the judge accepted a forged observation")


def observe_in_a_fresh_kernel(
    source: str, folder: Path, seed: int, count: int, stdin: str | None = None
) -> None:
    """Run ``source`` (a kernel stand-in, given ``folder`` and ``seed`` as arguments, that must
    observe without importing the reference) in a fresh Python; then judge, in this process, the
    ``count`` observations it wrote to ``folder``: every one must pass."""
    script = folder / "kernel.py"
    script.write_text(source)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(script), str(folder), str(seed)],
        cwd=root,
        capture_output=True,
        text=True,
        input=stdin,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == count, [f.name for f in files]
    for path in files:
        name = path.stem.split("-", 2)[2]
        assert protocol.FAILED not in protocol.read(path), protocol.read(path)
        protocol.judge_file(name, path, seed)
