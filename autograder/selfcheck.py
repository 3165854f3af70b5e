"""The notebook-facing API of the checks, with or without nbgrader.

Works in plain Jupyter, JupyterLab and Colab. Everything it prints goes to STDOUT (nbgrader
scores a test cell 0 when the cell writes to stderr, and the checks silence warnings)::

    from autograder import selfcheck
    from autograder.checks.prefix import check_prefix_forward

    selfcheck.run(check_prefix_forward, prefix_forward, PrefixEncoder)   # a visible check
    # ✓ prefix_forward: every layer's attention sees that layer's own P prefix keys/values ...

    selfcheck.hidden("check_prefix_forward", prefix_forward, PrefixEncoder)   # a hidden test

    selfcheck.check_answer("nb02_q3", my_answer)
    # ✓ nb02_q3: correct. Prompt: P·d = 10 × 768 = 7,680; prefix: ...
    # or: AssertionError: ✗ nb02_q3: 'b' is not the answer. Why not (b): ... Reread the section ...

Outside grading each call runs the check here and now: :func:`run` and :func:`hidden` re-raise
the check's ``AssertionError`` (its message says what was observed, what was expected and the
likely mistake), so the cell fails visibly.

In a grading kernel (the grader sets :data:`autograder.checks.protocol.CHANNEL_ENV`) nothing is
decided here: each call only *observes* the student's objects on the grading run's secret
inputs and hands the observation to the grader, which judges it in its own process and writes
the verdict into the graded cell (:mod:`autograder.pipeline.verdicts`). Which checks a graded
cell must deliver is read from the grader's own copy of the cell, so rebinding, patching or
hooking anything in the kernel can at most withhold an observation, which the grader reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import combinations

from autograder.checks import protocol

__all__ = ["check_answer", "hidden", "run"]


def _summary(check: Callable) -> str:
    """The first paragraph of the check's docstring, on one line."""
    doc = (check.__doc__ or check.__name__).strip().split("\n\n")[0]
    return " ".join(doc.split())


def _captured(name: str, objects: tuple) -> bool:
    """Under grading: observe check ``name`` for the grader and say so; else False."""
    channel = protocol.grading_channel()
    if channel is None:
        return False
    protocol.capture(name, objects, channel)
    print(f"recorded for the grader: {name}")
    return True


def run(check: Callable[..., None], *objects: object) -> None:
    """``check(*objects)``; prints ``✓ <what passed>`` on success, re-raises its
    ``AssertionError`` (message only, no grader traceback) on failure."""
    if _captured(getattr(check, "__name__", "?"), objects):
        return
    try:
        check(*objects)
    except AssertionError as err:
        raise AssertionError(str(err)) from None
    print(f"✓ {_summary(check)}")


def hidden(name: str, *objects: object, **params: object) -> None:
    """A hidden test: the check called ``name`` (a key of ``autograder.checks.CHECKS``) on
    ``objects``. ``params`` are literal settings the grader reads from its own copy of the
    cell (a task name, say); here they are passed to the check as keywords."""
    if _captured(name, (*objects, *params.values())):
        return
    from autograder.checks import get_check

    check = get_check(name)
    try:
        check(*objects, **params)
    except AssertionError as err:
        raise AssertionError(str(err)) from None
    print(f"✓ {_summary(check)}")


def _explanations(question_id: str) -> dict[str, str]:
    """Option letter -> why it holds or not, for ``question_id``; empty when none are stored (a
    student package built before :mod:`autograder.explanations` existed)."""
    try:
        from autograder.explanations import EXPLANATIONS
    except ImportError:
        return {}
    return EXPLANATIONS.get(question_id, {})


def _key_letters(question_id: str, letters: Iterable[str]) -> frozenset[str]:
    """The set of option letters the stored key holds (one letter, or several for a multi-select
    question), found among the subsets of ``letters``; empty if none matches."""
    from autograder import answers

    options = sorted(letters)
    for size in range(1, len(options) + 1):
        for subset in combinations(options, size):
            if answers.is_correct(question_id, list(subset)):
                return frozenset(subset)
    return frozenset()


def _wrong(question_id: str, chosen: str) -> str:
    """The message for a wrong answer: why each chosen option that is not in the key does not
    hold, never a word of the key's options."""
    explained = _explanations(question_id)
    head = f"✗ {question_id}: {chosen!r} is not the answer"
    if not explained:
        return f"{head}; reread the section and try again"
    letters = set(chosen.split(","))
    options = ", ".join(f"({letter})" for letter in sorted(explained))
    if not letters <= set(explained):
        return f"{head}: the options are {options}; set one of those letters"
    extra = sorted(letters - _key_letters(question_id, explained))
    if not extra:
        why = "Each option you chose belongs, but the answer has more."
    else:
        why = " ".join(f"Why not ({letter}): {explained[letter]}" for letter in extra)
    return f"{head}. {why} Reread the section and try again."


def check_answer(question_id: str, answer: object) -> None:
    """Say whether ``answer`` is right for ``question_id``: prints ``✓`` and why the chosen
    option holds when it is, and raises ``AssertionError`` when it is wrong or missing, so the
    cell fails (and so does nbgrader's Validate). A wrong answer's message says why the option
    chosen does not hold (:mod:`autograder.explanations`), without naming the key. Returns
    nothing, so no bare ``Out:`` line."""
    if _captured("check_answer", (question_id, answer)):
        return
    from autograder import answers

    if question_id not in answers.KEYS:
        raise AssertionError(
            f"{question_id}: this question has no stored answer key; ask your instructor"
        )
    empty = isinstance(answer, (str, list, set, tuple)) and not answer
    if answer is None or answer is Ellipsis or empty:
        raise AssertionError(f"{question_id}: no answer yet: set it in the cell above")
    chosen = answers.normalize(answer)
    if not answers.is_correct(question_id, answer):
        raise AssertionError(_wrong(question_id, chosen)) from None
    explained = _explanations(question_id)
    why = [(letter, explained[letter]) for letter in chosen.split(",") if letter in explained]
    if len(why) == 1:
        print(f"✓ {question_id}: correct. {why[0][1]}")
        return
    print(f"✓ {question_id}: correct")
    for letter, text in why:
        print(f"  ({letter}) {text}")
