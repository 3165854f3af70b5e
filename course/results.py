"""Benchmark results the notebooks show beside their own runs, labelled as the benchmark's.

``python -m benchmarks.methods --model smollm2-135m`` writes its figures to
``course/assets/results/methods-smollm2-135m.json`` (``-cuda`` when run on a GPU). A notebook that
runs on the tiny LM on a CPU cannot train the real model in its budget, so it shows that file
instead — with the machine, date and command that produced it, never as its own result.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["RESULTS_DIR", "available", "load", "plot_methods", "plot_sweep", "summary"]

RESULTS_DIR = Path(__file__).resolve().parent / "assets" / "results"


def available() -> list[str]:
    """Names of the committed results (``"methods-smollm2-135m"`` ...)."""
    return sorted(p.stem for p in RESULTS_DIR.glob("*.json"))


def load(name: str) -> dict | None:
    """The result called ``name``, or None when it was never produced here."""
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not (
        isinstance(data.get("rows"), list) or isinstance(data.get("sweeps"), dict)
    ):
        raise ValueError(f"{path} is not a methods or sweeps result")
    return data


def _label(result: dict) -> str:
    script = "sweeps" if "sweeps" in result else "methods"
    return (
        f"benchmark, not this run: {result['model']} on {result['device']}, {result['date']} "
        f"(python -m benchmarks.{script} --model {result['model']})"
    )


def summary(result: dict) -> str:
    """One line per method: trained share, slot accuracy, BLEU, steps; then where it ran."""
    lines = [f"{'method':16s}{'% trained':>10s}{'slot acc':>9s}{'BLEU':>6s}{'steps':>6s}"]
    for r in result["rows"]:
        lines.append(
            f"{r['method']:16s}{r['pct']:>10.3f}{r['slot']:>9.1f}{r['bleu']:>6.1f}{r['steps']:>6d}"
        )
    base = result["untuned"]
    lines.append(f"{'untuned':16s}{0:>10.3f}{base['slot']:>9.1f}{base['bleu']:>6.1f}{0:>6d}")
    lines.append(_label(result) + f"; {result['machine']}")
    return "\n".join(lines)


def plot_methods(result: dict) -> Figure:
    """Slot accuracy against the share of parameters trained (left) and along training (right),
    for every method of a methods result; the frozen backbone as a dashed line."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    plt.close(fig)  # shown once, by the notebook
    base = result["untuned"]["slot"]
    for i, r in enumerate(result["rows"]):
        left.scatter(r["pct"], r["slot"], color=f"C{i}")
        left.annotate(r["method"], (r["pct"], r["slot"]), fontsize=8, xytext=(4, 3),
                      textcoords="offset points")  # fmt: skip
        curve = r["curve"]
        right.plot([c["step"] for c in curve], [c["slot_accuracy"] for c in curve], "o-",
                   color=f"C{i}", label=r["method"], ms=3)  # fmt: skip
    for ax in (left, right):
        ax.axhline(base, color="gray", ls="--", lw=1)
        ax.grid(alpha=0.3)
    left.set(xscale="log", xlabel="% of the backbone's parameters trained (log)",
             ylabel="slot accuracy (%)")  # fmt: skip
    right.set(xlabel="training step", ylabel="slot accuracy (%)")
    right.legend(fontsize=8)
    fig.suptitle(_label(result), fontsize=9)
    return fig


def plot_sweep(result: dict, sweep: str) -> Figure:
    """Slot accuracy of every run of one sweep (``"length"`` or ``"init"``) of a sweeps result,
    as bars labelled with the runs, the benchmark's label as title."""
    rows = result["sweeps"][sweep]
    fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
    plt.close(fig)
    labels = [r["label"] for r in rows]
    values = [r["slot_accuracy"] for r in rows]
    bars = ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="slot accuracy (%)", ylim=(0, 100))
    ax.set_title(f"{_label(result)}; {result['steps']} steps per run", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig
