"""Warm grading kernels: each kernel is forked from a process that has already imported the course.

A grading kernel started the usual way spends most of a short graded notebook importing torch,
transformers, the course library and the checks (about 8 s of a 20 s notebook on a 2-core CPU),
and it does so again for every notebook of every student. Here one *zygote* process per grading
command (shared by its workers) imports all of that once; each kernel is then ``fork()``-ed
from it and becomes an ordinary IPython kernel with those modules already loaded. The
student's code still runs in its own process with its own namespace, exactly one kernel per
notebook, as before.

The pieces:

- :func:`serve` is the zygote (``python -c "from autograder.pipeline.warm import serve; ..."``):
  it imports :data:`PRELOAD`, refuses to fork if any import started a Python thread or a CUDA
  context, and answers requests on a Unix socket: "start a kernel with this argv, environment
  and working directory, writing to these stdout/stderr" (the grader's job log, passed as file
  descriptors). It replies with the kernel's pid, then, when that kernel exits, with its exit
  status. It kills a kernel whose client (grader) went away, and all of them if its parent does.
- :class:`WarmProvisioner` is a jupyter_client provisioner that asks the zygote for a kernel
  and hands jupyter_client a Popen-like handle (:class:`ForkedKernel`), so interrupt, kill,
  restart and "is it alive" work as they do for a local kernel. It falls back to a normal
  launch whenever forking would not give the same kernel: not Linux, a kernel command other
  than this Python's ``ipykernel_launcher``, an environment variable read at import time that
  differs from the zygote's, a file of ``course/`` or ``autograder/`` changed since the zygote
  imported it, or a zygote that failed to start (the reason is logged).
- :class:`WarmKernelManager` uses that provisioner; ``ResilientExecute`` picks it when
  ``c.ResilientExecute.warm_kernels`` is true (the default on Linux).

Sandboxed kernels (:mod:`autograder.pipeline.sandbox`): a kernel manager whose ``sandbox_spec``
is set (a function of the kernel's working folder that returns a ``SandboxSpec``;
``ResilientExecute`` sets it) starts every kernel in its own sandbox. A forked kernel enters it
right after the fork, before any student code exists in it; a normal launch goes through
``python -m autograder.pipeline.sandbox exec``. Either way the kernel talks to the grader over
ZMQ ``ipc`` sockets in a per-kernel folder bound into the sandbox (it has no network), and a
sandbox that cannot be made fails the kernel start with :func:`sandbox.status`'s message.
:class:`SandboxKernelManager` does this without a zygote (``warm_kernels = False``).

The zygote never imports what sandboxes hide (:data:`sandbox.DEFAULT_HIDDEN`: the reference
solutions, the answer keys, the bug zoo): a forked kernel would otherwise inherit them in
memory. A kernel whose sandbox hides more than the zygote kept out is launched the normal way.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import LocalProvisioner

from autograder.pipeline import sandbox

#: Imported once by the zygote; every forked kernel starts with them loaded. Imports only: the
#: zygote must run no torch computation (an initialised OpenMP pool does not survive ``fork``).
PRELOAD = (
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama",
    "peft",
    "course",
    "course.budget",
    "course.data",
    "course.plots",
    "course.widgets",
    "autograder.checks",
    "autograder.checks.artifacts",
    "autograder.checks.debugging",
    "autograder.checks.deep",
    "autograder.checks.experiments",
    "autograder.checks.frozen",
    "autograder.checks.prefix",
    "autograder.checks.prompt",
    "autograder.checks.quiz",
    "autograder.checks.serving",
    "autograder.checks.tour",
    "autograder.selfcheck",
    "matplotlib.pyplot",
    "ipywidgets",
    "ipykernel.kernelapp",
)

#: Environment variables that modules read when imported (or the interpreter at start-up). A
#: kernel asked for with a different value than the zygote's is launched the normal way.
IMPORT_TIME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LANG", "TZ", "TMPDIR", "HOME")
IMPORT_TIME_PREFIXES = (
    "PYTHON",
    "HF_",
    "TRANSFORMERS_",
    "TORCH",
    "PYTORCH_",
    "CUDA_",
    "MPL",
    "MATPLOTLIB",
    "TQDM_",
    "LC_",
    "XDG_",
    "JUPYTER_",
)

_INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def supported() -> bool:
    """Forked kernels are used on Linux only (``fork`` after importing torch is unsafe on macOS)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def _module_names(hidden: list[str]) -> list[str]:
    """Module names of the hidden files and folders of the course packages."""
    names = []
    for path in map(Path, hidden):
        try:
            rel = path.relative_to(sandbox.PACKAGE_ROOT)
        except ValueError:
            continue
        if path.suffix == ".py":
            names.append(".".join(rel.with_suffix("").parts))
        elif not path.suffix and "__pycache__" not in rel.parts:
            names.append(".".join(rel.parts))
    return names


