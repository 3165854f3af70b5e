"""``verify``: prove the tests are not vacuous, with real nbgrader autograding.

In a scratch copy of the course (its own gradebook; the instructor's is untouched):

(a) each solution, handed in with its saved artifacts, gets every automatic point;
(b) each blank release (no artifacts) gets 0 on every autograded cell;
(c) each bug-zoo entry, put into the solution (the cell that defines the graded object rebinds
    it to the buggy twin), loses exactly the cells that test it: the autograded cells whose
    source names one of the checks the bug fails (``caught_by``, ``also_fails``,
    ``downstream``). A cell that keeps its points is a false pass, any other cell that loses
    points a false fail; where the bug gives ``message_contains``, a lost cell must show it;
(d) each attack of :mod:`autograder.pipeline.attacks`, put into a blank notebook, scores 0 on
    every cell the grader judges, while the solution graded in the same batch (the attacks'
    victim) still gets every point. A kernel that crashes or hangs is an acceptable outcome of
    an attack; a grading error is not.
"""

from __future__ import annotations

import importlib
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nbformat

from autograder.pipeline import attacks, classroom
from autograder.pipeline.coursedir import (
    CONFIG_NAME,
    Course,
    CourseError,
    names_assignment,
    prepare_environment,
)
from autograder.pipeline.grade import grade, sandbox_refusal
from autograder.pipeline.release import IGNORED_NAMES, build
from autograder.pipeline.report import NotebookResult, format_table
from autograder.pipeline.submissions import grade_id
from autograder.pipeline.verdicts import expected_checks


class Bug(Protocol):
    """What verify needs of a bug-zoo entry (``autograder.bugzoo.Bug``)."""

    name: str
    description: str
    notebook: str
    replaces: Mapping[str, Any]
    caught_by: Sequence[str]
    message_contains: str
    also_fails: Sequence[str]
    downstream: Sequence[str]


@dataclass
class Row:
    """One verified case: what it should score and what went wrong."""

    assignment: str
    case: str
    expected: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``ok`` or the problems, then any notes in parentheses."""
        text = "; ".join(self.problems) or "ok"
        return f"{text} ({'; '.join(self.notes)})" if self.notes else text


@dataclass
class Report:
    """All verified cases."""

    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no case has a problem."""
        return bool(self.rows) and not any(row.problems for row in self.rows)

    def table(self) -> str:
        """One line per case."""
        return format_table(
            ["assignment", "case", "expected", "verdict"],
            [[r.assignment, r.case, r.expected, r.verdict] for r in self.rows],
        )

    def summary(self) -> str:
        """``verify: N cases, K problems``."""
        bad = sum(bool(row.problems) for row in self.rows)
        return f"verify: {len(self.rows)} case(s), {bad} with problems" + (
            "" if bad else " — solutions pass, blanks and known bugs fail the right cells"
        )


def load_bugs(module: str) -> dict[str, Bug]:
    """``BUGS`` of ``module`` (e.g. ``autograder.bugzoo``)."""
    try:
        bugs = importlib.import_module(module).BUGS
    except (ImportError, AttributeError) as err:
        raise CourseError(f"cannot load BUGS from {module}: {err}") from err
    return dict(bugs)


CHECK_CALL = re.compile(r"\bcheck_\w+")
"""How a test cell names the checks it runs (``checks.prompt.check_soft_prompt``)."""


def test_cell_sources(course: Course, assignment: str, notebook: str) -> dict[str, str]:
    """``{grade_id: source}`` of the autograded test cells of one notebook (hidden tests in)."""
    path = course.solutions / assignment / f"{notebook}.ipynb"
    return {
        grade_id(cell): cell.source
        for cell in nbformat.read(path, as_version=4).cells
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("grade")
    }


def cells_calling(sources: Mapping[str, str], checks: Sequence[str]) -> set[str]:
    """The test cells whose source names one of ``checks`` (a word match)."""
    words = [re.compile(rf"\b{re.escape(check.rsplit('.', 1)[-1])}\b") for check in checks]
    return {gid for gid, source in sources.items() if any(w.search(source) for w in words)}


def gated_by(course: Course, failing: Sequence[str]) -> list[str]:
    """Checks whose points also need one of ``failing`` to pass (``GradedExecute.requires``): a
    trained artifact counts only with the code that makes it."""
    from autograder.pipeline.verdicts import GradedExecute

    requires = course.config().GradedExecute.get("requires") or GradedExecute().requires
    return [check for check, needs in requires.items() if set(needs) & set(failing)]


