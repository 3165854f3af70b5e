"""Check and repair what a student handed in, before nbgrader sees it.

nbgrader aborts a whole submission on some tampering and scores it 0 without a word. Each
problem found here becomes an :class:`Issue` on the student's report line, and the submission is
repaired so the rest of it is still graded:

- missing notebook: nbgrader scores it 0 (an empty assignment folder is recorded as 0 here);
- malformed JSON (or not a notebook): the file is left out, so it counts as missing;
- a graded or read-only cell copied (duplicate ``grade_id``): the last copy stays graded, as
  nbgrader intends, the others become ordinary cells (stock nbgrader crashes on them);
- duplicate cell ids (hand-edited JSON): renumbered;
- nbgrader metadata nbgrader would reject (hand-edited): removed, the cell runs as an ordinary
  one (and if it was a graded cell, the release's copy is put back, below);
- a graded, solution or read-only cell deleted: put back from the release (a solution cell as
  its stub), where it was;
- importable code handed in beside the notebooks (``autograder/``, ``course/``, any ``*.py``,
  compiled module or package): removed before grading. The kernel runs in the submission
  folder, which comes first on ``sys.path``, so a folder called ``autograder`` would otherwise
  replace the grader's own checks;
- anything but plain files and folders (symlinks, which the copy would follow into another
  student's folder or the gradebook, devices, pipes, sockets), nbgrader's ``timestamp.txt``
  (a student's own would set the submission time), and files beyond :data:`MAX_FILE_BYTES`,
  :data:`MAX_TOTAL_BYTES` or :data:`MAX_FILES`: left out, and reported.

:func:`stage` never raises for what a student handed in: one student's broken folder is that
student's problem (``malformed``), never the class's.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbformat.notebooknode import NotebookNode
from nbgrader.nbgraderformat import MetadataValidator

from autograder.pipeline.coursedir import Course

_QUIET = logging.getLogger(__name__)
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


@dataclass(frozen=True)
class Issue:
    """One problem with one notebook of a submission."""

    kind: str
    """``missing``, ``malformed``, ``metadata``, ``duplicate``, ``deleted``, ``crash``, ``hang``,
    ``timeout``, ``tampering``, ``backbone``, ``unsafe``, ``feedback`` (the score is recorded, the
    feedback file is not), ``error`` (grading itself failed), ``extra`` or ``code``."""
    notebook: str
    detail: str


@dataclass
class Staged:
    """A submission copied into ``submitted/<student>/<assignment>/`` and repaired."""

    student: str
    assignment: str
    notebooks: list[str]
    """Expected notebook names (without ``.ipynb``)."""
    issues: list[Issue] = field(default_factory=list)
    gradable: list[str] = field(default_factory=list)
    """The expected notebooks that are present and readable; nbgrader grades these."""


def grade_id(cell: NotebookNode) -> str | None:
    """The nbgrader ``grade_id`` of ``cell``, or None for an ordinary cell."""
    meta = cell.get("metadata", {}).get("nbgrader", {})
    if meta.get("grade") or meta.get("solution") or meta.get("locked") or meta.get("task"):
        return meta.get("grade_id")
    return None


def cell_label(cell: NotebookNode, index: int) -> str:
    """How a report names a cell: ``cell 7 ('test_square')`` or ``cell 7 ('import os')``."""
    gid = grade_id(cell)
    if gid:
        return f"cell {index} ({gid!r})"
    first = next((line for line in cell.source.splitlines() if line.strip()), "")
    return f"cell {index} ({first[:40]!r})"


MAX_FILE_BYTES = 256 << 20
"""Largest file of a submission that is graded (a trained prefix is a few MB)."""
MAX_TOTAL_BYTES = 1 << 30
"""Most bytes of one student's assignment folder that are copied in."""
MAX_FILES = 2000
"""Most files of one student's assignment folder that are copied in."""
MAX_NOTEBOOK_BYTES = 64 << 20
"""Largest notebook file that is read."""


