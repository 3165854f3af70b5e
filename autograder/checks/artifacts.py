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

__all__ = ["check_prefix_artifact", "check_prompt_artifact", "score_forward"]

N_TEST = 64


def _fresh_backbone(model: nn.Module) -> tuple[nn.Module, object]:
    """A new copy of the backbone ``model`` was loaded as, on its device."""
    choice = getattr(model, "course_choice", None)
    name = "tiny" if choice is None or choice.is_tiny else choice.source
    dtype = model.get_input_embeddings().weight.dtype
    return course.load_backbone(name, device=model.device, dtype=dtype)


def score_forward(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokenizer,
    task_name: str,
    n: int = N_TEST,
    device: torch.device | None = None,
) -> dict:
    """``course.evaluate`` on the first ``n`` examples of the hidden split of ``task_name``."""
    task = get_task(task_name)
    return course.evaluate(
        task, forward, tokenizer, task.examples("test", n), device=device, show_progress=False
    )


def _require(label: str, score: float, threshold: float, metric: str, n: int, what: str) -> None:
    if not score >= threshold:
        raise AssertionError(
            f"your trained {label} scores {metric} {score:.1f} on {n} hidden test examples, "
            f"expected at least {threshold:g}. Train it longer or with a better learning rate, "
            f"check it on the validation split, and save it again ({what})"
        )


def check_prompt_artifact(
    prompt: nn.Module,
    model: nn.Module,
    tokenizer,
    task_name: str = "data_to_text",
    threshold: float = 50.0,
    n: int = N_TEST,
) -> dict:
    """The trained soft prompt (``prompt.weight``, ``(P, d)``) prepended to the token embeddings
    of a fresh backbone reaches ``threshold`` on the task's primary metric. Returns the scores."""
    with sandbox():
        weight = getattr(prompt, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise AssertionError(
                f"the trained prompt's .weight is {describe(weight)}, expected a (P, d) tensor"
            )
        backbone, _ = _fresh_backbone(model)
        embedding = backbone.get_input_embeddings()
        if weight.shape[1] != embedding.weight.shape[1]:
            raise AssertionError(
                f"the trained prompt has width {weight.shape[1]} but the backbone's hidden size "
                f"is {embedding.weight.shape[1]}: it was trained on another backbone"
            )
        vectors = weight.detach().to(embedding.weight.device, embedding.weight.dtype)
        p = vectors.shape[0]

        @torch.no_grad()
        def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            embeds = embedding(ids)
            soft = vectors.unsqueeze(0).expand(ids.shape[0], -1, -1)
            out = backbone(
                inputs_embeds=torch.cat([soft, embeds], 1),
                attention_mask=torch.cat([mask.new_ones(ids.shape[0], p), mask], 1),
            )
            return out.logits[:, p:]

        scores = score_forward(forward, tokenizer, task_name, n, backbone.device)
        metric = get_task(task_name).primary_metric
        _require("soft prompt", scores[metric], threshold, metric, n, "prompt.pt")
        return scores


def check_prefix_artifact(
    encoder: nn.Module,
    model: nn.Module,
    tokenizer,
    task_name: str = "data_to_text",
    threshold: float = 50.0,
    n: int = N_TEST,
) -> dict:
    """The trained prefix (``encoder()``, ``(L, 2, H, P, D)``) fed as every layer's cache of a
    fresh backbone reaches ``threshold`` on the task's primary metric. Returns the scores."""
    with sandbox():
        with torch.no_grad():
            prefix = encoder()
        backbone, _ = _fresh_backbone(model)
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
        keyword = cache_keyword(backbone)

        @torch.no_grad()
        def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            b, t = ids.shape
            cache = make_cache(
                [
                    (layer[0].expand(b, -1, -1, -1), layer[1].expand(b, -1, -1, -1))
                    for layer in prefix
                ]
            )
            out = backbone(
                input_ids=ids,
                attention_mask=torch.cat([mask.new_ones(b, p), mask], 1),
                position_ids=torch.arange(p, p + t, device=ids.device).expand(b, -1),
                use_cache=False,
                **{keyword: cache},
            )
            return out.logits

        scores = score_forward(forward, tokenizer, task_name, n, backbone.device)
        metric = get_task(task_name).primary_metric
        _require("prefix", scores[metric], threshold, metric, n, "prefix.pt")
        return scores
