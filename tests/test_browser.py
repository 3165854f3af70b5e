"""The course in a real browser: Debian's Chromium, driven by Playwright, on a JupyterLab server
started on a temporary copy of the course (``tests/browser_lab.py``).

a. every student notebook opens (a screenshot of its first screen);
b. every solution notebook runs top to bottom with Run All on the bundled tiny LM, without an
   error output and without a JupyterLab console error;
c. the explorers of ``course.widgets`` render as widgets: after the run, after save / close /
   reopen with the kernel still running, and in a new session after the kernel has stopped;
d. notebook 01's training cell shows a tqdm progress bar while it trains;
e. a failing visible check shows its message in the page;
f. Formgrader lists the assignments;
g. nbgrader's Validate button fails a notebook with a wrong quiz answer and passes the solution.

Screenshots, the server's log and the console errors of every test go to
``test-artifacts/browser/``. Without Chromium or Playwright the module is skipped (outside CI) or
fails (``CI`` set): ``bash .ci/browser-deps`` installs both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field

import browser_lab as bl
import pytest

pytestmark = pytest.mark.browser

MISSING = bl.missing_dependency()
if MISSING and not os.environ.get("CI"):
    pytest.skip(f"browser tests: {MISSING}; install both with `{bl.FIX}`", allow_module_level=True)

RUN_TIMEOUT_S = 420
"""Run All of one solution notebook; the slowest takes about 50 s on an idle 2-core machine."""

WIDGET_NOTEBOOKS = [
    name
    for name in bl.NOTEBOOKS
    if bl.explorer_cells(bl.load(bl.ROOT / "solutions" / name / f"{name}.ipynb"))
]
STAGES = ("after Run All", "reopened, kernel running", "new session, kernel stopped")
CONSOLE_LOG: dict[str, list[str]] = {}


# ---------------------------------------------------------------------------------------------
# Fixtures: one server and one browser for the session, a fresh page per test
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def artifacts():
    shutil.rmtree(bl.ARTIFACTS, ignore_errors=True)
    bl.ARTIFACTS.mkdir(parents=True)
    yield bl.ARTIFACTS
    (bl.ARTIFACTS / "console-errors.json").write_text(json.dumps(CONSOLE_LOG, indent=1))


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory, artifacts):
    if MISSING:  # only under CI: outside it the module was skipped
        pytest.fail(f"browser tests cannot run: {MISSING}; run `{bl.FIX}` first", pytrace=False)
    tmp = tmp_path_factory.mktemp("lab")
    server = bl.LabServer(
        root=bl.copy_course(tmp / "course"), state=tmp / "state", log_path=artifacts / "lab.log"
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser(tmp_path_factory, lab_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(bl.CHROMIUM),
            headless=True,
            args=bl.LAUNCH_ARGS,
            viewport=bl.VIEWPORT,
        )
        context.set_default_timeout(60_000)
        yield context
        context.close()


@pytest.fixture
def lab(request, browser, lab_server):
    """A new page on the server, its console watched; afterwards its console errors are kept
    and every kernel is shut down (one kernel at a time on a small machine)."""
    page = browser.new_page()
    console = bl.Console().attach(page)
    yield bl.Lab(page, lab_server, console)
    CONSOLE_LOG[request.node.name] = console.errors
    page.close()
    lab_server.shutdown_kernels()


# ---------------------------------------------------------------------------------------------
# a. Every student notebook opens
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", bl.NOTEBOOKS)
def test_student_notebook_opens(lab, name):
    path = f"notebooks/{name}/{name}.ipynb"
    nb = bl.load(lab.server.root / path)
    lab.open(path, f"open-{name}")
    assert lab.cells().count() == len(nb["cells"]), "JupyterLab shows another number of cells"
    title = bl.source(nb["cells"][0]).splitlines()[0].lstrip("# ").strip()
    heading = lab.cell(0).locator("h1")
    assert heading.is_visible() and title in heading.inner_text()
    assert lab.page.locator(".jp-Dialog").count() == 0, lab.page.locator(".jp-Dialog").inner_text()
    time.sleep(0.5)  # let the last fonts and math settle for the picture
    lab.screenshot(f"a-{name}-first-screen")
    assert lab.console.errors == [], "JupyterLab console errors:\n" + "\n".join(lab.console.errors)


# ---------------------------------------------------------------------------------------------
# b, c, d. Each solution notebook runs once (Run All); the tests read what that run recorded
# ---------------------------------------------------------------------------------------------
@dataclass
class WidgetView:
    cell: int
    rendered: bool
    text: str
    figure: bool
    screenshot: str


@dataclass
class SolutionRun:
    name: str
    seconds: float = 0.0
    error: str | None = None  # the run itself failed (timeout, lost page)
    widget_error: str | None = None  # looking at the widgets failed (close, reopen)
    error_outputs: list[str] = field(default_factory=list)
    not_executed: list[int] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    progress: list[str] = field(default_factory=list)  # what the training cell's bar showed
    progress_cell: int | None = None
    views: dict[str, list[WidgetView]] = field(default_factory=dict)
    broken_widgets: dict[str, list[tuple[int, str]]] = field(default_factory=dict)


class SolutionRuns:
    """Runs each solution notebook at most once per session, on demand."""

    def __init__(self, browser, server):
        self.browser, self.server, self.done = browser, server, {}

    def get(self, name: str) -> SolutionRun:
        if name not in self.done:
            self.done[name] = self._run(name)
        return self.done[name]

    def _run(self, name: str) -> SolutionRun:
        run = SolutionRun(name)
        page = self.browser.new_page()
        console = bl.Console(stage=STAGES[0]).attach(page)
        lab = bl.Lab(page, self.server, console)
        path = f"solutions/{name}/{name}.ipynb"
        nb = bl.load(self.server.root / path)
        run.progress_cell = training_cell(nb) if name.startswith("01_") else None
        try:
            lab.open(path, f"run-{name}")
            run.seconds = lab.run_all(RUN_TIMEOUT_S, poll=lambda: watch_progress(lab, run))
            lab.screenshot(f"b-{name}-after-run-all")
            run.stderr = [t[:300] for t in lab.page.locator(bl.STDERR).all_text_contents()]
            lab.save()
            saved = bl.load(self.server.root / path)
            run.error_outputs = bl.error_outputs(saved)
            run.not_executed = bl.not_executed(saved)
        except Exception as exc:  # recorded; each test reports it
            run.error = f"{type(exc).__name__}: {exc}"
            snapshot(lab, f"b-{name}-failure")
        try:
            explorers = [] if run.error else bl.explorer_cells(saved)
            if explorers:
                self._widgets(lab, run, explorers, console)
        except Exception as exc:
            run.widget_error = f"{console.stage}: {type(exc).__name__}: {exc}"
            snapshot(lab, f"c-{name}-failure")
        finally:
            run.console = list(console.errors)
            CONSOLE_LOG[f"run {name}"] = run.console
            summary = bl.ARTIFACTS / f"b-{name}-run.json"
            summary.write_text(json.dumps(dataclasses.asdict(run), indent=1, ensure_ascii=False))
            page.close()
            self.server.shutdown_kernels()
        return run

    def _widgets(self, lab, run, explorers, console) -> None:
        """Look at the explorers after the run, after close and reopen with the kernel running,
        and after the kernel has stopped, in a new page (a new JupyterLab session)."""
        name = run.name
        for stage in STAGES:
            console.stage = stage
            if stage == STAGES[1]:
                lab.close_tab(discard=True)  # (the file stays as saved after the run)
                lab.reopen_from_file_browser()
            elif stage == STAGES[2]:
                self.server.shutdown_kernels()
                lab.close_tab(discard=True)
                lab.open(lab.path, f"reopen-{name}")
            lab.wait_widgets_settled()
            slug = {STAGES[0]: "run", STAGES[1]: "reopened", STAGES[2]: "new-session"}[stage]
            run.views[stage] = [
                look_at_explorer(lab, i, f"c-{name}-cell{i}-{slug}") for i in explorers
            ]
            run.broken_widgets[stage] = broken_widget_outputs(lab)


def snapshot(lab: bl.Lab, name: str) -> None:
    """A screenshot of the page as it was when something failed, if the page still answers."""
    try:
        lab.screenshot(name)
    except Exception:
        pass


def training_cell(nb: dict) -> int:
    """Notebook 01's cell that trains the prompt (it calls ``train_prompt("text")``)."""
    for i, cell in bl.code_cells(nb):
        if 'train_prompt("text")' in bl.source(cell) and "def train_prompt" not in bl.source(cell):
            return i
    raise AssertionError('notebook 01 has no cell calling train_prompt("text")')


