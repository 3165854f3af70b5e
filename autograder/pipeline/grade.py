"""``grade``: autograde a folder of submissions with nbgrader, robustly and in parallel.

Layout of the folder: ``<student>/<assignment>/<notebook>.ipynb`` plus any files the notebook
saved (``prefix.pt`` ...), which nbgrader copies next to the notebook it grades. Each submission
is checked and repaired (:mod:`autograder.pipeline.submissions`), copied to
``submitted/<student>/<assignment>/``, and autograded by ``--workers`` processes through
nbgrader's Python API on one sqlite gradebook. Crashes and hangs are survived by
:class:`~autograder.pipeline.execute.ResilientExecute` and reported per cell. Feedback HTML has
its hidden tests removed. The gradebook is never deleted: manual grades survive a regrade.
Everything nbgrader and the kernels print goes to ``.nbgrader/logs/<student>--<assignment>.log``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import nbformat

from autograder.pipeline import warm
from autograder.pipeline.coursedir import (
    CONFIG_NAME,
    Course,
    CourseError,
    output_to,
    prepare_environment,
)
from autograder.pipeline.execute import (
    KERNEL_DIED,
    KERNEL_UNAVAILABLE,
    KERNEL_UNRESPONSIVE,
    NOTEBOOK_TIME_UP,
    TIMEOUT,
    grader_events,
)
from autograder.pipeline.feedback import hidden_lines, leaked_hidden_lines
from autograder.pipeline.report import NotebookResult, read_scores
from autograder.pipeline.submissions import Issue, Staged, cell_label, stage
from autograder.pipeline.verdicts import GRADER_ERROR, TAMPERING


@dataclass(frozen=True)
class Job:
    """One autograde run: a student's assignment, done in a worker process."""

    root: str
    student: str
    assignment: str
    feedback: bool


@dataclass(frozen=True)
class JobResult:
    """What a worker reports back: nbgrader's verdict and where its log is."""

    success: bool
    message: str
    log: str
    seconds: float
    feedback_error: str = ""


_api = None  # one NbGraderAPI per worker process


def _init_worker(root: str, unsafe: bool = False) -> None:
    """Worker start: load the course config and make one nbgrader API object."""
    from nbgrader.apps import NbGraderAPI

    global _api
    course = Course.at(root)
    prepare_environment(course)
    os.chdir(course.root)
    config = course.config()
    if unsafe:
        config.ResilientExecute.sandbox = False
    _api = NbGraderAPI(config=config)


