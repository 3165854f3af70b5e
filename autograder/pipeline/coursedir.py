"""Where the course's folders are, how its nbgrader config is loaded, and the grading environment.

A course root holds ``nbgrader_config.py``, ``solutions/NN_name/NN_name.ipynb`` (instructor
sources) and ``notebooks/NN_name/`` (student releases). nbgrader itself only reads the config
from the current directory; here it is loaded explicitly, so every command works from anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nbgrader
from nbgrader.api import Gradebook
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository that holds the ``course`` and ``autograder`` packages grading kernels import."""

ARTIFACT_PATTERNS = ("*.pt", "*.pth", "*.safetensors", "*.bin", "*.backbone.json")
"""Files a notebook run saves (trained prompts, prefixes): never released, never overwritten."""

CONFIG_NAME = "nbgrader_config.py"


class CourseError(Exception):
    """A problem with the course layout or the command line, worded for the instructor."""


def names_assignment(name: str, assignment: str) -> bool:
    """Whether ``name`` (``"01"`` or ``"01_prompt_tuning"``) refers to ``assignment``."""
    return name in (assignment, assignment.split("_", 1)[0])


def is_artifact(path: Path) -> bool:
    """Whether ``path`` is a saved training artifact (see :data:`ARTIFACT_PATTERNS`)."""
    return any(path.match(pattern) for pattern in ARTIFACT_PATTERNS)


@dataclass(frozen=True)
class Course:
    """A course root and the folders nbgrader uses under it."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> Course:
        """The course at ``root``; raises :class:`CourseError` if it is not one."""
        path = Path(root).resolve()
        if not path.is_dir():
            raise CourseError(f"course root {path} does not exist")
        if not (path / CONFIG_NAME).is_file():
            raise CourseError(f"{path} has no {CONFIG_NAME}: is it the course root?")
        if not (path / "solutions").is_dir():
            raise CourseError(f"{path} has no solutions/ folder")
        return cls(path)

    @property
    def solutions(self) -> Path:
        """Instructor source notebooks, one folder per assignment."""
        return self.root / "solutions"

    @property
    def notebooks(self) -> Path:
        """Generated student notebooks, one folder per assignment."""
        return self.root / "notebooks"

    @property
    def state(self) -> Path:
        """Git-ignored working folder: the gradebook and scratch space."""
        return self.root / ".nbgrader"

    @property
    def submitted(self) -> Path:
        """nbgrader's ``submitted/<student>/<assignment>/`` folder."""
        return self.root / "submitted"

    @property
    def autograded(self) -> Path:
        """nbgrader's ``autograded/<student>/<assignment>/`` folder."""
        return self.root / "autograded"

    @property
    def feedback(self) -> Path:
        """nbgrader's ``feedback/<student>/<assignment>/`` folder."""
        return self.root / "feedback"

    def assignments(self) -> list[str]:
        """Assignment ids: the folders of ``solutions/`` that contain a notebook, sorted."""
        return sorted(
            d.name
            for d in self.solutions.iterdir()
            if d.is_dir() and not d.name.startswith(".") and any(d.glob("*.ipynb"))
        )

    def resolve(self, selected: Sequence[str] | None) -> list[str]:
        """Full ids for ``selected`` (``"01"`` or ``"01_prompt_tuning"``); all if None or empty."""
        known = self.assignments()
        if not known:
            raise CourseError(f"no assignments: {self.solutions} has no NN_name/NN_name.ipynb")
        if not selected:
            return known
        resolved = []
        for name in selected:
            matches = [a for a in known if names_assignment(name, a)]
            if len(matches) != 1:
                raise CourseError(f"unknown assignment {name!r}; known: {', '.join(known)}")
            resolved.append(matches[0])
        return resolved

    def source_notebooks(self, assignment: str) -> list[Path]:
        """The instructor notebooks of ``assignment``, sorted."""
        return sorted((self.solutions / assignment).glob("*.ipynb"))

    @property
    def db_url(self) -> str:
        """The gradebook, ``.nbgrader/gradebook.db``; several processes may write it at once."""
        return f"sqlite:///{self.state / 'gradebook.db'}?timeout=60"

    def config(self) -> Config:
        """The course's ``nbgrader_config.py``, root and gradebook pinned to this course."""
        config = PyFileConfigLoader(CONFIG_NAME, path=str(self.root)).load_config()
        config.CourseDirectory.root = str(self.root)
        config.CourseDirectory.db_url = self.db_url
        config.NbGraderAPI.log_level = logging.WARNING
        _ensure_gradebook(self.state / "gradebook.db", config.CourseDirectory.get("course_id", ""))
        return config

    def gradebook(self) -> Gradebook:
        """An open gradebook (use it as a context manager)."""
        config = self.config()
        return Gradebook(self.db_url, config.CourseDirectory.get("course_id", ""))


def _ensure_gradebook(path: Path, course_id: str) -> None:
    """Create the gradebook at ``path`` if missing, from a cached empty one.

    nbgrader asks ``alembic heads`` (a subprocess, several seconds) for every new gradebook; the
    empty gradebook it makes is cached once per nbgrader version under this repository's
    ``.nbgrader/`` and copied from then on.
    """
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    template = REPO_ROOT / ".nbgrader" / f"empty-gradebook-{nbgrader.__version__}.db"
    if not template.exists():
        template.parent.mkdir(exist_ok=True)
        fresh = template.with_suffix(f".{os.getpid()}.tmp")
        Gradebook(f"sqlite:///{fresh}", course_id="").close()
        os.replace(fresh, template)
    shutil.copyfile(template, path)
    with Gradebook(f"sqlite:///{path}", course_id):
        pass  # records the course id, as nbgrader would


def prepare_environment(course: Course) -> None:
    """Set up this process so nbgrader and its grading kernels work from any directory.

    ``alembic`` (needed when a gradebook is created) sits next to this Python; kernels must
    import ``course`` and ``autograder`` from this repository. (Warnings and progress bars are
    switched off in the grading kernels' own environment: ``sandbox.GRADING_ENV``.)
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if bin_dir not in path:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *path])
    python_path = [str(REPO_ROOT), str(course.root)]
    python_path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(python_path))
    for entry in (str(course.root), str(REPO_ROOT)):
        if entry not in sys.path:
            sys.path.insert(0, entry)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the body with ``path`` as the current directory (nbgrader resolves paths from it)."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr, and those of the kernels it starts, to ``log``.

    nbgrader, nbclient and the kernels print warnings and progress that an instructor's terminal
    and a test's stderr should not show; they stay readable in the log.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("a", encoding="utf-8") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
