"""Plots the notebooks share: loss curves of several runs, bar charts, parameter counts.

Every function returns a matplotlib ``Figure`` (and draws on ``ax`` when one is given), so a
notebook can show it, a test can inspect it, and a script can save it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["human_count", "plot_bars", "plot_losses", "plot_param_counts", "smooth"]


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    return fig, ax


def _close_if_inline(fig: Figure) -> None:
    """Detach ``fig`` from pyplot so it is shown once (by the notebook), not twice."""
    plt.close(fig)


def human_count(n: float) -> str:
    """``1234567 -> '1.23M'``, ``7680 -> '7.68K'``, ``42 -> '42'``."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (the first points average what exists)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _losses_of(run: object) -> list[float]:
    losses = getattr(run, "losses", run)
    try:
        return [float(v) for v in losses]
    except TypeError as err:
        raise TypeError(
            f"a run must be a list of losses or a course.TrainResult, got {type(run).__name__}"
        ) from err


def plot_losses(
    runs: Mapping[str, object],
    window: int = 10,
    title: str = "training loss",
    logy: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """Loss curves of several runs on one axis.

    Args:
        runs: ``{name: losses}`` where ``losses`` is a list of per-step losses or a
            ``course.TrainResult``.
        window: moving-average window; the raw curve is drawn faint behind the smoothed one.
        logy: log-scale the loss axis.
    """
    if not runs:
        raise ValueError("plot_losses needs at least one run")
    fig, ax = _axes(ax, (6.4, 3.6))
    for i, (name, run) in enumerate(runs.items()):
        losses = _losses_of(run)
        if not losses:
            continue
        color = f"C{i % 10}"
        steps = range(1, len(losses) + 1)
        if window > 1 and len(losses) > window:
            ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(losses, window), color=color, label=name)
        else:
            ax.plot(steps, losses, color=color, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _close_if_inline(fig)
    return fig


def plot_bars(
    values: Mapping[str, float],
    ylabel: str = "",
    title: str = "",
    fmt: str = "{:.3g}",
    ax: Axes | None = None,
) -> Figure:
    """One bar per entry of ``values``, each labelled with its value."""
    if not values:
        raise ValueError("plot_bars needs at least one value")
    fig, ax = _axes(ax, (max(3.2, 1.1 * len(values) + 1.5), 3.4))
    names = list(values)
    heights = [float(values[n]) for n in names]
    bars = ax.bar(names, heights, color=[f"C{i % 10}" for i in range(len(names))])
    ax.bar_label(bars, labels=[fmt.format(h) for h in heights], padding=2)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    _close_if_inline(fig)
    return fig


def plot_param_counts(
    counts: Mapping[str, int],
    total: int | None = None,
    log: bool = True,
    title: str = "trainable parameters",
    ax: Axes | None = None,
) -> Figure:
    """Horizontal bars of parameter counts, each labelled with its size and, given ``total``
    (e.g. the backbone's size), its share of it."""
    if not counts:
        raise ValueError("plot_param_counts needs at least one count")
    fig, ax = _axes(ax, (6.4, 0.45 * len(counts) + 1.4))
    names = list(counts)[::-1]
    vals = [int(counts[n]) for n in names]
    bars = ax.barh(names, vals, color=[f"C{i % 10}" for i in range(len(names))][::-1])
    labels = []
    for v in vals:
        text = human_count(v)
        if total:
            text += f" ({100 * v / total:.3g}%)"
        labels.append(text)
    ax.bar_label(bars, labels=labels, padding=3)
    if log and min(vals) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("parameters" + (" (log scale)" if log else ""))
    ax.set_title(title)
    ax.margins(x=0.3)
    _close_if_inline(fig)
    return fig
