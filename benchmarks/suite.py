"""How long the test suite takes without notebook execution (target: 5 min on a 2-core CPU).

``python -m benchmarks.suite [--write]`` runs ``python -m pytest -m "not notebooks"`` in a
subprocess, then prints the wall time, the CPU time of the run, the pass/fail summary and the
ten slowest tests. ``--write`` records the table in ``benchmarks/RESULTS.md`` (section "suite").
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine_description, write_section

ROOT = Path(__file__).resolve().parents[1]
MARKER = "not notebooks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="record in benchmarks/RESULTS.md")
    args = parser.parse_args()
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        MARKER,
        "--durations=10",
        "-p",
        "no:cacheprovider",
    ]
    machine = machine_description()
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    out = run.stdout
    summary = next((line.strip("= ") for line in reversed(out.splitlines()) if " in " in line), "?")
    slow = re.findall(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)", out, re.M)
    lines = [
        f"Machine: {machine}.",
        "",
        f'`python -m pytest -m "{MARKER}"`: **{wall / 60:.1f} min wall**, {cpu / 60:.1f} min CPU '
        f"— {summary}",
        "",
        "| slowest | phase | s |",
        "|---|---|---:|",
        *[f"| `{test}` | {phase} | {float(s):.1f} |" for s, phase, test in slow],
    ]
    table = "\n".join(lines)
    print(table)
    if run.returncode != 0:
        print(out[-3000:], run.stderr[-2000:], sep="\n")
        raise SystemExit(run.returncode)
    if args.write:
        write_section("suite", "python -m benchmarks.suite --write", table)


if __name__ == "__main__":
    main()
