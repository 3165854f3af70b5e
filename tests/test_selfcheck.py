"""The visible-cell API: one stdout line on success, the check's message on failure, answer
keys stored only as salted hashes."""

from __future__ import annotations

import re
import sys

import pytest

from autograder import answers, reference, selfcheck
from autograder.bugzoo.stubs import STUBS
from autograder.checks.prefix import check_build_prefix_cache
from autograder.checks.prompt import check_soft_prompt


def test_run_prints_one_line_to_stdout_on_success(capfd) -> None:
    selfcheck.run(check_build_prefix_cache, reference.build_prefix_cache)
    out, err = capfd.readouterr()
    assert err == ""
    assert out.startswith("✓ build_prefix_cache: a NEW DynamicCache per call")
    assert out.count("\n") == 1


def test_run_reraises_the_checks_message(capfd) -> None:
    with pytest.raises(AssertionError, match="YOUR CODE HERE cell of SoftPrompt") as info:
        selfcheck.run(check_soft_prompt, STUBS["SoftPrompt"])
    assert info.value.__cause__ is None and info.value.__suppress_context__
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_check_answer_right_wrong_and_unknown(monkeypatch, capsys) -> None:
    """A right answer prints ✓ and returns None (no bare ``Out:`` line); a wrong, missing or
    unknown one fails the cell (so nbgrader's Validate fails too) without naming the key."""
    monkeypatch.setitem(answers.KEYS, "test_q1", answers.make_key("test_q1", ["b", "d"]))
    assert selfcheck.check_answer("test_q1", {"D", " b"}) is None
    assert capsys.readouterr().out.splitlines() == ["✓ test_q1: correct"]
    with pytest.raises(AssertionError, match=r"✗ test_q1: 'b' is not the answer") as info:
        selfcheck.check_answer("test_q1", "b")
    assert "d" not in str(info.value).split("'b'")[1].split(";")[0]  # the key is not named
    for missing in (None, ..., "", []):
        with pytest.raises(AssertionError, match="test_q1: no answer yet"):
            selfcheck.check_answer("test_q1", missing)
    with pytest.raises(AssertionError, match="no_such_question: this question has no stored"):
        selfcheck.check_answer("no_such_question", "a")
    assert capsys.readouterr().out == ""


def test_check_answer_explains_the_option_chosen(monkeypatch, capsys) -> None:
    """A wrong answer says why THAT option does not hold, never a word of the key's option; a
    right one says why it holds; an answer that is no option lists the options."""
    from autograder import explanations

    monkeypatch.setitem(answers.KEYS, "test_q2", answers.make_key("test_q2", "c"))
    lines = {"a": "A is too small.", "b": "B counts twice.", "c": "C is the count.", "d": "D."}
    monkeypatch.setitem(explanations.EXPLANATIONS, "test_q2", lines)
    with pytest.raises(AssertionError) as info:
        selfcheck.check_answer("test_q2", "B")
    message = str(info.value)
    assert message.startswith("✗ test_q2: 'b' is not the answer. Why not (b): B counts twice.")
    assert "C is the count" not in message and "(c)" not in message and "'c'" not in message
    with pytest.raises(AssertionError, match=r"the options are \(a\), \(b\), \(c\), \(d\)"):
        selfcheck.check_answer("test_q2", "e")
    selfcheck.check_answer("test_q2", " c")
    assert capsys.readouterr().out.splitlines() == ["✓ test_q2: correct. C is the count."]


def test_check_answer_explains_a_multi_select_answer(monkeypatch, capsys) -> None:
    from autograder import explanations

    monkeypatch.setitem(answers.KEYS, "test_q3", answers.make_key("test_q3", ["a", "c"]))
    lines = {"a": "A shares.", "b": "B is private.", "c": "C shares too.", "d": "D is private."}
    monkeypatch.setitem(explanations.EXPLANATIONS, "test_q3", lines)
    with pytest.raises(AssertionError) as info:
        selfcheck.check_answer("test_q3", {"a", "b"})
    assert "Why not (b): B is private." in str(info.value)
    assert "A shares" not in str(info.value) and "(a)" not in str(info.value)
    with pytest.raises(AssertionError, match="belongs, but the answer has more"):
        selfcheck.check_answer("test_q3", ["c"])
    selfcheck.check_answer("test_q3", {"c", "a"})
    assert capsys.readouterr().out.splitlines() == [
        "✓ test_q3: correct",
        "  (a) A shares.",
        "  (c) C shares too.",
    ]


def test_check_answer_without_explanations_still_judges(monkeypatch, capsys) -> None:
    """A student package built before ``autograder.explanations`` existed: the bare verdict."""
    monkeypatch.setitem(sys.modules, "autograder.explanations", None)  # import raises
    with pytest.raises(AssertionError, match=r"^✗ nb00_q1: 'z' is not the answer; reread"):
        selfcheck.check_answer("nb00_q1", "z")
    right = next(x for x in "abcd" if answers.is_correct("nb00_q1", x))
    selfcheck.check_answer("nb00_q1", right)
    assert capsys.readouterr().out == "✓ nb00_q1: correct\n"


def test_check_answer_under_grading_only_records(monkeypatch, capsys) -> None:
    """In a grading kernel nothing is judged or explained here: the observation goes to the
    grader (whose verdict rests on its own copy of the keys)."""
    seen = []
    monkeypatch.setattr(selfcheck.protocol, "grading_channel", lambda: "channel")
    monkeypatch.setattr(selfcheck.protocol, "capture", lambda *a: seen.append(a))
    assert selfcheck.check_answer("nb00_q1", "z") is None
    assert seen == [("check_answer", ("nb00_q1", "z"), "channel")]
    assert capsys.readouterr().out == "recorded for the grader: check_answer\n"


def test_keys_are_salted_hashes_of_normalised_answers() -> None:
    key = answers.make_key("nb01_q1", "B")
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert key == answers.make_key("nb01_q1", " b ")
    assert key != answers.make_key("nb01_q2", "b")
    assert answers.normalize(["c", "A"]) == answers.normalize(("a", "C")) == "a,c"
    assert answers.normalize(True) == "true" and answers.normalize(3) == "3"
    assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in answers.KEYS.values())
