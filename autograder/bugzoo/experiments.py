"""Experiment mistakes (notebook 03): a method factory that trains or counts the wrong tensors,
and sweep harnesses whose comparison is not controlled (shared backbone, unequal steps, another
random state or data order per run, scores on the training split, the wrong counts)."""

from __future__ import annotations

import dataclasses

from autograder.bugzoo import Bug
from autograder.reference import Method, make_method

__all__ = ["BUGS"]

_FROZEN_BY_HAND = ("prompt", "prefix", "prefix_reparam")


# --- make_method -------------------------------------------------------------------------------
def make_method_backbone_not_frozen(name, model, tok, **options) -> Method:
    """Never freezes the backbone for the prompt and the prefixes (LoRA's get_peft_model freezes
    it by itself; full fine-tuning needs no freezing), so it stays trainable under them."""
    method = make_method(name, model, tok, **options)
    if name in _FROZEN_BY_HAND:
        for p in model.parameters():
            p.requires_grad_(True)
    return method


def make_method_lora_base_trainable(name, model, tok, **options) -> Method:
    """After get_peft_model, sets requires_grad=True on every parameter "to make sure LoRA
    trains", and trains them all: the base weights move with the adapters."""
    method = make_method(name, model, tok, **options)
    if name != "lora":
        return method
    for p in model.parameters():
        p.requires_grad_(True)
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    return dataclasses.replace(method, params=params, n_trainable=count, n_stored=count)


def make_method_lora_counts_all(name, model, tok, **options) -> Method:
    """Counts LoRA's size as every parameter of the wrapped model, the frozen base included."""
    method = make_method(name, model, tok, **options)
    if name != "lora":
        return method
    count = sum(p.numel() for p in model.parameters())
    return dataclasses.replace(method, n_trainable=count, n_stored=count)


def make_method_reparam_counts_export(name, model, tok, **options) -> Method:
    """Reports the reparameterised prefix's EXPORTED size as what it trains: the MLP that is
    trained alongside is left out of n_trainable."""
    method = make_method(name, model, tok, **options)
    if name != "prefix_reparam":
        return method
    return dataclasses.replace(method, n_trainable=method.n_stored)


def make_method_reparam_stores_mlp(name, model, tok, **options) -> Method:
    """Reports the reparameterised prefix's training size (MLP included) as what is stored per
    task, although only the exported prefix is kept."""
    method = make_method(name, model, tok, **options)
    if name != "prefix_reparam":
        return method
    return dataclasses.replace(method, n_stored=method.n_trainable)


def make_method_full_counts_state_dict(name, model, tok, **options) -> Method:
    """Counts full fine-tuning through ``model.state_dict()``, which lists a tied output head as a
    second tensor: the shared embedding is counted twice."""
    method = make_method(name, model, tok, **options)
    if name != "full":
        return method
    count = sum(t.numel() for t in model.state_dict().values())
    return dataclasses.replace(method, n_trainable=count, n_stored=count)


def make_method_prompt_generates_without_prompt(name, model, tok, **options) -> Method:
    """Trains the soft prompt, then generates from the token ids alone: the prompt is never used
    at generation time."""
    method = make_method(name, model, tok, **options)
    if name != "prompt":
        return method
    eos = tok.eos_token_id

    def generate_fn(ids, mask, n):
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=eos,
        )  # fmt: skip
        return out[:, ids.shape[1] :]

    return dataclasses.replace(method, generate_fn=generate_fn)


