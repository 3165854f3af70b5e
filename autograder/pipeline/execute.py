"""nbgrader's Execute preprocessor, made to survive a dead or unresponsive kernel.

Stock nbgrader aborts a student's whole submission (every cell 0, no message in the export) when
a cell kills the kernel (``os._exit``, a signal, out of memory) or keeps running after the
timeout's interrupt (a loop that swallows ``KeyboardInterrupt``). ``ResilientExecute`` instead
records an error output in that cell, which scores it 0 like any failing cell, restarts the
kernel, runs again the cells that had run before (their outputs are kept from the first run),
and goes on with the next cell. The error names are :data:`KERNEL_DIED`,
:data:`KERNEL_UNRESPONSIVE` and :data:`KERNEL_UNAVAILABLE`; the grade report looks for them.
"""

from __future__ import annotations

from queue import Empty
from time import monotonic
from typing import Any

from jupyter_core.utils import ensure_async, run_sync
from nbclient.exceptions import DeadKernelError
from nbformat.notebooknode import NotebookNode
from nbgrader.preprocessors import Execute
from traitlets import Bool, Integer

from autograder.pipeline import warm

KERNEL_DIED = "KernelDied"
KERNEL_UNRESPONSIVE = "KernelUnresponsive"
KERNEL_UNAVAILABLE = "KernelUnavailable"
KERNEL_ERRORS = (KERNEL_DIED, KERNEL_UNRESPONSIVE, KERNEL_UNAVAILABLE)


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

    warm_kernels = Bool(
        True,
        help="Fork each kernel from a process that has already imported torch, transformers, "
        "the course and the checks (Linux; see autograder.pipeline.warm). Saves the imports, "
        "about 8 s per notebook on a 2-core CPU; the notebook still gets its own process.",
    ).tag(config=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.warm_kernels and warm.supported():
            self.kernel_manager_class = warm.WarmKernelManager

    def preprocess(
        self, nb: NotebookNode, resources: Any = None, km: Any = None
    ) -> tuple[NotebookNode, Any]:
        """Execute ``nb`` as nbgrader does, with recovery (see the module docstring)."""
        self._replay: list[str] = []
        self._restarts = 0
        self._kernel_lost = False
        self._timed_out = False
        return super().preprocess(nb, resources, km)

    def preprocess_cell(self, cell: NotebookNode, resources: Any, index: int) -> tuple[Any, Any]:
        """Execute one cell; on a dead or stuck kernel, record it here and recover."""
        if cell.cell_type != "code" or not cell.source.strip():
            return super().preprocess_cell(cell, resources, index)
        if self._kernel_lost:
            cell.outputs = [
                error_output(
                    KERNEL_UNAVAILABLE,
                    "not run: the kernel could not be restored after an earlier crash or hang",
                )
            ]
            return cell, resources
        self._timed_out = False
        try:
            cell, resources = super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            cell.outputs.append(
                error_output(
                    KERNEL_DIED,
                    "the kernel died while running this cell (os._exit, a signal or out of "
                    "memory); it was restarted and the earlier cells were run again",
                )
            )
            self._recover()
            return cell, resources
        if self._timed_out:
            if run_sync(self._async_responds)():
                return cell, resources
            cell.outputs.append(
                error_output(
                    KERNEL_UNRESPONSIVE,
                    f"this cell ran past {self.timeout} s and ignored the interrupt; the kernel "
                    "was restarted and the earlier cells were run again",
                )
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
