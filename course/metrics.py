"""Task metrics: slot accuracy and corpus BLEU for data-to-text, accuracy for the others.

All scores are percentages in ``[0, 100]``.

Slot matching rules (case-insensitive regular expressions, see :data:`SLOT_PATTERNS`):

* ``name``: the name occurs in the text.
* ``near``: the landmark occurs right after a proximity phrase ("near", "close to", "next to",
  "not far from", "by", "beside"), so a landmark mentioned as the subject does not count.
* closed attributes (``eatType``, ``food``, ``priceRange``, ``customer rating``, ``area``,
  ``familyFriendly``): one of the value's phrasings occurs, e.g. priceRange ``high`` is
  "expensive", "high price(s/ range)", "high-priced" or "prices are high"; customer rating
  ``high`` is "high (customer) rating", "highly rated", "rated highly", "rate it highly";
  familyFriendly ``no`` is "not family-friendly", "not kid friendly", "adults only", ... and
  ``yes`` is a family/kid/child-friendly phrase that is not negated.
* For every closed attribute except ``eatType``, a slot whose text *also* realises another value
  of the same attribute (e.g. "French and Italian food", "cheap ... expensive") is wrong.
  ``eatType`` has no such check because "restaurant" is also used as a generic noun.

**Echoing the input earns nothing** (:func:`strip_meaning_representation`): a real pretrained LM
readily copies the meaning representation (``name[The Eagle] | food[French]``) instead of writing a
sentence, which the rules above would otherwise credit (about 69% on SmolLM2-135M). Before
matching, every ``attribute[value]`` (or ``attribute: value`` / ``attribute=value``) span is
removed, then any remaining ``[...]`` span, and every line that contains the ``|`` separator:
fluent sentences contain none of these, so a realisation scores exactly as before while a
verbatim or partial copy of the input scores only for what it says in words.

**Error bars** (:func:`bootstrap_ci`, :func:`bootstrap_ci_seeds`): a score measured on a few
dozen inputs, from one training run, is one draw of a noisy quantity. A percentile bootstrap
resamples what was measured — the inputs, and the seeds where there are several — to show how far
the mean could move with another draw.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence

__all__ = [
    "SLOT_PATTERNS",
    "accuracy",
    "answer_accuracy",
    "bootstrap_ci",
    "bootstrap_ci_seeds",
    "corpus_bleu",
    "first_word",
    "normalise_answer",
    "slot_accuracy",
    "slot_matches",
    "strip_meaning_representation",
    "tokenize_bleu",
]

_RATING_OF = r"(?:customer )?rating"

SLOT_PATTERNS: dict[str, dict[str, str]] = {
    "eatType": {
        "restaurant": r"\brestaurant\b",
        "coffee shop": r"\bcoffee ?shop\b",
        "pub": r"\bpub\b",
    },
    "food": {
        food: rf"\b{food}\b"
        for food in ("French", "Italian", "Chinese", "Indian", "Japanese", "English", "fast food")
    },
    "priceRange": {
        "cheap": r"\bcheap|\binexpensive\b|\blow[- ]price|\bprices? (?:are|is) low"
        r"|price range is low",
        "moderate": r"\bmoderate",
        "high": r"\bexpensive\b|\bhigh[- ]price|\bprices? (?:are|is) high|price range is high",
        "less than £20": r"less than £20|under £20|below £20",
        "£20-25": r"£20 ?(?:-|–|to) ?£?25\b|between £20 and £25",
        "more than £30": r"more than £30|over £30|above £30",
    },
    "customer rating": {
        "low": rf"\blow {_RATING_OF}|\brated low|\bpoorly rated|\brate it low|rating is low",
        "average": rf"\baverage {_RATING_OF}|\brated average|\brate it average|rating is average",
        "high": rf"\bhigh {_RATING_OF}|\bhighly rated|\brated highly|\brate it highly"
        r"|rating is high",
        "1 out of 5": r"\b1 out of 5\b",
        "3 out of 5": r"\b3 out of 5\b",
        "5 out of 5": r"\b5 out of 5\b",
    },
    "area": {
        "riverside": r"\briverside\b|\b(?:by|near|on) the river\b",
        "city centre": r"\bcity cent(?:re|er)\b|\bcent(?:re|er) of (?:the )?(?:city|town)\b",
    },
    "familyFriendly": {
        "yes": r"(?<!not )(?<!n't )\b(?:family|kid|child)[- ]friendly"
        r"|\bwelcomes? (?:families|children|kids)|\bchildren are welcome",
        "no": r"\bnot (?:family|kid|child)[- ]friendly|n't (?:family|kid|child)[- ]friendly"
        r"|\badults only|\bno (?:children|kids)\b|\bnot (?:welcome|allow) (?:children|kids)",
    },
}
"""attribute -> value -> regular expression (matched case-insensitively) that realises it."""

_COMPILED = {
    attr: {value: re.compile(p, re.IGNORECASE) for value, p in table.items()}
    for attr, table in SLOT_PATTERNS.items()
}
_NO_CONFLICT_CHECK = frozenset({"eatType"})
_PROXIMITY = r"(?:near|close to|next to|not far from|by|beside)\s+"
_KEYS = r"(?:name|eat ?type|food|price ?range|customer[ _]?rating|area|family ?friendly|near)"
_MR_SPANS = (
    re.compile(rf"\b{_KEYS}\s*\[[^\]\n]*\]?", re.IGNORECASE),  # food[French]
    re.compile(rf"\b{_KEYS}\s*[:=]\s*[^,;|.\n]*", re.IGNORECASE),  # food: French, food=French
    re.compile(r"\[[^\]\n]*\]"),  # any other [...] span
)


def strip_meaning_representation(text: str) -> str:
    """``text`` without anything copied from a meaning representation: ``key[value]``,
    ``key: value`` and ``key=value`` spans, any other ``[...]`` span, and every line holding the
    ``|`` attribute separator. Fluent sentences come back unchanged."""
    lines = [line for line in text.splitlines() if "|" not in line]
    kept = "\n".join(lines)
    for pattern in _MR_SPANS:
        kept = pattern.sub(" ", kept)
    return kept


def slot_matches(text: str, record: Mapping[str, str]) -> dict[str, bool]:
    """For each attribute of ``record``, whether ``text`` realises its value correctly.

    Text copied from a meaning representation is ignored (:func:`strip_meaning_representation`).
    Raises ``ValueError`` for an attribute or closed value the rules do not know.
    """
    text = strip_meaning_representation(text)
    result = {}
    for attr, value in record.items():
        if attr == "name":
            ok = re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.IGNORECASE) is not None
        elif attr == "near":
            pattern = rf"\b{_PROXIMITY}{re.escape(value)}(?!\w)"
            ok = re.search(pattern, text, re.IGNORECASE) is not None
        elif attr in _COMPILED:
            table = _COMPILED[attr]
            if value not in table:
                raise ValueError(f"no slot rule for {attr}[{value}]: known {sorted(table)}")
            ok = table[value].search(text) is not None
            if ok and attr not in _NO_CONFLICT_CHECK:
                ok = not any(p.search(text) for v, p in table.items() if v != value)
        else:
            raise ValueError(f"unknown attribute {attr!r}: known name, near, {sorted(_COMPILED)}")
        result[attr] = ok
    return result


def slot_accuracy(predictions: Sequence[str], records: Sequence[Mapping[str, str]]) -> float:
    """Percentage of all attributes, over all records, whose value the prediction realises."""
    _check_lengths(predictions, records)
    total = correct = 0
    for text, record in zip(predictions, records, strict=True):
        matches = slot_matches(text, record)
        total += len(matches)
        correct += sum(matches.values())
    return 100.0 * correct / total if total else 0.0


def tokenize_bleu(text: str) -> list[str]:
    """Split on whitespace and punctuation, like sacreBLEU's 13a (every symbol its own token)."""
    return re.findall(r"\w+|[^\w\s]", text)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4
) -> float:
    """Corpus-level BLEU (Papineni et al. 2002) in ``[0, 100]``, sacreBLEU-style, no smoothing.

    ``references[i]`` holds one or more references for ``hypotheses[i]``. N-gram matches are
    clipped by the maximum count in any one reference; the brevity penalty uses, per sentence, the
    reference length closest to the hypothesis length (the shorter one on a tie). Returns 0 when
    any n-gram order has no match. Equal to sacreBLEU's ``corpus_bleu(..., tokenize="none",
    smooth_method="none")`` on text pre-split by :func:`tokenize_bleu`.
    """
    _check_lengths(hypotheses, references)
    matches = [0] * max_order
    totals = [0] * max_order
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        if len(refs) == 0:
            raise ValueError("every hypothesis needs at least one reference")
        h = tokenize_bleu(hyp)
        rs = [tokenize_bleu(r) for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_order + 1):
            counts = _ngrams(h, n)
            best: Counter = Counter()
            for r in rs:
                best |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_order
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


