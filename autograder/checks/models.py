"""Tiny random causal LMs built from configs, and the batches the checks feed them.

Two architectures, so a check cannot pass by accident of one layout:

* **GPT-2**: 3 layers, ``d = 32``, 4 heads of 8, learned absolute positions, the output head tied
  to the token embedding.
* **Llama-GQA**: 3 layers, ``d = 32``, 4 query heads but only 2 key/value heads, an explicit
  ``head_dim = 16`` (not ``32 / 4``), rotary positions, an untied output head.

Both use eager attention, a 64-token vocabulary and weights drawn at std 0.2 (larger than the
usual 0.02, so that a wrong position, mask or prefix visibly changes the logits). A template
of each is built once per process under a fixed seed; every call returns a fresh deep copy, so
a check may freeze, cast or hook its model freely.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from autograder.checks.harness import current_variant, sandbox, seeded

__all__ = ["KINDS", "Batch", "tiny_model", "tiny_models"]

KINDS: tuple[str, ...] = ("GPT-2", "Llama-GQA")
VOCAB = 64
_COMMON = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.2}


@functools.lru_cache(maxsize=8)
def _template(kind: str, variant: int) -> PreTrainedModel:
    with sandbox():
        torch.manual_seed(seeded(0))
        if kind == "GPT-2":
            config = GPT2Config(
                vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_COMMON,
            )  # fmt: skip
            model = GPT2LMHeadModel(config)
        elif kind == "Llama-GQA":
            config = LlamaConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=64, tie_word_embeddings=False, **_COMMON,
            )  # fmt: skip
            model = LlamaForCausalLM(config)
        else:
            raise ValueError(f"unknown tiny model {kind!r}; choose one of {KINDS}")
        model.set_attn_implementation("eager")
        return model.eval()


def tiny_model(kind: str) -> PreTrainedModel:
    """A fresh copy of the tiny ``kind`` model (one of :data:`KINDS`), in eval mode, fp32."""
    return copy.deepcopy(_template(kind, current_variant()))


def tiny_models() -> Iterator[tuple[str, PreTrainedModel]]:
    """``(label, model)`` for each of :data:`KINDS`, each a fresh copy."""
    for kind in KINDS:
        yield kind, tiny_model(kind)


class Batch:
    """Token ids, attention mask and labels, all ``(B, T)``.

    Row 1 is left-padded by ``pad`` tokens (mask 0, label -100) unless ``pad`` is 0.
    """

    def __init__(self, batch: int = 2, length: int = 6, pad: int = 2, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seeded(seed))
        self.input_ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
        self.attention_mask = torch.ones(batch, length, dtype=torch.long)
        if pad and batch > 1:
            self.input_ids[1, :pad] = 0
            self.attention_mask[1, :pad] = 0
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, T)``."""
        return tuple(self.input_ids.shape)
