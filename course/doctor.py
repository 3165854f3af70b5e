"""``python -m course doctor``: is this environment ready for the course?

One ``[OK]``/``[FAIL]``/``[INFO]`` line per check; the exit status is non-zero when any check fails.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from importlib import metadata

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


def _hub() -> tuple[bool | None, str]:
    from course.backbone import hub_reachable

    if hub_reachable():
        return None, "model hub reachable: load_backbone('auto') may use gpt2 on a GPU"
    return None, "model hub not reachable: the bundled tiny LM is used (fine offline)"


def _checks() -> list[tuple[str, Callable[[], tuple[bool | None, str]]]]:
    packages = ["torch", "transformers", "peft", "nbgrader", "jupyterlab", "ipywidgets"]
    return (
        [("python", _python)]
        + [(p, lambda p=p: _version_check(p)) for p in packages]
        + [("device", _device), ("tiny model", _tiny_model), ("hub", _hub)]
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
