"""The visible-cell API: one stdout line on success, the check's message on failure, answer
keys stored only as salted hashes."""

from __future__ import annotations

import re

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


def test_keys_are_salted_hashes_of_normalised_answers() -> None:
    key = answers.make_key("nb01_q1", "B")
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert key == answers.make_key("nb01_q1", " b ")
    assert key != answers.make_key("nb01_q2", "b")
    assert answers.normalize(["c", "A"]) == answers.normalize(("a", "C")) == "a,c"
    assert answers.normalize(True) == "true" and answers.normalize(3) == "3"
    assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in answers.KEYS.values())
