"""Prompt tuning vs prefix tuning (direct, reparameterised) vs full fine-tuning, equal steps.

On the bundled tiny LM and the data-to-text task: trainable parameters, median step time,
training time, slot accuracy and BLEU on the validation split; then, in the same run, the
step time of the course's hand-written prefix tuning against PEFT PrefixTuning's
(interleaved, so both see the same machine load). Prints a markdown table and writes it to
benchmarks/RESULTS.md (section "methods").

    python -m benchmarks.methods [--steps 400] [--n-eval 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from autograder.reference import (
    PrefixEncoder,
    SoftPrompt,
    count_trainable,
    freeze_backbone,
    generate_with_prefix,
    prefix_forward,
    prefix_to_peft_weights,
    prepend_prompt,
)
from benchmarks.common import machine_description, write_section
from course import batches, evaluate, load_backbone, train
from course.data import get_task

# Learning rates chosen on the validation split (see the table's notes).
LR = {"prompt": 3e-2, "prefix": 3e-2, "prefix_reparam": 1e-3, "full": 1e-3}


def _run(name, model, tok, task, train_set, val_set, steps, seed, device, eval_every=50):
    """Train one method from a fresh backbone; return its row."""
    total = sum(p.numel() for p in model.parameters())
    greedy = {
        "do_sample": False,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        params = [p for p in model.parameters()]
        n_train = total

        def loss_fn(b):
            return model(**b).loss

        def gen(ids, mask, n):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **greedy)
            return out[:, ids.shape[1] :]
    elif name == "prompt":
        freeze_backbone(model)
        prompt = SoftPrompt(10, model.get_input_embeddings(), init="vocab", seed=seed).to(device)
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
        enc = PrefixEncoder(model.config, 10, reparam=reparam, init_std=0.5, seed=seed).to(device)
        params = list(enc.parameters())
        n_train = count_trainable(enc)

        def loss_fn(b):
            return prefix_forward(model, enc, **b).loss

        def gen(ids, mask, n):
            return generate_with_prefix(model, enc, ids, mask, n, **greedy)

    data = batches(tok, train_set, 16, seed=seed, device=device)
    step_times: list[float] = []
    curve: list[tuple[int, float, float]] = []  # (step, training seconds so far, slot accuracy)
    clock = {"start": 0.0, "eval": 0.0}

    def score() -> dict:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = evaluate(
                task, None, tok, val_set, device=device, show_progress=False, generate=gen
            )
        model.train(was_training)
        return out

    def checkpoint(step: int) -> dict:
        begin = time.perf_counter()
        out = score()
        curve.append((step, begin - clock["start"] - clock["eval"], out["slot_accuracy"]))
        clock["eval"] += time.perf_counter() - begin
        return out

    def timed_loss(b):
        calls = len(step_times)
        if calls == 0:
            clock["start"] = time.perf_counter()
        elif eval_every and calls % eval_every == 0:
            checkpoint(calls)  # parameters after `calls` optimizer steps
        step_times.append(time.perf_counter())
        return loss_fn(b)

    result = train(timed_loss, params, data, steps=steps, lr=LR[name], seed=seed, desc=name)
    gaps = [b - a for a, b in zip(step_times, step_times[1:])]
    scores = checkpoint(steps)
    final = scores["slot_accuracy"]
    level_step, level_s, _ = next(c for c in curve if c[2] >= final - 1.0)
    row = {
        "method": name,
        "trainable": n_train,
        "pct": 100 * n_train / total,
        "step_ms": 1000 * statistics.median(gaps),
        "train_s": result.seconds - clock["eval"],
        "level_step": level_step,
        "level_s": level_s,
        "curve": curve,
        "slot": scores["slot_accuracy"],
        "bleu": scores["bleu"],
        "loss": result.final_loss,
    }
    if name == "prefix_reparam":
        row["exported"] = enc.export().prefix.numel()
    return row


@torch.no_grad()
def untuned(task, val_set, device, backbone: str = "tiny") -> dict:
    """The frozen backbone without any adaptation, greedy on the same examples."""
    model, tok = load_backbone(backbone, device=device)
    model.eval()
    greedy = {
        "do_sample": False,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
    }

    def gen(ids, mask, n):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **greedy)
        return out[:, ids.shape[1] :]

    return evaluate(task, None, tok, val_set, device=device, show_progress=False, generate=gen)


def peft_step_comparison(
    device, steps: int = 60, seed: int = 0, backbone: str = "tiny"
) -> dict[str, float]:
    """Median step time: hand-written prefix vs PEFT PrefixTuning, same values, interleaved."""
    from peft import PrefixTuningConfig, get_peft_model

    model, tok = load_backbone(backbone, device=device)
    freeze_backbone(model)
    task = get_task("data_to_text")
    data = batches(tok, task.examples("train"), 16, seed=seed, device=device)
    enc = PrefixEncoder(model.config, 10, init_std=0.5, seed=seed).to(device)
    peft_model = get_peft_model(
        load_backbone(backbone, device=device)[0],
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
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
            if which == 0:
                loss = prefix_forward(model, enc, **batch).loss
                opt_ours.zero_grad()
                loss.backward()
                opt_ours.step()
            else:
                loss = peft_model(**batch).loss
                opt_peft.zero_grad()
                loss.backward()
                opt_peft.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:  # warm-up excluded
                (ours if which == 0 else theirs).append(time.perf_counter() - start)
    return {
        "ours_ms": 1000 * statistics.median(ours),
        "peft_ms": 1000 * statistics.median(theirs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model",
        default="tiny",
        help="backbone: 'tiny' (default; the only one recorded in RESULTS.md), a folder "
        "saved with save_pretrained, or a hub id",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.device in (None, "cpu"):
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    task = get_task("data_to_text")
    train_set = task.examples("train")
    val_set = task.examples("validation", n=args.n_eval)
    rows = []
    for name in ("prompt", "prefix", "prefix_reparam", "full"):
        model, tok = load_backbone(args.model, device=args.device)
        device = next(model.parameters()).device
        rows.append(_run(name, model, tok, task, train_set, val_set, args.steps, args.seed, device))
        print(f"done: {name}", flush=True)
    cmp = peft_step_comparison(device, seed=args.seed, backbone=args.model)
    baseline = untuned(task, val_set, device, backbone=args.model)

    lines = [
        f"Machine: {machine_description(device)}. "
        f"{'Tiny LM' if args.model == 'tiny' else f'Backbone {args.model}'}, "
        f"data-to-text, {args.steps} steps, "
        f"batch 16, prefix/prompt length 10, {len(val_set)} validation examples, seed {args.seed}.",
        "",
        "| method | trainable params | % of model | median step (ms) | train time (s) "
        "| slot accuracy | BLEU | final loss | within 1 point of its final slot acc. at |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['pct']:.2f} | {r['step_ms']:.1f} "
            f"| {r['train_s']:.1f} | {r['slot']:.1f} | {r['bleu']:.1f} | {r['loss']:.3f} "
            f"| step {r['level_step']} ({r['level_s']:.0f} s) |"
        )
    lines.append(
        f"| frozen, untuned (for reference) | 0 | 0 | - | - | {baseline['slot_accuracy']:.1f} "
        f"| {baseline['bleu']:.1f} | - | - |"
    )
    reparam = next(r for r in rows if r["method"] == "prefix_reparam")
    ratio = cmp["ours_ms"] / cmp["peft_ms"]
    steps_seen = [step for step, _, _ in rows[0]["curve"]]
    lines += [
        "",
        "Slot accuracy during training (evaluation time excluded from the seconds):",
        "",
        "| method | " + " | ".join(f"step {s}" for s in steps_seen) + " |",
        "|---|" + "---:|" * len(steps_seen),
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | " + " | ".join(f"{a:.1f}" for _, _, a in r["curve"]) + " |"
        )
    lines += [
        "",
        f"prefix_reparam trains an MLP; after `export()` the stored prefix has "
        f"{reparam['exported']:,} parameters.",
        f"Learning rates: {LR}.",
        "",
        "| prefix step (same values, interleaved, median of 60) | ms |",
        "|---|---:|",
        f"| hand-written (autograder.reference) | {cmp['ours_ms']:.1f} |",
        f"| PEFT PrefixTuning | {cmp['peft_ms']:.1f} |",
        f"| ratio hand-written / PEFT | {ratio:.3f} |",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write and args.model == "tiny":
        command = f"python -m benchmarks.methods --steps {args.steps} --n-eval {args.n_eval}"
        write_section("methods", command, table)


if __name__ == "__main__":
    main()