KEPT_SUFFIXES = (
    ".ipynb",
    ".pt",
    ".pth",
    ".safetensors",
    ".bin",
    ".json",
    ".csv",
    ".txt",
    ".npy",
    ".npz",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
)
"""What a hand-in may hold: notebooks, trained artifacts and their stamps, data and raster
images. Anything else (HTML, SVG, XML, JavaScript, PDF...) is left out: nbgrader copies a
submission's files to ``autograded/`` and ``feedback/``, and Formgrader serves them from the
instructor's own Jupyter origin, where a script would act with the instructor's session."""


def copy_submission(source: Path, dest: Path) -> list[str]:
    """Copy the plain files and folders of ``source`` to ``dest`` (made here); return what was
    left out and why. Nothing is followed: a symlink is never a way into another folder."""
    skipped: list[str] = []
    total = count = 0
    dest.mkdir(parents=True)
    for root, dirs, files in os.walk(source, followlinks=False):
        here = Path(root)
        rel = here.relative_to(source)
        for name in sorted(dirs):
            path = here / name
            if name == ".ipynb_checkpoints" or path.is_symlink():
                if path.is_symlink():
                    skipped.append(f"{rel / name} (a symlink)")
                dirs.remove(name)
                continue
            (dest / rel / name).mkdir()
        for name in sorted(files):
            path, shown = here / name, rel / name
            try:
                info = os.lstat(path)
            except OSError as err:
                skipped.append(f"{shown} ({err.strerror})")
                continue
            if not stat.S_ISREG(info.st_mode):
                kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a plain file"
                skipped.append(f"{shown} ({kind})")
            elif rel == Path(".") and name == "timestamp.txt":
                skipped.append(f"{shown} (the grader records the submission time itself)")
            elif not name.lower().endswith(KEPT_SUFFIXES):
                skipped.append(f"{shown} (not a notebook, artifact, data or image file)")
            elif info.st_size > MAX_FILE_BYTES:
                skipped.append(f"{shown} ({info.st_size >> 20} MB, more than the limit)")
            elif total + info.st_size > MAX_TOTAL_BYTES or count >= MAX_FILES:
                skipped.append(f"{shown} (the folder is over its size or file limit)")
            else:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as src, open(dest / shown, "wb") as out:
                    shutil.copyfileobj(src, out)
                total += info.st_size
                count += 1
    return skipped


def read_notebook(path: Path) -> tuple[NotebookNode | None, str]:
    """The notebook at ``path``, or None and the reason it cannot be graded."""
    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        return None, f"larger than {MAX_NOTEBOOK_BYTES >> 20} MB"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"not valid JSON ({err})"
    except (RecursionError, MemoryError, ValueError) as err:
        return None, f"not a notebook JSON can hold ({type(err).__name__})"
    if not isinstance(raw, dict) or not isinstance(raw.get("cells"), list):
        return None, "JSON but not a notebook (no 'cells' list)"
    try:
        return nbformat.reads(json.dumps(raw), as_version=4), ""
    except Exception as err:  # nbformat raises several types for broken notebooks
        return None, f"not a readable notebook ({type(err).__name__}: {err})"


def _drop_broken_metadata(nb: NotebookNode, name: str) -> list[Issue]:
    """Make cells whose nbgrader metadata nbgrader would reject ordinary cells."""
    validator = MetadataValidator()
    validator.log = _QUIET
    issues = []
    for index, cell in enumerate(nb.cells):
        if "nbgrader" not in cell.get("metadata", {}):
            continue
        try:
            validator.validate_cell(cell)
        except Exception as err:  # nbgrader raises ValidationError, KeyError, schema errors
            del cell.metadata["nbgrader"]
            detail = (
                f"cell {index} had broken nbgrader metadata ({type(err).__name__}); "
                "it runs as an ordinary cell"
            )
            issues.append(Issue("metadata", name, detail))
    return issues


