"""The checking machinery: tiny models, the recording attention, the harness (silence, state
left untouched, messages for crashes and stubs), the generic training check, and the guard
against monkeypatching."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from autograder import reference
from autograder.bugzoo import graded_objects
from autograder.checks import CHECKS, frozen, get_check, guard, harness, prefix, recording
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
# guard
# ---------------------------------------------------------------------------------------------


def test_guard_finds_nothing_in_a_clean_session() -> None:
    assert guard.tampering() == []


def test_fresh_module_is_a_new_copy_that_works() -> None:
    copy = guard.fresh("autograder.checks.prefix")
    assert copy is not prefix
    assert copy.reference is not reference
    assert sys.modules["autograder.checks.prefix"] is prefix
    assert sys.modules["autograder.reference"] is reference
    copy.check_build_prefix_cache(reference.build_prefix_cache)
    assert guard.tampering() == []


def test_guard_detects_a_patched_reference(monkeypatch) -> None:
    monkeypatch.setattr(reference, "prefix_forward", lambda *a, **k: None)
    with pytest.raises(AssertionError, match=r"autograder\.reference\.prefix_forward was replaced"):
        guard.fresh("autograder.checks.prefix")


def test_guard_detects_a_patched_check_method_and_constant(monkeypatch) -> None:
    monkeypatch.setattr(prefix, "check_prefix_forward", lambda *a: None)
    monkeypatch.setattr(reference.PrefixEncoder, "forward", lambda self: None)
    monkeypatch.setattr(prefix, "_ATOL", 1e9)
    problems = guard.tampering()
    assert "autograder.checks.prefix.check_prefix_forward was replaced" in problems
    assert "autograder.reference.PrefixEncoder.forward was replaced" in problems
    assert "autograder.checks.prefix._ATOL was changed" in problems


def test_guard_detects_a_replaced_module(monkeypatch) -> None:
    fake = type(sys)("autograder.checks.prefix")
    monkeypatch.setitem(sys.modules, "autograder.checks.prefix", fake)
    with pytest.raises(AssertionError, match="is not the module loaded from"):
        guard.fresh("autograder.checks.prefix")


def test_guard_detects_a_rebound_import(monkeypatch) -> None:
    monkeypatch.setattr(prefix, "student_call", lambda what, fn, *a, **k: fn(*a, **k))
    assert "autograder.checks.prefix.student_call was replaced" in guard.tampering()