def watch_progress(lab: bl.Lab, run: SolutionRun) -> None:
    """While Run All runs: note every state of a progress bar in the training cell's output."""
    if run.progress_cell is None:
        return
    # text_content, not inner_text: the cell may be off screen, where the page is not laid out
    out = lab.cell(run.progress_cell).locator(".jp-OutputArea-output")
    bar = out.filter(has=lab.page.locator(".widget-hprogress"))
    seen = None
    if bar.count():  # tqdm's widget: "text:  40% 32/80 [00:09<00:14, 3.5it/s, loss=0.9]"
        seen = " ".join((bar.first.text_content() or "").split())
    else:  # a text bar (tqdm without ipywidgets) on stderr: "text:  40%|████      | 32/80"
        for text in out.all_text_contents():
            if re.search(r"\d+%\|", text):
                seen = text.strip().splitlines()[-1]
    if seen and seen not in run.progress:
        if not run.progress:
            lab.screenshot(f"d-{run.name}-progress-bar", out.first)
        run.progress.append(seen)


def look_at_explorer(lab: bl.Lab, index: int, shot: str) -> WidgetView:
    """Whether cell ``index`` shows its explorer as a widget (controls rendered by the widget
    manager) with a figure, and a screenshot of it."""
    cell = lab.cell(index)
    cell.scroll_into_view_if_needed()
    outputs = cell.locator(".jp-OutputArea")
    # what the widget outputs show (they carry no MIME type attribute, unlike text and images)
    widget_texts = cell.locator(".jp-OutputArea-output:not([data-mime-type])").all_text_contents()
    text = " ".join(" ".join(widget_texts).split())[:400]
    controls = cell.locator(
        ".jupyter-widgets.widget-container "
        ":is(.widget-slider, .widget-dropdown, .widget-toggle-buttons)"
    )
    rendered = controls.count() > 0 and "Error displaying widget" not in text
    rendered = rendered and not re.search(r"\b(VBox|HBox|interactive)\(", text)
    figure = cell.locator(".jp-OutputArea-output img").count() > 0
    path = lab.screenshot(shot, outputs)
    return WidgetView(index, rendered, text, figure, path.name)


