"""The notebook-00 checks pass the solutions and fail each known-buggy twin with the right message.

The solutions are the ones in ``solutions/00_backbone_tour``; each twin makes one realistic
mistake. (The twins live here rather than in the bug zoo, see ``tour_twins`` below.)
"""

from __future__ import annotations

import pytest
import torch

from autograder.checks import tour

GROUPS = tour.GROUP_KEYS


# --- solutions (as in solutions/00_backbone_tour) ---------------------------------------------
def count_parameters_by_group(model):
    counts = dict.fromkeys([*GROUPS, "total"], 0)
    for name, p in model.named_parameters():
        group = next(g for g, keys in GROUPS.items() if any(k in name for k in keys))
        counts[group] += p.numel()
        counts["total"] += p.numel()
    return counts


def freeze_except(model, names):
    matched = set()
    for pname, p in model.named_parameters():
        keep = [k for k in names if k in pname]
        matched.update(keep)
        p.requires_grad_(bool(keep))
    unmatched = [k for k in names if k not in matched]
    if unmatched:
        raise ValueError(f"no parameter name contains {unmatched}")
    return model


def layer_hidden_states(model, input_ids):
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True)
    return list(out.hidden_states)


def predict_cache_shapes(config, batch, seq):
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = (batch, kv_heads, seq, head_dim)
    return [(shape, shape) for _ in range(config.num_hidden_layers)]


# --- known-buggy twins -------------------------------------------------------------------------
def count_state_dict(model):  # counts the tied GPT-2 head twice
    counts = dict.fromkeys([*GROUPS, "total"], 0)
    for name, t in model.state_dict().items():
        group = next(g for g, keys in GROUPS.items() if any(k in name for k in keys))
        counts[group] += t.numel()
        counts["total"] += t.numel()
    return counts


def count_trainable_only(model):
    counts = dict.fromkeys([*GROUPS, "total"], 0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = next(g for g, keys in GROUPS.items() if any(k in name for k in keys))
            counts[group] += p.numel()
            counts["total"] += p.numel()
    return counts


def count_tensors(model):
    counts = dict.fromkeys([*GROUPS, "total"], 0)
    for name, _ in model.named_parameters():
        group = next(g for g, keys in GROUPS.items() if any(k in name for k in keys))
        counts[group] += 1
        counts["total"] += 1
    return counts


def count_decoder_only(model):  # walks the decoder only: misses an untied output head
    counts = dict.fromkeys([*GROUPS, "total"], 0)
    for name, p in model.base_model.named_parameters():
        group = next(g for g, keys in GROUPS.items() if any(k in name for k in keys))
        counts[group] += p.numel()
        counts["total"] += p.numel()
    return counts


def count_missing_norm(model):  # forgets "ln_": GPT-2's layer norms land elsewhere
    keys = {**GROUPS, "norm": ("norm",)}
    counts = dict.fromkeys([*GROUPS, "total"], 0)
    for name, p in model.named_parameters():
        group = next((g for g, ks in keys.items() if any(k in name for k in ks)), "mlp")
        counts[group] += p.numel()
        counts["total"] += p.numel()
    return counts


def freeze_no_unfreeze(model, names):  # never re-enables a frozen named parameter
    for pname, p in model.named_parameters():
        if not any(k in pname for k in names):
            p.requires_grad_(False)
    if not any(k in n for n, _ in model.named_parameters() for k in names):
        raise ValueError(names)
    return model


def freeze_exact(model, names):  # equality instead of substring
    found = False
    for pname, p in model.named_parameters():
        p.requires_grad_(pname in names)
        found |= pname in names
    return model


def freeze_no_return(model, names):
    freeze_except(model, names)


def freeze_silent_typo(model, names):
    for pname, p in model.named_parameters():
        p.requires_grad_(any(k in pname for k in names))
    return model


def freeze_nothing(model, names):
    return model


def hidden_without_embeddings(model, input_ids):
    return layer_hidden_states(model, input_ids)[1:]


def hidden_with_grad(model, input_ids):
    return list(model(input_ids=input_ids, output_hidden_states=True).hidden_states)


def hidden_last_only(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]


def hidden_hooked_blocks(model, input_ids):  # raw block outputs: the last one misses the final norm
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    blocks = getattr(base, "h", None) or base.layers
    outs = []
    handles = [
        b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for b in blocks
    ]
    try:
        with torch.no_grad():
            hs = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    return [hs[0], *outs]


def cache_query_heads(config, batch, seq):
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = (batch, heads, seq, head_dim)
    return [(shape, shape)] * config.num_hidden_layers


def cache_default_head_dim(config, batch, seq):
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    shape = (batch, kv, seq, config.hidden_size // heads)
    return [(shape, shape)] * config.num_hidden_layers


def cache_seq_first(config, batch, seq):
    shapes = predict_cache_shapes(config, batch, seq)
    return [((b, t, h, d), (b, t, h, d)) for (b, h, t, d), _ in shapes]


def cache_one_layer(config, batch, seq):
    return predict_cache_shapes(config, batch, seq)[:1]


# --- tests ---------------------------------------------------------------------------------------
CHECKS = {
    "count": (tour.check_count_parameters_by_group, count_parameters_by_group),
    "freeze": (tour.check_freeze_except, freeze_except),
    "hidden": (tour.check_layer_hidden_states, layer_hidden_states),
    "cache": (tour.check_predict_cache_shapes, predict_cache_shapes),
}

tour_twins = [
    # (check, buggy function, a fragment the message must contain)
    ("count", count_state_dict, "twice by state_dict"),
    ("count", count_trainable_only, "count frozen parameters too"),
    ("count", count_tensors, "TENSORS"),
    ("count", count_decoder_only, "NOT tied"),
    ("count", count_missing_norm, "FIRST group"),
    ("freeze", freeze_no_unfreeze, "requires_grad=True on the named"),
    ("freeze", freeze_exact, "SUBSTRING"),
    ("freeze", freeze_no_return, "same model object"),
    ("freeze", freeze_silent_typo, "typo"),
    ("freeze", freeze_nothing, "changed no requires_grad"),
    ("hidden", hidden_without_embeddings, "embedding output"),
    ("hidden", hidden_with_grad, "torch.no_grad"),
    ("hidden", hidden_last_only, "expected a list"),
    ("hidden", hidden_hooked_blocks, "output_hidden_states=True"),
    ("cache", cache_query_heads, "grouped-query"),
    ("cache", cache_default_head_dim, "head_dim=16 explicitly"),
    ("cache", cache_seq_first, "heads before seq"),
    ("cache", cache_one_layer, "one (key_shape, value_shape) pair per layer"),
]


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_passes_solution(name):
    check, solution = CHECKS[name]
    check(solution)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_fails_stub(name):
    check, _ = CHECKS[name]

    def stub(*args):
        raise NotImplementedError

    with pytest.raises(AssertionError, match="not implemented"):
        check(stub)


@pytest.mark.parametrize(
    ("name", "buggy", "fragment"), tour_twins, ids=[t[1].__name__ for t in tour_twins]
)
def test_check_fails_twin(name, buggy, fragment):
    check, _ = CHECKS[name]
    with pytest.raises(AssertionError) as info:
        check(buggy)
    assert fragment in str(info.value), str(info.value)


def test_expected_groups_add_up(tiny_model):
    counts = tour.expected_groups(tiny_model)
    assert counts["total"] == sum(p.numel() for p in tiny_model.parameters())
    assert sum(counts[k] for k in tour.GROUP_KEYS) == counts["total"]
