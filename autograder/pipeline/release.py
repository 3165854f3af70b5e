"""``release``: build ``notebooks/NN_name/`` from ``solutions/NN_name/`` with nbgrader.

nbgrader's ``generate_assignment`` runs in a scratch copy of the course (its own gradebook), so
releasing never touches the instructor's gradebook, and ``--check`` can rebuild and compare.
The output is normalised so that it depends only on the solutions: no outputs, no execution
counts, no run-time metadata, fixed JSON formatting. Saved artifacts (``*.pt`` ...) are not
released.
"""

from __future__ import annotations

import difflib
import filecmp
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nbformat
from nbformat.notebooknode import NotebookNode

from autograder.pipeline.coursedir import (
    CONFIG_NAME,
    Course,
    CourseError,
    is_artifact,
    prepare_environment,
    working_directory,
)
from autograder.pipeline.submissions import grade_id

VOLATILE_CELL_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled", "trusted")
VOLATILE_NOTEBOOK_METADATA = ("widgets", "toc", "varInspector")
SAVED_BY_CLIENTS = ("language_info",)
"""Notebook metadata JupyterLab, Jupyter Notebook and Colab fill in when they open or save a
notebook (``language_info``: the kernel's Python version...). A saved student notebook that
differs only there is not stale."""
IGNORED_NAMES = (".ipynb_checkpoints", "__pycache__", ".DS_Store")

_DETAILS_OPEN = re.compile(r"<details\b[^>]*>", re.I)
_DETAILS_CLOSE = re.compile(r"</details\s*>", re.I)
_DETAILS = re.compile(r"<details\b[^>]*>(.*?)</details\s*>", re.I | re.S)
_SUMMARY = re.compile(r"\s*<summary\b[^>]*>(.*?)</summary\s*>(.*)", re.I | re.S)
_TAG = re.compile(r"<[^>]*>")


def _visible(html: str) -> str:
    """The text a reader sees in ``html``: tags and surrounding whitespace removed."""
    return _TAG.sub("", html).strip()


def hint_problems(nb: NotebookNode, name: str) -> list[str]:
    """One line per collapsible block (``<details>``, a hint) of a markdown cell of ``nb`` that
    would show a student nothing: no ``<summary>`` first, an empty summary, nothing between
    ``</summary>`` and ``</details>``, or a ``<details>`` left unclosed. ``name`` names the
    notebook; cells are counted from 0."""
    problems = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        source = cell.source
        where = f"{name}: cell {index} (id {cell.get('id', '?')})"
        opened, closed = len(_DETAILS_OPEN.findall(source)), len(_DETAILS_CLOSE.findall(source))
        if opened != closed:
            problems.append(f"{where}: {opened} <details> but {closed} </details>")
            continue
        for number, block in enumerate(_DETAILS.finditer(source), 1):
            parts = _SUMMARY.fullmatch(block.group(1))
            if parts is None:
                problems.append(f"{where}: <details> block {number} has no <summary> first")
            elif not _visible(parts.group(1)):
                problems.append(f"{where}: <details> block {number} has an empty <summary>")
            elif not _visible(parts.group(2)):
                summary = _visible(parts.group(1))
                problems.append(
                    f"{where}: <details> block {number} ({summary!r}) is empty: nothing between "
                    "</summary> and </details>"
                )
    return problems


def check_hints(course: Course, assignments: Sequence[str]) -> None:
    """Refuse to release a solution notebook with a hint (a ``<details>`` block) that shows
    nothing (:func:`hint_problems`): raises :class:`CourseError` naming notebook and cell."""
    problems = []
    for assignment in assignments:
        folder = course.solutions / assignment
        for path in sorted(folder.rglob("*.ipynb")):
            if set(path.relative_to(folder).parts) & set(IGNORED_NAMES):
                continue
            name = str(path.relative_to(course.root))
            problems += hint_problems(nbformat.read(path, as_version=4), name)
    if problems:
        raise CourseError(
            "empty or malformed hint(s); write the hint or remove the <details> block:\n  "
            + "\n  ".join(problems)
        )


