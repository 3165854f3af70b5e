"""The hidden check of a multiple-choice answer.

Visible cells call :func:`autograder.selfcheck.check_answer`, which prints right or wrong. The
hidden test must not trust anything the student's kernel could have replaced
(``autograder.answers.is_correct = lambda *a: True``), so this module reads the answer keys
straight from ``autograder/answers.py`` on disk, into a private module object, every time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

__all__ = ["check_answer"]

_ANSWERS = Path(__file__).resolve().parents[1] / "answers.py"


def _answers_from_disk() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_grader_answers", _ANSWERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_answer(question_id: str, answer: object) -> None:
    """Multiple choice: ``answer`` is the stored key of ``question_id``."""
    answers = _answers_from_disk()
    if question_id not in answers.KEYS:
        raise AssertionError(f"{question_id}: no answer key is stored; tell your instructor")
    if answer is None or answer is Ellipsis:
        raise AssertionError(f"{question_id}: no answer given")
    if answers.make_key(question_id, answer) != answers.KEYS[question_id]:
        raise AssertionError(f"{question_id}: {answers.normalize(answer)!r} is not the answer")
