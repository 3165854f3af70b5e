"""Warm grading kernels (``autograder.pipeline.warm``): a kernel forked from the zygote must be
the kernel a normal launch gives, and crashes, hangs and restarts must work through it.
Sandboxed kernels (the default of ``ResilientExecute``) are tested in ``test_sandbox.py``; here
the plain kernel managers run unsandboxed.

The fault students of ``tests/test_pipeline.py`` are graded through warm kernels too (it is the
default); here the kernel is inspected directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from autograder.pipeline import sandbox, warm
from autograder.pipeline.execute import KERNEL_DIED, KERNEL_UNRESPONSIVE, ResilientExecute

pytestmark = pytest.mark.skipif(not warm.supported(), reason="warm kernels are Linux-only")

INTROSPECT = """\
import json, os, signal, sys, threading
from ipykernel.kernelapp import IPKernelApp
app = IPKernelApp.instance()
print(json.dumps({
    "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "path": sys.path,
    "argv": [a for a in sys.argv if not a.endswith(".json")],
    "own_group": os.getpgid(0) == os.getpid(),
    "env": sorted(os.environ), "marker": os.environ.get("WARM_TEST_MARKER"),
    "mpl": os.environ.get("MPLBACKEND"), "parent_handle": app.parent_handle,
    "poller": type(getattr(app, "poller", None)).__name__,
    "threads": sorted(t.name.split(" ")[0].rstrip("0123456789-") for t in threading.enumerate()),
    "signals": [repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGPIPE, signal.SIGTERM)],
    "main": sys.modules["__main__"].__name__,
}))
"""


def _introspect(kernel_manager_class: type, cwd: Path) -> dict:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(INTROSPECT)])
    client = NotebookClient(
        nb,
        timeout=120,
        kernel_manager_class=kernel_manager_class,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    (out,) = [o for o in nb.cells[0].outputs if o.output_type == "stream"]
    return json.loads(out.text)


@pytest.fixture(scope="module", autouse=True)
def grading_environment() -> Iterator[None]:
    """This process's environment as a grading kernel gets it (``sandbox.kernel_environment``
    adds ``GRADING_ENV`` to every grading kernel, and the zygote starts with it): the kernels
    these tests launch directly, normal or forked, then see what grading kernels see."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in sandbox.GRADING_ENV.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def zygote(grading_environment) -> warm.Zygote:
    found = warm.Zygote.get()
    assert found is not None and found.wait_ready(), "the zygote did not start"
    if found.mismatch(dict(os.environ)):
        # This process's zygote predates an earlier test's in-process grade(), which put its
        # scratch course on PYTHONPATH: grading would fall back to normal kernels (correctly),
        # but these tests are about a zygote that matches, so start one for this environment.
        found.stop()
        found = warm.Zygote.get()
        assert found is not None and found.wait_ready(), "the zygote did not restart"
    assert found.mismatch(dict(os.environ)) == ""
    return found


