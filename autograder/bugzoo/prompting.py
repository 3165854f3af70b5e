"""Mistakes in prompt functions and verbalizers (notebook 03, section 1), and valid but unusual
ways of writing them."""

from __future__ import annotations

import re

import torch

from autograder.bugzoo import Bug, Variant
from autograder.reference import label_scores, prompt_function

__all__ = ["BUGS", "VARIANTS"]


# --- prompt_function --------------------------------------------------------------------------
def fill_then_cut(template, x):
    """Fills [X] first, then cuts at the first [Z] of the result: an input that mentions "[Z]"
    is cut short."""
    if template.count("[X]") != 1 or template.count("[Z]") != 1 or not template.endswith("[Z]"):
        raise ValueError("not a prefix prompt")
    return template.replace("[X]", x).split("[Z]")[0]


def cloze_accepted(template, x):
    """Returns the text before [Z] even when text follows it (a cloze prompt)."""
    if template.count("[X]") != 1 or template.count("[Z]") != 1:
        raise ValueError("one [X] and one [Z]")
    before = template.split("[Z]")[0]
    return before.replace("[X]", x)


def stripped(template, x):
    """Strips the filled prompt (and the trailing space before [Z] with it)."""
    return prompt_function(template, x).strip()


def unchecked(template, x):
    """Never validates the template: no input slot, two slots or a cloze prompt all pass."""
    return template.split("[Z]")[0].replace("[X]", x, 1)


# --- label_scores -----------------------------------------------------------------------------
def _at(logits, rows):
    return logits[torch.arange(logits.shape[0]), rows]


def scores_last_column(logits, attention_mask, label_ids):
    """Reads the last position of every row: wrong for a right-padded row."""
    return torch.log_softmax(logits[:, -1], dim=-1)[:, label_ids]


def scores_mask_sum(logits, attention_mask, label_ids):
    """Takes position ``mask.sum() - 1``: right only for right padding."""
    at_z = _at(logits, attention_mask.sum(1) - 1)
    return torch.log_softmax(at_z, dim=-1)[:, label_ids]


def scores_raw_logits(logits, attention_mask, label_ids):
    """Returns the label words' logits, not their log-probabilities."""
    last = (torch.arange(attention_mask.shape[1]) * attention_mask.bool()).argmax(1)
    return _at(logits, last)[:, label_ids]


def scores_over_labels(logits, attention_mask, label_ids):
    """Normalises over the label words only (a log_softmax of the selected logits)."""
    last = (torch.arange(attention_mask.shape[1]) * attention_mask.bool()).argmax(1)
    return torch.log_softmax(_at(logits, last)[:, label_ids], dim=-1)


def scores_detached(logits, attention_mask, label_ids):
    """Right values, computed on detached logits: nothing can train through them."""
    return label_scores(logits.detach(), attention_mask, label_ids)


BUGS = [
    Bug(
        name="prompt_function_fill_then_cut",
        description="fills [X] before finding [Z]: an input containing '[Z]' is cut short",
        notebook="03",
        replaces={"prompt_function": fill_then_cut},
        caught_by=("check_prompt_function",),
        message_contains="the input is text",
    ),
    Bug(
        name="prompt_function_cloze_accepted",
        description="a template with text after [Z] (a cloze prompt) is accepted",
        notebook="03",
        replaces={"prompt_function": cloze_accepted},
        caught_by=("check_prompt_function",),
        message_contains="expected a ValueError",
    ),
    Bug(
        name="prompt_function_stripped",
        description="the filled prompt is stripped, losing the space before [Z]",
        notebook="03",
        replaces={"prompt_function": stripped},
        caught_by=("check_prompt_function",),
        message_contains="spaces and newlines included",
    ),
    Bug(
        name="prompt_function_unchecked",
        description="no validation: a template without [X], or with two, is filled anyway",
        notebook="03",
        replaces={"prompt_function": unchecked},
        caught_by=("check_prompt_function",),
        message_contains="expected a ValueError",
    ),
    Bug(
        name="label_scores_last_column",
        description="the verbalizer reads the last position, wrong for right-padded rows",
        notebook="03",
        replaces={"label_scores": scores_last_column},
        caught_by=("check_label_scores",),
        message_contains="right-padded row",
    ),
    Bug(
        name="label_scores_mask_sum",
        description="the answer slot taken at mask.sum() - 1, wrong for left-padded rows",
        notebook="03",
        replaces={"label_scores": scores_mask_sum},
        caught_by=("check_label_scores",),
        message_contains="left-padded row",
    ),
    Bug(
        name="label_scores_raw_logits",
        description="the label words' raw logits instead of log-probabilities",
        notebook="03",
        replaces={"label_scores": scores_raw_logits},
        caught_by=("check_label_scores",),
        message_contains="raw logits",
    ),
    Bug(
        name="label_scores_over_labels",
        description="normalised over the label words instead of the vocabulary",
        notebook="03",
        replaces={"label_scores": scores_over_labels},
        caught_by=("check_label_scores",),
        message_contains="label words only",
    ),
    Bug(
        name="label_scores_detached",
        description="computed on detached logits: a soft template cannot train through them",
        notebook="03",
        replaces={"label_scores": scores_detached},
        caught_by=("check_label_scores",),
        message_contains="no gradient",
    ),
]


# --- valid but unusual implementations (every check must pass them) ---------------------------
def prompt_function_by_regex(template, x):
    """One regular expression for the whole template; the input spliced in by position."""
    text = r"((?:(?!\[X\]|\[Z\]).)*)"  # text holding neither slot
    match = re.fullmatch(text + r"\[X\]" + text + r"\[Z\]", template, re.S)
    if match is None:
        raise ValueError(f"not a prefix prompt with one [X] and [Z] last: {template!r}")
    return match.group(1) + x + match.group(2)


def label_scores_by_flip(logits, attention_mask, label_ids):
    """The last real position as ``T - 1 - argmax(flipped mask)``; ``gather`` for the labels."""
    t = attention_mask.shape[1]
    last = t - 1 - attention_mask.flip(1).float().argmax(1)
    logp = torch.log_softmax(logits, dim=-1)  # every position, then the slot
    at_z = logp.gather(1, last.view(-1, 1, 1).expand(-1, 1, logp.shape[-1])).squeeze(1)
    index = torch.tensor(label_ids).unsqueeze(0).expand(at_z.shape[0], -1)
    return at_z.gather(1, index)


VARIANTS = [
    Variant(
        name="prompt_function_by_regex",
        description="one regular expression validates and splits the template",
        notebook="03",
        replaces={"prompt_function": prompt_function_by_regex},
    ),
    Variant(
        name="label_scores_by_flip",
        description="the last real position found on the flipped mask; log_softmax first",
        notebook="03",
        replaces={"label_scores": label_scores_by_flip},
    ),
]
