"""The reference implementations against PEFT and against first principles."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

from autograder import reference as R
from course.compat import kv_geometry


@pytest.fixture
def batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def test_prefix_forward_equals_peft(tiny_model, batch):
    ids, mask = batch
    R.freeze_backbone(tiny_model)
    enc = R.PrefixEncoder(tiny_model.config, 5)
    ours = R.prefix_forward(tiny_model, enc, ids, mask).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            tiny_model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
        )
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(
        R.prefix_to_peft_weights(enc.prefix.data)
    )
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)


def test_prompt_equals_peft(tiny_model, batch):
    ids, mask = batch
    prompt = R.SoftPrompt(4, tiny_model.get_input_embeddings(), init="vocab")
    ours = R.prompt_forward(tiny_model, prompt, ids, mask).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            tiny_model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        )
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(prompt.weight.data)
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)


def test_peft_layout_round_trip(tiny_model):
    enc = R.PrefixEncoder(tiny_model.config, 3)
    flat = R.prefix_to_peft_weights(enc.prefix.data)
    g = kv_geometry(tiny_model.config)
    assert flat.shape == (3, g["n_layers"] * 2 * g["n_kv_heads"] * g["head_dim"])
    assert torch.equal(R.prefix_from_peft_weights(flat, tiny_model.config), enc.prefix.data)


def test_prefix_is_stateless_across_calls(tiny_model, batch):
    ids, mask = batch
    enc = R.PrefixEncoder(tiny_model.config, 5)
    first = R.prefix_forward(tiny_model, enc, ids, mask, labels=ids)
    first.loss.backward()
    second = R.prefix_forward(tiny_model, enc, ids, mask, labels=ids)
    second.loss.backward()  # a reused cache would fail here
    assert torch.equal(first.logits, second.logits)


def test_generation_agrees_with_teacher_forcing(tiny_model, batch):
    ids, mask = batch
    enc = R.PrefixEncoder(tiny_model.config, 5)
    new = R.generate_with_prefix(tiny_model, enc, ids[:1], mask[:1], max_new_tokens=6)
    full = torch.cat([ids[:1], new], dim=1)
    logits = R.prefix_forward(tiny_model, enc, full, torch.ones_like(full)).logits
    assert torch.equal(logits.argmax(-1)[:, ids.shape[1] - 1 : -1], new)


def test_reparam_export_drops_the_mlp(tiny_model):
    enc = R.PrefixEncoder(tiny_model.config, 4, reparam=True, hidden=16)
    plain = enc.export()
    assert torch.equal(plain(), enc().detach())
    g = kv_geometry(tiny_model.config)
    assert R.count_trainable(plain) == g["n_layers"] * 2 * g["n_kv_heads"] * 4 * g["head_dim"]
    assert R.count_trainable(enc) > R.count_trainable(plain)


def test_text_prompt_reproduces_the_hard_prompt(tiny_model, batch):
    ids, mask = batch
    text = [3, 4, 5, 6]
    prompt = R.SoftPrompt(4, tiny_model.get_input_embeddings(), init="text", init_ids=text)
    hard = torch.cat([torch.tensor([text] * 2), ids], dim=1)
    hard_mask = torch.cat([torch.ones(2, 4, dtype=torch.long), mask], dim=1)
    a = tiny_model(input_ids=hard, attention_mask=hard_mask).logits
    b = R.prompt_forward(tiny_model, prompt, ids, mask).logits
    assert torch.equal(a, b)


def test_random_prompt_is_at_the_scale_of_real_embeddings(tiny_model):
    emb = tiny_model.get_input_embeddings()
    prompt = R.SoftPrompt(200, emb, init="random")
    ratio = prompt.weight.std().item() / emb.weight.std().item()
    assert 0.8 < ratio < 1.2


def test_deep_prompt_reaches_every_layer(tiny_model, batch):
    ids, mask = batch
    deep = R.DeepPrompt(tiny_model.config, 3)
    out = R.deep_prompt_forward(tiny_model, deep, ids, mask, labels=ids)
    out.loss.backward()
    assert (deep.weight.grad.abs().sum(dim=(1, 2)) > 0).all()
    assert out.logits.shape[1] == 3 + ids.shape[1]


def test_bf16_backbone_accepts_an_fp32_prefix(tiny_model, batch):
    ids, mask = batch
    model = tiny_model.to(torch.bfloat16)
    enc = R.PrefixEncoder(model.config, 5)
    out = R.prefix_forward(model, enc, ids, mask)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_prefix_too_long_for_the_positions(tiny_model):
    enc = R.PrefixEncoder(tiny_model.config, 30)
    ids = torch.ones(1, 40, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        R.prefix_forward(tiny_model, enc, ids, torch.ones_like(ids))


def test_save_and_load_prompt(tmp_path, tiny_model):
    emb = tiny_model.get_input_embeddings()
    prompt = R.SoftPrompt(4, emb, init="vocab")
    path = R.save_prompt(prompt, tmp_path / "prompt.pt")
    assert torch.equal(R.load_prompt(path, emb).weight, prompt.weight)
    torch.save({"kind": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="does not hold a soft prompt"):
        R.load_prompt(tmp_path / "x.pt", emb)
