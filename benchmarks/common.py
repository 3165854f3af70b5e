"""Shared by the benchmark scripts: machine description and RESULTS.md sections."""

from __future__ import annotations

import os
import platform
import re
from datetime import date
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Every figure below was printed by the script named in its section, on the machine it "
    "names. Re-run a script to replace its section.\n"
)


def result_header(model: str, device: str | None) -> dict:
    """What every benchmark's JSON result opens with: backbone, device, machine, date."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {
        "model": model,
        "device": dev.type,
        "machine": machine_description(dev),
        "date": str(date.today()),
    }


def machine_description(device: torch.device | str = "cpu") -> str:
    """CPU model and cores (or the GPU name), torch and transformers versions."""
    dev = torch.device(device)
    if dev.type == "cuda":
        hw = torch.cuda.get_device_name(dev)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            text = Path("/proc/cpuinfo").read_text()
            found = re.search(r"model name\s*:\s*(.+)", text)
            cpu = found.group(1).strip() if found else cpu
        except OSError:
            pass
        hw = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    load = ""
    if dev.type == "cpu" and hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f} when written"
    return f"{hw}{load}; torch {torch.__version__}, transformers {transformers.__version__}"


def write_section(name: str, command: str, body: str) -> None:
    """Replace (or append) the section ``name`` of benchmarks/RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    section = (
        f"<!-- {name} -->\n## {name}\n\n`{command}` on {date.today()}\n\n{body}\n<!-- /{name} -->\n"
    )
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _m: section, text) if pattern.search(text) else text + "\n" + section
    RESULTS.write_text(text)
