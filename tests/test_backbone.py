"""course.backbone: loading, device choice, and the errors a newcomer can act on."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from course.backbone import (
    TINY_LM_DIR,
    BackboneError,
    check_tokenizer,
    hub_reachable,
    load_backbone,
    pick_device,
    resolve_backbone,
)


def test_tiny_loads_through_from_pretrained(tiny_lm):
    model, tok = tiny_lm
    assert model.config.model_type == "gpt2"
    assert not model.training
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert model.course_choice.is_tiny
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    size = sum(f.stat().st_size for f in TINY_LM_DIR.iterdir())
    assert size <= 10 * 2**20, f"bundled tiny LM is {size / 2**20:.1f} MB (limit 10 MB)"


def test_auto_on_cpu_is_the_tiny_lm():
    choice = resolve_backbone("auto", torch.device("cpu"))
    assert choice.is_tiny and "CPU" in choice.reason


def test_hub_offline_env_is_honoured(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert hub_reachable() is False
    assert time.perf_counter() - start < 0.5


def test_hub_id_while_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="not reachable.*name='tiny'"):
        load_backbone("gpt2", device="cpu")


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_bad_names(name):
    with pytest.raises(BackboneError, match="backbone name"):
        resolve_backbone(name, torch.device("cpu"))


def test_missing_directory():
    with pytest.raises(BackboneError, match="does not exist"):
        resolve_backbone("./no/such/model", torch.device("cpu"))


@pytest.mark.parametrize("device", ["gpu", "cuda:banana", "tpu"])
def test_unknown_device_names_the_fix(device):
    with pytest.raises(BackboneError, match="cpu"):
        pick_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_without_gpu():
    with pytest.raises(BackboneError, match="no CUDA GPU"):
        pick_device("cuda")


def test_default_device_is_available():
    assert pick_device().type in ("cpu", "cuda", "mps")


def test_unknown_dtype():
    with pytest.raises(BackboneError, match="unknown dtype"):
        load_backbone("tiny", device="cpu", dtype="float13")


def test_bf16_load(tiny_lm):
    model, _ = load_backbone("tiny", device="cpu", dtype="bf16")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def _save_llama_gqa(path, vocab: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=vocab,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)


def test_llama_gqa_directory_loads(tmp_path):
    tok = AutoTokenizer.from_pretrained(TINY_LM_DIR)
    _save_llama_gqa(tmp_path, len(tok))
    tok.save_pretrained(tmp_path)
    model, tok2 = load_backbone(str(tmp_path), device="cpu")
    assert model.config.num_key_value_heads == 2
    assert not model.course_choice.is_tiny


def test_mismatched_tokenizer_is_refused(tmp_path, tiny_lm):
    _save_llama_gqa(tmp_path, 40)  # an embedding table far smaller than the tokenizer
    with pytest.raises(BackboneError, match="different models"):
        load_backbone(str(tmp_path), device="cpu", tokenizer=str(TINY_LM_DIR))


def test_check_tokenizer_accepts_the_pair(tiny_lm):
    check_tokenizer(*tiny_lm)
