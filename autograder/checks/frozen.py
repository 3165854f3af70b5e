"""Checks that the backbone stays frozen: flags, and bit-identical weights after training.

:func:`check_backbone_unchanged_after_training` is generic: it takes the student's
``freeze_backbone`` plus two adapters, ``make_trainable(model) -> nn.Module`` (builds the
student's trainable module, e.g. a soft prompt) and ``forward(model, module, input_ids,
attention_mask, labels) -> outputs with .loss``, and then trains with the GRADER's own optimizer
over every parameter that requires grad anywhere. If the backbone changes, some backbone
parameter was left trainable, whatever the student's own training loop would have done.
The notebook-facing checks (``check_prompt_training``, ``check_prefix_training``) define the
adapters, so students pass only their own objects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from autograder.checks.harness import name_of, sandbox, student_call
from autograder.checks.models import Batch, tiny_models

__all__ = [
    "check_backbone_unchanged_after_training",
    "check_freeze_backbone",
    "snapshot",
    "train_with_grader_optimizer",
    "unchanged_or_fail",
    "verify_training",
]

MakeTrainable = Callable[[nn.Module], nn.Module]
Forward = Callable[..., object]


def _show(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of ``model``, by name."""
    state = {f"parameter {n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer {n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def unchanged_or_fail(
    label: str, model: nn.Module, before: dict[str, torch.Tensor], when: str
) -> None:
    """Raise unless every parameter and buffer of ``model`` is bit-identical to ``before``."""
    now = snapshot(model)
    changed = [n for n, t in before.items() if n not in now or not torch.equal(now[n], t)]
    if changed:
        raise AssertionError(
            f"{label}: {when}, the backbone changed: {_show(changed)}. Expected every backbone "
            "parameter and buffer bit-identical — some backbone parameter still has "
            "requires_grad=True (freeze_backbone must freeze ALL of model.parameters(), the "
            "output head and the norms included), or something writes to the weights"
        )


def check_freeze_backbone(freeze_backbone: Callable[[nn.Module], object]) -> None:
    """freeze_backbone: no parameter of GPT-2 or Llama-GQA requires grad afterwards, and no
    weight or buffer changed."""
    with sandbox():
        for label, model in tiny_models():
            before = snapshot(model)
            student_call("freeze_backbone(model)", freeze_backbone, model)
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            if trainable:
                total = sum(p.numel() for p in model.parameters() if p.requires_grad)
                hint = ""
                if any("lm_head" in n for n in trainable):
                    hint = (
                        " The untied output head lm_head is a parameter of the model too, not of "
                        "its decoder (model.base_model)."
                    )
                elif all(p.dim() == 1 for n, p in model.named_parameters() if n in trainable):
                    hint = " Biases and norm weights are parameters too."
                raise AssertionError(
                    f"{label}: after freeze_backbone, {len(trainable)} parameter tensors "
                    f"({total} values) still require grad: {_show(trainable)}. Expected none — "
                    "set requires_grad=False on every p in model.parameters() (model.eval() does "
                    f"not freeze anything).{hint}"
                )
            unchanged_or_fail(label, model, before, "after freeze_backbone")


def train_with_grader_optimizer(
    label: str,
    model: nn.Module,
    module: nn.Module,
    forward: Forward,
    steps: int = 3,
    lr: float = 0.05,
) -> None:
    """``steps`` AdamW steps over every parameter of ``model`` and ``module`` that requires grad.

    The loss is ``forward(model, module, input_ids, attention_mask, labels).loss`` on a small
    padded batch ``(2, 6)``.
    """
    seen: dict[int, nn.Parameter] = {}
    for p in [*model.parameters(), *module.parameters()]:
        if p.requires_grad:
            seen.setdefault(id(p), p)
    if not seen:
        raise AssertionError(
            f"{label}: nothing requires grad after freezing and building the trainable module: the "
            "trainable module's parameters must keep requires_grad=True"
        )
    optimizer = torch.optim.AdamW(list(seen.values()), lr=lr, weight_decay=0.01)
    batch = Batch()
    for _ in range(steps):
        out = student_call(
            "the forward pass (your forward function on the model and the trainable module)",
            forward,
            model,
            module,
            batch.input_ids,
            batch.attention_mask,
            batch.labels,
        )
        loss = getattr(out, "loss", None)
        if loss is None:
            raise AssertionError(
                f"{label}: the forward pass returned no loss although labels were given: pass "
                "labels to the model"
            )
        if not loss.requires_grad:
            raise AssertionError(
                f"{label}: the loss has no gradient path to any trainable parameter: is the "
                "trainable module's output detached (.detach(), .data, torch.no_grad()) before "
                "it enters the model?"
            )
        optimizer.zero_grad()
        try:
            loss.backward()
        except RuntimeError as err:
            raise AssertionError(f"{label}: loss.backward() failed during training: {err}") from err
        optimizer.step()


def verify_training(
    label: str,
    model: nn.Module,
    freeze_backbone: Callable[[nn.Module], object],
    make_trainable: MakeTrainable,
    forward: Forward,
    expected_trainable: tuple[int, str] | None = None,
    what: str = "the trainable module",
) -> None:
    """Freeze ``model``, build the trainable module, train it with the grader's optimizer and
    require the backbone bit-identical, the module changed and (when given as ``(count,
    formula)``) exactly ``count`` trainable values in the module."""
    before = snapshot(model)
    student_call("freeze_backbone(model)", freeze_backbone, model)
    module = student_call(f"{name_of(make_trainable)}(model)", make_trainable, model)
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    train_with_grader_optimizer(label, model, module, forward)
    unchanged_or_fail(label, model, before, "after 3 AdamW steps")
    if not any(not torch.equal(p, start[n]) for n, p in module.named_parameters()):
        raise AssertionError(
            f"{label}: after 3 AdamW steps {what} has not changed: no gradient reaches its "
            "parameters (are they detached, or used under torch.no_grad()?)"
        )
    if expected_trainable is not None:
        want, formula = expected_trainable
        count = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if count != want:
            names = [n for n, p in module.named_parameters() if p.requires_grad]
            raise AssertionError(
                f"{label}: {what} has {count} trainable values ({_show(names)}), expected "
                f"{formula} = {want}"
            )


def check_backbone_unchanged_after_training(
    freeze_backbone: Callable[[nn.Module], object],
    make_trainable: MakeTrainable,
    forward: Forward,
) -> None:
    """After freeze_backbone and 3 steps of the grader's own AdamW over every parameter that
    requires grad, every backbone parameter and buffer is bit-identical and the trainable module
    has changed."""
    with sandbox():
        for label, model in tiny_models():
            verify_training(label, model, freeze_backbone, make_trainable, forward)
