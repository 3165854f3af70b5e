"""The broken releases of the debugging lab (notebook 05), by ticket: each a bug of this zoo
under a neutral name, so that the notebook does not give the diagnosis away.

They are built from notebook 02's reference, so a student package has them only once notebook
02 is released to students (``python -m autograder package --unlock 01 02``).
"""

from __future__ import annotations

try:
    from autograder.bugzoo.frozen import freeze_with_eval
    from autograder.bugzoo.prefix import (
        prefix_as_input_embeddings,
        prefix_cache_reused,
        prefix_layer0_only,
        prefix_mask_not_extended,
        prefix_no_dtype_cast,
        prefix_positions_from_zero,
        prefix_shared_by_layers,
    )
except ModuleNotFoundError as err:
    raise ModuleNotFoundError(
        "the broken releases of notebook 05 are built from notebooks 01-02's reference, which "
        "this course package does not include yet: your instructor adds it once those are due "
        f"(`python -m autograder package --unlock 01 02`) [{err}]"
    ) from None

__all__ = ["INCIDENTS"]

INCIDENTS: dict[str, object] = {
    "INC-1": prefix_layer0_only,
    "INC-2": prefix_shared_by_layers,
    "INC-3": prefix_as_input_embeddings,
    "INC-4": prefix_mask_not_extended,
    "INC-5": prefix_positions_from_zero,
    "INC-6": prefix_cache_reused,
    "INC-7": prefix_no_dtype_cast,
    "INC-8": freeze_with_eval,
}
"""Incident id -> the broken release's function: a ``prefix_forward(model, encoder, input_ids,
attention_mask, labels=None)``, or for INC-8 a ``freeze_backbone(model)``. (The lab's INC-9,
gradient checkpointing, breaks the student's own fixed ``prefix_forward``.)"""
