"""Score a student's trained prompt or prefix on the hidden test split, on its own backbone.

The notebooks train a soft prompt (01) or a deep prefix (02), save it (``prompt.pt``,
``prefix.pt``, each with a ``.backbone.json`` stamp naming the backbone it was trained for) and,
when graded, load it instead of training again. The kernel only *observes* (the trained values,
and which backbone the notebook ran on, with a full hash of its weights); the grader *judges*:
it loads its own copy of that backbone, refuses a notebook whose backbone is not bit-identical
to the released one, feeds the values through its own forward pass and generates greedily on
inputs drawn like the hidden ``test`` split's, fresh for each grading run (so no public list holds
them), with the threshold it holds for that backbone (:data:`THRESHOLDS`).
A backbone the grader does not have is reported with the backbones it can score.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable

import torch
from torch import nn

import course
from autograder.checks.fixtures import reference
from autograder.checks.harness import current_variant, describe, grader_secret, seeded
from autograder.checks.prefix import FixedPrefix
from autograder.checks.protocol import MalformedObservation, Observed, run_check
from course.compat import kv_geometry
from course.data import get_task

__all__ = [
    "THRESHOLDS",
    "check_prefix_artifact",
    "check_prompt_artifact",
    "generate_scores",
    "judge_prefix_artifact",
    "judge_prompt_artifact",
    "observe_prefix_artifact",
    "observe_prompt_artifact",
    "prefix_artifact_scores",
    "prompt_artifact_scores",
]

N_TEST = 64
SAMPLE_INPUT = 9_001
"""The input number (:func:`~autograder.checks.harness.seeded`) of the graded draw of inputs."""
BATCH = 32
MAX_PREFIX = 512
"""Longest prompt or prefix (positions) the grader scores."""

THRESHOLDS: dict[str, dict[str, float]] = {
    "prompt": {"tiny": 8.0, "smollm2-135m": 40.0},
    "prefix": {"tiny": 12.0, "smollm2-135m": 60.0},
}
"""Least slot accuracy (:data:`N_TEST` hidden-split inputs) a trained artifact needs, per
kind and backbone. The tiny LM's reference prompt scores 16–25 and its prefix 22–28 (six draws); see
``benchmarks/RESULTS.md`` for SmolLM2-135M's."""


# ------------------------------------------------------------------------------- the backbone


def _full_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, fp32 bytes): bit-identity."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            digest.update(f"{name}:{tuple(t.shape)}:".encode())
            digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _notebook_backbone(model: nn.Module) -> dict:
    """What the kernel reports about the backbone the notebook used."""
    from course.backbone import backbone_signature

    return {**backbone_signature(model), "full_sha256": _full_hash(model)}


def graded_backbones() -> list[str]:
    """The backbones this grader can score artifacts on: the tiny LM, and SmolLM2-135M once
    fetched (``python -m course fetch smollm2-135m``)."""
    from course.backbone import available_backbones

    return [b["name"] for b in available_backbones(check_hub=False) if b["available"] is True]


@functools.lru_cache(maxsize=2)
def _grader_copy(name: str) -> tuple[nn.Module, object, dict]:
    """The grader's own copy of backbone ``name`` on the CPU in fp32, its tokenizer, and its
    signature (cached: the copy is never modified)."""
    model, tok = course.load_backbone(name, device="cpu", dtype="float32")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, _notebook_backbone(model)


def _backbone_for(kind: str, obs: Observed, artifact: str) -> tuple[nn.Module, object, str]:
    """The grader's copy of the backbone the notebook ran on; refuses a backbone the grader
    lacks or one that is not bit-identical to the released one."""
    seen = obs.sub("backbone")
    name = seen.str("name")
    here = graded_backbones()
    if name not in here or name not in THRESHOLDS[kind]:
        raise AssertionError(
            f"your {artifact} was scored on the backbone {name!r}, which this grader does not "
            f"have; it can score {kind}s trained on: {', '.join(here)}. Train and save it on one "
            f"of those (course.load_backbone({here[0]!r})) and submit it with its "
            f"{artifact}.backbone.json stamp"
        )
    model, tok, signature = _grader_copy(name)
    if seen.str("config_sha256") != signature["config_sha256"]:
        raise AssertionError(
            f"the notebook's backbone is not the released {name!r}: its configuration differs "
            "(another model was loaded). Load it with course.load_backbone and do not change it"
        )
    if seen.str("full_sha256") != signature["full_sha256"]:
        raise AssertionError(
            f"the notebook's backbone is not bit-identical to the released {name!r}: some "
            "weight changed during the notebook (trained or edited). Freeze it and train only "
            "the prompt or prefix"
        )
    return model, tok, name


def _artifact_stamp(artifact: str) -> dict | None:
    from course.artifacts import read_stamp

    try:
        return read_stamp(artifact)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------- scoring


