"""Experiment mistakes (notebook 03): a method factory that trains, counts, initialises or
generates with the wrong tensors, and sweep harnesses whose comparison is not controlled (shared
backbone, unequal steps, another random state, data order, learning rate or batch size per run,
options dropped, scores on the training split or of the bare model, the wrong counts). And
correct designs the checks must accept (``VARIANTS``)."""

from __future__ import annotations

import copy
import dataclasses
import typing

import torch
from torch import nn

from autograder.bugzoo import Bug, Variant
from autograder.reference import (
    Method,
    build_prefix_cache,
    freeze_backbone,
    generate_with_prefix,
    make_method,
    prefix_forward,
    prefix_from_peft_weights,
    prefix_to_peft_weights,
    prepend_prompt,
)
from course.compat import cache_keyword

__all__ = ["BUGS", "VARIANTS"]

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


def _closure(fn, name: str):
    """The value a reference closure captured under ``name`` (its prompt, its encoder)."""
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def _greedy(tok) -> dict:
    return {"do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}


def make_method_prompt_labels_at_end(name, model, tok, **options) -> Method:
    """Writes the prompt's forward by hand and pads the labels with -100 at the END instead of in
    front: every label moves P positions, so the prompt learns to predict the wrong tokens."""
    method = make_method(name, model, tok, **options)
    if name != "prompt":
        return method
    weight = method.params[0]

    def loss_fn(batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n, p = ids.shape[0], weight.shape[0]
        embeds = torch.cat([weight.expand(n, -1, -1), model.get_input_embeddings()(ids)], 1)
        mask = torch.cat([mask.new_ones(n, p), mask], 1)
        labels = torch.cat([labels, labels.new_full((n, p), -100)], 1)
        return model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    return dataclasses.replace(method, loss_fn=loss_fn)


def make_method_prompt_generates_with_initial_prompt(name, model, tok, **options) -> Method:
    """Precomputes the prompt's embeddings once, when the method is built, "to save time" in
    generate_fn: generation keeps using the initial prompt, never the trained one."""
    method = make_method(name, model, tok, **options)
    if name != "prompt":
        return method
    start = method.params[0].detach().clone()

    def generate_fn(ids, mask, n):
        embeds = torch.cat(
            [start.expand(ids.shape[0], -1, -1), model.get_input_embeddings()(ids)], 1
        )
        mask = torch.cat([mask.new_ones(ids.shape[0], start.shape[0]), mask], 1)
        return model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, **_greedy(tok)
        )

    return dataclasses.replace(method, generate_fn=generate_fn)


def make_method_prefix_generate_mask_not_extended(name, model, tok, **options) -> Method:
    """The prefix's generate_fn calls model.generate with the prefix cache but the prompt's own
    mask, not extended by P ones: the last P real positions are hidden, nothing errors."""
    method = make_method(name, model, tok, **options)
    if name not in ("prefix", "prefix_reparam"):
        return method
    encoder = _closure(method.loss_fn, "encoder")

    @torch.no_grad()
    def generate_fn(ids, mask, n):
        cache = build_prefix_cache(encoder(), ids.shape[0], model.dtype)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n,
            **{cache_keyword(model): cache}, **_greedy(tok),
        )  # fmt: skip
        return out[:, ids.shape[1] :]

    return dataclasses.replace(method, generate_fn=generate_fn)


def make_method_prefix_values_detached(name, model, tok, **options) -> Method:
    """Builds the cache from the encoder's keys and a DETACHED copy of its values ("only the
    keys steer attention"): the loss still has a gradient, but the prefix values never train."""
    method = make_method(name, model, tok, **options)
    if name not in ("prefix", "prefix_reparam"):
        return method
    encoder = _closure(method.loss_fn, "encoder")

    class KeysOnly(nn.Module):
        prefix_len = encoder.prefix_len

        def forward(self):
            kv = encoder()
            return torch.stack([kv[:, 0], kv[:, 1].detach()], dim=1)

    wrapped = KeysOnly()

    def loss_fn(batch):
        return prefix_forward(model, wrapped, **batch).loss

    return dataclasses.replace(method, loss_fn=loss_fn)


