"""``grade --cluster``: the same grading on a Dask cluster (``dask.distributed``).

Each (student, assignment) is one Dask task. The coordinator (the machine running ``grade``)
records the assignments in its gradebook, sends every worker a bundle of the course
(``nbgrader_config.py``, the graded assignments' source notebooks and that gradebook without its
students) and has each get ready (:func:`prepare_worker`: scratch course, zygote, grading process)
while it stages every submission as ``grade`` always does; then it sends each task its staged
files. Workers need the course *package* installed, not the course folder, and no shared
filesystem. A worker grades in its private scratch course with a private gradebook, through one
long-lived grading process of its own that forks its kernels from its own warm-kernel zygote and
sandboxes them (:mod:`autograder.pipeline.warm`, :mod:`autograder.pipeline.sandbox`), exactly as
a ``--workers`` process does, and returns its autograded folder, the grades its nbgrader autograde
recorded in the private gradebook, and the feedback HTML. At the end of the run every worker
stops its grading process and zygote and deletes its scratch course (:func:`release`).

Only the coordinator writes the gradebook, ``autograded/`` and ``feedback/``: it records those
grades as nbgrader's ``SaveAutoGrades`` does (a cell with a manual grade is marked for review) and
assigns late penalties with nbgrader's own ``AssignLatePenalties``, after checking that the
worker's cells are this course's.

A worker that dies mid-notebook loses nothing: its task is re-run elsewhere by Dask, and since
workers write nothing of the course's, the student is recorded once, when a result arrives. The
coordinator journals every recorded task (:mod:`autograder.pipeline.grade`), so a coordinator
killed mid-run resumes with ``grade --resume``.

``--cluster local:N`` starts a ``LocalCluster`` of N worker processes on this machine;
``--cluster ADDRESS`` connects to a running scheduler (``dask scheduler``; workers started by
``dask worker``, ``dask-ssh``, ``dask-jobqueue`` or ``dask-kubernetes``, see
``docs/cluster/README.md``). Workers must run with ``distributed.worker.daemon: false`` (their
grading process is a child process): ``local:N`` sets it; elsewhere set
``DASK_DISTRIBUTED__WORKER__DAEMON=False`` or start them with ``dask worker --no-nanny``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from autograder.pipeline.coursedir import Course, CourseError

__all__ = [
    "FAULT_ENV",
    "Bundle",
    "Prepared",
    "Task",
    "TaskResult",
    "connect",
    "course_bundle",
    "fingerprint",
    "parse_cluster",
    "preflight",
    "prepare",
    "prepare_worker",
    "release",
    "run_tasks",
]

STATS: dict[str, object] = {}
"""Timings of the last :func:`run_tasks` in this process (for ``benchmarks/grading.py``):
``setup`` seconds (connect, preflight, bundle, submission), ``task`` worker seconds per task,
``record`` coordinator seconds per recorded task, ``workers``."""

_CONNECTED_AT = 0.0  # when connect() began: the set-up time STATS reports starts there

QUIET = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}
"""Dask settings of ``--cluster local:N`` (and recommended for every grading worker,
``docs/cluster/README.md``): a grading task waits on its grading process, so Dask's statistical
profiler (every 10 ms), event-loop tick (20 ms) and monitors (100-500 ms) only take CPU from the
kernels: about 0.06 s per second per worker on this 2-core machine, 0.008 s with these."""

INSTALL_HINT = 'pip install "soft-prompts-course[cluster]" (or: pip install "dask[distributed]")'
FAULT_ENV = "AUTOGRADER_FAULT"
"""Fault injection for the recovery tests (never set it when grading for real):
``worker-exit:<student>/<assignment>:<marker file>`` makes the worker grading that task exit
mid-notebook, once (the marker file records that it did); ``coordinator-exit-after:<k>`` makes
the coordinator exit right after it has recorded ``k`` tasks."""


# ---------------------------------------------------------------------------------------------
# the --cluster argument
# ---------------------------------------------------------------------------------------------
def parse_cluster(spec: str) -> tuple[str, int | str]:
    """``("local", N)`` for ``local:N``, ``("address", ADDRESS)`` for a scheduler address."""
    spec = spec.strip()
    if spec.startswith("local"):
        _, _, count = spec.partition(":")
        if not count.isdigit() or int(count) < 1:
            raise CourseError(
                f"--cluster {spec!r}: write local:N with N >= 1 worker processes, e.g. local:2"
            )
        return ("local", int(count))
    if not spec or any(ch.isspace() for ch in spec):
        raise CourseError(
            f"--cluster {spec!r}: give a Dask scheduler address (tcp://HOST:8786) or local:N"
        )
    return ("address", spec if "://" in spec else f"tcp://{spec}")


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise CourseError(
            "--cluster needs Dask's distributed scheduler, which is not installed: "
            f"{INSTALL_HINT}. (--workers N grades on this machine without it.)"
        ) from None
    return distributed


# ---------------------------------------------------------------------------------------------
# what a worker must have: the same course package
# ---------------------------------------------------------------------------------------------
def fingerprint() -> dict[str, object]:
    """What a machine grades with: the course package's version and a digest of its Python
    sources, whether the packages it grades with are installed, whether it can sandbox kernels,
    and whether it may start a grading process.

    Sent to the workers by value (``client.run``), so it must import nothing of the course at
    module level: a worker without the course package answers with why. It imports none of it
    at all (``find_spec`` only): importing the course would import torch, seconds per worker."""
    import hashlib as _hashlib
    import importlib.metadata
    import importlib.util
    import multiprocessing
    import platform
    from pathlib import Path as _Path

    info: dict[str, object] = {
        "python": platform.python_version(),
        "daemon": bool(multiprocessing.current_process().daemon),
    }
    try:
        info["version"] = importlib.metadata.version("soft-prompts-course")
    except importlib.metadata.PackageNotFoundError:
        info["version"] = None
    roots = []
    for name in ("autograder", "course"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as err:
            info["missing"] = f"{name}: {type(err).__name__}: {err}"
            return info
        if spec is None or spec.origin is None or not spec.submodule_search_locations:
            info["missing"] = f"no package {name!r} can be imported"
            return info
        roots.append(_Path(next(iter(spec.submodule_search_locations))))
    needed = ("torch", "transformers", "nbgrader", "ipykernel", "jupyter_client")
    info["lacking"] = [name for name in needed if importlib.util.find_spec(name) is None]
    digest = _hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    info["sources"] = digest.hexdigest()[:16]
    try:
        from autograder.pipeline import sandbox

        status = sandbox.status()
        info["sandbox"] = bool(status.available)
        info["sandbox_message"] = status.message
    except Exception as err:  # noqa: BLE001 - reported, never fatal here
        info["sandbox"] = False
        info["sandbox_message"] = f"{type(err).__name__}: {err}"
    return info


def _by_value(fn: Callable) -> Callable:
    """``fn`` re-created outside any importable module, so Dask pickles its code, not a
    reference a worker without the course could not resolve."""
    import inspect
    import textwrap

    namespace: dict[str, object] = {"__name__": "__course_probe__"}
    exec(textwrap.dedent(inspect.getsource(fn)), namespace)  # noqa: S102
    return namespace[fn.__name__]


def preflight(client, unsafe: bool) -> dict[str, dict[str, object]]:
    """Check every worker before any grading starts; raise :class:`CourseError` naming the fix.
    Returns the workers' fingerprints by address."""
    here = fingerprint()
    answers = client.run(_by_value(fingerprint), on_error="return")
    if not answers:
        raise CourseError("the Dask cluster has no workers: start some (docs/cluster/README.md)")
    problems = []
    for address, info in sorted(answers.items()):
        if isinstance(info, BaseException):
            problems.append(f"{address}: could not be probed ({type(info).__name__}: {info})")
            continue
        if "missing" in info:
            problems.append(
                f"{address}: the course package is not installed there ({info['missing']}); "
                f"install the same version as here ({here.get('version')}) on every worker"
            )
            continue
        if (info.get("version"), info.get("sources")) != (here.get("version"), here.get("sources")):
            problems.append(
                f"{address}: grades with soft-prompts-course {info.get('version')} (sources "
                f"{info.get('sources')}), this machine with {here.get('version')} (sources "
                f"{here.get('sources')}); install the same version on every worker"
            )
        if info.get("lacking"):
            problems.append(
                f"{address}: lacks {', '.join(info['lacking'])}, which grading needs; install "
                "the course package with its dependencies there"
            )
        if info.get("daemon"):
            problems.append(
                f"{address}: runs as a daemonic process and cannot start its grading process; "
                "start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False or `dask worker "
                "--no-nanny`"
            )
        if not unsafe and not info.get("sandbox"):
            problems.append(
                f"{address}: cannot sandbox kernels ({info.get('sandbox_message')}); fix that "
                "worker, or grade with --unsafe"
            )
    if problems:
        raise CourseError(
            "the cluster is not ready to grade; nothing was graded:\n  " + "\n  ".join(problems)
        )
    return answers


