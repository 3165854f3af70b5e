"""Soft Prompts Course support library: everything the notebooks use but do not teach.

Graded solutions never live here; see ``solutions/`` and ``autograder/``.
"""

from course.backbone import (
    BackboneError,
    available_backbones,
    backbone_signature,
    load_backbone,
    pick_device,
    resolve_backbone,
)
from course.compat import cache_keyword, kv_geometry, make_cache, output_cache
from course.training import (
    TrainResult,
    batches,
    encode_examples,
    evaluate,
    generate_cached,
    greedy_generate,
    is_grading,
    seed_everything,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "BackboneError",
    "TrainResult",
    "__version__",
    "available_backbones",
    "backbone_signature",
    "batches",
    "cache_keyword",
    "encode_examples",
    "evaluate",
    "generate_cached",
    "greedy_generate",
    "is_grading",
    "kv_geometry",
    "load_backbone",
    "make_cache",
    "output_cache",
    "pick_device",
    "resolve_backbone",
    "seed_everything",
    "train",
]
