"""``python -m course doctor``: is this environment ready for the course?

One ``[OK]``/``[FAIL]``/``[INFO]`` line per check; the exit status is non-zero when any check fails.
``[INFO]`` lines never fail: one per backbone (the bundled tiny LM is checked by loading it; a
fetchable one says where it is or how to fetch it; the hub says whether it answers) and one for
what ``load_backbone("auto")`` picks here, which fails only when ``$COURSE_BACKBONE`` names a
backbone that cannot be loaded.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["run_doctor", "requirement_range"]

MIN_PYTHON = (3, 11)


def requirement_range(package: str) -> SpecifierSet:
    """The version range this installed course declares for ``package`` (empty if none)."""
    try:
        requires = metadata.requires("soft-prompts-course") or []
    except metadata.PackageNotFoundError:
        return SpecifierSet()
    for req in requires:
        name = req.split(";")[0]
        for sep in "<>=!~ [":
            name = name.split(sep)[0]
        if name.strip().lower() == package.lower() and ";" not in req:
            return SpecifierSet(req[len(name) :].strip())
    return SpecifierSet()


def _version_check(package: str) -> tuple[bool, str]:
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        return False, f"{package} is not installed: pip install -e ."
    spec = requirement_range(package)
    if spec and Version(version) not in spec:
        return False, f"{package} {version} is outside the tested range {spec}"
    return True, f"{package} {version}" + (f" (range {spec})" if spec else "")


def _python() -> tuple[bool, str]:
    ok = sys.version_info[:2] >= MIN_PYTHON
    return ok, f"python {platform.python_version()}" + ("" if ok else " (need >= 3.11)")


def _device() -> tuple[bool, str]:
    from course.backbone import pick_device

    dev = pick_device()
    return True, f"device {dev.type}" + (
        " (no GPU: the CPU budgets apply)" if dev.type == "cpu" else ""
    )


def _tiny_model() -> tuple[bool, str]:
    import torch

    from course.backbone import load_backbone

    model, tok = load_backbone("tiny", device="cpu")
    ids = tok("The Golden Curry", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    if not torch.isfinite(logits).all():
        return False, "bundled tiny LM produced non-finite logits"
    n = sum(p.numel() for p in model.parameters())
    return True, f"bundled tiny LM loads ({n:,} parameters, vocab {len(tok)})"


def _fetchable(name: str) -> tuple[bool | None, str]:
    from course.backbone import available_backbones

    row = next(r for r in available_backbones(check_hub=False) if r["name"] == name)
    if row["available"]:
        return (
            None,
            f"{name}: fetched at {row['where']} ({row['size_mb']:.0f} MB, {row['license']})",
        )
    if Path(row["where"]).exists():
        return None, f"{name}: incomplete folder at {row['where']}: fetch it again with --force"
    try:
        import gguf  # noqa: F401

        needs = ""
    except ImportError:
        needs = "; first `pip install gguf`"
    return None, f"{name}: not fetched: {row['how']}{needs}"


def _hub() -> tuple[bool | None, str]:
    from course.backbone import HUB_DEFAULT, hub_reachable

    if hub_reachable():
        return None, f"model hub reachable: hub ids such as gpt2 and {HUB_DEFAULT} can be loaded"
    return None, (
        "model hub not reachable: hub ids cannot be loaded; 'tiny' and fetched backbones work "
        "offline (fine)"
    )


def _auto() -> tuple[bool | None, str]:
    """What ``load_backbone("auto")`` picks here; a ``COURSE_BACKBONE`` it cannot honour fails."""
    from course.backbone import BACKBONE_ENV, BackboneError, resolve_backbone

    named = os.environ.get(BACKBONE_ENV, "").strip()
    try:
        choice = resolve_backbone("auto")
    except BackboneError as err:
        return False, str(err)
    return (True if named else None), f"load_backbone('auto') here: {choice.name} ({choice.reason})"


def _grading_sandbox() -> tuple[bool | None, str]:
    """Whether grading kernels can be sandboxed here (instructors; students need not care)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("autograder.pipeline.sandbox") is None:
        return None, "grading sandbox: the autograder is not installed (students do not need it)"
    status = importlib.import_module("autograder.pipeline.sandbox").status()
    if status.available:
        return None, f"grading is sandboxed: {status.mechanism}"
    return None, (
        f"grading is NOT sandboxed here ({status.detail}); `python -m autograder grade` refuses "
        f"to run without --unsafe. Fix: {status.fix}"
    )


def _checks() -> list[tuple[str, Callable[[], tuple[bool | None, str]]]]:
    from course.fetch import FETCHABLE

    packages = ["torch", "transformers", "peft", "nbgrader", "jupyterlab", "ipywidgets"]
    return (
        [("python", _python)]
        + [(p, lambda p=p: _version_check(p)) for p in packages]
        + [("device", _device), ("tiny model", _tiny_model)]
        + [(n, lambda n=n: _fetchable(n)) for n in FETCHABLE]
        + [("hub", _hub), ("auto", _auto), ("grading sandbox", _grading_sandbox)]
    )


def run_doctor(out=print) -> int:
    """Run every check, print one line each; return 0 when nothing failed, else 1."""
    failures = 0
    for name, check in _checks():
        try:
            ok, detail = check()
        except Exception as err:  # a doctor reports, it does not crash
            ok, detail = False, f"{name}: {type(err).__name__}: {err}"
        if ok is None:
            out(f"[INFO] {detail}")
        elif ok:
            out(f"[OK]   {detail}")
        else:
            failures += 1
            out(f"[FAIL] {detail}")
    out("all checks passed" if failures == 0 else f"{failures} check(s) failed")
    return 0 if failures == 0 else 1
