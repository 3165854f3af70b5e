"""Metrics: slot matching rules, corpus BLEU, accuracy."""

from __future__ import annotations

import math
import random

import pytest

from course.metrics import (
    accuracy,
    answer_accuracy,
    corpus_bleu,
    first_word,
    normalise_answer,
    slot_accuracy,
    slot_matches,
    tokenize_bleu,
)

RECORD = {
    "name": "The Eagle",
    "eatType": "pub",
    "food": "French",
    "priceRange": "high",
    "customer rating": "low",
    "area": "riverside",
    "familyFriendly": "no",
    "near": "Burger King",
}
GOOD = (
    "The Eagle is an expensive French pub by the riverside near Burger King. "
    "It has a low customer rating and is not family-friendly."
)


def test_all_slots_realised():
    assert slot_matches(GOOD, RECORD) == {a: True for a in RECORD}
    assert slot_accuracy([GOOD], [RECORD]) == 100.0


@pytest.mark.parametrize(
    ("attr", "value", "text", "expected"),
    [
        ("familyFriendly", "yes", "It is family-friendly.", True),
        ("familyFriendly", "yes", "It is not family-friendly.", False),
        ("familyFriendly", "no", "It is not kid friendly.", True),
        ("familyFriendly", "no", "It is for adults only.", True),
        ("familyFriendly", "no", "It welcomes families.", False),
        ("familyFriendly", "yes", "It isn't child-friendly.", False),
        ("priceRange", "high", "It has a high customer rating.", False),
        ("priceRange", "high", "A high-priced pub.", True),
        ("priceRange", "cheap", "It is inexpensive.", True),
        ("priceRange", "high", "It is inexpensive.", False),
        ("priceRange", "£20-25", "Meals cost £20-25.", True),
        ("priceRange", "less than £20", "Meals cost under £20.", True),
        ("priceRange", "cheap", "It is cheap, no, expensive.", False),  # conflicting values
        ("customer rating", "high", "It is expensive.", False),
        ("customer rating", "high", "It is highly rated.", True),
        ("customer rating", "5 out of 5", "Customers rate it 5 out of 5.", True),
        ("customer rating", "1 out of 5", "Customers rate it 5 out of 5.", False),
        ("area", "city centre", "It is in the centre of the city.", True),
        ("area", "riverside", "In the city centre by the riverside.", False),
        ("food", "French", "It serves French food.", True),
        ("food", "French", "It serves French and Italian food.", False),
        ("food", "fast food", "It serves fast food.", True),
        ("eatType", "coffee shop", "A coffee shop in town.", True),
        ("eatType", "pub", "A coffee shop in town.", False),
        ("near", "Burger King", "It is close to Burger King.", True),
        ("near", "Burger King", "Burger King is a pub.", False),
        ("name", "The Eagle", "the eagle is a pub.", True),
        ("name", "The Eagle", "The Eagles is a pub.", False),
    ],
)
def test_slot_rules(attr, value, text, expected):
    assert slot_matches(text, {attr: value})[attr] is expected


def test_slot_accuracy_is_micro_average():
    records = [
        {"name": "A", "food": "French"},
        {"name": "B", "area": "riverside", "eatType": "pub"},
    ]
    preds = ["A serves Italian food.", "B is a pub by the riverside."]
    assert slot_accuracy(preds, records) == pytest.approx(100 * 4 / 5)


def test_slot_rules_reject_unknown():
    with pytest.raises(ValueError, match="attribute"):
        slot_matches("x", {"colour": "red"})
    with pytest.raises(ValueError, match="priceRange"):
        slot_matches("x", {"priceRange": "free"})
    with pytest.raises(ValueError, match="predictions"):
        slot_accuracy(["a"], [])


def test_bleu_tokenisation():
    assert tokenize_bleu("It costs £20-25, really.") == [
        "It", "costs", "£", "20", "-", "25", ",", "really", ".",
    ]  # fmt: skip


def test_bleu_identity_and_zero():
    refs = [["The Eagle is a pub."], ["It serves French food near the river."]]
    hyps = [r[0] for r in refs]
    assert corpus_bleu(hyps, refs) == pytest.approx(100.0)
    assert corpus_bleu(["", ""], refs) == 0.0
    assert corpus_bleu(["the the the the"], [["the cat"]]) == 0.0  # clipped, no bigram match


