"""An operating-system sandbox for grading kernels: a student's notebook is untrusted code.

Built on the kernel's own mechanisms through ``ctypes`` (no setuid helper, no system package):
user, mount, PID, network, IPC and UTS namespaces (``unshare``), a fresh root filesystem
(``mount``, ``pivot_root``), resource limits (``setrlimit``), ``PR_SET_NO_NEW_PRIVS``, no
capabilities at all, and Landlock where the kernel has it (an extra layer, never required).
It does not filter what Python code calls: whatever the code does, the kernel enforces this.

What a sandboxed kernel sees (everything at the path the grader uses):

- read-only: the Python installation (``sys.prefix``, ``sys.base_prefix``, the site-packages,
  the interpreter), ``/usr`` and ``/lib*``, a few files of ``/etc`` (no ``shadow``, no keys:
  :data:`ETC_FILES`, plus a generated ``passwd``/``group``/``hosts``), the course packages
  ``course/`` and ``autograder/`` (the folders themselves, not the repository), top-level
  ``*.py`` modules of the course root and of ``$PYTHONPATH`` folders (a course's own checks;
  not ``nbgrader_config.py``, not the folders), the course's cache of fetched
  backbones, ``/dev/null`` and friends (GPU device nodes and ``/sys`` where the host has an
  NVIDIA GPU), its own ``/proc``;
- hidden inside those: :data:`DEFAULT_HIDDEN` (``autograder/reference/``,
  ``autograder/answers.py``, ``autograder/bugzoo/`` and their byte-code), replaced by an empty
  file or folder;
- writable, on one ``tmpfs`` of limited size (:attr:`Limits.disk` beyond the student's own
  files): a private copy of the student's folder at the kernel's working directory, a private
  ``/tmp``, ``$HOME`` and ``/dev/shm``; the copy is thrown away with the sandbox;
- writable, shared with the grader: the folders of :attr:`SandboxSpec.writable` (the kernel's
  connection folder, a verdict channel). There, Landlock forbids creating symlinks (also in a
  private area that holds one, such as ``/tmp``): files the grader reads are files. These are
  host folders: only :attr:`Limits.file_size` bounds what is written there;
- nothing else: not ``solutions/``, the gradebook, ``.nbgrader/``, the release, ``submitted/``,
  ``autograded/`` (other than its own copy), other students, the grader's home, ``/root``.

Network: a new network namespace with only its own loopback (brought up, see
:attr:`SandboxSpec.loopback`), which reaches nothing outside: not the host, not another kernel,
no DNS. The kernel talks to the grader over ZMQ ``ipc`` sockets (Unix socket files) in its
connection folder.

Processes and users: the PID namespace is new, so the kernel sees and signals only its own
processes (Landlock >= 6 also refuses signals leaving the sandbox). When the grader is root,
each kernel runs as its own unprivileged host uid (:func:`kernel_uid`: ``0x70000000 + pid``,
unique among live kernels; its parent writes the uid map, see :class:`Handshake`); any other
grader's kernels run as the grader's uid, in their own user namespace. ``RLIMIT_NPROC`` is
counted per user namespace and uid (Linux >= 5.14; root of the host is never limited, hence
the own uid), so a fork bomb is bounded by :attr:`Limits.processes` and costs neither the
grader nor another kernel. Nested user namespaces are disabled (``user.max_user_namespaces =
0`` inside): the kernel can mount nothing, not even a ``tmpfs`` of its own.

Memory: ``RLIMIT_DATA`` (:attr:`Limits.memory`) bounds what a process allocates; ``RLIMIT_AS``
(:attr:`Limits.address_space`) adds a looser bound on all mappings (shared memory too). Both
are per process: without cgroups, ``processes x memory`` is the real ceiling.

The three processes: the caller ``P`` (a fork of the zygote, or the launcher jupyter_client
started) creates the namespaces and stays outside the new PID namespace as the process
jupyter_client knows; ``I``, PID 1 inside, builds the filesystem and reaps; ``K``, its child,
drops every privilege and becomes the kernel. ``P`` and ``I`` ignore SIGINT, so an interrupt
sent to the process group reaches the kernel only; SIGKILL (or SIGTERM) to ``P`` ends the
namespace: ``I`` dies with ``P`` (``PR_SET_PDEATHSIG``), which kills every process inside
whatever session or group it moved to. ``P`` also ends it when its own parent goes away.

API:

- :class:`SandboxSpec`, :class:`Limits`: what to bind and how much to allow (JSON-able).
- :func:`default_spec` ``(cwd, course_root, extra_writable=(), *, hidden=DEFAULT_HIDDEN,
  limits=None) -> SandboxSpec``: the spec of a grading kernel; extra writable folders also
  come from ``$AUTOGRADER_SANDBOX_WRITABLE`` (separated by ``os.pathsep``).
- :func:`status` ``(refresh=False) -> SandboxStatus``: whether a sandbox can be made here
  (tried once per process, in a child process, then cached); ``fix`` says what to change when
  it cannot.
- :func:`enter` ``(spec, handshake=None) -> None``: called in a freshly forked, single-threaded
  process; returns only in the sandboxed kernel process (see above). Raises
  :class:`SandboxError` when the sandbox cannot be made: nothing ever runs unsandboxed.
- ``python -m autograder.pipeline.sandbox exec --spec FILE -- ARGV...``: enter the sandbox of
  the spec in ``FILE`` (JSON) and exec ``ARGV`` (the cold path of a kernel start);
  ``python -m autograder.pipeline.sandbox status``: print :func:`status`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import glob
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "DEFAULT_HIDDEN",
    "ETC_FILES",
    "Handshake",
    "Limits",
    "SandboxError",
    "SandboxSpec",
    "SandboxStatus",
    "SandboxUnavailable",
    "default_spec",
    "enter",
    "GRADING_ENV",
    "kernel_environment",
    "kernel_uid",
    "status",
]

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The folder that holds the ``course`` and ``autograder`` packages (the repository)."""

COURSE_PACKAGES = ("course", "autograder")
"""The packages a grading kernel imports, bound read-only (not the folder that holds them)."""

DEFAULT_HIDDEN = ("autograder/reference", "autograder/answers.py", "autograder/bugzoo")
"""Paths (relative to :data:`PACKAGE_ROOT`) a kernel must not read: empty in the sandbox."""

