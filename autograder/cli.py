"""``python -m autograder``: the instructor's commands over nbgrader.

    release [--check]                     build notebooks/ from solutions/ (or check it)
    package [--unlock NN ...] [--out DIR] the student wheel (no answers) and notebooks
    verify  [--assignment NN] [--quick]   solutions pass, blanks and known bugs fail
    grade   SUBMISSIONS [--workers N | --cluster ADDRESS|local:N] [--resume] [--assignment NN]
            [--csv FILE] [--no-feedback] [--unsafe]
    demo                                  release, grade a generated class, print the table

Every command takes ``--root`` (the course root, default: this repository).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from autograder.pipeline.coursedir import REPO_ROOT, Course, CourseError, prepare_environment


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m autograder", description="Instructor commands for the Soft Prompts Course."
    )
    parser.add_argument(
        "--root", type=Path, default=REPO_ROOT, help="course root (default: %(default)s)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    release = commands.add_parser("release", help="generate notebooks/ from solutions/")
    release.add_argument("--check", action="store_true", help="fail if notebooks/ is stale")
    release.add_argument("--assignment", action="append", help="NN or NN_name (repeatable)")

    package = commands.add_parser(
        "package", help="build what students get: a wheel without the answers, the notebooks"
    )
    package.add_argument(
        "--unlock",
        nargs="+",
        default=[],
        metavar="NN",
        help="notebooks already due whose reference later notebooks build on (03 and 05 need "
        "01 02)",
    )
    package.add_argument(
        "--out", type=Path, default=Path("dist/student"), help="output folder (%(default)s)"
    )

    verify = commands.add_parser("verify", help="prove the tests are not vacuous")
    verify.add_argument("--assignment", action="append", help="NN or NN_name (repeatable)")
    verify.add_argument("--quick", action="store_true", help="solutions and blanks only")
    verify.add_argument("--workers", type=int, default=2, help="parallel autograders")
    verify.add_argument(
        "--bugs", default="autograder.bugzoo", help="module with BUGS (default: %(default)s)"
    )

    grade = commands.add_parser("grade", help="autograde <student>/<assignment>/ folders")
    grade.add_argument("submissions", type=Path, help="folder of <student>/<assignment>/")
    grade.add_argument("--assignment", action="append", help="NN or NN_name (repeatable)")
    grade.add_argument(
        "--workers", type=int, default=2, help="parallel autograders (default: %(default)s)"
    )
    grade.add_argument(
        "--cluster",
        metavar="ADDRESS|local:N",
        help="grade on a Dask cluster: a scheduler address (tcp://HOST:8786), or local:N for N "
        "worker processes on this machine (needs the `cluster` extra; docs/cluster/README.md)",
    )
    grade.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: skip the submissions it already recorded",
    )
    grade.add_argument("--csv", type=Path, help="write one row per student and notebook")
    grade.add_argument("--no-feedback", action="store_true", help="skip the feedback HTML")
    grade.add_argument(
        "--unsafe",
        action="store_true",
        help="grade even where kernels cannot be sandboxed: student code then runs with your "
        "permissions (every report line says so)",
    )

    demo = commands.add_parser("demo", help="release and grade a generated class")
    demo.add_argument(
        "--assignment", action="append", help="NN or NN_name (repeatable; default: one)"
    )
    demo.add_argument("--workers", type=int, default=2, help="parallel autograders")
    demo.add_argument("--bugs", type=int, default=2, help="bug-zoo students per assignment")
    demo.add_argument("--timeout", type=int, default=60, help="cell time limit in the demo (s)")
    return parser


def _say(line: str) -> None:
    """Print a progress line now (stdout may be a file or a pipe)."""
    print(line, flush=True)


def _release(course: Course, args: argparse.Namespace) -> int:
    from autograder.pipeline.release import release, written_files

    selected = course.resolve(args.assignment)
    start = time.perf_counter()
    problems = release(course, selected, check=args.check)
    took = time.perf_counter() - start
    if args.check:
        if problems:
            print("the release is out of date:", *problems, sep="\n  ")
            if any(not p.startswith("stale figure") for p in problems):
                print("run: python -m autograder release")
            return 1
        print(f"notebooks/ is up to date ({len(selected)} assignment(s), {took:.1f} s)")
        return 0
    for path in written_files(course, selected):
        print(f"wrote {path}")
    print(f"released {len(selected)} assignment(s) in {took:.1f} s")
    return 0


def _package(course: Course, args: argparse.Namespace) -> int:
    from autograder.pipeline.package import build_student_package

    start = time.perf_counter()
    summary = build_student_package(course, args.out, args.unlock)
    wheel = summary["wheel"]
    print(
        f"wrote {wheel} ({wheel.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s)"
    )
    print(f"wrote {args.out / 'notebooks'}/ and {args.out / 'MANIFEST.txt'}")
    print(f"reference included for: {', '.join(summary['unlocked']) or 'no notebook'}")
    for notebook, (points, cells) in summary["regraded"].items():
        print(
            f"warning: {notebook} grades objects of an unlocked notebook again ({points} points: "
            f"{', '.join(cells)}); the reference in this wheel answers them"
        )
    for notebook, missing in summary["waiting"].items():
        print(
            f"note: {notebook} needs --unlock {' '.join(n[:2] for n in missing)} once those are due"
        )
    print(
        "students: upload the wheel in Colab's Files pane (or publish it and set "
        "[tool.soft-prompts-course] install), or `pip install` it"
    )
    return 0


def _verify(course: Course, args: argparse.Namespace) -> int:
    from autograder.pipeline.verify import load_bugs, verify

    bugs = {} if args.quick else load_bugs(args.bugs)
    report = verify(course, args.assignment, bugs, workers=args.workers, progress=_say)
    print(report.table())
    print(report.summary())
    return 0 if report.ok else 1


def _grade(course: Course, args: argparse.Namespace) -> int:
    from autograder.pipeline.grade import grade
    from autograder.pipeline.report import results_table, write_csv

    start = time.perf_counter()
    results, notes = grade(
        course,
        args.submissions.resolve(),
        args.assignment,
        workers=args.workers,
        feedback=not args.no_feedback,
        progress=_say,
        unsafe=args.unsafe,
        cluster=args.cluster,
        resume=args.resume,
    )
    took = time.perf_counter() - start
    for note in notes:
        print(f"note: {note}")
    print(results_table(results))
    if args.csv:
        write_csv(args.csv, results)
        print(f"wrote {args.csv}")
    failed = [r for r in results if r.failed]
    students = len({r.student for r in results})
    where = (
        f"on the Dask cluster {args.cluster}" if args.cluster else f"with {args.workers} worker(s)"
    )
    print(f"graded {students} student(s) in {took:.1f} s {where}")
    faults = Counter(issue.kind for r in results for issue in r.issues)
    if faults:
        print("faults: " + ", ".join(f"{kind} {n}" for kind, n in sorted(faults.items())))
    if failed:
        print(f"{len(failed)} notebook(s) could not be graded; see the status column")
        return 1
    return 0


def _demo(course: Course, args: argparse.Namespace) -> int:
    from autograder.pipeline.demo import demo

    return demo(
        course,
        args.assignment,
        workers=args.workers,
        bugs_per_assignment=args.bugs,
        timeout=args.timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (1: a check failed, 2: bad input)."""
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="nbformat")
    warnings.filterwarnings("ignore", message=".*not in session.*")  # nbgrader's SQLAlchemy use
    commands = {
        "release": _release,
        "package": _package,
        "verify": _verify,
        "grade": _grade,
        "demo": _demo,
    }
    try:
        course = Course.at(args.root)
        prepare_environment(course)
        return commands[args.command](course, args)
    except CourseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
