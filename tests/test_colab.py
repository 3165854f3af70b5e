"""The Colab path: the install source comes from ``[tool.soft-prompts-course]`` in pyproject.toml,
``release`` writes it (and a badge) into every notebook, and the install cell says what to do
when the source is unset or does not work."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from autograder.pipeline import colab
from autograder.pipeline.coursedir import REPO_ROOT, CourseError

TAGGED = "git+https://github.com/acme-univ/soft-prompts@v2.0"


def _pyproject(tmp_path: Path, install: str) -> Path:
    (tmp_path / "pyproject.toml").write_text(f'[tool.soft-prompts-course]\ninstall = "{install}"\n')
    return tmp_path


def test_settings_accept_pinned_requirements_and_refuse_the_rest(tmp_path: Path) -> None:
    assert colab.settings(tmp_path) == colab.Settings("")  # no pyproject: unset
    for good in (
        "soft-prompts-course==0.1.0",
        TAGGED,
        "https://example.org/x-0.1-py3-none-any.whl",
    ):
        assert colab.settings(_pyproject(tmp_path, good)).install == good
    assert colab.settings(_pyproject(tmp_path, TAGGED)).colab_repo == (
        "acme-univ/soft-prompts",
        "v2.0",
    )
    for bad, says in (
        ("git+https://github.com/acme-univ/soft-prompts", "names no tag or commit"),
        ("pip install it", "is not a pip requirement"),
    ):
        with pytest.raises(CourseError, match=says):
            colab.settings(_pyproject(tmp_path, bad))
    (tmp_path / "pyproject.toml").write_text('[tool.soft-prompts-course]\ninstal = "x"\n')
    with pytest.raises(CourseError, match="unknown .* keys \\['instal'\\]"):
        colab.settings(tmp_path)


def test_the_repository_notebooks_carry_the_configured_source() -> None:
    wanted = colab.setup_source(colab.settings(REPO_ROOT).install).rstrip("\n")
    for folder in ("solutions", "notebooks"):
        for path in sorted((REPO_ROOT / folder).glob("*/*.ipynb")):
            nb = nbformat.read(path, as_version=4)
            setup = [
                c
                for c in nb.cells
                if c.metadata.get("nbgrader", {}).get("grade_id") == colab.SETUP_ID
            ]
            assert [c.source for c in setup] == [wanted], path
            assert "soft-prompts-course/soft-prompts-course" not in path.read_text(), path


def test_a_tagged_git_source_adds_a_badge_and_unsetting_it_removes_it() -> None:
    nb = nbformat.read(
        REPO_ROOT / "solutions/01_prompt_tuning/01_prompt_tuning.ipynb", as_version=4
    )
    cells = len(nb.cells)
    assert colab.sync_notebook(
        nb, colab.Settings(TAGGED), "01_prompt_tuning", "01_prompt_tuning.ipynb"
    )
    assert len(nb.cells) == cells + 1 and nb.cells[0].id == "colab-badge"
    assert (
        "https://colab.research.google.com/github/acme-univ/soft-prompts/blob/v2.0/notebooks/"
        "01_prompt_tuning/01_prompt_tuning.ipynb" in nb.cells[0].source
    )
    assert (
        'COURSE_INSTALL = "git+https://github.com/acme-univ/soft-prompts@v2.0"'
        in nb.cells[3].source
    )
    assert not colab.sync_notebook(
        nb, colab.Settings(TAGGED), "01_prompt_tuning", "01_prompt_tuning.ipynb"
    )
    assert colab.sync_notebook(nb, colab.Settings(""), "01_prompt_tuning", "01_prompt_tuning.ipynb")
    assert len(nb.cells) == cells and 'COURSE_INSTALL = ""' in nb.cells[2].source


def test_release_check_finds_solutions_out_of_line_with_the_setting(tmp_path: Path) -> None:
    solutions = tmp_path / "solutions" / "01_prompt_tuning"
    solutions.mkdir(parents=True)
    source = REPO_ROOT / "solutions/01_prompt_tuning/01_prompt_tuning.ipynb"
    (solutions / source.name).write_text(source.read_text())
    _pyproject(tmp_path, TAGGED)
    problems = colab.sync_solutions(
        tmp_path, tmp_path / "solutions", ["01_prompt_tuning"], check=True
    )
    assert problems == [
        "stale: solutions/01_prompt_tuning/01_prompt_tuning.ipynb: its install cell or Colab badge "
        "does not match [tool.soft-prompts-course] in pyproject.toml"
    ]
    assert (
        colab.sync_solutions(tmp_path, tmp_path / "solutions", ["01_prompt_tuning"], check=False)
        == []
    )
    assert (
        colab.sync_solutions(tmp_path, tmp_path / "solutions", ["01_prompt_tuning"], check=True)
        == []
    )


def _run_setup_cell(tmp_path: Path, install: str, in_colab: bool) -> subprocess.CompletedProcess:
    """The install cell, run where the course is not importable (``python -S`` from an empty
    folder), with or without a stand-in ``google.colab`` module."""
    fake = "import sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab')\n"
    code = (fake if in_colab else "") + colab.setup_source(install)
    script = tmp_path / "cell.py"
    script.write_text(code)
    return subprocess.run(  # -I: no PYTHONPATH (grading tests put the course there), -S: no site
        [sys.executable, "-I", "-S", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("install", "in_colab", "says"),
    [
        ("", False, "ModuleNotFoundError: the course package is not installed for"),
        ("", True, "ModuleNotFoundError: no install source: upload the course wheel"),
        (
            "/nonexistent/soft_prompts_course-9.9-py3-none-any.whl",
            True,
            "RuntimeError: could not install the course from /nonexistent/",
        ),
    ],
)
def test_the_install_cell_names_the_fix(
    tmp_path: Path, install: str, in_colab: bool, says: str
) -> None:
    done = _run_setup_cell(tmp_path, install, in_colab)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(says), textwrap.shorten(done.stderr, 400)
