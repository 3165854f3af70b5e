"""Synthetic tasks and corpus: interface, determinism, held-out splits, formats."""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from course import corpus, data
from course.data import ATTRIBUTES, VALUES, Example, get_task, list_tasks
from course.metrics import SLOT_PATTERNS, slot_matches

ROOT = Path(__file__).resolve().parents[1]
MR_LINE = re.compile(r"^name\[[^\]]+\]( \| [a-zA-Z ]+\[[^\]]+\])*\n$")


def _digest() -> str:
    h = hashlib.sha256()
    for name in list_tasks():
        for split in data.SPLITS:
            for ex in get_task(name).examples(split):
                h.update(json.dumps([ex.prompt, ex.target, ex.meta], sort_keys=True).encode())
    h.update("".join(corpus.documents(50, seed=3)).encode())
    return h.hexdigest()


def test_task_registry():
    assert list_tasks() == ["data_to_text", "sentiment", "topic", "question_answering"]
    assert set(data.TASKS) == set(list_tasks())
    with pytest.raises(ValueError, match="data_to_text"):
        get_task("translation")
    for name in list_tasks():
        task = get_task(name)
        assert task.name == name and task.kind in ("generation", "classification")
        assert (task.verbalizer is not None) == (task.kind == "classification")
        assert task.max_new_tokens > 0 and task.description


@pytest.mark.parametrize("name", ["data_to_text", "sentiment", "topic", "question_answering"])
def test_split_sizes_and_slicing(name):
    task = get_task(name)
    train, val, test = (task.examples(s) for s in data.SPLITS)
    assert len(train) >= 2000 and 150 <= len(val) <= 300 and 150 <= len(test) <= 300
    assert task.examples("validation", 5) == val[:5]
    assert all(isinstance(e, Example) for e in val)
    with pytest.raises(ValueError, match="split"):
        task.examples("dev")


def test_deterministic_across_processes():
    code = "from tests.test_data import _digest; print(_digest())"
    other = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == _digest()


def test_names_disjoint_across_splits():
    pools = {s: set(data.name_pool(s)) for s in data.SPLITS}
    assert not pools["train"] & pools["validation"]
    assert not pools["train"] & pools["test"]
    assert not pools["validation"] & pools["test"]
    for name in ("data_to_text", "question_answering"):
        for split in ("validation", "test"):
            used = {e.meta["slots"]["name"] for e in get_task(name).examples(split)}
            assert used <= pools[split]


@pytest.mark.parametrize("name", ["data_to_text", "sentiment", "topic", "question_answering"])
def test_held_out_inputs_unseen_in_training(name):
    task = get_task(name)
    train_prompts = {e.prompt for e in task.examples("train")}
    train_names = set(data.name_pool("train"))
    for split in ("validation", "test"):
        for ex in task.examples(split):
            assert ex.prompt not in train_prompts
            assert not any(n in ex.prompt for n in train_names if len(n) > 6), ex.prompt


def test_data_to_text_combinations_unseen():
    """No held-out record's full set of (attribute, value) pairs -- name aside -- repeats a
    training record with the same name, and no (name, food) or (name, area) pair repeats."""
    task = get_task("data_to_text")
    train = task.examples("train")
    pairs = {(e.meta["slots"]["name"], e.meta["slots"].get(a)) for e in train for a in ATTRIBUTES}
    for split in ("validation", "test"):
        for ex in task.examples(split):
            slots = ex.meta["slots"]
            assert not any((slots["name"], slots.get(a)) in pairs for a in ("food", "area"))


def test_data_to_text_format_and_references():
    task = get_task("data_to_text")
    for split in data.SPLITS:
        for ex in task.examples(split):
            assert MR_LINE.match(ex.prompt), ex.prompt
            assert ex.prompt == data.format_mr(ex.meta["slots"]) + "\n"
            assert 3 <= len(ex.meta["slots"]) <= 8
            assert ex.target == ex.meta["references"][0]
            assert not ex.target.endswith("<|endoftext|>")
    val = task.examples("validation")
    assert all(len(e.meta["references"]) == 3 for e in val)
    refs = [r for e in val for r in e.meta["references"]]
    slots = [e.meta["slots"] for e in val for _ in e.meta["references"]]
    assert all(all(slot_matches(r, s).values()) for r, s in zip(refs, slots, strict=True))
    assert task.score([e.target for e in val], val) == {"slot_accuracy": 100.0, "bleu": 100.0}
    assert task.primary_metric == "slot_accuracy"


