"""``grade --cluster`` (issue 14): the same grades on a Dask cluster as on local workers, with a
worker killed mid-notebook and with the coordinator killed mid-run and resumed; bad cluster input
stops before anything is staged; ``--workers`` needs no Dask; the example configs parse."""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook
from test_pipeline import ASSIGNMENT, cli, make_course, released, set_cell

from autograder.pipeline import classroom, cluster, warm
from autograder.pipeline.coursedir import REPO_ROOT, Course, CourseError
from autograder.pipeline.grade import JOURNAL, Journal, sync_gradebook

pytest.importorskip("distributed")

STUDENTS = ("solution-0", "blank-1", "hidden-2", "solution-3")


def _class(root: Path) -> tuple[Course, Path]:
    """The fixture course, released, and six students: solved, blank, a hidden-test failure."""
    course = make_course(root / "course")
    assert cli(course, "release").returncode == 0
    submissions = root / "submissions"
    ((_, done),) = classroom.notebooks_of(course, ASSIGNMENT).values()
    blank = nbformat.read(released(course), as_version=4)
    hidden = set_cell(nbformat.from_dict(done), "square", "def square(x):\n    return 3 * x")
    for student in STUDENTS:
        kind = student.split("-")[0]
        nb = {"solution": done, "blank": blank, "hidden": hidden}[kind]
        classroom.write_submission(
            course, submissions, student, ASSIGNMENT, {ASSIGNMENT: nb}, artifacts=kind != "blank"
        )
    return course, submissions


