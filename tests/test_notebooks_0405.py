"""Notebooks 04 (serving) and 05 (debugging lab): well-formed nbgrader sources, and they run top
to bottom offline on the CPU.

Structure tests are fast. Execution tests (marked ``notebooks``) run each notebook with nbclient
with the bundled tiny LM in a scratch folder, as a student would (``NBGRADER_EXECUTION`` unset;
notebook 04 trains its tenants and saves ``tenants/*.safetensors``), and notebook 04 once more as
nbgrader's autograde kernel does, which must load those files instead of training. No cell may
fail and graded cells must write nothing to stderr. Timings are measured, never asserted.
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


def _markdown_outputs(nb: nbformat.NotebookNode) -> str:
    """Every markdown the notebook's code cells displayed (a release's code, a diff)."""
    return "\n".join(
        out.get("data", {}).get("text/markdown", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("output_type") == "display_data"
    )


NOTEBOOKS = {
    "04_serving": ROOT / "solutions" / "04_serving" / "04_serving.ipynb",
    "05_debugging": ROOT / "solutions" / "05_debugging" / "05_debugging.ipynb",
}


@pytest.fixture(params=sorted(NOTEBOOKS), ids=str)
def notebook(request) -> tuple[str, nbformat.NotebookNode]:
    return request.param, nbformat.read(NOTEBOOKS[request.param], as_version=4)


def test_saved_without_outputs_and_valid(notebook):
    name, nb = notebook
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} has outputs"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count"
    ids = [cell.get("id") for cell in nb.cells]
    assert len(ids) == len(set(ids)), f"{name}: duplicate cell ids"


def test_grade_ids_unique_and_cells_marked(notebook):
    name, nb = notebook
    ids = [_nbgrader(c)["grade_id"] for c in nb.cells if _nbgrader(c)]
    assert len(ids) == len(set(ids)), f"duplicate grade_id in {name}"
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


def test_multiple_choice_keys_are_stored_and_agree(notebook):
    from autograder import answers

    name, nb = notebook
    prefix = name[:2]
    questions = {
        m for cell in nb.cells for m in re.findall(r'check_answer\("(nb\d\d_q\d+)"', cell.source)
    }
    assert questions, name
    assert not sorted(q for q in questions if q not in answers.KEYS), name
    for cell in nb.cells:
        if not _nbgrader(cell).get("solution") or cell.cell_type != "code":
            continue
        m = re.search(r"^(answer_q\d+) = (.+)$", cell.source, re.M)
        if m:
            qid = f"nb{prefix}_{m.group(1).removeprefix('answer_')}"
            assert answers.is_correct(qid, eval(m.group(2))), f"{qid}: key disagrees"  # noqa: S307


def test_budget_line_and_points_stated(notebook):
    name, nb = notebook
    intro = nb.cells[0].source
    assert "**Budget.**" in intro and "GPU" in intro, name
    auto = sum(
        _nbgrader(c).get("points", 0)
        for c in nb.cells
        if _nbgrader(c).get("grade") and c.cell_type == "code" and "check_answer" not in c.source
    )
    assert f"({auto} points)" in intro, f"{name}: the intro should state {auto} points of fixes"


# --- execution ------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    if not TINY_LM.is_file():
        pytest.skip("the bundled tiny LM (course/assets/tiny-lm) is not built yet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    return monkeypatch


@pytest.mark.notebooks
@pytest.mark.slow
def test_serving_notebook_runs_then_grades_from_its_tenants(offline, tmp_path):
    work = tmp_path / "04_serving"
    work.mkdir()
    shutil.copy(NOTEBOOKS["04_serving"], work)
    ran = _execute(work / "04_serving.ipynb", work)
    assert not _stderr_in_graded_cells(ran), _stderr_in_graded_cells(ran)
    tenants = sorted(p.name for p in (work / "tenants").glob("*.safetensors"))
    assert tenants == ["acme.safetensors", "bistro.safetensors"], tenants
    assert not (work / "registry_demo").exists(), "the swap/delete demo must clean up"

    offline.setenv("NBGRADER_EXECUTION", "autograde")
    graded = _execute(work / "04_serving.ipynb", work)
    assert not _stderr_in_graded_cells(graded), _stderr_in_graded_cells(graded)
    assert "graded run: loaded your trained tenants from tenants/" in _stdout(graded)


@pytest.mark.notebooks
@pytest.mark.slow
def test_debugging_notebook_runs(offline, tmp_path):
    work = tmp_path / "05_debugging"
    work.mkdir()
    shutil.copy(NOTEBOOKS["05_debugging"], work)
    ran = _execute(work / "05_debugging.ipynb", work)
    assert not _stderr_in_graded_cells(ran), _stderr_in_graded_cells(ran)
    out = _stdout(ran)
    assert "must match the size of tensor" in out  # INC-1 and INC-9 show their error
    assert "Trying to backward through the graph a second time" in out  # INC-6
    shown = _markdown_outputs(ran)  # each release's code or diff, as the lab shows it
    assert "# release 2.0: build_prefix_cache, as shipped" in shown  # INC-1, whole
    assert "--- release 2.2\n+++ release 2.3" in shown  # INC-5, a diff
    assert "your patch of release 2.4: 4 line(s) removed, 1 added" in out  # Patch 2, small
    assert "layer 1: compiled keys differ from the frozen layer's by up to 0.0000" not in out
    assert "layer 0: compiled keys differ from the frozen layer's by up to 0.0000" in out  # INC-10
