"""What the browser tests share: a JupyterLab server on a temporary copy of the course, Debian's
Chromium driven by Playwright, and the few JupyterLab gestures the tests make (open a notebook,
Run All, wait for the kernel, save, close, reopen).

Nothing here touches the repository: the server works on a copy of ``nbgrader_config.py``,
``solutions/`` and ``notebooks/`` in a temporary folder, and everything the tests keep
(screenshots, the server's log) goes to ``test-artifacts/browser/`` (git-ignored).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = Path(os.environ.get("COURSE_CHROMIUM", "/usr/bin/chromium"))
FIX = "bash .ci/browser-deps"
NOTEBOOKS = sorted(p.name for p in (ROOT / "solutions").iterdir() if re.match(r"\d\d_", p.name))

# Debian's Chromium: Playwright cannot download its own browsers here. Headless, and nothing in
# the background: without the networking flags Chromium keeps calling Google services, which a
# closed network answers with a flood of refused connections.
LAUNCH_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a small /dev/shm
]
VIEWPORT = {"width": 1400, "height": 900}

# Per-user JupyterLab settings for the server's fresh settings folder: what a user answers once
# to the two prompts JupyterLab shows on first start. Both would ask the (closed) network for
# Jupyter news and releases, and their toast covers the bottom right of every screenshot.
USER_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def _installed_overrides() -> dict:
    """The JupyterLab settings an installed course brings (``pip install`` of the student wheel
    puts this file in ``share/jupyter/lab/settings/overrides.d``; the editable install these
    tests run from installs no data files), as per-user settings: widget state is saved."""
    path = Path(__file__).resolve().parents[1] / "course/assets/jupyterlab/soft-prompts-course.json"
    settings = {}
    for plugin, values in json.loads(path.read_text()).items():
        extension, name = plugin.split(":")
        settings[f"{extension}/{name}.jupyterlab-settings"] = values
    return settings


USER_SETTINGS.update(_installed_overrides())


def missing_dependency() -> str | None:
    """What the browser tests lack on this machine (Chromium or Playwright), or None."""
    problems = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"{CHROMIUM} is missing")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("playwright is not installed")
    return " and ".join(problems) or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_course(dest: Path) -> Path:
    """``nbgrader_config.py``, ``solutions/`` and ``notebooks/`` copied into ``dest``, without
    the artifacts a local run may have left beside the notebooks."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "nbgrader_config.py", dest / "nbgrader_config.py")
    ignore = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "*.pt", "*.safetensors")
    for folder in ("solutions", "notebooks"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------
@dataclass
class LabServer:
    """``python -m jupyter lab`` on ``root`` (its working folder too: Formgrader and Validate
    read ``nbgrader_config.py`` from there), with its own settings, workspaces, runtime and config
    folders under ``state``, so nothing from this machine's Jupyter setup leaks in or out."""

    root: Path
    state: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for name, sub in [
            ("JUPYTER_CONFIG_DIR", "config"),
            ("JUPYTER_RUNTIME_DIR", "runtime"),
            ("JUPYTER_DATA_DIR", "data"),
            ("JUPYTERLAB_SETTINGS_DIR", "user-settings"),
            ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
            ("IPYTHONDIR", "ipython"),
        ]:
            env[name] = str(self.state / sub)
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        # The students' environment: nothing the grader sets. Kernels inherit the server's
        # environment, so whatever pytest or CI exported here would hide what a student sees.
        for name in ("NBGRADER_EXECUTION", "TQDM_DISABLE", "PYTHONWARNINGS", "COURSE_MAX_STEPS"):
            env.pop(name, None)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COURSE_BACKBONE="tiny")
        return env

    def start(self, timeout: float = 120) -> None:
        settings = self.state / "user-settings"
        for rel, value in USER_SETTINGS.items():
            path = settings / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        cmd = [
            sys.executable, "-m", "jupyter", "lab", "--no-browser",
            f"--IdentityProvider.token={self.token}", f"--port={self.port}",
            "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.root_dir={self.root}",
            # offline: the server must not ask the internet for news or JupyterLab releases
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            *self.extra_args,
        ]  # fmt: skip
        if os.geteuid() == 0:
            cmd.append("--allow-root")  # CI runs as root
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown ends it and its kernels
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited ({self.proc.returncode}):\n{self.log()}")
            try:
                self.api("GET", "/api/status", timeout=2)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"jupyter lab did not answer within {timeout:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the server's pid
        os.killpg(pgid, signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        try:  # kernels that outlived the server (still in its group)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        """Call the server's REST API with the token; the decoded JSON answer (None if empty)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def shutdown_kernels(self) -> None:
        """Shut down every running kernel (one kernel at a time on a 2-core machine)."""
        for kernel in self.api("GET", "/api/kernels") or []:
            try:
                self.api("DELETE", f"/api/kernels/{kernel['id']}")
            except urllib.error.HTTPError:
                pass

    def url(self, path: str, workspace: str) -> str:
        """The URL opening ``path`` (relative to ``root``) in a fresh, empty workspace."""
        return f"{self.base}/lab/workspaces/{workspace}/tree/{path}?reset&token={self.token}"

    def session_state(self, path: str) -> str | None:
        """The server's view of the kernel of notebook ``path``: ``idle``, ``busy``... or None."""
        for session in self.api("GET", "/api/sessions") or []:
            if session.get("path") == path and session.get("kernel"):
                return session["kernel"].get("execution_state")
        return None


# ---------------------------------------------------------------------------------------------
# The browser console
# ---------------------------------------------------------------------------------------------
# Console messages that are no sign of a problem in JupyterLab or the course. Each entry says why;
# a message is dropped only when one of these patterns matches it.
CONSOLE_NOISE: list[tuple[re.Pattern[str], str]] = []


@dataclass
class Console:
    """Errors a page logged: ``console.error`` messages and uncaught exceptions (``pageerror``),
    each with the stage of the test it happened in."""

    stage: str = "open"
    errors: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def attach(self, page) -> Console:
        page.on("console", self._on_console)
        page.on(
            "pageerror", lambda exc: self._add(f"pageerror: {(str(exc).splitlines() or [''])[0]}")
        )
        return self

    def _on_console(self, msg) -> None:
        if msg.type == "error":  # the first line: a stack trace's frames name minified code
            first = (msg.text.strip().splitlines() or [""])[0]
            where = msg.location.get("url", "") if isinstance(msg.location, dict) else ""
            self._add(f"console.error: {first}" + (f" ({where.split('?')[0]})" if where else ""))

    def _add(self, text: str) -> None:
        if any(pattern.search(text) for pattern, _ in CONSOLE_NOISE):
            self.ignored.append(f"[{self.stage}] {text[:500]}")
        else:
            self.errors.append(f"[{self.stage}] {text[:1500]}")

    def since(self, start: int) -> list[str]:
        return self.errors[start:]


# ---------------------------------------------------------------------------------------------
# JupyterLab gestures
# ---------------------------------------------------------------------------------------------
PANEL = "#jp-main-dock-panel .jp-NotebookPanel:not(.lm-mod-hidden)"
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'


class Lab:
    """One browser page on the server, driven as a user would: menus, toolbar, file browser."""

    def __init__(self, page, server: LabServer, console: Console | None = None):
        self.page = page
        self.server = server
        self.console = console
        self.path: str | None = None
        page.on("dialog", lambda dialog: dialog.accept())  # "leave this page?" on navigation

    # opening and closing ----------------------------------------------------------------------
    def open(self, path: str, workspace: str, timeout: float = 90) -> None:
        """Open notebook ``path`` (relative to the server root) in a fresh workspace and wait
        until its kernel is idle."""
        self.path = path
        self.page.goto(self.server.url(path, workspace), wait_until="domcontentloaded")
        self.page.locator(PANEL).wait_for(timeout=timeout * 1000)
        self.wait_all_cells(timeout)
        self.wait_kernel_idle(timeout)

    def wait_all_cells(self, timeout: float = 90) -> None:
        """JupyterLab adds a long notebook's cells to the page in batches: wait for all."""
        n = len(load(self.server.root / self.path)["cells"])
        self.page.wait_for_function(
            "([sel, n]) => document.querySelectorAll(sel).length >= n",
            arg=[f"{PANEL} .jp-Notebook .jp-Cell", n],
            timeout=timeout * 1000,
        )

    def reopen_from_file_browser(self, timeout: float = 90) -> None:
        """Double-click the notebook in the file browser (it shows the notebook's folder)."""
        name = Path(self.path).name
        self.page.locator(".jp-DirListing-item", has_text=name).first.dblclick()
        self.page.locator(PANEL).wait_for(timeout=timeout * 1000)
        self.wait_all_cells(timeout)
        self.wait_kernel_idle(timeout)

    def close_tab(self, discard: bool = False) -> None:
        """Close the current notebook tab; with ``discard``, answer "Discard" if JupyterLab asks
        about unsaved changes (else that question fails the test)."""
        self.page.locator(".lm-TabBar-tab.jp-mod-current .lm-TabBar-tabCloseIcon").first.click()
        dialog = self.page.locator(".jp-Dialog")
        try:
            dialog.wait_for(timeout=1500)
        except Exception:
            pass
        else:
            text = dialog.inner_text()
            if not discard:
                raise AssertionError(f"closing the notebook asked: {text!r}")
            dialog.get_by_role("button", name=re.compile("Discard|Don.t Save", re.I)).click()
        self.page.locator(PANEL).wait_for(state="detached", timeout=15_000)

    # kernel and execution ---------------------------------------------------------------------
    def kernel_status(self) -> str:
        """The kernel status the status bar shows ("Idle", "Busy", "Connecting"...)."""
        texts = self.page.locator("#jp-main-statusbar .jp-StatusBar-TextItem").all_inner_texts()
        for text in texts:
            if " | " in text:
                return text.rsplit(" | ", 1)[1].strip()
        return ""

    def wait_kernel_idle(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kernel_status() == "Idle" and self.server.session_state(self.path) == "idle":
                return
            time.sleep(0.3)
        raise AssertionError(
            f"the kernel of {self.path} was not idle within {timeout:.0f} s "
            f"(status bar: {self.kernel_status()!r})"
        )

    def menu(self, *labels: str) -> None:
        """Click through the menu bar: ``menu("Run", "Run All Cells")``."""
        top, *items = labels
        self.page.locator(
            ".lm-MenuBar-itemLabel", has_text=re.compile(f"^{re.escape(top)}$")
        ).click()
        for label in items:
            item = self.page.locator(
                ".lm-Menu:not(.lm-mod-hidden) .lm-Menu-itemLabel",
                has_text=re.compile(f"^{re.escape(label)}$"),
            )  # fmt: skip
            item.first.click()

    def cells(self):
        return self.page.locator(f"{PANEL} .jp-Notebook .jp-Cell")

    def cell(self, index: int):
        return self.cells().nth(index)

    def busy_cells(self) -> int:
        return self.page.evaluate(
            """(panel) => [...document.querySelectorAll(panel + ' .jp-Cell .jp-InputPrompt')]
                .filter(e => e.textContent.includes('*')).length""",
            PANEL,
        )

    def run_all(self, timeout: float, poll=None) -> float:
        """Run → Run All Cells, then wait until no cell is queued or running and the kernel is
        idle (in the status bar and on the server) for a moment. ``poll()`` is called about
        four times a second meanwhile. Returns the seconds it took."""
        start = time.monotonic()
        self.menu("Run", "Run All Cells")
        started = quiet_since = None
        while True:
            now = time.monotonic()
            if now - start > timeout:
                raise TimeoutError(
                    f"Run All of {self.path} still running after {timeout:.0f} s "
                    f"({self.busy_cells()} cells queued or running)"
                )
            if poll is not None:
                poll()
            busy = self.busy_cells()
            if busy:
                started, quiet_since = started or now, None
            elif started or now - start > 10:  # (a notebook with nothing to run never starts)
                idle = self.kernel_status() == "Idle"
                if idle and self.server.session_state(self.path) == "idle":
                    quiet_since = quiet_since or now
                    if now - quiet_since > 1.5:
                        return now - start
                else:
                    quiet_since = None
            time.sleep(0.25)

    def save(self) -> None:
        """The toolbar's Save button; waits until the tab is no longer marked as modified."""
        self.page.locator(f"{PANEL} [data-jp-item-name='save'] jp-button").click()
        self.page.wait_for_function(
            "() => !document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty')",
            timeout=30_000,
        )

    def wait_widgets_settled(self, timeout: float = 20) -> None:
        """Widget views are created after the outputs, asynchronously: wait until no output of
        the notebook still says "Loading widget..." (a view that never comes keeps saying so
        and is reported by the caller), then a moment for the last ones to draw."""
        try:
            self.page.wait_for_function(
                """(panel) => ![...document.querySelectorAll(panel + ' .jp-OutputArea-output')]
                    .some(o => o.textContent.startsWith('Loading widget'))""",
                arg=PANEL,
                timeout=timeout * 1000,
            )
        except Exception:  # playwright's TimeoutError: the caller sees what is left
            pass
        time.sleep(1)

    def is_dirty(self) -> bool:
        return self.page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty").count() > 0

    def screenshot(self, name: str, locator=None) -> Path:
        path = ARTIFACTS / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if locator is None:
            self.page.screenshot(path=str(path))
        else:
            locator.screenshot(path=str(path))
        return path


# ---------------------------------------------------------------------------------------------
# What a saved notebook says
# ---------------------------------------------------------------------------------------------
def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb: dict) -> list[tuple[int, dict]]:
    return [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return src if isinstance(src, str) else "".join(src)


def error_outputs(nb: dict) -> list[str]:
    """``cell N: Name: value`` for every error output of the notebook."""
    return [
        f"cell {i}: {out.get('ename')}: {str(out.get('evalue'))[:300]}"
        for i, cell in code_cells(nb)
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]


def not_executed(nb: dict) -> list[int]:
    """Indices of code cells with code that have no execution count."""
    return [
        i for i, cell in code_cells(nb) if source(cell).strip() and not cell.get("execution_count")
    ]


def grade_id(cell: dict) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def explorer_cells(nb: dict) -> list[int]:
    """Cells that display one of ``course.widgets``' explorers."""
    return [i for i, cell in code_cells(nb) if re.search(r"\b\w+_explorer\(", source(cell))]
