"""What the notebook tests share: reading nbgrader metadata, executing a notebook with nbclient,
and collecting what its cells printed."""

from __future__ import annotations

from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
TINY_LM = ROOT / "course" / "assets" / "tiny-lm" / "config.json"
CELL_TIMEOUT_S = 300
"""Only stops a hung run; timings are measured by ``benchmarks/``, never asserted."""


def nbgrader(cell) -> dict:
    """The cell's nbgrader metadata ({} for an ordinary cell)."""
    return cell.metadata.get("nbgrader", {})


def execute(nb_path: Path, workdir: Path) -> nbformat.NotebookNode:
    """Run the notebook at ``nb_path`` top to bottom in ``workdir``; return it with outputs."""
    from nbclient import NotebookClient

    nb = nbformat.read(nb_path, as_version=4)
    NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    ).execute()  # fmt: skip
    return nb


def stderr_in_graded_cells(nb: nbformat.NotebookNode) -> list[str]:
    """``grade_id: text`` for everything a graded cell wrote to stderr (nbgrader scores it 0)."""
    return [
        f"{nbgrader(cell)['grade_id']}: {out['text'][:200]!r}"
        for cell in nb.cells
        if cell.cell_type == "code" and nbgrader(cell).get("grade")
        for out in cell.outputs
        if out.get("output_type") == "stream" and out.get("name") == "stderr"
    ]


def stdout(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook's code cells printed to stdout."""
    return "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    )
