"""Time the solution notebooks with nbclient: a student's run, then a graded run.

``python -m benchmarks.notebook_times [00 01 ...] [--write]`` executes each notebook (default:
all of them) in a scratch folder twice: as a student would (training, saving ``prompt.pt``,
``prefix.pt`` ...) and as nbgrader's autograde kernel would (``NBGRADER_EXECUTION=autograde``,
artifacts present), the latter twice: in a kernel started from scratch, and in a warm kernel
forked from a process that has the course imported, as ``python -m autograder grade`` runs it
(:mod:`autograder.pipeline.warm`; Linux). It prints a table: wall time (kernel start
included), the kernel's CPU time, the slowest cell, the slowest graded cell and the kernel's
peak memory. ``--write`` also
records it in ``benchmarks/RESULTS.md``. These are the numbers behind each notebook's "Budget".

``--model smollm2-135m`` (or another real backbone) proves each notebook's real-model path on a
machine without a GPU: every run selects that backbone through ``COURSE_BACKBONE`` (which each
notebook's setup cell honours through ``course.load_backbone("auto")``) and caps every training
loop at ``--max-steps`` steps through ``COURSE_MAX_STEPS``; the table says whether each run
completed, with its time and peak memory (section "Notebook execution times (<backbone>)").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from autograder.pipeline import sandbox, warm
from benchmarks.common import machine_description, write_section

ROOT = Path(__file__).resolve().parents[1]
USAGE = (
    "import resource\n"
    "import torch\n"
    "r = resource.getrusage(resource.RUSAGE_SELF)\n"
    "gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else -1\n"
    "print('USAGE', r.ru_maxrss / 1024, r.ru_utime + r.ru_stime, gpu)"
)


def _seconds(cell) -> float:
    ex = cell.metadata.get("execution", {})
    if "shell.execute_reply" not in ex:
        return 0.0
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(ex["shell.execute_reply"]) - parse(ex["iopub.execute_input"])).total_seconds()


def run(
    path: Path,
    workdir: Path,
    grading: bool,
    warm_kernel: bool = False,
    extra_env: dict[str, str] | None = None,
    allow_errors: bool = False,
) -> dict:
    """Execute ``path`` in ``workdir``; return timings and peak memory. A cell that fails
    raises, unless ``allow_errors``: then the failing cells are listed under ``"errors"``."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(USAGE))
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(extra_env or {}))
    env.pop("NBGRADER_EXECUTION", None)
    if grading:  # a grading kernel's environment, as the autograder gives it (warm or not)
        env = sandbox.kernel_environment(dict(env, NBGRADER_EXECUTION="autograde"))
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        start = time.perf_counter()
        extra = {"kernel_manager_class": warm.WarmKernelManager} if warm_kernel else {}
        client = NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(workdir)}},
            allow_errors=allow_errors,
            **extra,
        )
        client.execute()
        wall = time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(saved)
    code = [c for c in nb.cells if c.cell_type == "code"]
    graded = [c for c in code if c.metadata.get("nbgrader", {}).get("grade")]
    errors = [
        f"{c.metadata.get('nbgrader', {}).get('grade_id') or f'cell {i}'} ({o.ename})"
        for i, c in enumerate(nb.cells)
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    text = "".join(o.get("text", "") for o in code[-1].outputs if o.get("output_type") == "stream")
    found = re.search(r"USAGE ([\d.]+) ([\d.]+) (-?[\d.]+)", text)
    if found is None:
        raise RuntimeError(f"the usage cell printed {text!r}")
    peak, cpu, gpu = float(found.group(1)), float(found.group(2)), float(found.group(3))
    return {
        "wall": wall,
        "slowest": max(_seconds(c) for c in code),
        "slowest_graded": max((_seconds(c) for c in graded), default=0.0),
        "peak_mb": peak,
        "kernel_cpu": cpu,
        "gpu_peak_mb": gpu if gpu >= 0 else None,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", default=["00", "01", "02", "03", "04", "05"])
    parser.add_argument("--write", action="store_true", help="record in benchmarks/RESULTS.md")
    parser.add_argument("--model", default="tiny", help="backbone every run selects")
    parser.add_argument("--max-steps", type=int, default=3, help="step cap on a real backbone")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"  # as in every run below, so warm kernels can be forked
    real = args.model != "tiny"
    extra = {"COURSE_BACKBONE": args.model, "COURSE_MAX_STEPS": str(args.max_steps)} if real else {}
    modes = [("student", False, False), ("graded, artifacts present", True, False)]
    zygote = warm.Zygote.get() if warm.supported() and not real else None
    if zygote is not None and zygote.wait_ready():  # started before any timing
        modes.append(("graded, warm kernel (as `grade` runs it)", True, True))
    rows = [
        "| notebook | run | wall (s) | kernel CPU (s) | slowest cell (s) "
        "| slowest graded cell (s) | peak RSS (MB) |" + (" outcome |" if real else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if real else ""),
    ]
    for key in args.notebooks:
        (path,) = sorted((ROOT / "solutions").glob(f"{key}_*/{key}_*.ipynb"))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / path.parent.name
            work.mkdir()
            shutil.copy(path, work)
            for mode, grading, warm_kernel in modes:
                try:
                    r = run(work / path.name, work, grading, warm_kernel, extra, allow_errors=real)
                except Exception as err:  # noqa: BLE001 - a failed run is a result
                    reason = " ".join(str(err).split())[:300]
                    rows.append(f"| {path.stem} | {mode} | FAILED: {reason} | | | | |")
                    print(rows[-1], flush=True)
                    continue
                done = "completed" + (f"; failing: {', '.join(r['errors'])}" if r["errors"] else "")
                rows.append(
                    f"| {path.stem} | {mode} | {r['wall']:.1f} | {r['kernel_cpu']:.1f} | "
                    f"{r['slowest']:.1f} | {r['slowest_graded']:.1f} | {r['peak_mb']:.0f} |"
                    + (f" {done} |" if real else "")
                )
                print(rows[-1], flush=True)
    note = (
        "Wall time grows with other load on the machine; the kernel's CPU time (one torch "
        "thread with the tiny LM) does not, and is close to the wall time on an idle machine."
    )
    if real:
        note = (
            f"Every run on {args.model} (COURSE_BACKBONE), every training loop capped at "
            f"{args.max_steps} steps (COURSE_MAX_STEPS): this proves the real-model path runs "
            "top to bottom; it is not the time of a full run on a GPU. A trained artifact scored "
            "against the real model's threshold fails after so few steps, as it should."
        )
    body = "\n".join(rows) + f"\n\nMachine: {machine_description()}. {note}"
    print(body)
    if args.write:
        title = "Notebook execution times" + (f" ({args.model})" if real else "")
        command = "python -m benchmarks.notebook_times" + (
            f" --model {args.model} --max-steps {args.max_steps}" if real else ""
        )
        write_section(title, command, body)


if __name__ == "__main__":
    main()
