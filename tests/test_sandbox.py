"""The grading kernel's OS sandbox (``autograder.pipeline.sandbox``): what student code cannot
reach, what it still can do, and that it ends with its grader.

Most tests run a probe (plain Python, below) in a sandbox entered two ways, as grading does:
``fork`` (a process forks, the child enters the sandbox and runs the probe: the warm-kernel
path) and ``exec`` (``python -m autograder.pipeline.sandbox exec --spec F -- python -c PROBE``:
the cold path). The kernel tests run notebooks through ``ResilientExecute`` (sandboxed by
default), forked from the zygote and launched normally.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from autograder.pipeline import sandbox, warm
from autograder.pipeline.execute import ResilientExecute
from autograder.pipeline.sandbox import PACKAGE_ROOT, Limits, SandboxSpec, default_spec

pytestmark = pytest.mark.skipif(
    not sandbox.status().available, reason=f"no sandbox here: {sandbox.status().message}"
)

MiB = 1 << 20

FORK_RUNNER = """\
import os, sys
from autograder.pipeline.sandbox import SandboxSpec, enter
spec = SandboxSpec.from_json(open(sys.argv[1]).read())
code = open(sys.argv[2]).read()
pid = os.fork()
if pid == 0:
    os.setsid()
    enter(spec)
    try:
        exec(compile(code, "probe", "exec"), {"__name__": "__probe__"})
    finally:
        sys.stdout.flush()
        os._exit(0)
print("P", pid, flush=True)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.fixture
def course(tmp_path: Path) -> Path:
    """A course root as grading leaves it: solutions, a gradebook, two students."""
    root = tmp_path / "course"
    for folder, name, text in (
        ("solutions/01_x", "01_x.ipynb", "SOLUTION-SECRET"),
        (".nbgrader", "gradebook.db", "GRADEBOOK"),
        ("submitted/bob/01_x", "01_x.ipynb", "BOB-SUBMITTED"),
        ("autograded/bob/01_x", "notes.txt", "BOB-AUTOGRADED"),
        ("autograded/alice/01_x", "prefix.pt", "ALICE-ARTIFACT"),
        ("release/01_x", "01_x.ipynb", "RELEASE"),
        (".", "nbgrader_config.py", "c = get_config()"),
        (".", "fixturechecks.py", "CHECKS = 1\n"),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text(text)
    return root


def alice(course: Path) -> Path:
    return course / "autograded" / "alice" / "01_x"


def spec_for(course: Path, *writable: Path, **limits: int) -> SandboxSpec:
    return default_spec(alice(course), course, writable, limits=Limits(**limits))


def run_probe(
    tmp_path: Path, spec: SandboxSpec, code: str, how: str, timeout: float = 60
) -> tuple[dict, subprocess.CompletedProcess[str]]:
    """Run ``code`` in the sandbox ``spec`` (entered by ``how``: fork or exec); the last line
    of its stdout is JSON."""
    spec_file = tmp_path / f"spec-{time.monotonic_ns()}.json"
    spec_file.write_text(spec.to_json())
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    if how == "fork":
        code_file = tmp_path / f"probe-{time.monotonic_ns()}.py"
        code_file.write_text(code)
        cmd = [sys.executable, "-c", FORK_RUNNER, str(spec_file), str(code_file)]
    else:
        cmd = [sys.executable, "-m", "autograder.pipeline.sandbox", "exec", "--spec"]
        cmd += [str(spec_file), "--", sys.executable, "-c", code]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit {run.returncode}): {run.stdout}\n{run.stderr}"
    return json.loads(lines[-1]), run


