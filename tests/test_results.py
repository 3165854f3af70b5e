"""Benchmark results shown in the notebooks: loading, the summary, the figure."""

from __future__ import annotations

import json

import pytest

from course import results

RESULT = {
    "model": "smollm2-135m",
    "device": "cpu",
    "machine": "a test machine",
    "date": "2026-11-30",
    "untuned": {"slot": 10.0, "bleu": 5.0, "peak_mb": 1.0},
    "rows": [
        {
            "method": m,
            "pct": pct,
            "slot": slot,
            "bleu": 40.0,
            "steps": 100,
            "curve": [
                {"step": 50, "slot_accuracy": slot - 5},
                {"step": 100, "slot_accuracy": slot},
            ],
        }
        for m, pct, slot in (("prefix", 0.1, 80.0), ("full", 100.0, 85.0))
    ],
}


def test_load_summary_and_plot(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert results.load("methods-smollm2-135m") is None and results.available() == []
    (tmp_path / "methods-smollm2-135m.json").write_text(json.dumps(RESULT))
    loaded = results.load("methods-smollm2-135m")
    assert results.available() == ["methods-smollm2-135m"]
    text = results.summary(loaded)
    assert "benchmark, not this run: smollm2-135m on cpu" in text and "prefix" in text
    fig = results.plot_methods(loaded)
    left, right = fig.axes
    assert len(right.get_lines()) >= 2 and "not this run" in fig._suptitle.get_text()
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not a methods or sweeps result"):
        results.load("bad")
    sweeps = {**RESULT, "steps": 100, "sweeps": {"length": [{"label": "P=1", "slot_accuracy": 5}]}}
    (tmp_path / "sweeps-x.json").write_text(json.dumps(sweeps))
    figure = results.plot_sweep(results.load("sweeps-x"), "length")
    assert "benchmarks.sweeps" in figure.axes[0].get_title()


@pytest.mark.parametrize("name", [n for n in results.available() if n.startswith("methods")])
def test_committed_results_load(name: str) -> None:
    result = results.load(name)
    assert {r["method"] for r in result["rows"]} <= {
        "prompt",
        "prefix",
        "prefix_reparam",
        "lora",
        "full",
    }
    results.plot_methods(result)


@pytest.mark.parametrize("name", [n for n in results.available() if n.startswith("sweeps")])
def test_committed_sweeps_load(name: str) -> None:
    result = results.load(name)
    assert set(result["sweeps"]) == {"length", "init"}
    for sweep in result["sweeps"]:
        results.plot_sweep(result, sweep)
