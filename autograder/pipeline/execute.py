"""nbgrader's Execute preprocessor, made to survive a dead or unresponsive kernel.

Stock nbgrader aborts a student's whole submission (every cell 0, no message in the export) when
a cell kills the kernel (``os._exit``, a signal, out of memory) or keeps running after the
timeout's interrupt (a loop that swallows ``KeyboardInterrupt``). ``ResilientExecute`` instead
records an error output in that cell, which scores it 0 like any failing cell, restarts the
kernel, runs again the cells that had run before (their outputs are kept from the first run),
and goes on with the next cell. The error names are :data:`KERNEL_DIED`,
:data:`KERNEL_UNRESPONSIVE` and :data:`KERNEL_UNAVAILABLE`; the grade report looks for them.

Every kernel it starts (forked from the warm zygote or launched) runs in an OS sandbox
(:mod:`autograder.pipeline.sandbox`) unless ``c.ResilientExecute.sandbox = False``: it sees the
Python installation and the course packages read-only, writes only a private copy of the
student's folder, /tmp, its home and the folders of ``sandbox_writable`` (plus those in
``$AUTOGRADER_SANDBOX_WRITABLE``, separated by ``os.pathsep``), and has no network. When this
machine cannot make sandboxes, the kernel start fails with the reason and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from jupyter_core.utils import ensure_async, run_sync
from nbclient.exceptions import DeadKernelError
from nbformat.notebooknode import NotebookNode
from nbgrader.preprocessors import Execute
from traitlets import Bool, Dict, Integer, List, Unicode

from autograder.pipeline import warm
from autograder.pipeline.sandbox import (
    DEFAULT_HIDDEN,
    Limits,
    SandboxError,
    SandboxSpec,
    default_spec,
    kernel_environment,
)

KERNEL_DIED = "KernelDied"
KERNEL_UNRESPONSIVE = "KernelUnresponsive"
KERNEL_UNAVAILABLE = "KernelUnavailable"
KERNEL_ERRORS = (KERNEL_DIED, KERNEL_UNRESPONSIVE, KERNEL_UNAVAILABLE)
GARBLED_MESSAGES = ("Invalid Signature", "Duplicate Signature")
"""How ``jupyter_client`` refuses a kernel message whose HMAC does not check out."""
TIMEOUT = "CellTimeoutError"
NOTEBOOK_TIME_UP = "NotebookTimeUp"
EVENTS_KEY = "autograder"
"""Notebook metadata key where the grader records what it did to which cell."""


def grader_events(nb: NotebookNode) -> list[dict[str, Any]]:
    """The grader's events of an executed notebook: ``{"cell", "ename", "evalue"}`` each.

    Error outputs alone cannot say who made them (a student's cell can raise an exception
    class named ``KernelDied``); these events are written by the grader only."""
    events = nb.metadata.get(EVENTS_KEY, {}).get("events", [])
    ok = isinstance(events, list) and all(
        isinstance(e, dict)
        and isinstance(e.get("cell"), int)
        and isinstance(e.get("ename"), str)
        and isinstance(e.get("evalue"), str)
        for e in events
    )
    return list(events) if ok else []


def error_output(ename: str, evalue: str) -> NotebookNode:
    """An ``error`` output as a kernel would send it (it makes a test cell score 0)."""
    return NotebookNode(
        output_type="error",
        ename=ename,
        evalue=evalue,
        traceback=[f"\x1b[0;31m{ename}\x1b[0m: {evalue}"],
    )


class ResilientExecute(Execute):
    """Execute every cell; a killed or stuck kernel costs one cell, not the submission."""

    probe_timeout = Integer(
        5, help="Seconds an interrupted kernel has to become responsive before it is restarted."
    ).tag(config=True)

    max_restarts = Integer(
        3, help="Kernel restarts allowed per notebook; later cells are then not run."
    ).tag(config=True)

    notebook_timeout = Integer(
        900,
        help="Seconds one notebook may use in all (restarts and replays included); cells not "
        "started by then are not run (and score 0). The per-cell limit is `timeout`.",
    ).tag(config=True)

    warm_kernels = Bool(
        True,
        help="Fork each kernel from a process that has already imported torch, transformers, "
        "the course and the checks (Linux; see autograder.pipeline.warm). Saves the imports, "
        "about 8 s per notebook on a 2-core CPU; the notebook still gets its own process.",
    ).tag(config=True)

    sandbox = Bool(
        True,
        help="Run every grading kernel in an OS sandbox (autograder.pipeline.sandbox): no "
        "network, no access to the course tree, the gradebook or other students' files. False "
        "runs student code with the grader's own permissions.",
    ).tag(config=True)

    sandbox_writable = List(
        Unicode(),
        help="Folders a sandboxed kernel may write besides its private ones (the grader reads "
        "them). $AUTOGRADER_SANDBOX_WRITABLE adds more (separated by os.pathsep).",
    ).tag(config=True)

    sandbox_hidden = List(
        Unicode(),
        default_value=list(DEFAULT_HIDDEN),
        help="Files and folders of the course packages a sandboxed kernel sees empty (relative "
        "to the folder that holds them, or absolute).",
    ).tag(config=True)

    sandbox_limits = Dict(
        help="Overrides of the sandbox's resource limits: fields of "
        "autograder.pipeline.sandbox.Limits, e.g. {'memory': 8 << 30, 'disk': 1 << 30}.",
    ).tag(config=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.warm_kernels and warm.supported():
            self.kernel_manager_class = warm.WarmKernelManager
        elif self.sandbox:
            self.kernel_manager_class = warm.SandboxKernelManager

    def sandbox_spec(self, cwd: Path) -> SandboxSpec:
        """The sandbox of a kernel working in ``cwd`` (called at every kernel start)."""
        course = self.config.get("CourseDirectory", {}).get("root") or os.getcwd()
        return default_spec(
            cwd,
            course,
            self.sandbox_writable,
            hidden=self.sandbox_hidden,
            limits=Limits(**self.sandbox_limits),
        )

    async def async_start_new_kernel(self, **kwargs: Any) -> None:
        """Start the kernel, sandboxed unless ``sandbox`` is False, with only the part of the
        grader's environment a kernel needs (:func:`.sandbox.kernel_environment`)."""
        kwargs["env"] = kernel_environment(dict(kwargs.get("env") or os.environ))
        if self.sandbox:
            if not isinstance(self.km, warm.SandboxKernelManager):
                raise SandboxError(
                    f"sandbox = True, but the kernel manager {type(self.km).__name__} cannot "
                    "sandbox its kernels (use autograder.pipeline.warm.SandboxKernelManager)"
                )
            self.km.sandbox_spec = self.sandbox_spec
        await super().async_start_new_kernel(**kwargs)

    def start_new_kernel(self, **kwargs: Any) -> None:
        """What ``ExecutePreprocessor.setup_kernel`` calls. nbclient binds it to
        ``NotebookClient.async_start_new_kernel`` itself, which would skip the sandbox (and any
        subclass's override): dispatch to this object's ``async_start_new_kernel`` instead."""
        run_sync(self.async_start_new_kernel)(**kwargs)

    def preprocess(
        self, nb: NotebookNode, resources: Any = None, km: Any = None
    ) -> tuple[NotebookNode, Any]:
        """Execute ``nb`` as nbgrader does, with recovery (see the module docstring)."""
        self._replay: list[str] = []
        self._restarts = 0
        self._kernel_lost = False
        self._timed_out = False
        self._deadline = monotonic() + self.notebook_timeout
        self._events: list[dict[str, Any]] = []
        nb.metadata.pop(EVENTS_KEY, None)  # only the grader writes there (a student's is dropped)
        try:
            return super().preprocess(nb, resources, km)
        finally:
            self.write_events(nb)

    def grader_error(self, cell: NotebookNode, index: int, ename: str, evalue: str) -> None:
        """Give ``cell`` an error output made by the grader, and record it as a grader event:
        the report trusts the events, never an error's name (a student can raise anything)."""
        cell.outputs.append(error_output(ename, evalue))
        self._events.append({"cell": index, "ename": ename, "evalue": evalue})

    def write_events(self, nb: NotebookNode) -> None:
        """Store the grader's events in the notebook's metadata (see :func:`grader_events`)."""
        nb.metadata[EVENTS_KEY] = {"events": list(getattr(self, "_events", []))}

    def preprocess_cell(self, cell: NotebookNode, resources: Any, index: int) -> tuple[Any, Any]:
        """Execute one cell; on a dead or stuck kernel, record it here and recover."""
        if cell.cell_type != "code" or not cell.source.strip():
            return super().preprocess_cell(cell, resources, index)
        if self._kernel_lost:
            cell.outputs = []
            self.grader_error(
                cell,
                index,
                KERNEL_UNAVAILABLE,
                "not run: the kernel could not be restored after an earlier crash or hang",
            )
            return cell, resources
        if monotonic() > self._deadline:
            cell.outputs = []
            self.grader_error(
                cell,
                index,
                NOTEBOOK_TIME_UP,
                f"not run: the notebook used up its grading time ({self.notebook_timeout} s)",
            )
            return cell, resources
        self._timed_out = False
        try:
            cell, resources = super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self.grader_error(
                cell,
                index,
                KERNEL_DIED,
                "the kernel died while running this cell (os._exit, a signal or out of "
                "memory); it was restarted and the earlier cells were run again",
            )
            self._recover()
            return cell, resources
        except ValueError as err:
            if not str(err).startswith(GARBLED_MESSAGES):
                raise
            # The kernel's messaging broke mid-message (a student's fork bomb leaves no thread
            # for pyzmq's large-message sender, so a big output goes out in pieces) or a
            # message was forged: the channel cannot be trusted, so treat it as a crash.
            self.grader_error(
                cell,
                index,
                KERNEL_DIED,
                "the kernel sent a message that failed its signature check (its messaging "
                "broke, e.g. it ran out of threads, or the message was forged); it was restarted "
                "and the earlier cells were run again",
            )
            self._recover()
            return cell, resources
        if self._timed_out:
            if run_sync(self._async_responds)():
                limit = f"stopped at the time limit ({self.timeout} s)"
                self._events.append({"cell": index, "ename": TIMEOUT, "evalue": limit})
                return cell, resources
            self.grader_error(
                cell,
                index,
                KERNEL_UNRESPONSIVE,
                f"this cell ran past {self.timeout} s and ignored the interrupt; the kernel "
                "was restarted and the earlier cells were run again",
            )
            self._recover()
            return cell, resources
        self._replay.append(cell.source)
        return cell, resources

    async def _async_handle_timeout(
        self, timeout: int, cell: NotebookNode | None = None
    ) -> dict[str, Any] | None:
        self._timed_out = True
        return await super()._async_handle_timeout(timeout, cell)

    def _recover(self) -> None:
        """Restart the kernel and replay the cells that ran; give up after ``max_restarts``."""
        self._restarts += 1
        if self._restarts > self.max_restarts or not run_sync(self._async_restart)():
            self._kernel_lost = True

    async def _async_responds(self) -> bool:
        """Whether the kernel answers a ``kernel_info`` request within ``probe_timeout``."""
        assert self.kc is not None
        msg_id = self.kc.kernel_info()
        return await self._async_wait_reply(msg_id, self.probe_timeout) is not None

    async def _async_wait_reply(self, msg_id: str, timeout: float) -> dict[str, Any] | None:
        """The shell reply to ``msg_id``, or None if the kernel dies or ``timeout`` passes."""
        assert self.kc is not None
        deadline = monotonic() + timeout
        while (remaining := deadline - monotonic()) > 0:
            try:
                msg = await ensure_async(self.kc.shell_channel.get_msg(timeout=min(1, remaining)))
            except Empty:
                if not await ensure_async(self.kc.is_alive()):
                    return None
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg
        return None

    async def _async_restart(self) -> bool:
        """Restart the kernel with a fresh client; replay the recorded cells. True if it worked."""
        assert self.km is not None and self.kc is not None
        self.log.warning("Restarting the kernel (restart %d)", self._restarts)
        await ensure_async(self.kc.stop_channels())
        await ensure_async(self.km.restart_kernel(now=True))
        self.kc = self.km.client()
        await ensure_async(self.kc.start_channels())
        try:
            await ensure_async(self.kc.wait_for_ready(timeout=self.startup_timeout))
        except RuntimeError:
            return False
        limit = self.timeout or 600
        for source in self._replay:
            msg_id = self.kc.execute(source, store_history=False, stop_on_error=False)
            if await self._async_wait_reply(msg_id, limit) is None:
                return False
        return True
