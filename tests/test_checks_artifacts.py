"""The graded-artifact checks (notebooks 01 and 02) and the hidden multiple-choice check."""

from __future__ import annotations

import pytest
import torch

import course
from autograder import answers, reference
from autograder.checks import artifacts, quiz
from course.data import get_task

N = 6


def _reference_scores(model, tok, forward, task_name="data_to_text"):
    task = get_task(task_name)
    examples = task.examples("test", N)
    out = course.evaluate(task, forward, tok, examples, show_progress=False)
    return {k: v for k, v in out.items() if k != "predictions"}


def test_prompt_artifact_scores_like_the_reference_forward(tiny_lm):
    model, tok = tiny_lm
    prompt = reference.SoftPrompt(4, model.get_input_embeddings(), init="vocab", seed=1)
    p = prompt.n_tokens

    def forward(ids, mask):
        return reference.prompt_forward(model, prompt, ids, mask).logits[:, p:]

    got = artifacts.prompt_artifact_scores(prompt, model, n=N)
    assert got == pytest.approx(_reference_scores(model, tok, forward))


def test_prefix_artifact_scores_like_the_reference_forward(tiny_lm):
    model, tok = tiny_lm
    encoder = reference.PrefixEncoder(model.config, 3, init_std=0.5, seed=1)

    def forward(ids, mask):
        return reference.prefix_forward(model, encoder, ids, mask).logits

    got = artifacts.prefix_artifact_scores(encoder, model, n=N)
    assert got == pytest.approx(_reference_scores(model, tok, forward))


def test_an_untrained_prompt_or_prefix_fails_with_its_score(tiny_lm):
    model, _ = tiny_lm
    prompt = reference.SoftPrompt(4, model.get_input_embeddings())
    with pytest.raises(AssertionError, match=r"scores slot_accuracy .* expected at least 99"):
        artifacts.check_prompt_artifact(prompt, model, threshold=99, n=N)
    encoder = reference.PrefixEncoder(model.config, 3)
    with pytest.raises(
        AssertionError, match=r"trained prefix scores slot_accuracy .*\(prefix\.pt\)"
    ):
        artifacts.check_prefix_artifact(encoder, model, threshold=99, n=N)
    assert artifacts.check_prompt_artifact(prompt, model, threshold=0, n=N) is None


def test_artifacts_for_another_backbone_are_refused(tiny_lm):
    model, _ = tiny_lm
    d = model.get_input_embeddings().weight.shape[1]

    class Wide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, d + 1))

    with pytest.raises(AssertionError, match="trained on another backbone"):
        artifacts.check_prompt_artifact(Wide(), model, threshold=0, n=N)
    wrong = reference.PrefixEncoder(model.config, 3)
    wrong.prefix = torch.nn.Parameter(wrong.prefix[:, :, :, :, :-1].detach())
    with pytest.raises(AssertionError, match="for this backbone"):
        artifacts.check_prefix_artifact(wrong, model, threshold=0, n=N)


def test_the_artifact_check_uses_a_fresh_backbone(tiny_lm):
    """A backbone changed in the kernel cannot raise the artifact's score."""
    model, _ = tiny_lm
    prompt = reference.SoftPrompt(4, model.get_input_embeddings(), init="vocab", seed=1)
    before = artifacts.prompt_artifact_scores(prompt, model, n=N)
    saved = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight.mul_(0)
        assert artifacts.prompt_artifact_scores(prompt, model, n=N) == before
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)


def test_quiz_reads_the_keys_from_disk(monkeypatch):
    qid = next(iter(answers.KEYS))
    right = next(a for a in "abcd" if answers.is_correct(qid, a))
    quiz.check_answer(qid, right)
    quiz.check_answer(qid, f" {right.upper()} ")
    wrong = next(a for a in "abcd" if a != right)
    with pytest.raises(AssertionError, match="is not the answer"):
        quiz.check_answer(qid, wrong)
    with pytest.raises(AssertionError, match="no answer given"):
        quiz.check_answer(qid, None)
    with pytest.raises(AssertionError, match="no answer key"):
        quiz.check_answer("nb99_q9", "a")
    monkeypatch.setattr(answers, "make_key", lambda *a: "same")
    monkeypatch.setattr(answers, "KEYS", {qid: "same"})
    with pytest.raises(AssertionError, match="is not the answer"):
        quiz.check_answer(qid, wrong)


