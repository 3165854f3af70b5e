"""Checks for notebook 03, section 1: prompts as functions (Liu et al. 2021).

``prompt_function(template, x)`` fills a template's input slot ``[X]`` with ``x`` and returns the
text up to its answer slot ``[Z]``, which must end the template (a prefix prompt: a causal LM
reads its answer after everything it was given); anything else is a ``ValueError``.
``label_scores(logits, attention_mask, label_ids)`` is the verbalizer's reading of the answer
slot: per row, the log-probability under the whole vocabulary of each label word's token, at the
row's last real token, wherever the padding is.

An *observe* / *judge* pair (see :mod:`autograder.checks.protocol`): observing calls the
student's function on grader-chosen templates, inputs, logits, masks and label ids (drawn from
the variant) and records what came back (a string, or which exception); judging compares it with
the reference on the same inputs and names the likely mistake.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from autograder.checks import fixtures
from autograder.checks.harness import CheckFailure, describe, max_diff, seeded, student_call
from autograder.checks.protocol import MalformedObservation, Observed, run_check

__all__ = [
    "check_label_scores",
    "check_prompt_function",
    "judge_label_scores",
    "judge_prompt_function",
    "observe_label_scores",
    "observe_prompt_function",
]

_VALID = (
    "[X] =>[Z]",
    "Review: [X]\nSentiment:[Z]",
    "Q: [X] A: [Z]",
    "[X][Z]",
    "  Avis « [X] » {n}: 100% $\\ [x]\t[Z]",
)
"""Prefix prompts: exactly one input slot, the answer slot last. Spaces before [Z] or at the
start belong to the prompt; braces, percent signs, dollars, backslashes, a lower-case "[x]",
tabs and non-ASCII text are just text."""
_INVALID = (
    "[X] It was [Z].",  # a cloze prompt: text after the answer slot
    "[X] =>[Z] ",  # a space after the answer slot is text after it too
    "[X] =>[Z]\n",
    "It was[Z]",  # no input slot
    "[X] and [X] =>[Z]",  # two input slots
    "[X] =>[Z] [Z]",  # two answer slots
    "[Z] [X]",  # the answer slot first
)
_WORDS = ("crisp", "soggy", "friendly", "slow", "bright", "noisy", "fresh", "bland", "warm")
_AWKWARD = (
    " [Z] was promised",
    "a [X] in the text",
    "  two leading spaces",
    "line\nbreak ",
    r"C:\new \1 \g<0> {0} %s $x",
    "café crème",
    "",
    "ends in ]",
    "ends in Z",
)
"""Inputs used as they are: slot markers, odd whitespace, regex and format syntax, non-ASCII,
nothing at all. The input is text, never a template."""
_PIECES = ("Review:", " ", "  ", "\t", "\n", "{}", "{x}", "%s", "%", "$x", "\\", "«", "»", "[x]",
           "Z]", "[", "]", "=>", "é", "X", "Z")  # fmt: skip
"""What the variant's own templates are made of, around their two slots."""


def _reference():
    return fixtures.reference()


def _drawn_template(rng: random.Random) -> str:
    def text() -> str:
        return "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 4)))

    while True:
        template = text() + "[X]" + text() + "[Z]"
        if template.count("[X]") == 1 and template.count("[Z]") == 1:
            return template


def _inputs() -> list[tuple[str, str]]:
    """``(template, x)`` pairs of the variant: every fixed template and four drawn from
    :data:`_PIECES`, each with a drawn input; then every awkward input as it is, in a template
    drawn from the valid ones (``"[X][Z]"`` among them)."""
    rng = random.Random(seeded(70))
    templates = [*_VALID, *(_drawn_template(rng) for _ in range(4)), *_INVALID]
    pairs = []
    for template in templates:
        x = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))
        pairs.append((template, x.capitalize()))
    for x in _AWKWARD:  # an input ending in "]" or "Z" right before [Z]: nothing may be stripped
        pairs.append(("[X][Z]" if x.endswith(("]", "Z")) else rng.choice(_VALID), x))
    return pairs


