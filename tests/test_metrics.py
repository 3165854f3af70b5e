"""Metrics: slot matching rules, corpus BLEU, accuracy."""

from __future__ import annotations

import math

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
