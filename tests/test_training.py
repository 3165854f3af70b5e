"""course.training: batching, the loop, greedy decoding and silence under nbgrader."""

from __future__ import annotations

import pytest
import torch

from course.data import Example
from course.training import (
    batches,
    encode_examples,
    evaluate,
    greedy_generate,
    train,
)

EXAMPLES = [
    Example("name[The Eagle] | food[French]\n", "The Eagle serves French food.", {}),
    Example("name[Alimentum] | area[riverside]\n", "Alimentum is by the riverside.", {}),
    Example("name[Zizzi]\n", "Zizzi.", {}),
]


def test_labels_cover_only_target_and_eos(tiny_lm):
    _, tok = tiny_lm
    enc = encode_examples(tok, EXAMPLES)
    for i, ex in enumerate(EXAMPLES):
        n_prompt = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
        n_target = len(tok(ex.target, add_special_tokens=False)["input_ids"]) + 1
        labels = enc["labels"][i]
        assert (labels[:n_prompt] == -100).all()
        assert (labels[n_prompt : n_prompt + n_target] != -100).all()
        assert (labels[n_prompt + n_target :] == -100).all()
        assert labels[n_prompt + n_target - 1] == tok.eos_token_id
        assert enc["attention_mask"][i].sum() == n_prompt + n_target
    assert (enc["attention_mask"][:, 0] == 1).all()  # right padding


def test_batches_are_seeded_and_cover_an_epoch(tiny_lm):
    _, tok = tiny_lm
    a, b = batches(tok, EXAMPLES, 1, seed=3), batches(tok, EXAMPLES, 1, seed=3)
    first = [next(a)["input_ids"].tolist() for _ in range(3)]
    assert first == [next(b)["input_ids"].tolist() for _ in range(3)]
    assert len({str(x) for x in first}) == 3


def test_batches_reject_bad_input(tiny_lm):
    _, tok = tiny_lm
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(tok, EXAMPLES, 0))
    with pytest.raises(ValueError, match="no training examples"):
        next(batches(tok, [], 2))


def test_train_updates_only_what_it_is_given_and_learns():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3))
    other = torch.nn.Parameter(torch.ones(3))
    target = torch.tensor([1.0, -2.0, 0.5])

    def loss_fn(_batch):
        return ((w - target) ** 2).sum() + (other**2).sum()

    result = train(loss_fn, [w], [{}] * 5, steps=200, lr=0.05)
    assert result.steps == 200 and len(result.losses) == 200
    assert result.losses[-1] < 0.01 * result.losses[0] + 3.0  # `other` contributes 3 forever
    assert torch.equal(other.detach(), torch.ones(3))
    torch.testing.assert_close(w.detach(), target, atol=0.05, rtol=0)


def test_train_refuses_frozen_or_empty_params():
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        train(lambda b: frozen.sum(), [frozen], [{}], steps=1, lr=0.1)
    with pytest.raises(ValueError, match="no parameters"):
        train(lambda b: torch.tensor(0.0), [], [{}], steps=1, lr=0.1)


def test_train_stops_on_a_non_finite_loss():
    w = torch.nn.Parameter(torch.zeros(1))
    result = train(lambda b: w.sum() * float("nan"), [w], [{}], steps=5, lr=0.1)
    assert result.steps == 0 and "lower the lr" in result.stopped


def test_progress_is_silent_under_nbgrader(monkeypatch, capfd):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    w = torch.nn.Parameter(torch.zeros(1))
    train(lambda b: (w - 1).pow(2).sum(), [w], [{}], steps=20, lr=0.1)
    assert capfd.readouterr().err == ""


def test_greedy_matches_model_generate(tiny_lm):
    model, tok = tiny_lm
    prompts = ["The Eagle is", "name[Zizzi] | food[Italian]\n", "A"]

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    ours = greedy_generate(forward, tok, prompts, max_new_tokens=8)
    for prompt, text in zip(prompts, ours):
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(
            **ids,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        ref = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert text == ref


def test_evaluate_returns_metrics_and_predictions(tiny_lm):
    from course.data import get_task

    model, tok = tiny_lm
    task = get_task("data_to_text")
    val = task.examples("validation", n=4)

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    result = evaluate(task, forward, tok, val, batch_size=2)
    assert len(result["predictions"]) == 4
    assert 0.0 <= result["slot_accuracy"] <= 100.0

    def generate(ids, mask, n):  # the cached path: model.generate on left-padded prompts
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        return out[:, ids.shape[1] :]

    cached = evaluate(task, None, tok, val, batch_size=2, generate=generate)
    assert cached["predictions"] == result["predictions"], "cached and recomputed greedy agree"
    assert tok.padding_side == "right", "evaluate must restore the tokenizer's padding side"
    with pytest.raises(ValueError, match="exactly one of"):
        evaluate(task, forward, tok, val, generate=generate)


def test_train_says_when_a_one_shot_iterator_runs_out():
    w = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="ran out after 2 steps"):
        train(lambda b: (w - 1).pow(2).sum(), [w], iter([{}, {}]), steps=5, lr=0.1)


def test_a_notebook_keeps_a_line_of_text_where_the_progress_bar_was(tmp_path) -> None:
    """In a notebook the bar is a widget; once training ends it is replaced by a summary line, so
    a saved notebook holds no view of a widget that no longer exists (JupyterLab would show
    "Error displaying widget: model not found" when it is reopened)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import os, torch, course\n"
            "os.environ.pop('TQDM_DISABLE', None); os.environ.pop('NBGRADER_EXECUTION', None)\n"
            "w = torch.nn.Parameter(torch.zeros(3))\n"
            "r = course.train(lambda b: ((w - 1) ** 2).sum(), [w], [0], steps=4, lr=0.1, "
            "desc='toy')"
        )
    ]
    NotebookClient(nb, kernel_name="python3", timeout=120).execute(cwd=str(tmp_path))
    outputs = nb.cells[0].outputs
    assert [o.output_type for o in outputs] == ["display_data"], outputs
    assert set(outputs[0].data) == {"text/plain"}, outputs[0].data
    assert outputs[0].data["text/plain"].startswith("toy: 4/4 steps in ")