def _first_error(log: str, error: str) -> str:
    """The most telling line of a failed nbgrader run."""
    for line in log.splitlines():
        if line.startswith("[ERROR]") and "Please see" not in line:
            return line.removeprefix("[ERROR]").strip()
    lines = [line for line in error.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "nbgrader failed without a message"


def _run_job(job: Job) -> JobResult:
    """Autograde (and make feedback for) one submission; output goes to the job's log file."""
    assert _api is not None
    start = time.perf_counter()
    log_path = Course(Path(job.root)).state / "logs" / f"{job.student}--{job.assignment}.log"
    log_path.unlink(missing_ok=True)
    with output_to(log_path):
        result = _api.autograde(job.assignment, job.student, force=True, create=True)
        log, error = result.get("log") or "", result.get("error") or ""
        feedback_error = ""
        if result["success"] and job.feedback:
            made = _api.generate_feedback(job.assignment, job.student, force=True)
            if not made["success"]:
                feedback_error = _first_error(made.get("log") or "", made.get("error") or "")
                log += made.get("log") or ""
        print(log, error, sep="\n", flush=True)
    message = "" if result["success"] else _first_error(log, error)
    took = time.perf_counter() - start
    return JobResult(result["success"], message, str(log_path), took, feedback_error)


def execution_issues(notebook: Path, name: str) -> list[Issue]:
    """Crashes, hangs, timeouts, tampering and grader errors in an autograded notebook.

    Read from the events the grader recorded (:func:`~autograder.pipeline.execute.grader_events`),
    never from the names of error outputs, which a student's code can choose."""
    issues = []
    nb = nbformat.read(notebook, as_version=4)
    for event in grader_events(nb):
        index, ename, evalue = event["cell"], event["ename"], event["evalue"]
        cell = nb.cells[index] if 0 <= index < len(nb.cells) else None
        where = cell_label(cell, index) if cell is not None else f"cell {index}"
        if ename == TAMPERING:
            issues.append(Issue("tampering", name, f"{where}: {evalue}"))
        elif ename == GRADER_ERROR:
            issues.append(Issue("error", name, f"{where}: {evalue}"))
        elif ename == KERNEL_DIED:
            detail = f"the kernel died in {where}; restarted, the other cells were graded"
            issues.append(Issue("crash", name, detail))
        elif ename == KERNEL_UNRESPONSIVE:
            detail = (
                f"{where} ran past the time limit and ignored the interrupt; kernel "
                "restarted, the other cells were graded"
            )
            issues.append(Issue("hang", name, detail))
        elif ename == KERNEL_UNAVAILABLE:
            detail = f"{where} and the cells after it were not run: the kernel was lost"
            issues.append(Issue("error", name, detail))
            return issues
        elif ename == TIMEOUT:
            issues.append(Issue("timeout", name, f"{where} was stopped at the time limit"))
        elif ename == NOTEBOOK_TIME_UP:
            detail = f"{where} and the cells after it were not run: {evalue.split(': ', 1)[-1]}"
            issues.append(Issue("timeout", name, detail))
            return issues
    return issues


def find_submissions(
    course: Course, submissions: Path, selected: Sequence[str] | None
) -> tuple[list[tuple[str, str, Path | None]], list[str]]:
    """``(student, assignment, folder or None)`` to grade, and warnings about the folder.

    Without ``selected``, the assignments are those any student handed in; a student without
    a folder for one of them is graded as missing it.
    """
    if not submissions.is_dir():
        raise CourseError(f"submissions folder {submissions} does not exist")
    students = sorted(
        d.name for d in submissions.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not students:
        raise CourseError(f"{submissions} has no <student>/<assignment>/ folders")
    known = course.assignments()
    warnings = []
    handed_in: set[str] = set()
    for student in students:
        stray = sorted(p.name for p in (submissions / student).glob("*.ipynb"))
        if stray:
            warnings.append(
                f"{student}/: {', '.join(stray)} not inside an <assignment>/ folder, not graded"
            )
        for folder in sorted((submissions / student).iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            if folder.name in known:
                handed_in.add(folder.name)
            else:
                warnings.append(
                    f"{student}/{folder.name}: not an assignment of this course, skipped"
                )
    assignments = course.resolve(selected) if selected else sorted(handed_in)
    if not assignments:
        raise CourseError(
            f"{submissions} holds no assignment of this course; known: {', '.join(known)}"
        )
    jobs = []
    for student in students:
        for assignment in assignments:
            folder = submissions / student / assignment
            jobs.append((student, assignment, folder if folder.is_dir() else None))
    return jobs, warnings


def _stage_safely(
    course: Course, release: Path, folder: Path | None, student: str, assignment: str
) -> Staged:
    """:func:`stage`, except that a submission it cannot handle costs its student, nobody else:
    it is recorded as handed in but unreadable (0, with the reason)."""
    try:
        return stage(course, release, folder, student, assignment)
    except Exception as err:  # noqa: BLE001 - anything a student's folder can provoke
        names = sorted(p.stem for p in course.source_notebooks(assignment))
        staged = Staged(student, assignment, names)
        detail = f"the submission could not be read ({type(err).__name__}: {str(err)[:200]})"
        staged.issues += [Issue("malformed", name, detail) for name in names]
        shutil.rmtree(course.submitted / student / assignment, ignore_errors=True)
        return staged


def sync_gradebook(course: Course, assignments: Sequence[str]) -> None:
    """Record the current solutions in the gradebook (cells, points, checksums).

    Runs ``generate_assignment`` with its output in ``.nbgrader/release``, so ``notebooks/`` is
    left to the ``release`` command.
    """
    from nbgrader.apps import NbGraderAPI

    config = course.config()
    config.CourseDirectory.release_directory = str(course.state / "release")
    cwd = Path.cwd()
    os.chdir(course.root)
    try:
        api = NbGraderAPI(config=config)
        for assignment in assignments:
            result = api.generate_assignment(assignment, force=True, create=True)
            if not result["success"]:
                message = _first_error(result.get("log") or "", result.get("error") or "")
                raise CourseError(f"could not record {assignment} in the gradebook: {message}")
    finally:
        os.chdir(cwd)


def _record_missing(course: Course, staged: Staged, review: bool = False) -> None:
    """Record a submission as 0 in the gradebook (manual grades kept): one with no gradable
    notebook, or (``review``) one nbgrader could not grade, whose earlier score must not stand —
    a resubmission that makes grading fail would otherwise keep the last grade. Its cells are
    then marked for grading by hand."""
    with course.gradebook() as gb:
        gb.update_or_create_student(staged.student)
        submission = gb.update_or_create_submission(staged.assignment, staged.student)
        for notebook in submission.notebooks:
            for grade in notebook.grades:
                grade.auto_score = 0
                grade.needs_manual_grade = review and grade.manual_score is None
        gb.db.commit()
    for folder in (course.autograded, course.feedback):
        shutil.rmtree(folder / staged.student / staged.assignment, ignore_errors=True)


def _check_feedback(course: Course, staged: Staged) -> list[Issue]:
    """Withhold any feedback file that still quotes a hidden test line."""
    issues = []
    for name in staged.gradable:
        html = course.feedback / staged.student / staged.assignment / f"{name}.html"
        if not html.exists():
            continue
        hidden = hidden_lines(course.solutions / staged.assignment / f"{name}.ipynb")
        leaked = leaked_hidden_lines(html, hidden)
        if leaked:
            html.unlink()
            detail = f"feedback withheld: it quoted hidden test line {leaked[0]!r}"
            issues.append(Issue("feedback", name, detail))
    return issues


UNSAFE = (
    "graded WITHOUT a sandbox (--unsafe): the student's code ran with your permissions and "
    "network; check nothing of yours changed"
)


def sandbox_refusal(course: Course) -> str:
    """Why grading must not start here ("" when it may): the course asks for sandboxed kernels
    (the default) and this machine cannot make them."""
    if not course.config().ResilientExecute.get("sandbox", True):
        return ""
    from autograder.pipeline import sandbox

    status = sandbox.status()
    if status.available:
        return ""
    return (
        f"{status.message}. Or grade without the sandbox with --unsafe (student code then runs "
        "with your permissions; every report line will say so)"
    )


JOURNAL = "grading-journal.jsonl"
"""Under the course's ``.nbgrader/``: one line per (student, assignment) whose grades are
recorded, with a digest of the staged submission; ``grade --resume`` skips those."""


def submission_digest(course: Course, student: str, assignment: str) -> str:
    """A digest of ``submitted/<student>/<assignment>/`` as staged (names and contents)."""
    digest = hashlib.sha256()
    folder = course.submitted / student / assignment
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _course_digest(course: Course, assignments: Sequence[str]) -> str:
    """What the recorded grades depend on besides the submission: config and solutions."""
    digest = hashlib.sha256((course.root / CONFIG_NAME).read_bytes())
    for assignment in sorted(assignments):
        for path in sorted((course.solutions / assignment).rglob("*.ipynb")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Journal:
    """The record of what a run has already written into the gradebook (see :data:`JOURNAL`)."""

    def __init__(self, course: Course, course_digest: str, resume: bool) -> None:
        self.path = course.state / JOURNAL
        self.done: dict[tuple[str, str], str] = {}
        if resume:
            if not self.path.is_file():
                raise CourseError(
                    f"--resume: no interrupted run to resume ({self.path} is missing); grade "
                    "without --resume"
                )
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            header = lines[0] if lines else {}
            if header.get("course") != course_digest:
                raise CourseError(
                    "--resume: the course's config or solutions changed since the interrupted "
                    "run, so its grades would not match a new one; grade without --resume"
                )
            for entry in lines[1:]:
                self.done[(entry["student"], entry["assignment"])] = entry["digest"]
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"course": course_digest}) + "\n")

    def finished(self, student: str, assignment: str, digest: str) -> bool:
        return self.done.get((student, assignment)) == digest

    def record(self, student: str, assignment: str, digest: str) -> None:
        entry = {"student": student, "assignment": assignment, "digest": digest}
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[(student, assignment)] = digest


def _fault_coordinator(recorded: int) -> None:
    """The recovery tests' injected coordinator death (``cluster.FAULT_ENV``)."""
    fault = os.environ.get("AUTOGRADER_FAULT", "")
    if fault.startswith("coordinator-exit-after:") and recorded >= int(fault.split(":")[1]):
        os._exit(17)


def _run_local(
    course: Course, to_run: Sequence[Staged], workers: int, feedback: bool, unsafe: bool
) -> Iterator[tuple[Staged, object]]:
    """Grade ``to_run`` in ``workers`` processes of this machine; yields (staged, JobResult or
    the exception that lost it) as each finishes."""
    if course.config().ResilientExecute.get("warm_kernels", True):
        # One zygote for this process: the workers forked below fork their kernels from it,
        # and its imports overlap nbgrader's start-up (autograder.pipeline.warm).
        warm.start_early()
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(
        max_workers=max(1, min(workers, len(to_run))),
        mp_context=context,
        initializer=_init_worker,
        initargs=(str(course.root), unsafe),
    ) as pool:
        futures = {
            pool.submit(_run_job, Job(str(course.root), s.student, s.assignment, feedback)): s
            for s in to_run
        }
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except Exception as err:  # noqa: BLE001 - a worker process died: report it
                yield futures[future], err


def grade(
    course: Course,
    submissions: Path,
    assignments: Sequence[str] | None = None,
    workers: int = 1,
    feedback: bool = True,
    progress: Callable[[str], None] = lambda line: None,
    unsafe: bool = False,
    cluster: str | None = None,
    resume: bool = False,
) -> tuple[list[NotebookResult], list[str]]:
    """Grade every submission in ``submissions``; results per student and notebook, warnings.

    ``progress`` receives one line per finished submission. Every kernel runs in an OS sandbox
    (:mod:`autograder.pipeline.sandbox`); where none can be made, grading refuses to start
    (:class:`CourseError` naming the fix) unless ``unsafe``, which grades without one and says
    so in every result. ``cluster`` (``local:N`` or a Dask scheduler address) grades on a Dask
    cluster instead of ``workers`` local processes (:mod:`autograder.pipeline.cluster`).
    ``resume`` skips the submissions an interrupted run already recorded (unchanged since).
    """
    if workers < 1:
        raise CourseError(f"--workers must be at least 1, not {workers}")
    if cluster is None:
        if not unsafe:
            refusal = sandbox_refusal(course)
            if refusal:
                raise CourseError(refusal)
        return _grade(course, submissions, assignments, workers, feedback, progress, unsafe,
                      None, resume)  # fmt: skip
    from autograder.pipeline import cluster as dask_cluster

    # The cluster is reached and every worker checked before anything is staged or cleared.
    with dask_cluster.connect(cluster, progress) as client:
        ready = dask_cluster.preflight(client, unsafe)
        progress(f"Dask: {len(ready)} worker(s) ready")
        return _grade(course, submissions, assignments, workers, feedback, progress, unsafe,
                      client, resume)  # fmt: skip


def _grade(
    course: Course,
    submissions: Path,
    assignments: Sequence[str] | None,
    workers: int,
    feedback: bool,
    progress: Callable[[str], None],
    unsafe: bool,
    client: object | None,
    resume: bool,
) -> tuple[list[NotebookResult], list[str]]:
    """:func:`grade`, on ``workers`` local processes or (``client``) a Dask cluster."""
    prepare_environment(course)
    found, warnings = find_submissions(course, submissions, assignments)
    graded_assignments = sorted({assignment for _, assignment, _ in found})
    journal = Journal(course, _course_digest(course, graded_assignments), resume)
    sync_gradebook(course, graded_assignments)
    if client is not None:
        from autograder.pipeline import cluster as dask_cluster

        # the workers get ready (zygote, scratch course, grading process) while we stage
        prepared = dask_cluster.prepare(client, course, graded_assignments, unsafe)
        try:
            return _stage_and_grade(course, found, warnings, journal, workers, feedback,
                                    progress, unsafe, (client, prepared))  # fmt: skip
        finally:
            dask_cluster.release(client, prepared, progress)
    return _stage_and_grade(course, found, warnings, journal, workers, feedback, progress,
                            unsafe, None)  # fmt: skip


def _stage_and_grade(
    course: Course,
    found: list[tuple[str, str, Path | None]],
    warnings: list[str],
    journal: Journal,
    workers: int,
    feedback: bool,
    progress: Callable[[str], None],
    unsafe: bool,
    cluster: tuple[object, object] | None,
) -> tuple[list[NotebookResult], list[str]]:
    """The rest of :func:`_grade`: stage, grade (``cluster``: a Dask client and its prepared
    run), record, report."""
    release = course.state / "release"
    staged = [
        _stage_safely(course, release, folder, student, assignment)
        for student, assignment, folder in found
    ]
    # Parallel autograders of one student's assignments would each insert the student into the
    # gradebook and all but one fail (UNIQUE constraint failed: student.id): add them first.
    with course.gradebook() as gb:
        for student in sorted({s.student for s in staged}):
            gb.update_or_create_student(student)
    results: dict[tuple[str, str], list[Issue]] = {}
    digests = {
        (s.student, s.assignment): submission_digest(course, s.student, s.assignment)
        for s in staged
        if s.gradable
    }
    to_run = []
    for s in staged:
        key = (s.student, s.assignment)
        if not s.gradable:
            _record_missing(course, s)
            progress(f"{s.student}/{s.assignment}: nothing gradable handed in")
        elif journal.finished(*key, digests[key]):
            progress(f"{s.student}/{s.assignment}: already graded by the interrupted run")
        else:  # until nbgrader records the new scores: an interrupted run leaves no old ones
            _record_missing(course, s, review=True)
            to_run.append(s)
    if cluster is not None:
        from autograder.pipeline import cluster as dask_cluster

        client, prepared = cluster
        by_key = {(s.student, s.assignment): s for s in to_run}
        outcomes = (
            (by_key[(student, assignment)], outcome)
            for student, assignment, outcome in dask_cluster.run_tasks(
                client, prepared, course, list(by_key), feedback, unsafe, progress
            )
        )
    else:
        outcomes = _run_local(course, to_run, workers, feedback, unsafe) if to_run else iter(())
    recorded = 0
    for s, outcome in outcomes:
        issues = results.setdefault((s.student, s.assignment), [])
        if isinstance(outcome, BaseException):
            detail = f"grading process failed: {outcome!r}; scored 0, review by hand"
            issues.append(Issue("error", "*", detail))
            _record_missing(course, s, review=True)
            continue
        if not outcome.success:
            detail = f"nbgrader could not grade it: {outcome.message} (log: {outcome.log})"
            issues.append(Issue("error", "*", detail + "; scored 0, review by hand"))
            _record_missing(course, s, review=True)  # no earlier score survives a failure
        else:
            journal.record(s.student, s.assignment, digests[(s.student, s.assignment)])
            recorded += 1
            _fault_coordinator(recorded)
        if outcome.feedback_error:
            # the score is recorded: feedback trouble is reported, never as "not graded"
            issues.append(Issue("feedback", "*", f"no feedback: {outcome.feedback_error}"))
        verdict = "graded" if outcome.success else "FAILED"
        progress(f"{s.student}/{s.assignment}: {verdict} in {outcome.seconds:.1f} s")
    out: list[NotebookResult] = []
    for s in staged:
        run_issues = results.get((s.student, s.assignment), [])
        if feedback and s.gradable:
            run_issues += _check_feedback(course, s)
        for name in s.notebooks:
            issues = [i for i in s.issues if i.notebook in (name, "*")]
            graded = course.autograded / s.student / s.assignment / f"{name}.ipynb"
            if name in s.gradable and graded.exists():
                issues += execution_issues(graded, name)
            issues += [i for i in run_issues if i.notebook in (name, "*")]
            if unsafe:
                issues.append(Issue("unsafe", name, UNSAFE))
            out.append(NotebookResult(s.student, s.assignment, name, issues))
        for issue in s.issues:
            if issue.kind == "extra":
                warnings.append(f"{s.student}/{s.assignment}: {issue.detail}, ignored")
    read_scores(course, out)
    return out, warnings
