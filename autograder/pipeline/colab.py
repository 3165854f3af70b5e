"""Where students install the course from (Colab), written into every notebook by ``release``.

The course's ``pyproject.toml`` holds the setting, set by whoever publishes the course::

    [tool.soft-prompts-course]
    install = "git+https://github.com/ORG/soft-prompts-course@v0.1.0"   # or a wheel URL, a name

``python -m autograder release`` writes it into the first setup cell of every notebook (the
instructor's source in ``solutions/`` first, so that nbgrader's own "Generate" agrees) and, when
the requirement is a GitHub git URL, adds an "Open in Colab" badge above the title, opening the
released notebook at the same tag. With no setting the cell installs a wheel the student uploaded
(``python -m autograder package`` builds it) and says so; nothing points at an invented address.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat.notebooknode import NotebookNode

from autograder.pipeline.coursedir import CourseError

__all__ = [
    "SETUP_ID",
    "Settings",
    "badge_markdown",
    "settings",
    "setup_source",
    "sync_notebook",
    "sync_solutions",
]

SETUP_ID = "setup_install"
"""The grade id of the cell that installs the course."""
BADGE_MARK = "<!-- colab-badge: written by `python -m autograder release` -->"
WHEEL_GLOB = "soft_prompts_course-*.whl"
_GITHUB = re.compile(
    r"^git\+https://github\.com/(?P<repo>[\w.-]+/[\w.-]+?)(?:\.git)?@(?P<ref>[\w./-]+)$"
)


@dataclass(frozen=True)
class Settings:
    """``[tool.soft-prompts-course]``: ``install`` is a pip requirement or ``""`` (unset)."""

    install: str = ""

    @property
    def colab_repo(self) -> tuple[str, str] | None:
        """``(owner/repo, ref)`` when ``install`` is a GitHub git URL pinned to a ref."""
        match = _GITHUB.match(self.install)
        return (match["repo"], match["ref"]) if match else None


def _validate(install: str, where: Path) -> str:
    install = install.strip()
    if not install:
        return ""
    url = install.startswith(("git+https://", "https://")) and " " not in install
    if url and install.startswith("git+") and "@" not in install.split("://", 1)[1]:
        raise CourseError(
            f"{where}: [tool.soft-prompts-course] install = {install!r} names no tag or commit; "
            "pin it (…/repo@v0.1.0) so every student installs the same course"
        )
    if url:
        return install
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        if not Requirement(install).url:
            return install
    except InvalidRequirement:
        pass
    raise CourseError(
        f"{where}: [tool.soft-prompts-course] install = {install!r} is not a pip requirement; "
        'use a package name ("soft-prompts-course==0.1.0"), a git URL with a tag '
        '("git+https://github.com/ORG/REPO@v0.1.0") or a wheel URL ("https://…/x.whl")'
    )


def settings(root: Path) -> Settings:
    """The course's ``[tool.soft-prompts-course]`` (``root/pyproject.toml``); unset if absent."""
    path = Path(root) / "pyproject.toml"
    if not path.is_file():
        return Settings()
    try:
        table = tomllib.loads(path.read_text()).get("tool", {}).get("soft-prompts-course", {})
    except tomllib.TOMLDecodeError as err:
        raise CourseError(f"{path}: not valid TOML ({err})") from None
    unknown = sorted(set(table) - {"install"})
    if unknown:
        raise CourseError(f"{path}: unknown [tool.soft-prompts-course] keys {unknown}")
    return Settings(install=_validate(str(table.get("install", "")), path))


def setup_source(install: str) -> str:
    """The source of every notebook's first setup cell, installing from ``install``."""
    return f"""# Setup 1/2: in Colab, installs the course; elsewhere, checks it is installed.
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

COURSE_INSTALL = {json.dumps(install)}  # written by the course's `python -m autograder release`
if importlib.util.find_spec("course") is None:
    if "google.colab" not in sys.modules:
        raise ModuleNotFoundError(
            f"the course package is not installed for {{sys.executable}}: install it "
            "(README: Installing), or pick the kernel of the environment that has it"
        )
    uploaded = sorted(Path.cwd().glob({json.dumps(WHEEL_GLOB)}))
    source = str(uploaded[-1]) if uploaded else COURSE_INSTALL
    if not source:
        raise ModuleNotFoundError(
            "no install source: upload the course wheel ({WHEEL_GLOB}, from your "
            "instructor or `python -m autograder package`) in the Files pane, run this cell again"
        )
    print(f"installing the course from {{source}} ...")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", source], capture_output=True, text=True
    )
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise RuntimeError(
            f"could not install the course from {{source}} ({{why}}); check the address with "
            "your instructor, or upload the course wheel in the Files pane and run this cell again"
        )
    importlib.invalidate_caches()
"""


def badge_markdown(settings: Settings, assignment: str, notebook: str) -> str | None:
    """The "Open in Colab" badge of a released notebook, or None when the install source is not
    a GitHub git URL (then nothing says where the released notebooks are)."""
    where = settings.colab_repo
    if where is None:
        return None
    repo, ref = where
    url = f"https://colab.research.google.com/github/{repo}/blob/{ref}/notebooks/{assignment}/{notebook}"
    badge = "https://colab.research.google.com/assets/colab-badge.svg"
    return f"{BADGE_MARK}\n[![Open In Colab]({badge})]({url})"


def sync_notebook(nb: NotebookNode, settings: Settings, assignment: str, name: str) -> bool:
    """Write the install cell and the badge into ``nb``; return whether anything changed."""
    changed = False
    setup = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == SETUP_ID]
    if len(setup) > 1:
        raise CourseError(f"{assignment}/{name}: more than one cell has grade id {SETUP_ID!r}")
    want = setup_source(settings.install).rstrip("\n")
    if setup and setup[0].source != want:
        setup[0].source, changed = want, True
    badges = [i for i, c in enumerate(nb.cells) if c.source.startswith(BADGE_MARK)]
    badge = badge_markdown(settings, assignment, name)
    if badge is None:
        for index in reversed(badges):
            del nb.cells[index]
            changed = True
    elif badges != [0] or nb.cells[0].source != badge:
        for index in reversed(badges):
            del nb.cells[index]
        cell = nbformat.v4.new_markdown_cell(badge)
        cell.id = "colab-badge"  # fixed: a release depends only on the solutions and settings
        nb.cells.insert(0, cell)
        changed = True
    return changed


def sync_solutions(root: Path, solutions: Path, assignments: list[str], check: bool) -> list[str]:
    """Bring the install cell and badge of each notebook in ``solutions/`` in line with the
    course's settings. Writes them (returns ``[]``), or with ``check`` returns one line per
    notebook that is out of line."""
    wanted = settings(root)
    problems = []
    for assignment in assignments:
        for path in sorted((solutions / assignment).glob("*.ipynb")):
            nb = nbformat.read(path, as_version=4)
            if not sync_notebook(nb, wanted, assignment, path.name):
                continue
            if check:
                problems.append(
                    f"stale: solutions/{assignment}/{path.name}: its install cell or Colab badge "
                    "does not match [tool.soft-prompts-course] in pyproject.toml"
                )
            else:
                path.write_text(nbformat.writes(nb) + "\n")
    return problems