# --- run_sweep ---------------------------------------------------------------------------------
def _sweep(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
    *, shared_backbone=False, equal_epochs=False, count_backbone=False, eval_on_train=False,
    seed_after_build=False, reshuffle=False,
):  # fmt: skip
    """The reference harness with one of its controls switched off."""
    import torch

    import course

    rows, shared = [], None
    for i, config in enumerate(configs):
        config = dict(config)
        name, lr = config.pop("method"), config.pop("lr")
        label = config.pop("label", name)
        n_train = config.pop("n_train", None)
        if shared_backbone:
            shared = shared or load()
            model, tok = shared
        else:
            model, tok = load()
        total = sum(p.numel() for p in model.parameters())
        device = model.get_input_embeddings().weight.device
        if not seed_after_build:
            course.seed_everything(seed)
        method = make_method(name, model, tok, **config)
        if seed_after_build:
            course.seed_everything(seed)
        train = train_examples[:n_train]
        data = course.batches(
            tok, train, batch_size, seed=seed + i if reshuffle else seed, device=device
        )
        budget = max(1, round(steps * len(train) / len(train_examples))) if equal_epochs else steps
        run = course.train(method.loss_fn, method.params, data, steps=budget, lr=lr, seed=seed)
        scored = train_examples[: len(eval_examples)] if eval_on_train else eval_examples
        with torch.no_grad():
            scores = course.evaluate(
                task, None, tok, scored, device=device, show_progress=False,
                generate=method.generate_fn,
            )  # fmt: skip
        scores.pop("predictions")
        trainable = sum(p.numel() for p in model.parameters()) if count_backbone else None
        trainable = method.n_trainable if trainable is None else trainable
        rows.append(
            {
                "label": label,
                "method": name,
                "config": {"method": name, "lr": lr, "n_train": n_train, **config},
                "trainable": trainable,
                "stored": method.n_stored,
                "pct": 100 * trainable / total,
                "steps": run.steps,
                "seconds": run.seconds,
                "final_loss": run.final_loss,
                **scores,
            }
        )
    return rows