def normalise(nb: NotebookNode) -> NotebookNode:
    """Strip what changes from run to run: outputs, counts, timings, widget state."""
    for key in VOLATILE_NOTEBOOK_METADATA:
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def _same_notebook(a: Path, b: Path) -> bool:
    """Whether two notebooks are equal once what a client adds on save is set aside
    (:data:`SAVED_BY_CLIENTS`, widget state, cell run metadata); outputs still count."""
    try:
        first, second = (nbformat.read(path, as_version=4) for path in (a, b))
    except Exception:
        return False
    for nb in (first, second):
        for key in (*SAVED_BY_CLIENTS, *VOLATILE_NOTEBOOK_METADATA):
            nb.metadata.pop(key, None)
        for cell in nb.cells:
            for key in VOLATILE_CELL_METADATA:
                cell.metadata.pop(key, None)
    return first == second


def _released_files(folder: Path) -> list[Path]:
    """The files of a generated assignment that belong in ``notebooks/``, relative paths."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_dir() or is_artifact(path) or set(relative.parts) & set(IGNORED_NAMES):
            continue
        files.append(relative)
    return files


def keep_artifacts_out_of_releases() -> None:
    """Make every ``generate_assignment`` in this process leave saved artifacts out of the
    release (Formgrader's "Generate" button and the plain ``nbgrader generate_assignment``
    included): after nbgrader copies the assignment's other files, the instructor's trained
    ``prompt.pt``, ``prefix.pt``... (:data:`ARTIFACT_PATTERNS`) are removed from the release and
    named in the log. ``nbgrader_config.py`` calls this.

    (``CourseDirectory.ignore`` cannot do it: nbgrader applies the same list when it copies a
    student's files for autograding, where the student's saved artifacts must be kept.)
    """
    from nbgrader.converters import GenerateAssignment

    if getattr(GenerateAssignment.init_assignment, "_drops_artifacts", False):
        return
    copy_files = GenerateAssignment.init_assignment

    def init_assignment(self, assignment_id: str, student_id: str) -> None:
        copy_files(self, assignment_id, student_id)
        released = Path(self._format_dest(assignment_id, student_id))
        for path in sorted(released.rglob("*")):
            if path.is_file() and is_artifact(path):
                path.unlink()
                self.log.warning(
                    "Not released: %s (a saved training artifact; students make their own)",
                    path.relative_to(released),
                )

    init_assignment._drops_artifacts = True
    GenerateAssignment.init_assignment = init_assignment


def build(course: Course, assignments: Sequence[str], out: Path) -> None:
    """Generate the student version of each assignment into ``out/<assignment>/``."""
    from nbgrader.apps import NbGraderAPI

    check_hints(course, assignments)
    prepare_environment(course)
    with tempfile.TemporaryDirectory(prefix="release-") as tmp:
        scratch = Path(tmp)
        shutil.copy(course.root / CONFIG_NAME, scratch / CONFIG_NAME)
        for assignment in assignments:
            shutil.copytree(
                course.solutions / assignment,
                scratch / "solutions" / assignment,
                ignore=shutil.ignore_patterns(*IGNORED_NAMES),
            )
        stage = Course(scratch)
        config = stage.config()
        config.CourseDirectory.release_directory = "release"
        with working_directory(scratch):
            api = NbGraderAPI(config=config)
            for assignment in assignments:
                result = api.generate_assignment(assignment, force=True, create=True)
                if not result["success"]:
                    log = (result.get("log") or "") + (result.get("error") or "")
                    raise CourseError(f"nbgrader could not generate {assignment}:\n{log.strip()}")
        for assignment in assignments:
            generated = scratch / "release" / assignment
            target = out / assignment
            if target.exists():
                shutil.rmtree(target)
            for relative in _released_files(generated):
                dest = target / relative
                dest.parent.mkdir(parents=True, exist_ok=True)
                if relative.suffix == ".ipynb":
                    nb = normalise(nbformat.read(generated / relative, as_version=4))
                    nbformat.write(nb, dest)
                else:
                    shutil.copy(generated / relative, dest)


def _describe_notebook_change(old: Path, new: Path) -> str:
    """Which cells differ between two versions of a released notebook."""
    try:
        before = nbformat.read(old, as_version=4).cells
        after = nbformat.read(new, as_version=4).cells
    except Exception as err:  # a hand-broken committed notebook is itself the finding
        return f"unreadable ({type(err).__name__})"

    def key(cell: NotebookNode, index: int) -> str:
        return grade_id(cell) or cell.get("id") or f"#{index}"

    old_cells = {key(c, i): c for i, c in enumerate(before)}
    new_cells = {key(c, i): c for i, c in enumerate(after)}
    changed = [k for k in new_cells if k in old_cells and new_cells[k] != old_cells[k]]
    added = [k for k in new_cells if k not in old_cells]
    removed = [k for k in old_cells if k not in new_cells]
    parts = []
    for label, keys in (("changed", changed), ("added", added), ("removed", removed)):
        if keys:
            shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
            parts.append(f"{len(keys)} cell(s) {label}: {shown}")
    if not parts:
        diff = difflib.unified_diff(
            old.read_text().splitlines(), new.read_text().splitlines(), lineterm="", n=0
        )
        changes = (line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---"))
        first = next(changes, "")
        parts.append(f"formatting differs (first change: {first.strip()[:80]!r})")
    return "; ".join(parts)


def compare(expected: Path, actual: Path, assignments: Sequence[str]) -> list[str]:
    """Differences between a fresh build (``expected``) and ``actual``, one line per file."""
    problems = []
    for assignment in assignments:
        want = set(_released_files(expected / assignment))
        have = (
            set(_released_files(actual / assignment)) if (actual / assignment).is_dir() else set()
        )
        for relative in sorted(want - have):
            problems.append(f"missing: notebooks/{assignment}/{relative}")
        for relative in sorted(have - want):
            problems.append(f"not generated from solutions/: notebooks/{assignment}/{relative}")
        for relative in sorted(want & have):
            new, old = expected / assignment / relative, actual / assignment / relative
            if filecmp.cmp(new, old, shallow=False):
                continue
            if relative.suffix == ".ipynb" and _same_notebook(new, old):
                continue  # saved by JupyterLab or Colab: same cells, client metadata added
            detail = (
                _describe_notebook_change(old, new) if relative.suffix == ".ipynb" else "differs"
            )
            problems.append(f"stale: notebooks/{assignment}/{relative}: {detail}")
    return problems


def release(
    course: Course, assignments: Sequence[str] | None = None, check: bool = False
) -> list[str]:
    """Write (or with ``check``, compare against) ``notebooks/``; returns the problems found.

    Writing first brings each solution notebook's install cell and Colab badge in line with
    ``[tool.soft-prompts-course]`` (:mod:`autograder.pipeline.colab`), then returns no problems.
    Checking returns one line per stale, missing or extra file, and per stale or missing figure
    (:func:`figure_problems`).
    """
    from autograder.pipeline.colab import sync_solutions

    selected = course.resolve(assignments)
    if not check:
        sync_solutions(course.root, course.solutions, selected, check=False)
        build(course, selected, course.notebooks)
        return []
    problems = sync_solutions(course.root, course.solutions, selected, check=True)
    problems += figure_problems(course)
    with tempfile.TemporaryDirectory(prefix="release-check-") as tmp:
        build(course, selected, Path(tmp))
        return problems + compare(Path(tmp), course.notebooks, selected)


def figure_problems(course: Course) -> list[str]:
    """One line per figure of ``course/assets/figures/`` that is missing or out of date with
    what :mod:`course.figures` draws (the figures the notebooks ``show()``); none for a course
    root without ``course/figures.py``.
    """
    if not (course.root / "course" / "figures.py").is_file():
        return []
    from course import figures

    folder = course.root / "course" / "assets" / "figures"
    return [
        f"stale figure: {reason}; run: python -m course.figures --write"
        for reason in figures.check(folder)
    ]


def written_files(course: Course, assignments: Sequence[str]) -> list[str]:
    """The released files, relative to the course root, for the command's summary."""
    return [
        os.path.join("notebooks", assignment, str(relative))
        for assignment in assignments
        for relative in _released_files(course.notebooks / assignment)
    ]