@contextlib.contextmanager
def connect(spec: str, progress: Callable[[str], None] = lambda line: None) -> Iterator[object]:
    """A Dask ``Client`` for ``--cluster spec``; a ``LocalCluster`` for ``local:N`` (closed
    afterwards). Raises :class:`CourseError` when the scheduler cannot be reached."""
    global _CONNECTED_AT
    _CONNECTED_AT = time.perf_counter()
    kind, value = parse_cluster(spec)
    distributed = _import_distributed()
    import dask

    if kind == "local":
        # Kept for this process, not a with-block: the nanny restarts a dead worker later, and
        # that worker must be allowed to start its grading process too.
        dask.config.set({"distributed.worker.daemon": False, **QUIET})
        cluster = distributed.LocalCluster(
            n_workers=int(value),
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=40,  # logging.ERROR: a worker's restart is reported by the grader
        )
        try:
            with distributed.Client(cluster) as client:
                progress(
                    f"Dask: a local cluster of {value} worker(s); dashboard {_dashboard(client)}"
                )
                yield client
        finally:
            cluster.close()
        return
    try:
        client = distributed.Client(str(value), timeout="10s")
    except (OSError, TimeoutError) as err:
        raise CourseError(
            f"cannot reach the Dask scheduler at {value} ({type(err).__name__}: {err}); start it "
            "with `dask scheduler` (and workers with `dask worker ADDRESS`), check the address "
            "and port, or grade on this machine with --cluster local:N or --workers N"
        ) from None
    try:
        progress(f"Dask: scheduler {value}; dashboard {_dashboard(client)}")
        yield client
    finally:
        client.close()


