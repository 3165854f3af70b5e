"""Score a student's trained prompt or prefix on the hidden test split.

The notebooks train a soft prompt (01) or a deep prefix (02), save it (``prompt.pt``,
``prefix.pt``) and, when graded, load it instead of training again. These checks score the
trained VALUES only: they load a fresh copy of the backbone the notebook used (so a backbone the
student changed cannot help), run the grader's own forward pass with the student's vectors, and
generate greedily on the hidden ``test`` split of the task.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import course
from autograder.checks.harness import describe, sandbox
from course.compat import cache_keyword, kv_geometry, make_cache
from course.data import get_task

__all__ = [
    "check_prefix_artifact",
    "check_prompt_artifact",
    "generate_scores",
    "prefix_artifact_scores",
    "prompt_artifact_scores",
]

N_TEST = 64
BATCH = 32


def _fresh_backbone(model: nn.Module) -> tuple[nn.Module, object]:
    """A new copy of the backbone (and its tokenizer) that ``model`` was loaded as, on its
    device and in its dtype."""
    choice = getattr(model, "course_choice", None)
    name = "tiny" if choice is None or choice.is_tiny else choice.source
    dtype = model.get_input_embeddings().weight.dtype
    return course.load_backbone(name, device=model.device, dtype=dtype)


@torch.no_grad()
def generate_scores(
    generate: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    tokenizer,
    task_name: str,
    n: int = N_TEST,
    device: torch.device | None = None,
) -> dict:
    """Greedy generation on the first ``n`` examples of the hidden split, scored by the task.

    ``generate(input_ids, attention_mask, max_new_tokens)`` gets left-padded ``(B, T)`` inputs
    and returns the new tokens ``(B, N)``; decoding stops at the tokenizer's eos.
    """
    task = get_task(task_name)
    examples = task.examples("test", n)
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


def _require(label: str, score: float, threshold: float, metric: str, n: int, what: str) -> None:
    if not score >= threshold:
        raise AssertionError(
            f"your trained {label} scores {metric} {score:.1f} on {n} hidden test examples, "
            f"expected at least {threshold:g}. Train it longer or with a better learning rate, "
            f"check it on the validation split, and save it again ({what})"
        )


def _greedy(tokenizer) -> dict:
    return {
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def prompt_artifact_scores(
    prompt: nn.Module, model: nn.Module, task_name: str = "data_to_text", n: int = N_TEST
) -> dict:
    """Scores of the trained soft prompt (``prompt.weight``, ``(P, d)``) in front of the token
    embeddings of a fresh copy of the backbone, on the hidden test split."""
    with sandbox():
        weight = getattr(prompt, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise AssertionError(
                f"the trained prompt's .weight is {describe(weight)}, expected a (P, d) tensor"
            )
        backbone, tokenizer = _fresh_backbone(model)
        embedding = backbone.get_input_embeddings()
        if weight.shape[1] != embedding.weight.shape[1]:
            raise AssertionError(
                f"the trained prompt has width {weight.shape[1]} but the backbone's hidden size "
                f"is {embedding.weight.shape[1]}: it was trained on another backbone"
            )
        vectors = weight.detach().to(embedding.weight.device, embedding.weight.dtype)
        p = vectors.shape[0]

        def generate(ids: torch.Tensor, mask: torch.Tensor, max_new: int) -> torch.Tensor:
            soft = vectors.unsqueeze(0).expand(ids.shape[0], -1, -1)
            return backbone.generate(  # with inputs_embeds only the new tokens come back
                inputs_embeds=torch.cat([soft, embedding(ids)], 1),
                attention_mask=torch.cat([mask.new_ones(ids.shape[0], p), mask], 1),
                max_new_tokens=max_new,
                **_greedy(tokenizer),
            )

        return generate_scores(generate, tokenizer, task_name, n, backbone.device)


def check_prompt_artifact(
    prompt: nn.Module,
    model: nn.Module,
    task_name: str = "data_to_text",
    threshold: float = 50.0,
    n: int = N_TEST,
) -> None:
    """Your trained soft prompt, on a fresh copy of the backbone, reaches ``threshold`` on the
    task's primary metric on the hidden test split."""
    scores = prompt_artifact_scores(prompt, model, task_name, n)
    metric = get_task(task_name).primary_metric
    _require("soft prompt", scores[metric], threshold, metric, n, "prompt.pt")


def prefix_artifact_scores(
    encoder: nn.Module, model: nn.Module, task_name: str = "data_to_text", n: int = N_TEST
) -> dict:
    """Scores of the trained prefix (``encoder()``, ``(L, 2, H, P, D)``) as every layer's cache
    of a fresh copy of the backbone, on the hidden test split."""
    with sandbox():
        with torch.no_grad():
            prefix = encoder()
        backbone, tokenizer = _fresh_backbone(model)
        g = kv_geometry(backbone.config)
        want = (g["n_layers"], 2, g["n_kv_heads"], g["head_dim"])
        if not isinstance(prefix, torch.Tensor) or prefix.dim() != 5:
            raise AssertionError(
                f"encoder() returned {describe(prefix)}, expected (L, 2, H, P, D) = "
                f"({want[0]}, 2, {want[2]}, P, {want[3]})"
            )
        got = (prefix.shape[0], prefix.shape[1], prefix.shape[2], prefix.shape[4])
        if got != want:
            raise AssertionError(
                f"the trained prefix has shape {tuple(prefix.shape)}, expected "
                f"({want[0]}, 2, {want[2]}, P, {want[3]}) for this backbone"
            )
        emb = backbone.get_input_embeddings().weight
        prefix = prefix.detach().to(emb.device, emb.dtype)
        p = prefix.shape[3]

        def generate(ids: torch.Tensor, mask: torch.Tensor, max_new: int) -> torch.Tensor:
            b = ids.shape[0]
            cache = make_cache([(layer[0].expand(b, -1, -1, -1), layer[1].expand(b, -1, -1, -1))
                                for layer in prefix])  # fmt: skip
            out = backbone.generate(
                input_ids=ids,
                attention_mask=torch.cat([mask.new_ones(b, p), mask], 1),
                max_new_tokens=max_new,
                **{cache_keyword(backbone): cache},
                **_greedy(tokenizer),
            )
            return out[:, ids.shape[1] :]

        return generate_scores(generate, tokenizer, task_name, n, backbone.device)


def check_prefix_artifact(
    encoder: nn.Module,
    model: nn.Module,
    task_name: str = "data_to_text",
    threshold: float = 50.0,
    n: int = N_TEST,
) -> None:
    """Your trained prefix, as every layer's cache of a fresh copy of the backbone, reaches
    ``threshold`` on the task's primary metric on the hidden test split."""
    scores = prefix_artifact_scores(encoder, model, task_name, n)
    metric = get_task(task_name).primary_metric
    _require("prefix", scores[metric], threshold, metric, n, "prefix.pt")