def _run(course: Course, *args: str | Path, env: dict[str, str] | None = None):
    """``grade`` in its own session; whatever it leaves behind is killed afterwards."""
    command = [sys.executable, "-m", "autograder", "--root", str(course.root), "grade", *args]
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.Popen(
        list(map(str, command)),
        cwd=REPO_ROOT,
        env={**base, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=420)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # a killed coordinator's orphans, if any
        except ProcessLookupError:
            pass
    return process.returncode, out, err


def _grades(course: Course) -> dict[tuple[str, str], tuple]:
    """(student, cell) -> (auto score, manual score, needs manual grade), from the gradebook."""
    rows = {}
    with Gradebook(course.db_url, "") as gb:
        for student in STUDENTS:
            submission = gb.find_submission_notebook(ASSIGNMENT, ASSIGNMENT, student)
            for grade in submission.grades:
                rows[(student, grade.name)] = (
                    grade.auto_score,
                    grade.manual_score,
                    grade.needs_manual_grade,
                )
    return rows


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A released fixture course and its class, made once; each test grades a copy."""
    root = tmp_path_factory.mktemp("cluster-template")
    _class(root)
    return root


def _copy(template: Path, where: Path) -> tuple[Course, Path]:
    shutil.copytree(template, where, symlinks=True)
    return Course.at(where / "course"), where / "submissions"


@pytest.fixture(scope="module")
def classes(template: Path, tmp_path_factory: pytest.TempPathFactory):
    course, submissions = _copy(template, tmp_path_factory.mktemp("cluster") / "local")
    rc, out, err = _run(course, submissions, "--workers", "2")
    assert rc == 0, out + err
    return template, _grades(course)


@pytest.mark.slow
def test_a_worker_killed_mid_notebook_loses_nothing_and_grades_nobody_twice(classes, tmp_path):
    template, expected = classes
    course, submissions = _copy(template, tmp_path / "class")
    marker = tmp_path / "worker-died"
    fault = f"worker-exit:solution-0/{ASSIGNMENT}:{marker}"
    rc, out, err = _run(course, submissions, "--cluster", "local:2", env={cluster.FAULT_ENV: fault})
    assert rc == 0, out + err
    assert marker.exists(), "the worker grading solution-0 was not killed"
    assert "dashboard http" in out
    workers = re.findall(r"^worker .*: (\d+) notebook\(s\).*kernels: (\d+) forked", out, re.M)
    assert workers, out
    if warm.supported():  # every kernel forked: a zygote that cannot serve is seconds a notebook
        assert all(int(n) >= 1 and forked == n for n, forked in workers), out
        assert "launched normally" not in out, out
    graded = [line.split(":")[0] for line in out.splitlines() if ": graded in " in line]
    assert sorted(graded) == sorted(f"{s}/{ASSIGNMENT}" for s in STUDENTS), out
    assert _grades(course) == expected, "the cluster's grades differ from --workers 2's"
    for student in STUDENTS:
        assert (course.feedback / student / ASSIGNMENT / f"{ASSIGNMENT}.html").is_file()
        assert (course.autograded / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb").is_file()
    journal = (course.state / JOURNAL).read_text().splitlines()
    assert len(journal) == 1 + len(STUDENTS), "each task is recorded exactly once"


@pytest.mark.slow
def test_a_killed_coordinator_resumes_without_regrading_finished_notebooks(classes, tmp_path):
    template, expected = classes
    course, submissions = _copy(template, tmp_path / "class")
    fault = {cluster.FAULT_ENV: "coordinator-exit-after:2"}
    rc, out, err = _run(course, submissions, "--cluster", "local:2", env=fault)
    assert rc == 17, (rc, out, err)  # died right after recording two tasks
    recorded = (course.state / JOURNAL).read_text().splitlines()[1:]
    assert len(recorded) == 2
    with course.gradebook() as gb:  # an instructor grades a cell by hand meanwhile
        gb.find_grade("explain", ASSIGNMENT, ASSIGNMENT, "solution-3").manual_score = 1.0
        gb.db.commit()
    rc, out, err = _run(course, submissions, "--cluster", "local:2", "--resume")
    assert rc == 0, out + err
    skipped = [line for line in out.splitlines() if "already graded by the interrupted" in line]
    regraded = [line for line in out.splitlines() if ": graded in " in line]
    assert len(skipped) == 2 and len(regraded) == len(STUDENTS) - 2, out
    grades = _grades(course)
    assert grades.pop(("solution-3", "explain"))[1] == 1.0, "the manual grade survived"
    expected = {k: v for k, v in expected.items() if k != ("solution-3", "explain")}
    assert grades == expected, "the resumed run's grades differ from a clean run's"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_bad_cluster_input_stops_before_anything_is_staged(template, tmp_path):
    course, submissions = _copy(template, tmp_path / "class")
    rc, out, err = _run(course, submissions, "--cluster", f"tcp://127.0.0.1:{_free_port()}")
    assert rc == 2 and "cannot reach the Dask scheduler" in err and "dask scheduler" in err, err
    assert not course.submitted.exists(), "nothing is staged before the cluster is checked"
    rc, _, err = _run(course, submissions, "--cluster", "local:0")
    assert rc == 2 and "local:N with N >= 1" in err
    # A worker without the course package: a scheduler and one worker that cannot import it.
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DASK_DISTRIBUTED__WORKER__DAEMON"] = "False"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", str(port),
         "--dashboard-address", ":0", "--host", "127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    blocked = (
        "import sys; sys.modules['autograder'] = None; sys.modules['course'] = None; "
        "from distributed.cli.dask_worker import main; "
        f"sys.argv = ['dask-worker', 'tcp://127.0.0.1:{port}', '--nthreads', '1', '--no-nanny']; "
        "main()"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", blocked], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(4)
        rc, out, err = _run(course, submissions, "--cluster", f"tcp://127.0.0.1:{port}")
    finally:
        for process in (worker, scheduler):
            process.kill()
            process.wait()
    assert rc == 2, out + err
    assert "the course package is not installed there" in err, err
    assert "nothing was graded" in err
    assert not course.submitted.exists()


class _FakeClient:
    def __init__(self, answers):
        self.answers = answers

    def run(self, fn, on_error="raise"):
        assert fn.__module__ == "__course_probe__", "the probe travels by value"
        return self.answers


def test_preflight_names_the_fix_for_each_worker() -> None:
    here = cluster.fingerprint()
    good = {**here, "sandbox": True, "daemon": False}
    answers = {
        "tcp://a:1": good,
        "tcp://b:1": {**good, "sources": "0123456789abcdef"},
        "tcp://c:1": {**good, "daemon": True},
        "tcp://d:1": {**good, "sandbox": False, "sandbox_message": "no user namespaces"},
        "tcp://e:1": OSError("connection reset"),
        "tcp://f:1": {**good, "lacking": ["torch", "nbgrader"]},
    }
    with pytest.raises(CourseError) as info:
        cluster.preflight(_FakeClient(answers), unsafe=False)
    text = str(info.value)
    assert "tcp://a:1" not in text
    assert "tcp://b:1: grades with soft-prompts-course" in text and "same version" in text
    assert "tcp://c:1" in text and "DASK_DISTRIBUTED__WORKER__DAEMON=False" in text
    assert "tcp://d:1: cannot sandbox kernels (no user namespaces)" in text and "--unsafe" in text
    assert "tcp://e:1: could not be probed" in text
    assert "tcp://f:1: lacks torch, nbgrader" in text and "dependencies" in text
    assert cluster.preflight(_FakeClient({"tcp://a:1": good}), unsafe=False)
    with pytest.raises(CourseError, match="no workers"):
        cluster.preflight(_FakeClient({}), unsafe=False)


def test_the_probe_imports_neither_the_course_nor_torch() -> None:
    """Importing the course imports torch, seconds on every worker: the probe finds the
    packages without importing them, and still names what a worker lacks."""
    code = (
        "import sys; from autograder.pipeline import cluster; info = cluster.fingerprint(); "
        "print(len(info['sources']), info['lacking'], info['sandbox'] in (True, False), "
        "sorted({'torch', 'course', 'transformers'} & set(sys.modules)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.stdout.split("\n")[0] == "16 [] True []", done.stdout + done.stderr
    blocked = "import sys; sys.modules['transformers'] = None; " + code
    done = subprocess.run(
        [sys.executable, "-c", blocked], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert "16 ['transformers']" in done.stdout, done.stdout + done.stderr


def test_a_worker_grades_against_the_coordinators_record_and_is_released(template, tmp_path):
    """The bundle carries the coordinator's gradebook without its students (the worker records
    nothing itself); releasing a run stops the worker's grading process and deletes its course."""
    course, _ = _copy(template, tmp_path / "class")
    sync_gradebook(course, [ASSIGNMENT])
    with course.gradebook() as gb:
        gb.update_or_create_student("somebody-graded-before")
        gb.update_or_create_submission(ASSIGNMENT, "somebody-graded-before")
        assert gb.students
        expected = {
            (g.name, g.max_score) for g in gb.find_notebook(ASSIGNMENT, ASSIGNMENT).grade_cells
        }
    bundle = cluster.course_bundle(course, [ASSIGNMENT])
    again = cluster.course_bundle(course, [ASSIGNMENT])
    assert bundle.digest == again.digest and bundle.key != again.key, "one run, one course"
    report = cluster.prepare_worker(bundle, unsafe=True)
    assert report["worker"] and report["zygote"] == "" or not warm.supported(), report
    root = cluster._SCRATCH[bundle.key]
    assert str(root) in sys.path and root.stat().st_mode & 0o077 == 0
    assert root.parent.stat().st_mode & 0o077 == 0, "scratch courses live in a private folder"
    try:
        with Gradebook(f"sqlite:///{root / '.nbgrader' / 'gradebook.db'}", "") as gb:
            assert gb.students == [], "the coordinator's students travelled to the worker"
            notebook = gb.find_notebook(ASSIGNMENT, ASSIGNMENT)
            assert {(g.name, g.max_score) for g in notebook.grade_cells} == expected
        (pool,) = [p for key, p in cluster._POOL.items() if key.startswith(f"{root}:")]
        (process,) = pool._processes.values()
        assert process.is_alive(), "prepare_worker starts the grading process"
    finally:
        # what the async _release_worker runs off the event loop (asyncio.run is refused here
        # when an earlier test left an event loop running in this thread, e.g. Playwright's)
        cluster._release_now(bundle.key)
    assert not root.exists() and bundle.key not in cluster._SCRATCH
    assert not any(key.startswith(f"{root}:") for key in cluster._POOL)
    assert str(root) not in sys.path and str(root) not in os.environ.get("PYTHONPATH", "")
    assert cluster._SCRATCH or not root.parent.exists(), "the worker's private folder is left"
    process.join(10)
    assert not process.is_alive(), "the grading process outlived the run"
    with pytest.raises(CourseError, match="released"):  # a task that arrives too late
        cluster.prepare_worker(bundle, unsafe=True)
    assert not any(key.startswith(f"{root}:") for key in cluster._POOL)


