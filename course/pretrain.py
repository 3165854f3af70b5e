"""Pretrain the bundled tiny LM: ``python -m course.pretrain [--steps N] [--seed S] [--out DIR]``.

Trains a byte-level BPE tokenizer and a small GPT-2 on the synthetic corpus of
:mod:`course.corpus`, on a CPU in minutes, then saves both so that
``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` load them
exactly like a hub model. ``TRAINING.json`` next to the weights records how it was made.
``--quick`` runs a few steps on a small corpus (for tests); it is not a usable model.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from course.corpus import EOS, documents

__all__ = [
    "DEFAULT_OUT",
    "PAD",
    "PretrainConfig",
    "build_model",
    "main",
    "pretrain",
    "train_tokenizer",
]

DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / "tiny-lm"
PAD = "<pad>"


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the tiny LM (the defaults made the committed one)."""

    steps: int = 600
    seed: int = 0
    vocab_size: int = 1024
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 4
    n_positions: int = 256
    tokens_per_batch: int = 2048
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    train_docs: int = 48_000
    val_docs: int = 500
    log_every: int = 50
    threads: int = 1
    """One thread: bit-for-bit reproducible on a given CPU build of torch."""


QUICK = PretrainConfig(
    steps=4, train_docs=300, val_docs=20, vocab_size=300, tokens_per_batch=512, log_every=2
)


def train_tokenizer(
    texts: list[str], vocab_size: int, model_max_length: int
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) with ``<|endoftext|>`` (bos/eos) and ``<pad>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        padding_side="right",
        model_max_length=model_max_length,
    )


def build_model(config: PretrainConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 sized by ``config``, with tied input/output embeddings."""
    gpt2 = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    gpt2._attn_implementation = "sdpa"
    return GPT2LMHeadModel(gpt2)


def _doc_batches(
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    tokens_per_batch: int,
    max_len: int,
    generator: torch.Generator,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Documents grouped by length into right-padded ``(input_ids, attention_mask)`` batches.

    One document per row, each ending in eos, so attention never spans two documents and every
    document starts at position 0, as a task prompt does. A batch holds at most
    ``tokens_per_batch`` token slots; batches come in a random (seeded) order.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = tokenizer(texts, truncation=True, max_length=max_len - 1)["input_ids"]
    rows = [ids + [eos] for ids in encoded]
    rows.sort(key=len)
    groups: list[list[list[int]]] = [[]]
    for row in rows:  # ascending length: the newest row is the widest of its group
        if groups[-1] and (len(groups[-1]) + 1) * len(row) > tokens_per_batch:
            groups.append([])
        groups[-1].append(row)
    batches = []
    for group in groups:
        width = len(group[-1])
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, row in enumerate(group):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        batches.append((ids, mask))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def _lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _lm_loss(
    model: GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy over the real (unpadded) tokens of a batch."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction=reduction
    )


@torch.no_grad()
def _perplexity(model: GPT2LMHeadModel, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    total, count = 0.0, 0
    for ids, mask in batches:
        total += _lm_loss(model, ids, mask, reduction="sum").item()
        count += int(mask[:, 1:].sum())
    model.train()
    return math.exp(total / count)


def _log(message: str) -> None:
    print(message, flush=True)


def pretrain(config: PretrainConfig, out: Path, log: Callable[[str], None] = _log) -> dict:
    """Train the tokenizer and the model, save both to ``out``, return the training record."""
    start = time.perf_counter()
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    train_texts = list(documents(config.train_docs, seed=config.seed))
    val_texts = list(documents(config.val_docs, seed=config.seed + 1_000_003))
    tokenizer = train_tokenizer(train_texts, config.vocab_size, config.n_positions)
    generator = torch.Generator().manual_seed(config.seed)
    sizes = (config.tokens_per_batch, config.n_positions, generator)
    train_batches = _doc_batches(tokenizer, train_texts, *sizes)
    val_batches = _doc_batches(tokenizer, val_texts, *sizes)
    train_tokens = sum(int(mask.sum()) for _, mask in train_batches)
    model = build_model(config, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    epochs = config.steps / len(train_batches)
    log(
        f"corpus: {len(train_texts)} documents, {train_tokens} tokens in {len(train_batches)} "
        f"batches ({epochs:.2f} epochs); vocab {len(tokenizer)}; model {n_params:,} parameters"
    )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
        fused=True,
    )
    model.train()
    running = 0.0
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        loss = _lm_loss(model, *train_batches[step % len(train_batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            seen = (step + 1) % config.log_every or config.log_every
            log(
                f"step {step + 1}/{config.steps}  loss {running / seen:.3f}  "
                f"{time.perf_counter() - start:.0f}s"
            )
            running = 0.0
    val_ppl = _perplexity(model, val_batches)
    wall = time.perf_counter() - start
    record = {
        "seed": config.seed,
        "steps": config.steps,
        "wall_time_s": round(wall, 1),
        "val_perplexity": round(val_ppl, 3),
        "parameters": n_params,
        "corpus": {
            "train_documents": len(train_texts),
            "train_tokens": train_tokens,
            "val_documents": len(val_texts),
            "val_tokens": sum(int(mask.sum()) for _, mask in val_batches),
        },
        "config": asdict(config),
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, "
        f"{config.threads} threads ({platform.processor() or platform.system()})",
        "command": "python -m course.pretrain" + _flags(config),
    }
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"validation perplexity {val_ppl:.3f}; wall time {wall:.1f}s; saved to {out}")
    return record


def _flags(config: PretrainConfig) -> str:
    default = PretrainConfig()
    flags = ""
    if config.steps != default.steps:
        flags += f" --steps {config.steps}"
    if config.seed != default.seed:
        flags += f" --seed {config.seed}"
    return flags


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns the training record."""
    parser = argparse.ArgumentParser(prog="python -m course.pretrain", description=__doc__)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--quick", action="store_true", help="a few steps on a tiny corpus")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else PretrainConfig()
    config = replace(config, seed=args.seed)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    return pretrain(config, args.out)


if __name__ == "__main__":
    main()