def observe_prompt_function(prompt_function: Callable) -> dict:
    """For each grader ``(template, x)``: the string returned, or the exception raised."""
    cases = []
    for template, x in _inputs():
        try:
            value = prompt_function(template, x)
        except CheckFailure:
            raise
        except NotImplementedError:  # a blank cell: the course's "fill in" message
            student_call(f"prompt_function({template!r}, {x!r})", prompt_function, template, x)
            raise
        except Exception as err:  # noqa: BLE001 - which exception is what is judged
            cases.append(
                {
                    "value": None,
                    "error": type(err).__name__,
                    "value_error": isinstance(err, ValueError),
                }
            )
            continue
        cases.append(
            {
                "value": value if isinstance(value, str) else None,
                "type": describe(value),
                "error": None,
                "value_error": False,
            }
        )
    return {"cases": cases}


def judge_prompt_function(obs: Observed) -> None:
    ref = _reference()
    pairs = _inputs()
    cases = obs.subs("cases", len(pairs))
    for (template, x), o in zip(pairs, cases, strict=True):
        call = f"prompt_function({template!r}, {x!r})"
        try:
            want = ref.prompt_function(template, x)
        except ValueError:
            want = None
        error = o.maybe_str("error")
        if want is None:
            if not o.bool("value_error"):
                got = f"returned {o.maybe_str('value')!r}" if error is None else f"raised {error}"
                raise AssertionError(
                    f"{call} {got}, expected a ValueError: a prompt function for a causal LM "
                    "needs exactly one [X] and exactly one [Z], with [Z] ending the template "
                    "(text after the answer slot makes a cloze prompt, which a causal LM cannot "
                    "fill)"
                )
            continue
        if error is not None:
            raise AssertionError(f"{call} raised {error}, expected {want!r}")
        value = o.maybe_str("value")
        if value is None:
            raise AssertionError(f"{call} returned {o.str('type')}, expected the string {want!r}")
        if value == want:
            continue
        if value == want.strip() or value.strip() == want.strip():
            hint = (
                "keep the template's text exactly, spaces and newlines included: a space "
                "before [Z] or inside x changes the tokens the model sees"
            )
        elif "[Z]" in x or "[X]" in x:
            hint = (
                "the input is text, not part of the template: find the slots in the template "
                "first, then put x in (a marker inside x must stay as it is)"
            )
        elif value.endswith("[Z]") or "[Z]" in value:
            hint = "the answer slot is where the model continues: return the text before it"
        else:
            hint = "the template's text before [Z], with [X] replaced by x"
        raise AssertionError(f"{call} returned {value!r}, expected {want!r}: {hint}")


def check_prompt_function(prompt_function: Callable) -> None:
    """prompt_function(template, x): the template up to its answer slot [Z], with the input slot
    [X] filled by x exactly; ValueError unless there is exactly one [X] and one [Z], [Z] last."""
    run_check(observe_prompt_function, judge_prompt_function, prompt_function)


# ---------------------------------------------------------------------------------------------
# label_scores
# ---------------------------------------------------------------------------------------------
_V = 13
_WHAT = "label_scores(logits, attention_mask, label_ids)"


def _scores_inputs() -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
    """``(logits (B, T, V), attention_mask, label_ids, weights)`` of the variant. ``T`` is
    drawn; the rows, in a drawn order, are one full row, one left-padded, one right-padded (and
    one by three or more), one padded on both sides and one with a single real token, each with
    drawn widths; three distinct label ids, never in sorted or set order; weights for a weighted
    sum whose gradient is compared."""
    rng = random.Random(seeded(71))
    gen = torch.Generator().manual_seed(seeded(72))
    t = rng.randint(5, 9)
    spans = [
        (0, t),
        (rng.randint(1, t - 2), t),
        (0, t - rng.randint(1, t - 2)),
        (1, t - rng.randint(1, t - 3)),
        (rng.randint(0, t - 1),) * 2,
    ]
    spans[4] = (spans[4][0], spans[4][0] + 1)
    spans.append((0, t - rng.randint(3, t - 2)))  # three or more padding tokens on the right
    rng.shuffle(spans)
    mask = torch.zeros(len(spans), t, dtype=torch.long)
    for row, (start, end) in enumerate(spans):
        mask[row, start:end] = 1
    logits = torch.randn(len(spans), t, _V, generator=gen) * 2
    while True:
        ids = rng.sample(range(_V), 3)
        if ids != sorted(ids) and ids != list(set(ids)):
            break
    weights = torch.randn(len(spans), 3, generator=gen)
    return logits, mask, ids, weights