def test_a_grading_process_that_died_idle_is_restarted_for_the_next_task(template, tmp_path):
    """A worker whose grading process died between tasks grades its next task in a new one
    (before: every later task on that worker failed, scored 0)."""
    course, submissions = _copy(template, tmp_path / "class")
    sync_gradebook(course, [ASSIGNMENT])
    bundle = cluster.course_bundle(course, [ASSIGNMENT])
    cluster.prepare_worker(bundle, unsafe=True)
    root = cluster._SCRATCH[bundle.key]
    try:
        (pool,) = [p for key, p in cluster._POOL.items() if key.startswith(f"{root}:")]
        (process,) = pool._processes.values()
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        deadline = time.monotonic() + 10
        while not pool._broken and time.monotonic() < deadline:  # its manager notices
            time.sleep(0.05)
        assert pool._broken, "the pool did not notice its process died"
        folder = submissions / "solution-0" / ASSIGNMENT
        files = {
            str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        }
        task = cluster.Task("solution-0", ASSIGNMENT, files, False, True, None)
        result = cluster.grade_task(bundle, task)
        assert result.success, result.message
        assert result.grades, "the task's grades came back"
    finally:
        cluster._release_now(bundle.key)


class _Done:
    """A stand-in for a finished (or failed) Dask future."""

    def __init__(self, result=None, error: Exception | None = None) -> None:
        self.status = "error" if error else "finished"
        self._result, self._error = result, error

    def done(self) -> bool:
        return True

    def result(self, timeout=None):
        return self._result

    def exception(self, timeout=None):
        return self._error


