"""Prompt tuning (notebook 01; Lester et al. 2021): vectors prepended to the input embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel  # noqa: F401

from autograder.reference.common import IGNORE_INDEX


# ---------------------------------------------------------------------------------------------
# Prompt tuning (Lester et al. 2021): trainable vectors prepended to the input embeddings only
# ---------------------------------------------------------------------------------------------
class SoftPrompt(nn.Module):
    """``n_tokens`` trainable input embeddings.

    Args:
        n_tokens: prompt length ``P``.
        embedding: the backbone's input embedding (``model.get_input_embeddings()``), read only to
            size and initialise the prompt; it is not stored.
        init: ``"random"`` (normal at the std of the real embedding rows), ``"vocab"`` (copies of
            randomly sampled rows), or ``"text"`` (the rows of ``init_ids``, cycled to ``P``).
        init_ids: token ids for ``init="text"``.
        seed: seeds the random and vocab initialisations.
    """

    def __init__(
        self,
        n_tokens: int,
        embedding: nn.Embedding,
        init: str = "random",
        init_ids: list[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        table = embedding.weight.detach()
        gen = torch.Generator().manual_seed(seed)
        if init == "random":
            std = table.float().std().item()
            values = torch.randn(n_tokens, table.shape[1], generator=gen) * std
        elif init == "vocab":
            ids = torch.randint(0, table.shape[0], (n_tokens,), generator=gen)
            values = table[ids].float().cpu().clone()
        elif init == "text":
            if not init_ids:
                raise ValueError('init="text" needs init_ids (the token ids of the text)')
            ids = torch.tensor([init_ids[i % len(init_ids)] for i in range(n_tokens)])
            values = table[ids].float().cpu().clone()
        else:
            raise ValueError(f'init must be "random", "vocab" or "text", got {init!r}')
        self.weight = nn.Parameter(values.to(device=table.device, dtype=table.dtype))

    @property
    def n_tokens(self) -> int:
        return self.weight.shape[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prompt repeated for the batch: ``(batch_size, P, d)``."""
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


def prepend_prompt(
    model: PreTrainedModel,
    prompt: SoftPrompt,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs with the soft prompt in front of the token embeddings.

    Returns ``inputs_embeds (B, P+T, d)``, ``attention_mask (B, P+T)`` (ones over the prompt) and,
    when ``labels (B, T)`` is given, ``labels (B, P+T)`` with ``-100`` over the prompt.
    """
    embeds = model.get_input_embeddings()(input_ids)
    batch = input_ids.shape[0]
    soft = prompt(batch).to(embeds.dtype)
    n = soft.shape[1]
    out = {
        "inputs_embeds": torch.cat([soft, embeds], dim=1),
        "attention_mask": torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1),
    }
    if labels is not None:
        out["labels"] = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
    return out


def prompt_forward(model, prompt, input_ids, attention_mask, labels=None):
    """Forward pass with a soft prompt; ``logits`` cover ``P+T`` positions."""
    return model(**prepend_prompt(model, prompt, input_ids, attention_mask, labels))


def save_prompt(prompt: SoftPrompt, path: str | Path) -> Path:
    """Save only the prompt vectors (a few KB) to ``path``."""
    path = Path(path)
    torch.save({"weight": prompt.weight.detach().cpu(), "kind": "soft_prompt"}, path)
    return path


def load_prompt(path: str | Path, embedding: nn.Embedding) -> SoftPrompt:
    """Load a prompt saved by :func:`save_prompt` onto ``embedding``'s device and dtype."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if state.get("kind") != "soft_prompt":
        raise ValueError(f"{path} does not hold a soft prompt saved by save_prompt")
    weight = state["weight"]
    if weight.shape[1] != embedding.weight.shape[1]:
        raise ValueError(
            f"prompt width {weight.shape[1]} != model hidden size {embedding.weight.shape[1]}"
        )
    prompt = SoftPrompt(weight.shape[0], embedding)
    with torch.no_grad():
        prompt.weight.copy_(weight)
    return prompt