def _dashboard(client) -> str:
    try:
        return client.dashboard_link or "(none)"
    except Exception:  # noqa: BLE001 - the dashboard is optional (bokeh)
        return "(none)"


# ---------------------------------------------------------------------------------------------
# what travels: the course bundle, the tasks, the results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bundle:
    """The course files a worker needs, as a tar archive, and their digest."""

    digest: str
    assignments: tuple[str, ...]
    data: bytes = field(repr=False)
    run: str = field(default_factory=lambda: os.urandom(8).hex())

    @property
    def key(self) -> str:
        """The run's name on a worker: its scratch course belongs to this run only (two
        coordinators grading the same course on one cluster each have their own)."""
        return f"{self.digest[:16]}-{self.run}"


GRADEBOOK_TEMPLATE = ".nbgrader/gradebook.db"
"""In a :class:`Bundle`: the coordinator's gradebook with its assignments recorded (cells,
points, checksums, as ``sync_gradebook`` left them) and no student, so that a worker grades
against exactly the coordinator's record instead of recording the assignments again."""

_STUDENT_TABLES = ("grade", "comment", "submitted_notebook", "submitted_assignment", "student")


def _gradebook_template(course: Course) -> bytes:
    """:data:`GRADEBOOK_TEMPLATE`'s bytes: a copy of the gradebook without its students."""
    import sqlite3

    with tempfile.TemporaryDirectory(prefix="autograder-gradebook-") as folder:
        copy = Path(folder) / "gradebook.db"
        source = sqlite3.connect(course.state / "gradebook.db")
        target = sqlite3.connect(copy)
        try:
            source.backup(target)
            with target:
                for table in _STUDENT_TABLES:  # children first: no dangling foreign key
                    target.execute(f"DELETE FROM {table}")  # noqa: S608 - our own names
            target.execute("VACUUM")
        finally:
            source.close()
            target.close()
        return copy.read_bytes()


def course_bundle(course: Course, assignments: Sequence[str]) -> Bundle:
    """``nbgrader_config.py`` (with any Python module beside it), ``solutions/<assignment>/`` of
    each graded assignment, and the gradebook template (:data:`GRADEBOOK_TEMPLATE`; the
    assignments must be recorded in the gradebook already). The digest is the course files'."""
    buffer = io.BytesIO()
    digest = hashlib.sha256()
    paths = sorted(course.root.glob("*.py"))  # nbgrader_config.py and the course's own modules
    for assignment in sorted(assignments):
        folder = course.solutions / assignment
        paths += sorted(
            p for p in folder.rglob("*") if p.is_file() and ".ipynb_checkpoints" not in p.parts
        )
    files = [(str(path.relative_to(course.root)), path.read_bytes()) for path in paths]
    for name, data in files:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    files.append((GRADEBOOK_TEMPLATE, _gradebook_template(course)))
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return Bundle(digest.hexdigest()[:16], tuple(sorted(assignments)), buffer.getvalue())


@dataclass(frozen=True)
class Task:
    """One (student, assignment) to grade, with its staged files."""

    student: str
    assignment: str
    files: dict[str, bytes] = field(repr=False)
    feedback: bool = True
    unsafe: bool = False
    duedate: str | None = None  # the assignment's, from the coordinator's gradebook (ISO)