class _Blocked:
    """A ``sys.meta_path`` finder of the zygote: hidden modules cannot be imported there."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if any(fullname == n or fullname.startswith(n + ".") for n in self.names):
            raise ImportError(f"{fullname} is kept out of the zygote (sandboxes hide it)")
        return None


def _unblock() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Blocked)]


IMPORTS_SET = "set-by-imports.json"
"""In the zygote's folder: the import-time variables (:func:`_import_env`) that its imports set
themselves, e.g. torch's ``TORCHINDUCTOR_CACHE_DIR``; written before it listens."""


def _import_env(env: dict[str, str]) -> dict[str, str]:
    """The part of ``env`` that modules read at import time (see :data:`IMPORT_TIME_ENV`)."""
    return {
        k: v for k, v in env.items() if k in IMPORT_TIME_ENV or k.startswith(IMPORT_TIME_PREFIXES)
    }


# --------------------------------------------------------------------------------- the zygote


def serve(address: str, parent: int, blocked: list[str] = ()) -> None:  # type: ignore[assignment]
    """Run the zygote: preload, then fork a kernel per request until ``parent`` goes away.

    ``blocked``: module names the zygote must not import (what sandboxes hide)."""
    before = dict(os.environ)
    if blocked:
        sys.meta_path.insert(0, _Blocked(list(blocked)))
    os.environ.setdefault("MPLBACKEND", _INLINE_BACKEND)  # what ipykernel would set
    # A CUDA context does not survive fork: should an import ask whether CUDA is available,
    # answer through NVML, which creates none (the kernels themselves are unaffected).
    nvml_check = os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001  (a kernel that needs it imports it itself)
            print(f"preloading {name} failed: {err!r}", file=sys.stderr, flush=True)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        sys.exit("warm kernels disabled: preloading initialised CUDA")
    if "PYTORCH_NVML_BASED_CUDA_CHECK" not in before and nvml_check == "1":
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
    with contextlib.suppress(Exception):  # parse the grader's files once, for every kernel
        importlib.import_module("autograder.checks.guard").tampering()
    # Variables the imports themselves set (TORCHINDUCTOR_CACHE_DIR, ...) are kept in kernels.
    set_by_imports = {k: v for k, v in os.environ.items() if k not in before}
    set_by_imports.pop("MPLBACKEND", None)
    # ... and published before listening: a grader that has them too (it imported torch since
    # it started us) asks for the same kernel (Zygote.mismatch).
    published = Path(address).with_name(IMPORTS_SET)
    published.with_suffix(".tmp").write_text(json.dumps(_import_env(set_by_imports)))
    published.with_suffix(".tmp").replace(published)
    # Python threads would be lost in the fork, with any lock they hold. (numpy's OpenBLAS pool,
    # a native thread, re-creates itself in the child: OpenBLAS registers fork handlers.)
    if threading.active_count() != 1:
        sys.exit(f"warm kernels disabled: preloading started threads {threading.enumerate()}")
    signal.signal(signal.SIGTERM, _stop_serving)  # Zygote.stop(): clean up, kill the kernels
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    children: dict[int, socket.socket] = {}
    watch = selectors.DefaultSelector()
    watch.register(listener, selectors.EVENT_READ)
    try:
        while os.getppid() == parent:
            ready = watch.select(0.2)
            _reap(children, watch)
            for key, _ in ready:
                if key.fileobj is listener:
                    try:
                        conn, _ = listener.accept()
                    except OSError as err:  # out of descriptors: this request fails, not all
                        print(f"accept failed: {err!r}", file=sys.stderr, flush=True)
                        continue
                    _start_kernel(listener, conn, children, watch, set_by_imports)
                else:  # a kernel's client went away (its grader died): so does the kernel
                    pid = key.data
                    with contextlib.suppress(OSError):
                        if key.fileobj.recv(256) == b"":
                            watch.unregister(key.fileobj)
                            _kill_group(pid)
    finally:
        for pid in children:
            _kill_group(pid)
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(address)
        if os.getppid() != parent:  # the owner died without Zygote.stop(): remove our folder
            shutil.rmtree(os.path.dirname(address), ignore_errors=True)