def make_method_lora_ignores_rank(name, model, tok, **options) -> Method:
    """Calls the reference with the default rank: LoRA's ``rank`` option is dropped."""
    if name == "lora":
        options = {k: v for k, v in options.items() if k != "rank"}
    return make_method(name, model, tok, **options)


def make_method_prompt_ignores_init(name, model, tok, **options) -> Method:
    """Never passes ``init`` on to the soft prompt: it always starts from sampled vocabulary."""
    if name == "prompt":
        options = {**options, "init": "vocab"}
    return make_method(name, model, tok, **options)


def make_method_prefix_ignores_init_text(name, model, tok, **options) -> Method:
    """Starts the direct prefix from a random draw even with ``init="text"``."""
    if name == "prefix":
        options = {**options, "init": "random"}
    return make_method(name, model, tok, **options)


# --- run_sweep ---------------------------------------------------------------------------------
def _sweep(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
    *, shared_backbone=False, equal_epochs=False, count_backbone=False, eval_on_train=False,
    seed_after_build=False, reshuffle=False, drop_options=False, one_lr=False, fixed_batch=False,
    bare_eval=False, last_loss=False,
):  # fmt: skip
    """The reference harness with one of its controls switched off."""
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
        method = make_method(name, model, tok, **({} if drop_options else config))
        if seed_after_build:
            course.seed_everything(seed)
        train = train_examples[:n_train]
        data = course.batches(
            tok, train, 8 if fixed_batch else batch_size, seed=seed + i if reshuffle else seed,
            device=device,
        )  # fmt: skip
        budget = max(1, round(steps * len(train) / len(train_examples))) if equal_epochs else steps
        lr = configs[0]["lr"] if one_lr else lr
        run = course.train(method.loss_fn, method.params, data, steps=budget, lr=lr, seed=seed)
        scored = train_examples[: len(eval_examples)] if eval_on_train else eval_examples

        def bare(ids, mask, model=model):
            return model(input_ids=ids, attention_mask=mask).logits

        forward, generate = (bare, None) if bare_eval else (None, method.generate_fn)
        with torch.no_grad():
            scores = course.evaluate(
                task, forward, tok, scored, device=device, show_progress=False, generate=generate
            )
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
                "final_loss": run.losses[-1] if last_loss else run.final_loss,
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


