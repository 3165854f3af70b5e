"""``demo``: the whole instructor workflow on a generated class, in ``.nbgrader/demo/``.

1. release ``notebooks/`` from ``solutions/``;
2. write a class: per assignment a solution student (with the artifacts a solved run saves:
   if ``solutions/`` has none, one run of the solved notebook makes them first), a blank
   student and a few bug-zoo students; on the first assignment one student per fault (kernel crash,
   SIGKILL, a loop that ignores the interrupt, a copied graded cell, a deleted graded cell,
   malformed JSON, no notebook);
3. grade it with nbgrader in a scratch copy of the course (the real gradebook is untouched);
4. print the gradebook table, write ``grades.csv`` and the feedback HTML.

Exits non-zero if a fault went unreported or grading itself failed.
"""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Sequence
from typing import Any

from autograder.pipeline import classroom
from autograder.pipeline.coursedir import CONFIG_NAME, Course, names_assignment
from autograder.pipeline.grade import grade, sandbox_refusal
from autograder.pipeline.release import IGNORED_NAMES, release
from autograder.pipeline.report import NotebookResult, results_table, write_csv

EXPECTED_ISSUE = {
    "crash": {"crash"},
    "kill": {"crash"},
    "loop": {"hang", "timeout"},
    "duplicate": {"duplicate"},
    "deleted": {"deleted"},
    "malformed": {"malformed"},
    "missing": {"missing"},
}
"""Which reported issue kinds show that a fault was caught."""


def _bug_zoo() -> dict[str, Any]:
    """``autograder.bugzoo.BUGS``, or nothing if the bug zoo is not there."""
    try:
        return dict(importlib.import_module("autograder.bugzoo").BUGS)
    except (ImportError, AttributeError):
        return {}


def _scratch(course: Course, assignments: Sequence[str], timeout: int) -> Course:
    """A fresh copy of the course in ``.nbgrader/demo/course`` with its own gradebook."""
    work = course.state / "demo"
    if work.exists():
        shutil.rmtree(work)
    root = work / "course"
    root.mkdir(parents=True)
    config = (course.root / CONFIG_NAME).read_text(encoding="utf-8")
    (root / CONFIG_NAME).write_text(
        f"{config}\n# demo: a shorter limit, so the looping student costs less time\n"
        f"c.Execute.timeout = {timeout}\n"
        "# demo: bug-zoo students import the zoo (the instructor's own code)\n"
        "c.GradedExecute.hide_answers = False\n",
        encoding="utf-8",
    )
    for assignment in assignments:
        for folder in (course.solutions, course.notebooks):
            shutil.copytree(
                folder / assignment,
                root / folder.name / assignment,
                ignore=shutil.ignore_patterns(*IGNORED_NAMES),
            )
    return Course(root)


def _unreported(results: Sequence[NotebookResult], faults: dict[str, str]) -> list[str]:
    """Fault students whose fault does not show in their status."""
    missed = []
    for result in results:
        fault = faults.get(result.student)
        if fault and not {issue.kind for issue in result.issues} & EXPECTED_ISSUE[fault]:
            missed.append(f"{result.student}: the {fault} fault was not reported")
    return missed


def demo(
    course: Course,
    assignments: Sequence[str] | None,
    workers: int = 2,
    bugs_per_assignment: int = 2,
    timeout: int = 60,
) -> int:
    """Run the demo; returns the exit status.

    Without ``assignments`` it shows one: the first that has bug-zoo entries.
    """
    start = time.perf_counter()
    zoo = _bug_zoo()
    if assignments:
        selected = course.resolve(assignments)
    else:
        known = course.resolve(None)
        buggy = [a for a in known if any(names_assignment(b.notebook, a) for b in zoo.values())]
        selected = [(buggy or known)[0]]
        print(f"demo of {selected[0]} (choose with --assignment NN)")
    release(course, selected)
    print(f"released {', '.join(selected)} to {course.notebooks}")
    scratch = _scratch(course, selected, timeout)
    submissions = scratch.root.parent / "submissions"
    for assignment in selected:
        saved, reused = classroom.make_artifacts(
            scratch, assignment, scratch.root.parent / "run", course.state / "artifacts"
        )
        if saved:
            how = "reused from an earlier solved run" if reused else "a solved run saved"
            print(f"{assignment}: no artifacts in solutions/; {how} {', '.join(saved)}")
        pairs = classroom.notebooks_of(scratch, assignment)
        solved = {name: done for name, (_, done) in pairs.items()}
        blank = {name: released for name, (released, _) in pairs.items()}
        classroom.write_submission(scratch, submissions, "solution", assignment, solved)
        classroom.write_submission(scratch, submissions, "blank", assignment, blank, False)
        bugs = [
            (name, bug)
            for name, bug in sorted(zoo.items())
            if names_assignment(bug.notebook, assignment)
        ]
        for name, bug in bugs[:bugs_per_assignment]:
            buggy = {n: classroom.with_bug(done, bug.replaces, name) for n, done in solved.items()}
            classroom.write_submission(scratch, submissions, f"bug-{name}", assignment, buggy)
    if not zoo:
        print("note: autograder.bugzoo not found; no bug-zoo students")
    faults = classroom.make_fault_students(scratch, selected[0], submissions)
    students = sorted(p.name for p in submissions.iterdir())
    print(f"class of {len(students)} in {submissions}: {', '.join(students)}")
    refusal = sandbox_refusal(scratch)
    if refusal:
        print(f"warning: {refusal}")
        print("the demo grades its own generated notebooks WITHOUT a sandbox; `grade` would refuse")
    else:
        print("every student's kernel runs in an OS sandbox (autograder/pipeline/sandbox.py)")
    results, _ = grade(
        scratch,
        submissions,
        selected,
        workers=workers,
        progress=lambda line: print(line, flush=True),
        unsafe=bool(refusal),
    )
    # fault students hand in only the first assignment: their other rows are not the point
    shown = [r for r in results if r.student not in faults or r.assignment == selected[0]]
    print(results_table(shown))
    csv = scratch.root.parent / "grades.csv"
    write_csv(csv, shown)
    print(f"wrote {csv}; feedback in {scratch.feedback}")
    problems = _unreported(shown, faults) + [
        f"{r.student}/{r.notebook}: {r.status}" for r in shown if r.failed
    ]
    for line in problems:
        print(f"PROBLEM {line}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s with {workers} worker(s)")
    return 1 if problems else 0
