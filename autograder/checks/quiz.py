"""The check of a multiple-choice answer.

The kernel only records which answer the notebook holds (:func:`observe_answer`); the grader
decides (:func:`judge_answer`) against the keys it reads from ``autograder/answers.py`` on its
own disk, for the question named in its own copy of the cell, so nothing the student's kernel
rebinds (``autograder.answers.is_correct = lambda *a: True``) reaches the verdict.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from autograder.checks.protocol import MalformedObservation, Observed, run_check

__all__ = ["check_answer", "judge_answer", "observe_answer"]

_ANSWERS = Path(__file__).resolve().parents[1] / "answers.py"


def _answers_from_disk() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_grader_answers", _ANSWERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plain(answer: object) -> object:
    """The answer as observation data: a string, number, bool, None, or a list of those."""
    if answer is None or answer is Ellipsis:
        return None
    if isinstance(answer, (str, bool, int, float)):
        return answer
    if isinstance(answer, Iterable):
        return [_plain(item) for item in answer]
    return str(answer)


def observe_answer(question_id: str, answer: object) -> dict:
    """The question and the answer the notebook holds."""
    return {"question": str(question_id), "answer": _plain(answer)}


def _valid(answer: object, depth: int = 0) -> bool:
    if answer is None or isinstance(answer, (str, bool, int, float)):
        return True
    return depth == 0 and isinstance(answer, list) and all(_valid(a, 1) for a in answer)


def judge_answer(obs: Observed, question: str) -> None:
    """``question``'s stored key equals the observed answer (normalised: case, spaces, order of a
    multi-select)."""
    if obs.str("question") != question:
        raise MalformedObservation(
            f"the observation answers {obs.str('question')!r}, this cell asks {question!r}"
        )
    answer = obs.raw("answer")
    if not _valid(answer):
        raise MalformedObservation(f"{question}: the observed answer is not plain data")
    answers = _answers_from_disk()
    if question not in answers.KEYS:
        raise AssertionError(f"{question}: no answer key is stored; tell your instructor")
    if answer is None or answer == []:
        raise AssertionError(f"{question}: no answer given")
    if answers.make_key(question, answer) != answers.KEYS[question]:
        raise AssertionError(f"{question}: {answers.normalize(answer)!r} is not the answer")


def check_answer(question_id: str, answer: object) -> None:
    """Multiple choice: ``answer`` is the stored key of ``question_id``."""
    run_check(observe_answer, judge_answer, question_id, answer, params={"question": question_id})
