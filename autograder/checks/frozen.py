"""Checks that the backbone stays frozen: flags, and bit-identical weights after training.

Each check is an *observe* / *judge* pair (see :mod:`autograder.checks.protocol`): observing
runs the student's code on tiny models built from the current variant and records the weights
and flags it left; judging rebuilds the same models and compares, bit for bit.

:func:`observe_training` / :func:`judge_training` are generic: they take the student's
``freeze_backbone`` plus two adapters, ``make_trainable(model) -> nn.Module`` (builds the
student's trainable module, e.g. a soft prompt) and ``forward(model, module, input_ids,
attention_mask, labels) -> outputs with .loss``, and train with the GRADER's own optimizer over
every parameter that requires grad anywhere. If the backbone changes, some backbone parameter
was left trainable, whatever the student's own training loop would have done. The notebook-facing
checks (``check_prompt_training``, ``check_prefix_training``) define the adapters, so students
pass only their own objects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from autograder.checks.harness import name_of, student_call
from autograder.checks.models import KINDS, Batch, tiny_models
from autograder.checks.protocol import MalformedObservation, Observed, run_check

__all__ = [
    "check_backbone_unchanged_after_training",
    "check_freeze_backbone",
    "judge_backbone_unchanged_after_training",
    "judge_freeze_backbone",
    "judge_training",
    "observe_backbone_unchanged_after_training",
    "observe_freeze_backbone",
    "observe_training",
    "snapshot",
    "train_with_grader_optimizer",
    "unchanged_or_fail",
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
    label: str, before: dict[str, torch.Tensor], observed: Observed, when: str
) -> None:
    """Raise unless the observed state holds every parameter and buffer of ``before``,
    bit-identical."""
    changed = []
    for name, tensor in before.items():
        if not observed.has(name):
            changed.append(name)
            continue
        now = observed.tensor(name, tuple(tensor.shape))
        if now.dtype != tensor.dtype or not torch.equal(now, tensor):
            changed.append(name)
    if changed:
        raise AssertionError(
            f"{label}: {when}, the backbone changed: {_show(changed)}. Expected every backbone "
            "parameter and buffer bit-identical — some backbone parameter still has "
            "requires_grad=True (freeze_backbone must freeze ALL of model.parameters(), the "
            "output head and the norms included), or something writes to the weights"
        )


def _models(obs: Observed) -> list[tuple[str, nn.Module, Observed]]:
    """The tiny models of the variant, each with its observation (checked to be for it)."""
    pairs = []
    for (label, model), o in zip(tiny_models(), obs.subs("models", len(KINDS)), strict=True):
        if o.str("label") != label:
            raise MalformedObservation(f"observation for {o.str('label')!r}, expected {label!r}")
        pairs.append((label, model, o))
    return pairs


# ---------------------------------------------------------------------------------------------
# freeze_backbone
# ---------------------------------------------------------------------------------------------
def observe_freeze_backbone(freeze_backbone: Callable[[nn.Module], object]) -> dict:
    """Each tiny model after ``freeze_backbone(model)``: its trainable names, its state and
    whether the call returned the model."""
    models = []
    for label, model in tiny_models():
        returned = student_call("freeze_backbone(model)", freeze_backbone, model)
        models.append(
            {
                "label": label,
                "returns_model": returned is model,
                "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
                "state": snapshot(model),
            }
        )
    return {"models": models}


def judge_freeze_backbone(obs: Observed) -> None:
    for label, model, o in _models(obs):
        params = dict(model.named_parameters())
        trainable = o.strings("trainable")
        unknown = [n for n in trainable if n not in params]
        if unknown:
            raise MalformedObservation(f"{label}: unknown parameters {unknown[:3]}")
        if trainable:
            total = sum(params[n].numel() for n in trainable)
            hint = ""
            if any("lm_head" in n for n in trainable):
                hint = (
                    " The untied output head lm_head is a parameter of the model too, not of "
                    "its decoder (model.base_model)."
                )
            elif all(params[n].dim() == 1 for n in trainable):
                hint = " Biases and norm weights are parameters too."
            raise AssertionError(
                f"{label}: after freeze_backbone, {len(trainable)} parameter tensors "
                f"({total} values) still require grad: {_show(trainable)}. Expected none — "
                "set requires_grad=False on every p in model.parameters() (model.eval() does "
                f"not freeze anything).{hint}"
            )
        unchanged_or_fail(label, snapshot(model), o.sub("state"), "after freeze_backbone")
        if not o.bool("returns_model"):
            raise AssertionError(
                f"{label}: freeze_backbone(model) must return the model it froze (so that "
                "`model = freeze_backbone(model)` works); it returned something else"
            )


def check_freeze_backbone(freeze_backbone: Callable[[nn.Module], object]) -> None:
    """freeze_backbone: no parameter of GPT-2 or Llama-GQA requires grad afterwards, and no
    weight or buffer changed."""
    run_check(observe_freeze_backbone, judge_freeze_backbone, freeze_backbone)


# ---------------------------------------------------------------------------------------------
# training with the grader's optimizer
# ---------------------------------------------------------------------------------------------
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


def observe_training(
    label: str,
    model: nn.Module,
    freeze_backbone: Callable[[nn.Module], object],
    make_trainable: MakeTrainable,
    forward: Forward,
) -> dict:
    """Freeze ``model``, build the trainable module, train it with the grader's optimizer;
    record the backbone's state and the module's parameters before and after."""
    student_call("freeze_backbone(model)", freeze_backbone, model)
    module = student_call(f"{name_of(make_trainable)}(model)", make_trainable, model)
    if not isinstance(module, nn.Module):
        raise AssertionError(f"{label}: {name_of(make_trainable)}(model) did not give a module")
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    train_with_grader_optimizer(label, model, module, forward)
    return {
        "label": label,
        "state": snapshot(model),
        "module_before": start,
        "module_after": {n: p.detach().clone() for n, p in module.named_parameters()},
        "module_trainable": {n: p.requires_grad for n, p in module.named_parameters()},
    }


def judge_training(
    label: str,
    model: nn.Module,
    obs: Observed,
    expected_trainable: tuple[int, str] | None = None,
    what: str = "the trainable module",
) -> None:
    """The backbone bit-identical to ``model`` (as built, untouched), the module changed and
    (when given as ``(count, formula)``) exactly ``count`` trainable values in the module."""
    unchanged_or_fail(label, snapshot(model), obs.sub("state"), "after 3 AdamW steps")
    before, after = obs.sub("module_before"), obs.sub("module_after")
    flags = obs.sub("module_trainable")
    if sorted(before.keys()) != sorted(after.keys()) or sorted(flags.keys()) != sorted(
        after.keys()
    ):
        raise MalformedObservation(f"{label}: module parameters differ before and after")
    changed = False
    for name in after.keys():
        a = after.tensor(name)
        b = before.tensor(name, tuple(a.shape))
        changed = changed or not torch.equal(a, b)
    if not changed:
        raise AssertionError(
            f"{label}: after 3 AdamW steps {what} has not changed: no gradient reaches its "
            "parameters (are they detached, or used under torch.no_grad()?)"
        )
    if expected_trainable is not None:
        want, formula = expected_trainable
        names = [n for n in flags.keys() if flags.bool(n)]
        count = sum(after.tensor(n).numel() for n in names)
        if count != want:
            raise AssertionError(
                f"{label}: {what} has {count} trainable values ({_show(names)}), expected "
                f"{formula} = {want}"
            )


def observe_backbone_unchanged_after_training(
    freeze_backbone: Callable[[nn.Module], object],
    make_trainable: MakeTrainable,
    forward: Forward,
) -> dict:
    models = [
        observe_training(label, model, freeze_backbone, make_trainable, forward)
        for label, model in tiny_models()
    ]
    return {"models": models}


def judge_backbone_unchanged_after_training(obs: Observed) -> None:
    for label, model, o in _models(obs):
        judge_training(label, model, o)


def check_backbone_unchanged_after_training(
    freeze_backbone: Callable[[nn.Module], object],
    make_trainable: MakeTrainable,
    forward: Forward,
) -> None:
    """After freeze_backbone and 3 steps of the grader's own AdamW over every parameter that
    requires grad, every backbone parameter and buffer is bit-identical and the trainable module
    has changed."""
    run_check(
        observe_backbone_unchanged_after_training,
        judge_backbone_unchanged_after_training,
        freeze_backbone,
        make_trainable,
        forward,
    )


def verify_training(
    label: str,
    model: nn.Module,
    freeze_backbone: Callable[[nn.Module], object],
    make_trainable: MakeTrainable,
    forward: Forward,
    expected_trainable: tuple[int, str] | None = None,
    what: str = "the trainable module",
) -> None:
    """Transitional: :func:`observe_training` then :func:`judge_training` in one process."""
    import copy

    untouched = copy.deepcopy(model)
    obs = observe_training(label, model, freeze_backbone, make_trainable, forward)
    judge_training(label, untouched, Observed(obs), expected_trainable, what)
