"""``package``: what students get — the student notebooks and a wheel without the answers.

The instructor's install holds the reference implementation of every graded object
(``autograder/reference``), its one-bug-away twins (``autograder/bugzoo``) and the grading
pipeline. The student wheel holds none of them: the notebooks' visible checks judge from stored
fixtures of the reference's outputs (:mod:`autograder.checks.fixtures`), and grading keeps the
full checks on the instructor's side.

Later notebooks build on earlier ones (03 trains with the reference ``prefix_forward``; 05 shows
broken releases built from it). ``--unlock 01 02`` adds the reference (and the bug-zoo twins) of
notebooks that are already due; a notebook that needs a locked one stops in its setup cell with
one line naming the unlock.

Output (``dist/student`` by default)::

    soft_prompts_course-<version>-py3-none-any.whl
    notebooks/<NN_name>/<NN_name>.ipynb          (the released student notebooks)
    MANIFEST.txt                                 (what is in the wheel, what is unlocked)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from autograder.pipeline.coursedir import REPO_ROOT, Course, CourseError
from autograder.reference import NOTEBOOK_OF

__all__ = ["NEEDS", "UNLOCKS", "build_student_package", "student_files"]

ALWAYS: tuple[str, ...] = (
    "course/**/*.py",
    "autograder/__init__.py",
    "autograder/selfcheck.py",
    "autograder/answers.py",
    "autograder/explanations.py",  # why each multiple-choice option is right or wrong
    "autograder/checks/**/*.py",
    "autograder/reference/__init__.py",  # names only: says which notebook a missing one is
    "autograder/bugzoo/__init__.py",  # the Bug / Variant records, no implementation
    "autograder/bugzoo/incidents.py",  # notebook 05's broken releases (need 01-02 unlocked)
)
"""Python files every student wheel has (package data comes from pyproject's package-data)."""

UNLOCKS: dict[str, tuple[str, ...]] = {
    "00_backbone_tour": ("autograder/reference/tour.py",),
    "01_prompt_tuning": (
        "autograder/reference/common.py",
        "autograder/reference/prompt.py",
        "autograder/bugzoo/frozen.py",
        "autograder/bugzoo/prompt.py",
    ),
    "02_prefix_tuning": (
        "autograder/reference/prefix.py",
        "autograder/reference/deep.py",
        "autograder/bugzoo/prefix.py",
        "autograder/bugzoo/deep.py",
        "autograder/bugzoo/compiled.py",
        "autograder/bugzoo/releases.py",  # notebook 05's broken releases: 02's code, with bugs
    ),
    "03_experiments": (
        "autograder/reference/prompting.py",
        "autograder/reference/experiments.py",
        "autograder/bugzoo/prompting.py",
        "autograder/bugzoo/experiments.py",
    ),
    "04_serving": ("autograder/reference/serving.py", "autograder/bugzoo/serving.py"),
    "05_debugging": ("autograder/reference/debugging.py", "autograder/bugzoo/debugging.py"),
}
"""Notebook -> the files holding its graded objects' reference and known-buggy twins."""

NEEDS: dict[str, tuple[str, ...]] = {
    "03_experiments": ("01_prompt_tuning", "02_prefix_tuning"),
    "05_debugging": ("01_prompt_tuning", "02_prefix_tuning"),
}
"""Notebook -> the notebooks whose reference it imports."""

PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE")

CHECK_MODULE_NOTEBOOK = {
    **{module: nb for module, nb in NOTEBOOK_OF.items() if module != "common"},
    "frozen": NOTEBOOK_OF["common"],  # freezing: notebook 01's freeze_backbone
    "compiled": NOTEBOOK_OF["deep"],  # compiling a prompt into a cache: notebook 02's
}
"""The notebook whose graded objects each module of ``autograder.checks`` checks."""


def regraded(course: Course, unlocked: Sequence[str]) -> dict[str, tuple[int, list[str]]]:
    """Notebooks still locked whose graded cells check objects of an unlocked notebook: their
    points are answered by the reference that ships. Notebook -> (points, grade ids)."""
    import re

    import nbformat

    from autograder.checks import NOTEBOOK_CHECKS

    call = re.compile(r"selfcheck\.(?:hidden|run)\(\s*(?:checks\.\w+\.)?\"?(\w+)")
    found: dict[str, tuple[int, list[str]]] = {}
    for notebook in course.assignments():
        if notebook in unlocked:
            continue
        for path in course.source_notebooks(notebook):
            for cell in nbformat.read(path, as_version=4).cells:
                meta = cell.metadata.get("nbgrader", {})
                if not meta.get("grade") or cell.cell_type != "code":
                    continue
                owners = {
                    CHECK_MODULE_NOTEBOOK.get(NOTEBOOK_CHECKS[name][0])
                    for name in call.findall(cell.source)
                    if name in NOTEBOOK_CHECKS
                }
                if owners & set(unlocked):
                    points, cells = found.get(notebook, (0, []))
                    found[notebook] = (
                        points + int(meta.get("points", 0)),
                        [*cells, meta["grade_id"]],
                    )
    return found


def student_files(unlocked: Sequence[str]) -> list[str]:
    """The Python files (relative to the repository) of a student wheel with ``unlocked``."""
    files: set[str] = set()
    for pattern in ALWAYS:
        files.update(str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.glob(pattern))
    for notebook in unlocked:
        files.update(UNLOCKS[notebook])
    return sorted(f for f in files if "__pycache__" not in f)


def _manifest_module(unlocked: Sequence[str]) -> str:
    return (
        '"""Written by ``python -m autograder package``: what this student package holds."""\n\n'
        f"UNLOCKED = {tuple(unlocked)!r}\n"
        '"""Notebooks whose reference implementation this package includes (already due)."""\n'
    )


def _wheel(stage: Path, out: Path) -> Path:
    """Build the wheel of ``stage`` into ``out`` with pip (no network when setuptools is here)."""
    try:
        import setuptools

        isolated = int(setuptools.__version__.split(".")[0]) < 77
    except ImportError:
        isolated = True
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(stage)]
    if not isolated:
        command.insert(5, "--no-build-isolation")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise CourseError(f"could not build the student wheel:\n{done.stderr.strip()[-2000:]}")
    wheels = sorted(out.glob("soft_prompts_course-*.whl"))
    if len(wheels) != 1:
        raise CourseError(f"expected one wheel in {out}, found {[w.name for w in wheels]}")
    return wheels[0]


