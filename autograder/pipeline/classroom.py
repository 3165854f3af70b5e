"""Synthetic submissions: what ``verify`` and ``demo`` grade, and the pipeline tests use.

Every student starts from the released notebook. :func:`solved` fills the solution cells from
``solutions/``; :func:`with_bug` then swaps one graded object for a bug-zoo variant; the
``FAULTS`` tamper with a solved notebook the ways real submissions break (a crash, a loop that
ignores the interrupt, a copied or deleted graded cell, broken JSON, no notebook at all).
:func:`make_artifacts` supplies the files a solved run saves (``prompt.pt`` ...), which every
non-blank student hands in.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbformat.notebooknode import NotebookNode
from nbgrader.utils import setenv

from autograder.pipeline.coursedir import REPO_ROOT, Course, CourseError, is_artifact, output_to
from autograder.pipeline.release import IGNORED_NAMES
from autograder.pipeline.submissions import grade_id

MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")


def _is_solution(cell: NotebookNode) -> bool:
    return bool(cell.metadata.get("nbgrader", {}).get("solution"))


def solved(release: NotebookNode, source: NotebookNode) -> NotebookNode:
    """The released notebook with every solution cell filled in from the source notebook."""
    answers = {
        grade_id(cell): "\n".join(
            line for line in cell.source.splitlines() if line.strip() not in MARKERS
        )
        for cell in source.cells
        if _is_solution(cell)
    }
    nb = copy.deepcopy(release)
    for cell in nb.cells:
        if _is_solution(cell) and grade_id(cell) in answers:
            cell.source = answers[grade_id(cell)]
    return nb


def _new_code_cell(source: str, cell_id: str) -> NotebookNode:
    cell = nbformat.v4.new_code_cell(source)
    cell.id = cell_id
    return cell


def _first_solution_index(nb: NotebookNode) -> int:
    return next(i for i, cell in enumerate(nb.cells) if _is_solution(cell))


def defining_cell(nb: NotebookNode, name: str) -> NotebookNode:
    """The solution cell (else any code cell) that defines function or class ``name``."""
    pattern = re.compile(rf"^(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", re.MULTILINE)
    code = [cell for cell in nb.cells if cell.cell_type == "code" and pattern.search(cell.source)]
    preferred = [cell for cell in code if _is_solution(cell)] or code
    if not preferred:
        raise CourseError(f"no code cell defines {name!r}")
    return preferred[-1]


def with_bug(nb: NotebookNode, replaces: Mapping[str, Any], label: str) -> NotebookNode:
    """``nb`` with each graded object rebound to its buggy twin, in the cell that defines it.

    The defining cell keeps its code and gains ``from <module> import <bug> as <name>``, so the
    rest of the notebook (and every test) sees the buggy object, as if the student wrote it.
    """
    nb = copy.deepcopy(nb)
    for name, obj in replaces.items():
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
        if not module or not qualname.isidentifier():
            raise CourseError(f"bug {label}: {name} must map to a module-level function or class")
        cell = defining_cell(nb, name)
        alias = "" if qualname == name else f" as {name}"
        rebind = f"from {module} import {qualname}{alias}  # bug: {label}"
        cell.source = f"{cell.source.rstrip()}\n\n{rebind}"
    return nb


def _crash(nb: NotebookNode) -> NotebookNode:
    source = "import os\n\nos._exit(1)"
    nb.cells.insert(_first_solution_index(nb) + 1, _new_code_cell(source, "crash"))
    return nb


def _kill(nb: NotebookNode) -> NotebookNode:
    source = "import os\nimport signal\n\nos.kill(os.getpid(), signal.SIGKILL)"
    nb.cells.insert(_first_solution_index(nb) + 1, _new_code_cell(source, "kill"))
    return nb


def _loop(nb: NotebookNode) -> NotebookNode:
    source = (
        "import time\n\nwhile True:  # ignores the interrupt nbgrader sends at the time limit\n"
        "    try:\n        time.sleep(0.2)\n    except KeyboardInterrupt:\n        pass"
    )
    nb.cells.insert(_first_solution_index(nb) + 1, _new_code_cell(source, "loop"))
    return nb


def _duplicate(nb: NotebookNode) -> NotebookNode:
    index = _first_solution_index(nb)
    twin = copy.deepcopy(nb.cells[index])
    twin.id = f"{twin.get('id', 'cell')}-copy"
    nb.cells.insert(index + 1, twin)
    return nb


def _delete(nb: NotebookNode) -> NotebookNode:
    graded = next(
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("grade")
    )
    del nb.cells[graded]
    return nb


FAULTS: dict[str, Callable[[NotebookNode], NotebookNode]] = {
    "crash": _crash,
    "kill": _kill,
    "loop": _loop,
    "duplicate": _duplicate,
    "deleted": _delete,
}
"""Notebook-level faults, applied to a solved notebook: each yields one student."""

FILE_FAULTS = ("malformed", "missing")
"""Faults of the submitted files: truncated JSON, no notebook at all."""


def copy_artifacts(course: Course, assignment: str, dest: Path) -> None:
    """Copy the files of ``solutions/<assignment>/`` other than notebooks (the artifacts the
    instructor's run saved, data) to ``dest``."""
    source = course.solutions / assignment
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or path.suffix == ".ipynb" or set(relative.parts) & set(IGNORED_NAMES):
            continue
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest / relative)


