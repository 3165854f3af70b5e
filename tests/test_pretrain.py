"""The tiny LM: the pretraining script runs, and the committed model loads like a hub model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from course.data import get_task, list_tasks
from course.pretrain import DEFAULT_OUT, main

ASSETS = DEFAULT_OUT
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def committed():
    return _load(ASSETS)


def test_quick_pretrain_saves_a_loadable_model(tmp_path, capsys):
    record = main(["--quick", "--out", str(tmp_path), "--seed", "1"])
    out = capsys.readouterr().out
    assert "validation perplexity" in out and "wall time" in out
    for name in (*FILES, "TRAINING.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "TRAINING.json").read_text())
    assert saved == record
    assert saved["seed"] == 1 and saved["steps"] > 0 and saved["val_perplexity"] > 1
    model, tokenizer = _load(tmp_path)
    assert model.config.model_type == "gpt2"
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<pad>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer("The Eagle is a pub.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_committed_assets_exist_and_are_small():
    for name in (*FILES, "TRAINING.json"):
        assert (ASSETS / name).is_file(), f"{name} missing: run python -m course.pretrain"
    assert sum(p.stat().st_size for p in ASSETS.iterdir()) <= 10 * 1024 * 1024
    record = json.loads((ASSETS / "TRAINING.json").read_text())
    for key in ("seed", "steps", "wall_time_s", "val_perplexity", "corpus", "machine"):
        assert key in record
    assert record["val_perplexity"] < 3.0


def test_committed_model_shape(committed):
    model, tokenizer = committed
    cfg = model.config
    assert model.dtype == torch.float32
    assert len(tokenizer) <= 2048
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    prefix_params = 10 * cfg.n_layer * 2 * cfg.n_embd
    assert prefix_params <= 0.01 * n_params


@pytest.mark.parametrize(
    "text",
    [
        "name[The Eagle] | priceRange[£20-25] | near[Café Rouge]\n",
        "The Golden Curry is a family-friendly Indian pub.\nIt costs more than £30. =>",
        "  Spaces,\ttabs and ünïcödé — fine.",
    ],
)
def test_tokenizer_round_trips(committed, text):
    _, tokenizer = committed
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id not in ids and tokenizer.pad_token_id not in ids


def test_task_examples_fit_the_model(committed):
    model, tokenizer = committed
    for name in list_tasks():
        task = get_task(name)
        for ex in task.examples("validation") + task.examples("train", 500):
            prompt = len(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
            target = len(tokenizer(ex.target, add_special_tokens=False)["input_ids"])
            assert target + 1 <= task.max_new_tokens, (name, ex.target)
            assert prompt + target + 1 + 20 <= model.config.n_positions  # room for 20 prefix tokens
        if task.verbalizer:
            for word in task.verbalizer.values():
                assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_committed_model_generates_domain_text(committed):
    model, tokenizer = committed
    ids = tokenizer("The Golden Eagle is a", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    text = tokenizer.decode(out[0, ids.shape[1] :])
    words = text.split()
    assert len(words) >= 3
    vocab = {"pub", "restaurant", "coffee", "shop", "food", "near", "riverside", "city", "cheap"}
    assert any(w.strip(".,").lower() in vocab for w in words), text