def _repair_duplicates(nb: NotebookNode, name: str) -> list[Issue]:
    """Un-grade all but the last copy of each ``grade_id``; renumber duplicate cell ids."""
    issues = []
    counts = Counter(gid for cell in nb.cells if (gid := grade_id(cell)))
    for gid, count in sorted(counts.items()):
        if count < 2:
            continue
        copies = [i for i, cell in enumerate(nb.cells) if grade_id(cell) == gid]
        for i in copies[:-1]:
            del nb.cells[i].metadata["nbgrader"]
            nb.cells[i].metadata.pop("deletable", None)
            nb.cells[i].metadata.pop("editable", None)
        issues.append(
            Issue(
                "duplicate",
                name,
                f"graded cell {gid!r} appears {count} times (cells {', '.join(map(str, copies))});"
                f" graded cell {copies[-1]}, the other copies run as ordinary cells",
            )
        )
    seen: set[str] = set()
    for i, cell in enumerate(nb.cells):
        cell_id = cell.get("id")
        if cell_id is not None and cell_id in seen:
            cell.id = f"{cell_id}-{i}"
        if cell_id is not None:
            seen.add(cell.id)
    return issues


def _restore_metadata(nb: NotebookNode, release: NotebookNode, name: str) -> list[Issue]:
    """Give every nbgrader cell the metadata and type the release gave it.

    nbgrader restores a locked cell's source, not its flags: a hidden test cell flipped to
    ``solution`` or ``grade: false``, or a cell turned from code into markdown, would otherwise
    make nbgrader reject the whole notebook (a checksum mismatch), and a student whose
    resubmission fails to grade must not gain anything from it. A ``grade_id`` the release does
    not have is not graded: its cell runs as an ordinary cell.
    """
    released = {gid: cell for cell in release.cells if (gid := grade_id(cell))}
    issues = []
    for index, cell in enumerate(nb.cells):
        gid = grade_id(cell)
        if gid is None:
            continue
        original = released.get(gid)
        if original is None:
            del cell.metadata["nbgrader"]
            detail = (
                f"cell {index} names graded cell {gid!r}, which the release lacks; "
                "it runs as an ordinary cell"
            )
            issues.append(Issue("metadata", name, detail))
            continue
        meta = copy.deepcopy(original.metadata["nbgrader"])
        if cell.cell_type == original.cell_type and cell.metadata["nbgrader"] == meta:
            continue
        changed = sorted(
            k
            for k in set(meta) | set(cell.metadata["nbgrader"])
            if meta.get(k) != cell.metadata["nbgrader"].get(k)
        )
        if cell.cell_type != original.cell_type:
            changed.insert(0, "cell type")
            keep = {k: v for k, v in cell.metadata.items() if k != "nbgrader"}
            make = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell}
            fresh = make.get(original.cell_type, nbformat.v4.new_raw_cell)(
                source=cell.source, metadata=keep
            )
            if "id" in cell:
                fresh.id = cell.id
            nb.cells[index] = cell = fresh
        cell.metadata["nbgrader"] = meta
        detail = (
            f"graded cell {gid!r} had its {', '.join(changed)} changed; restored from the release"
        )
        issues.append(Issue("metadata", name, detail))
    return issues