def broken_widget_outputs(lab: bl.Lab) -> list[tuple[int, str]]:
    """``(cell index, text)`` of every output in the notebook that failed to show its widget."""
    found = lab.page.evaluate(
        """(panel) => [...document.querySelectorAll(panel + ' .jp-Notebook .jp-Cell')]
            .flatMap((cell, i) => [...cell.querySelectorAll('.jp-OutputArea-output')]
                .filter(o => o.textContent.startsWith('Error displaying widget'))
                .map(o => [i, o.textContent]))""",
        bl.PANEL,
    )
    return [(int(i), text) for i, text in found]


@pytest.fixture(scope="session")
def solution_runs(browser, lab_server):
    return SolutionRuns(browser, lab_server)


@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
@pytest.mark.parametrize("name", bl.NOTEBOOKS)
def test_solution_runs_in_browser(solution_runs, name):
    run = solution_runs.get(name)
    assert run.error is None, f"Run All of {name} did not complete: {run.error}"
    problems = []
    if run.error_outputs:
        problems.append("error outputs:\n  " + "\n  ".join(run.error_outputs))
    if run.not_executed:
        problems.append(f"code cells that never ran: {run.not_executed}")
    console = [e for e in run.console if e.startswith(f"[{STAGES[0]}]")]
    if console:
        problems.append("JupyterLab console errors:\n  " + "\n  ".join(console))
    assert not problems, f"{name} ({run.seconds:.0f} s): " + "\n".join(problems)


