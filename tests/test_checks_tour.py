"""The notebook-00 checks pass the solutions and fail each known-buggy twin with the right message.

The solutions are the ones in ``solutions/00_backbone_tour``; each twin makes one realistic
mistake, and two "twins" write down the answers for the fixed tiny models in advance (the drawn
architectures catch them). The twins live here rather than in the bug zoo: notebook 00's
solutions have no reference implementation in ``autograder.reference``. Every check runs at
variant 0 and at a grading variant; the judges are also fed forged and malformed observations.
"""

from __future__ import annotations

import pytest
import torch

from autograder.checks import protocol, tour
from autograder.checks.harness import variant
from autograder.reference.tour import GROUP_KEYS as GROUPS  # noqa: E402


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


def _fixed_counts() -> dict[str, dict[str, int]]:
    from autograder.checks.models import tiny_models

    return {label: count_parameters_by_group(model) for label, model in tiny_models()}


expected_counts_of_fixed_models = _fixed_counts()


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


def cache_config_constants(config, batch, seq):  # the fixed tiny models' geometry, hard-coded
    kv_heads, head_dim = (4, 8) if config.model_type == "gpt2" else (2, 16)
    return [((batch, kv_heads, seq, head_dim),) * 2 for _ in range(3)]


def count_constants(model):  # the fixed tiny models' counts, written down in advance
    gpt2 = model.config.model_type == "gpt2"
    return expected_counts_of_fixed_models["GPT-2" if gpt2 else "Llama-GQA"]


# --- tests ---------------------------------------------------------------------------------------
GRADING_VARIANT = 918273  # as in test_bugzoo: grading draws every input from a secret variant

CHECKS = {
    "count": (tour.check_count_parameters_by_group, count_parameters_by_group),
    "freeze": (tour.check_freeze_except, freeze_except),
    "hidden": (tour.check_layer_hidden_states, layer_hidden_states),
    "cache": (tour.check_predict_cache_shapes, predict_cache_shapes),
}
HALVES = {
    "count": (tour.observe_count_parameters_by_group, tour.judge_count_parameters_by_group),
    "freeze": (tour.observe_freeze_except, tour.judge_freeze_except),
    "hidden": (tour.observe_layer_hidden_states, tour.judge_layer_hidden_states),
    "cache": (tour.observe_predict_cache_shapes, tour.judge_predict_cache_shapes),
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
    ("cache", cache_config_constants, "predicted"),
    ("count", count_constants, "counts"),
]


def _run(name: str, fn, seed: int) -> None:
    if seed == 0:
        CHECKS[name][0](fn)
    else:
        protocol.run_check(*HALVES[name], fn, seed=seed)


def _observation(name: str, seed: int) -> dict:
    """What the solution's observation looks like after the trip to the grader."""
    obs = protocol.observe_safely(HALVES[name][0], (CHECKS[name][1],), seed)
    assert protocol.FAILED not in obs, obs
    return protocol.decode(*protocol.encode(obs))


def _judge(name: str, data: dict, seed: int = 0) -> None:
    protocol.judge_observation(HALVES[name][1], data, seed)


@pytest.mark.parametrize("seed", [0, GRADING_VARIANT])
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_passes_solution(name, seed):
    _run(name, CHECKS[name][1], seed)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_fails_stub(name):
    def stub(*args):
        raise NotImplementedError

    with pytest.raises(AssertionError, match="not implemented"):
        CHECKS[name][0](stub)


@pytest.mark.parametrize("seed", [0, GRADING_VARIANT])
@pytest.mark.parametrize(
    ("name", "buggy", "fragment"), tour_twins, ids=[t[1].__name__ for t in tour_twins]
)
def test_check_fails_twin(name, buggy, fragment, seed):
    with pytest.raises(AssertionError) as info:
        _run(name, buggy, seed)
    assert fragment in str(info.value), str(info.value)


def test_expected_groups_add_up(tiny_model):
    counts = tour.expected_groups(tiny_model)
    assert counts["total"] == sum(p.numel() for p in tiny_model.parameters())
    assert sum(counts[k] for k in tour.GROUP_KEYS) == counts["total"]


def test_drawn_architectures_change_with_the_variant():
    with variant(0):
        plain = tour._labels()
    with variant(GRADING_VARIANT):
        graded = tour._labels()
    assert plain[:2] == graded[:2] == ["GPT-2", "Llama-GQA"]
    assert len(plain) == len(graded) == 4 and plain[2:] != graded[2:]


# --- the judges decide from the data alone, and refuse forged observations -----------------------
def _forge_count(data):
    data["models"][2]["result"]["total"] += 1


def _forge_freeze_flags(data):
    case = data["models"][3]["cases"][1]
    case["trainable"] = case["trainable"][1:]


def _forge_freeze_values(data):
    values = data["models"][0]["values"]
    name = next(iter(values))
    values[name] = values[name] + 1e-3


def _forge_hidden(data):
    hidden = data["models"][3]["hidden"]
    hidden[1] = hidden[1] + 1e-3


def _forge_cache(data):
    shapes = data["models"][3]["sizes"][2]["shapes"]
    shapes[0][1][2] += 1


FORGERIES = [
    ("count", _forge_count),
    ("freeze", _forge_freeze_flags),
    ("freeze", _forge_freeze_values),
    ("hidden", _forge_hidden),
    ("cache", _forge_cache),
]


@pytest.mark.parametrize(("name", "forge"), FORGERIES, ids=[f.__name__ for _, f in FORGERIES])
def test_judge_refuses_a_forged_observation(name, forge):
    data = _observation(name, GRADING_VARIANT)
    _judge(name, data, GRADING_VARIANT)  # the genuine observation passes
    forge(data)
    with pytest.raises(AssertionError) as info:
        _judge(name, data, GRADING_VARIANT)
    assert not isinstance(info.value, protocol.MalformedObservation)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_an_observation_made_on_another_variant_fails(name):
    with pytest.raises(AssertionError):
        _judge(name, _observation(name, 0), GRADING_VARIANT)


@pytest.mark.parametrize(
    ("name", "field"),
    [("count", "result"), ("freeze", "typo_refused"), ("hidden", "hidden"), ("cache", "sizes")],
)
def test_judge_reports_a_missing_field_as_malformed(name, field):
    data = _observation(name, 0)
    del data["models"][1][field]
    with pytest.raises(protocol.MalformedObservation):
        _judge(name, data)
    with pytest.raises(protocol.MalformedObservation):
        _judge(name, {})


def test_judge_reports_a_mistyped_field_as_malformed():
    data = _observation("cache", 0)
    data["models"][0]["sizes"][0]["shapes"] = "[[2, 4, 5, 8]]"
    with pytest.raises(protocol.MalformedObservation):
        _judge("cache", data)
