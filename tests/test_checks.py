"""The checking machinery: tiny models, the recording attention, the harness (silence, state
left untouched, messages for crashes and stubs), the generic training check, and the judges'
refusal of forged observations."""

from __future__ import annotations

import pytest
import torch
from forgery_tools import assert_forgery_refused
from forgery_tools import judge as _judge
from torch import nn

from autograder import reference
from autograder.bugzoo import graded_objects
from autograder.checks import (
    CHECKS,
    frozen,
    get_check,
    harness,
    protocol,
    recording,
)
from autograder.checks.models import KINDS, Batch, tiny_model
from course.compat import kv_geometry

# ---------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------


def test_tiny_models_are_fresh_deterministic_copies() -> None:
    a, b = tiny_model("GPT-2"), tiny_model("GPT-2")
    assert a is not b
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name
    next(a.parameters()).data.add_(1.0)
    assert not torch.equal(next(a.parameters()), next(tiny_model("GPT-2").parameters()))


def test_tiny_models_cover_gqa_and_eager() -> None:
    for kind in KINDS:
        model = tiny_model(kind)
        assert model.config._attn_implementation == "eager"
        assert sum(p.numel() for p in model.parameters()) < 100_000
    g = kv_geometry(tiny_model("Llama-GQA").config)
    assert g["n_kv_heads"] < g["n_heads"]
    assert g["head_dim"] != g["hidden_size"] // g["n_heads"]


def test_batch_is_left_padded() -> None:
    batch = Batch()
    assert batch.shape == (2, 6)
    assert batch.attention_mask[1, :2].tolist() == [0, 0]
    assert (batch.labels[batch.attention_mask == 0] == -100).all()