@dataclass
class TaskResult:
    """What a worker sends back."""

    student: str
    assignment: str
    success: bool
    message: str
    log: str
    seconds: float
    worker: str = ""
    feedback_error: str = ""
    autograded: dict[str, bytes] = field(default_factory=dict, repr=False)
    feedback: dict[str, bytes] = field(default_factory=dict, repr=False)
    grades: dict[str, object] = field(default_factory=dict)
    kernels: dict[str, int] = field(default_factory=dict)  # forked / launched (and why)


def staged_files(course: Course, student: str, assignment: str) -> dict[str, bytes]:
    """The files of ``submitted/<student>/<assignment>/``, by relative path."""
    folder = course.submitted / student / assignment
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# ---------------------------------------------------------------------------------------------
# the worker side
# ---------------------------------------------------------------------------------------------
_LOCK = threading.Lock()
_SCRATCH: dict[str, Path] = {}  # run key -> its scratch course
_RELEASED: set[str] = set()  # run keys released here: a late task or preparation is refused
_POOL: dict[str, ProcessPoolExecutor] = {}
_STARTED: set[str] = set()  # "zygote" when this module started this process's zygote
_HOME: list[Path] = []


def _worker_home() -> Path:
    """This worker process's private folder (0700, kept while it lives) for its scratch
    courses: a released course's path stays on ``sys.path`` of processes started meanwhile, and
    nobody else can make a folder there."""
    if not _HOME:
        # resolved: Course.at() resolves, and the same path must leave sys.path on release
        _HOME.append(Path(tempfile.mkdtemp(prefix="autograder-worker-")).resolve())
        atexit.register(shutil.rmtree, _HOME[0], True)
    return _HOME[0]


def _forget_path(root: Path) -> None:
    """Take a released scratch course off this process's ``sys.path`` and ``PYTHONPATH``."""
    entry = str(root)
    sys.path[:] = [p for p in sys.path if p != entry]
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != entry]
    os.environ["PYTHONPATH"] = os.pathsep.join(kept)


def _scratch_course(bundle: Bundle) -> Path:
    """This worker's private course for ``bundle``'s run (made once): its files and its
    gradebook, the coordinator's template (:data:`GRADEBOOK_TEMPLATE`), in a fresh folder."""
    from autograder.pipeline.coursedir import prepare_environment

    with _LOCK:
        if bundle.key in _RELEASED:
            raise CourseError("this grading run has ended (released); nothing more is graded")
        if bundle.key in _SCRATCH:
            return _SCRATCH[bundle.key]
        root = Path(tempfile.mkdtemp(prefix=f"{bundle.digest[:8]}-", dir=_worker_home()))
        try:
            with tarfile.open(fileobj=io.BytesIO(bundle.data), mode="r:gz") as tar:
                tar.extractall(root, filter="data")
            course = Course.at(root)
            if not (course.state / "gradebook.db").is_file():
                raise CourseError("the course bundle has no gradebook template")
            prepare_environment(course)
            if course.config().ResilientExecute.get("warm_kernels", True):
                from autograder.pipeline import warm

                if warm.Zygote.get(start=False) is None:
                    _STARTED.add("zygote")  # ours to stop when the run is released
                warm.start_early()
        except BaseException:
            _forget_path(root)
            shutil.rmtree(root, ignore_errors=True)
            raise
        _SCRATCH[bundle.key] = root
        return root


def prepare_worker(bundle: Bundle, unsafe: bool) -> dict[str, str]:
    """Make this worker ready to grade ``bundle``'s course: its scratch course, its grading
    process with nbgrader loaded, and its zygote with the course's imports done. Run once per
    worker while the coordinator stages the submissions; a task does the same if it comes
    first (a worker that joined later). Returns the worker's name and, if its zygote could not
    start, why (its kernels then launch normally, seconds slower each)."""
    from autograder.pipeline import warm

    root = _scratch_course(bundle)
    try:
        _grading_process(root, unsafe).submit(os.getpid).result()  # started, initializer run
    except BrokenProcessPool:  # it died getting ready: once more, from scratch
        _grading_process(root, unsafe, fresh=True).submit(os.getpid).result()
    report = {"worker": _worker_name(), "zygote": ""}
    if Course.at(root).config().ResilientExecute.get("warm_kernels", True) and warm.supported():
        zygote = warm.Zygote.get(start=False)
        if zygote is None or not zygote.wait_ready():
            report["zygote"] = zygote.why_not() if zygote else "it did not start"
    return report


