"""`python -m course doctor` and `python -m course demo`."""

from __future__ import annotations

import subprocess
import sys

from course.__main__ import main
from course.doctor import requirement_range, run_doctor


def test_doctor_reports_every_check_and_passes_here():
    lines: list[str] = []
    status = run_doctor(out=lines.append)
    text = "\n".join(lines)
    for needle in (
        "python",
        "torch",
        "transformers",
        "peft",
        "nbgrader",
        "jupyterlab",
        "ipywidgets",
        "device",
        "tiny LM",
        "smollm2-135m",
        "hub",
        "load_backbone('auto')",
    ):
        assert needle in text, f"doctor said nothing about {needle}:\n{text}"
    assert status == 0, text
    assert all(line.startswith(("[OK]", "[INFO]", "all checks")) for line in lines), text


def test_doctor_backbone_lines(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("COURSE_BACKBONE", raising=False)
    lines: list[str] = []
    assert run_doctor(out=lines.append) == 0
    assert "[INFO] smollm2-135m: not fetched: python -m course fetch smollm2-135m" in "\n".join(
        lines
    )
    monkeypatch.setenv("COURSE_BACKBONE", "smollm2-135m")  # named, not fetched: a real problem
    lines.clear()
    assert run_doctor(out=lines.append) == 1
    failed = [line for line in lines if line.startswith("[FAIL]")]
    assert len(failed) == 1 and "COURSE_BACKBONE" in failed[0] and "not fetched" in failed[0]
    monkeypatch.setenv("COURSE_BACKBONE", "tiny")
    lines.clear()
    assert run_doctor(out=lines.append) == 0
    assert any(line.startswith("[OK]") and "COURSE_BACKBONE=tiny" in line for line in lines)


def test_doctor_fails_on_an_out_of_range_package(monkeypatch):
    from course import doctor

    monkeypatch.setattr(doctor.metadata, "version", lambda pkg: "0.0.1")
    lines: list[str] = []
    assert run_doctor(out=lines.append) == 1
    assert any(line.startswith("[FAIL]") and "transformers 0.0.1" in line for line in lines)


def test_requirement_range_reads_the_installed_metadata():
    assert "5.17" in str(requirement_range("transformers"))


def test_doctor_exit_status_from_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "course", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[OK]" in proc.stdout


def test_demo_runs_end_to_end_on_a_tiny_budget(capsys):
    assert main(["demo", "--steps", "3", "--n-eval", "4"]) == 0
    out = capsys.readouterr().out
    assert "backbone bit-identical after training: True" in out
    assert "slot accuracy" in out and "with prefix" in out
