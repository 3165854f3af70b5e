"""The solution notebooks: well-formed nbgrader sources, and they run top to bottom offline.

Structure tests are fast. Execution tests (marked ``notebooks``) run each notebook with
nbclient on the CPU with the bundled tiny LM, in a scratch folder: once as a student would
(training, writing ``prompt.pt`` / ``prefix.pt``), then again as nbgrader's autograde kernel
does (``NBGRADER_EXECUTION=autograde``), which must load those artifacts instead of training.
Graded cells must write nothing to stderr in either run (nbgrader would score them 0).
Timings are measured by ``benchmarks/``, never asserted here; the per-cell timeout only stops a
hung run.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from notebook_tools import execute, nbgrader, stderr_in_graded_cells, stdout

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "solutions").glob("0[0-2]_*/0[0-2]_*.ipynb"))
ARTIFACTS = {"01_prompt_tuning": "prompt.pt", "02_prefix_tuning": "prefix.pt"}


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.stem)
def notebook(request) -> tuple[Path, nbformat.NotebookNode]:
    return request.param, nbformat.read(request.param, as_version=4)


def test_all_three_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == [
        "00_backbone_tour",
        "01_prompt_tuning",
        "02_prefix_tuning",
    ]


def test_saved_without_outputs(notebook):
    path, nb = notebook
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
    nbformat.validate(nb)


def test_grade_ids_unique_and_cells_marked(notebook):
    path, nb = notebook
    ids = [nbgrader(c)["grade_id"] for c in nb.cells if nbgrader(c)]
    assert len(ids) == len(set(ids)), f"duplicate grade_id in {path.name}"
    for cell in nb.cells:
        meta = nbgrader(cell)
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


def test_multiple_choice_keys_are_stored(notebook):
    from autograder import answers

    path, nb = notebook
    questions = {
        m for cell in nb.cells for m in re.findall(r'check_answer\("(nb\d\d_q\d+)"', cell.source)
    }
    assert questions, path.name
    missing = sorted(q for q in questions if q not in answers.KEYS)
    assert not missing, f"{path.name}: no answer key for {missing}"
    for cell in nb.cells:
        m = re.search(r'^(answer_q\d+) = "(\w)"$', cell.source, re.M)
        if m and nbgrader(cell).get("solution"):
            qid = f"nb{path.stem[:2]}_{m.group(1).removeprefix('answer_')}"
            assert answers.is_correct(qid, m.group(2)), (
                f"{qid}: the key disagrees with the solution"
            )


# --- execution ------------------------------------------------------------------------------


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_then_grades_from_its_artifact(nb_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    work = tmp_path / nb_path.parent.name
    work.mkdir()
    shutil.copy(nb_path, work)

    ran = execute(work / nb_path.name, work)
    assert not stderr_in_graded_cells(ran), stderr_in_graded_cells(ran)
    artifact = ARTIFACTS.get(nb_path.stem)
    if artifact:
        assert (work / artifact).is_file(), f"{nb_path.name} did not save {artifact}"

    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    graded = execute(work / nb_path.name, work)
    assert not stderr_in_graded_cells(graded), stderr_in_graded_cells(graded)
    if artifact:
        assert f"graded run: loaded your trained {artifact}" in stdout(graded)
