"""Experiments (notebook 03): every method behind one interface, and an equal-budget sweep."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel  # noqa: F401

from autograder.reference.common import count_trainable, freeze_backbone
from autograder.reference.prefix import PrefixEncoder, generate_with_prefix, prefix_forward
from autograder.reference.prompt import SoftPrompt, prepend_prompt
from course.compat import kv_geometry

# ---------------------------------------------------------------------------------------------
# Experiments (notebook 03): every method behind one interface, and an equal-budget sweep
# ---------------------------------------------------------------------------------------------
METHODS = ("prompt", "prefix", "prefix_reparam", "lora", "full")
"""The methods :func:`make_method` builds, from the fewest trained values to the most."""


@dataclass
class Method:
    """One way of adapting a backbone to a task, ready to train and to generate with.

    Attributes:
        name: one of :data:`METHODS`.
        params: the tensors the optimizer updates; nothing else may change during training.
        loss_fn: ``batch -> scalar loss``; ``batch`` holds ``input_ids``, ``attention_mask`` and
            ``labels``, each ``(B, T)`` (right-padded, ``-100`` where no loss is taken).
        generate_fn: ``(input_ids (B, T), attention_mask (B, T), max_new_tokens) -> new token
            ids (B, <= max_new_tokens)``: greedy, prompts LEFT-padded (``course.evaluate``'s
            ``generate=``).
        n_trainable: the number of values trained (a reparameterisation MLP included).
        n_stored: the number of values kept per task after training (a reparameterised prefix
            is exported without its MLP; full fine-tuning keeps a whole model).
    """

    name: str
    params: list[nn.Parameter]
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    generate_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    n_trainable: int
    n_stored: int


def lora_targets(config) -> list[str]:
    """The attention projections LoRA adapts: GPT-2's fused ``c_attn`` (query, key and value in
    one ``Conv1D``), else (Llama family) ``q_proj``, ``k_proj`` and ``v_proj``."""
    return ["c_attn"] if config.model_type == "gpt2" else ["q_proj", "k_proj", "v_proj"]


def _greedy_kwargs(model: nn.Module, tok) -> dict:
    eos = getattr(tok, "eos_token_id", None)
    eos = model.config.eos_token_id if eos is None else eos
    pad = getattr(tok, "pad_token_id", None)
    return {"do_sample": False, "pad_token_id": eos if pad is None else pad, "eos_token_id": eos}


def make_method(
    name: str,
    model: PreTrainedModel,
    tok,
    length: int = 10,
    init: str = "vocab",
    init_text: str = "",
    hidden: int = 128,
    rank: int = 4,
    init_std: float = 0.5,
    seed: int = 0,
) -> Method:
    """Adapt ``model`` with method ``name`` (one of :data:`METHODS`); returns a :class:`Method`.

    Every method but ``"full"`` freezes the whole backbone first.

    Args:
        name: ``"prompt"`` (a :class:`SoftPrompt` of ``length`` vectors, ``(P, d)``),
            ``"prefix"`` (a direct :class:`PrefixEncoder`, ``(L, 2, H, P, D)``),
            ``"prefix_reparam"`` (the same through an MLP of width ``hidden``; only the exported
            prefix is stored), ``"lora"`` (PEFT LoRA of rank ``rank`` on :func:`lora_targets`,
            in place on ``model``) or ``"full"`` (every backbone parameter).
        tok: the tokenizer: ``init_text`` and the pad / eos ids of greedy generation.
        init: the soft prompt's initialisation, ``"random"``, ``"vocab"`` or ``"text"`` (the
            embeddings of ``init_text``); for the prefixes, ``"text"`` starts from the keys and
            values the frozen model computes for ``init_text`` (direct prefix only) and anything
            else from a normal draw of std ``init_std``.
        seed: seeds the prompt's and the prefix's initial draw.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    greedy = _greedy_kwargs(model, tok)

    def plain_generate(ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **greedy)
        return out[:, ids.shape[1] :]

    def plain_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())  # tied weights appear once
        count = sum(p.numel() for p in params)
        return Method(name, params, plain_loss, plain_generate, count, count)

    freeze_backbone(model)
    device = model.get_input_embeddings().weight.device
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        gpt2 = model.config.model_type == "gpt2"
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=lora_targets(model.config),
            fan_in_fan_out=gpt2,  # GPT-2's Conv1D stores its weight as (in, out)
        )
        with warnings.catch_warnings():  # PEFT 0.21 calls a deprecated transformers 5.24 API
            warnings.simplefilter("ignore")
            get_peft_model(model, config)  # injects the adapters into model's own modules
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        count = sum(p.numel() for p in params)
        return Method(name, params, plain_loss, plain_generate, count, count)

    if name == "prompt":
        ids = tok(init_text, add_special_tokens=False)["input_ids"] if init == "text" else None
        prompt = SoftPrompt(length, model.get_input_embeddings(), init, ids, seed).to(device)

        def prompt_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(**prepend_prompt(model, prompt, **batch)).loss

        def prompt_generate(ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
            # from inputs_embeds, generate returns only the new tokens
            inputs = prepend_prompt(model, prompt, ids, mask)
            return model.generate(**inputs, max_new_tokens=n, **greedy)

        count = count_trainable(prompt)
        return Method(name, list(prompt.parameters()), prompt_loss, prompt_generate, count, count)

    reparam = name == "prefix_reparam"
    encoder = PrefixEncoder(model.config, length, reparam, hidden, init_std, seed)
    if init == "text" and not reparam:
        from course.serving import prefix_from_text

        with torch.no_grad():
            encoder.prefix.copy_(prefix_from_text(model, tok, init_text, length))
    encoder.to(device)

    def prefix_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return prefix_forward(model, encoder, **batch).loss

    def prefix_generate(ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        return generate_with_prefix(model, encoder, ids, mask, n, **greedy)

    g = kv_geometry(model.config)
    stored = g["n_layers"] * 2 * g["n_kv_heads"] * length * g["head_dim"]
    params = list(encoder.parameters())
    return Method(name, params, prefix_loss, prefix_generate, count_trainable(encoder), stored)


def run_sweep(
    configs: list[dict],
    load: Callable[[], tuple[PreTrainedModel, object]],
    make_method: Callable[..., Method],
    task,
    train_examples: list,
    eval_examples: list,
    steps: int,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict]:
    """Train and evaluate every configuration under the same budget; one row per configuration.

    For each ``config`` (``{"method": name, "lr": float}``, optionally ``"label"``, ``"n_train"``
    (train on the first ``n_train`` examples only) and any option of ``make_method``), in order:
    a FRESH backbone from ``load()``; the random state reset to ``seed``; the method built;
    exactly ``steps`` AdamW steps on batches of ``batch_size`` drawn in the same seeded order;
    greedy generation on ``eval_examples`` scored by ``task`` (``course.evaluate``).

    Returns rows ``{"label", "method", "config", "trainable", "stored", "pct", "steps",
    "seconds", "final_loss", **metrics}``: ``trainable`` and ``stored`` are the method's
    ``n_trainable`` and ``n_stored``, ``pct`` is ``100 * trainable / backbone size`` (the backbone
    as loaded), ``seconds`` the training time, ``metrics`` the task's scores.
    """
    import course

    rows = []
    for config in configs:
        config = dict(config)
        name, lr = config.pop("method"), config.pop("lr")
        label = config.pop("label", name)
        n_train = config.pop("n_train", None)
        model, tok = load()
        total = sum(p.numel() for p in model.parameters())
        device = model.get_input_embeddings().weight.device
        course.seed_everything(seed)
        method = make_method(name, model, tok, **config)
        data = course.batches(tok, train_examples[:n_train], batch_size, seed=seed, device=device)
        run = course.train(
            method.loss_fn, method.params, data, steps=steps, lr=lr, seed=seed, desc=label
        )
        with torch.no_grad():
            scores = course.evaluate(
                task, None, tok, eval_examples, device=device, show_progress=False,
                generate=method.generate_fn,
            )  # fmt: skip
        scores.pop("predictions")
        rows.append(
            {
                "label": label,
                "method": name,
                "config": {"method": name, "lr": lr, "n_train": n_train, **config},
                "trainable": method.n_trainable,
                "stored": method.n_stored,
                "pct": 100 * method.n_trainable / total,
                "steps": run.steps,
                "seconds": run.seconds,
                "final_loss": run.final_loss,
                **scores,
            }
        )
    return rows


def method_counts(
    name: str, geometry: dict[str, int], length: int, hidden: int, total: int
) -> tuple[int | None, int | None]:
    """``(n_trainable, n_stored)`` of method ``name`` on a backbone of ``total`` parameters whose
    ``course.kv_geometry`` is ``geometry``; ``None`` where it depends on the adapters (LoRA)."""
    g = geometry
    d = g["hidden_size"]
    kv = g["n_layers"] * 2 * g["n_kv_heads"] * g["head_dim"]  # one prefix position, all layers
    if name == "prompt":
        return length * d, length * d
    if name == "prefix":
        return length * kv, length * kv
    if name == "prefix_reparam":
        return length * d + d * hidden + hidden + hidden * kv + kv, length * kv
    if name == "full":
        return total, total
    return None, None
