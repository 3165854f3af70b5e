"""Shared fixtures: tiny random models built from configs (no downloads, seconds on a CPU)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=4,
        vocab_size=64,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama_gqa() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(params=["gpt2", "llama_gqa"])
def tiny_model(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_gpt2() if request.param == "gpt2" else tiny_llama_gqa()


@pytest.fixture(scope="session")
def tiny_lm():
    """The bundled pretrained tiny LM and its tokenizer, on the CPU."""
    from course import load_backbone

    return load_backbone("tiny", device="cpu")