class _Client:
    def __init__(self, addresses) -> None:
        self.addresses = addresses

    def nthreads(self) -> dict[str, int]:
        return dict.fromkeys(self.addresses, 1)


def test_workers_that_cannot_get_ready_are_named_and_none_ready_stops_the_run() -> None:
    bundle = cluster.Bundle("0" * 64, (ASSIGNMENT,), b"")
    client, lines = _Client(["tcp://a", "tcp://b"]), []
    broken = _Done(error=ImportError("no module named torch"))
    zygote_failed = _Done({"worker": "b", "zygote": "ImportError: transformers"})
    prepared = cluster.Prepared(bundle, None, [broken, zygote_failed], 0.0, ["tcp://a", "tcp://b"])
    only = cluster._check_ready(client, prepared, lines.append)
    assert only == ["tcp://b"], "tasks go to the workers that got ready"
    assert any(
        line.startswith("worker tcp://a: could not get ready") and "no module named torch" in line
        for line in lines
    ), lines
    assert any("worker b" in line and "launch normally" in line for line in lines), lines
    prepared.warming = [zygote_failed, zygote_failed]
    assert cluster._check_ready(client, prepared, lines.append) is None, "any worker"
    prepared.warming = [broken, broken]
    with pytest.raises(CourseError, match="no Dask worker could get ready.*no module named torch"):
        cluster._check_ready(client, prepared, lines.append)


def test_cluster_specs_are_parsed_or_refused() -> None:
    assert cluster.parse_cluster("local:4") == ("local", 4)
    assert cluster.parse_cluster("10.0.0.5:8786") == ("address", "tcp://10.0.0.5:8786")
    assert cluster.parse_cluster("tls://sched:8786") == ("address", "tls://sched:8786")
    for bad in ("local", "local:x", "local:0", "", "two words"):
        with pytest.raises(CourseError):
            cluster.parse_cluster(bad)


def test_resume_refuses_without_a_journal_or_after_the_course_changed(tmp_path) -> None:
    course = make_course(tmp_path / "course")
    with pytest.raises(CourseError, match="no interrupted run"):
        Journal(course, "abc", resume=True)
    journal = Journal(course, "abc", resume=False)
    journal.record("ann", ASSIGNMENT, "d1")
    again = Journal(course, "abc", resume=True)
    assert again.finished("ann", ASSIGNMENT, "d1")
    assert not again.finished("ann", ASSIGNMENT, "d2"), "a changed submission is graded again"
    with pytest.raises(CourseError, match="changed since the interrupted run"):
        Journal(course, "xyz", resume=True)