def first_word(text: str) -> str:
    """The first word of ``text``, lower-cased, without surrounding punctuation ('' if none)."""
    words = re.findall(r"[\w£'-]+", text.lower())
    return words[0] if words else ""


def accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Percentage of predictions whose first word is the target's first word (verbalizer tasks)."""
    _check_lengths(predictions, targets)
    if not targets:
        return 0.0
    hits = sum(first_word(p) == first_word(t) for p, t in zip(predictions, targets, strict=True))
    return 100.0 * hits / len(targets)


def normalise_answer(text: str) -> str:
    """The first line, lower-cased, without a leading "the", outer punctuation, extra spaces."""
    lines = text.strip().splitlines()
    text = " ".join(lines[0].lower().split()) if lines else ""
    text = text.strip(" .,;:!?\"'")
    return re.sub(r"^the\s+", "", text)


def answer_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Percentage of predictions equal to the answer after :func:`normalise_answer`."""
    _check_lengths(predictions, answers)
    if not answers:
        return 0.0
    pairs = zip(predictions, answers, strict=True)
    hits = sum(normalise_answer(p) == normalise_answer(a) for p, a in pairs)
    return 100.0 * hits / len(answers)


# --- error bars -------------------------------------------------------------------------------


def bootstrap_ci(
    scores: Sequence[float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> tuple[float, float, float]:
    """The mean of ``scores`` and a percentile bootstrap confidence interval for it.

    ``scores`` holds one number per evaluation input (e.g. each input's slot accuracy, or its 0 /
    100 correctness); the mean is the score a table reports. ``weights`` (positive, one per
    input) make it a weighted mean: with each input's number of slots as its weight, the mean of
    the inputs' slot accuracies is the micro-averaged :func:`slot_accuracy` of the whole set.
    Each of ``n_boot`` replicates draws ``len(scores)`` inputs with replacement (an input keeps
    its weight) and takes their mean; the interval is the central ``level`` share of those
    means (``level=0.95``: their 2.5th and 97.5th percentiles). It says how far the mean could
    move had other inputs been drawn from the same pool — not what another training seed would
    do (:func:`bootstrap_ci_seeds`). To compare two methods scored on the same inputs, bootstrap
    the per-input differences: an interval that excludes 0 is a difference the inputs support.

    Deterministic for a given ``seed``; constant scores give a zero-width interval. Returns
    ``(mean, low, high)``. Raises ``ValueError`` for no scores, a non-finite score, weights that
    are not one positive number per score, ``n_boot`` < 1 or ``level`` outside (0, 1).
    """
    run = _Run(scores, weights, "scores")
    _check_bootstrap(n_boot, level)
    rng = random.Random(seed)
    means = [run.resampled_mean(rng) for _ in range(n_boot)]
    return (run.mean, *_central_interval(means, level))


def bootstrap_ci_seeds(
    scores_by_seed: Sequence[Sequence[float]],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    weights_by_seed: Sequence[Sequence[float]] | None = None,
) -> tuple[float, float, float]:
    """The mean over training seeds and a two-level bootstrap interval: seeds, then inputs.

    ``scores_by_seed[s]`` holds the per-input scores of the run with seed ``s`` (the runs may be
    scored on the same inputs or not; ``weights_by_seed[s]``, if given, their weights as in
    :func:`bootstrap_ci`). The mean is the average of the runs' means, each seed weighted
    equally. Each replicate draws as many seeds as there are, with replacement, then for each
    drawn seed its inputs, with replacement, and averages — so the interval covers both which
    inputs were scored and which seed trained the model. With a handful of seeds it is rough and
    tends to be too narrow (3 seeds can be resampled only 10 ways): read it as "at least this
    uncertain". One seed reduces to :func:`bootstrap_ci`.

    Returns ``(mean, low, high)``; deterministic for a given ``seed``. Raises ``ValueError`` for
    no seeds, a seed without scores, a non-finite score, bad weights, ``n_boot`` < 1 or
    ``level`` outside (0, 1).
    """
    if isinstance(scores_by_seed, (str, bytes)) or len(scores_by_seed) == 0:
        raise ValueError("bootstrap_ci_seeds needs the scores of at least one seed, got none")
    if weights_by_seed is not None and len(weights_by_seed) != len(scores_by_seed):
        raise ValueError(
            f"weights_by_seed has {len(weights_by_seed)} entries for {len(scores_by_seed)} seeds"
        )
    runs = [
        _Run(s, None if weights_by_seed is None else weights_by_seed[i], f"scores_by_seed[{i}]")
        for i, s in enumerate(scores_by_seed)
    ]
    _check_bootstrap(n_boot, level)
    rng = random.Random(seed)
    k = len(runs)
    means = []
    for _ in range(n_boot):
        drawn = rng.choices(runs, k=k)
        means.append(math.fsum(run.resampled_mean(rng) for run in drawn) / k)
    centre = math.fsum(run.mean for run in runs) / k
    return (centre, *_central_interval(means, level))


class _Run:
    """One run's per-input scores and weights, checked; its mean and resampled means."""

    def __init__(self, scores: Sequence[float], weights: Sequence[float] | None, name: str):
        if isinstance(scores, (str, bytes)):
            raise ValueError(f"{name} must be a sequence of numbers, got a string")
        self.scores = [float(v) for v in scores]
        if not self.scores:
            raise ValueError(f"{name} is empty: a bootstrap needs at least one score")
        bad = [v for v in self.scores if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{name} holds {len(bad)} non-finite score(s), e.g. {bad[0]}")
        self.weights = None
        if weights is not None:
            self.weights = [float(w) for w in weights]
            if len(self.weights) != len(self.scores):
                raise ValueError(
                    f"the weights of {name} are {len(self.weights)} for {len(self.scores)} scores"
                )
            if not all(math.isfinite(w) and w > 0 for w in self.weights):
                raise ValueError(f"the weights of {name} must be positive and finite")
        self.mean = self._mean(range(len(self.scores)))

    def _mean(self, picks) -> float:
        if self.weights is None:
            return math.fsum(self.scores[i] for i in picks) / len(picks)
        total = math.fsum(self.weights[i] for i in picks)
        return math.fsum(self.scores[i] * self.weights[i] for i in picks) / total

    def resampled_mean(self, rng: random.Random) -> float:
        n = len(self.scores)
        return self._mean(rng.choices(range(n), k=n))


def _check_bootstrap(n_boot: int, level: float) -> None:
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level!r}")


def _central_interval(values: list[float], level: float) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles, linearly interpolated."""
    ordered = sorted(values)

    def quantile(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return quantile((1 - level) / 2), quantile((1 + level) / 2)


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} predictions for {len(b)} examples")