def run_sweep_shared_backbone(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Loads the backbone once, before the loop: every run adapts the model the previous runs
    left behind (fine-tuned weights, injected LoRA adapters)."""
    return _sweep(
        configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
        shared_backbone=True,
    )  # fmt: skip


def run_sweep_equal_epochs(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Scales the budget with the training set ("the same number of epochs"): a low-data run
    trains for fewer steps than the others."""
    return _sweep(
        configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
        equal_epochs=True,
    )  # fmt: skip


def run_sweep_counts_backbone(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Reports ``sum(p.numel() for p in model.parameters())`` as the trainable count: the frozen
    backbone (plus any adapters in it) instead of what is trained."""
    return _sweep(
        configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
        count_backbone=True,
    )  # fmt: skip


def run_sweep_evaluates_on_train(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Scores every run on (as many) training examples instead of the held-out ones."""
    return _sweep(
        configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
        eval_on_train=True,
    )  # fmt: skip


def run_sweep_seeds_after_building(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Seeds only after the method is built ("the training is seeded"): each method's initial
    values (LoRA's matrices, the reparameterisation MLP) come from whatever random state the
    previous run left, so no run can be repeated alone."""
    return _sweep(
        configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
        seed_after_build=True,
    )  # fmt: skip


def run_sweep_reshuffles_per_run(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Draws each run's batches with its own seed (``seed + i``): runs differ in data order as
    well as in method."""
    return _sweep(
        configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
        reshuffle=True,
    )  # fmt: skip


BUGS = [
    Bug(
        name="method_backbone_not_frozen",
        description=(
            "make_method never freezes the backbone for prompt and prefix tuning: the whole "
            "model stays trainable under a method that claims a few thousand values"
        ),
        notebook="03",
        replaces={"make_method": make_method_backbone_not_frozen},
        caught_by=("check_method_parameters",),
        message_contains="still require grad",
    ),
    Bug(
        name="method_lora_base_trainable",
        description=(
            "make_method sets requires_grad=True on every parameter after get_peft_model: LoRA's "
            "base weights train along with the adapters"
        ),
        notebook="03",
        replaces={"make_method": make_method_lora_base_trainable},
        caught_by=("check_method_parameters",),
        message_contains="base weights",
    ),
    Bug(
        name="method_lora_counts_all",
        description=(
            "make_method counts LoRA's size as every parameter of the wrapped model, the "
            "frozen base included (instead of the adapters that train)"
        ),
        notebook="03",
        replaces={"make_method": make_method_lora_counts_all},
        caught_by=("check_method_parameters",),
        message_contains="frozen base weights are not trained",
    ),
    Bug(
        name="method_reparam_counts_export",
        description=(
            "make_method reports the reparameterised prefix's exported size as n_trainable, "
            "leaving out the MLP that is trained alongside"
        ),
        notebook="03",
        replaces={"make_method": make_method_reparam_counts_export},
        caught_by=("check_method_parameters",),
        message_contains="MLP is trained too",
    ),
    Bug(
        name="method_reparam_stores_mlp",
        description=(
            "make_method reports the reparameterised prefix's training size (MLP included) as "
            "n_stored, although only the exported prefix is kept per task"
        ),
        notebook="03",
        replaces={"make_method": make_method_reparam_stores_mlp},
        caught_by=("check_method_parameters",),
        message_contains="dropped after training",
    ),
    Bug(
        name="method_full_counts_state_dict",
        description=(
            "make_method counts full fine-tuning through model.state_dict(), where a tied "
            "output head appears again: the embedding is counted twice"
        ),
        notebook="03",
        replaces={"make_method": make_method_full_counts_state_dict},
        caught_by=("check_method_parameters",),
        message_contains="count every tensor once",
    ),
    Bug(
        name="method_prompt_generates_without_prompt",
        description=(
            "make_method's prompt-tuning generate_fn calls model.generate on the token ids only: "
            "the trained soft prompt is never used when generating"
        ),
        notebook="03",
        replaces={"make_method": make_method_prompt_generates_without_prompt},
        caught_by=("check_method_functions",),
        message_contains="WITHOUT the adaptation",
    ),
    Bug(
        name="sweep_shared_backbone",
        description=(
            "run_sweep loads the backbone once: after full fine-tuning, the next method adapts "
            "the fine-tuned model, not the pretrained one"
        ),
        notebook="03",
        replaces={"run_sweep": run_sweep_shared_backbone},
        caught_by=("check_run_sweep",),
        message_contains="FRESH backbone",
    ),
    Bug(
        name="sweep_equal_epochs",
        description=(
            "run_sweep scales the step budget with the training-set size: low-data runs train "
            "fewer steps than the others"
        ),
        notebook="03",
        replaces={"run_sweep": run_sweep_equal_epochs},
        caught_by=("check_run_sweep",),
        message_contains="same step budget",
    ),
    Bug(
        name="sweep_counts_backbone",
        description=(
            "run_sweep reports the backbone's parameter count as 'trainable' instead of what the "
            "method trains"
        ),
        notebook="03",
        replaces={"run_sweep": run_sweep_counts_backbone},
        caught_by=("check_run_sweep",),
        message_contains="its n_trainable",
    ),
    Bug(
        name="sweep_evaluates_on_train",
        description="run_sweep scores every run on training examples instead of held-out ones",
        notebook="03",
        replaces={"run_sweep": run_sweep_evaluates_on_train},
        caught_by=("check_run_sweep",),
        message_contains="never on the training split",
    ),
    Bug(
        name="sweep_seeds_after_building",
        description=(
            "run_sweep seeds only after building the method: initial values depend on the runs "
            "before, so a run cannot be reproduced alone"
        ),
        notebook="03",
        replaces={"run_sweep": run_sweep_seeds_after_building},
        caught_by=("check_run_sweep",),
        message_contains="reset the seed",
    ),
    Bug(
        name="sweep_reshuffles_per_run",
        description="run_sweep draws every run's batches in a different order (seed + i)",
        notebook="03",
        replaces={"run_sweep": run_sweep_reshuffles_per_run},
        caught_by=("check_run_sweep",),
        message_contains="same seeded data order",
    ),
]
