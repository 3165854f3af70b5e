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
    "nb03_q1": "4ac83e3a331f878ef8509ab8535e84db007a9b69d64589ea8afe45afca6925e8",
    "nb03_q2": "46dc9067a4f8dd2d984a687c3fb2e328cde243f14998812a14a7d55d911a1fcb",
    "nb03_q3": "c84c48743e7ec292a45b79e6777b012efe29afe913ecdb3cebb0f4d2153eda04",
    "nb03_q4": "83c5d1867242bae4108ec04bfa2f943f830093b0b57c109ebd51d283fdb38a44",
    "nb03_q5": "cdece25126af4500f7f5d9d1788374931790274ed83887ffb17bc87555710189",
    "nb04_q1": "f916773b8f13d19f5d8bf2a8e1b3776be7b3d7a6d2ec7ea97522b2f8129d9d63",
    "nb04_q2": "16160e3817b6720c9af611e735752960da2f55d459aca212c0ebf67825f7b871",
    "nb04_q3": "7c3000676202ed265d8f6e9a5735972285dda77afbe99e2bdce8e79ac6c9b1ce",
    "nb04_q4": "1ed7b1bfa089d21b88a67a6a223766dd0cefa9664f97ddba128d89e5cca2711e",
    "nb04_q5": "f5bcd61fb1437715042a4af1443b64e716e3087588d2570f351cf129431d5a13",
    "nb05_q1": "5f3c41fb3c1c6a9bedda674d1d72121a1557fe63fcee1cf2c50be3077e5f1901",
    "nb05_q2": "4587b5067ee6c22ac1dd2f9e9a1a8a7045a64de1bf5b5c4b2940ad984684fdb7",
    "nb05_q3": "f06ec415cebb6f14da7c49de52ef229484c937c05c5a5a1014d2af20ded2194f",
    "nb05_q4": "a98604049c142efa76ae708bf93c9c3d90510c3c32ed12fdd99d7b78ed0343f3",
    "nb05_q5": "5a285e90b1f279144e17d1d7d5ca29f29133859841c5185c925a26ec1055c0c8",
    "nb05_q6": "31b15cb39a8aaa7eda8fc27ae8311365db16911d977064c327ce9d93899879fd",
    "nb05_q7": "4613e1a44955440ee7df8d34bba8ebf1e33e162e1a09295f726526a6bc562f53",
    "nb05_q8": "fe89b27ffe334f1dbfec327849fc9256a7dc1a45bf086410cf85babcf9a6bbc3",
    "nb05_q9": "ac0fd5e15f85d57e8f4e540c1ee7bb8c0f106411b82b8def17d5eb34eb2f0d03",
    "nb05_q10": "c1e72aed7c500d5d8c29ec4b3091f350e1c930a265efdd5053c7062e84549096",
    "nb05_q11": "97bc0dd9d7daad69855f8a7812c6e7d62166a6933658145fc9d6f88108cb2793",
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
