"""The visible-cell API: run a check or check an answer, with or without nbgrader.

Works in plain Jupyter, JupyterLab and Colab. Everything it prints goes to STDOUT (nbgrader
scores a test cell 0 when the cell writes to stderr, and the checks silence warnings)::

    from autograder import selfcheck
    from autograder.checks.prefix import check_prefix_forward

    selfcheck.run(check_prefix_forward, prefix_forward, PrefixEncoder)
    # ✓ prefix_forward: every layer's attention sees that layer's own P prefix keys/values ...

    selfcheck.check_answer("nb02_q3", my_answer)
    # ✓ nb02_q3: correct

On failure :func:`run` re-raises the check's ``AssertionError`` (its message says what was
observed, what was expected and the likely mistake), so the cell fails visibly.
"""

from __future__ import annotations

from collections.abc import Callable

from autograder import answers

__all__ = ["check_answer", "run"]


def _summary(check: Callable) -> str:
    """The first paragraph of the check's docstring, on one line."""
    doc = (check.__doc__ or check.__name__).strip().split("\n\n")[0]
    return " ".join(doc.split())


def run(check: Callable[..., None], *objects: object) -> None:
    """``check(*objects)``; prints ``✓ <what passed>`` on success, re-raises its
    ``AssertionError`` (message only, no grader traceback) on failure."""
    try:
        check(*objects)
    except AssertionError as err:
        raise AssertionError(str(err)) from None
    print(f"✓ {_summary(check)}")


def check_answer(question_id: str, answer: object) -> bool:
    """Say whether ``answer`` is right for ``question_id`` (printed), and return it."""
    try:
        right = answers.is_correct(question_id, answer)
    except KeyError:
        print(f"? {question_id}: this question has no stored answer key; ask your instructor")
        return False
    if right:
        print(f"✓ {question_id}: correct")
    else:
        print(f"✗ {question_id}: not quite — reread the section and try again")
    return right
