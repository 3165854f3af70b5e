"""Prompt tuning vs prefix tuning (direct, reparameterised) vs LoRA vs full fine-tuning.

On a backbone (the bundled tiny LM by default, or SmolLM2-135M after ``python -m course fetch
smollm2-135m``) and the data-to-text task: trainable parameters, median step time, training
time, peak memory (the process's RSS on a CPU, CUDA max allocated on a GPU), and slot accuracy
and BLEU on the validation split along the way. Each method runs in its own process from a
fresh backbone (so its peak memory is its own), with its own step budget: a method is trained
until its curve flattens, and the curve is in the table. Then, in the same run, the step time
of the course's hand-written prefix tuning against PEFT PrefixTuning's (interleaved, so both see
the same machine load; tiny LM only by default).

Writes a markdown section to benchmarks/RESULTS.md (``methods`` for the tiny LM,
``methods-<backbone>`` otherwise) and the figures, as JSON, to
``course/assets/results/methods-<backbone>.json``, which the notebooks plot beside their own
runs (labelled as this benchmark's, with the machine it ran on).

    python -m benchmarks.methods                                   # tiny LM, 300 steps each
    python -m benchmarks.methods --model smollm2-135m              # ~50 min on a 2-core CPU
    python -m benchmarks.methods --model smollm2-135m --device cuda
    python -m benchmarks.methods --steps prefix=600,full=200 --methods prefix,full
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import result_header, write_section

METHODS = ("prompt", "prefix", "prefix_reparam", "lora", "full")
RESULTS_DIR = Path(__file__).resolve().parents[1] / "course" / "assets" / "results"

# Per backbone: steps per method (until the curve flattens), batch size, validation examples,
# evaluation interval and learning rates (chosen on the validation split).
SETTINGS: dict[str, dict] = {
    "tiny": {
        "steps": dict.fromkeys(METHODS, 300),
        "batch": 16,
        "n_eval": 128,
        "eval_every": 50,
        "lr": {"prompt": 3e-2, "prefix": 3e-2, "prefix_reparam": 1e-3, "lora": 3e-3, "full": 1e-3},
    },
    "smollm2-135m": {
        "steps": {"prompt": 200, "prefix": 300, "prefix_reparam": 150, "lora": 150, "full": 100},
        "batch": 8,
        "n_eval": 48,
        "eval_every": 50,
        "lr": {"prompt": 3e-2, "prefix": 5e-3, "prefix_reparam": 1e-3, "lora": 2e-3, "full": 5e-5},
    },
}
PREFIX_LEN = 10
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}


def settings_for(model: str) -> dict:
    """The settings of ``model`` (a real backbone without its own entry uses SmolLM2's)."""
    return SETTINGS.get(model, SETTINGS["smollm2-135m"])


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _greedy(tok) -> dict:
    return {"do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}


def _lora_targets(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return ["c_attn"] if "c_attn" in names else ["q_proj", "v_proj"]


def run_method(
    name: str,
    model_name: str,
    steps: int,
    seed: int,
    device: str | None,
    eval_every: int,
    lr: float | None = None,
) -> dict:
    """Train ``name`` from a fresh backbone; return its row (run in a process of its own)."""
    from autograder.reference import (
        PrefixEncoder,
        SoftPrompt,
        count_trainable,
        freeze_backbone,
        generate_with_prefix,
        prefix_forward,
        prepend_prompt,
    )
    from course import batches, evaluate, load_backbone, train
    from course.data import get_task

    cfg = settings_for(model_name)
    task = get_task("data_to_text")
    train_set, val_set = task.examples("train"), task.examples("validation", n=cfg["n_eval"])
    model, tok = load_backbone(model_name, device=device)
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    total = sum(p.numel() for p in model.parameters())
    greedy = _greedy(tok)
    lr = cfg["lr"][name] if lr is None else lr

    def plain_generate(ids, mask, n):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **greedy)
        return out[:, ids.shape[1] :]

    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        params, n_train = list(model.parameters()), total

        def loss_fn(b):
            return model(**b).loss

        gen = plain_generate
    elif name == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(task_type="CAUSAL_LM", target_modules=_lora_targets(model), **LORA)
        )
        params = [p for p in model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in params)

        def loss_fn(b):
            return model(**b).loss

        gen = plain_generate
    elif name == "prompt":
        freeze_backbone(model)
        emb = model.get_input_embeddings()
        prompt = SoftPrompt(PREFIX_LEN, emb, init="vocab", seed=seed).to(dev)
        params, n_train = list(prompt.parameters()), count_trainable(prompt)

        def loss_fn(b):
            return model(**prepend_prompt(model, prompt, **b)).loss

        def gen(ids, mask, n):  # with inputs_embeds, generate returns only the new tokens
            return model.generate(
                **prepend_prompt(model, prompt, ids, mask), max_new_tokens=n, **greedy
            )
    else:
        freeze_backbone(model)
        reparam = name == "prefix_reparam"
        enc = PrefixEncoder(model.config, PREFIX_LEN, reparam=reparam, init_std=0.5, seed=seed).to(
            dev
        )
        params, n_train = list(enc.parameters()), count_trainable(enc)

        def loss_fn(b):
            return prefix_forward(model, enc, **b).loss

        def gen(ids, mask, n):
            return generate_with_prefix(model, enc, ids, mask, n, **greedy)

    data = batches(tok, train_set, cfg["batch"], seed=seed, device=dev)
    step_times: list[float] = []
    curve: list[dict] = []
    clock = {"start": 0.0, "eval": 0.0}

    def checkpoint(step: int) -> dict:
        begin = time.perf_counter()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = evaluate(task, None, tok, val_set, device=dev, show_progress=False, generate=gen)
        model.train(was_training)
        curve.append(
            {
                "step": step,
                "seconds": begin - clock["start"] - clock["eval"],
                "slot_accuracy": out["slot_accuracy"],
                "bleu": out["bleu"],
            }
        )
        clock["eval"] += time.perf_counter() - begin
        print(f"{name} step {step}: slot {out['slot_accuracy']:.1f}", flush=True)
        return out

    def timed_loss(b):
        calls = len(step_times)
        if calls == 0:
            clock["start"] = time.perf_counter()
        elif eval_every and calls % eval_every == 0:
            checkpoint(calls)  # parameters after `calls` optimizer steps
        step_times.append(time.perf_counter())
        return loss_fn(b)

    if name == "full":
        model.train()
    result = train(timed_loss, params, data, steps=steps, lr=lr, seed=seed, desc=name)
    train_s = result.seconds - clock["eval"]
    gaps = [b - a for a, b in zip(step_times, step_times[1:])]
    scores = checkpoint(steps)
    final = scores["slot_accuracy"]
    level = next(c for c in curve if c["slot_accuracy"] >= final - 1.0)
    row = {
        "method": name,
        "steps": steps,
        "lr": lr,
        "trainable": n_train,
        "pct": 100 * n_train / total,
        "step_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
        "train_s": train_s,
        "peak_mb": _peak_mb(dev),
        "level_step": level["step"],
        "level_s": level["seconds"],
        "curve": curve,
        "slot": final,
        "bleu": scores["bleu"],
        "loss": result.final_loss,
    }
    if name == "prefix_reparam":
        row["exported"] = enc.export().prefix.numel()
    return row


def untuned(model_name: str, device: str | None) -> dict:
    """The frozen backbone without any adaptation, greedy on the same examples."""
    from course import evaluate, load_backbone
    from course.data import get_task

    task = get_task("data_to_text")
    val_set = task.examples("validation", n=settings_for(model_name)["n_eval"])
    model, tok = load_backbone(model_name, device=device)
    dev = next(model.parameters()).device
    greedy = _greedy(tok)

    def gen(ids, mask, n):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **greedy)
        return out[:, ids.shape[1] :]

    with torch.no_grad():
        out = evaluate(task, None, tok, val_set, device=dev, show_progress=False, generate=gen)
    return {"slot": out["slot_accuracy"], "bleu": out["bleu"], "peak_mb": _peak_mb(dev)}