@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", WIDGET_NOTEBOOKS)
def test_explorers_render_as_widgets(solution_runs, name, stage):
    run = solution_runs.get(name)
    assert run.error is None, f"Run All of {name} did not complete: {run.error}"
    assert stage in run.views, f"{name}: could not look at the widgets: {run.widget_error}"
    problems = [
        f"cell {v.cell} (explorer): "
        + ("controls are widgets" if v.rendered else f"controls NOT widgets: {v.text[:120]!r}")
        + (", figure shown" if v.figure else ", NO figure")
        for v in run.views[stage]
        if not (v.rendered and v.figure)
    ]
    explorers = {v.cell for v in run.views[stage]}
    others = [(i, text) for i, text in run.broken_widgets[stage] if i not in explorers]
    problems += [f"cell {i} (not an explorer): {text}" for i, text in others]
    console = [e for e in run.console if e.startswith(f"[{stage}]")]
    problems += [f"console: {e}" for e in console]
    hints = []
    if others:
        hints.append(
            "a widget closed by the kernel (a tqdm bar with leave=False hides itself that way) "
            "stays in the saved notebook as a view of a model that no longer exists"
        )
    if stage == STAGES[2] and problems:
        hints.append(
            "after the kernel has stopped a widget comes back only from the widget state saved "
            "in the notebook, which JupyterLab writes only with the setting "
            "@jupyter-widgets/jupyterlab-manager:plugin saveState = true"
        )
    assert not problems, (
        f"{name}, {stage}:\n  " + "\n  ".join(problems) + "".join(f"\n({h})" for h in hints)
    )


@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
def test_training_cell_shows_a_progress_bar(solution_runs):
    name = next(n for n in bl.NOTEBOOKS if n.startswith("01_"))
    run = solution_runs.get(name)
    assert run.error is None, f"Run All of {name} did not complete: {run.error}"
    assert run.progress, (
        f"no tqdm progress bar appeared in the output of {name}'s training cell "
        f"(cell {run.progress_cell}) while it ran"
    )


# ---------------------------------------------------------------------------------------------
# e. A failing visible check shows its message
# ---------------------------------------------------------------------------------------------
WRONG_COUNT = """def count_parameters_by_group(model: torch.nn.Module) -> dict[str, int]:
    # deliberately wrong: state_dict() lists GPT-2's tied lm_head / wte tensor twice
    counts = {group: 0 for group in GROUPS}
    for name, tensor in model.state_dict().items():
        for group, keys in GROUPS.items():
            if any(key in name for key in keys):
                counts[group] += tensor.numel()
                break
    counts["total"] = sum(counts.values())
    return counts
"""


@pytest.mark.timeout(300)
def test_failing_check_shows_its_message(lab):
    name = next(n for n in bl.NOTEBOOKS if n.startswith("00_"))
    nb = bl.load(bl.ROOT / "notebooks" / name / f"{name}.ipynb")  # as released
    index = {bl.grade_id(c): i for i, c in enumerate(nb["cells"])}
    nb["cells"][index["count_parameters_by_group"]]["source"] = WRONG_COUNT
    check = index["test_count_parameters_by_group"]
    path = f"scratch/wrong-count/{name}.ipynb"
    (lab.server.root / path).parent.mkdir(parents=True)
    (lab.server.root / path).write_text(json.dumps(nb))

    lab.open(path, "failing-check")
    lab.run_all(RUN_TIMEOUT_S)  # stops at the failing check
    output = lab.cell(check).locator(".jp-OutputArea-output")
    output.first.scroll_into_view_if_needed()
    lab.screenshot("e-failing-check", lab.cell(check))
    text = " ".join(output.all_text_contents())
    assert "AssertionError" in text, f"the check cell shows no AssertionError: {text[:500]!r}"
    assert "listed once by named_parameters() but twice by state_dict()" in text, text[:800]
    message = lab.cell(check).get_by_text(re.compile("listed once by named_parameters"))
    assert message.first.is_visible()
    assert lab.console.errors == [], "JupyterLab console errors:\n" + "\n".join(lab.console.errors)