ATTEMPTS = """\
import errno, glob, json, os, signal, socket, sys
from pathlib import Path
COURSE, PACKAGES, TEST_PID, PORT, SHARED = {course!r}, {packages!r}, {pid}, {port}, {shared!r}
out = {{}}

def attempt(name, fn):
    try:
        out[name] = ["ok", repr(fn())[:80]]
    except BaseException as err:
        out[name] = [type(err).__name__, getattr(err, "errno", None)]

def write(path):
    with open(path, "w") as handle:
        handle.write("pwned")

def read(path):
    return Path(path).read_text()

attempt("write_course_package", lambda: write(PACKAGES + "/course/__init__.py"))
attempt("new_file_in_checks", lambda: write(PACKAGES + "/autograder/checks/evil.py"))
attempt("write_gradebook", lambda: write(COURSE + "/.nbgrader/gradebook.db"))
attempt("read_gradebook", lambda: read(COURSE + "/.nbgrader/gradebook.db"))
attempt("read_solutions", lambda: read(COURSE + "/solutions/01_x/01_x.ipynb"))
attempt("read_repo_solutions", lambda: os.listdir(PACKAGES + "/solutions"))
attempt("read_release", lambda: read(COURSE + "/release/01_x/01_x.ipynb"))
attempt("read_other_student", lambda: read(COURSE + "/autograded/bob/01_x/notes.txt"))
attempt("write_other_student", lambda: write(COURSE + "/autograded/bob/01_x/x.txt"))
attempt("read_submitted", lambda: read(COURSE + "/submitted/bob/01_x/01_x.ipynb"))
attempt("read_config", lambda: read(COURSE + "/nbgrader_config.py"))
attempt("write_usr", lambda: write("/usr/evil"))
attempt("write_root", lambda: write("/evil"))
attempt("write_etc", lambda: write("/etc/passwd"))
attempt("read_shadow", lambda: read("/etc/shadow"))
attempt("reference", lambda: os.listdir(PACKAGES + "/autograder/reference"))
attempt("answers", lambda: read(PACKAGES + "/autograder/answers.py"))
attempt("bugzoo", lambda: os.listdir(PACKAGES + "/autograder/bugzoo"))
attempt("reference_pyc", lambda: [p for p in glob.glob(PACKAGES + "/autograder/__pycache__/ans*")
                                  if os.path.getsize(p)])
attempt("course_checks_module", lambda: read(COURSE + "/fixturechecks.py"))
attempt("shared_folder", lambda: os.listdir("/work/shared"))
def tcp():
    with socket.create_connection(("127.0.0.1", PORT), timeout=2):
        return "connected"
attempt("tcp_to_host", tcp)
attempt("dns", lambda: socket.getaddrinfo("example.com", 80))
attempt("signal_test_process", lambda: os.kill(TEST_PID, 0))
attempt("kill_init", lambda: os.kill(1, signal.SIGKILL))
attempt("processes", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
def nested_namespace():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    return "created"
attempt("nested_user_namespace", nested_namespace)
status = Path("/proc/self/status").read_text().splitlines()
out["caps"] = sorted({{l.split()[1] for l in status if l.startswith("Cap")}})
out["no_new_privs"] = [l.split()[1] for l in status if l.startswith("NoNewPrivs")]
out["uid"] = os.getuid()
# what it can do
attempt("cwd_listing", lambda: sorted(os.listdir(".")))
attempt("cwd_artifact", lambda: read("prefix.pt"))
attempt("write_cwd", lambda: (write("out.txt"), read("out.txt"))[1])
attempt("write_tmp", lambda: (write("/tmp/t.txt"), read("/tmp/t.txt"))[1])
HOME_FILE = os.path.expanduser("~/h.txt")
attempt("write_home", lambda: (write(HOME_FILE), read(HOME_FILE))[1])
attempt("write_dev_null", lambda: write("/dev/null"))
attempt("write_shared", lambda: write(SHARED + "/verdict.txt"))
attempt("symlink_in_shared", lambda: os.symlink("/etc/passwd", SHARED + "/link"))
attempt("symlink_in_cwd", lambda: os.symlink("out.txt", "link"))
print(json.dumps(out), flush=True)
"""