@torch.no_grad()
def generate_scores(
    generate: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    tokenizer,
    task_name: str,
    n: int = N_TEST,
    device: torch.device | None = None,
) -> dict:
    """Greedy generation on ``n`` examples of the hidden split, scored by the task: its first
    ``n`` in a student's own run (variant 0); when graded, a fresh draw
    (:meth:`course.data.Task.sample`) from the grader's own secret, which no kernel sees — not
    from the variant, which the kernel knows and could fit an artifact to.

    ``generate(input_ids, attention_mask, max_new_tokens)`` gets left-padded ``(B, T)`` inputs
    and returns the new tokens ``(B, N)``; decoding stops at the tokenizer's eos.
    """
    task = get_task(task_name)
    secret = grader_secret()
    if secret is not None:  # graded: inputs no kernel can compute (it knows the variant)
        examples = task.sample("test", n, secret)
    elif current_variant() == 0:
        examples = task.examples("test", n)
    else:
        examples = task.sample("test", n, seeded(SAMPLE_INPUT))
    predictions: list[str] = []
    side, threads = tokenizer.padding_side, torch.get_num_threads()
    tokenizer.padding_side = "left"
    torch.set_num_threads(1)  # token-by-token decoding of a small model: threads only contend
    try:
        for start in range(0, len(examples), BATCH):
            chunk = examples[start : start + BATCH]
            enc = tokenizer(
                [ex.prompt for ex in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            new = generate(
                enc["input_ids"].to(device), enc["attention_mask"].to(device), task.max_new_tokens
            )
            predictions += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    finally:
        tokenizer.padding_side = side
        torch.set_num_threads(threads)
    return task.score(predictions, examples)


def _greedy(tokenizer) -> dict:
    return {
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _score_prompt(
    vectors: torch.Tensor, backbone: nn.Module, tokenizer, task_name: str, n: int
) -> dict:
    embedding = backbone.get_input_embeddings()
    if vectors.shape[1] != embedding.weight.shape[1]:
        raise AssertionError(
            f"the trained prompt has width {vectors.shape[1]} but the backbone's hidden size "
            f"is {embedding.weight.shape[1]}: it was trained on another backbone"
        )
    vectors = vectors.to(embedding.weight.device, embedding.weight.dtype)
    ref, prompt = reference(), _FixedPrompt(vectors)

    def generate(ids: torch.Tensor, mask: torch.Tensor, max_new: int) -> torch.Tensor:
        inputs = ref.prepend_prompt(backbone, prompt, ids, mask)
        # with inputs_embeds only the new tokens come back
        return backbone.generate(**inputs, max_new_tokens=max_new, **_greedy(tokenizer))

    return generate_scores(generate, tokenizer, task_name, n, backbone.device)


def _score_prefix(
    prefix: torch.Tensor, backbone: nn.Module, tokenizer, task_name: str, n: int
) -> dict:
    g = kv_geometry(backbone.config)
    want = (g["n_layers"], 2, g["n_kv_heads"], g["head_dim"])
    got = (prefix.shape[0], prefix.shape[1], prefix.shape[2], prefix.shape[4])
    if got != want:
        raise AssertionError(
            f"the trained prefix has shape {tuple(prefix.shape)}, expected "
            f"({want[0]}, 2, {want[2]}, P, {want[3]}) for this backbone"
        )
    emb = backbone.get_input_embeddings().weight
    ref, encoder = reference(), FixedPrefix(prefix.to(emb.device, emb.dtype))

    def generate(ids: torch.Tensor, mask: torch.Tensor, max_new: int) -> torch.Tensor:
        return ref.generate_with_prefix(backbone, encoder, ids, mask, max_new, **_greedy(tokenizer))

    return generate_scores(generate, tokenizer, task_name, n, backbone.device)


class _FixedPrompt(nn.Module):
    """Stored prompt vectors ``(P, d)`` as the reference's ``prepend_prompt`` takes a prompt."""

    def __init__(self, vectors: torch.Tensor) -> None:
        super().__init__()
        self.weight = vectors

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch, -1, -1)


def _require(label: str, score: float, threshold: float, metric: str, n: int, what: str) -> None:
    if not score >= threshold:
        raise AssertionError(
            f"your trained {label} scores {metric} {score:.1f} on {n} hidden test examples, "
            f"expected at least {threshold:g}. Train it longer or with a better learning rate, "
            f"check it on the validation split, and save it again ({what})"
        )


def _values(obs: Observed, key: str, dims: int, artifact: str) -> torch.Tensor:
    values = obs.tensor(key)
    if values.dim() != dims or not values.is_floating_point():
        raise AssertionError(
            f"the loaded {artifact} holds {describe(values)}, expected a floating-point tensor "
            f"with {dims} dimensions: is {artifact} the file your save function wrote?"
        )
    positions = values.shape[0] if dims == 2 else values.shape[3]
    if not 1 <= positions <= MAX_PREFIX:
        raise AssertionError(
            f"the loaded {artifact} has {positions} positions; expected 1 to {MAX_PREFIX}"
        )
    if not torch.isfinite(values).all():
        raise AssertionError(f"the loaded {artifact} holds NaN or infinite values")
    return values.detach().float()


def _stamp_note(obs: Observed, graded_on: str, artifact: str) -> None:
    """Fail with a clear message when the artifact was trained for another backbone than the
    one the notebook ran on (it was retrained here, or it cannot be used)."""
    stamp = obs.raw("stamp")
    if isinstance(stamp, dict) and isinstance(stamp.get("name"), str):
        if stamp["name"] != graded_on:
            raise AssertionError(
                f"your {artifact} was trained for {stamp['name']!r}, but the notebook ran on "
                f"{graded_on!r} here (the grader can score: {', '.join(graded_backbones())}). "
                f"Submit a {artifact} trained on one of those, with its stamp"
            )


# ------------------------------------------------------------------------------- the checks


def observe_prompt_artifact(prompt: nn.Module, model: nn.Module, *_: object) -> dict:
    """The trained prompt's values, its file's stamp, and the notebook's backbone."""
    weight = getattr(prompt, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise AssertionError(
            f"the trained prompt's .weight is {describe(weight)}, expected a (P, d) tensor"
        )
    return {
        "weight": weight.detach(),
        "stamp": _artifact_stamp("prompt.pt"),
        "backbone": _notebook_backbone(model),
    }


def judge_prompt_artifact(
    obs: Observed, task: str = "data_to_text", threshold: float | None = None, n: int = N_TEST
) -> None:
    backbone, tok, name = _backbone_for("prompt", obs, "prompt.pt")
    _stamp_note(obs, name, "prompt.pt")
    weight = _values(obs, "weight", 2, "prompt.pt")
    scores = _score_prompt(weight, backbone, tok, task, n)
    metric = get_task(task).primary_metric
    want = THRESHOLDS["prompt"][name] if threshold is None else threshold
    _require("soft prompt", scores[metric], want, metric, n, "prompt.pt")


def check_prompt_artifact(
    prompt: nn.Module,
    model: nn.Module,
    task: str = "data_to_text",
    threshold: float | None = None,
    n: int = N_TEST,
) -> None:
    """Your trained soft prompt, on the grader's copy of the backbone it was trained on,
    reaches that backbone's threshold on the task's primary metric on the hidden test split."""
    run_check(
        observe_prompt_artifact,
        judge_prompt_artifact,
        prompt,
        model,
        params={"task": task, "threshold": threshold, "n": n},
    )


def observe_prefix_artifact(encoder: nn.Module, model: nn.Module, *_: object) -> dict:
    """The trained prefix (``encoder()``, ``(L, 2, H, P, D)``), its file's stamp, and the
    notebook's backbone."""
    with torch.no_grad():
        prefix = encoder()
    if not isinstance(prefix, torch.Tensor) or prefix.dim() != 5:
        raise AssertionError(
            f"encoder() returned {describe(prefix)}, expected (L, 2, H, P, D) from prefix.pt"
        )
    return {
        "prefix": prefix.detach(),
        "stamp": _artifact_stamp("prefix.pt"),
        "backbone": _notebook_backbone(model),
    }


def judge_prefix_artifact(
    obs: Observed, task: str = "data_to_text", threshold: float | None = None, n: int = N_TEST
) -> None:
    backbone, tok, name = _backbone_for("prefix", obs, "prefix.pt")
    _stamp_note(obs, name, "prefix.pt")
    prefix = _values(obs, "prefix", 5, "prefix.pt")
    scores = _score_prefix(prefix, backbone, tok, task, n)
    metric = get_task(task).primary_metric
    want = THRESHOLDS["prefix"][name] if threshold is None else threshold
    _require("prefix", scores[metric], want, metric, n, "prefix.pt")


def check_prefix_artifact(
    encoder: nn.Module,
    model: nn.Module,
    task: str = "data_to_text",
    threshold: float | None = None,
    n: int = N_TEST,
) -> None:
    """Your trained prefix, as every layer's cache of the grader's copy of the backbone it was
    trained on, reaches that backbone's threshold on the task's primary metric on the hidden
    test split."""
    run_check(
        observe_prefix_artifact,
        judge_prefix_artifact,
        encoder,
        model,
        params={"task": task, "threshold": threshold, "n": n},
    )


def prompt_artifact_scores(
    prompt: nn.Module, model: nn.Module, task_name: str = "data_to_text", n: int = N_TEST
) -> dict:
    """Scores of ``prompt.weight`` ``(P, d)`` in front of the token embeddings of the grader's
    copy of ``model``'s backbone, on the hidden test split (for benchmarks and tests)."""
    backbone, tok, _ = _grader_copy(_name_of(model))
    return _score_prompt(prompt.weight.detach().float(), backbone, tok, task_name, n)


def prefix_artifact_scores(
    encoder: nn.Module, model: nn.Module, task_name: str = "data_to_text", n: int = N_TEST
) -> dict:
    """Scores of ``encoder()`` ``(L, 2, H, P, D)`` as every layer's cache of the grader's copy
    of ``model``'s backbone, on the hidden test split (for benchmarks and tests)."""
    backbone, tok, _ = _grader_copy(_name_of(model))
    with torch.no_grad():
        prefix = encoder().detach().float()
    return _score_prefix(prefix, backbone, tok, task_name, n)


def _name_of(model: nn.Module) -> str:
    choice = getattr(model, "course_choice", None)
    if choice is None:
        raise MalformedObservation("the model was not loaded with course.load_backbone")
    return choice.name
