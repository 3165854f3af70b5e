"""Shared by every reference module: the label ignored by the loss, freezing and counting."""

from __future__ import annotations

import torch  # noqa: F401
from torch import nn

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Freezing and counting
# ---------------------------------------------------------------------------------------------
def freeze_backbone(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``model``; returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def count_trainable(module: nn.Module) -> int:
    """Number of scalar parameters of ``module`` that require grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