def _cells_text(cells: set[str]) -> str:
    return ", ".join(sorted(cells)) or "-"


def _lost(result: NotebookResult) -> set[str]:
    """Autograded cells that scored below their maximum."""
    return {
        name
        for name, cell in result.cells.items()
        if cell.autograded and (cell.score or 0) < cell.max_score
    }


def _scored(result: NotebookResult) -> set[str]:
    """Autograded cells that scored above 0."""
    return {name for name, cell in result.cells.items() if cell.autograded and (cell.score or 0)}


def _messages(course: Course, result: NotebookResult, cells: set[str]) -> str:
    """Error names, values and tracebacks of ``cells`` in the autograded notebook."""
    path = course.autograded / result.student / result.assignment / f"{result.notebook}.ipynb"
    if not path.exists():
        return ""
    texts = []
    for cell in nbformat.read(path, as_version=4).cells:
        if grade_id(cell) in cells:
            for output in cell.get("outputs", []):
                if output.get("output_type") == "error":
                    texts += [output.ename, output.evalue, *output.traceback]
    return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(texts))


def _grading_problems(result: NotebookResult) -> list[str]:
    """Issues that make a verify case meaningless (crash, hang, nbgrader error)."""
    return [
        f"{issue.kind}: {issue.detail}"
        for issue in result.issues
        if issue.kind in ("crash", "hang", "timeout", "error", "missing", "malformed")
    ]


def _check(
    course: Course, assignment: str, bugs: Mapping[str, Bug], results: list[NotebookResult]
) -> list[Row]:
    """Compare each case of ``assignment`` with what it should score.

    A cell the solution itself loses is reported once, on the solution's row; the bug rows
    leave it out, so that each shows only what its bug changes.
    """
    mine = [r for r in results if r.assignment == assignment]
    solution_lost = {r.notebook: _lost(r) for r in mine if r.student == "solution"}
    rows = []
    for result in mine:
        label = f"{result.student} ({result.notebook})"
        problems = _grading_problems(result)
        if result.student == "solution":
            lost = _lost(result)
            if lost:
                problems.append(f"solution loses points in {_cells_text(lost)}")
            rows.append(Row(assignment, label, "all points", problems))
            continue
        if result.student == "blank":
            scored = _scored(result)
            if scored:
                problems.append(f"blank scores in {_cells_text(scored)}")
            rows.append(Row(assignment, label, "0 on every test cell", problems))
            continue
        if result.student.startswith("attack-"):
            rows.append(_check_attack(course, assignment, result, label))
            continue
        bug = bugs[result.student.removeprefix("bug-")]
        sources = test_cell_sources(course, assignment, result.notebook)
        names = (*bug.caught_by, *getattr(bug, "also_fails", ()), *getattr(bug, "downstream", ()))
        names += tuple(gated_by(course, names))
        expected = cells_calling(sources, names)
        broken = solution_lost.get(result.notebook, set())
        lost = _lost(result) - broken
        row = Row(assignment, label, f"lose {_cells_text(expected)}", problems)
        if not expected:
            row.problems.append(f"no test cell calls {', '.join(bug.caught_by)}")
        if expected - broken - lost:
            row.problems.append(f"FALSE PASS in {_cells_text(expected - broken - lost)}")
        for cell in sorted(lost - expected):
            calls = ", ".join(sorted(set(CHECK_CALL.findall(sources.get(cell, ""))))) or "-"
            row.problems.append(f"FALSE FAIL in {cell} (calls {calls})")
        message = bug.message_contains
        if message and lost & expected and message not in _messages(course, result, lost):
            row.problems.append(f"no lost cell says {message!r}")
        if expected & broken:
            row.notes.append(f"not judged: the solution fails {_cells_text(expected & broken)}")
        rows.append(row)
    return rows


def _check_attack(course: Course, assignment: str, result: NotebookResult, label: str) -> Row:
    """An attack on a blank notebook must score nothing on the cells the grader judges."""
    sources = test_cell_sources(course, assignment, result.notebook)
    judged = {gid for gid, source in sources.items() if expected_checks(source)}
    problems = [f"{issue.kind}: {issue.detail}" for issue in result.issues if issue.kind == "error"]
    if result.score is None:
        problems.append("no score recorded")
    raised = _scored(result) & judged
    if raised:
        problems.append(f"ATTACK RAISED A SCORE in {_cells_text(raised)}")
    row = Row(assignment, label, "0 points, nobody else affected", problems)
    unjudged = _scored(result) - judged
    if unjudged:
        row.notes.append(f"scored from outputs, not protected: {_cells_text(unjudged)}")
    return row