KERNEL_ENV_NAMES = frozenset(
    {
        "PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "USER", "LOGNAME", "SHELL",
        "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "JUPYTER_PATH", "JUPYTER_CONFIG_DIR",
        "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
    }
)  # fmt: skip
KERNEL_ENV_PREFIXES = (
    "LC_", "PYTHON", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "TORCH", "PYTORCH_", "CUDA_",
    "NVIDIA_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "TQDM_", "MPL", "MATPLOTLIB", "JPY_",
    "COURSE_", "NBGRADER_", "XDG_", "AUTOGRADER_",
)  # fmt: skip
GRADING_ENV: dict[str, str] = {
    "PYTHONWARNINGS": "ignore",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
"""Settings of grading kernels only: nbgrader scores a test cell 0 as soon as it writes to
stderr, where warnings and progress bars go. They are added to a grading kernel's environment
(:func:`kernel_environment`), never to the process that loads ``nbgrader_config.py`` (a
JupyterLab server's kernels keep their warnings and progress bars)."""
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "KEY", "AUTH", "COOKIE")


def kernel_environment(env: dict[str, str]) -> dict[str, str]:
    """The part of the grader's environment a grading kernel gets: what Python, torch, the
    Hugging Face libraries, Jupyter and the course read (:data:`KERNEL_ENV_NAMES`,
    :data:`KERNEL_ENV_PREFIXES`), never a name that looks like a credential
    (:data:`SECRET_WORDS`, e.g. ``HF_TOKEN``), plus :data:`GRADING_ENV`. Everything else in the
    instructor's shell (cloud keys, tokens) would otherwise reach student code, which can print
    it into its feedback."""
    kept = {
        k: v
        for k, v in env.items()
        if (k in KERNEL_ENV_NAMES or k.startswith(KERNEL_ENV_PREFIXES))
        and not any(word in k.upper() for word in SECRET_WORDS)
    }
    return {**kept, **GRADING_ENV}


ETC_FILES = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "timezone",
    "nsswitch.conf",
    "host.conf",
    "alternatives",
    "fonts",
    "mime.types",
    "protocols",
    "services",
)
"""What of ``/etc`` a kernel sees (nothing secret); ``passwd``, ``group`` and ``hosts`` are
written for the sandbox."""

DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
"""Device nodes every kernel gets (GPU nodes are added where the host has them)."""

UID_BASE = 0x70000000
"""Kernel uids of a root grader are ``UID_BASE + pid``: above systemd's container range,
below 2**31."""

WRITABLE_ENV = "AUTOGRADER_SANDBOX_WRITABLE"
"""Extra writable folders for every sandboxed kernel, separated by ``os.pathsep``."""

GiB = 1 << 30
MiB = 1 << 20


class SandboxError(RuntimeError):
    """A sandbox could not be made; nothing was run outside it."""


class SandboxUnavailable(SandboxError):
    """Sandboxing is requested but this machine cannot make sandboxes (see :func:`status`)."""


# ------------------------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class Limits:
    """Resource limits of one kernel (its processes each; the disk for all of them)."""

    memory: int = 6 * GiB
    """``RLIMIT_DATA`` per process: heap and private memory (what tensors use)."""
    address_space: int | None = None
    """``RLIMIT_AS`` per process; None: :attr:`memory` + 8 GiB (shared mappings and reserved
    address space count here; CUDA reserves far more, so it is left unlimited with a GPU)."""
    processes: int = 256 + 4 * (os.cpu_count() or 1)
    """``RLIMIT_NPROC``: processes and threads of this kernel's user namespace."""
    file_size: int = 256 * MiB
    """``RLIMIT_FSIZE``: the largest file the kernel can write."""
    open_files: int = 1024
    """``RLIMIT_NOFILE``."""
    disk: int = 512 * MiB
    """Size of the writable ``tmpfs`` (working folder, /tmp, home, /dev/shm), on top of the
    student's own files."""
    inodes: int = 32768
    """Files and folders the writable ``tmpfs`` can hold."""