@pytest.fixture
def listener():
    """A TCP server on the host's 127.0.0.1 that nothing in a sandbox may reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.setblocking(False)
    yield server
    server.close()


@pytest.mark.parametrize("how", ["fork", "exec"])
def test_student_code_cannot_reach_what_it_must_not(how, course, tmp_path, listener) -> None:
    shared = tmp_path / "channel"
    shared.mkdir()
    code = ATTEMPTS.format(
        course=str(course),
        packages=str(PACKAGE_ROOT),
        pid=os.getpid(),
        port=listener.getsockname()[1],
        shared=str(shared),
    )
    out, _ = run_probe(tmp_path, spec_for(course, shared), code, how)
    erofs, absent = ["OSError", 30], ["FileNotFoundError", 2]
    assert out["write_course_package"] == erofs
    assert out["new_file_in_checks"] == erofs
    for name in ("write_gradebook", "read_gradebook", "read_solutions", "read_repo_solutions"):
        assert out[name] == absent, (name, out[name])
    for name in ("read_release", "read_other_student", "read_submitted", "read_config"):
        assert out[name] == absent, (name, out[name])
    assert out["write_other_student"] == absent
    assert out["write_usr"] == erofs and out["write_root"] == erofs
    assert out["write_etc"] == erofs
    assert out["read_shadow"] == absent
    assert out["reference"] == ["ok", "[]"] and out["answers"] == ["ok", "''"]
    assert out["bugzoo"] == ["ok", "[]"] and out["reference_pyc"] == ["ok", "[]"]
    assert out["course_checks_module"] == ["ok", repr("CHECKS = 1\n")]
    assert out["shared_folder"] == absent
    assert out["tcp_to_host"][0] in ("ConnectionRefusedError", "OSError", "PermissionError")
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing reached the host's listener
    assert out["dns"][0] == "gaierror"
    assert out["signal_test_process"] == ["ProcessLookupError", 3]
    # init ignores signals from inside (with Landlock >= 6 they are refused): the probe lived on
    assert out["kill_init"][0] in ("ok", "PermissionError")
    assert out["processes"] == ["ok", "[1, 2]"], "it sees its init and itself only"
    assert out["nested_user_namespace"][0] == "OSError"
    assert out["caps"] == ["0000000000000000"] and out["no_new_privs"] == ["1"]
    if os.geteuid() == 0:
        assert out["uid"] >= sandbox.UID_BASE, "a root grader's kernel gets its own uid"
    # ... and what it can do
    assert out["cwd_listing"] == ["ok", "['prefix.pt']"]
    assert out["cwd_artifact"] == ["ok", "'ALICE-ARTIFACT'"]
    for name in ("write_cwd", "write_tmp", "write_home"):
        assert out[name] == ["ok", "'pwned'"], (name, out[name])
    assert out["write_dev_null"][0] == "ok"
    assert out["write_shared"][0] == "ok" and (shared / "verdict.txt").read_text() == "pwned"
    if sandbox.landlock_abi():
        assert out["symlink_in_shared"] == ["PermissionError", 13], "no symlinks for the grader"
    assert out["symlink_in_cwd"][0] == "ok"
    # the grader's files are as they were
    assert sorted(p.name for p in alice(course).iterdir()) == ["prefix.pt"]
    assert (course / "autograded/bob/01_x/notes.txt").read_text() == "BOB-AUTOGRADED"
    assert not (PACKAGE_ROOT / "autograder/checks/evil.py").exists()


FORK_BOMB = """\
import json, os, subprocess, time
children, error = [], None
for _ in range(10_000):
    try:
        pid = os.fork()
    except OSError as err:
        error = type(err).__name__
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
print(json.dumps({"forked": len(children), "error": error}), flush=True)
time.sleep(float(os.environ.get("HOLD", "0")))
"""


def test_a_fork_bomb_is_bounded_and_costs_nobody_else(course, tmp_path) -> None:
    spec = spec_for(course, processes=24)
    spec_file = tmp_path / "bomb.json"
    spec_file.write_text(spec.to_json())
    cmd = [sys.executable, "-m", "autograder.pipeline.sandbox", "exec", "--spec", str(spec_file)]
    cmd += ["--", sys.executable, "-c", FORK_BOMB]
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "HOLD": "20"}
    bomb = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        result = json.loads(bomb.stdout.readline())
        assert result["error"] == "BlockingIOError", result
        assert 5 <= result["forked"] < 24, result
        # while the bomb holds its processes: the grader and another sandbox still fork
        assert subprocess.run(["true"]).returncode == 0
        out, _ = run_probe(tmp_path, spec_for(course, processes=24), FORK_BOMB, "fork")
        assert out["forked"] >= 5, "another kernel was starved by the first one's processes"
    finally:
        bomb.kill()
        bomb.wait()


NON_ROOT_DRIVER = """\
import json, os, subprocess, sys
from autograder.pipeline import sandbox
base = sys.argv[1]
with open(base + "/bomb.py") as handle:
    bomb = handle.read()
