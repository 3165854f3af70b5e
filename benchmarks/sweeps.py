"""Prefix length and initialisation on a real backbone: notebook 03's ablations, measured.

    python -m benchmarks.sweeps --model smollm2-135m [--steps 100] [--n-eval 48]

Runs the reference ``run_sweep`` (fresh backbone per run, same seed, same data order, equal steps)
on data-to-text for: a direct prefix of length 1, 5, 10 and 20; a soft prompt (length 10) started
from random values at the embeddings' scale, sampled vocabulary rows, and the task description;
a direct prefix (length 10) from a random draw and from the description's keys and values. Prints
a table, writes it to ``benchmarks/RESULTS.md`` (section ``sweeps-<backbone>``) and the rows to
``course/assets/results/sweeps-<backbone>.json``, which notebook 03 shows beside its tiny-LM study.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch

from benchmarks.common import result_header, write_section
from benchmarks.methods import RESULTS_DIR

INIT_TEXT = " Describe the restaurant in one sentence."
LR = {"prompt": 1e-2, "prefix": 5e-3}  # as benchmarks.methods measured on SmolLM2


def configs(lengths: list[int]) -> dict[str, list[dict]]:
    """The two sweeps, as ``run_sweep`` configurations."""

    def cfg(method: str, label: str, **options) -> dict:
        return {"method": method, "lr": LR[method], "label": label, **options}

    return {
        "length": [cfg("prefix", f"prefix, P={n}", length=n, init="random") for n in lengths],
        "init": [
            cfg("prompt", "prompt: random", length=10, init="random"),
            cfg("prompt", "prompt: vocab", length=10, init="vocab"),
            cfg("prompt", "prompt: text", length=10, init="text", init_text=INIT_TEXT),
            cfg("prefix", "prefix: random", length=10, init="random"),
            cfg("prefix", "prefix: text", length=10, init="text", init_text=INIT_TEXT),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-eval", type=int, default=48)
    parser.add_argument("--lengths", default="1,5,10,20")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.device in (None, "cpu"):
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    from autograder.reference import make_method, run_sweep
    from course import load_backbone
    from course.data import get_task

    task = get_task("data_to_text")
    train_set, eval_set = task.examples("train"), task.examples("validation", args.n_eval)
    lengths = [int(n) for n in args.lengths.split(",")]
    started = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    for sweep, cfgs in configs(lengths).items():
        rows[sweep] = run_sweep(
            cfgs,
            lambda: load_backbone(args.model, device=args.device),
            make_method,
            task,
            train_set,
            eval_set,
            steps=args.steps,
            batch_size=args.batch,
        )
        for r in rows[sweep]:
            print(f"{r['label']}: slot {r['slot_accuracy']:.1f}", flush=True)
    result = {
        **result_header(args.model, args.device),
        "steps": args.steps,
        "batch": args.batch,
        "n_eval": args.n_eval,
        "sweeps": {
            name: [
                {k: r[k] for k in ("label", "method", "trainable", "pct", "slot_accuracy", "bleu")}
                for r in sweep_rows
            ]
            for name, sweep_rows in rows.items()
        },
        "wall_s": time.perf_counter() - started,
    }
    lines = [
        f"Machine: {result['machine']}. Backbone {args.model}, data-to-text, {args.steps} steps "
        f"per run, batch {args.batch}, {args.n_eval} validation examples, seed 0; learning rates "
        f"{LR}; the reference make_method and run_sweep (fresh backbone per run).",
        "",
        "| sweep | run | trainable | slot accuracy | BLEU |",
        "|---|---|---:|---:|---:|",
    ]
    for name, sweep_rows in result["sweeps"].items():
        for r in sweep_rows:
            lines.append(
                f"| {name} | {r['label']} | {r['trainable']:,} | {r['slot_accuracy']:.1f} "
                f"| {r['bleu']:.1f} |"
            )
    lines.append(f"\nWhole run: {result['wall_s'] / 60:.1f} min.")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        section = f"sweeps-{args.model}" + ("-cuda" if result["device"] == "cuda" else "")
        write_section(
            section,
            f"python -m benchmarks.sweeps --model {args.model} --steps {args.steps}",
            text,
        )
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"{section}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