@dataclass(frozen=True)
class SandboxSpec:
    """What one sandboxed kernel sees and may use. Every path is absolute and is mounted at
    the same path inside the sandbox."""

    cwd: str
    """The kernel's working folder: a private, writable copy of :attr:`source`."""
    source: str
    """The folder copied to :attr:`cwd` (the student's files; usually :attr:`cwd` itself)."""
    readonly: tuple[str, ...] = ()
    """Files and folders bound read-only (symlinks are recreated as symlinks)."""
    hidden: tuple[str, ...] = ()
    """Files or folders inside :attr:`readonly` ones replaced by an empty file or folder."""
    writable: tuple[str, ...] = ()
    """Host folders bound read-write: what the kernel writes there, the grader reads."""
    private: tuple[str, ...] = ("/tmp",)
    """Empty writable folders (on the sandbox's ``tmpfs``): /tmp, $HOME, /dev/shm."""
    devices: tuple[str, ...] = DEVICES
    """Device nodes bound into /dev."""
    limits: Limits = field(default_factory=Limits)
    uid: int | None = None
    """Host uid of the kernel when the grader is root (None: :func:`kernel_uid` of ``P``)."""
    hostname: str = "sandbox"
    loopback: bool = True
    """Bring up the loopback of the sandbox's own network namespace (which has no other
    interface, so it reaches nothing outside): ipykernel forwards the output of forked child
    processes over ``tcp://127.0.0.1``. False: no network stack at all (and, with Landlock,
    no TCP)."""
    landlock: bool = True
    """Add a Landlock layer where the kernel supports it."""

    def with_writable(self, *paths: str | os.PathLike[str]) -> SandboxSpec:
        """This spec with more folders bound read-write."""
        extra = tuple(str(Path(p).resolve()) for p in paths)
        return dataclasses.replace(self, writable=tuple(dict.fromkeys(self.writable + extra)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> SandboxSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxSpec:
        data = dict(data)
        data["limits"] = Limits(**data.get("limits", {}))
        for name in ("readonly", "hidden", "writable", "private", "devices"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


def kernel_uid(pid: int) -> int:
    """The host uid of the kernel whose sandbox is held by process ``pid`` (root graders)."""
    return UID_BASE + pid


def _mapped(uid: int, table: str = "/proc/self/uid_map") -> bool:
    """Whether ``uid`` exists in this process's user namespace."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(table).read_text().splitlines():
            inside, _, count = map(int, line.split())
            if inside <= uid < inside + count:
                return True
    return False


def _identity(spec: SandboxSpec, pid: int) -> tuple[bool, int, int]:
    """``(own_uid, uid, gid)`` of the kernel whose sandbox ``pid`` holds: a root grader gives
    it its own uid (when that uid exists here: not so for root in a rootless container); any
    other grader's kernels keep the grader's uid, in their own user namespace."""
    if os.geteuid() == 0:
        uid = spec.uid if spec.uid is not None else kernel_uid(pid)
        if _mapped(uid) and _mapped(uid, "/proc/self/gid_map"):
            return True, uid, uid
    return False, os.geteuid(), os.getegid()


def _python_paths() -> list[str]:
    """The interpreter and every folder it imports from that belongs to the installation."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        with contextlib.suppress(KeyError):
            paths.add(sysconfig.get_path(name))
    import site

    paths.update(site.getsitepackages())
    user_site = site.getusersitepackages()
    if site.ENABLE_USER_SITE and user_site and os.path.isdir(user_site):
        paths.add(user_site)
    executable = sys.executable
    paths.update({executable, os.path.realpath(executable)})
    for entry in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if entry:
            paths.add(entry)
    return sorted(p for p in paths if p and os.path.isabs(p) and os.path.lexists(p))


def _system_paths() -> list[str]:
    found = [p for p in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")]
    found += [f"/etc/{name}" for name in ETC_FILES]
    return [p for p in found if os.path.lexists(p)]


def _gpu_devices() -> list[str]:
    nodes = sorted(glob.glob("/dev/nvidia*")) + sorted(glob.glob("/dev/nvidia-caps/*"))
    return [p for p in nodes if os.path.exists(p) and stat.S_ISCHR(os.stat(p).st_mode)]


def _course_cache() -> Path:
    """Fetched backbones (``course.fetch.cache_dir``, repeated here to keep this module light)."""
    explicit = os.environ.get("COURSE_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "soft-prompts-course"


def _private_dirs() -> list[str]:
    """/tmp, /dev/shm, $HOME and the folders that environment variables point a kernel to."""
    found = ["/tmp", "/dev/shm"]
    for name in (
        "HOME",
        "TMPDIR",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "MPLCONFIGDIR",
        "IPYTHONDIR",
    ):
        value = os.environ.get(name, "").strip()
        if value and os.path.isabs(value) and os.path.normpath(value) != "/":
            found.append(os.path.normpath(value))
    kept: list[str] = []
    for path in sorted(set(found), key=lambda p: (p.count("/"), p)):
        if not any(_is_within(path, other) for other in kept):
            kept.append(path)
    return kept


def _hidden_paths(hidden: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Absolute hidden paths, with the byte-code folder beside each hidden module.

    A bind mount shows what is written later, so ``reference.*.pyc`` written by a grader
    process after the kernel started would be readable: the whole ``__pycache__`` is hidden
    (made, empty, if missing, so that it can be covered; other modules there are then compiled
    from source in a kernel launched cold)."""
    found = []
    for entry in hidden:
        path = Path(entry) if Path(entry).is_absolute() else PACKAGE_ROOT / entry
        found.append(str(path))
        if path.suffix == ".py":
            cache = path.parent / "__pycache__"
            with contextlib.suppress(OSError):
                cache.mkdir(exist_ok=True)
            if cache.is_dir():
                found.append(str(cache))
    return list(dict.fromkeys(found))


def _top_level_modules(folders: Iterable[str | os.PathLike[str]]) -> list[str]:
    """The ``*.py`` files (not the folders) of the course root and of ``$PYTHONPATH``: a course
    may ship its own checks there (``prepare_environment`` puts the course root on the path)."""
    found = []
    for folder in folders:
        if folder and os.path.isabs(folder) and os.path.isdir(folder):
            modules = sorted(Path(folder).resolve().glob("*.py"))
            found += [str(p) for p in modules if p.name != "nbgrader_config.py"]
    return found


def default_spec(
    cwd: str | os.PathLike[str],
    course_root: str | os.PathLike[str],
    extra_writable: Iterable[str | os.PathLike[str]] = (),
    *,
    hidden: Iterable[str | os.PathLike[str]] = DEFAULT_HIDDEN,
    limits: Limits | None = None,
) -> SandboxSpec:
    """The sandbox of a grading kernel working in ``cwd`` for the course at ``course_root``.

    ``extra_writable`` are folders the kernel shares with the grader (also read from
    :data:`WRITABLE_ENV`); ``hidden`` are paths (relative to the folder holding the course
    packages, or absolute) replaced by empty ones.
    """
    cwd_path = Path(cwd).resolve()
    root = Path(course_root).resolve()
    readonly = _python_paths() + _system_paths()
    readonly += [str(PACKAGE_ROOT / name) for name in COURSE_PACKAGES]
    readonly += _top_level_modules([root, *os.environ.get("PYTHONPATH", "").split(os.pathsep)])
    cache = _course_cache()
    if cache.is_dir():
        readonly.append(str(cache.resolve()))
    writable = [str(Path(p).resolve()) for p in extra_writable]
    writable += [p for p in os.environ.get(WRITABLE_ENV, "").split(os.pathsep) if p]
    gpus = _gpu_devices()
    if gpus and os.path.isdir("/sys"):
        readonly.append("/sys")  # the NVIDIA driver and NVML read the PCI tree there
    return SandboxSpec(
        cwd=str(cwd_path),
        source=str(cwd_path),
        readonly=tuple(dict.fromkeys(readonly)),
        hidden=tuple(dict.fromkeys(_hidden_paths(hidden))),
        writable=tuple(dict.fromkeys(str(Path(p).resolve()) for p in writable)),
        private=tuple(_private_dirs()),
        devices=DEVICES + tuple(gpus),
        limits=limits or Limits(),
    )


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


# ------------------------------------------------------------------------------ system calls

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_NAMESPACES = (
    _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
)

_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_NOATIME = 0x400
_MS_NODIRATIME = 0x800
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MS_RELATIME = 1 << 21
_MNT_DETACH = 2

_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_NOEXEC = 0x8
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4

_SYSCALLS = {  # pivot_root, mount_setattr, landlock_create_ruleset, _add_rule, _restrict_self
    "x86_64": {"pivot_root": 155, "mount_setattr": 442},
    "aarch64": {"pivot_root": 41, "mount_setattr": 442},
}
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446

_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        _libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    return _libc


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _syscall(name: str) -> int:
    table = _SYSCALLS.get(platform.machine())
    if table is None:
        raise SandboxError(f"unsupported architecture {platform.machine()}")
    return table[name]


def _unshare(flags: int) -> None:
    _check(_lib().unshare(ctypes.c_int(flags)), "unshare")


def _encode(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _lib().mount(
        _encode(source), target.encode(), _encode(fstype), flags, data.encode() or None
    )
    _check(result, f"mount {source or fstype} on {target}")


def _umount(target: str) -> None:
    _check(_lib().umount2(target.encode(), ctypes.c_int(_MNT_DETACH)), f"umount {target}")


def _pivot_root(new_root: str, put_old: str) -> None:
    result = _lib().syscall(
        ctypes.c_long(_syscall("pivot_root")), new_root.encode(), put_old.encode()
    )
    _check(result, "pivot_root")


def _prctl(option: int, arg: int = 0) -> None:
    _check(_lib().prctl(option, arg, 0, 0, 0), f"prctl({option})")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_HAVE_MOUNT_SETATTR = True


def _restrict_mount(
    target: str, readonly: bool, nodev: bool = True, recursive: bool = True
) -> None:
    """Make the mount at ``target`` (and, if ``recursive``, the mounts under it) nosuid, and
    read-only and nodev as asked."""
    global _HAVE_MOUNT_SETATTR
    attrs = _MOUNT_ATTR_NOSUID | (_MOUNT_ATTR_RDONLY if readonly else 0)
    attrs |= _MOUNT_ATTR_NODEV if nodev else 0
    if _HAVE_MOUNT_SETATTR and recursive:
        attr = _MountAttr(attrs, 0, 0, 0)
        result = _lib().syscall(
            ctypes.c_long(_syscall("mount_setattr")),
            ctypes.c_int(_AT_FDCWD),
            target.encode(),
            ctypes.c_uint(_AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        if result == 0:
            return
        if ctypes.get_errno() not in (errno.ENOSYS, errno.EINVAL):
            _check(result, f"mount_setattr {target}")
        _HAVE_MOUNT_SETATTR = False  # then binds are not recursive either (see _bind)
    # Older kernels: remount the top mount only, keeping the flags the host locked on it.
    current = os.statvfs(target).f_flag
    flags = _MS_REMOUNT | _MS_BIND | _MS_NOSUID
    flags |= _MS_RDONLY if readonly else 0
    flags |= _MS_NODEV if nodev or current & os.ST_NODEV else 0
    for st_flag, ms_flag in (
        (os.ST_NOEXEC, _MS_NOEXEC),
        (os.ST_NOATIME, _MS_NOATIME),
        (os.ST_NODIRATIME, _MS_NODIRATIME),
        (os.ST_RELATIME, _MS_RELATIME),
    ):
        if current & st_flag:
            flags |= ms_flag
    _mount(None, target, None, flags)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_privileges(uid: int, gid: int, root: bool) -> None:
    """Become ``uid``/``gid`` (a root grader's sandbox) with every capability set empty
    (bounding, ambient, permitted, effective, inheritable), and no new privileges by exec."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        _prctl(_PR_CAPBSET_DROP, cap)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    if root:
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_lib().capset(ctypes.byref(header), data), "capset")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


# ------------------------------------------------------------------------------------- Landlock

_LL_EXECUTE = 1 << 0
_LL_WRITE_FILE = 1 << 1
_LL_REMOVE_DIR = 1 << 4
_LL_REMOVE_FILE = 1 << 5
_LL_MAKE_CHAR = 1 << 6
_LL_MAKE_DIR = 1 << 7
_LL_MAKE_REG = 1 << 8
_LL_MAKE_SOCK = 1 << 9
_LL_MAKE_FIFO = 1 << 10
_LL_MAKE_BLOCK = 1 << 11
_LL_MAKE_SYM = 1 << 12
_LL_REFER = 1 << 13
_LL_TRUNCATE = 1 << 14
_LL_NET_BIND_TCP = 1 << 0
_LL_NET_CONNECT_TCP = 1 << 1
_LL_SCOPE_ABSTRACT_UNIX = 1 << 0
_LL_SCOPE_SIGNAL = 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The Landlock ABI version of this kernel (0: none)."""
    if platform.machine() not in _SYSCALLS:
        return 0
    result = _lib().syscall(
        ctypes.c_long(_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1)
    )
    return max(int(result), 0)


def _landlock(spec: SandboxSpec) -> int:
    """Restrict this process (and what it starts) to writing its writable areas; no TCP, no
    signals or abstract sockets out of the sandbox. Returns the ABI used (0: not available)."""
    abi = landlock_abi()
    if abi < 1:
        return 0
    make = _LL_MAKE_DIR | _LL_MAKE_REG | _LL_MAKE_SOCK | _LL_MAKE_FIFO | _LL_MAKE_SYM
    handled = _LL_WRITE_FILE | _LL_REMOVE_DIR | _LL_REMOVE_FILE | make
    handled |= _LL_MAKE_CHAR | _LL_MAKE_BLOCK
    handled |= _LL_REFER if abi >= 2 else 0
    handled |= _LL_TRUNCATE if abi >= 3 else 0
    private_rights = handled & ~(_LL_MAKE_CHAR | _LL_MAKE_BLOCK)
    shared_rights = private_rights & ~_LL_MAKE_SYM  # the grader reads there: no symlinks
    device_rights = _LL_WRITE_FILE | (_LL_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(handled, 0, 0)
    size = 8
    if abi >= 4:
        size = 16
        if not spec.loopback:
            attr.handled_access_net = _LL_NET_BIND_TCP | _LL_NET_CONNECT_TCP
    if abi >= 6:
        attr.scoped = _LL_SCOPE_ABSTRACT_UNIX | _LL_SCOPE_SIGNAL
        size = 24
    lib = _lib()
    ruleset = _check(
        lib.syscall(
            ctypes.c_long(_LANDLOCK_CREATE_RULESET),
            ctypes.byref(attr),
            ctypes.c_size_t(size),
            ctypes.c_uint32(0),
        ),
        "landlock_create_ruleset",
    )
    try:
        # Rules add up along a path: a private area that holds a shared folder (/tmp holds the
        # kernel's connection folder) gets no symlinks either.
        rules = [
            (p, shared_rights if any(_is_within(w, p) for w in spec.writable) else private_rights)
            for p in (spec.cwd, *spec.private)
        ]
        rules += [(p, shared_rights) for p in spec.writable]
        rules += [(p, device_rights) for p in spec.devices]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= _LL_WRITE_FILE | _LL_TRUNCATE | _LL_EXECUTE
                rule = _PathBeneath(rights, fd)
                _check(
                    lib.syscall(
                        ctypes.c_long(_LANDLOCK_ADD_RULE),
                        ctypes.c_int(ruleset),
                        ctypes.c_int(1),  # LANDLOCK_RULE_PATH_BENEATH
                        ctypes.byref(rule),
                        ctypes.c_uint32(0),
                    ),
                    f"landlock_add_rule {path}",
                )
            finally:
                os.close(fd)
        _check(
            lib.syscall(
                ctypes.c_long(_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)
            ),
            "landlock_restrict_self",
        )
    finally:
        os.close(ruleset)
    return abi


# ------------------------------------------------------------------------------- entering


def _single_threaded() -> bool:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1]) == 1
    return True


def _validate(spec: SandboxSpec) -> None:
    """Fail early, in the grader's view of the filesystem, on a spec that cannot work."""
    paths = [spec.cwd, spec.source, *spec.readonly, *spec.hidden, *spec.writable, *spec.private]
    for path in paths:
        if not os.path.isabs(path):
            raise SandboxError(f"sandbox paths must be absolute: {path!r}")
    if not os.path.isdir(spec.source):
        raise SandboxError(f"the kernel's folder {spec.source} does not exist")
    for path in spec.writable:
        if not os.path.isdir(path):
            raise SandboxError(f"writable folder {path} does not exist")


class Handshake:
    """Lets the parent of a process about to :func:`enter` a sandbox write its user namespace's
    uid map (a root grader's kernel needs a parent outside the namespace for that). Without
    one, :func:`enter` forks a helper to do it; the zygote, already the parent, saves that fork.

    Make it before the fork; call :meth:`serve` in the parent and pass it to :func:`enter` in
    the child."""

    def __init__(self) -> None:
        self._ready = os.pipe()
        self._mapped = os.pipe()

    def serve(self, pid: int, spec: SandboxSpec, timeout: float = 30) -> bool:
        """In the parent: wait for ``pid`` to create its namespaces, then map its uids."""
        os.close(self._ready[1])
        os.close(self._mapped[0])
        try:
            ready, _, _ = select.select([self._ready[0]], [], [], timeout)
            if not ready or os.read(self._ready[0], 1) != b"u":
                return False
            own, uid, gid = _identity(spec, pid)
            if not own:
                return False
            _write_maps(pid, f"0 0 1\n{uid} {uid} 1\n", f"0 0 1\n{gid} {gid} 1\n", deny=False)
            os.write(self._mapped[1], b"m")
            return True
        except OSError:
            return False
        finally:
            os.close(self._ready[0])
            os.close(self._mapped[1])

    def close(self) -> None:
        """Drop the handshake (the fork it was made for failed)."""
        for fd in (*self._ready, *self._mapped):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _child(self) -> tuple[int, int]:
        os.close(self._ready[0])
        os.close(self._mapped[1])
        return self._ready[1], self._mapped[0]


def enter(spec: SandboxSpec, handshake: Handshake | None = None) -> None:
    """Put the rest of this process's life in the sandbox of ``spec``.

    Call it in a freshly forked, single-threaded process (a fork of the zygote, or the
    launcher). It returns only in the sandboxed kernel process ``K``; this process becomes
    ``P``, which waits for the sandbox and exits with the kernel's status (module docstring).
    Raises :class:`SandboxError` (in ``P``, before anything ran) if the sandbox cannot be made.
    ``handshake``: the parent maps the user namespace (see :class:`Handshake`).
    """
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable("sandboxing needs Linux namespaces")
    root, uid, gid = _identity(spec, os.getpid())  # root: the kernel gets its own uid
    if handshake is None:
        handshake = Handshake()
        helper = os.fork() if root else 0  # a root grader's maps are written from outside
        if root and helper == 0:
            ok = False
            try:
                ok = handshake.serve(os.getppid(), spec)
            finally:
                os._exit(0 if ok else 1)
    else:
        helper = 0
    ready, mapped = handshake._child()
    try:
        _validate(spec)
        if not _single_threaded():
            raise SandboxError("enter() must run in a single-threaded process: fork first")
        me = os.getpid()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are for the kernel only
        if root:
            for folder in spec.writable:
                _chown_tree(folder, uid, gid)
        try:
            _unshare(_NAMESPACES)
        except OSError as err:
            raise SandboxUnavailable(f"cannot create namespaces: {err}") from err
        if root:
            os.write(ready, b"u")
            if os.read(mapped, 1) != b"m":
                raise SandboxUnavailable("the uid map of the sandbox could not be written")
            os.setgroups([])  # the grader's supplementary groups grant nothing inside
        else:
            try:
                _write_maps(me, f"{uid} {uid} 1\n", f"{gid} {gid} 1\n", deny=True)
            except OSError as err:
                raise SandboxUnavailable(f"cannot map the user namespace: {err}") from err
    finally:
        os.close(ready)
        os.close(mapped)
        if helper > 0:
            os.waitpid(helper, 0)
    alive_r, alive_w = os.pipe()  # closes when P dies: I checks it once PDEATHSIG is set
    parent = os.getppid()
    init = os.fork()
    if init:
        os.close(alive_r)
        _supervise(init, parent)  # P: never returns
    os.close(alive_w)
    try:
        _init(spec, uid, gid, root, alive_r)  # returns in K only
    except BaseException as err:  # noqa: BLE001  (I or K: report and end this sandbox)
        with contextlib.suppress(Exception):
            os.write(2, f"sandbox: {type(err).__name__}: {err}\n".encode())
        os._exit(70)


def _write_maps(pid: int, uid_map: str, gid_map: str, deny: bool) -> None:
    if deny:
        Path(f"/proc/{pid}/setgroups").write_text("deny")
    Path(f"/proc/{pid}/uid_map").write_text(uid_map)
    Path(f"/proc/{pid}/gid_map").write_text(gid_map)


def _chown_tree(folder: str, uid: int, gid: int) -> None:
    os.chown(folder, uid, gid, follow_symlinks=False)
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            os.chown(os.path.join(base, name), uid, gid, follow_symlinks=False)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _supervise(child: int, parent: int) -> NoReturn:
    """``P``: wait for ``I`` and exit with its status; end the sandbox if our parent goes."""
    code = 1
    try:
        try:
            watch = os.pidfd_open(child)
        except (AttributeError, OSError):
            watch = -1
        while True:
            select.select([watch] if watch >= 0 else [], [], [], 1.0 if watch >= 0 else 0.05)
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid == child:
                code = _exit_code(status)
                break
            if os.getppid() != parent:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                break
    finally:
        os._exit(code)


def _set_pdeathsig(alive: int) -> None:
    """Die with our parent; if it is already gone (``alive`` at EOF), die now."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    ready, _, _ = select.select([alive], [], [], 0)
    if ready and os.read(alive, 1) == b"":
        os._exit(1)


def _init(spec: SandboxSpec, uid: int, gid: int, root: bool, alive: int) -> None:
    """``I``, PID 1 of the new namespace: build the filesystem, drop privileges, fork ``K``."""
    _set_pdeathsig(alive)
    socket.sethostname(spec.hostname)
    if spec.loopback:
        _loopback_up()
    _build_root(spec, uid, gid)
    _drop_privileges(uid, gid, root)
    _prctl(_PR_SET_DUMPABLE, 0)  # the kernel cannot ptrace or read the memory of its init
    _set_pdeathsig(alive)  # a credential change cleared it
    kernel_alive_r, kernel_alive_w = os.pipe()
    kernel = os.fork()
    if kernel:
        os.close(kernel_alive_r)
        _reap(kernel)  # never returns
    os.close(kernel_alive_w)
    os.close(alive)
    _set_pdeathsig(kernel_alive_r)
    os.close(kernel_alive_r)
    _set_limits(spec)
    if spec.landlock:
        _landlock(spec)
    _close_host_files()
    os.chdir(spec.cwd)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _loopback_up() -> None:
    """``ip link set lo up`` in this (new, empty) network namespace."""
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


def _reap(kernel: int) -> NoReturn:
    """``I``: reap every process of the namespace; exit with the kernel's status."""
    code = 1
    try:
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == kernel:
                code = _exit_code(status)
                break
    finally:
        os._exit(code)  # every process left in the namespace is killed with us


def _set_limits(spec: SandboxSpec) -> None:
    limits = spec.limits
    address_space = limits.address_space
    if address_space is None:
        gpu = any("nvidia" in device for device in spec.devices)
        address_space = resource.RLIM_INFINITY if gpu else limits.memory + 8 * GiB
    for name, value in (
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_DATA, limits.memory),
        (resource.RLIMIT_AS, address_space),
        (resource.RLIMIT_NPROC, limits.processes),
        (resource.RLIMIT_FSIZE, limits.file_size),
        (resource.RLIMIT_NOFILE, limits.open_files),
    ):
        resource.setrlimit(name, (value, value))


def _close_host_files() -> None:
    """Close inherited descriptors that could name the host's files (folders, files, O_PATH):
    from a folder descriptor, ``openat`` would reach outside the sandbox. Standard streams,
    pipes and sockets stay."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd < 3:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISBLK(mode):
            with contextlib.suppress(OSError):
                os.close(fd)


# -------------------------------------------------------------------------- the file system

_BASE = "/tmp"  # where the staging tmpfs goes (in our mount namespace only)
_OLD = "/oldroot"
_NEW = "/newroot"
_SCRATCH = "/scratch"


def _tree_size(folder: str) -> tuple[int, int]:
    """Bytes (rounded up to pages) and entries under ``folder``."""
    total, count = 0, 0
    for base, dirs, files in os.walk(folder):
        count += len(dirs) + len(files)
        for name in files:
            with contextlib.suppress(OSError):
                size = os.lstat(os.path.join(base, name)).st_size
                total += (size + 4095) // 4096 * 4096
    return total, count


_OWNER = (0, 0)  # who owns the folders made for mount points (the kernel: set by _build_root)


def _makedirs(path: str) -> None:
    """``os.makedirs``, the new folders owned by the kernel: a folder made inside its home
    (``~/.cache`` for a read-only ``~/.cache/soft-prompts-course``) stays usable by it."""
    if os.path.isdir(path):
        return
    _makedirs(os.path.dirname(path))
    os.mkdir(path, 0o755)
    os.chown(path, *_OWNER)


def _make_mountpoint(target: str, like_dir: bool) -> None:
    if os.path.lexists(target):
        return
    _makedirs(os.path.dirname(target))
    if like_dir:
        _makedirs(target)
    else:
        with open(target, "w"):
            pass


def _bind(source: str, target: str, readonly: bool, nodev: bool = True) -> None:
    """Bind host ``source`` (a path under /oldroot) on ``target``; symlinks are recreated."""
    if os.path.islink(source):
        if not os.path.lexists(target):
            _makedirs(os.path.dirname(target))
            os.symlink(os.readlink(source), target)
        return
    _make_mountpoint(target, os.path.isdir(source))
    # Recursive binds need a recursive read-only (mount_setattr, Linux >= 5.12): without it,
    # a read-write mount under the source would stay writable, so bind the top one only.
    _mount(source, target, None, _MS_BIND | (_MS_REC if _HAVE_MOUNT_SETATTR else 0))
    _restrict_mount(target, readonly=readonly, nodev=nodev)


def _plan(spec: SandboxSpec) -> list[tuple[str, str]]:
    """``(kind, path)`` mounts, parents before children; read-only paths already under a
    read-only mount are dropped (site-packages inside the prefix)."""
    entries = [("ro", p) for p in spec.readonly]
    entries += [("private", p) for p in spec.private]
    entries += [("rw", p) for p in spec.writable]
    entries.append(("cwd", spec.cwd))
    entries.sort(key=lambda e: (e[1].rstrip("/").count("/"), e[1], e[0] != "ro"))
    kept: list[tuple[str, str]] = []
    for kind, path in entries:
        covering = [e for e in kept if _is_within(path, e[1])]
        nearest = max(covering, key=lambda e: len(e[1]), default=None)
        if nearest is not None and nearest[1] == path:
            continue  # the same path twice: the first (writable over read-only) wins
        if kind == "ro" and nearest is not None and nearest[0] == "ro":
            continue
        kept.append((kind, path))
    return kept


def _special_files(folder: str, names: list[str]) -> list[str]:
    """Names in ``folder`` that are neither files, folders nor symlinks (a FIFO would block
    the copy)."""
    skipped = []
    for name in names:
        mode = os.lstat(os.path.join(folder, name)).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            skipped.append(name)
    return skipped


def _build_root(spec: SandboxSpec, uid: int, gid: int) -> None:
    """Mount the sandbox's filesystem and make it the root (runs in ``I``, with capabilities
    over its own namespaces)."""
    global _OWNER
    inside_uid = uid  # the kernel's uid is the same number inside and outside
    _OWNER = (inside_uid, gid)
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount("tmpfs", _BASE, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=64,mode=0755")
    _restrict_mount(_BASE, readonly=False)  # finds out whether mount_setattr works here
    os.chdir(_BASE)
    for name in (_OLD, _NEW, _SCRATCH, "/empty"):
        os.mkdir("." + name, 0o755 if name != "/empty" else 0o555)
    with open("./empty-file", "w"):
        pass
    os.chmod("./empty-file", 0o444)
    _pivot_root(".", "." + _OLD)
    os.chdir("/")

    def host(path: str) -> str:
        return _OLD + path

    def new(path: str) -> str:
        return _NEW + path

    size, count = _tree_size(host(spec.source))
    _mount("tmpfs", _NEW, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=4m,nr_inodes=8192,mode=0755")
    scratch_size = spec.limits.disk + size + 64 * 4096
    inodes = spec.limits.inodes + count + 64
    _mount(
        "tmpfs",
        _SCRATCH,
        "tmpfs",
        _MS_NOSUID | _MS_NODEV,
        f"size={scratch_size},nr_inodes={inodes},mode=0755",
    )
    for index, (kind, path) in enumerate(_plan(spec)):
        if kind == "ro":
            _bind(host(path), new(path), readonly=True)
        elif kind == "rw":
            _bind(host(path), new(path), readonly=False)
        elif kind == "private":
            area = f"{_SCRATCH}/private-{index}"
            os.mkdir(area, 0o1777 if path in ("/tmp", "/dev/shm") else 0o700)
            os.chown(area, inside_uid, gid)
            _make_mountpoint(new(path), True)
            _mount(area, new(path), None, _MS_BIND)
            _restrict_mount(new(path), readonly=False)
        else:  # the working folder: a private copy of the student's files
            area = f"{_SCRATCH}/work"
            shutil.copytree(host(spec.source), area, symlinks=True, ignore=_special_files)
            _chown_tree(area, inside_uid, gid)
            _make_mountpoint(new(path), True)
            _mount(area, new(path), None, _MS_BIND)
            _restrict_mount(new(path), readonly=False)
    for path in spec.hidden:
        if not os.path.lexists(host(path)) or not os.path.lexists(new(path)):
            continue
        if os.path.islink(new(path)):
            continue
        empty = "/empty" if os.path.isdir(new(path)) else "/empty-file"
        _mount(empty, new(path), None, _MS_BIND)
        _restrict_mount(new(path), readonly=True)
    _make_dev(spec, host, new)
    _make_etc(spec, uid, gid, new)
    _makedirs(new("/proc"))
    _mount("proc", new("/proc"), "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    for name in ("max_user_namespaces", "max_mnt_namespaces"):
        with contextlib.suppress(OSError):  # no nested namespaces (and no tmpfs of theirs)
            Path(new(f"/proc/sys/user/{name}")).write_text("0")
    _restrict_mount(_NEW, readonly=True, recursive=False)  # not the mounts on top of it
    os.chdir(_NEW)
    _pivot_root(".", ".")
    _umount(".")
    os.chdir("/")


def _make_dev(spec: SandboxSpec, host: Any, new: Any) -> None:
    _makedirs(new("/dev"))
    for device in spec.devices:
        if os.path.exists(host(device)):
            _make_mountpoint(new(device), False)
            _mount(host(device), new(device), None, _MS_BIND)
            _restrict_mount(new(device), readonly=True, nodev=False)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        if not os.path.lexists(new(f"/dev/{name}")):
            os.symlink(target, new(f"/dev/{name}"))


def _make_etc(spec: SandboxSpec, uid: int, gid: int, new: Any) -> None:
    _makedirs(new("/etc"))
    home = os.environ.get("HOME") or "/tmp"
    files = {
        "passwd": f"root:x:0:0:root:/root:/bin/sh\nstudent:x:{uid}:{gid}:student:{home}:/bin/sh\n",
        "group": f"root:x:0:\nstudent:x:{gid}:\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{spec.hostname}\n",
        "hostname": f"{spec.hostname}\n",
    }
    for name, text in files.items():
        path = new(f"/etc/{name}")
        if not os.path.lexists(path):
            Path(path).write_text(text)


# ------------------------------------------------------------------------------------ status


@dataclass(frozen=True)
class SandboxStatus:
    """Whether sandboxes can be made on this machine, and if not, why and what to change."""

    available: bool
    mechanism: str
    detail: str
    fix: str = ""

    @property
    def message(self) -> str:
        """One paragraph for an instructor: what failed and how to fix it."""
        if self.available:
            return f"sandbox available: {self.mechanism}"
        return f"grading kernels cannot be sandboxed: {self.detail}. Fix: {self.fix}"


_STATUS: SandboxStatus | None = None


def status(refresh: bool = False) -> SandboxStatus:
    """Whether a sandbox can be made here: tried once, in a child process, then cached."""
    global _STATUS
    if _STATUS is None or refresh:
        _STATUS = _probe()
    return _STATUS


def _mechanism(abi: int, root: bool) -> str:
    who = (
        f"one unprivileged host uid per kernel ({UID_BASE:#x} + pid)"
        if root
        else f"the grader's uid {os.getuid()} in its own user namespace"
    )
    layers = "user, mount, PID, network, IPC and UTS namespaces; rlimits; no capabilities; "
    layers += "no_new_privs"
    layers += f"; Landlock ABI {abi}" if abi else "; no Landlock (kernel without it)"
    return f"{layers}; {who}"


def _probe() -> SandboxStatus:
    if not sys.platform.startswith("linux"):
        return SandboxStatus(
            False,
            "none",
            f"sandboxing needs Linux namespaces and this is {sys.platform}",
            "grade on Linux (a VM or a container), or pass --unsafe to run student code "
            "with your own permissions",
        )
    if platform.machine() not in _SYSCALLS:
        return SandboxStatus(
            False,
            "none",
            f"unsupported architecture {platform.machine()}",
            "grade on x86_64 or aarch64 Linux, or pass --unsafe",
        )
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as folder:
        try:
            run = subprocess.run(
                [sys.executable, "-m", "autograder.pipeline.sandbox", "probe", folder],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=folder,
                env={**os.environ, "PYTHONPATH": _pythonpath()},
            )
            out, err, code = run.stdout, run.stderr, run.returncode
        except (OSError, subprocess.TimeoutExpired) as failure:
            out, err, code = "", str(failure), -1
    try:
        report = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        report = None
    if code == 0 and isinstance(report, dict) and report.get("ok"):
        abi = int(report.get("landlock", 0))
        return SandboxStatus(True, _mechanism(abi, os.geteuid() == 0), "")
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    detail = lines[-1] if lines else f"the probe exited with status {code} and no message"
    detail = detail.removeprefix("sandbox: ")
    return SandboxStatus(False, "none", detail, _fix_for(detail))


def _pythonpath() -> str:
    entries = [str(PACKAGE_ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(e for e in entries if e))


def _sysctl(name: str) -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    return None


def _fix_for(detail: str) -> str:
    """What to change, judged from the failure and the kernel's settings."""
    unsafe = "; or grade without the sandbox with --unsafe (student code then runs with your "
    unsafe += "permissions)"
    fixes = []
    if _sysctl("kernel.unprivileged_userns_clone") == "0" and os.geteuid() != 0:
        fixes.append(
            "unprivileged user namespaces are disabled: sysctl -w "
            "kernel.unprivileged_userns_clone=1"
        )
    if _sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        fixes.append(
            "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10+): sysctl -w "
            "kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile "
            f"with 'userns,' for {sys.executable}"
        )
    if _sysctl("user.max_user_namespaces") == "0":
        fixes.append("user namespaces are switched off: sysctl -w user.max_user_namespaces=15000")
    if "mount proc" in detail:
        fixes.append(
            "this container hides parts of /proc, so a new /proc cannot be mounted: run "
            "the grader outside the container, or start it with an unmasked /proc "
            "(docker run --security-opt systempaths=unconfined)"
        )
    in_container = os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")
    if not fixes and in_container:
        fixes.append(
            "the container's seccomp profile or missing capabilities block namespaces: "
            "start it with --security-opt seccomp=unconfined --security-opt "
            "apparmor=unconfined (or grade on the host)"
        )
    if not fixes:
        fixes.append(
            "make sure the kernel allows user namespaces (sysctl "
            "user.max_user_namespaces > 0; kernel.unprivileged_userns_clone=1 where it "
            "exists) and that no seccomp/AppArmor/SELinux policy blocks unshare, mount "
            "and pivot_root for this Python"
        )
    return "; ".join(fixes) + unsafe


def _probe_main(folder: str) -> NoReturn:
    """``probe FOLDER``: make a minimal sandbox and report from inside it (JSON on stdout)."""
    spec = SandboxSpec(
        cwd=folder,
        source=folder,
        readonly=tuple(_python_paths() + _system_paths() + [str(PACKAGE_ROOT / "autograder")]),
        private=("/tmp",),
        limits=Limits(processes=64),
    )
    try:
        enter(spec)
    except SandboxError as err:
        print(f"sandbox: {err}", file=sys.stderr, flush=True)
        os._exit(1)
    report = {"ok": True, "uid": os.getuid(), "pid": os.getpid(), "landlock": landlock_abi()}
    try:
        with socket.create_connection(("127.0.0.1", 9), timeout=1):
            report["ok"] = False
    except OSError:
        pass
    print(json.dumps(report), flush=True)
    os._exit(0 if report["ok"] else 1)


def _exec_main(spec_file: str, argv: Sequence[str]) -> NoReturn:
    """``exec --spec FILE -- ARGV``: enter the sandbox, then exec ``ARGV`` as the kernel."""
    if not argv:
        print("sandbox: nothing to run", file=sys.stderr)
        os._exit(2)
    try:
        spec = SandboxSpec.from_json(Path(spec_file).read_bytes())
        enter(spec)
    except (SandboxError, OSError, ValueError, TypeError) as err:
        print(f"sandbox: {err}", file=sys.stderr, flush=True)
        os._exit(1)
    env = dict(os.environ)
    env["JPY_PARENT_PID"] = "1"  # its init: ipykernel then needs no parent poller
    for signum in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):  # as Popen restores them
        signal.signal(signum, signal.SIG_DFL)
    try:
        os.execvpe(argv[0], list(argv), env)
    except OSError as err:
        print(f"sandbox: cannot run {argv[0]}: {err}", file=sys.stderr, flush=True)
    os._exit(127)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder.pipeline.sandbox")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("exec", help="run a command (a kernel) inside a sandbox")
    run.add_argument("--spec", required=True, help="the sandbox, as SandboxSpec JSON")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("status", help="can this machine make sandboxes?")
    probe = sub.add_parser("probe", help=argparse.SUPPRESS)
    probe.add_argument("folder")
    args = parser.parse_args(argv)
    if args.command == "exec":
        rest = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        _exec_main(args.spec, rest)
    if args.command == "probe":
        _probe_main(args.folder)
    found = status()
    print(found.message)
    return 0 if found.available else 1


if __name__ == "__main__":
    raise SystemExit(main())