def build_student_package(
    course: Course, out: Path, unlock: Sequence[str] = (), check_release: bool = True
) -> dict[str, object]:
    """Write the student wheel, the student notebooks and ``MANIFEST.txt`` into ``out``.

    ``unlock``: notebooks (``NN`` or ``NN_name``) whose reference to include. Refuses to package
    notebooks that are stale against ``solutions/`` (run ``release`` first). Returns a summary.
    """
    from autograder.pipeline.release import release

    unlocked = course.resolve(list(unlock)) if unlock else []
    if check_release:
        stale = release(course, check=True)
        if stale:
            raise CourseError(
                f"notebooks/ is stale, so students would get old notebooks ({stale[0]}"
                f"{' ...' if len(stale) > 1 else ''}): run `python -m autograder release`"
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("soft_prompts_course-*.whl"):
        old.unlink()
    files = student_files(unlocked)
    with tempfile.TemporaryDirectory(prefix="student-package-") as tmp:
        stage = Path(tmp) / "src"
        for name in PROJECT_FILES:
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / name, stage / name)
        for relative in files:
            (stage / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / relative, stage / relative)
        data = [
            p
            for folder in ("course/assets", "autograder/checks/fixture_data")
            for p in (REPO_ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
        for path in data:
            target = stage / path.relative_to(REPO_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        (stage / "autograder" / "student.py").write_text(_manifest_module(unlocked))
        wheel = _wheel(stage, out)
    notebooks = out / "notebooks"
    if notebooks.exists():
        shutil.rmtree(notebooks)
    shutil.copytree(
        course.notebooks, notebooks, ignore=shutil.ignore_patterns(".ipynb_checkpoints")
    )
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(n for n in zf.namelist() if not n.endswith("/"))
    waiting = {
        notebook: [n for n in needs if n not in unlocked]
        for notebook, needs in NEEDS.items()
        if any(n not in unlocked for n in needs)
    }
    answered = regraded(course, unlocked)
    lines = [
        f"student wheel: {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)",
        f"unlocked (reference included): {', '.join(unlocked) or 'none'}",
        *(
            f"{nb} needs {', '.join(n[:2] for n in missing)} unlocked: until then its setup cell "
            "stops with a line naming the unlock"
            for nb, missing in waiting.items()
        ),
        *(
            f"warning: {nb} grades objects of an unlocked notebook again ({points} points: "
            f"{', '.join(cells)}); the reference in this wheel answers them"
            for nb, (points, cells) in answered.items()
        ),
        "files:",
        *(f"  {m}" for m in members),
    ]
    (out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    return {
        "wheel": wheel,
        "unlocked": unlocked,
        "waiting": waiting,
        "regraded": answered,
        "members": members,
    }