def _bugs_for(assignment: str, bugs: Mapping[str, Bug]) -> dict[str, Bug]:
    """The bugs whose ``notebook`` (``"01"`` or a full id) is ``assignment``."""
    return {name: bug for name, bug in bugs.items() if names_assignment(bug.notebook, assignment)}


def verify(
    course: Course,
    assignments: Sequence[str] | None,
    bugs: Mapping[str, Bug],
    workers: int = 2,
    progress: Callable[[str], None] = lambda line: None,
) -> Report:
    """Grade solution, blank and bug-zoo students of each assignment; compare with expectations.

    The scratch course (release, submissions, gradebook, autograded notebooks) is left in
    ``.nbgrader/verify/<assignments>/`` for inspection and replaced by the next run of the same
    selection.
    """
    selected = course.resolve(assignments)
    prepare_environment(course)
    known = course.assignments()
    notebooks = {bug.notebook for bug in bugs.values()}
    elsewhere = sorted(n for n in notebooks if not any(names_assignment(n, a) for a in known))
    if elsewhere:
        skipped = sum(bug.notebook in elsewhere for bug in bugs.values())
        progress(
            f"skipping {skipped} bug(s) of notebooks not in solutions/: {', '.join(elsewhere)}"
        )
    # one folder per selection: two verify runs of different assignments must not share one
    work = course.state / "verify" / "+".join(selected)
    if work.exists():
        shutil.rmtree(work)
    scratch = Course(work / "course")
    scratch.solutions.mkdir(parents=True)
    config = (course.root / CONFIG_NAME).read_text(encoding="utf-8")
    (scratch.root / CONFIG_NAME).write_text(
        f"{config}\n# verify: bug-zoo students import the zoo (the instructor's own code)\n"
        "c.GradedExecute.hide_answers = False\n",
        encoding="utf-8",
    )
    for assignment in selected:
        shutil.copytree(
            course.solutions / assignment,
            scratch.solutions / assignment,
            ignore=shutil.ignore_patterns(*IGNORED_NAMES),
        )
    progress(f"building the release of {', '.join(selected)}")
    build(course, selected, scratch.notebooks)
    report = Report()
    for assignment in selected:
        report.rows += _verify_assignment(
            scratch,
            assignment,
            _bugs_for(assignment, bugs),
            work / "submissions",
            course.state / "artifacts",
            workers,
            progress,
        )
    return report


def _verify_assignment(
    course: Course,
    assignment: str,
    bugs: Mapping[str, Bug],
    submissions: Path,
    cache: Path,
    workers: int,
    progress: Callable[[str], None],
) -> list[Row]:
    """Grade the solution, the blank and every bug; compare each with what it should score."""
    saved, reused = classroom.make_artifacts(course, assignment, submissions.parent / "run", cache)
    if saved:
        how = "reused from an earlier solved run" if reused else "a solved run saved"
        progress(f"{assignment}: no artifacts in solutions/; {how} {', '.join(saved)}")
    pairs = classroom.notebooks_of(course, assignment)
    solved = {name: done for name, (_, done) in pairs.items()}
    blank = {name: released for name, (released, _) in pairs.items()}
    out = submissions / assignment
    classroom.write_submission(course, out, "solution", assignment, solved)
    classroom.write_submission(course, out, "blank", assignment, blank, artifacts=False)
    for name, bug in bugs.items():
        try:
            buggy = {n: classroom.with_bug(nb, bug.replaces, name) for n, nb in solved.items()}
        except CourseError as err:
            raise CourseError(f"bug {name} ({assignment}): {err}") from err
        classroom.write_submission(course, out, f"bug-{name}", assignment, buggy)
    # No oracle here: verify shows kernels the reference (its bug-zoo students import the zoo),
    # so a student calling the reference would score; tests/test_attacks.py grades that one with
    # the reference hidden, as `grade` does.
    attackers = (
        attacks.make_attack_students(course, assignment, out, "solution", oracle=False)
        if bugs
        else {}
    )
    cases = 2 + len(bugs) + len(attackers)
    progress(f"{assignment}: grading {cases} case(s) with {workers} worker(s)")
    refusal = sandbox_refusal(course)
    if refusal:  # the instructor's own notebooks: verify anyway, and say so
        progress(f"warning: {refusal}\nverifying WITHOUT a sandbox (your own notebooks only)")
    results, _ = grade(
        course, out, [assignment], workers, feedback=False, progress=progress, unsafe=bool(refusal)
    )
    return _check(course, assignment, bugs, results)