def run_sweep_ignores_options(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Builds every method with ``make_method(name, model, tok)``: the configuration's options
    (prefix length, MLP width, rank, init) are dropped, so an ablation compares nothing."""
    return _sweep(
        configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
        drop_options=True,
    )  # fmt: skip


def run_sweep_one_learning_rate(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Trains every run at the first configuration's learning rate."""
    return _sweep(
        configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
        one_lr=True,
    )  # fmt: skip


def run_sweep_fixed_batch_size(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Draws batches of 8 whatever ``batch_size`` says."""
    return _sweep(
        configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
        fixed_batch=True,
    )  # fmt: skip


def run_sweep_evaluates_bare_model(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Evaluates ``forward=model(...).logits``: the bare backbone, without the soft prompt or
    the prefix the run trained (they live outside the model)."""
    return _sweep(
        configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
        bare_eval=True,
    )  # fmt: skip


def run_sweep_reports_last_loss(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Reports the last step's loss as final_loss instead of the run's (averaged) final_loss."""
    return _sweep(
        configs, load, make_method, task, train_examples, eval_examples, steps, batch_size, seed,
        last_loss=True,
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
        downstream=("check_method_functions",),  # training moves the base weights it compares
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
    Bug(
        name="method_prompt_labels_at_end",
        description=(
            "make_method's prompt loss pads the labels with -100 at the end instead of in front: "
            "every label is shifted by P positions and the prompt learns the wrong targets"
        ),
        notebook="03",
        replaces={"make_method": make_method_prompt_labels_at_end},
        caught_by=("check_method_functions",),
        message_contains="in FRONT",
    ),
    Bug(
        name="method_prompt_generates_with_initial_prompt",
        description=(
            "make_method's prompt generate_fn uses the prompt's values as they were when the "
            "method was built: generation never sees the trained prompt"
        ),
        notebook="03",
        replaces={"make_method": make_method_prompt_generates_with_initial_prompt},
        caught_by=("check_method_functions",),
        message_contains="its current values",
    ),
    Bug(
        name="method_prefix_generate_mask_not_extended",
        description=(
            "make_method's prefix generate_fn passes the prefix cache but the prompt's own mask: "
            "the mask is not extended by P ones and the last P real tokens are hidden"
        ),
        notebook="03",
        replaces={"make_method": make_method_prefix_generate_mask_not_extended},
        caught_by=("check_method_functions",),
        message_contains="over any prompt or prefix positions",
    ),
    Bug(
        name="method_prefix_values_detached",
        description=(
            "make_method's prefix loss detaches the prefix values: the loss has a gradient "
            "through the keys only, and the values never train"
        ),
        notebook="03",
        replaces={"make_method": make_method_prefix_values_detached},
        caught_by=("check_method_functions",),
        message_contains="VALUES the layers receive have no gradient path",
    ),
    Bug(
        name="method_lora_ignores_rank",
        description="make_method builds LoRA at its default rank, whatever the rank option says",
        notebook="03",
        replaces={"make_method": make_method_lora_ignores_rank},
        caught_by=("check_method_functions",),
        message_contains="(the rank option)",
    ),
    Bug(
        name="method_prompt_ignores_init",
        description=(
            "make_method never passes init on to the soft prompt: it always starts from sampled "
            "vocabulary, so the initialisation ablation compares nothing"
        ),
        notebook="03",
        replaces={"make_method": make_method_prompt_ignores_init},
        caught_by=("check_method_parameters",),
        message_contains="init_text",
    ),
    Bug(
        name="method_prefix_ignores_init_text",
        description=(
            "make_method starts the direct prefix from a random draw even with init='text' "
            "(Li & Liang's real-activation initialisation is never used)"
        ),
        notebook="03",
        replaces={"make_method": make_method_prefix_ignores_init_text},
        caught_by=("check_method_parameters",),
        message_contains="prefix_from_text",
    ),
    Bug(
        name="sweep_ignores_options",
        description=(
            "run_sweep builds every method without the configuration's options: every prefix "
            "length, MLP width or rank of an ablation is the default"
        ),
        notebook="03",
        replaces={"run_sweep": run_sweep_ignores_options},
        caught_by=("check_run_sweep",),
        message_contains="pass every option of the configuration",
    ),
    Bug(
        name="sweep_one_learning_rate",
        description="run_sweep trains every run at the first configuration's learning rate",
        notebook="03",
        replaces={"run_sweep": run_sweep_one_learning_rate},
        caught_by=("check_run_sweep",),
        message_contains="its own config['lr']",
    ),
    Bug(
        name="sweep_fixed_batch_size",
        description="run_sweep draws batches of 8 whatever batch_size says",
        notebook="03",
        replaces={"run_sweep": run_sweep_fixed_batch_size},
        caught_by=("check_run_sweep",),
        message_contains="batch_size=",
    ),
    Bug(
        name="sweep_evaluates_bare_model",
        description=(
            "run_sweep scores the bare backbone's generations (forward=model): the soft prompt "
            "or prefix each run trained is never used in its evaluation"
        ),
        notebook="03",
        replaces={"run_sweep": run_sweep_evaluates_bare_model},
        caught_by=("check_run_sweep",),
        message_contains="not what its method's generate_fn generated",
    ),
    Bug(
        name="sweep_reports_last_loss",
        description="run_sweep reports the last step's loss as final_loss (not run.final_loss)",
        notebook="03",
        replaces={"run_sweep": run_sweep_reports_last_loss},
        caught_by=("check_run_sweep",),
        message_contains="run.final_loss",
    ),
]


# --- correct designs the checks must accept ----------------------------------------------------
class _MethodTuple(typing.NamedTuple):
    name: str
    params: list
    loss_fn: typing.Callable
    generate_fn: typing.Callable
    n_trainable: int
    n_stored: int


def make_method_tuple_wide_lora(name, model, tok, **options) -> _MethodTuple:
    """Returns a named tuple instead of the dataclass; LoRA on Llama also adapts the output
    projection o_proj, at PEFT's default alpha."""
    if name == "lora" and model.config.model_type != "gpt2":
        from peft import LoraConfig, get_peft_model

        freeze_backbone(model)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        get_peft_model(model, LoraConfig(r=options.get("rank", 4), target_modules=targets))
        params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)

        def loss_fn(batch):
            return model(**batch).loss

        def generate_fn(ids, mask, max_new):
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new, **_greedy(tok)
            )
            return out[:, ids.shape[1] :]

        return _MethodTuple(name, params, loss_fn, generate_fn, n, n)
    method = make_method(name, model, tok, **options)
    return _MethodTuple(*(getattr(method, f) for f in _MethodTuple._fields))


class _PeftLayoutPrefix(nn.Module):
    """A direct prefix kept in PEFT's layout ``(P, L*2*H*D)``; forward gives ``(L, 2, H, P, D)``."""

    def __init__(self, config, start: torch.Tensor) -> None:
        super().__init__()
        self.config, self.prefix_len = config, start.shape[3]
        self.embedding = nn.Parameter(prefix_to_peft_weights(start).clone())

    def forward(self) -> torch.Tensor:
        return prefix_from_peft_weights(self.embedding, self.config)


def make_method_peft_layout_prefix(name, model, tok, **options) -> Method:
    """The direct prefix is one ``(P, L*2*H*D)`` parameter, as PEFT stores it (same values)."""
    method = make_method(name, model, tok, **options)
    if name != "prefix":
        return method
    encoder = _PeftLayoutPrefix(model.config, method.params[0].detach())

    def loss_fn(batch):
        return prefix_forward(model, encoder, **batch).loss

    def generate_fn(ids, mask, n):
        return generate_with_prefix(model, encoder, ids, mask, n, **_greedy(tok))

    return dataclasses.replace(
        method, params=[encoder.embedding], loss_fn=loss_fn, generate_fn=generate_fn
    )


class _RowPrompt(nn.Module):
    """A soft prompt kept as ``P`` separate ``(d,)`` vectors; forward gives ``(B, P, d)``."""

    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.rows = nn.ParameterList([nn.Parameter(r.clone()) for r in start])

    def forward(self, batch: int) -> torch.Tensor:
        return torch.stack(list(self.rows)).unsqueeze(0).expand(batch, -1, -1)


def make_method_prompt_rows(name, model, tok, **options) -> Method:
    """The soft prompt is P separate vectors in params (same values, another layout)."""
    method = make_method(name, model, tok, **options)
    if name != "prompt":
        return method
    prompt = _RowPrompt(method.params[0].detach())

    def loss_fn(batch):
        return model(**prepend_prompt(model, prompt, **batch)).loss

    def generate_fn(ids, mask, n):
        inputs = prepend_prompt(model, prompt, ids, mask)
        return model.generate(**inputs, max_new_tokens=n, **_greedy(tok))

    return dataclasses.replace(
        method, params=list(prompt.rows), loss_fn=loss_fn, generate_fn=generate_fn
    )


def run_sweep_seeding_first(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Seeds torch alone, before loading; a percentage of the backbone with its adapters."""
    import course

    rows = []
    for config in configs:
        config = dict(config)
        name, lr = config.pop("method"), config.pop("lr")
        label, n_train = config.pop("label", name), config.pop("n_train", None)
        torch.manual_seed(seed)
        model, tok = load()
        method = make_method(name, model, tok, **config)
        total = sum(p.numel() for p in model.parameters())  # adapters included: within 2%
        data = course.batches(tok, train_examples[:n_train], batch_size, seed=seed)
        run = course.train(method.loss_fn, method.params, data, steps=steps, lr=lr, seed=seed)
        scores = course.evaluate(
            task, None, tok, eval_examples, show_progress=False, generate=method.generate_fn
        )
        rows.append(
            {
                "label": label,
                "method": name,
                "trainable": method.n_trainable,
                "stored": method.n_stored,
                "pct": 100 * method.n_trainable / total,
                "steps": run.steps,
                "seconds": run.seconds,
                **{k: v for k, v in scores.items() if k != "predictions"},
            }
        )
    return rows


def run_sweep_copies_one_load(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Loads the backbone once and adapts a deep copy of it in every run (the loaded one is never
    trained); generates two prompts at a time and scores each run once."""
    import course

    pristine, tok = load()
    total = sum(p.numel() for p in pristine.parameters())
    rows = []
    for config in configs:
        options = {k: v for k, v in config.items() if k not in ("method", "lr", "label", "n_train")}
        model = copy.deepcopy(pristine)
        course.seed_everything(seed)
        method = make_method(config["method"], model, tok, **options)
        data = course.batches(tok, train_examples[: config.get("n_train")], batch_size, seed=seed)
        run = course.train(
            method.loss_fn, method.params, data, steps=steps, lr=config["lr"], seed=seed
        )
        predictions = []
        for start in range(0, len(eval_examples), 2):
            prompts = [ex.prompt for ex in eval_examples[start : start + 2]]
            predictions += course.generate_cached(
                method.generate_fn, tok, prompts, task.max_new_tokens
            )
        rows.append(
            {
                "label": config.get("label", config["method"]),
                "method": config["method"],
                "trainable": method.n_trainable,
                "stored": method.n_stored,
                "pct": 100 * method.n_trainable / total,
                "steps": run.steps,
                "seconds": run.seconds,
                "final_loss": run.final_loss,
                **task.score(predictions, list(eval_examples)),
            }
        )
    return rows


VARIANTS = (
    Variant(
        name="method_tuple_wide_lora",
        description=(
            "make_method returns a named tuple, and LoRA on Llama adapts o_proj too at PEFT's "
            "default alpha: another legal set of adapted projections and scaling"
        ),
        notebook="03",
        replaces={"make_method": make_method_tuple_wide_lora},
    ),
    Variant(
        name="method_prefix_peft_layout",
        description=(
            "the direct prefix is trained as one (P, L*2*H*D) parameter, PEFT's layout, and "
            "reshaped to (L, 2, H, P, D) in the forward: same values, another layout"
        ),
        notebook="03",
        replaces={"make_method": make_method_peft_layout_prefix},
    ),
    Variant(
        name="method_prompt_rows",
        description="the soft prompt is P separate (d,) parameters in params, stacked when used",
        notebook="03",
        replaces={"make_method": make_method_prompt_rows},
    ),
    Variant(
        name="sweep_seeding_first",
        description=(
            "run_sweep seeds torch alone before loading (load draws nothing) and computes pct "
            "on the backbone with its adapters (within 2%)"
        ),
        notebook="03",
        replaces={"run_sweep": run_sweep_seeding_first},
    ),
    Variant(
        name="sweep_copies_one_load",
        description=(
            "run_sweep loads once and adapts a fresh deep copy in every run; it evaluates with its "
            "own loop over course.generate_cached, two prompts at a time"
        ),
        notebook="03",
        replaces={"run_sweep": run_sweep_copies_one_load},
    ),
)
