"""Feedback without hidden tests.

nbgrader's feedback HTML shows the autograded notebook, hidden tests included, and a failing
hidden test's traceback quotes its lines. :class:`HideHiddenTests` (plugged into
``GenerateFeedback.preprocessors`` by ``nbgrader_config.py``) removes the hidden regions and
shortens the error outputs of those cells to ``ename: evalue``, so a student learns which check
failed and its message, not the hidden code. :func:`leaked_hidden_lines` double-checks an HTML
file against the hidden lines of the source notebooks.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import nbformat
from nbformat.notebooknode import NotebookNode
from nbgrader.preprocessors import ClearHiddenTests
from traitlets import Bool

BEGIN, END = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"


class HideHiddenTests(ClearHiddenTests):
    """Remove hidden test regions and the tracebacks that would quote them."""

    enforce_metadata = Bool(False, help="Never refuse a cell: this runs on student notebooks.")

    def preprocess_cell(
        self, cell: NotebookNode, resources: Any, cell_index: int
    ) -> tuple[NotebookNode, Any]:
        """Strip the hidden region of a grader's test cell; shorten its error outputs.

        Only the grader's own test cells (graded, locked, not an answer cell) have hidden
        regions: a student's cell that merely contains the marker text is left alone (it used to
        make feedback fail), and an unbalanced region never raises."""
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if not (meta.get("grade") and meta.get("locked") and not meta.get("solution")):
            return cell, resources
        try:
            removed = self._remove_hidden_test_region(cell)
        except RuntimeError:  # BEGIN without END: hide everything from the first marker on
            lines = cell.source.splitlines()
            first = next(i for i, line in enumerate(lines) if BEGIN in line)
            cell.source = "\n".join(lines[:first])
            removed = True
        if removed and cell.cell_type == "code":
            for output in cell.outputs:
                if output.output_type == "error":
                    output.traceback = [f"\x1b[0;31m{output.ename}\x1b[0m: {output.evalue}"]
        return cell, resources


MIN_TELLING = 12
"""Hidden lines shorter than this (``)``, ``model,``) say nothing and could match anywhere."""


def hidden_lines(notebook: Path) -> list[str]:
    """The lines of the hidden test regions of ``notebook`` that would give something away.

    Stripped lines, at least :data:`MIN_TELLING` characters long, that do not also appear in the
    notebook's visible code (a hidden call often repeats the visible check's arguments).
    """
    hidden: list[str] = []
    visible: list[str] = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        inside = False
        for line in cell.source.splitlines():
            if BEGIN in line:
                inside = True
            elif END in line:
                inside = False
            elif inside:
                hidden.append(line.strip())
            else:
                visible.append(line)
    shown = "\n".join(visible)
    return [line for line in hidden if len(line) >= MIN_TELLING and line not in shown]


def leaked_hidden_lines(html_file: Path, hidden: list[str]) -> list[str]:
    """The lines of ``hidden`` that appear in ``html_file`` (tags and escapes removed)."""
    text = html.unescape(re.sub(r"<[^>]*>", "", html_file.read_text(encoding="utf-8")))
    return [line for line in hidden if line in text]
