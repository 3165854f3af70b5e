"""Notebook 03 (experiments): a well-formed nbgrader source, and it runs top to bottom offline on
the CPU.

Structure tests are fast. The execution test (marked ``notebooks``) runs the notebook with
nbclient and the bundled tiny LM in a scratch folder, as a student would (``NBGRADER_EXECUTION``
unset: it runs the study and saves ``sweep.pt``), then once more as nbgrader's autograde kernel
does, which must load ``sweep.pt`` instead of running the study again. No cell may fail and
graded cells must write nothing to stderr. Timings are measured, never asserted.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from notebook_tools import TINY_LM
from notebook_tools import execute as _execute
from notebook_tools import nbgrader as _nbgrader
from notebook_tools import stderr_in_graded_cells as _stderr_in_graded_cells
from notebook_tools import stdout as _stdout

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "solutions" / "03_experiments" / "03_experiments.ipynb"
ARTIFACT_CHECKS = {"check_sweep_artifact"}  # take the saved study, not a graded object


@pytest.fixture(scope="module")
def nb() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def test_saved_without_outputs_and_valid(nb):
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs"
            assert cell.execution_count is None, f"cell {i} has an execution count"
    ids = [cell.get("id") for cell in nb.cells]
    assert len(ids) == len(set(ids)), "duplicate cell ids"


def test_grade_ids_unique_and_cells_marked(nb):
    ids = [_nbgrader(c)["grade_id"] for c in nb.cells if _nbgrader(c)]
    assert len(ids) == len(set(ids)), "duplicate grade_id"
    for cell in nb.cells:
        meta = _nbgrader(cell)
        if not meta:
            continue
        gid = meta["grade_id"]
        if meta.get("solution") and cell.cell_type == "code":
            assert "### BEGIN SOLUTION" in cell.source and "### END SOLUTION" in cell.source, gid
        if meta.get("grade") and cell.cell_type == "code":
            assert meta.get("locked"), f"{gid}: test cells must be locked"
            assert meta.get("points", 0) > 0, f"{gid}: a test cell without points"
            assert re.search(r"\bcheck_\w+\b", cell.source), f"{gid} calls no check by name"
        if meta.get("grade") and cell.cell_type == "markdown":
            assert meta.get("solution"), f"{gid}: a manually graded answer must be a solution cell"


def test_multiple_choice_keys_are_stored_and_agree(nb):
    from autograder import answers

    questions = {
        m for cell in nb.cells for m in re.findall(r'check_answer\("(nb\d\d_q\d+)"', cell.source)
    }
    assert len(questions) == 5 and all(q.startswith("nb03_") for q in questions), questions
    assert not sorted(q for q in questions if q not in answers.KEYS)
    for cell in nb.cells:
        if not _nbgrader(cell).get("solution") or cell.cell_type != "code":
            continue
        m = re.search(r"^(answer_q\d+) = (.+)$", cell.source, re.M)
        if m:
            qid = f"nb03_{m.group(1).removeprefix('answer_')}"
            assert answers.is_correct(qid, eval(m.group(2))), f"{qid}: key disagrees"  # noqa: S307


def test_budget_line_points_and_manual_answers_stated(nb):
    intro = nb.cells[0].source
    assert "**Budget.**" in intro and "GPU" in intro
    graded = [c for c in nb.cells if _nbgrader(c).get("grade")]
    auto = sum(
        _nbgrader(c)["points"]
        for c in graded
        if c.cell_type == "code" and "check_answer" not in c.source
    )
    assert f"({auto} points)" in intro, f"the intro should state {auto} points of code"
    manual = [c for c in graded if c.cell_type == "markdown"]
    assert len(manual) == 3 and "3 short answers" in intro


def test_published_numbers_are_labelled_as_theirs(nb):
    """Every plot of published points is titled as theirs, with the paper and the table."""
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for table in ("Table 2", "Table 5"):
        assert f"theirs: Li & Liang 2021, {table}" in source, table


# --- execution ------------------------------------------------------------------------------


@pytest.mark.notebooks
@pytest.mark.slow
def test_experiments_notebook_runs_then_grades_from_its_study(tmp_path, monkeypatch):
    if not TINY_LM.is_file():
        pytest.skip("the bundled tiny LM (course/assets/tiny-lm) is not built yet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    work = tmp_path / "03_experiments"
    work.mkdir()
    shutil.copy(NOTEBOOK, work)

    ran = _execute(work / NOTEBOOK.name, work)
    assert not _stderr_in_graded_cells(ran), _stderr_in_graded_cells(ran)
    assert (work / "sweep.pt").is_file(), "the study was not saved"
    assert re.search(r"your study: \d+ runs of \d+ steps", _stdout(ran)), _stdout(ran)[-500:]

    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    graded = _execute(work / NOTEBOOK.name, work)
    assert not _stderr_in_graded_cells(graded), _stderr_in_graded_cells(graded)
    assert "graded run: loaded your study from sweep.pt" in _stdout(graded)
