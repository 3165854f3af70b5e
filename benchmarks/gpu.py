"""The one script to run when a GPU is lent: every notebook and the methods table on CUDA.

    python -m benchmarks.gpu [--out DIR] [--skip-notebooks] [--skip-methods]

Needs CUDA and SmolLM2-135M fetched (``python -m course fetch smollm2-135m``; carry the cache
folder to the GPU machine and point ``COURSE_CACHE_DIR`` at it). It

1. executes every solution notebook as a student runs it on the real backbone, at the notebooks'
   own GPU step budgets (``COURSE_BACKBONE=smollm2-135m``, no step cap): wall time, the
   kernel's peak RSS and CUDA max allocated memory, whether it completed;
2. runs ``benchmarks.methods --model smollm2-135m --device cuda`` (prompt, prefix, reparameterised
   prefix, LoRA and full fine-tuning: slot accuracy and BLEU curves, step time, CUDA peak
   memory);

and writes everything to ``DIR/gpu-results.json`` (default ``$OUT`` or ``benchmarks/``) and to the
sections of ``benchmarks/RESULTS.md``. Budget: about 8 minutes on one H200. Nothing here invents
a figure: without a GPU it exits saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_description, write_section

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("00", "01", "02", "03", "04", "05")


def notebooks(model: str) -> list[dict]:
    """Each solution notebook, as a student runs it, on ``model`` on the GPU."""
    from benchmarks.notebook_times import run

    rows = []
    for key in NOTEBOOKS:
        (path,) = sorted((ROOT / "solutions").glob(f"{key}_*/{key}_*.ipynb"))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / path.parent.name
            work.mkdir()
            shutil.copy(path, work)
            start = time.perf_counter()
            try:
                r = run(work / path.name, work, grading=False, extra_env={"COURSE_BACKBONE": model})
                rows.append({"notebook": path.stem, "completed": True, **r})
            except Exception as err:  # noqa: BLE001 - a failure is a result
                rows.append(
                    {
                        "notebook": path.stem,
                        "completed": False,
                        "error": " ".join(str(err).split())[:500],
                        "wall": time.perf_counter() - start,
                    }
                )
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--skip-notebooks", action="store_true")
    parser.add_argument("--skip-methods", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured (run this on a GPU machine)")
        return 2
    from course.backbone import BackboneError, load_backbone

    try:
        load_backbone(args.model, device="cpu")
    except BackboneError as err:
        print(err)
        return 2
    device = torch.device("cuda")
    results: dict = {"machine": machine_description(device), "model": args.model}
    started = time.perf_counter()
    if not args.skip_notebooks:
        results["notebooks"] = notebooks(args.model)
        lines = [
            "| notebook | completed | wall (s) | slowest cell (s) | peak RSS (MB) "
            "| CUDA max allocated (MB) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in results["notebooks"]:
            if r["completed"]:
                gpu = r.get("gpu_peak_mb")
                lines.append(
                    f"| {r['notebook']} | yes | {r['wall']:.1f} | {r['slowest']:.1f} "
                    f"| {r['peak_mb']:.0f} | {'-' if gpu is None else f'{gpu:.0f}'} |"
                )
            else:
                lines.append(f"| {r['notebook']} | NO: {r['error'][:200]} | | | | |")
        body = "\n".join(lines) + f"\n\nMachine: {results['machine']}. Student runs, GPU budgets."
        title = f"Notebook execution times ({args.model}, cuda)"
        write_section(title, "python -m benchmarks.gpu", body)
    if not args.skip_methods:
        command = [sys.executable, "-m", "benchmarks.methods", "--model", args.model]
        done = subprocess.run([*command, "--device", "cuda"], cwd=ROOT)
        results["methods_exit_status"] = done.returncode
        produced = ROOT / "course" / "assets" / "results" / f"methods-{args.model}-cuda.json"
        if produced.exists():
            results["methods"] = json.loads(produced.read_text())
    results["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-results.json").write_text(json.dumps(results, indent=1) + "\n")
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", out / "RESULTS.md")
    print(f"wrote {out / 'gpu-results.json'} in {results['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
