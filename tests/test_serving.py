"""course.serving: mixed-tenant batches, the tenant registry, text-initialised prefixes and the
latency/memory measurements of notebook 04 (on tiny random models; nothing timed is asserted)."""

from __future__ import annotations

import itertools

import pytest
import torch
from matplotlib.figure import Figure

from autograder import reference
from course import serving
from course.compat import kv_geometry
from course.data import get_task


class CharTokenizer:
    """A tiny stand-in tokenizer: one id per character (mod 60, offset 3), eos 2, pad 0."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [3 + ord(c) % 60 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def test_mixed_batches_mix_tenants_and_mask_prompts() -> None:
    tasks = {"acme": get_task("sentiment"), "bistro": get_task("topic")}
    examples = {t: task.examples("train", 20) for t, task in tasks.items()}
    stream = serving.mixed_batches(CharTokenizer(), examples, batch_size=6, seed=1)
    batches = list(itertools.islice(stream, 5))
    seen = {t for b in batches for t in b["tenant_ids"]}
    assert seen == {"acme", "bistro"}
    for b in batches:
        assert len(b["tenant_ids"]) == b["input_ids"].shape[0] == 6
        assert b["labels"].shape == b["input_ids"].shape
        assert ((b["labels"] != -100) <= (b["attention_mask"] == 1)).all()
    again = next(serving.mixed_batches(CharTokenizer(), examples, batch_size=6, seed=1))
    assert again["tenant_ids"] == batches[0]["tenant_ids"]
    with pytest.raises(ValueError):
        next(serving.mixed_batches(CharTokenizer(), {"acme": []}, 2))


def test_tenant_examples_interleave() -> None:
    pairs = serving.tenant_examples(
        {"b": get_task("topic"), "a": get_task("sentiment")}, "validation", 2
    )
    assert [t for t, _ in pairs] == ["a", "b", "a", "b"]


def test_registry_loads_every_file_and_skips_other_backbones(tiny_model, tmp_path, capsys):
    g = kv_geometry(tiny_model.config)
    good = torch.randn(g["n_layers"], 2, g["n_kv_heads"], 3, g["head_dim"])
    reference.save_prefix(good, tmp_path / "acme.safetensors", {"task": "sentiment"})
    wrong = torch.randn(g["n_layers"] + 1, 2, g["n_kv_heads"], 3, g["head_dim"])
    reference.save_prefix(wrong, tmp_path / "stale.safetensors")
    prefixes, metas = serving.load_registry(tmp_path, reference.load_prefix, tiny_model.config)
    assert list(prefixes) == ["acme"] and torch.equal(prefixes["acme"], good)
    assert metas == {"acme": {"task": "sentiment"}}
    assert "skipped stale.safetensors" in capsys.readouterr().out


def test_prefix_from_text_is_the_hard_prompt_cache(tiny_model) -> None:
    tok = CharTokenizer()
    prefix = serving.prefix_from_text(tiny_model, tok, "great?")
    g = kv_geometry(tiny_model.config)
    assert prefix.shape == (g["n_layers"], 2, g["n_kv_heads"], 6, g["head_dim"])
    ids = torch.tensor([[10, 11, 12]])
    hard = tiny_model(
        input_ids=torch.cat([tok("great?", return_tensors="pt")["input_ids"], ids], 1)
    )
    with torch.no_grad():
        soft = reference.mixed_prefix_forward(
            tiny_model, {"t": prefix}, ["t"], ids, torch.ones_like(ids)
        )
    assert torch.allclose(hard.logits[:, -3:], soft.logits, atol=1e-5)


def test_latency_ms_is_a_median_of_repeats() -> None:
    calls = []
    ms = serving.latency_ms(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and ms >= 0


def test_measure_serving_covers_both_sweeps(tiny_model) -> None:
    results = serving.measure_serving(
        tiny_model, reference.mixed_prefix_forward, prompt_lens=(2, 8), tenant_counts=(1, 3),
        fixed_prompt_len=8, fixed_tenants=2, batch=3, tokens=5, repeats=1,
    )  # fmt: skip
    methods = {(r.method, r.n_tenants, r.prompt_len) for r in results}
    assert ("prompt tuning", 2, 2) in methods and ("prefix tuning", 2, 8) in methods
    assert {("fine-tuned copies", n, 8) for n in (1, 2, 3)} <= methods
    copies = {r.n_tenants: r.weights_mb for r in results if r.method == "fine-tuned copies"}
    assert copies[3] == pytest.approx(3 * copies[1])
    prefix = {r.n_tenants: r.weights_mb for r in results if r.method == "prefix tuning"}
    assert prefix[3] < copies[3] / 2
    fig = serving.plot_serving(results, fixed_prompt_len=8, fixed_tenants=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert all(r.compile_ms is None for r in results)


def test_measure_serving_adds_prompts_compiled_into_caches(tiny_model) -> None:
    seen = []

    def compile_prompt(model, prompt):
        seen.append(prompt.shape)
        return reference.soft_prompt_to_prefix(model, prompt)

    results = serving.measure_serving(
        tiny_model, reference.mixed_prefix_forward, prompt_lens=(2, 8), tenant_counts=(1, 3),
        fixed_prompt_len=8, fixed_tenants=2, batch=3, tokens=5, repeats=1,
        compile_prompt=compile_prompt,
    )  # fmt: skip
    compiled = {(r.n_tenants, r.prompt_len): r for r in results if "compiled" in r.method}
    naive = {(r.n_tenants, r.prompt_len): r for r in results if r.method == "prompt tuning"}
    assert set(compiled) == set(naive) == {(2, 2), (2, 8), (1, 8), (3, 8)}
    assert len(seen) == 2 + 2 + 1 + 3  # once per tenant per configuration, never per request
    for key, r in compiled.items():
        assert r.compile_ms is not None and r.compile_ms > 0
        assert r.weights_mb > naive[key].weights_mb  # a cache per tenant outweighs P·d vectors
    fig = serving.plot_serving(results, fixed_prompt_len=8, fixed_tenants=2)
    labels = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert any("compiled" in label for label in labels)


def test_a_compiled_prompt_serves_a_mixed_batch_like_the_prompt_itself(tiny_model) -> None:
    """What the compiled curve measures is the same computation: each row's real-token logits
    through mixed_prefix_forward with its tenant's compiled prompt equal the naive prompt's."""
    g = kv_geometry(tiny_model.config)
    gen = torch.Generator().manual_seed(3)
    prompts = {t: torch.randn(4, g["hidden_size"], generator=gen) * 0.3 for t in ("a", "b")}
    tenants = ["a", "b", "b"]
    ids = torch.randint(3, tiny_model.config.vocab_size, (3, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # left padding
    with torch.no_grad():
        naive = serving._soft_prompt_forward(tiny_model, prompts, tenants, ids, mask).logits[:, 4:]
        compiled = {t: reference.soft_prompt_to_prefix(tiny_model, v) for t, v in prompts.items()}
        served = reference.mixed_prefix_forward(tiny_model, compiled, tenants, ids, mask).logits
    real = mask.bool()
    assert (naive - served)[real].abs().max() < 5e-5
