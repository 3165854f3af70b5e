"""Salted hashes of the multiple-choice answers, so a visible check can say right or wrong
without the notebook revealing the key.

Adding a question (instructor, in Python, no CLI needed)::

    >>> from autograder.answers import make_key
    >>> make_key("nb02_q3", "b")          # the question id and its correct answer
    '5f0c...'

then paste the line ``"nb02_q3": "5f0c...",`` into :data:`KEYS` below. Students check an answer
in a visible cell with ``autograder.selfcheck.check_answer("nb02_q3", answer)``.

Answers are normalised before hashing (:func:`normalize`): strings are stripped and
lower-cased, and a collection of choices (``{"a", "c"}``, ``["C", "A"]``) is sorted, so the
order and case of a multi-select answer do not matter. A hash only hides the key from a casual
look: with a handful of choices anyone can hash them all, so the hidden tests remain the grade.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["KEYS", "SALT", "is_correct", "make_key", "normalize"]

SALT = "soft-prompts-course/v1"

KEYS: dict[str, str] = {
    "nb00_q1": "003c917352f27251a6c5149c4f2c4f85d5739ec28855fa8ed98861c0d204dea3",
    "nb00_q2": "3eca3b9fa1362e7034db51b933420473434270ad19cde51dd8b404cb96865693",
    "nb00_q3": "4b6ecb709769a7a292d2cce63a88af478c71e34b5935066a8e940d2abcf108ff",
    "nb01_q1": "3ba0dec1c84c6b054ec2a2faeb9ec2f9aebadd5db0c7ff2a7633f029f28c3add",
    "nb01_q2": "c698f2720436ba7ac7daea555288f18f27fd78c206a9d96ef21a5cee0f14a3d9",
    "nb01_q3": "4edc2001ce41be4e83c4a9834b1c4ee8138af643984888b1b4f38835b3eff876",
    "nb01_q4": "bf8f04374cad0b31f74c85085b70a21c07ecade863c9af147ef0ef8c4c354c71",
    "nb02_q1": "4338a6faea3e9d6eb359a5647363dcd517593678cbe7d2cebbba4a84bb47e4bc",
    "nb02_q2": "a91ea713a9577757ce956d5cdd91571a342c92ba8ee16872a5aedc17814c6944",
    "nb02_q3": "c8c6df2e7ca417feb23cfa2a719342208b95355c166164563151a15796c30256",
    "nb02_q4": "aecc7aab89bf9348d32488f3aa5af99760d267d270ced5006672044db564cdb2",
}
"""Question id -> ``make_key(question_id, correct_answer)``."""


def normalize(answer: object) -> str:
    """Canonical text of an answer: ``" B "`` -> ``"b"``, ``["c", "A"]`` -> ``"a,c"``,
    ``True`` -> ``"true"``, ``3`` -> ``"3"``."""
    if isinstance(answer, str):
        return answer.strip().lower()
    if isinstance(answer, bool):
        return str(answer).lower()
    if isinstance(answer, Iterable):
        return ",".join(sorted(normalize(item) for item in answer))
    return str(answer).strip().lower()


def make_key(question_id: str, answer: object) -> str:
    """The salted sha256 (hex) of ``answer`` for ``question_id``: the value to store in
    :data:`KEYS`."""
    text = f"{SALT}\n{question_id}\n{normalize(answer)}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_correct(question_id: str, answer: object) -> bool:
    """Whether ``answer`` is the stored key of ``question_id``; ``KeyError`` if there is none."""
    if question_id not in KEYS:
        raise KeyError(f"no answer key for {question_id!r}; known: {sorted(KEYS)}")
    return make_key(question_id, answer) == KEYS[question_id]
