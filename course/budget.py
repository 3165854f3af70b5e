"""Per-device budgets: how much work a notebook cell does on a CPU versus a GPU runtime.

``COURSE_MAX_STEPS`` (an environment variable) caps every budget: the benchmark that proves each
notebook runs on a real backbone on a CPU (``python -m benchmarks.notebook_times --model
smollm2-135m``) sets it to a few steps.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from course.backbone import pick_device

__all__ = ["Budget", "Timer", "peak_memory_mb", "step_budget"]


@dataclass(frozen=True)
class Budget:
    """A step budget per device type, e.g. ``Budget(cpu=300, gpu=2000)``."""

    cpu: int
    gpu: int

    def __post_init__(self) -> None:
        if self.cpu < 0 or self.gpu < 0:
            raise ValueError(f"budgets must be >= 0, got cpu={self.cpu}, gpu={self.gpu}")

    def steps(self, device: torch.device | str | None = None) -> int:
        """The budget for ``device`` (None: the device the course would pick)."""
        dev = torch.device(device) if device is not None else pick_device()
        steps = self.cpu if dev.type == "cpu" else self.gpu
        cap = os.environ.get("COURSE_MAX_STEPS", "").strip()
        if cap:
            try:
                steps = min(steps, max(0, int(cap)))
            except ValueError:
                raise ValueError(f"COURSE_MAX_STEPS must be a whole number, not {cap!r}") from None
        return steps


def step_budget(cpu: int, gpu: int, device: torch.device | str | None = None) -> int:
    """Shorthand for ``Budget(cpu, gpu).steps(device)``."""
    return Budget(cpu, gpu).steps(device)


class Timer:
    """Wall-clock timer: ``with Timer() as t: ...; t.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def peak_memory_mb(device: torch.device | str) -> float | None:
    """Peak allocated GPU memory since the last reset, in MiB (None on a CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return None
