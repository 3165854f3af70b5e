"""The multiple-choice questions measure understanding, not test-taking.

Read from the solution notebooks (the options from each question's Markdown, the key from its
``### BEGIN SOLUTION`` answer cell):

* the key is rarely the longest option (at most 30% of the single-answer questions, ties counted
  against) nor systematically the shortest, and the keys are spread over the positions;
* every option has a one-line explanation in :mod:`autograder.explanations`, and no explanation
  belongs to an option that does not exist;
* a wrong answer's message explains the option chosen and says nothing of the key's;
* questions graded with a justification have their hand-graded cell, and each header states the
  points its cells carry.

The audits are plain functions of a folder of notebooks and a table of explanations, so the last
tests show them failing on deliberately broken copies.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from autograder import answers, selfcheck
from autograder.explanations import EXPLANATIONS

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
LONGEST_KEY_LIMIT = 0.30
SHORTEST_KEY_LIMIT = 0.35
POSITION_LIMIT = 0.40
"""At most this share of the single-answer keys sits at any one letter."""

OPTION = re.compile(r"^\* \(([a-z])\) (.*?)(?=^\* \(|\Z)", re.M | re.S)
ANSWER_ID = re.compile(r"answer_(q\d+)")
LETTER_REFERENCE = re.compile(r"\([a-z]\)")


@dataclass(frozen=True)
class Question:
    qid: str
    options: dict[str, str]
    """Option letter -> its text, whitespace collapsed."""
    key: frozenset[str]

    @property
    def single(self) -> bool:
        return len(self.key) == 1


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _grade_id(cell: dict) -> str:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "")


def quiz_questions(solutions: Path) -> list[Question]:
    """Every multiple-choice question of the notebooks under ``solutions``."""
    found = []
    for path in sorted(solutions.glob("*/*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for i, cell in enumerate(cells):
            match = ANSWER_ID.fullmatch(_grade_id(cell))
            if not match:
                continue
            number = match.group(1)
            value = re.search(rf"^answer_{number} = (.+)$", _source(cell), re.M)
            assert value, f"{path.name}: no key in the solution cell answer_{number}"
            key = ast.literal_eval(value.group(1))
            key = frozenset({key} if isinstance(key, str) else key)
            question = next(
                (
                    _source(c)
                    for c in reversed(cells[:i])
                    if c["cell_type"] == "markdown" and "* (a)" in _source(c)
                ),
                "",
            )
            options = {letter: " ".join(text.split()) for letter, text in OPTION.findall(question)}
            found.append(Question(f"nb{path.name[:2]}_{number}", options, key))
    return found


def longest_key_share(questions: list[Question]) -> tuple[list[str], int]:
    """The single-answer questions whose key is (one of) the longest options, and their count."""
    single = [q for q in questions if q.single]
    longest = [
        q.qid
        for q in single
        if len(q.options[next(iter(q.key))]) == max(map(len, q.options.values()))
    ]
    return longest, len(single)


def shortest_key_share(questions: list[Question]) -> tuple[list[str], int]:
    single = [q for q in questions if q.single]
    shortest = [
        q.qid
        for q in single
        if len(q.options[next(iter(q.key))]) == min(map(len, q.options.values()))
    ]
    return shortest, len(single)


def explanation_problems(
    questions: list[Question], explanations: dict[str, dict[str, str]]
) -> list[str]:
    """What is wrong with ``explanations`` for ``questions``: an option without its line, a line
    for an option (or question) that does not exist, a line that is not one line of text or that
    names an option by its letter."""
    problems = []
    for q in questions:
        lines = explanations.get(q.qid, {})
        for letter in sorted(set(q.options) - set(lines)):
            problems.append(f"{q.qid} ({letter}): no explanation")
        for letter in sorted(set(lines) - set(q.options)):
            problems.append(f"{q.qid} ({letter}): explains an option the question does not have")
        for letter, text in lines.items():
            if not text.strip() or "\n" in text:
                problems.append(f"{q.qid} ({letter}): not one line of text")
            if LETTER_REFERENCE.search(text):
                problems.append(f"{q.qid} ({letter}): names an option by its letter")
    known = {q.qid for q in questions}
    problems += [
        f"{qid}: explains a question no notebook asks" for qid in explanations.keys() - known
    ]
    return problems


@pytest.fixture(scope="module")
def questions() -> list[Question]:
    return quiz_questions(SOLUTIONS)


def test_every_question_is_parsed_with_its_key_among_its_options(questions):
    assert len(questions) >= 30
    assert len({q.qid for q in questions}) == len(questions)
    for q in questions:
        letters = sorted(q.options)
        assert letters == list("abcd"[: len(letters)]) and len(letters) >= 3, (q.qid, letters)
        assert q.key <= set(q.options), f"{q.qid}: key {sorted(q.key)} is not an option"
        assert answers.is_correct(q.qid, sorted(q.key)), f"{q.qid}: answers.py disagrees"


def test_the_key_is_rarely_the_longest_option(questions):
    longest, total = longest_key_share(questions)
    assert len(longest) <= LONGEST_KEY_LIMIT * total, (
        f"the key is the longest option in {len(longest)} of {total} single-answer questions "
        f"(at most {LONGEST_KEY_LIMIT:.0%}): {longest}"
    )


def test_the_key_is_not_systematically_the_shortest_option(questions):
    shortest, total = shortest_key_share(questions)
    assert len(shortest) <= SHORTEST_KEY_LIMIT * total, (
        f"the key is the shortest option in {len(shortest)} of {total}: {shortest}"
    )


def test_keys_are_spread_over_the_positions(questions):
    single = [next(iter(q.key)) for q in questions if q.single]
    counts = Counter(single)
    assert set(counts) == set("abcd"), counts
    assert max(counts.values()) <= POSITION_LIMIT * len(single), counts


def test_every_option_has_its_explanation(questions):
    assert explanation_problems(questions, EXPLANATIONS) == []


def test_a_wrong_answer_explains_that_option_and_never_the_key(questions, capsys):
    for q in questions:
        for letter in sorted(set(q.options) - q.key):
            with pytest.raises(AssertionError) as info:
                selfcheck.check_answer(q.qid, letter)
            message = str(info.value)
            assert message.startswith(f"✗ {q.qid}: '{letter}' is not the answer"), message
            assert EXPLANATIONS[q.qid][letter] in message, f"{q.qid} ({letter}): {message}"
            for right in q.key:
                assert EXPLANATIONS[q.qid][right] not in message, f"{q.qid}: names the key's line"
                assert f"({right})" not in message and f"'{right}'" not in message, message
        selfcheck.check_answer(q.qid, sorted(q.key))
        out = capsys.readouterr().out
        assert out.startswith(f"✓ {q.qid}: correct"), out
        assert all(EXPLANATIONS[q.qid][right] in out for right in q.key), out


def test_a_multi_select_answer_is_told_what_is_wrong_with_it(questions):
    multi = next(q for q in questions if not q.single)
    right, wrong = sorted(multi.key)[0], sorted(set(multi.options) - multi.key)[0]
    with pytest.raises(AssertionError) as info:
        selfcheck.check_answer(multi.qid, {right, wrong})
    message = str(info.value)
    assert EXPLANATIONS[multi.qid][wrong] in message
    assert EXPLANATIONS[multi.qid][right] not in message and f"({right})" not in message
    if len(multi.key) > 1:
        with pytest.raises(AssertionError, match="the answer has more") as info:
            selfcheck.check_answer(multi.qid, right)
        assert EXPLANATIONS[multi.qid][right] not in str(info.value)


def test_an_answer_that_is_no_option_lists_the_options(questions):
    q = questions[0]
    with pytest.raises(AssertionError, match=r"the options are \(a\), \(b\)"):
        selfcheck.check_answer(q.qid, "z")


def test_justified_questions_have_their_hand_graded_cell():
    justified = []
    for path in sorted(SOLUTIONS.glob("*/*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        ids = [_grade_id(c) for c in cells]
        for i, cell in enumerate(cells):
            match = re.fullmatch(r"justify_(q\d+)", _grade_id(cell))
            if not match:
                continue
            number = match.group(1)
            meta = cell["metadata"]["nbgrader"]
            assert cell["cell_type"] == "markdown" and meta["solution"] and meta["grade"]
            assert meta["points"] == 1 and not meta["locked"], meta
            assert ids.index(f"test_{number}") == i - 2, f"{path.name}: justify_{number} placement"
            question = next(_source(c) for c in reversed(cells[:i]) if "* (a)" in _source(c))
            assert "then justify in one sentence" in question, f"{path.name} {number}"
            justified.append(f"nb{path.name[:2]}_{number}")
    assert 4 <= len(justified) <= 5, justified


@pytest.mark.parametrize("path", sorted(SOLUTIONS.glob("*/*.ipynb")), ids=lambda p: p.stem)
def test_the_header_states_the_points_the_cells_carry(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    graded = [
        c["metadata"]["nbgrader"] for c in cells if c["metadata"].get("nbgrader", {}).get("grade")
    ]
    total = sum(meta["points"] for meta in graded)
    header = " ".join(_source(cells[0]).split())
    assert f"Graded ({total} points)" in header, f"{path.name}: the cells carry {total} points"


def test_the_student_package_ships_the_explanations():
    from autograder.pipeline.package import student_files

    assert "autograder/explanations.py" in student_files(()), (
        "add 'autograder/explanations.py' to ALWAYS in autograder/pipeline/package.py: the "
        "visible quiz checks read it"
    )


# --- the audits fail on broken copies ------------------------------------------------------


def test_the_length_audit_fails_when_keys_are_made_longest(tmp_path):
    for path in SOLUTIONS.glob("*/*.ipynb"):
        (tmp_path / path.parent.name).mkdir()
        shutil.copy(path, tmp_path / path.parent.name / path.name)
    for path in tmp_path.glob("*/*.ipynb"):
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = nb["cells"]
        for i, cell in enumerate(cells):
            match = ANSWER_ID.fullmatch(_grade_id(cell))
            if not match:
                continue
            key = re.search(r'^answer_q\d+ = "(\w)"$', _source(cell), re.M)
            if not key:
                continue
            question = next(c for c in reversed(cells[:i]) if "* (a)" in _source(c))
            text = re.sub(
                rf"^(\* \({key.group(1)}\) .*?)(?=\n\* \(|\Z)",
                r"\1, exactly as the section explains at some length",
                _source(question),
                flags=re.M | re.S,
            )
            question["source"] = text.splitlines(keepends=True)
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    longest, total = longest_key_share(quiz_questions(tmp_path))
    assert len(longest) == total and len(longest) > LONGEST_KEY_LIMIT * total


def test_the_explanation_audit_fails_on_a_missing_or_unknown_option(questions):
    broken = copy.deepcopy(EXPLANATIONS)
    del broken["nb00_q1"]["a"]
    broken["nb01_q1"]["e"] = "An option the question does not have."
    broken["nb02_q1"]["b"] = "Unlike (a), this one holds."
    broken["nb99_q1"] = {"a": "A question no notebook asks."}
    problems = explanation_problems(questions, broken)
    assert problems == [
        "nb00_q1 (a): no explanation",
        "nb01_q1 (e): explains an option the question does not have",
        "nb02_q1 (b): names an option by its letter",
        "nb99_q1: explains a question no notebook asks",
    ]
