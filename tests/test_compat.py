"""course.compat on the installed transformers (CI runs this file on both ends of the range)."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache

from course.compat import (
    cache_keyword,
    kv_geometry,
    make_cache,
    output_cache,
    transformers_version,
)


def test_keyword_matches_the_installed_signature(tiny_model):
    params = inspect.signature(tiny_model.forward).parameters
    kw = cache_keyword(tiny_model)
    assert kw in params
    if transformers_version() >= (5, 24, 0):
        assert kw == "cache"
    else:
        assert kw == "past_key_values"


def _kv_of(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def test_cache_built_by_make_cache_continues_a_sequence(tiny_model):
    """A cache of the first tokens' real keys/values must reproduce the logits of the full
    sequence. If the keyword were swallowed (transformers 5.17 with `cache=`), this fails."""
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (2, 9))
    first, rest = ids[:, :4], ids[:, 4:]
    with torch.no_grad():
        full = tiny_model(input_ids=ids).logits[:, 4:]
        out = tiny_model(input_ids=first, use_cache=True)
        cache = make_cache(_kv_of(output_cache(out)))
        cont = tiny_model(
            input_ids=rest,
            attention_mask=torch.ones_like(ids),
            **{cache_keyword(tiny_model): cache},
        ).logits
    torch.testing.assert_close(cont, full, rtol=0, atol=1e-5)


def test_make_cache_is_mutated_by_forward_so_build_fresh_ones(tiny_model):
    g = kv_geometry(tiny_model.config)
    layers = [
        (torch.zeros(1, g["n_kv_heads"], 3, g["head_dim"]),) * 2 for _ in range(g["n_layers"])
    ]
    cache = make_cache(layers)
    assert cache.get_seq_length() == 3
    tiny_model(input_ids=torch.tensor([[5, 6]]), **{cache_keyword(tiny_model): cache})
    assert cache.get_seq_length() == 5  # grew in place: never reuse a prefix cache


def test_make_cache_keeps_the_gradient_path(tiny_model):
    g = kv_geometry(tiny_model.config)
    shape = (1, g["n_kv_heads"], 2, g["head_dim"])
    keys = [torch.randn(shape, requires_grad=True) for _ in range(g["n_layers"])]
    cache = make_cache([(k, k * 1.0) for k in keys])
    ids = torch.tensor([[3, 4, 5]])
    out = tiny_model(
        input_ids=ids,
        attention_mask=torch.ones(1, 5, dtype=torch.long),
        **{cache_keyword(tiny_model): cache},
    )
    out.logits.sum().backward()
    assert all(k.grad is not None and k.grad.abs().sum() > 0 for k in keys)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([], "at least one layer"),
        ([(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5))], "must both be"),
        ([(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))], "must both be"),
    ],
)
def test_make_cache_rejects_bad_shapes(layers, message):
    with pytest.raises(ValueError, match=message):
        make_cache(layers)


def test_kv_geometry_gqa_and_gpt2(tiny_model):
    g = kv_geometry(tiny_model.config)
    assert g["n_layers"] == 3 and g["hidden_size"] == 32 and g["head_dim"] == 8
    expected_kv = 2 if tiny_model.config.model_type == "llama" else 4
    assert g["n_kv_heads"] == expected_kv and g["n_heads"] == 4


def test_cache_keyword_rejects_a_non_lm():
    with pytest.raises(TypeError, match="neither"):
        cache_keyword(torch.nn.Linear(2, 2))