def test_bleu_brevity_penalty_by_hand():
    hyp = "the cat sat on the mat"
    ref = "the cat sat on the mat today"  # all n-grams match; 6 vs 7 tokens
    assert corpus_bleu([hyp], [[ref]]) == pytest.approx(100 * math.exp(1 - 7 / 6))
    # the closest reference length is used: with a 6-token reference there is no penalty
    assert corpus_bleu([hyp], [[ref, "a b c d e f"]]) == pytest.approx(100.0)


def test_bleu_precisions_by_hand():
    hyp = "a b c d e x"
    ref = "a b c d e f"
    # 1-grams 5/6, 2-grams 4/5, 3-grams 3/4, 4-grams 2/3; equal lengths, no penalty
    expected = 100 * math.exp(
        (math.log(5 / 6) + math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3)) / 4
    )
    assert corpus_bleu([hyp], [[ref]]) == pytest.approx(expected)


def test_bleu_is_corpus_level_not_sentence_average():
    hyps, refs = ["a b c d", "x y"], [["a b c d"], ["x z"]]
    # bigram "x y" has no match, but corpus counts still have bigram matches: not zero
    expected = 100 * math.exp(
        (math.log(5 / 6) + math.log(3 / 4) + math.log(2 / 2) + math.log(1 / 1)) / 4
    )
    assert corpus_bleu(hyps, refs) == pytest.approx(expected)
    with pytest.raises(ValueError, match="reference"):
        corpus_bleu(["a"], [[]])


def test_accuracy_first_word():
    assert first_word("  Great! It was") == "great"
    assert accuracy(
        [" great", "terrible.", " food"], [" great", " great", " food"]
    ) == pytest.approx(100 * 2 / 3)
    assert accuracy([], []) == 0.0


def test_answer_accuracy():
    assert normalise_answer(" The Riverside.\nQ: next") == "riverside"
    assert answer_accuracy([" less than £20", "yes"], [" less than £20", " no"]) == 50.0


# --- echoing the meaning representation earns nothing ---------------------------------------------


def test_verbatim_copy_of_the_input_scores_zero():
    from course.data import format_mr, get_task

    examples = get_task("data_to_text").examples("validation", 50)
    copies = [format_mr(e.meta["slots"]) for e in examples]
    assert slot_accuracy(copies, [e.meta["slots"] for e in examples]) == 0.0
    assert slot_accuracy([format_mr(RECORD)], [RECORD]) == 0.0


@pytest.mark.parametrize(
    "echo",
    [
        "name[The Eagle] eatType[pub] food[French] priceRange[high] area[riverside]",
        "name: The Eagle, eatType: pub, food: French, near: Burger King",
        "The Eagle | pub | French | expensive | riverside | Burger King",
        "[The Eagle] [pub] [French] [riverside]",
        "food=French; area=riverside; near=Burger King",
    ],
)
def test_partial_and_reformatted_echoes_score_zero(echo):
    assert slot_accuracy([echo], [RECORD]) == 0.0


def test_echo_followed_by_a_sentence_scores_only_the_sentence():
    text = "name[The Eagle] | food[French] | area[riverside]\nThe Eagle is a pub."
    assert slot_matches(text, RECORD) == {a: a in ("name", "eatType") for a in RECORD}


def test_fluent_realisations_score_as_before():
    from course.data import get_task
    from course.metrics import strip_meaning_representation

    assert strip_meaning_representation(GOOD) == GOOD
    examples = get_task("data_to_text").examples("validation", 200)
    for e in examples:
        for ref in e.meta["references"]:
            assert strip_meaning_representation(ref) == ref


# --- error bars: bootstrap confidence intervals ---------------------------------------------------


def test_bootstrap_constant_scores_give_a_zero_width_interval():
    from course.metrics import bootstrap_ci, bootstrap_ci_seeds

    assert bootstrap_ci([0.1] * 7) == (0.1, 0.1, 0.1)
    assert bootstrap_ci([42.0]) == (42.0, 42.0, 42.0)
    assert bootstrap_ci_seeds([[50.0] * 5, [50.0] * 3]) == (50.0, 50.0, 50.0)


def test_bootstrap_mean_is_the_sample_mean_inside_its_interval():
    from course.metrics import bootstrap_ci

    scores = [0, 100, 100, 0, 100, 50, 25, 75]
    mean, low, high = bootstrap_ci(scores)
    assert mean == pytest.approx(sum(scores) / len(scores))
    assert 0 <= low < mean < high <= 100
    # a wider level gives a wider interval; more inputs of the same spread a narrower one
    _, low99, high99 = bootstrap_ci(scores, level=0.99)
    assert low99 <= low and high99 >= high
    _, low_many, high_many = bootstrap_ci(scores * 16)
    assert high_many - low_many < (high - low) / 2


