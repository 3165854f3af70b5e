"""Autograding time per student, and how ``grade --workers`` scales.

``python -m benchmarks.grading [--students 4] [--workers 1 2] [--assignment NN ...]`` builds a
scratch copy of the course in ``.nbgrader/demo/`` (the real gradebook is untouched),
gives the solution its saved artifacts (a solved run makes them once; they are cached in
``.nbgrader/artifacts``), hands in the solved notebooks of every assignment for ``--students``
students, and grades the class through nbgrader once per ``--workers`` value, each time with a
fresh gradebook. Prints per-notebook autograde times (one student, all notebooks = one
"submission"), the wall time per class and the speed-up, the wall time for one student alone
(what an instructor waits for a single submission, every notebook included, feedback made),
and the sandbox's cost: the same class graded by one worker with every kernel sandboxed (the
default) and without (``unsafe``), alternating. Writes the tables to ``benchmarks/RESULTS.md``
(section "grading") unless ``--no-write``.

``--cluster local:2`` instead compares ``grade --cluster local:2`` with ``grade --workers W`` (the
first ``--workers`` value) on the same class, alternating ``--rounds`` times, and projects the
wall time of 1,000 students on 4, 16 and 64 Dask workers from the measured per-task cost, the
coordinator's recording cost per task and the cluster's set-up time (section "grading on a Dask
cluster").
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import time
from collections import defaultdict

from autograder.pipeline import classroom
from autograder.pipeline.coursedir import REPO_ROOT, Course
from autograder.pipeline.demo import _scratch
from autograder.pipeline.grade import grade
from autograder.pipeline.release import release
from benchmarks.common import machine_description, write_section

LINE = re.compile(r"^(?P<student>[^/]+)/(?P<assignment>\S+): graded in (?P<s>[\d.]+) s")


def _class(course: Course, assignments: list[str], students: int):
    """Scratch course and a submissions folder of ``students`` solved students."""
    scratch = _scratch(course, assignments, timeout=120)
    config = scratch.root / "nbgrader_config.py"  # as `grade` runs: reference and keys hidden
    config.write_text(config.read_text() + "\nc.GradedExecute.hide_answers = True\n")
    work = scratch.root.parent
    submissions = work / "submissions"
    for assignment in assignments:
        classroom.make_artifacts(scratch, assignment, work / "run", course.state / "artifacts")
        solved = {n: done for n, (_, done) in classroom.notebooks_of(scratch, assignment).items()}
        for i in range(students):
            classroom.write_submission(scratch, submissions, f"s{i:02d}", assignment, solved)
    return scratch, submissions


def _fresh_gradebook(scratch: Course) -> None:
    for path in (scratch.state / "gradebook.db", scratch.autograded, scratch.feedback):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    shutil.rmtree(scratch.submitted, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--students", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--assignment", nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=2, help="sandbox on/off comparisons")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--cluster", help="compare grade --cluster SPEC with --workers")
    args = parser.parse_args()

    course = Course.at(REPO_ROOT)
    assignments = course.resolve(args.assignment)
    release(course, assignments)
    scratch, submissions = _class(course, assignments, args.students)
    if args.cluster:
        _compare_cluster(args, scratch, submissions, assignments)
        return
    runs = {}
    per_notebook: dict[str, list[float]] = defaultdict(list)
    for workers in args.workers:
        _fresh_gradebook(scratch)
        lines: list[str] = []
        start = time.perf_counter()
        results, _ = grade(
            scratch, submissions, assignments, workers=workers, progress=lines.append
        )
        wall = time.perf_counter() - start
        failed = [f"{r.student}/{r.notebook}: {r.status}" for r in results if r.failed]
        if failed:
            raise SystemExit("grading failed:\n" + "\n".join(failed))
        runs[workers] = wall
        if workers == 1:
            for line in lines:
                if found := LINE.match(line):
                    per_notebook[found["assignment"]].append(float(found["s"]))
        print(f"{workers} worker(s): {wall:.1f} s for {args.students} students", flush=True)
    # The sandbox's cost: one worker, sandboxed and not, alternating (same class, same machine).
    overhead: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for sandboxed in (True, False):
            _fresh_gradebook(scratch)
            start = time.perf_counter()
            grade(scratch, submissions, assignments, workers=1, unsafe=not sandboxed)
            overhead[sandboxed].append((time.perf_counter() - start) / args.students)
            print(f"sandboxed={sandboxed}: {overhead[sandboxed][-1]:.1f} s per student", flush=True)
    # One student alone: the time an instructor waits for a single submission.
    alone = submissions.parent / "one-student"
    shutil.rmtree(alone, ignore_errors=True)
    shutil.copytree(submissions / "s00", alone / "s00")
    single = {}
    for workers in args.workers:
        _fresh_gradebook(scratch)
        start = time.perf_counter()
        grade(scratch, alone, assignments, workers=workers)
        single[workers] = time.perf_counter() - start
        print(f"{workers} worker(s): {single[workers]:.1f} s for one student alone", flush=True)

    out = [
        f"Machine: {machine_description()}. {args.students} students, each handing in the solved "
        f"notebooks of {len(assignments)} assignments with their saved artifacts (no "
        "retraining); nbgrader autograde through `autograder.pipeline.grade`.",
        "",
        "| notebook | autograde time per student, median (s) |",
        "|---|---:|",
    ]
    for assignment in assignments:
        times = per_notebook.get(assignment, [])
        shown = f"{statistics.median(times):.1f}" if times else "n/a"
        out.append(f"| {assignment} | {shown} |")
    if per_notebook:
        one = sum(statistics.median(t) for t in per_notebook.values())
        out.append(f"| **one whole submission** (sum) | **{one:.1f}** |")
    out += [
        "",
        "| workers | one student alone, wall (s) | class wall time (s) | per student in the "
        "class (s) | class speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    base = runs[args.workers[0]]
    for workers, wall in runs.items():
        out.append(
            f"| {workers} | {single[workers]:.1f} | {wall:.1f} | {wall / args.students:.1f} "
            f"| {base / wall:.2f}x |"
        )
    on, off = statistics.median(overhead[True]), statistics.median(overhead[False])
    out += [
        "",
        f"Sandbox cost, one worker, {args.rounds} alternating rounds (median per student):",
        "",
        "| kernels | per student (s) |",
        "|---|---:|",
        f"| sandboxed (the default) | {on:.1f} |",
        f"| not sandboxed (`--unsafe`) | {off:.1f} |",
        f"| overhead | {100 * (on - off) / off:+.1f}% |",
    ]
    table = "\n".join(out)
    print(table)
    if not args.no_write:
        command = f"python -m benchmarks.grading --students {args.students}"
        write_section("grading", command, table)


def _graded_by_cli(scratch: Course, submissions, assignments, *how: str) -> tuple[float, str]:
    """``python -m autograder grade`` in a fresh process (as an instructor runs it), in its own
    session, killed whole afterwards: wall time and what it printed."""
    import os
    import signal
    import subprocess
    import sys

    _fresh_gradebook(scratch)
    command = [sys.executable, "-m", "autograder", "--root", str(scratch.root), "grade"]
    command += [str(submissions), *how]
    for assignment in assignments:
        command += ["--assignment", assignment]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    out, err = process.communicate()
    wall = time.perf_counter() - start
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if process.returncode != 0:
        raise SystemExit(f"grading failed ({' '.join(how)}):\n{out[-3000:]}\n{err[-3000:]}")
    return wall, out


def _compare_cluster(args, scratch: Course, submissions, assignments) -> None:
    workers = args.workers[0]
    tasks = args.students * len(assignments)
    walls: dict[str, list[float]] = {"workers": [], "cluster": []}
    task_s: list[float] = []
    record_s: list[float] = []
    setup_s: list[float] = []
    worker_line = re.compile(r"^worker .*: (\d+) notebook\(s\), ([\d.]+) s each", re.M)
    record_line = re.compile(
        r"^coordinator: \d+ task\(s\) recorded, ([\d.]+) s each.*set-up ([\d.]+) s", re.M
    )
    for _ in range(args.rounds):
        wall, _out = _graded_by_cli(scratch, submissions, assignments, "--workers", str(workers))
        walls["workers"].append(wall)
        print(f"--workers {workers}: {wall:.1f} s", flush=True)
        wall, out = _graded_by_cli(scratch, submissions, assignments, "--cluster", args.cluster)
        walls["cluster"].append(wall)
        for count, each in worker_line.findall(out):
            task_s += [float(each)] * int(count)
        for each, setup in record_line.findall(out):
            record_s.append(float(each))
            setup_s.append(float(setup))
        print(f"--cluster {args.cluster}: {wall:.1f} s", flush=True)
    local, dask = statistics.median(walls["workers"]), statistics.median(walls["cluster"])
    task, record = statistics.median(task_s), statistics.median(record_s)
    setup = statistics.median(setup_s)
    out = [
        f"Machine: {machine_description()}. {args.students} students x {len(assignments)} "
        f"notebooks ({', '.join(assignments)}) = {tasks} tasks, solved notebooks with their "
        f"artifacts; {args.rounds} alternating rounds, each `python -m autograder grade` in a "
        "fresh process with a fresh gradebook (process start and imports included).",
        "",
        "| run | wall time per round (s) | median (s) | vs --workers |",
        "|---|---|---:|---:|",
        f"| `grade --workers {workers}` | {', '.join(f'{w:.1f}' for w in walls['workers'])} "
        f"| {local:.1f} | 1.00x |",
        f"| `grade --cluster {args.cluster}` | {', '.join(f'{w:.1f}' for w in walls['cluster'])} "
        f"| {dask:.1f} | {dask / local:.2f}x |",
        "",
        f"Measured on the cluster runs: {task:.2f} s per task on a worker (median of the "
        f"workers' means, autograde and feedback), {record:.2f} s per task for the coordinator "
        "to record it (grades written as nbgrader's SaveAutoGrades does, late penalties, "
        "autograded folder and feedback written), "
        f"{setup:.1f} s of set-up (cluster start, preflight of every worker, the course bundle "
        "with its gradebook record sent and every worker made ready while the coordinator "
        "stages the submissions, tasks submitted). Workers grade in parallel, each from kernels "
        "forked by its own warm zygote; the coordinator records one task at a time, so its "
        "recording cost bounds the throughput. On this machine the coordinator, the scheduler "
        "and the two Dask workers share the two cores that `--workers 2` gives to its two "
        "graders alone (Dask's profiler and monitors are turned down, as the instructor docs "
        "say): that, with the cluster's start and preflight, is the difference.",
        "",
        "Projection for 1,000 students x "
        f"{len(assignments)} notebooks ({1000 * len(assignments)} tasks), assuming each worker "
        "has its own cores and the same per-task cost: wall = set-up + max(tasks x task / "
        "workers, tasks x record).",
        "",
        "| Dask workers | projected wall time | bound by |",
        "|---:|---:|---|",
    ]
    total = 1000 * len(assignments)
    for n in (4, 16, 64):
        work, rec = total * task / n, total * record
        wall = setup + max(work, rec)
        out.append(
            f"| {n} | {wall / 3600:.2f} h ({wall / 60:.0f} min) | "
            f"{'the workers' if work >= rec else 'the coordinator recording'} |"
        )
    table = "\n".join(out)
    print(table)
    if not args.no_write:
        command = (
            f"python -m benchmarks.grading --students {args.students} --assignment "
            f"{' '.join(a[:2] for a in assignments)} --workers {workers} --cluster {args.cluster}"
            f" --rounds {args.rounds}"
        )
        write_section("grading on a Dask cluster", command, table)


if __name__ == "__main__":
    main()
