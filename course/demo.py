"""``python -m course demo``: prefix-tune the bundled tiny LM on data-to-text, before vs after.

The backbone stays frozen (checked bit for bit at the end); only the per-layer prefix trains.
The prefix implementation is the course's reference (``autograder.reference``), i.e. what the
students build in notebook 02.
"""

from __future__ import annotations

import time

import torch

from course.backbone import load_backbone
from course.budget import Budget
from course.data import get_task
from course.training import batches, evaluate, train

DEMO_BUDGET = Budget(cpu=400, gpu=1500)
DEMO_LR = 3e-2


def run_demo(
    model_name: str = "tiny",
    device: str | None = None,
    steps: int | None = None,
    prefix_len: int = 10,
    n_eval: int = 100,
    seed: int = 0,
    out=print,
) -> int:
    """Run the demo and print what changed; returns a process exit status."""
    from autograder.reference import (
        PrefixEncoder,
        count_trainable,
        freeze_backbone,
        generate_with_prefix,
        prefix_forward,
    )

    torch.manual_seed(seed)
    model, tok = load_backbone(model_name, device=device)
    dev = next(model.parameters()).device
    out(f"backbone: {model.course_choice.source} ({model.course_choice.reason}) on {dev}")
    task = get_task("data_to_text")
    train_set = task.examples("train")
    val_set = task.examples("validation", n=n_eval)
    steps = DEMO_BUDGET.steps(dev) if steps is None else steps

    freeze_backbone(model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    total = sum(p.numel() for p in model.parameters())

    greedy = {
        "do_sample": False,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
    }

    @torch.no_grad()
    def plain(ids, mask, n):  # model.generate with its key/value cache
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **greedy)
        return out[:, ids.shape[1] :]

    base = evaluate(task, None, tok, val_set, device=dev, generate=plain)

    encoder = PrefixEncoder(model.config, prefix_len, init_std=0.5, seed=seed).to(dev)
    n_train = count_trainable(encoder)
    out(
        f"training a {prefix_len}-token prefix: {n_train:,} parameters "
        f"({100 * n_train / total:.2f}% of {total:,}) for {steps} steps"
    )

    def loss_fn(batch):
        return prefix_forward(model, encoder, **batch).loss

    start = time.perf_counter()
    result = train(
        loss_fn,
        encoder.parameters(),
        batches(tok, train_set, batch_size=16, seed=seed, device=dev),
        steps=steps,
        lr=DEMO_LR,
        seed=seed,
        desc="prefix tuning",
    )
    seconds = time.perf_counter() - start

    @torch.no_grad()
    def with_prefix(ids, mask, n):  # the prefix as the first P entries of every layer's cache
        return generate_with_prefix(model, encoder, ids, mask, n, **greedy)

    tuned = evaluate(task, None, tok, val_set, device=dev, generate=with_prefix)
    unchanged = all(torch.equal(before[n], p) for n, p in model.state_dict().items())

    out(f"trained in {seconds:.1f} s; loss {result.losses[0]:.3f} -> {result.final_loss:.3f}")
    out("")
    for i in range(3):
        ex = val_set[i]
        out(f"input:   {ex.prompt.strip()}")
        out(f"before:  {base['predictions'][i]}")
        out(f"after:   {tuned['predictions'][i]}")
        out(f"target:  {ex.target}")
        out("")
    out(f"{'':18}{'slot accuracy':>15}{'BLEU':>8}")
    out(f"{'frozen, no prefix':18}{base['slot_accuracy']:>15.1f}{base['bleu']:>8.1f}")
    out(f"{'with prefix':18}{tuned['slot_accuracy']:>15.1f}{tuned['bleu']:>8.1f}")
    out(f"backbone bit-identical after training: {unchanged}")
    return 0 if unchanged else 1