def peft_step_comparison(model_name: str, device: str | None, steps: int = 60) -> dict:
    """Median step time: hand-written prefix vs PEFT PrefixTuning, same values, interleaved."""
    from peft import PrefixTuningConfig, get_peft_model

    from autograder.reference import (
        PrefixEncoder,
        freeze_backbone,
        prefix_forward,
        prefix_to_peft_weights,
    )
    from course import batches, load_backbone
    from course.data import get_task

    model, tok = load_backbone(model_name, device=device)
    dev = next(model.parameters()).device
    freeze_backbone(model)
    task = get_task("data_to_text")
    data = batches(tok, task.examples("train"), settings_for(model_name)["batch"], device=dev)
    enc = PrefixEncoder(model.config, PREFIX_LEN, init_std=0.5).to(dev)
    peft_model = get_peft_model(
        load_backbone(model_name, device=device)[0],
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_LEN),
    )
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(
        prefix_to_peft_weights(enc.prefix.data)
    )
    opt_ours = torch.optim.AdamW(enc.parameters(), lr=1e-2)
    opt_peft = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ours, theirs = [], []
    for i in range(steps + 5):
        batch = next(data)
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            model_loss = prefix_forward(model, enc, **batch) if which == 0 else peft_model(**batch)
            opt = opt_ours if which == 0 else opt_peft
            opt.zero_grad()
            model_loss.loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:  # warm-up excluded
                (ours if which == 0 else theirs).append(time.perf_counter() - start)
    return {"ours_ms": 1000 * statistics.median(ours), "peft_ms": 1000 * statistics.median(theirs)}