def _release_now(key: str) -> None:
    """Stop what :func:`prepare_worker` started for the run ``key`` and delete its scratch
    course; the zygote too, if this module started it, once no course is left (a later run may
    start one again, even if this one failed). Any task or preparation of that run that comes
    later is refused."""
    from autograder.pipeline import warm

    with _LOCK:
        _RELEASED.add(key)
        root = _SCRATCH.pop(key, None)
        pools = [_POOL.pop(k) for k in list(_POOL) if root and k.startswith(f"{root}:")]
        if root is not None:
            _forget_path(root)
    try:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)  # a notebook being graded finishes
    finally:
        with _LOCK:  # no course of another run is starting the zygote meanwhile
            if not _SCRATCH and "zygote" in _STARTED:
                _STARTED.discard("zygote")
                zygote = warm.Zygote.get(start=False)
                with contextlib.suppress(Exception):
                    if zygote is not None:
                        zygote.stop()
                warm.Zygote.allow_retry()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        with _LOCK:  # no course left: the private folder goes too (a local worker is killed
            if not _SCRATCH and _HOME:  # by its cluster, so its atexit never runs)
                shutil.rmtree(_HOME.pop(), ignore_errors=True)


async def _release_worker(key: str) -> None:
    """:func:`_release_now` off the worker's event loop (``client.run`` at the end of a run):
    waiting for a notebook being graded must not stop the worker's heartbeats."""
    import asyncio

    await asyncio.to_thread(_release_now, key)


def _init_grading_process(root: str, unsafe: bool) -> None:
    """The grading process's start: exit with the worker that forked it (a worker killed or
    closed by Dask must not leave it waiting for work forever), then as in ``--workers``."""
    from autograder.pipeline.grade import _init_worker

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-worker", daemon=True).start()
    _init_worker(root, unsafe)


def _grading_process(root: Path, unsafe: bool, fresh: bool = False) -> ProcessPoolExecutor:
    """This worker's long-lived grading process (with its own warm zygote), made once."""
    import multiprocessing

    from autograder.pipeline import warm

    if multiprocessing.current_process().daemon:
        raise RuntimeError(
            "this Dask worker runs as a daemonic process and cannot start its grading process: "
            "start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False or `dask worker "
            "--no-nanny`"
        )
    key = f"{root}:{unsafe}"
    with _LOCK:
        if root not in _SCRATCH.values():
            raise CourseError("this grading run has ended (released); nothing more is graded")
        pool = _POOL.get(key)
        if pool is not None and not fresh:
            return pool
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if Course.at(root).config().ResilientExecute.get("warm_kernels", True):
            warm.start_early()  # forked into the grading process below, as in --workers
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=context,
            initializer=_init_grading_process,
            initargs=(str(root), unsafe),
        )
        _POOL[key] = pool
        return pool


def _worker_name() -> str:
    try:
        from distributed import get_worker

        worker = get_worker()
        return str(worker.name if worker.name is not None else worker.address)
    except Exception:  # noqa: BLE001 - outside a worker (tests call grade_task directly)
        return f"pid {os.getpid()}"


def _fault_worker(task: Task) -> bool:
    """The recovery tests' injected worker death (see :data:`FAULT_ENV`): True once."""
    fault = os.environ.get(FAULT_ENV, "")
    if not fault.startswith("worker-exit:"):
        return False
    target, _, marker = fault.removeprefix("worker-exit:").partition(":")
    if target != f"{task.student}/{task.assignment}" or not marker:
        return False
    try:
        with open(marker, "x") as f:  # noqa: PTH123 - created once, by one worker
            f.write(_worker_name())
    except FileExistsError:
        return False
    return True


def _set_duedate(course: Course, assignment: str, duedate: str | None) -> None:
    """The coordinator's due date for ``assignment`` in this worker's gradebook (late
    penalties and feedback then agree with a local run)."""
    from datetime import datetime

    with course.gradebook() as gb:
        gb.update_or_create_assignment(
            assignment, duedate=datetime.fromisoformat(duedate) if duedate else None
        )


def _recorded_grades(course: Course, task: Task, notebooks: Sequence[Path]) -> dict:
    """What this worker's nbgrader autograde recorded for the task's graded notebooks: the
    submission's timestamp, each grade cell's auto score, each solution cell's auto comment."""
    with course.gradebook() as gb:
        submission = gb.find_submission(task.assignment, task.student)
        names = {p.stem for p in notebooks}
        return {
            "timestamp": submission.timestamp.isoformat() if submission.timestamp else None,
            "notebooks": {
                nb.name: {
                    "grades": {g.name: g.auto_score for g in nb.grades},
                    "comments": {c.name: c.auto_comment for c in nb.comments},
                }
                for nb in submission.notebooks
                if nb.name in names
            },
        }