spec = sandbox.default_spec(base + "/work", base, limits=sandbox.Limits(processes=24))
with open(base + "/spec.json", "w") as handle:
    handle.write(spec.to_json())
def start(hold):
    cmd = [sys.executable, "-m", "autograder.pipeline.sandbox", "exec", "--spec"]
    cmd += [base + "/spec.json", "--", sys.executable, "-c", bomb]
    env = {**os.environ, "HOLD": hold}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
first = start("20")
held = json.loads(first.stdout.readline())
grader_forks = subprocess.run(["true"]).returncode == 0
second = start("0")
other = json.loads(second.stdout.readline())
second.wait()
first.kill()
first.wait()
print(json.dumps({"uid": os.getuid(), "held": held, "other": other, "grader": grader_forks}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="sets up a non-root grader, which needs root")
def test_a_non_root_graders_kernels_count_processes_per_namespace(tmp_path) -> None:
    """A grader that is not root runs every kernel under its own uid: RLIMIT_NPROC is still
    counted per user namespace, so one kernel's fork bomb starves neither the grader nor its
    other kernels."""
    import shutil
    import tempfile

    if not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs unshare and setpriv (util-linux)")
    base = Path(tempfile.mkdtemp(prefix="sandbox-non-root-", dir="/tmp"))
    try:
        (base / "work").mkdir()
        (base / "driver.py").write_text(NON_ROOT_DRIVER)
        (base / "bomb.py").write_text(FORK_BOMB)
        os.chown(base, 12345, 12345)
        os.chown(base / "work", 12345, 12345)
        # the grader's uid must reach this Python: it may live under root's mode-700 home
        python = Path(sys.base_prefix)
        script = (
            f"set -e\nmkdir -p {base}/python\n"
            f"mount --bind {python} {base}/python\n"
            f"mount -t tmpfs -o mode=0755 tmpfs /root\n"
            f"mkdir -p {python}\nmount --bind {base}/python {python}\n"
            if _is_under(python, Path("/root"))
            else "set -e\n"
        )
        script += (
            f"exec setpriv --reuid=12345 --regid=12345 --clear-groups env HOME=/tmp "
            f"PYTHONPATH={PACKAGE_ROOT} {sys.executable} {base}/driver.py {base}"
        )
        run = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=PACKAGE_ROOT,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["uid"] == 12345
        assert out["held"]["error"] == "BlockingIOError" and out["held"]["forked"] < 24
        assert out["grader"], "the grader could not fork while a kernel held its processes"
        assert out["other"]["forked"] >= 5, "the grader's other kernel was starved"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _is_under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


MEMORY = """\
import json
out = {}
try:
    block = bytearray(1 << 30)
    out["big"] = "allocated"
except MemoryError:
    out["big"] = "MemoryError"
small = bytearray(16 << 20)
out["small"] = len(small)
print(json.dumps(out), flush=True)
"""

DISK = """\
import json, os
out = {}
for name, path in (("cwd", "big.bin"), ("tmp", "/tmp/big.bin")):
    try:
        with open(path, "wb") as handle:
            for _ in range(64):
                handle.write(b"x" * (1 << 20))
        out[name] = "written"
    except OSError as err:
        out[name] = os.strerror(err.errno)
    os.remove(path)
try:
    with open("huge.bin", "wb") as handle:
        handle.write(b"x" * (9 << 20))
    out["file_size"] = "written"
except OSError as err:
    out["file_size"] = os.strerror(err.errno)
print(json.dumps(out), flush=True)
"""


def test_memory_and_disk_are_limited(course, tmp_path) -> None:
    out, run = run_probe(tmp_path, spec_for(course, memory=256 * MiB), MEMORY, "exec")
    assert out == {"big": "MemoryError", "small": 16 * MiB}, run.stderr
    out, run = run_probe(tmp_path, spec_for(course, disk=16 * MiB, file_size=8 * MiB), DISK, "fork")
    assert out["cwd"] == "File too large" and out["file_size"] == "File too large"
    spec = spec_for(course, disk=16 * MiB, file_size=128 * MiB)
    out, run = run_probe(tmp_path, spec, DISK, "exec")
    assert out["cwd"] == "No space left on device", out
    assert out["tmp"] == "No space left on device", out


ESCAPE = """\
import ctypes, json, os, time
libc = ctypes.CDLL(None)
os.setsid()  # out of the group jupyter_client signals
libc.prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG = 0: would survive its parent
if os.fork() == 0:
    os.setsid()
    time.sleep(120)
    os._exit(0)
print(json.dumps({"escaped": True}), flush=True)
time.sleep(120)
"""


def _descendants(pid: int) -> list[int]:
    found = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in map(int, children):
        found += [child, *_descendants(child)]
    return found


def test_the_whole_sandbox_dies_with_its_holder(course, tmp_path) -> None:
    """Killing ``P`` (what jupyter_client and the zygote know) ends every process inside, even
    those that left the process group and cleared their parent-death signal."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec_for(course).to_json())
    code_file = tmp_path / "escape.py"
    code_file.write_text(ESCAPE)
    runner = subprocess.Popen(
        [sys.executable, "-c", FORK_RUNNER, str(spec_file), str(code_file)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
    )
    try:
        holder = int(runner.stdout.readline().split()[1])
        assert json.loads(runner.stdout.readline()) == {"escaped": True}
        inside = _descendants(holder)
        assert len(inside) >= 3, inside  # init, the probe, its grandchild
        os.kill(holder, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(warm._alive(p) for p in inside):
            time.sleep(0.1)
        assert not any(warm._alive(p) for p in inside), "a process outlived its sandbox"
    finally:
        runner.kill()
        runner.wait()


def test_hidden_modules_and_their_byte_code_are_empty(tmp_path) -> None:
    """A hidden module reads empty, and its byte-code is gone, even byte-code written while
    the kernel runs (a bind mount shows later writes)."""
    package = tmp_path / "pkg"
    (package / "__pycache__").mkdir(parents=True)
    (package / "secret.py").write_text("ANSWER = 42\n")
    (package / "__pycache__" / "secret.cpython-311.pyc").write_bytes(b"compiled answer")
    (package / "public.py").write_text("OPEN = 1\n")
    work = tmp_path / "work"
    work.mkdir()
    spec = SandboxSpec(
        cwd=str(work),
        source=str(work),
        readonly=(*sandbox._python_paths(), *sandbox._system_paths(), str(package)),
        hidden=tuple(sandbox._hidden_paths([package / "secret.py"])),
    )
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.to_json())
    code = (
        "import glob, json, sys\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        f"names = sorted(glob.glob({str(package)!r} + '/**', recursive=True))\n"
        "print(json.dumps({n: open(n, 'rb').read().decode() for n in names if '.' in n}))"
    )
    probe = subprocess.Popen(
        [sys.executable, "-m", "autograder.pipeline.sandbox", "exec", "--spec", str(spec_file)]
        + ["--", sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert probe.stdout.readline().strip() == "ready"
        (package / "__pycache__" / "secret.cpython-311.opt-1.pyc").write_bytes(b"later")
        (package / "late.py").write_text("LATE = 1\n")
        out, _ = probe.communicate("go\n", timeout=30)
    finally:
        probe.kill()
    assert json.loads(out) == {
        f"{package}/late.py": "LATE = 1\n",  # the course packages stay live views
        f"{package}/public.py": "OPEN = 1\n",
        f"{package}/secret.py": "",
    }


def test_a_kernel_cannot_see_or_signal_another_kernel(course, tmp_path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec_for(course).to_json())
    sleeper = subprocess.Popen(
        [sys.executable, "-m", "autograder.pipeline.sandbox", "exec", "--spec", str(spec_file)]
        + ["--", sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sleeper.stdout.readline().strip() == "up"
        others = [sleeper.pid, *_descendants(sleeper.pid)]  # its holder, init and kernel
        code = (
            "import json, os, signal\n"
            "def kill(pid):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n        return 'killed'\n"
            "    except OSError as err:\n        return type(err).__name__\n"
            f"print(json.dumps({{'killed': [kill(pid) for pid in {others}]}}))"
        )
        out, _ = run_probe(tmp_path, spec_for(course), code, "fork")
        assert out["killed"] == ["ProcessLookupError"] * len(others)
        assert sleeper.poll() is None and all(map(warm._alive, others)), "the other kernel died"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_status_and_refusal(monkeypatch, tmp_path) -> None:
    found = sandbox.status()
    assert found.available and "namespaces" in found.mechanism, found
    broken = sandbox.SandboxStatus(
        False,
        "none",
        "cannot create namespaces: [Errno 1] unshare: Operation not permitted",
        sandbox._fix_for("unshare: Operation not permitted"),
    )
    assert "--unsafe" in broken.fix and "Fix:" in broken.message
    monkeypatch.setattr(sandbox, "_STATUS", broken)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    execute = ResilientExecute(timeout=30)
    with pytest.raises(sandbox.SandboxUnavailable, match="Operation not permitted.*Fix:"):
        execute.preprocess(nb, {"metadata": {"path": str(tmp_path)}})


def test_launcher_refuses_a_spec_it_cannot_honour(tmp_path) -> None:
    spec = SandboxSpec(cwd=str(tmp_path / "missing"), source=str(tmp_path / "missing"))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.to_json())
    run = subprocess.run(
        [sys.executable, "-m", "autograder.pipeline.sandbox", "exec", "--spec", str(spec_file)]
        + ["--", "/bin/echo", "ran"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "ran" not in run.stdout
    assert "does not exist" in run.stderr


# ------------------------------------------------------------------------------ real kernels

KERNEL_CELLS = [
    "import json, os, socket, sys\nwarm = 'torch' in sys.modules\n"
    "print(json.dumps([os.getpid(), os.getppid(), warm]))",
    "import torch, transformers, course, autograder.checks\n"
    "print(float((torch.ones(3, 3) @ torch.arange(3.0)).sum()))",
    "open('saved.txt', 'w').write('mine')\nopen('/tmp/t.txt', 'w').write('tmp')\n"
    "print(open('saved.txt').read(), open('/tmp/t.txt').read(), open('prefix.pt').read())",
    "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
    "plt.plot([1, 2, 3])\nplt.savefig('fig.png')\nprint(os.path.getsize('fig.png') > 1000)",
    "def attempt(fn):\n    try:\n        fn()\n        return 'ok'\n"
    "    except OSError as err:\n        return type(err).__name__\n"
    "print(json.dumps([\n"
    "    attempt(lambda: open({package!r} + '/course/__init__.py', 'a')),\n"
    "    attempt(lambda: open({course!r} + '/solutions/01_x/01_x.ipynb')),\n"
    "    attempt(lambda: open({course!r} + '/.nbgrader/gradebook.db', 'a')),\n"
    "    attempt(lambda: socket.create_connection(('127.0.0.1', {port}), timeout=2)),\n"
    "    attempt(lambda: os.kill({pid}, 0)),\n"
    "]))",
]


def run_kernel(course: Path, listener: socket.socket, warm_kernels: bool) -> list[str]:
    attempts = KERNEL_CELLS[-1].format(
        package=str(PACKAGE_ROOT),
        course=str(course),
        port=listener.getsockname()[1],
        pid=os.getpid(),
    )
    cells = [*KERNEL_CELLS[:-1], attempts]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    execute = ResilientExecute(timeout=120, warm_kernels=warm_kernels)
    execute.preprocess(nb, {"metadata": {"path": str(alice(course))}})
    texts = []
    for cell in nb.cells:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, (cell.source, errors)
        texts.append("".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream"))
    return texts


@pytest.mark.parametrize("warm_kernels", [True, False], ids=["forked", "launched"])
def test_a_sandboxed_kernel_grades_a_notebook(warm_kernels, course, listener) -> None:
    texts = run_kernel(course, listener, warm_kernels)
    pid, ppid, preloaded = json.loads(texts[0])
    assert (pid, ppid) == (2, 1), "the kernel runs in its own PID namespace"
    if warm_kernels and not warm.Zygote.get().mismatch(dict(os.environ)):
        assert preloaded, "the kernel was not forked from the zygote"
    if not warm_kernels:
        assert not preloaded
    assert texts[1].strip() == "9.0"
    assert texts[2].split() == ["mine", "tmp", "ALICE-ARTIFACT"]
    assert texts[3].strip() == "True"
    blocked = json.loads(texts[4])
    assert blocked[0] in ("OSError", "PermissionError")  # read-only, and not its files
    assert blocked[1] == blocked[2] == "FileNotFoundError"  # solutions and gradebook unseen
    assert blocked[3] in ("ConnectionRefusedError", "PermissionError", "OSError")
    assert blocked[4] == "ProcessLookupError"
    with pytest.raises(BlockingIOError):
        listener.accept()
    assert sorted(p.name for p in alice(course).iterdir()) == ["prefix.pt"], "copy discarded"


def test_forked_and_launched_sandboxed_kernels_agree(course) -> None:
    """A sandboxed kernel forked from the zygote is the kernel a sandboxed launch gives."""
    from test_warm import INTROSPECT

    def introspect(manager: type) -> dict:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(INTROSPECT)])
        client = NotebookClient(
            nb,
            timeout=120,
            kernel_manager_class=manager,
            resources={"metadata": {"path": str(alice(course))}},
        )
        client.create_kernel_manager()
        client.km.sandbox_spec = lambda cwd: default_spec(cwd, course)
        client.execute()
        (out,) = [o for o in nb.cells[0].outputs if o.output_type == "stream"]
        return json.loads(out.text)

    launched = introspect(warm.SandboxKernelManager)
    forked = introspect(warm.WarmKernelManager)
    for key in ("pid", "ppid", "cwd", "path", "argv", "env", "mpl", "parent_handle", "poller"):
        assert forked[key] == launched[key], (key, forked[key], launched[key])
    for key in ("threads", "own_group", "signals", "main"):
        assert forked[key] == launched[key], (key, forked[key], launched[key])
    assert launched["pid"] == 2 and launched["parent_handle"] == 1


def test_a_sandboxed_forked_kernel_dies_with_its_client(course, tmp_path) -> None:
    from jupyter_client.connect import write_connection_file

    zygote = warm.Zygote.get()
    assert zygote is not None and zygote.wait_ready()
    folder = tmp_path / "kernel"
    folder.mkdir()
    connection, _ = write_connection_file(
        str(folder / "kernel.json"), transport="ipc", ip=str(folder / "ipc")
    )
    spec = default_spec(alice(course), course, [folder])
    env = dict(os.environ, JPY_PARENT_PID="1")
    kernel = zygote.spawn(["-f", connection], env, str(alice(course)), spec)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_descendants(kernel.pid)) < 2:
        time.sleep(0.2)
    inside = _descendants(kernel.pid)
    assert kernel.poll() is None and len(inside) >= 2, "the kernel did not start"
    kernel._conn.close()  # its grader is gone
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(map(warm._alive, [kernel.pid, *inside])):
        time.sleep(0.2)
    assert not any(map(warm._alive, [kernel.pid, *inside])), "a kernel outlived its grader"
    assert warm._alive(zygote.process.pid)


def test_the_zygote_never_loads_what_sandboxes_hide(course) -> None:
    zygote = warm.Zygote.get()
    assert zygote is not None and zygote.wait_ready()
    probe = textwrap.dedent(
        """
        import sys
        hidden = [m for m in sys.modules
                  if m == "autograder.answers"
                  or m.startswith(("autograder.reference", "autograder.bugzoo"))]
        print(hidden, "torch" in sys.modules)
        """
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(probe)])
    NotebookClient(
        nb,
        timeout=120,
        kernel_manager_class=warm.WarmKernelManager,  # forked, not sandboxed: the raw zygote
        resources={"metadata": {"path": str(alice(course))}},
    ).execute()
    text = nb.cells[0].outputs[0]["text"]
    assert text.startswith("[]"), text
    spec = default_spec(alice(course), course, hidden=["autograder/selfcheck.py"])
    # the zygote's own environment: an earlier in-process grade() may have changed os.environ
    assert "hides" in zygote.mismatch(dict(zygote.env), spec)
