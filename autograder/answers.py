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
    "nb00_q1": "1e5b20d801287349f8daf2abb47df18091dce04aefc495c15edfcd91ba67076c",
    "nb00_q2": "e07872caea84c59d687fa6751b1890a7dfb21323c22ab6353b6bd0fb72fd843e",
    "nb00_q3": "bb30c85167e00388aec87ecc6b457876545bb1c6ac19e3f4aa4a598d7f3cf54b",
    "nb01_q1": "3ba0dec1c84c6b054ec2a2faeb9ec2f9aebadd5db0c7ff2a7633f029f28c3add",
    "nb01_q2": "27b306db45d628dabfe1875d2c9927228890f0da635db7dc1e452ec8c06dcd02",
    "nb01_q3": "b98af72ceabe604120e38e2046e4dda3fe96e8d241ddbec127aa6d51c691e9f5",
    "nb01_q4": "d62061fe73895fc5cdd8fe064caf53499eaab95f201f3e1e8610dbf53f7c4543",
    "nb02_q1": "bb0db7d5095617be437388bfe30694289e88910b979171d747dfb6eb36f9d428",
    "nb02_q2": "84cab7df885cfd88049039fd8a298786289c56d740aeffed4ccb276d5bf3c0ab",
    "nb02_q3": "c00a72f381dc0ec52a2b6c70a3a2e3594c34df73856fa3d8b0cb55a603680ec9",
    "nb02_q4": "7201e18ff1a848f7ea756d76b626504c1d017bf9ae6ddbc445af8f8a590c24de",
    "nb03_q1": "54d927739eced23332070879c5ddb4b98813a4abc599a76b719599aba8648ff5",
    "nb03_q2": "b8187ba72fae6127af576f2159962aaa838a7b0c37fbcba092cad3ca4b606916",
    "nb03_q3": "4e9a586353c76f306a0f3e99ed133d819db8f9017f280aafbe91edd624a265b0",
    "nb03_q4": "7ef6ade944c86ba3a0e3d770d8264f365e674b996fce1bf1da619b7658899d21",
    "nb03_q5": "7214b2a3add464395a01a7fd4e37bd7ef32b43ff849a8d8303a33a1dfb71f8ba",
    "nb04_q1": "ec9b148dc40a4e72724c1719d47b779918292f0ad08df1ced0de603e35ca58c7",
    "nb04_q2": "891462b94709c5190ce0e5629417b67e0f98e82dd6dfc663b2e005c9fbd45c3f",
    "nb04_q3": "4b5ff88936490a4bfdd9212725a09ff624891734a77f3a11c52b65597bbfa9a2",
    "nb04_q4": "a961453ae1377993ee2e6917a7ab991d772e380badb291cf156d407655d62b8b",
    "nb04_q5": "a778886c180f9f20d3af98e668cb4e36233f460f577260c7ed230ad439bb208b",
    "nb05_q1": "9c8461d4243e61b476e8f6c050f27982c64518a8bc1846a88e3bc8955664b5ea",
    "nb05_q2": "067bda7533303ad9314b94b229fbfa3ace9e787398ab9d23fc778eccf455ba1b",
    "nb05_q3": "d66d98166fd73138e4c53a3ed2ea571659da2b6db55cb82d2c2bfd3ab3db0313",
    "nb05_q4": "328b6e6aa24657fd3a50f65b61572a7a403a33910356d884115332ad073b3355",
    "nb05_q5": "046cecfcd06ed5a6a3d39ee6da613927afb722c33afada9279fd9629086cc566",
    "nb05_q6": "cab2d1f0f47173e7eedac8875e9fd45879a53d536ed4508823efab35fe423f54",
    "nb05_q7": "138320af6437283cf45ca69e50ce71baa2c8cb85424a6f8c375305e13d7e6c4d",
    "nb05_q8": "47e6c909fd457e8ec37c2970c3648b033e05d05ff43aae23aa8ad5c330b94cad",
    "nb05_q9": "b6970a1bf0e600f809883780980d11a03be604059829f1c71ce803db0fc800ca",
    "nb05_q10": "99aa64e409587454e8634136957124f61cec57ef7eafe4dee78280ad2a9e3301",
    "nb05_q11": "336204efba1d8db721e29bd3780f3e63767e70b3f7c63cb8864835627c101b88",
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