def write_submission(
    course: Course,
    out: Path,
    student: str,
    assignment: str,
    notebooks: Mapping[str, NotebookNode | str | None],
    artifacts: bool = True,
) -> Path:
    """Write ``out/<student>/<assignment>/``: each notebook (raw text if a str; None: left out),
    with ``artifacts``, next to the solution's saved files. Returns the folder."""
    folder = out / student / assignment
    folder.mkdir(parents=True, exist_ok=True)
    if artifacts:
        copy_artifacts(course, assignment, folder)
    for name, nb in notebooks.items():
        path = folder / f"{name}.ipynb"
        if isinstance(nb, str):
            path.write_text(nb, encoding="utf-8")
        elif nb is not None:
            nbformat.write(nb, path)
    return folder


def notebooks_of(course: Course, assignment: str) -> dict[str, tuple[NotebookNode, NotebookNode]]:
    """``{name: (released, solved)}`` for every notebook of ``assignment`` (needs a release)."""
    pairs = {}
    for source_path in course.source_notebooks(assignment):
        released_path = course.notebooks / assignment / source_path.name
        if not released_path.exists():
            raise CourseError(f"{released_path} is missing: run `python -m autograder release`")
        released = nbformat.read(released_path, as_version=4)
        source = nbformat.read(source_path, as_version=4)
        pairs[source_path.stem] = (released, solved(released, source))
    return pairs


def make_fault_students(course: Course, assignment: str, out: Path) -> dict[str, str]:
    """One student per fault (``fault-crash`` ...); returns ``{student: fault}``."""
    pairs = notebooks_of(course, assignment)
    students = {}
    for fault, apply in FAULTS.items():
        student = f"fault-{fault}"
        notebooks = {name: apply(copy.deepcopy(done)) for name, (_, done) in pairs.items()}
        write_submission(course, out, student, assignment, notebooks)
        students[student] = fault
    truncated = {name: nbformat.writes(done)[:200] for name, (_, done) in pairs.items()}
    write_submission(course, out, "fault-malformed", assignment, truncated)
    write_submission(course, out, "fault-missing", assignment, dict.fromkeys(pairs))
    students.update({"fault-malformed": "malformed", "fault-missing": "missing"})
    return students


def has_artifacts(course: Course, assignment: str) -> bool:
    """Whether ``solutions/<assignment>/`` holds saved artifacts (``*.pt`` ...)."""
    return any(is_artifact(path) for path in (course.solutions / assignment).rglob("*"))


def _artifact_key(course: Course, assignment: str) -> str:
    """A digest of what a solved run's artifacts depend on: the solution notebooks and every
    file of the ``course`` package (training code, the bundled tiny LM)."""
    digest = hashlib.sha256()
    library = sorted((REPO_ROOT / "course").rglob("*"))
    for path in [*course.source_notebooks(assignment), *library]:
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def make_artifacts(
    course: Course, assignment: str, work: Path, cache: Path
) -> tuple[list[str], bool]:
    """Give ``solutions/<assignment>/`` of a scratch course the artifacts a solved run saves.

    If it has none (nobody ran the solution notebook), each solved notebook is run once as under
    grading (``NBGRADER_EXECUTION`` set: it loads what it finds, else trains and saves) but with
    no time limit, in ``work``. What it saved is kept in ``cache`` (keyed by the solution and the
    ``course`` package, so a later run reuses it) and copied into ``solutions/``, so every
    student written afterwards hands it in. Returns the artifacts' paths (none if ``solutions/``
    had them) and whether they came from the cache.
    """
    if has_artifacts(course, assignment):
        return [], False
    saved = cache / f"{assignment}-{_artifact_key(course, assignment)}"
    reused = saved.is_dir()
    if not reused:
        folder = work / assignment
        folder.mkdir(parents=True, exist_ok=True)
        for name, (_, done) in notebooks_of(course, assignment).items():
            client = NotebookClient(
                copy.deepcopy(done),
                timeout=None,
                allow_errors=True,
                kernel_name="python3",
                resources={"metadata": {"path": str(folder)}},
            )
            with setenv(NBGRADER_EXECUTION="autograde"), output_to(work / f"{name}.log"):
                client.execute()
        made = [p for p in sorted(folder.rglob("*")) if p.is_file() and is_artifact(p)]
        for path in made:
            (saved / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, saved / path.relative_to(folder))
    copied = []
    for path in sorted(saved.rglob("*")) if saved.is_dir() else []:
        if path.is_file():
            relative = path.relative_to(saved)
            (course.solutions / assignment / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, course.solutions / assignment / relative)
            copied.append(str(relative))
    return copied, reused