def _restore_deleted(nb: NotebookNode, release: NotebookNode, name: str) -> list[Issue]:
    """Put back every nbgrader cell of ``release`` that ``nb`` lacks, after its predecessor.

    nbgrader's own ``add_missing_cells`` restores graded cells only, and aborts the submission
    when the cell before a deleted one is a read-only or deleted cell; this restores every kind,
    in release order, from the release the gradebook was built with.
    """
    issues = []
    for index, cell in enumerate(release.cells):
        gid = grade_id(cell)
        present = [i for i, c in enumerate(nb.cells) if grade_id(c) is not None]
        ids = {grade_id(nb.cells[i]): i for i in present}
        if gid is None or gid in ids:
            continue
        before = [grade_id(c) for c in release.cells[:index] if grade_id(c) in ids]
        position = ids[before[-1]] + 1 if before else 0
        nb.cells.insert(position, copy.deepcopy(cell))
        meta = cell.metadata["nbgrader"]
        if meta.get("grade"):
            detail = f"graded cell {gid!r} was deleted; restored from the release and graded"
        elif meta.get("solution"):
            detail = f"solution cell {gid!r} was deleted; restored as the empty stub"
        else:
            detail = f"read-only cell {gid!r} was deleted; restored from the release"
        issues.append(Issue("deleted", name, detail))
    return issues


CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".pyd", ".pth")
"""Files Python could import from (or run at start-up in) the kernel's working folder."""


def strip_code(folder: Path) -> list[str]:
    """Remove whatever in ``folder`` could shadow a module the grader imports; return the names.

    Top-level modules, extension modules, ``.pth`` files, ``__pycache__`` and every folder that
    is a regular package (has ``__init__.py``) or is named like one of our packages.
    """
    removed = []
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.is_symlink():
            package = (path / "__init__.py").exists() or path.name in ("autograder", "course")
            if package or path.name == "__pycache__":
                shutil.rmtree(path)
                removed.append(f"{path.name}/")
        elif path.suffix in CODE_SUFFIXES:
            path.unlink()
            removed.append(path.name)
    return removed


def stage(
    course: Course, release: Path, source_dir: Path | None, student: str, assignment: str
) -> Staged:
    """Copy ``source_dir`` to ``submitted/<student>/<assignment>/``, check it and repair it.

    ``release`` holds ``<assignment>/<notebook>.ipynb`` as generated for the current gradebook;
    ``source_dir`` None means the student handed in nothing for ``assignment``.
    """
    sources = {p.stem: p for p in course.source_notebooks(assignment)}
    staged = Staged(student, assignment, sorted(sources))
    dest = course.submitted / student / assignment
    if dest.exists():
        shutil.rmtree(dest)
    if source_dir is None:
        for name in staged.notebooks:
            staged.issues.append(Issue("missing", name, f"no {assignment}/ folder handed in"))
        return staged
    skipped = copy_submission(source_dir, dest)
    if skipped:
        more = f" and {len(skipped) - 8} more" if len(skipped) > 8 else ""
        shown = ", ".join(skipped[:8]) + more
        staged.issues.append(Issue("code", "*", f"left out of the submission: {shown}"))
    removed = strip_code(dest)
    if removed:
        detail = f"removed code handed in beside the notebooks: {', '.join(removed)}"
        staged.issues.append(Issue("code", "*", detail))
    from autograder.pipeline.verdicts import stamped_backbone

    staged.issues += [Issue("backbone", "*", note) for note in stamped_backbone(dest)[1]]
    for extra in sorted(set(p.stem for p in dest.glob("*.ipynb")) - set(sources)):
        staged.issues.append(Issue("extra", extra, f"{extra}.ipynb is not part of the assignment"))
    for name in staged.notebooks:
        path = dest / f"{name}.ipynb"
        if not path.exists():
            staged.issues.append(Issue("missing", name, f"{name}.ipynb was not handed in"))
            continue
        nb, reason = read_notebook(path)
        if nb is None:
            path.unlink()
            staged.issues.append(Issue("malformed", name, f"{name}.ipynb is {reason}"))
            continue
        released = nbformat.read(release / assignment / f"{name}.ipynb", as_version=4)
        repairs = _drop_broken_metadata(nb, name) + _repair_duplicates(nb, name)
        repairs += _restore_metadata(nb, released, name) + _restore_deleted(nb, released, name)
        staged.issues += repairs
        if repairs:
            nbformat.write(nb, path)
        staged.gradable.append(name)
    return staged
