"""Warm grading kernels: each kernel is forked from a process that has already imported the course.

A grading kernel started the usual way spends most of a short graded notebook importing torch,
transformers, the course library and the checks (about 8 s of a 20 s notebook on a 2-core CPU),
and it does so again for every notebook of every student. Here one *zygote* process per grading
worker imports all of that once; each kernel is then ``fork()``-ed from it and becomes an
ordinary IPython kernel with those modules already loaded. The student's code still runs in its
own process with its own namespace, exactly one kernel per notebook, as before.

The pieces:

- :func:`serve` is the zygote (``python -c "from autograder.pipeline.warm import serve; ..."``):
  it imports :data:`PRELOAD`, refuses to fork if any import started a thread (a forked thread pool
  deadlocks), and answers requests on a Unix socket: "start a kernel with this argv, environment
  and working directory". It replies with the kernel's pid, then, when that kernel exits, with
  its exit status; it reaps its children and kills them if its parent goes away.
- :class:`WarmProvisioner` is a jupyter_client provisioner that asks the zygote for a kernel
  and hands jupyter_client a Popen-like handle (:class:`ForkedKernel`), so interrupt, kill,
  restart and "is it alive" work as they do for a local kernel. It falls back to a normal
  launch whenever forking would not give the same kernel: not Linux, a kernel command other
  than this Python's ``ipykernel_launcher``, an environment variable read at import time that
  differs from the zygote's, or a zygote that failed to start.
- :class:`WarmKernelManager` uses that provisioner; ``ResilientExecute`` picks it when
  ``c.ResilientExecute.warm_kernels`` is true (the default on Linux).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import LocalProvisioner

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
IMPORT_TIME_ENV = (
    "PYTHONPATH",
    "PYTHONWARNINGS",
    "PYTHONHASHSEED",
    "PYTHONDONTWRITEBYTECODE",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_HUB_CACHE",
    "TRANSFORMERS_OFFLINE",
    "TRANSFORMERS_VERBOSITY",
    "TRANSFORMERS_CACHE",
    "TQDM_DISABLE",
)
IMPORT_TIME_PREFIXES = ("TORCH_", "PYTORCH_", "CUDA_", "MPL", "MATPLOTLIB", "TQDM_")

_INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def supported() -> bool:
    """Forked kernels are used on Linux only (``fork`` after importing torch is unsafe on macOS)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def _import_env(env: dict[str, str]) -> dict[str, str]:
    """The part of ``env`` that modules read at import time (see :data:`IMPORT_TIME_ENV`)."""
    return {
        k: v for k, v in env.items() if k in IMPORT_TIME_ENV or k.startswith(IMPORT_TIME_PREFIXES)
    }


# --------------------------------------------------------------------------------- the zygote


def serve(address: str, parent: int) -> None:
    """Run the zygote: preload, then fork a kernel per request until ``parent`` goes away."""
    before = dict(os.environ)
    os.environ.setdefault("MPLBACKEND", _INLINE_BACKEND)  # what ipykernel would set
    # A CUDA context does not survive fork: should an import ask whether CUDA is available,
    # answer through NVML, which creates none (the kernels themselves are unaffected).
    nvml_check = os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        sys.stderr.write("warm kernels disabled: preloading initialised CUDA\n")
        sys.exit(3)
    if "PYTORCH_NVML_BASED_CUDA_CHECK" not in before and nvml_check == "1":
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
    with contextlib.suppress(Exception):  # parse the grader's files once, for every kernel
        importlib.import_module("autograder.checks.guard").tampering()
    # Variables the imports themselves set (TORCHINDUCTOR_CACHE_DIR, ...) are kept in kernels.
    set_by_imports = {k: v for k, v in os.environ.items() if k not in before}
    set_by_imports.pop("MPLBACKEND", None)
    if threading.active_count() != 1:
        sys.stderr.write(f"warm kernels disabled: preloading started {threading.enumerate()}\n")
        sys.exit(3)
    signal.signal(signal.SIGTERM, _stop_serving)  # Zygote.stop(): clean up, kill the kernels
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(16)
    children: dict[int, socket.socket] = {}
    try:
        while os.getppid() == parent:
            readable, _, _ = select.select([listener], [], [], 0.2)
            _reap(children)
            if readable:
                conn, _ = listener.accept()
                _start_kernel(listener, conn, children, set_by_imports)
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(address)
            os.rmdir(os.path.dirname(address))


def _stop_serving(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _reap(children: dict[int, socket.socket]) -> None:
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
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {code}\n".encode())
            conn.close()


def _recv_line(conn: socket.socket, limit: float) -> bytes:
    data = b""
    deadline = time.monotonic() + limit
    while not data.endswith(b"\n"):
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
    set_by_imports: dict[str, str],
) -> None:
    try:
        request = json.loads(_recv_line(conn, 10))
    except (OSError, ValueError, ConnectionError):
        conn.close()
        return
    pid = os.fork()
    if pid == 0:  # the kernel
        listener.close()
        conn.close()
        for other in children.values():
            other.close()
        _become_kernel(request["argv"], {**set_by_imports, **request["env"]}, request["cwd"])
    conn.sendall(f"{pid}\n".encode())
    conn.setblocking(True)
    children[pid] = conn