def observe_label_scores(label_scores: Callable) -> dict:
    """The student's scores on the grader's logits (a leaf requiring grad), and the gradient of
    a grader-weighted sum of them with respect to the logits."""
    logits, mask, ids, weights = _scores_inputs()
    leaf = logits.clone().requires_grad_()
    out = student_call(_WHAT, label_scores, leaf, mask.clone(), list(ids))
    grad = None
    if (
        isinstance(out, torch.Tensor)
        and out.shape == weights.shape
        and out.requires_grad
        and out.is_floating_point()
    ):
        try:
            (grad,) = torch.autograd.grad((out * weights).sum(), leaf, allow_unused=True)
        except RuntimeError:
            grad = None
    return {
        "scores": out.detach() if isinstance(out, torch.Tensor) else None,
        "type": describe(out),
        "grad": grad,
        "logits_changed": not torch.equal(leaf.detach(), logits),
    }


def _explain_scores(got: torch.Tensor, logits, mask, ids, want) -> str:
    """The likely mistake, from which simpler reading of the logits ``got`` equals."""
    rows = torch.arange(logits.shape[0])
    idx = torch.tensor(ids)
    candidates = {
        "the logits of the LAST position were read, but a right-padded row's answer slot is its "
        "last REAL token": logits[:, -1],
        "the position mask.sum() - 1 is the last real token only under right padding; a "
        "left-padded row's answer slot is the last position where the mask is 1": logits[
            rows, mask.sum(1) - 1
        ],
    }
    for why, at in candidates.items():
        if max_diff(got, torch.log_softmax(at, -1)[:, idx]) <= 1e-5:
            return why
    last = (torch.arange(logits.shape[1]) * mask.bool()).argmax(1)
    at_z = logits[rows, last]
    if max_diff(got, at_z[:, idx]) <= 1e-5:
        return (
            "these are raw logits: score with log-probabilities (log_softmax over the vocabulary)"
        )
    if max_diff(got, torch.log_softmax(at_z[:, idx], -1)) <= 1e-5:
        return (
            "normalised over the label words only: the score is the log-probability under the "
            "whole vocabulary (log_softmax over V, then pick the label ids)"
        )
    if max_diff(got, torch.softmax(at_z, -1)[:, idx]) <= 1e-5:
        return "probabilities, not log-probabilities"
    if max_diff(got, want[:, torch.arange(len(ids)).flip(0)]) <= 1e-5:
        return "the columns must follow label_ids' order"
    return "per row, log_softmax of the answer slot's logits over the vocabulary, at label_ids"


def judge_label_scores(obs: Observed) -> None:
    ref = _reference()
    logits, mask, ids, weights = _scores_inputs()
    leaf = logits.clone().requires_grad_()
    want = ref.label_scores(leaf, mask, ids)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), leaf)
    got = obs.maybe_tensor("scores")
    if got is None or tuple(got.shape) != tuple(weights.shape):
        shown = describe(got) if got is not None else obs.str("type")
        raise AssertionError(
            f"{_WHAT} returned {shown}, expected a tensor of shape {tuple(weights.shape)} "
            "(B, number of labels)"
        )
    if obs.bool("logits_changed"):
        raise AssertionError(f"{_WHAT} changed the logits it was given (in place)")
    if not got.is_floating_point() or not max_diff(got, want) <= 1e-5:
        why = (
            _explain_scores(got.float(), logits, mask, ids, want.detach())
            if got.is_floating_point()
            else "scores are log-probabilities (floating point)"
        )
        raise AssertionError(
            f"{_WHAT} differs from the verbalizer's scores by up to "
            f"{max_diff(got.float(), want):.3g}: {why}"
        )
    grad = obs.maybe_tensor("grad")
    if grad is None:
        raise AssertionError(
            f"{_WHAT}: no gradient flows back to the logits: training a soft template through "
            "the verbalizer needs the graph (no .detach(), .item() or torch.no_grad())"
        )
    if grad.shape != want_grad.shape:
        raise MalformedObservation("the gradient has the wrong shape")
    if not max_diff(grad, want_grad) <= 1e-5:
        raise AssertionError(
            f"{_WHAT}: the gradient with respect to the logits differs from the reference's "
            f"by up to {max_diff(grad, want_grad):.3g}"
        )


def check_label_scores(label_scores: Callable) -> None:
    """label_scores(logits, attention_mask, label_ids) -> (B, n_labels): log-probabilities
    under the whole vocabulary of each label token at each row's last real token (left or right
    padding), differentiable."""
    run_check(observe_label_scores, judge_label_scores, label_scores)