def test_workers_need_no_dask_and_cluster_names_the_extra(template, tmp_path) -> None:
    """Without Dask installed, --workers grades as before and --cluster says what to install."""
    course, submissions = _copy(template, tmp_path / "class")
    script = (
        "import runpy, sys; sys.modules['distributed'] = None; sys.modules['dask'] = None; "
        "sys.argv = ['autograder'] + sys.argv[1:]; runpy.run_module('autograder', "
        "run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base = [sys.executable, "-c", script, "--root", str(course.root), "grade", str(submissions)]
    done = subprocess.run(
        [*base, "--cluster", "local:2"], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "soft-prompts-course[cluster]" in done.stderr, done.stderr
    assert not course.submitted.exists()
    one = tmp_path / "one"
    (one / "solution-0").parent.mkdir()
    (submissions / "solution-0").rename(one / "solution-0")
    done = subprocess.run(
        [*base[:-1], str(one), "--workers", "1"], env=env, cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "solution-0/99_fixture: graded in" in done.stdout


def test_the_documented_worker_settings_are_the_local_clusters() -> None:
    """docs/cluster/README.md's "Keep Dask quiet" variables, read by Dask, give exactly the
    settings --cluster local:N uses, and every example that starts workers sets each of them."""
    folder = REPO_ROOT / "docs" / "cluster"
    readme = (folder / "README.md").read_text()
    block = readme.split("## Keep Dask quiet", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    names = [line.removeprefix("export ").split("=")[0] for line in block.split("\n") if line]
    env = dict(line.removeprefix("export ").split("=", 1) for line in block.split("\n") if line)
    code = (
        "import json, dask, distributed; from autograder.pipeline.cluster import QUIET; "
        "print(json.dumps({k: [dask.config.get(k), v] for k, v in QUIET.items()}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, cwd=REPO_ROOT,
        capture_output=True, text=True,
    )  # fmt: skip
    import json

    pairs = json.loads(done.stdout)
    assert len(names) == len(pairs), "one variable per setting"
    assert all(got == wanted for got, wanted in pairs.values()), pairs
    for example in ("ssh.sh", "slurm-workers.sbatch", "slurm_cluster.py", "kubernetes.yaml",
                    "dask-kubernetes-cluster.yaml"):  # fmt: skip
        text = (folder / example).read_text()
        assert all(name in text for name in names), f"{example} does not keep Dask quiet"


def test_the_example_cluster_configs_parse() -> None:
    yaml = pytest.importorskip("yaml")
    folder = REPO_ROOT / "docs" / "cluster"
    configs = sorted(folder.iterdir())
    assert {p.suffix for p in configs} >= {".yaml", ".sh", ".py", ".sbatch", ".md"}
    for path in configs:
        if path.suffix == ".yaml":
            documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
            assert documents and all("kind" in d and "apiVersion" in d for d in documents), path
        elif path.suffix in (".sh", ".sbatch"):
            done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            assert done.returncode == 0, (path, done.stderr)
        elif path.suffix == ".py":
            ast.parse(path.read_text(), filename=str(path))
    readme = (folder / "README.md").read_text()
    for path in configs:
        if path.name != "README.md":
            assert f"({path.name})" in readme, f"docs/cluster/README.md does not link {path.name}"


def test_release_never_hides_the_runs_own_outcome() -> None:
    """After a lost scheduler (the run's own error), ending the run says so and raises nothing."""

    class Lost:
        def cancel(self, futures):
            raise OSError("the client is closed")

        def sync(self, *args, **kwargs):
            raise TimeoutError("no answer")

        _run = None

    bundle = cluster.Bundle("0" * 64, (ASSIGNMENT,), b"")
    lines: list[str] = []
    cluster.release(Lost(), cluster.Prepared(bundle, None, [], 0.0), lines.append)
    assert len(lines) == 1 and "did not confirm the end of this run" in lines[0], lines


def test_a_zygote_that_failed_in_one_run_may_start_in_the_next(monkeypatch) -> None:
    """A Dask worker lives on: its zygote failing (slow imports on a busy host) must not turn
    warm kernels off for every later run on it."""
    monkeypatch.setattr(cluster, "_SCRATCH", {})
    monkeypatch.setattr(cluster, "_STARTED", {"zygote"})  # this run started it; it then failed
    monkeypatch.setattr(warm.Zygote, "_failed", True)
    monkeypatch.setattr(warm.Zygote, "_instance", None)
    assert warm.Zygote.get(start=True) is None  # failed: not started again within the run
    cluster._release_now("some-run")
    assert warm.Zygote._failed is False and "zygote" not in cluster._STARTED