def test_bootstrap_is_deterministic_under_a_seed():
    from course.metrics import bootstrap_ci, bootstrap_ci_seeds

    rng = random.Random(1)
    scores = [rng.random() * 100 for _ in range(40)]
    assert bootstrap_ci(scores, seed=3) == bootstrap_ci(scores, seed=3)
    assert bootstrap_ci(scores, seed=3) != bootstrap_ci(scores, seed=4)
    runs = [scores[:20], scores[20:], scores[5:30]]
    assert bootstrap_ci_seeds(runs, seed=3) == bootstrap_ci_seeds(runs, seed=3)


def test_bootstrap_covers_a_bernoulli_mean_near_the_nominal_level():
    """Over many simulated evaluation sets of 60 right/wrong answers (p = 0.3), the 95%
    interval holds the true mean about 95% of the time (the percentile bootstrap runs slightly
    narrow at this size, so the band is generous)."""
    from course.metrics import bootstrap_ci

    rng = random.Random(0)
    p, n, trials = 0.3, 60, 150
    covered = 0
    for t in range(trials):
        sample = [100.0 * (rng.random() < p) for _ in range(n)]
        _, low, high = bootstrap_ci(sample, n_boot=400, seed=t)
        covered += low <= 100 * p <= high
    assert 0.88 <= covered / trials <= 0.99, covered / trials


def test_bootstrap_over_seeds_is_wider_when_seeds_disagree():
    from course.metrics import bootstrap_ci, bootstrap_ci_seeds

    inputs = [0.0, 100.0] * 16
    agree = bootstrap_ci_seeds([inputs, inputs, inputs])
    shifted = [[min(100.0, v + d) for v in inputs] for d in (0.0, 20.0, 40.0)]
    disagree = bootstrap_ci_seeds(shifted)
    assert disagree[2] - disagree[1] > agree[2] - agree[1]
    # the centre weights seeds equally, whatever their number of inputs
    assert bootstrap_ci_seeds([[0.0] * 10, [100.0] * 2])[0] == pytest.approx(50.0)
    # one seed is the plain bootstrap over inputs
    assert bootstrap_ci_seeds([inputs], seed=5)[0] == bootstrap_ci(inputs, seed=5)[0]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda f: f([]), "empty"),
        (lambda f: f([1.0, float("nan")]), "non-finite"),
        (lambda f: f("0110"), "string"),
        (lambda f: f([1.0], level=0.0), "level"),
        (lambda f: f([1.0], level=1.0), "level"),
        (lambda f: f([1.0], level=95), "level"),
        (lambda f: f([1.0], n_boot=0), "n_boot"),
    ],
)
def test_bootstrap_rejects_bad_input(call, match):
    from course.metrics import bootstrap_ci

    with pytest.raises(ValueError, match=match):
        call(bootstrap_ci)


def test_bootstrap_over_seeds_rejects_bad_input():
    from course.metrics import bootstrap_ci_seeds

    with pytest.raises(ValueError, match="at least one seed"):
        bootstrap_ci_seeds([])
    with pytest.raises(ValueError, match=r"scores_by_seed\[1\] is empty"):
        bootstrap_ci_seeds([[1.0], []])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci_seeds([[1.0]], level=-0.5)


def test_bootstrap_weights_give_the_micro_average():
    """Each input's slot accuracy weighted by its number of slots: the mean is slot_accuracy of
    the whole set (the table's number), not the plain mean of the inputs' accuracies."""
    from course.metrics import bootstrap_ci, bootstrap_ci_seeds

    records = [
        {"name": "A", "food": "French"},
        {"name": "B", "area": "riverside", "eatType": "pub"},
    ]
    preds = ["A serves Italian food.", "B is a pub by the riverside."]
    per_input = [slot_accuracy([p], [r]) for p, r in zip(preds, records)]
    weights = [len(r) for r in records]
    mean, low, high = bootstrap_ci(per_input, weights=weights)
    assert mean == pytest.approx(slot_accuracy(preds, records))
    assert mean != pytest.approx(sum(per_input) / 2)
    assert low <= mean <= high
    assert bootstrap_ci_seeds([per_input], weights_by_seed=[weights])[0] == pytest.approx(mean)
    with pytest.raises(ValueError, match="weights"):
        bootstrap_ci(per_input, weights=[1])
    with pytest.raises(ValueError, match="positive"):
        bootstrap_ci(per_input, weights=[1, 0])
    with pytest.raises(ValueError, match="weights_by_seed"):
        bootstrap_ci_seeds([per_input], weights_by_seed=[])