# ---------------------------------------------------------------------------------------------
# f. Formgrader lists the assignments
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_formgrader_lists_assignments(lab):
    lab.page.goto(f"{lab.server.base}/lab/workspaces/formgrader?reset&token={lab.server.token}")
    lab.page.locator("#jp-main-dock-panel").wait_for()
    lab.menu("Nbgrader", "Formgrader")
    frame = lab.page.frame_locator("iframe").first
    for name in bl.NOTEBOOKS:
        frame.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
    lab.screenshot("f-formgrader")
    assert lab.console.errors == [], "console errors:\n" + "\n".join(lab.console.errors)


# ---------------------------------------------------------------------------------------------
# g. nbgrader's Validate button
# ---------------------------------------------------------------------------------------------
def validate(lab: bl.Lab, path: str, shot: str) -> tuple[bool, str]:
    """Open ``path``, press the toolbar's Validate button; (passed, the dialog's text)."""
    lab.open(path, f"validate-{shot}")
    button = lab.page.locator(f"{bl.PANEL} .validate-button")
    assert button.count() == 1, "the notebook toolbar has no Validate button"
    button.click()
    dialog = lab.page.locator(".jp-Dialog", has_text="Validation Results")
    dialog.wait_for(timeout=240_000)
    lab.screenshot(shot)
    body = dialog.locator(".jp-Dialog-body")
    text = body.inner_text()
    passed = body.locator(".validation-success").count() > 0 or "Success!" in text
    dialog.get_by_role("button", name=re.compile("Ok", re.I)).click()
    return passed, text


@pytest.fixture
def quiz_copies(lab_server):
    """Copies of solution 00: as it is, and with a wrong answer to its first quiz question."""
    from autograder import answers

    name = next(n for n in bl.NOTEBOOKS if n.startswith("00_"))
    src = bl.ROOT / "solutions" / name / f"{name}.ipynb"  # not the copy another test ran
    nb = bl.load(src)
    cell = next(c for c in nb["cells"] if bl.grade_id(c) == "answer_q1")
    wrong = next(x for x in "abcd" if not answers.is_correct("nb00_q1", x))
    good = bl.source(cell)
    cell["source"] = re.sub(r'answer_q1 = "[a-d]"', f'answer_q1 = "{wrong}"', good)
    assert cell["source"] != good
    paths = {}
    for kind, content in (("wrong", nb), ("solution", None)):
        rel = f"scratch/validate-{kind}/{name}.ipynb"
        (lab_server.root / rel).parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            shutil.copy2(src, lab_server.root / rel)
        else:
            (lab_server.root / rel).write_text(json.dumps(content))
        paths[kind] = rel
    return paths


@pytest.mark.timeout(420)
def test_validate_fails_on_a_wrong_quiz_answer(lab, quiz_copies):
    passed, text = validate(lab, quiz_copies["wrong"], "g-validate-wrong-answer")
    assert not passed, f"Validate passed a notebook with a wrong answer to nb00_q1:\n{text}"
    assert "nb00_q1" in text or "test_q1" in text or "AssertionError" in text, text


@pytest.mark.timeout(420)
def test_validate_passes_the_solution(lab, quiz_copies):
    passed, text = validate(lab, quiz_copies["solution"], "g-validate-solution")
    assert passed, f"Validate failed the solution:\n{text}"