# ---------------------------------------------------------------------------------------------
# recording
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_recording_sees_every_layer_and_changes_nothing(kind: str) -> None:
    model = tiny_model(kind)
    g = kv_geometry(model.config)
    encoder = reference.PrefixEncoder(model.config, 4)
    batch = Batch()
    args = (model, encoder, batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        plain = reference.prefix_forward(*args).logits
        with recording.record(model) as rec:
            seen = reference.prefix_forward(*args).logits
    assert torch.equal(plain, seen)
    assert [c.layer for c in rec.calls] == list(range(g["n_layers"]))
    for call in rec.calls:
        assert (call.query_len, call.key_len) == (6, 10)
        assert call.key.shape == (2, g["n_kv_heads"], 10, g["head_dim"])
        assert torch.equal(call.key[:, :, :4], encoder()[call.layer, 0].expand(2, -1, -1, -1))
        assert call.visible()[0, 0, :5].tolist() == [True] * 5
    assert rec.positions[0][0].tolist() == list(range(4, 10))
    assert model.config._attn_implementation == "eager"
    layers = recording.decoder_layers(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert len(layers) == g["n_layers"]


def test_recording_without_prefix_has_as_many_keys_as_queries() -> None:
    model = tiny_model("Llama-GQA")
    with torch.no_grad(), recording.record(model) as rec:
        model(input_ids=Batch().input_ids)
    assert all(c.query_len == c.key_len == 6 for c in rec.calls)
    assert len(rec.layer_inputs) == len(rec.layer_outputs) == 3


# ---------------------------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------------------------


def test_student_call_turns_stubs_and_crashes_into_messages() -> None:
    def prefix_forward(*args):
        raise NotImplementedError()

    def broken(*args):
        raise ValueError("boom")

    with pytest.raises(AssertionError, match="YOUR CODE HERE cell of prefix_forward"):
        harness.student_call("prefix_forward(...)", prefix_forward)
    with pytest.raises(AssertionError, match=r"broken\(x\) raised ValueError: boom"):
        harness.student_call("broken(x)", broken)


def test_checks_are_silent_and_leave_the_session_as_it_was(capfd) -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    objects = graded_objects()
    for check in ("check_prefix_forward", "check_peft_prompt_equivalence", "check_bf16"):
        get_check(check)(*(objects[n] for n in CHECKS[check][1]))
    assert torch.equal(torch.rand(3), expected), "a check consumed the global random state"
    assert torch.get_num_threads() == threads
    out, err = capfd.readouterr()
    assert err == "" and out == ""


# ---------------------------------------------------------------------------------------------
# the generic "backbone unchanged after training" check
# ---------------------------------------------------------------------------------------------


def _soft_prompt(model: nn.Module) -> nn.Module:
    return reference.SoftPrompt(4, model.get_input_embeddings())


def _prompt_forward(model, prompt, input_ids, attention_mask, labels):
    return reference.prompt_forward(model, prompt, input_ids, attention_mask, labels)


def test_backbone_unchanged_after_training_passes_the_reference() -> None:
    frozen.check_backbone_unchanged_after_training(
        reference.freeze_backbone, _soft_prompt, _prompt_forward
    )


def test_backbone_unfrozen_after_freezing_is_caught() -> None:
    def unfreezing_prompt(model: nn.Module) -> nn.Module:
        model.lm_head.requires_grad_(True)  # "unfrozen later", before the optimizer is built
        return _soft_prompt(model)

    with pytest.raises(AssertionError, match="the backbone changed: parameter"):
        frozen.check_backbone_unchanged_after_training(
            reference.freeze_backbone, unfreezing_prompt, _prompt_forward
        )


def test_untrained_module_is_caught() -> None:
    def detached_forward(model, prompt, input_ids, attention_mask, labels):
        inputs = reference.prepend_prompt(model, prompt, input_ids, attention_mask, labels)
        inputs["inputs_embeds"] = inputs["inputs_embeds"].detach()
        return model(**inputs)

    with pytest.raises(AssertionError, match="no gradient path"):
        frozen.check_backbone_unchanged_after_training(
            reference.freeze_backbone, _soft_prompt, detached_forward
        )


# ---------------------------------------------------------------------------------------------
# prompt checks (notebook 01): judged from the observation alone, forgeries refused
# ---------------------------------------------------------------------------------------------
GRADING_VARIANT = 918273  # as in test_bugzoo

PROMPT_CHECKS = (
    "check_soft_prompt",
    "check_prepend_prompt",
    "check_prompt_equivalence",
    "check_peft_prompt_equivalence",
    "check_prompt_training",
    "check_save_load_prompt",
)


def _prompt_observation(check: str, seed: int) -> dict:
    """The reference's observation for ``check``, as the grader receives it."""
    observe, _ = protocol.resolve(check)
    objects = graded_objects()
    obs = protocol.observe_safely(observe, tuple(objects[n] for n in CHECKS[check][1]), seed)
    assert protocol.FAILED not in obs, obs
    return protocol.decode(*protocol.encode(obs))


def _nudge(tensor: torch.Tensor) -> torch.Tensor:
    return tensor + 1e-3


def _forge_text_rows(data):
    data["models"][2]["text"]["weight"] = _nudge(data["models"][2]["text"]["weight"])


def _forge_seed_swap(data):
    random = data["models"][0]["random"]
    random["again"], random["other"] = random["other"], random["again"]


def _forge_prompt_grad(data):
    data["models"][1]["random"]["grad"] = _nudge(data["models"][1]["random"]["grad"])


def _forge_vocab_rows(data):
    data["models"][1]["vocab"]["weight"] = _nudge(data["models"][1]["vocab"]["weight"])


def _forge_inputs_embeds(data):
    tensors = data["models"][1]["inputs"]["tensors"]
    tensors["inputs_embeds"] = _nudge(tensors["inputs_embeds"])


def _forge_gradient(data):
    data["models"][1]["grad"] = _nudge(data["models"][1]["grad"])


def _forge_logits(data):
    data["models"][1]["logits"] = _nudge(data["models"][1]["logits"])


def _forge_loss(data):
    data["models"][0]["loss"] = _nudge(data["models"][0]["loss"])


def _forge_kv_prefix(data):
    data["models"][0]["calls"][1]["key_len"] += 4


def _forge_trained_prompt(data):
    data["models"][1]["weight_after"] = _nudge(data["models"][1]["weight_after"])


def _forge_backbone(data):
    state = data["models"][0]["state"]
    name = next(iter(state))
    state[name] = _nudge(state[name])


def _forge_loaded_prompt(data):
    data["models"][1]["weight"] = _nudge(data["models"][1]["weight"])


def _forge_width_refusal(data):
    data["models"][0]["wide"] = "returned tensor (5, 40) float32"


PROMPT_FORGERIES = [
    ("check_soft_prompt", _forge_text_rows),
    ("check_soft_prompt", _forge_seed_swap),
    ("check_soft_prompt", _forge_prompt_grad),
    ("check_soft_prompt", _forge_vocab_rows),
    ("check_prepend_prompt", _forge_inputs_embeds),
    ("check_prepend_prompt", _forge_gradient),
    ("check_prepend_prompt", _forge_logits),
    ("check_prepend_prompt", _forge_loss),
    ("check_prepend_prompt", _forge_kv_prefix),
    ("check_prompt_equivalence", _forge_inputs_embeds),
    ("check_prompt_equivalence", _forge_logits),
    ("check_peft_prompt_equivalence", _forge_inputs_embeds),
    ("check_peft_prompt_equivalence", _forge_loss),
    ("check_prompt_training", _forge_trained_prompt),
    ("check_prompt_training", _forge_backbone),
    ("check_save_load_prompt", _forge_loaded_prompt),
    ("check_save_load_prompt", _forge_width_refusal),
]


@pytest.mark.parametrize(
    ("check", "forge"), PROMPT_FORGERIES, ids=[f"{c}-{f.__name__}" for c, f in PROMPT_FORGERIES]
)
def test_prompt_judge_refuses_a_forged_observation(check: str, forge) -> None:
    data = _prompt_observation(check, GRADING_VARIANT)
    _judge(check, data, GRADING_VARIANT)  # the genuine observation passes
    assert_forgery_refused(check, data, forge, GRADING_VARIANT)


@pytest.mark.parametrize("check", PROMPT_CHECKS)
def test_prompt_observation_made_on_another_variant_fails(check: str) -> None:
    with pytest.raises(AssertionError):
        _judge(check, _prompt_observation(check, 0), GRADING_VARIANT)


@pytest.mark.parametrize(
    ("check", "field"),
    [
        ("check_soft_prompt", "random"),
        ("check_prepend_prompt", "calls"),
        ("check_prompt_equivalence", "inputs"),
        ("check_peft_prompt_equivalence", "loss"),
        ("check_prompt_training", "weight_before"),
        ("check_save_load_prompt", "wide"),
    ],
)
def test_prompt_judge_reports_a_missing_field_as_malformed(check: str, field: str) -> None:
    data = _prompt_observation(check, 0)
    del data["models"][1][field]
    with pytest.raises(protocol.MalformedObservation):
        _judge(check, data, 0)
    with pytest.raises(protocol.MalformedObservation):
        _judge(check, {"models": []}, 0)


def test_prompt_judge_reports_a_mistyped_field_as_malformed() -> None:
    data = _prompt_observation("check_prepend_prompt", 0)
    data["models"][0]["inputs"]["tensors"]["inputs_embeds"] = [[0.0]]
    with pytest.raises(protocol.MalformedObservation):
        _judge("check_prepend_prompt", data, 0)


_KERNEL_WITHOUT_REFERENCE = """
import sys
from pathlib import Path

sys.modules["autograder.reference"] = None  # as in a grading kernel: no reference, no bug zoo
sys.modules["autograder.bugzoo"] = None
import torch

from autograder.checks import protocol, prompt


class SoftPrompt(torch.nn.Module):
    def __init__(self, n_tokens, embedding, init="random", init_ids=None, seed=0):
        super().__init__()
        table = embedding.weight.detach()
        gen = torch.Generator().manual_seed(seed)
        if init == "random":
            values = torch.randn(n_tokens, table.shape[1], generator=gen) * table.std()
        elif init == "vocab":
            values = table[torch.randint(0, table.shape[0], (n_tokens,), generator=gen)].clone()
        else:
            values = table[[init_ids[i % len(init_ids)] for i in range(n_tokens)]].clone()
        self.weight = torch.nn.Parameter(values.to(table.device, table.dtype))

    def forward(self, batch_size):
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


def prepend_prompt(model, prompt, input_ids, attention_mask, labels=None):
    embeds = model.get_input_embeddings()(input_ids)
    soft = prompt(input_ids.shape[0]).to(embeds.dtype)
    b, n = soft.shape[:2]
    out = {
        "inputs_embeds": torch.cat([soft, embeds], dim=1),
        "attention_mask": torch.cat([attention_mask.new_ones(b, n), attention_mask], 1),
    }
    if labels is not None:
        out["labels"] = torch.cat([labels.new_full((b, n), -100), labels], dim=1)
    return out


folder, seed = Path(sys.argv[1]), int(sys.argv[2])
for name, objects in (
    ("check_soft_prompt", (SoftPrompt,)),
    ("check_prepend_prompt", (prepend_prompt, SoftPrompt)),
    ("check_prompt_equivalence", (SoftPrompt, prepend_prompt)),
):
    protocol.capture(name, objects, (folder, seed))
assert "autograder.reference" not in {m for m, v in sys.modules.items() if v is not None}
"""


def test_prompt_observes_without_the_reference_and_is_judged_elsewhere(tmp_path) -> None:
    from forgery_tools import observe_in_a_fresh_kernel

    observe_in_a_fresh_kernel(_KERNEL_WITHOUT_REFERENCE, tmp_path, GRADING_VARIANT, 3)