def _become_kernel(argv: list[str], env: dict[str, str], cwd: str) -> None:
    """In the forked child: become ``python -m ipykernel_launcher *argv`` and never return."""
    code = 1
    try:
        os.setsid()  # its own process group, as jupyter_client gives a local kernel
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Python's default; the rest are untouched
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
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
        app.start()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001  (report anything, then exit: never return to the loop)
        traceback.print_exc()
    finally:
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

    def __init__(self) -> None:
        # Grading workers forked from this process share its zygote; only this process stops it.
        self.owner = os.getpid()
        self.folder = tempfile.mkdtemp(prefix="warm-kernels-")
        self.address = str(Path(self.folder) / "zygote.sock")
        self.env = _import_env(dict(os.environ, MPLBACKEND=os.environ.get("MPLBACKEND", "")))
        code = f"from autograder.pipeline.warm import serve; serve({self.address!r}, {os.getpid()})"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
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

    def wait_ready(self, timeout: float = 180) -> bool:
        """Block until the zygote has preloaded and listens; False if it failed."""
        deadline = time.monotonic() + timeout
        while not self._ready and time.monotonic() < deadline and _alive(self.process.pid):
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(self.address)
                self._ready = True
            except OSError:  # not listening yet
                time.sleep(0.1)
        if not self._ready:
            type(self)._failed = True
            self.stop()
        return self._ready

    def matches(self, env: dict[str, str]) -> bool:
        """Whether a kernel with ``env`` would import modules as the zygote did."""
        wanted = _import_env(dict(env, MPLBACKEND=env.get("MPLBACKEND", "")))
        return wanted == self.env

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str) -> ForkedKernel:
        """Fork a kernel running ``ipykernel_launcher *argv``."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.address)
        conn.sendall(json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode() + b"\n")
        pid = int(_recv_line(conn, 30))
        return ForkedKernel(pid, conn)

    def stop(self) -> None:
        if self.owner != os.getpid():
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.process.terminate()
            self.process.wait(5)
        with contextlib.suppress(OSError):
            self.process.kill()
            self.process.wait(5)
        with contextlib.suppress(OSError):
            (Path(self.folder) / "zygote.sock").unlink(missing_ok=True)
            os.rmdir(self.folder)
        if type(self)._instance is self:
            type(self)._instance = None


class ForkedKernel:
    """What jupyter_client expects of a ``subprocess.Popen``, for a kernel the zygote forked."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int, conn: socket.socket) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._conn = conn
        self._buffer = b""

    def _read_status(self, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        ready, _, _ = select.select([self._conn], [], [], timeout)
        if not ready:
            return
        chunk = self._conn.recv(256)
        self._buffer += chunk
        if self._buffer.startswith(b"exit ") and self._buffer.endswith(b"\n"):
            self.returncode = int(self._buffer.split()[1])
        elif not chunk:  # the zygote is gone: the kernel counts as exited once it is gone too
            if _alive(self.pid):
                self._conn.close()
                self._conn = _Closed()
                return
            self.returncode = -signal.SIGKILL
        else:
            return
        self._conn.close()

    def poll(self) -> int | None:
        if isinstance(self._conn, _Closed):
            return None if _alive(self.pid) else -signal.SIGKILL
        self._read_status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("kernel", timeout or 0)
            if not isinstance(self._conn, _Closed):
                self._read_status(0.1)
            else:
                time.sleep(0.1)
        assert self.returncode is not None or isinstance(self._conn, _Closed)
        return self.returncode if self.returncode is not None else -signal.SIGKILL

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
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
    """The kernel's arguments if ``cmd`` is this Python's ``-m ipykernel_launcher``, else None."""
    if len(cmd) < 3 or cmd[1:3] != ["-m", "ipykernel_launcher"]:
        return None
    try:
        same = os.path.samefile(cmd[0], sys.executable)
    except OSError:
        same = False
    return cmd[3:] if same else None


class WarmProvisioner(LocalProvisioner):
    """A local provisioner whose kernels are forked from this process's zygote when possible."""

    forked = False

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        args = _launcher_args(cmd)
        env = dict(kwargs.get("env") or os.environ)
        zygote = Zygote.get() if args is not None else None
        if args is None:
            why = f"the kernel command is not this Python's ipykernel_launcher: {cmd}"
        elif zygote is None:
            why = "no zygote on this platform" if not supported() else "the zygote failed"
        elif not zygote.matches(env):
            why = "the kernel's environment differs from the zygote's in " + ", ".join(
                sorted(
                    k
                    for k in set(_import_env(env)) ^ set(zygote.env)
                    | {k for k in zygote.env if zygote.env.get(k) != _import_env(env).get(k)}
                )
            )
        elif not zygote.wait_ready():
            why = "the zygote did not start"
        else:
            why = ""
        if not why:
            cwd = str(kwargs.get("cwd") or Path.cwd())
            env["JPY_PARENT_PID"] = str(os.getpid())  # as jupyter_client's launcher sets it
            try:
                self.process = zygote.spawn(args, env, cwd)
            except (OSError, ValueError, ConnectionError) as err:
                why = f"the zygote did not answer: {err!r}"
        if why:
            self.log.info("Warm kernels: starting a normal kernel, because %s", why)
            self.forked = False
            return await super().launch_kernel(cmd, **kwargs)
        self.log.debug("Warm kernels: kernel %d forked from the zygote", self.process.pid)
        self.forked = True
        self.pid = self.pgid = self.process.pid
        self.cwd = cwd
        return self.connection_info


class WarmKernelManager(AsyncKernelManager):
    """An ``AsyncKernelManager`` whose kernels come from :class:`WarmProvisioner`."""

    async def _async_pre_start_kernel(self, **kw: Any) -> tuple[list[str], dict[str, Any]]:
        if self.provisioner is None:
            self.kernel_id = self.kernel_id or kw.pop("kernel_id", str(uuid.uuid4()))
            self.provisioner = WarmProvisioner(
                kernel_id=self.kernel_id,
                kernel_spec=self.kernel_spec,
                parent=self,
            )
        return await super()._async_pre_start_kernel(**kw)


def start_early() -> None:
    """Start this process's zygote now, so its imports overlap other work (grading workers)."""
    Zygote.get(start=True)