def _run_counted(job) -> tuple[object, dict[str, int]]:
    """``_run_job`` in the grading process, with how its kernels were started
    (:data:`autograder.pipeline.warm.LAUNCHES`)."""
    from autograder.pipeline import warm
    from autograder.pipeline.grade import _run_job

    before = Counter(warm.LAUNCHES)
    outcome = _run_job(job)
    return outcome, dict(warm.LAUNCHES - before)


def grade_task(bundle: Bundle, task: Task) -> TaskResult:
    """Grade one task on this worker (the Dask task function)."""
    from autograder.pipeline.grade import Job

    start = time.perf_counter()
    worker = _worker_name()
    try:
        root = _scratch_course(bundle)
        course = Course(root)
        folder = course.submitted / task.student / task.assignment
        stale = [folder, course.autograded / task.student / task.assignment]
        stale += [course.feedback / task.student / task.assignment]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        for name, data in task.files.items():
            path = (folder / name).resolve()
            if folder.resolve() not in path.parents:
                raise ValueError(f"a staged file outside its folder: {name!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        _set_duedate(course, task.assignment, task.duedate)
        job = Job(str(root), task.student, task.assignment, task.feedback)
        try:
            future = _grading_process(root, task.unsafe).submit(_run_counted, job)
        except BrokenProcessPool:  # it died while idle: nothing of this task was graded yet
            future = _grading_process(root, task.unsafe, fresh=True).submit(_run_counted, job)
        if _fault_worker(task):
            time.sleep(1.0)  # the notebook is being graded: die in the middle of it
            os._exit(17)
        try:
            outcome, kernels = future.result()
        except BrokenProcessPool:
            _grading_process(root, task.unsafe, fresh=True)
            raise RuntimeError("this worker's grading process died; it was restarted") from None
        graded_dir = course.autograded / task.student / task.assignment
        autograded = {
            str(p.relative_to(graded_dir)): p.read_bytes()
            for p in sorted(graded_dir.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }
        grades = _recorded_grades(course, task, sorted(graded_dir.glob("*.ipynb")))
        feedback_dir = course.feedback / task.student / task.assignment
        feedback = {
            str(p.relative_to(feedback_dir)): p.read_bytes()
            for p in sorted(feedback_dir.rglob("*"))
            if p.is_file()
        }
        log = Path(outcome.log).read_text(errors="replace")[-200_000:] if outcome.log else ""
        return TaskResult(
            task.student, task.assignment, outcome.success, outcome.message, log,
            outcome.seconds, worker, outcome.feedback_error, autograded, feedback, grades,
            kernels,
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - reported for this task, the others go on
        return TaskResult(
            task.student, task.assignment, False, f"{type(err).__name__}: {err}", "",
            time.perf_counter() - start, worker,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the coordinator side
# ---------------------------------------------------------------------------------------------
class _Recorder:
    """Writes a worker's result into this course: its autograded folder, its grades (as
    nbgrader's ``SaveAutoGrades`` records them), late penalties (nbgrader's
    ``AssignLatePenalties``) and its feedback."""

    def __init__(self, course: Course, unsafe: bool) -> None:
        self.course = course
        self.config = course.config()

    def record(self, result: TaskResult) -> tuple[bool, str, str]:
        """(success, message, log path) of recording ``result``."""
        from datetime import datetime

        import nbformat
        from nbgrader.preprocessors import AssignLatePenalties

        course, student, assignment = self.course, result.student, result.assignment
        log_path = course.state / "logs" / f"{student}--{assignment}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"graded on worker {result.worker}\n{result.log}\n")
        recorded = result.grades.get("notebooks", {})
        with course.gradebook() as gb:
            stamp = result.grades.get("timestamp")
            if stamp:
                when = datetime.fromisoformat(stamp)
                submission = gb.update_or_create_submission(assignment, student, timestamp=when)
            else:
                submission = gb.update_or_create_submission(assignment, student)
            for notebook in submission.notebooks:
                mine = recorded.get(notebook.name)
                if mine is None:
                    continue  # not handed in: left as grade() recorded it (0, to review)
                cells = {g.name for g in notebook.grades} | {c.name for c in notebook.comments}
                if cells != set(mine["grades"]) | set(mine["comments"]):
                    return (
                        False,
                        (
                            f"the worker's {notebook.name} has other graded cells than this "
                            "course's (a different release on the worker?): nothing recorded"
                        ),
                        str(log_path),
                    )
                for grade in notebook.grades:
                    grade.auto_score = mine["grades"][grade.name]
                    # as SaveAutoGrades: a manual grade, or no auto score, asks for review
                    grade.needs_manual_grade = (
                        grade.manual_score is not None or grade.auto_score is None
                    )
                for comment in notebook.comments:
                    comment.auto_comment = mine["comments"][comment.name]
            gb.db.commit()
        late = AssignLatePenalties(config=self.config)
        for name in recorded:
            info = {"notebook": name, "assignment": assignment, "student": student}
            late.preprocess(
                nbformat.v4.new_notebook(), {"nbgrader": {**info, "db_url": course.db_url}}
            )
        for folder, files in (
            (course.autograded / student / assignment, result.autograded),
            (course.feedback / student / assignment, result.feedback),
        ):
            shutil.rmtree(folder, ignore_errors=True)
            for name, data in files.items():
                path = (folder / name).resolve()
                if folder.resolve() in path.parents:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
        return True, "", str(log_path)


@dataclass
class Prepared:
    """A run's course bundle, scattered to the workers, and their preparation under way."""

    bundle: Bundle
    shared: object  # the bundle's Dask future, held by every worker
    warming: list  # prepare_worker futures, one per worker
    started: float
    addresses: list = field(default_factory=list)  # the worker each of ``warming`` runs on
    tasks: list = field(default_factory=list)  # the grade_task futures, once submitted


PREPARE_WAIT = 300.0
"""Seconds :func:`run_tasks` waits for the workers to get ready before it reports the ones that
are not (they grade anyway, once ready)."""
PREPARE_GRACE = 10.0
"""Once one worker is ready, seconds the others may still take before the tasks are sent."""
RELEASE_WAIT = 120.0
"""Seconds :func:`release` waits for the workers to stop a run (a notebook being graded
finishes first)."""


def _workers(client) -> list[str]:
    """Every worker's address (``scheduler_info`` lists only the first few on some versions)."""
    return list(client.nthreads())


def prepare(client, course: Course, assignments: Sequence[str], unsafe: bool) -> Prepared:
    """Send every worker the course bundle and start :func:`prepare_worker` on each, so their
    zygotes, scratch courses and grading processes get ready while the coordinator stages the
    submissions. ``assignments`` must be recorded in the gradebook already."""
    started = time.perf_counter()
    bundle = course_bundle(course, assignments)
    shared = client.scatter(bundle, broadcast=True)
    addresses = _workers(client)
    warming = [
        client.submit(
            prepare_worker,
            shared,
            unsafe,
            workers=[address],
            allow_other_workers=False,
            pure=False,
            key=f"prepare-{bundle.digest}-{os.urandom(4).hex()}",
        )  # fmt: skip
        for address in addresses
    ]
    return Prepared(bundle, shared, warming, started, addresses=addresses)


def release(
    client, prepared: Prepared, progress: Callable[[str], None] = lambda line: None
) -> None:
    """End the run on every worker: its tasks not yet started are cancelled, and each worker
    stops its grading process (and the zygote it started) and deletes its scratch course, so
    nothing of a run stays on a long-lived cluster. A task or preparation of the run that
    reaches a worker later is refused there. Never raises: it runs after the run's own outcome,
    which it must not hide."""
    with contextlib.suppress(Exception):  # a closed client has nothing left to cancel
        if client.status == "running":
            client.cancel([*prepared.tasks, *prepared.warming])
    try:
        client.sync(
            client._run,
            _release_worker,
            prepared.bundle.key,
            on_error="ignore",
            callback_timeout=RELEASE_WAIT,
        )
    except Exception as err:  # noqa: BLE001 - lost scheduler, timeout: say so, go on
        progress(
            f"Dask: the workers did not confirm the end of this run ({type(err).__name__}: "
            f"{err}); a worker still grading stops on its own when its notebook is done"
        )


def _check_ready(client, prepared: Prepared, progress: Callable[[str], None]) -> list[str] | None:
    """Wait for :func:`prepare`'s work (once one worker is ready, at most :data:`PREPARE_GRACE`
    seconds more for the others: their tasks wait for them anyway) and report each worker that
    is not ready, could not get ready, or whose zygote failed. Refuse to go on if no worker
    could get ready; return the workers the tasks may go to (None: any)."""
    pinned = list(zip(prepared.warming, prepared.addresses, strict=True))
    start, first_ready, told = time.monotonic(), None, False
    while time.monotonic() - start < PREPARE_WAIT:
        alive = set(_workers(client))  # a worker that left never runs its pinned preparation
        waiting = [address for future, address in pinned if not future.done() and address in alive]
        if not waiting:
            break
        if first_ready is None and any(future.status == "finished" for future, _ in pinned):
            first_ready = time.monotonic()
        if first_ready is not None and time.monotonic() - first_ready > PREPARE_GRACE:
            break
        if not told and time.monotonic() - start > 3:
            progress(f"Dask: waiting for {len(waiting)} worker(s) to get ready")
            told = True
        time.sleep(0.2)
    ready, failed, problems = [], [], []
    for future, address in pinned:
        if future.status == "finished":
            try:
                report = future.result(timeout=10)
            except Exception:  # noqa: BLE001 - its worker left with its answer
                continue
            ready.append(address)
            if report.get("zygote"):
                progress(
                    f"worker {report['worker']}: its warm-kernel zygote failed "
                    f"({report['zygote']}); its kernels launch normally, seconds slower each"
                )
        elif future.status == "error":
            err = future.exception(timeout=10)
            failed.append(address)
            problems.append(f"{type(err).__name__}: {err}")
            progress(
                f"worker {address}: could not get ready to grade ({problems[-1]}); no task "
                "goes to it"
            )
        else:
            progress(f"worker {address}: not ready yet (or it left); it grades once ready")
    if failed and len(failed) == len(pinned):
        raise CourseError(
            "no Dask worker could get ready to grade ("
            + "; ".join(sorted(set(problems)))
            + "); fix the workers' installation and run grade again"
        )
    return [address for _, address in pinned if address not in failed] if failed else None


def _kernels_line(kernels: Counter[str]) -> str:
    """How a worker's kernels started, for its report line."""
    line = f"kernels: {kernels['forked']} forked from its zygote"
    if kernels["launched"]:
        reasons = [
            k.removeprefix("launched because ") for k in kernels if k.startswith("launched ")
        ]
        line += f", {kernels['launched']} launched normally ({'; '.join(sorted(reasons))})"
    return line


def run_tasks(
    client,
    prepared: Prepared,
    course: Course,
    jobs: Sequence[tuple[str, str]],
    feedback: bool,
    unsafe: bool,
    progress: Callable[[str], None] = lambda line: None,
) -> Iterator[tuple[str, str, object]]:
    """Grade ``jobs`` ((student, assignment), already staged in ``submitted/``) on the cluster
    of ``client`` (checked by :func:`preflight`, readied by :func:`prepare`); yields
    ``(student, assignment, JobResult or exception)`` as each is recorded here."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    from autograder.pipeline.grade import JobResult

    STATS.clear()
    STATS.update(task=[], record=[], workers=len(_workers(client)))
    if not jobs:
        return
    only = _check_ready(client, prepared, progress)
    progress(f"Dask: {len(jobs)} notebook task(s)")
    with course.gradebook() as gb:
        duedates = {a: gb.find_assignment(a).duedate for a in {a for _, a in jobs}}
    futures = {}
    for student, assignment in jobs:
        files = staged_files(course, student, assignment)
        due = duedates[assignment]
        task = Task(student, assignment, files, feedback, unsafe, due.isoformat() if due else None)
        key = f"grade-{student}-{assignment}-{os.urandom(4).hex()}"
        future = client.submit(
            grade_task, prepared.shared, task, pure=False, retries=1, key=key,
            workers=only, allow_other_workers=only is not None,  # any, if those all leave
        )  # fmt: skip
        futures[future] = (student, assignment)
        prepared.tasks.append(future)
    recorder = _Recorder(course, unsafe)
    STATS["setup"] = time.perf_counter() - min(prepared.started, _CONNECTED_AT or prepared.started)
    done: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    kernels: dict[str, Counter[str]] = {}
    bar = tqdm(total=len(futures), desc="grading", unit="notebook", file=sys.stderr, disable=None)
    try:
        for future in as_completed(futures):
            student, assignment = futures[future]
            try:
                result = future.result()
            except Exception as err:  # noqa: BLE001 - lost despite Dask's retries
                yield student, assignment, err
                bar.update(1)
                continue
            done[result.worker] += 1
            seconds[result.worker] += result.seconds
            kernels.setdefault(result.worker, Counter()).update(result.kernels)
            STATS["task"].append(result.seconds)
            if result.success:
                clock = time.perf_counter()
                ok, message, log = recorder.record(result)
                STATS["record"].append(time.perf_counter() - clock)
            else:
                ok, message, log = False, result.message, ""
            yield (
                student,
                assignment,
                JobResult(ok, message, log, result.seconds, result.feedback_error),
            )
            bar.update(1)
            bar.set_postfix_str(", ".join(f"{w}: {n}" for w, n in sorted(done.items())))
    finally:
        bar.close()
    for worker, count in sorted(done.items()):
        progress(
            f"worker {worker}: {count} notebook(s), {seconds[worker] / count:.2f} s each; "
            + _kernels_line(kernels.get(worker, Counter()))
        )
    if STATS["record"]:
        recorded = sorted(STATS["record"])
        progress(
            f"coordinator: {len(recorded)} task(s) recorded, "
            f"{recorded[len(recorded) // 2]:.2f} s each (median); set-up {STATS['setup']:.1f} s"
        )
