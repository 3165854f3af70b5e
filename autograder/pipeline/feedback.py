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
        """Strip the hidden region of ``cell``; shorten its error outputs if it had one."""
        if self._remove_hidden_test_region(cell) and cell.cell_type == "code":
            for output in cell.outputs:
                if output.output_type == "error":
                    output.traceback = [f"\x1b[0;31m{output.ename}\x1b[0m: {output.evalue}"]
        return cell, resources


def hidden_lines(notebook: Path) -> list[str]:
    """The non-blank lines inside hidden test regions of ``notebook`` (stripped)."""
    lines: list[str] = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        inside = False
        for line in cell.source.splitlines():
            if BEGIN in line:
                inside = True
            elif END in line:
                inside = False
            elif inside and line.strip():
                lines.append(line.strip())
    return lines


def leaked_hidden_lines(html_file: Path, hidden: list[str]) -> list[str]:
    """The lines of ``hidden`` that appear in ``html_file`` (tags and escapes removed)."""
    text = html.unescape(re.sub(r"<[^>]*>", "", html_file.read_text(encoding="utf-8")))
    return [line for line in hidden if line in text]