def test_every_reference_phrase_is_recognised():
    """Realisations of many random records all match the slot rules (rules and realiser agree)."""
    rng = random.Random(7)
    for _ in range(3000):
        record = data.sample_record(rng, rng.choice(data.name_pool()))
        text = data.realise(record, rng)
        matches = slot_matches(text, record)
        assert all(matches.values()), (record, text, matches)


def test_value_sets_match_slot_rules():
    assert set(VALUES) == set(SLOT_PATTERNS)
    for attr, values in VALUES.items():
        assert set(values) == set(SLOT_PATTERNS[attr]), attr


def test_wrong_value_scores_zero_for_that_slot():
    task = get_task("data_to_text")
    ex = next(e for e in task.examples("validation") if "food" in e.meta["slots"])
    food = ex.meta["slots"]["food"]
    other = next(f for f in VALUES["food"] if f != food and f not in ex.target)
    wrong = re.sub(rf"\b{food}\b", other, ex.target)
    assert not slot_matches(wrong, ex.meta["slots"])["food"]


@pytest.mark.parametrize("name", ["sentiment", "topic"])
def test_classification_tasks(name):
    task = get_task(name)
    val = task.examples("validation")
    assert {e.target for e in val} <= set(task.verbalizer.values())
    assert all(e.target == task.verbalizer[e.meta["label"]] for e in val)
    assert all(e.prompt.endswith(" =>") for e in val)
    counts = {label: sum(e.meta["label"] == label for e in val) for label in task.verbalizer}
    assert min(counts.values()) >= len(val) / len(counts) / 2, counts
    assert task.score([e.target for e in val], val) == {"accuracy": 100.0}
    wrong = [next(w for w in task.verbalizer.values() if w != e.target) for e in val]
    assert task.score(wrong, val) == {"accuracy": 0.0}


def test_question_answering():
    task = get_task("question_answering")
    val = task.examples("validation")
    for ex in val:
        assert ex.target == " " + ex.meta["slots"][ex.meta["attribute"]]
        assert ex.prompt.endswith("\nA:")
        assert ex.prompt.split("\n")[1] in {f"Q: {q}" for q in data.QUESTIONS[ex.meta["attribute"]]}
    assert task.score([e.target for e in val], val) == {"accuracy": 100.0}
    assert task.score([e.target.upper() + ".\nQ: more" for e in val], val) == {"accuracy": 100.0}


def test_score_length_mismatch():
    task = get_task("sentiment")
    with pytest.raises(ValueError, match="predictions"):
        task.score(["great"], task.examples("validation", 2))


def test_corpus_teaches_skills_without_task_formats():
    docs = list(corpus.documents(2000, seed=0))
    assert docs == list(corpus.documents(2000, seed=0))
    text = "\n".join(docs)
    assert "name[" not in text and "] | " not in text  # no E2E meaning representations
    assert " =>" not in text and "\nQ: " not in text and "\nA:" not in text  # no task prompts
    assert "Overall: great." in text and "Verdict: terrible." in text
    assert "Posted in: service" in text and "Question: " in text
    assert corpus.generate_corpus(3).count(corpus.EOS) == 3


@pytest.mark.parametrize("name", list_tasks())
def test_a_fresh_draw_is_new_per_seed_and_held_out(name):
    task = get_task(name)
    first, again, other = (task.sample("test", 64, s) for s in (7, 7, 8))
    assert first == again and first != other and len({e.prompt for e in first}) == 64
    train = {e.prompt for e in task.examples("train")}
    assert not train & {e.prompt for e in first}
    with pytest.raises(ValueError, match="n must be"):
        task.sample("test", -1, 7)
    if name == "data_to_text":
        names = set(data.name_pool("test"))
        assert all(e.meta["slots"]["name"] in names for e in first)
        # the fixed hidden split is public (its seed is in this file): a draw shares nothing with it
        assert not {e.prompt for e in first} & {e.prompt for e in task.examples("test")}