def test_forked_kernel_is_the_kernel_a_normal_launch_gives(zygote, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WARM_TEST_MARKER", "set after the zygote started")
    normal = _introspect(AsyncKernelManager, tmp_path)
    forked = _introspect(warm.WarmKernelManager, tmp_path)
    assert normal["ppid"] == os.getpid(), "the normal kernel is a child of this process"
    assert forked["ppid"] == zygote.process.pid, "the warm kernel was not forked by the zygote"
    for key in ("cwd", "path", "argv", "env", "mpl", "parent_handle", "poller", "threads"):
        assert forked[key] == normal[key], (key, forked[key], normal[key])
    for key in ("own_group", "signals", "main", "marker"):
        assert forked[key] == normal[key], (key, forked[key], normal[key])
    assert forked["marker"] == "set after the zygote started"
    assert forked["parent_handle"] == os.getpid(), "the kernel must watch its grader"


def test_environment_read_at_import_time_falls_back_to_a_normal_kernel(
    zygote, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "7" if os.environ.get("OMP_NUM_THREADS") != "7" else "5")
    kernel = _introspect(warm.WarmKernelManager, tmp_path)
    assert kernel["ppid"] == os.getpid(), "a kernel with other import-time settings was forked"


def test_crash_hang_and_interrupt_through_forked_kernels(zygote, tmp_path) -> None:
    """Through sandboxed forked kernels, as grading runs them: each sees itself as PID 2 of
    its own namespace; a kernel forked from the zygote already has torch imported."""
    here = "print(os.getpid(), os.getppid(), 'torch' in sys.modules)"
    cells = [
        f"import os, sys\nx = 41\n{here}",
        "os._exit(3)",  # the kernel dies: restarted, the first cell replayed
        f"x += 1\nprint(x)\n{here}",
        "import time\ntime.sleep(60)",  # interrupted at the timeout: an ordinary error
        "while True:\n    try:\n        time.sleep(60)\n"
        "    except KeyboardInterrupt:\n        pass",
        "print('after', x)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    execute = ResilientExecute(
        timeout=3, interrupt_on_timeout=True, raise_on_iopub_timeout=False, probe_timeout=2
    )
    assert execute.kernel_manager_class is warm.WarmKernelManager and execute.sandbox
    execute.preprocess(nb, {"metadata": {"path": str(tmp_path)}})
    outputs = [c.outputs for c in nb.cells]
    forked = "True" if not zygote.mismatch(dict(os.environ)) else "False"  # others edit files
    assert outputs[0][0]["text"].split() == ["2", "1", forked], outputs[0]
    assert [o.get("ename") for o in outputs[1]] == [KERNEL_DIED]
    assert outputs[2][0]["text"].split() == ["42", "2", "1", forked], outputs[2]
    assert any(o.get("output_type") == "error" for o in outputs[3]), outputs[3]
    assert KERNEL_UNRESPONSIVE in [o.get("ename") for o in outputs[4]], outputs[4]
    assert outputs[5][0]["text"].strip() == "after 42", "the kernel was restored after the hang"


def test_zygote_kills_its_kernels_when_it_stops(tmp_path) -> None:
    """A zygote whose owner goes away takes its kernels with it (nothing is left running)."""
    owner = tmp_path / "owner.py"
    owner.write_text(
        "import sys, time\n"
        "from autograder.pipeline import warm\n"
        "z = warm.Zygote.get(); assert z.wait_ready()\n"
        "k = z.spawn(['-c', 'x'], {}, '.')\n"  # a bad kernel command line is fine for this
        "print(z.process.pid, k.pid, z.folder, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(owner)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        zygote, kernel, folder = proc.stdout.readline().split()
        zygote_pid, kernel_pid = int(zygote), int(kernel)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (warm._alive(zygote_pid) or warm._alive(kernel_pid)):
        time.sleep(0.2)
    assert not warm._alive(zygote_pid), "the zygote outlived the process that started it"
    assert not warm._alive(kernel_pid), "a kernel outlived its zygote"
    assert not Path(folder).exists(), "the zygote left its folder behind"


def test_kernel_output_goes_to_the_graders_log(zygote, tmp_path) -> None:
    """A normal kernel writes to its grader's stdout/stderr (the job log): so must a forked one."""
    from autograder.pipeline.coursedir import output_to

    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import os\nos.write(2, b'FD2-MARKER\\n')")]
    )
    log = tmp_path / "job.log"
    client = NotebookClient(
        nb,
        timeout=60,
        kernel_manager_class=warm.WarmKernelManager,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    with output_to(log):
        client.execute()
    assert "FD2-MARKER" in log.read_text()


def test_a_kernel_dies_with_its_client_and_the_zygote_lives_on(zygote, tmp_path) -> None:
    from jupyter_client.connect import write_connection_file

    connection, _ = write_connection_file(str(tmp_path / "kernel.json"))
    kernel = zygote.spawn(["-f", connection], dict(os.environ), str(tmp_path))
    time.sleep(1)
    assert kernel.poll() is None, "the kernel did not start"
    kernel._conn.close()  # its grader is gone
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and warm._alive(kernel.pid):
        time.sleep(0.2)
    assert not warm._alive(kernel.pid), "a kernel outlived its grader"
    assert warm._alive(zygote.process.pid), "the zygote went down with one client"


def test_fallback_when_grader_files_change_or_the_interpreter_differs(zygote) -> None:
    assert zygote.mismatch(dict(os.environ)) == ""
    saved = zygote.files
    try:
        zygote.files = {**saved, "/nowhere/checks.py": (0, 0)}
        assert "files changed" in zygote.mismatch(dict(os.environ))
    finally:
        zygote.files = saved
    launcher = [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "k.json"]
    assert warm._launcher_args(launcher) == ["-f", "k.json"]
    other = ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "k.json"]
    assert warm._launcher_args(other) is None
    assert warm._launcher_args([sys.executable, "-m", "other_kernel"]) is None


def test_a_variable_the_zygotes_imports_set_too_is_no_mismatch(zygote, monkeypatch) -> None:
    # A grader that imported torch after starting its zygote has TORCHINDUCTOR_CACHE_DIR, which
    # the zygote's own imports set to the same value: its kernels are the same, so it forks.
    real = zygote.set_by_imports()
    monkeypatch.setattr(zygote, "set_by_imports", lambda: {**real, "TORCH_SET_ON_IMPORT": "/a"})
    assert zygote.mismatch(dict(os.environ, TORCH_SET_ON_IMPORT="/a")) == ""
    assert "TORCH_SET_ON_IMPORT" in zygote.mismatch(dict(os.environ, TORCH_SET_ON_IMPORT="/b"))
    monkeypatch.setattr(zygote, "env", dict(zygote.env, TORCH_SET_ON_IMPORT="/a"))
    assert "TORCH_SET_ON_IMPORT" in zygote.mismatch(dict(os.environ))  # the zygote started with it


def test_the_zygote_publishes_what_its_imports_set(zygote, monkeypatch) -> None:
    """A zygote started without TORCHINDUCTOR_CACHE_DIR (a Dask worker before it imported
    torch) publishes the value its imports set, and forks for a grader that has that value."""
    assert (Path(zygote.folder) / warm.IMPORTS_SET).is_file()  # written before it listened
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    zygote.stop()
    fresh = warm.Zygote.get()
    try:
        assert fresh is not None and fresh.wait_ready(), "the zygote did not restart"
        assert "TORCHINDUCTOR_CACHE_DIR" not in fresh.env
        published = fresh.set_by_imports()
        if "TORCHINDUCTOR_CACHE_DIR" not in published:
            pytest.skip("this torch sets no TORCHINDUCTOR_CACHE_DIR when it is imported")
        value = published["TORCHINDUCTOR_CACHE_DIR"]
        assert fresh.mismatch(dict(os.environ, TORCHINDUCTOR_CACHE_DIR=value)) == ""
        other = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=value + "-elsewhere")
        assert "TORCHINDUCTOR_CACHE_DIR" in fresh.mismatch(other)
    finally:
        fresh.stop()  # the next test's fixture starts one for its own environment