# ------------------------------------------------------------------------------- driver


def _child(args: list[str]) -> dict:
    """Run ``python -m benchmarks.methods --worker ...`` and return the JSON it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "benchmarks.methods", *args, "--json", str(out)]
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[1])
        return json.loads(out.read_text())


def _parse_steps(text: str | None, defaults: dict[str, int]) -> dict[str, int]:
    steps = dict(defaults)
    if text:
        for part in text.split(","):
            if "=" in part:
                name, value = part.split("=", 1)
                if name.strip() not in METHODS:
                    raise SystemExit(f"--steps: unknown method {name!r}; known: {METHODS}")
                steps[name.strip()] = int(value)
            else:  # one number for every method
                steps = dict.fromkeys(METHODS, int(part))
    return steps


def _parse_lr(text: str) -> dict[str, float]:
    rates = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in METHODS or not value:
            raise SystemExit(f"--lr: expected method=LR with a method of {METHODS}, got {part!r}")
        rates[name.strip()] = float(value)
    return rates


def table(result: dict) -> str:
    """The markdown section for ``result`` (what :func:`main` writes)."""
    rows, base, cfg = result["rows"], result["untuned"], result["settings"]
    mem = "CUDA max allocated" if result["device"] == "cuda" else "peak RSS"
    lines = [
        f"Machine: {result['machine']}. Backbone {result['model']}, data-to-text, batch "
        f"{cfg['batch']}, prefix/prompt length {PREFIX_LEN}, LoRA r={LORA['r']} "
        f"(alpha {LORA['lora_alpha']}), {cfg['n_eval']} validation examples, seed "
        f"{result['seed']}; each method in its own process, trained for its own number of steps.",
        "",
        "| method | steps | lr | trainable params | % of model | median step (ms) "
        f"| train time (s) | {mem} (MB) | slot accuracy | BLEU | final loss "
        "| within 1 point of its final slot acc. at |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['lr']:g} | {r['trainable']:,} | {r['pct']:.2f} "
            f"| {r['step_ms']:.1f} | {r['train_s']:.1f} | {r['peak_mb']:.0f} | {r['slot']:.1f} "
            f"| {r['bleu']:.1f} | {r['loss']:.3f} | step {r['level_step']} ({r['level_s']:.0f} s) |"
        )
    lines.append(
        f"| frozen, untuned (for reference) | 0 | - | 0 | 0 | - | - | {base['peak_mb']:.0f} "
        f"| {base['slot']:.1f} | {base['bleu']:.1f} | - | - |"
    )
    steps_seen = sorted({c["step"] for r in rows for c in r["curve"]})
    lines += [
        "",
        "Slot accuracy during training (evaluation time excluded from the seconds; - where a "
        "method had stopped):",
        "",
        "| method | " + " | ".join(f"step {s}" for s in steps_seen) + " |",
        "|---|" + "---:|" * len(steps_seen),
    ]
    for r in rows:
        at = {c["step"]: c["slot_accuracy"] for c in r["curve"]}
        cells = [f"{at[s]:.1f}" if s in at else "-" for s in steps_seen]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    reparam = next((r for r in rows if r["method"] == "prefix_reparam"), None)
    if reparam is not None:
        lines += [
            "",
            f"prefix_reparam trains an MLP; after `export()` the stored prefix has "
            f"{reparam['exported']:,} parameters.",
        ]
    cmp = result.get("peft")
    if cmp:
        lines += [
            "",
            "| prefix step (same values, interleaved, median of 60) | ms |",
            "|---|---:|",
            f"| hand-written (autograder.reference) | {cmp['ours_ms']:.1f} |",
            f"| PEFT PrefixTuning | {cmp['peft_ms']:.1f} |",
            f"| ratio hand-written / PEFT | {cmp['ours_ms'] / cmp['peft_ms']:.3f} |",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2-135m', a hub id")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--steps", default=None, help="N or method=N,... (default: per backbone)")
    parser.add_argument("--lr", default=None, help="method=LR,... (default: per backbone)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peft-compare", action="store_true", help="default: tiny LM only")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.device in (None, "cpu"):
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    cfg = settings_for(args.model)
    if args.lr:
        cfg = {**cfg, "lr": {**cfg["lr"], **_parse_lr(args.lr)}}
    steps = _parse_steps(args.steps, cfg["steps"])
    if args.worker:  # one method (or the untuned baseline / PEFT comparison) in this process
        if args.worker == "untuned":
            row = untuned(args.model, args.device)
        elif args.worker == "peft":
            row = peft_step_comparison(args.model, args.device)
        else:
            row = run_method(
                args.worker, args.model, steps[args.worker], args.seed, args.device,
                cfg["eval_every"], cfg["lr"][args.worker],
            )  # fmt: skip
        Path(args.json).write_text(json.dumps(row))
        return
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    common = ["--model", args.model, "--seed", str(args.seed)]
    common += ["--steps", ",".join(f"{m}={n}" for m, n in steps.items())]
    if args.lr:
        common += ["--lr", args.lr]
    if args.device:
        common += ["--device", args.device]
    started = time.perf_counter()
    rows = []
    for name in chosen:
        rows.append(_child(["--worker", name, *common]))
        print(f"done: {name} ({time.perf_counter() - started:.0f} s so far)", flush=True)
    base = _child(["--worker", "untuned", *common])
    compare = None
    if args.peft_compare or args.model == "tiny":
        compare = _child(["--worker", "peft", *common])
    result = {
        **result_header(args.model, args.device),
        "seed": args.seed,
        "settings": {k: cfg[k] for k in ("batch", "n_eval", "eval_every", "lr")},
        "rows": rows,
        "untuned": base,
        "peft": compare,
        "wall_s": time.perf_counter() - started,
    }
    text = table(result) + f"\n\nWhole run: {result['wall_s'] / 60:.1f} min."
    print(text)
    if args.no_write:
        return
    command = f"python -m benchmarks.methods --model {args.model}" + (
        f" --device {args.device}" if args.device else ""
    )
    section = "methods" if args.model == "tiny" else f"methods-{args.model}"
    if result["device"] == "cuda":
        section += "-cuda"
    write_section(section, command, text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = f"{section}.json"
    (RESULTS_DIR / name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
