"""Scores read back from the gradebook, as report lines, a table and CSV."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nbgrader.api import MissingEntry

from autograder.pipeline.coursedir import Course
from autograder.pipeline.submissions import Issue


@dataclass
class CellScore:
    """One graded cell of one submitted notebook."""

    score: float | None
    max_score: float
    autograded: bool
    needs_manual_grade: bool


@dataclass
class NotebookResult:
    """One student's notebook: its scores from the gradebook and what went wrong."""

    student: str
    assignment: str
    notebook: str
    issues: list[Issue] = field(default_factory=list)
    score: float | None = None
    max_score: float | None = None
    code_score: float | None = None
    written_score: float | None = None
    cells: dict[str, CellScore] = field(default_factory=dict)

    @property
    def to_grade_by_hand(self) -> int:
        """How many cells still need a human grade."""
        return sum(cell.needs_manual_grade for cell in self.cells.values())

    @property
    def failed(self) -> bool:
        """Whether grading itself failed (not the student's work): the score is not reliable."""
        return any(issue.kind == "error" for issue in self.issues) or self.score is None

    @property
    def status(self) -> str:
        """``ok``, or every issue and the cells left to grade by hand, separated by ``; ``."""
        parts = [f"{issue.kind}: {issue.detail}" for issue in self.issues]
        if self.to_grade_by_hand:
            parts.append(f"{self.to_grade_by_hand} cell(s) to grade by hand")
        return "; ".join(parts) or "ok"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def read_scores(course: Course, results: Iterable[NotebookResult]) -> None:
    """Fill the scores of ``results`` from the gradebook (left None where nothing is recorded)."""
    with course.gradebook() as gb:
        for result in results:
            try:
                nb = gb.find_submission_notebook(result.notebook, result.assignment, result.student)
            except MissingEntry:
                continue
            result.score, result.max_score = nb.score, nb.max_score
            result.code_score, result.written_score = nb.code_score, nb.written_score
            result.cells = {
                grade.name: CellScore(
                    grade.score
                    if grade.auto_score is not None or grade.manual_score is not None
                    else None,
                    grade.max_score,
                    grade.cell_type == "code",
                    bool(grade.needs_manual_grade),
                )
                for grade in nb.grades
            }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns padded to their widest entry (the last column is not)."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers) - 1)]

    def line(row: Sequence[str]) -> str:
        cells = [str(value).ljust(width) for value, width in zip(row, widths)]
        return "  ".join([*cells, str(row[-1])]).rstrip()

    rule = ["-" * w for w in widths] + ["-" * len(headers[-1])]
    return "\n".join([line(headers), line(rule), *(line(row) for row in rows)])


def results_table(results: Sequence[NotebookResult]) -> str:
    """One line per student and notebook: score, out of, status."""
    rows = [
        [r.student, r.assignment, r.notebook, _number(r.score), _number(r.max_score), r.status]
        for r in results
    ]
    return format_table(["student", "assignment", "notebook", "score", "max", "status"], rows)


CSV_FIELDS = (
    "student",
    "assignment",
    "notebook",
    "score",
    "max_score",
    "code_score",
    "written_score",
    "cells_to_grade_by_hand",
    "status",
)


def write_csv(path: Path, results: Sequence[NotebookResult]) -> None:
    """Write one row per student and notebook to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for r in results:
            writer.writerow(
                [
                    r.student,
                    r.assignment,
                    r.notebook,
                    "" if r.score is None else r.score,
                    "" if r.max_score is None else r.max_score,
                    "" if r.code_score is None else r.code_score,
                    "" if r.written_score is None else r.written_score,
                    r.to_grade_by_hand,
                    r.status,
                ]
            )