def test_a_modified_notebook_backbone_is_refused(tiny_lm):
    """The notebook's own backbone must be the released one, bit for bit."""
    model, _ = tiny_lm
    prompt = reference.SoftPrompt(4, model.get_input_embeddings(), init="vocab", seed=1)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    try:
        with pytest.raises(AssertionError, match="not bit-identical to the released 'tiny'"):
            artifacts.check_prompt_artifact(prompt, model, threshold=0, n=N)
    finally:
        with torch.no_grad():
            model.lm_head.weight[0, 0] -= 1e-3


def test_a_backbone_the_grader_lacks_is_named(tiny_lm, monkeypatch):
    model, _ = tiny_lm
    prompt = reference.SoftPrompt(4, model.get_input_embeddings(), init="vocab", seed=1)
    import dataclasses

    choice = dataclasses.replace(model.course_choice, name="smollm2-135m")
    monkeypatch.setattr(model, "course_choice", choice)
    monkeypatch.setattr(artifacts, "graded_backbones", lambda: ["tiny"])
    with pytest.raises(AssertionError, match="which this grader does not have; it can score"):
        artifacts.check_prompt_artifact(prompt, model, threshold=0, n=N)


def test_stamps_round_trip_and_reject_junk(tiny_lm, tmp_path):
    from course.artifacts import read_stamp, stamp, stamp_path

    model, _ = tiny_lm
    target = tmp_path / "prompt.pt"
    assert read_stamp(target) is None
    written = stamp(target, model)
    assert written == stamp_path(target) and written.name == "prompt.pt.backbone.json"
    assert read_stamp(target)["name"] == "tiny"
    written.write_text("{not json")
    with pytest.raises(ValueError, match="not a backbone stamp"):
        read_stamp(target)
    written.write_text('{"name": 3}')
    with pytest.raises(ValueError, match="needs name"):
        read_stamp(target)


def _scored_inputs(tiny_lm, monkeypatch):
    """``score_once()`` runs ``generate_scores`` in the context in force; ``seen`` collects the
    prompts each run scored."""
    _, tok = tiny_lm
    seen: list[list[str]] = []
    real = get_task("data_to_text").score

    def score(self, predictions, examples):
        seen.append([e.prompt for e in examples])
        return real(predictions, examples)

    monkeypatch.setattr(type(get_task("data_to_text")), "score", score)
    generate = lambda ids, mask, n: ids[:, :1]  # noqa: E731
    return (lambda: artifacts.generate_scores(generate, tok, "data_to_text", N)), seen


def test_graded_scores_use_a_fresh_draw_of_hidden_inputs(tiny_lm, monkeypatch):
    """A student could train on the public test split; grading scores inputs drawn per run."""
    from autograder.checks.harness import variant

    score_once, seen = _scored_inputs(tiny_lm, monkeypatch)
    public = [e.prompt for e in get_task("data_to_text").examples("test", N)]
    score_once()
    for v in (918273, 918273, 5):
        with variant(v):
            score_once()
    assert seen[0] == public  # a student's own run: the split as published
    assert not set(seen[1]) & set(public) and seen[1] == seen[2] != seen[3]


def test_graded_scores_draw_from_the_graders_secret_not_the_variant(tiny_lm, monkeypatch):
    """A kernel knows the variant; the scored inputs come from a secret it does not know."""
    from autograder.checks.harness import variant, with_grader_secret

    score_once, seen = _scored_inputs(tiny_lm, monkeypatch)
    for secret in (11, 11, 12, None):
        with variant(918273), with_grader_secret(secret):
            score_once()
    from_secret, again, other, from_variant = seen
    assert from_secret == again != other and from_secret != from_variant
