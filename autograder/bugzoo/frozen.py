"""Freezing mistakes: the backbone keeps trainable parameters, so training changes it; and valid
ways to freeze it that every check must pass (:data:`VARIANTS`)."""

from __future__ import annotations

from torch import nn

from autograder.bugzoo import Bug, Variant

__all__ = [
    "BUGS",
    "VARIANTS",
    "freeze_decoder_only",
    "freeze_every_name",
    "freeze_matrices_only",
    "freeze_module_method",
    "freeze_with_eval",
]


def freeze_decoder_only(model: nn.Module) -> nn.Module:
    """Freezes ``model.base_model`` (the decoder stack) only."""
    for p in model.base_model.parameters():
        p.requires_grad_(False)
    return model


def freeze_matrices_only(model: nn.Module) -> nn.Module:
    """Freezes the weight matrices only (``p.dim() > 1``)."""
    for p in model.parameters():
        if p.dim() > 1:
            p.requires_grad_(False)
    return model


def freeze_returns_nothing(model: nn.Module) -> None:
    """Freezes every parameter but returns None: ``model = freeze_backbone(model)`` then loses
    the model (an adversary's finding)."""
    for p in model.parameters():
        p.requires_grad_(False)


def freeze_with_eval(model: nn.Module) -> nn.Module:
    """Believes ``eval()`` freezes the model."""
    model.eval()
    return model


BUGS = [
    Bug(
        name="freeze_returns_nothing",
        description="freeze_backbone freezes everything but returns None, not the model",
        notebook="01",
        replaces={"freeze_backbone": freeze_returns_nothing},
        caught_by=("check_freeze_backbone",),
        message_contains="must return the model",
    ),
    Bug(
        name="freeze_misses_lm_head",
        description=(
            "freeze_backbone freezes model.base_model only: an untied output head (Llama's "
            "lm_head) stays trainable, and training the prompt also trains the head"
        ),
        notebook="01",
        replaces={"freeze_backbone": freeze_decoder_only},
        caught_by=("check_freeze_backbone", "check_prompt_training"),
        message_contains="lm_head",
        also_fails=("check_prefix_training",),
    ),
    Bug(
        name="freeze_skips_biases_and_norms",
        description=(
            "freeze_backbone freezes only weight matrices (p.dim() > 1): biases and LayerNorm/"
            "RMSNorm weights stay trainable and drift during prefix training"
        ),
        notebook="01",
        replaces={"freeze_backbone": freeze_matrices_only},
        caught_by=("check_freeze_backbone", "check_prefix_training"),
        message_contains="requires_grad",
        also_fails=("check_prompt_training",),
    ),
    Bug(
        name="backbone_never_frozen",
        description=(
            "freeze_backbone calls model.eval(), which switches dropout off but freezes nothing: "
            "an optimizer built over every trainable parameter (model.parameters() included) "
            "updates the whole backbone"
        ),
        notebook="01",
        replaces={"freeze_backbone": freeze_with_eval},
        caught_by=("check_freeze_backbone", "check_prompt_training", "check_prefix_training"),
        message_contains="requires_grad",
    ),
]


def freeze_module_method(model: nn.Module) -> nn.Module:
    """``model.requires_grad_(False)``: one call on the module, recursively."""
    return model.requires_grad_(False)


def freeze_every_name(model: nn.Module) -> nn.Module:
    """Walks every module's own parameters, a tied tensor once per module that holds it."""
    for module in model.modules():
        for p in module.parameters(recurse=False):
            p.requires_grad = False
    return model


VARIANTS = [
    Variant(
        name="freeze_with_module_method",
        description="freeze_backbone calls model.requires_grad_(False)",
        notebook="01",
        replaces={"freeze_backbone": freeze_module_method},
    ),
    Variant(
        name="freeze_module_by_module",
        description=(
            "freeze_backbone walks model.modules() and freezes each module's own parameters "
            "(a tied tensor is visited twice)"
        ),
        notebook="01",
        replaces={"freeze_backbone": freeze_every_name},
    ),
]