def _stop_serving(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _kill_group(pid: int) -> None:
    """SIGKILL a kernel and the processes it started (it leads its own process group)."""
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _reap(children: dict[int, socket.socket], watch: selectors.BaseSelector) -> None:
    """Collect exited kernels and tell each one's client its exit status."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(KeyError, ValueError):
                watch.unregister(conn)
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {code}\n".encode())
            conn.close()


def _recv_line(conn: socket.socket, limit: float, data: bytes = b"") -> bytes:
    deadline = time.monotonic() + limit
    while b"\n" not in data:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before a full line arrived")
        data += chunk
    return data


def _start_kernel(
    listener: socket.socket,
    conn: socket.socket,
    children: dict[int, socket.socket],
    watch: selectors.BaseSelector,
    set_by_imports: dict[str, str],
) -> None:
    """Read one request (a JSON line, with the client's stdout and stderr) and fork its kernel."""
    fds: list[int] = []
    try:
        conn.settimeout(10)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
        request = json.loads(_recv_line(conn, 10, data))
    except (OSError, ValueError, ConnectionError):
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    spec = request.get("sandbox")
    handshake = sandbox.Handshake() if spec is not None and os.geteuid() == 0 else None
    try:
        pid = os.fork()
    except OSError as err:
        with contextlib.suppress(OSError):
            conn.sendall(f"error {err!r}\n".encode())
        pid = -1
    if pid == 0:  # the kernel; never returns
        try:
            listener.close()
            conn.close()
            for other in children.values():
                other.close()
            _become_kernel(
                request["argv"],
                {**set_by_imports, **request["env"]},
                request["cwd"],
                fds,
                spec,
                handshake,
            )
        finally:
            os._exit(1)
    if handshake is not None:  # map the kernel's user namespace (it waits for that)
        if pid > 0:
            handshake.serve(pid, sandbox.SandboxSpec.from_dict(spec))
        else:
            handshake.close()
    for fd in fds:
        os.close(fd)
    if pid < 0:
        conn.close()
        return
    children[pid] = conn  # reaped even if the client is already gone
    try:
        conn.settimeout(None)
        conn.sendall(f"{pid}\n".encode())
        watch.register(conn, selectors.EVENT_READ, pid)
    except OSError:
        _kill_group(pid)


def _become_kernel(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    fds: list[int],
    spec: dict[str, Any] | None = None,
    handshake: sandbox.Handshake | None = None,
) -> None:
    """In the forked child: become ``python -m ipykernel_launcher *argv`` and never return;
    with a sandbox ``spec``, inside that sandbox (this process stays outside as its holder)."""
    code = 1
    try:
        os.setsid()  # its own process group, as jupyter_client gives a local kernel
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Python's default; the rest are untouched
        for target, fd in zip((1, 2), fds):  # the grader's stdout and stderr (its job log)
            os.dup2(fd, target)
            os.close(fd)
        _unblock()  # the kernel imports what it may see as any kernel does
        if spec is not None:
            # returns in the sandbox only; this process stays outside as its holder
            sandbox.enter(sandbox.SandboxSpec.from_dict(spec), handshake)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        if "numpy" in sys.modules:  # a new process would draw a fresh global seed
            sys.modules["numpy"].random.seed()
        launcher = importlib.util.find_spec("ipykernel_launcher")
        sys.argv = [str(launcher.origin if launcher else "ipykernel_launcher"), *argv]
        if sys.path and sys.path[0] in ("", cwd):
            del sys.path[0]  # as ipykernel_launcher does; IPython puts the cwd back
        from ipykernel.kernelapp import IPKernelApp

        # ipykernel reads JPY_PARENT_PID when it is imported (the zygote had none): without it
        # the kernel would not watch for its grader going away.
        app = IPKernelApp.instance()
        app.parent_handle = int(env.get("JPY_PARENT_PID") or 0)
        app.initialize(argv)
        if "ipywidgets" in sys.modules:  # imported before IPython existed: register now
            sys.modules["ipywidgets"]._handle_ipython()
        app.start()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001  (report anything, then exit: never return to the loop)
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # as a normal interpreter exit would
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# --------------------------------------------------------------------------------- the client


class Zygote:
    """The zygote of this process: started on first use, stopped when this process exits."""

    _lock = threading.Lock()
    _instance: Zygote | None = None
    _failed = False

    def __init__(self, hidden: tuple[str, ...] = sandbox.DEFAULT_HIDDEN) -> None:
        # Grading workers forked from this process share its zygote; only this process stops it.
        self.owner = os.getpid()
        self.blocked = sandbox._hidden_paths(hidden)  # never imported by the zygote
        self.folder = tempfile.mkdtemp(prefix="warm-kernels-")
        self.address = str(Path(self.folder) / "zygote.sock")
        self.log = Path(self.folder) / "zygote.log"
        # started with what a grading kernel gets (no credentials): its kernels inherit its imports
        environment = sandbox.kernel_environment(dict(os.environ))
        self.env = _import_env(dict(environment, MPLBACKEND=environment.get("MPLBACKEND", "")))
        self.files = _grader_files()  # a kernel started after an edit must see the new code
        blocked = _module_names(self.blocked)
        code = (
            "from autograder.pipeline.warm import serve; "
            f"serve({self.address!r}, {os.getpid()}, {blocked!r})"
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.folder,  # not the grader's folder: nothing there may shadow an import
                env=environment,
                start_new_session=True,
            )
        self._ready = False
        atexit.register(self.stop)

    @classmethod
    def get(cls, start: bool = True) -> Zygote | None:
        """This process's zygote (started now if ``start``), or None where it cannot run."""
        with cls._lock:
            if cls._instance is None and start and not cls._failed and supported():
                try:
                    cls._instance = cls()
                except OSError:
                    cls._failed = True
            return cls._instance

    @classmethod
    def allow_retry(cls) -> None:
        """Let a later :meth:`get` start a zygote again after one failed (a Dask worker lives
        on after a run whose zygote failed, e.g. slow to import on a busy host)."""
        with cls._lock:
            cls._failed = False

    def wait_ready(self, timeout: float = 180) -> bool:
        """Block until the zygote has preloaded and listens; False if it failed."""
        deadline = time.monotonic() + timeout
        while (
            not self._ready
            and not type(self)._failed
            and time.monotonic() < deadline
            and _alive(self.process.pid)
        ):
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(self.address)
                self._ready = True
            except OSError:  # not listening yet
                time.sleep(0.1)
        if not self._ready:
            type(self)._failed = True
            self._last_words = self.why_not()  # its log goes with its folder
            self.stop()
        return self._ready

    def set_by_imports(self) -> dict[str, str]:
        """What the zygote's imports set in its environment (:data:`IMPORTS_SET`); {} before
        it is ready."""
        try:
            return json.loads((Path(self.folder) / IMPORTS_SET).read_text())
        except (OSError, ValueError):
            return {}

    def why_not(self) -> str:
        """The zygote's last words, for the log of a grader that fell back to normal kernels."""
        if getattr(self, "_last_words", ""):
            return self._last_words
        with contextlib.suppress(OSError):
            lines = self.log.read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else "it exited without a message"
        return "its log is gone"

    def mismatch(self, env: dict[str, str], spec: sandbox.SandboxSpec | None = None) -> str:
        """Why a kernel with ``env`` (in the sandbox ``spec``) would not be the kernel the zygote
        gives, or would inherit what its sandbox hides; "" if it would not."""
        wanted = _import_env(dict(env, MPLBACKEND=env.get("MPLBACKEND", "")))
        differ = sorted(k for k in set(wanted) | set(self.env) if wanted.get(k) != self.env.get(k))
        if differ and all(k not in self.env for k in differ) and self.wait_ready():
            # set in the grader by an import since the zygote started, and by the zygote's own
            # imports to the same value: the forked kernel has it as a fresh kernel would
            ours = self.set_by_imports()
            differ = [k for k in differ if ours.get(k) != wanted[k]]
        if differ:
            return "the kernel's environment differs from the zygote's in " + ", ".join(differ)
        if _grader_files() != self.files:
            return "course or autograder files changed since the zygote imported them"
        if spec is not None:
            exposed = [
                p for p in spec.hidden if not any(sandbox._is_within(p, b) for b in self.blocked)
            ]
            if exposed:
                return f"the sandbox hides {exposed[0]}, which the zygote may have loaded"
        return ""

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        spec: sandbox.SandboxSpec | None = None,
    ) -> ForkedKernel:
        """Fork a kernel running ``ipykernel_launcher *argv`` (in the sandbox ``spec``, if
        given); its output goes to ours."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        request = {"argv": argv, "env": env, "cwd": cwd}
        if spec is not None:
            request["sandbox"] = dataclasses.asdict(spec)
        try:
            conn.settimeout(30)
            conn.connect(self.address)
            payload = json.dumps(request).encode() + b"\n"
            socket.send_fds(conn, [payload], [1, 2])
            first, _, rest = _recv_line(conn, 30).partition(b"\n")
            if not first.isdigit():
                raise ConnectionError(
                    f"the zygote could not fork: {first.decode(errors='replace')}"
                )
        except BaseException:
            conn.close()
            raise
        return ForkedKernel(int(first), conn, rest)

    def stop(self) -> None:
        if self.owner != os.getpid():
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.process.terminate()
            self.process.wait(5)
        with contextlib.suppress(OSError):
            self.process.kill()
            self.process.wait(5)
        shutil.rmtree(self.folder, ignore_errors=True)
        if type(self)._instance is self:
            type(self)._instance = None


def _grader_files() -> dict[str, tuple[int, int]]:
    """Modification time and size of every file a kernel may import from ``course/`` and
    ``autograder/`` (the grading pipeline itself, ``autograder/pipeline/``, runs outside)."""
    here = Path(__file__).resolve().parents[2]
    pipeline = here / "autograder" / "pipeline"
    found = {}
    for package in ("course", "autograder"):
        for path in (here / package).rglob("*.py"):
            if pipeline in path.parents:
                continue
            with contextlib.suppress(OSError):
                stat = path.stat()
                found[str(path)] = (stat.st_mtime_ns, stat.st_size)
    return found


class ForkedKernel:
    """What jupyter_client expects of a ``subprocess.Popen``, for a kernel the zygote forked."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int, conn: socket.socket, buffered: bytes = b"") -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._conn: socket.socket | _Closed = conn
        self._buffer = buffered
        self._parse()

    def _parse(self) -> bool:
        """Take the exit status from the buffer once it is complete; True if it was."""
        if self._buffer.startswith(b"exit ") and self._buffer.endswith(b"\n"):
            self.returncode = int(self._buffer.split()[1])
            self._close()
            return True
        return False

    def _close(self) -> None:
        if not isinstance(self._conn, _Closed):
            self._conn.close()
            self._conn = _Closed()

    def _read_status(self, timeout: float | None) -> None:
        if self.returncode is not None or isinstance(self._conn, _Closed):
            return
        ready, _, _ = select.select([self._conn], [], [], timeout)
        if not ready:
            return
        try:
            chunk = self._conn.recv(256)
        except OSError:
            chunk = b""
        self._buffer += chunk
        if not self._parse() and not chunk:
            # the zygote is gone without a word: the kernel counts as exited once it is gone
            self._close()
            if not _alive(self.pid):
                self.returncode = -signal.SIGKILL

    def poll(self) -> int | None:
        if self.returncode is None and isinstance(self._conn, _Closed):
            return None if _alive(self.pid) else -signal.SIGKILL
        self._read_status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("kernel", timeout or 0)
            if isinstance(self._conn, _Closed):
                time.sleep(0.1)
            else:
                self._read_status(0.1)
        return code

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # never signal a pid that may have been reused
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class _Closed:
    """Stands for the zygote's connection after the zygote went away."""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _launcher_args(cmd: list[str]) -> list[str] | None:
    """The kernel's arguments if ``cmd`` is this Python's ``-m ipykernel_launcher``, else None.

    ``-X`` options before ``-m`` (``-Xfrozen_modules=off`` in kernelspecs that ``ipykernel
    install`` writes) only concern debuggers and are accepted. The interpreter must be this one
    by path, not merely the same file: a venv's ``python`` links to its base interpreter.
    """
    if not cmd or os.path.abspath(cmd[0]) != os.path.abspath(sys.executable):
        return None
    rest = cmd[1:]
    while rest and rest[0].startswith("-X"):
        rest = rest[1:]
    if rest[:2] != ["-m", "ipykernel_launcher"]:
        return None
    return rest[2:]


class SandboxProvisioner(LocalProvisioner):
    """A local provisioner that starts each kernel in a sandbox when its manager asks for one.

    Per kernel it makes a folder for the connection file and the ZMQ ``ipc`` sockets (bound
    read-write into the sandbox, removed with the kernel) and launches the kernel through
    ``python -m autograder.pipeline.sandbox exec``. It refuses to start the kernel when this
    machine cannot make sandboxes (:func:`sandbox.status`).
    """

    folder: str | None = None
    spec_file: str | None = None

    @property
    def sandboxed(self) -> bool:
        return getattr(self.parent, "sandbox_spec", None) is not None

    def sandbox_spec(self, cwd: str) -> sandbox.SandboxSpec | None:
        """The sandbox of a kernel working in ``cwd`` (None: not sandboxed)."""
        make = getattr(self.parent, "sandbox_spec", None)
        if make is None:
            return None
        assert self.folder is not None, "pre_launch makes the kernel's folder"
        return make(Path(cwd)).with_writable(self.folder)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        if self.sandboxed:
            found = sandbox.status()
            if not found.available:
                raise sandbox.SandboxUnavailable(found.message)
            if self.folder is None:
                self.folder = tempfile.mkdtemp(prefix="kernel-")
            km.transport = "ipc"  # the sandbox has no network: Unix sockets in the folder
            km.cache_ports = False
            km.connection_file = os.path.join(self.folder, "kernel.json")
            km.ip = os.path.join(self.folder, "ipc")
            km.cleanup_connection_file()  # written afresh: the last kernel could change it
        return await super().pre_launch(**kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        spec = self.sandbox_spec(str(kwargs.get("cwd") or Path.cwd()))
        if spec is not None:
            if self.spec_file is None:  # outside the kernel's folder, which the kernel can write
                handle, self.spec_file = tempfile.mkstemp(prefix="kernel-", suffix=".json")
                os.close(handle)
            Path(self.spec_file).write_text(spec.to_json())
            launcher = [sys.executable, "-m", "autograder.pipeline.sandbox", "exec"]
            cmd = [*launcher, "--spec", self.spec_file, "--", *cmd]
        return await super().launch_kernel(cmd, **kwargs)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if not restart:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
            if self.spec_file is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.spec_file)
            self.folder = self.spec_file = None


LAUNCHES: collections.Counter[str] = collections.Counter()
"""How this process's :class:`WarmProvisioner` started its kernels: ``forked``, ``launched``
(normally), and ``launched because <why>`` per reason (``grade --cluster`` reports them per
worker: a zygote that cannot serve makes every notebook seconds slower, silently)."""


class WarmProvisioner(SandboxProvisioner):
    """A provisioner whose kernels are forked from this process's zygote when possible."""

    forked = False

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        args = _launcher_args(cmd)
        env = dict(kwargs.get("env") or os.environ)
        cwd = str(kwargs.get("cwd") or Path.cwd())
        spec = self.sandbox_spec(cwd)
        zygote = Zygote.get() if args is not None else None
        if args is None:
            why = f"the kernel command is not this Python's ipykernel_launcher: {cmd}"
        elif zygote is None:
            why = "no zygote on this platform" if not supported() else "the zygote failed"
        elif mismatch := zygote.mismatch(env, spec):
            why = mismatch
        elif not zygote.wait_ready():
            why = f"the zygote did not start: {zygote.why_not()}"
        else:
            why = ""
        if not why:
            # as jupyter_client's launcher sets it; a sandboxed kernel's parent is its init
            env["JPY_PARENT_PID"] = "1" if spec is not None else str(os.getpid())
            try:
                self.process = zygote.spawn(args, env, cwd, spec)
            except (OSError, ValueError, ConnectionError) as err:
                why = f"the zygote did not answer: {err!r}"
        if why:
            self.log.info("Warm kernels: starting a normal kernel, because %s", why)
            LAUNCHES["launched"] += 1
            LAUNCHES[f"launched because {why}"] += 1
            self.forked = False
            return await super().launch_kernel(cmd, **kwargs)
        LAUNCHES["forked"] += 1
        self.log.debug("Warm kernels: kernel %d forked from the zygote", self.process.pid)
        self.forked = True
        self.pid = self.pgid = self.process.pid
        self.cwd = cwd
        return self.connection_info

    async def send_signal(self, signum: int) -> None:
        """As for a local kernel, but never to a process group whose kernel has exited."""
        if self.forked and self.process is not None and self.process.poll() is not None:
            return
        await super().send_signal(signum)


class SandboxKernelManager(AsyncKernelManager):
    """An ``AsyncKernelManager`` that sandboxes its kernels once ``sandbox_spec`` is set."""

    provisioner_class: type[SandboxProvisioner] = SandboxProvisioner
    sandbox_spec: Callable[[Path], sandbox.SandboxSpec] | None = None
    """The sandbox of a kernel working in a given folder; None: kernels are not sandboxed."""

    async def _async_pre_start_kernel(self, **kw: Any) -> tuple[list[str], dict[str, Any]]:
        if self.provisioner is None:
            self.kernel_id = self.kernel_id or kw.pop("kernel_id", str(uuid.uuid4()))
            self.provisioner = self.provisioner_class(
                kernel_id=self.kernel_id,
                kernel_spec=self.kernel_spec,
                parent=self,
            )
        return await super()._async_pre_start_kernel(**kw)


class WarmKernelManager(SandboxKernelManager):
    """A kernel manager whose kernels come from :class:`WarmProvisioner` (forked if possible)."""

    provisioner_class = WarmProvisioner


def start_early() -> None:
    """Start this process's zygote now, so its imports overlap other work (grading workers)."""
    Zygote.get(start=True)
