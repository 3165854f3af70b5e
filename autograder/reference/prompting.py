"""Prompts as functions (notebook 03, section 1; Liu et al. 2021): a template with an input slot
``[X]`` and an answer slot ``[Z]``, and a verbalizer that reads a label at the answer slot."""

from __future__ import annotations

import torch

INPUT_SLOT, ANSWER_SLOT = "[X]", "[Z]"


def prompt_function(template: str, x: str) -> str:
    """The text a causal LM continues for input ``x``: ``template`` up to its answer slot, with
    the input slot filled by ``x`` (exactly, spaces included).

    A causal LM reads its answer only after everything it was given, so the answer slot must end
    the template (a *prefix* prompt, in Liu et al.'s terms; a *cloze* prompt with text after
    ``[Z]`` suits a masked LM). Raises ``ValueError`` unless ``template`` has exactly one ``[X]``
    and exactly one ``[Z]``, with ``[Z]`` last.
    """
    for slot in (INPUT_SLOT, ANSWER_SLOT):
        count = template.count(slot)
        if count != 1:
            raise ValueError(f"the template needs exactly one {slot} slot, found {count}")
    if not template.endswith(ANSWER_SLOT):
        raise ValueError(
            "the answer slot [Z] must end the template: a causal LM reads its answer only after "
            f"everything it was given (a prefix prompt); got {template!r}"
        )
    before, after = template[: -len(ANSWER_SLOT)].split(INPUT_SLOT)
    return before + x + after


def label_scores(
    logits: torch.Tensor, attention_mask: torch.Tensor, label_ids: list[int]
) -> torch.Tensor:
    """The verbalizer's scores ``(B, n_labels)``: for each row, the log-probability (under the
    whole vocabulary) of each label word's token at the answer slot, i.e. from the logits of the
    row's LAST REAL token, wherever the padding is (left or right).

    Args:
        logits: ``(B, T, V)`` of the model on the filled templates.
        attention_mask: ``(B, T)``, 1 on real tokens; each row's real tokens are contiguous.
        label_ids: one token id per label, in the verbalizer's order.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.bool()).argmax(dim=1)
    at_z = logits[torch.arange(logits.shape[0], device=logits.device), last]
    ids = torch.as_tensor(label_ids, device=logits.device)
    return torch.log_softmax(at_z.float(), dim=-1)[:, ids]
