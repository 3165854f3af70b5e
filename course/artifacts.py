"""Which backbone a saved prompt or prefix was trained for: a small stamp beside the file.

A soft prompt or prefix only means something on the backbone it was trained on. After saving
``prefix.pt`` the notebooks call ``course.artifacts.stamp("prefix.pt", model)``, which writes
``prefix.pt.backbone.json``: the backbone's canonical name (``"tiny"``, ``"smollm2-135m"``, a hub
id), a hash of its configuration, a fingerprint of its weights and the course version
(:func:`course.backbone.backbone_signature`). The grader reads the stamp before running a
submission, runs the notebook on that backbone when it has it, and scores the artifact there.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["STAMP_SUFFIX", "fits", "read_stamp", "stamp", "stamp_path"]

STAMP_SUFFIX = ".backbone.json"
_KEYS = ("name", "config_sha256", "weights_sha256", "course_version")


def stamp_path(artifact: str | Path) -> Path:
    """Where the stamp of ``artifact`` lives: ``<artifact>.backbone.json``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + STAMP_SUFFIX)


def stamp(artifact: str | Path, model) -> Path:
    """Record beside ``artifact`` which backbone ``model`` is; returns the stamp's path."""
    from course.backbone import backbone_signature

    path = stamp_path(artifact)
    path.write_text(json.dumps(backbone_signature(model), indent=1, sort_keys=True) + "\n")
    return path


def read_stamp(artifact: str | Path) -> dict[str, str] | None:
    """The stamp of ``artifact`` (None when there is none); ``ValueError`` for a stamp that is
    not one (not JSON, or missing a field, or a field that is not a short string)."""
    path = stamp_path(artifact)
    if not path.is_file():
        return None
    if path.stat().st_size > 4096:
        raise ValueError(f"{path.name} is too large to be a backbone stamp")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path.name} is not a backbone stamp: {err}") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), str) and len(data[k]) < 512 for k in _KEYS
    ):
        raise ValueError(f"{path.name} is not a backbone stamp: it needs {', '.join(_KEYS)}")
    return {k: data[k] for k in _KEYS}


def fits(artifact: str | Path, model) -> tuple[bool, str]:
    """Whether ``artifact`` was trained for ``model``'s backbone, by its stamp (an artifact
    without a stamp is taken to fit), and if not, why."""
    try:
        found = read_stamp(artifact)
    except ValueError as err:
        return False, str(err)
    if found is None:
        return True, ""
    choice = getattr(model, "course_choice", None)
    here = choice.name if choice is not None else None
    if found["name"] != here:
        return False, f"was trained for {found['name']!r}, but this notebook runs on {here!r}"
    return True, ""
