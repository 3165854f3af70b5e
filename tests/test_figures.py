"""course.figures: every figure draws, the committed SVG files are current, and what the
notebooks show exists."""

from __future__ import annotations

import base64
import json
import re
import shutil
import tomllib
import xml.etree.ElementTree as ET
from fnmatch import fnmatch
from pathlib import Path

import matplotlib
import pytest
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from course import figures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, Path]:
    """Every figure drawn now, into a temporary folder."""
    folder = tmp_path_factory.mktemp("figures")
    return {path.stem: path for path in figures.write(folder)}


@pytest.mark.parametrize("name", list(figures.FIGURES))
def test_figure_draws_something(name):
    fig = figures.draw(name)
    texts = [t for t in fig.findobj(Text) if t.get_text()]
    cells = fig.findobj(Rectangle)
    assert len(texts) >= 10 and len(cells) >= 10, f"{name}: {len(texts)} texts, {len(cells)} cells"
    width, height = fig.get_size_inches()
    assert 8 <= width <= 9 and 2 <= height <= 9, f"{name}: {width} x {height} in"


@pytest.mark.parametrize("name", list(figures.FIGURES))
def test_committed_figure_is_current(name, fresh):
    committed = figures.figure_path(name)
    reason = figures.stale_reason(name, committed, fresh[name])
    assert reason is None, f"{reason}: run `python -m course.figures --write`"
    root = ET.parse(committed).getroot()
    assert root.tag.endswith("svg") and float(root.get("width").removesuffix("pt")) > 0


def test_rendering_is_byte_stable(fresh, tmp_path):
    again = figures.write(tmp_path, ["tenant_gather"])[0]
    assert again.read_bytes() == fresh["tenant_gather"].read_bytes()


def test_drawing_leaves_the_callers_style_alone():
    before = matplotlib.rcParams["svg.hashsalt"], matplotlib.rcParams["font.size"]
    with matplotlib.rc_context({"font.size": 20, "text.color": "red"}):
        fig = figures.draw("position_ids")
    assert 20 not in {t.get_fontsize() for t in fig.findobj(Text) if t.get_text()}
    assert (matplotlib.rcParams["svg.hashsalt"], matplotlib.rcParams["font.size"]) == before


def test_check_names_a_stale_or_missing_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(figures, "FIGURES", {"tenant_gather": figures.tenant_gather})
    shutil.copy(figures.figure_path("tenant_gather"), tmp_path)
    assert figures.main(["--check", "--dir", str(tmp_path)]) == 0

    stale = tmp_path / "tenant_gather.svg"
    stale.write_text(stale.read_text().replace("stacked:", "stacked :"))
    assert figures.main(["--check", "--dir", str(tmp_path)]) == 1
    assert "stale figure: tenant_gather" in capsys.readouterr().err

    stale.unlink()
    assert figures.main(["--check", "--dir", str(tmp_path)]) == 1
    assert "tenant_gather.svg is missing" in capsys.readouterr().err


def test_another_matplotlib_version_is_compared_by_fingerprint(fresh, tmp_path):
    """Another matplotlib may write other bytes for the same drawing: then the fingerprint of
    the drawing decides, and a changed drawing is still caught."""
    text = fresh["tenant_gather"].read_text()
    version = f"Matplotlib v{matplotlib.__version__}"
    assert version in text
    other = tmp_path / "tenant_gather.svg"
    other.write_text(text.replace(version, "Matplotlib v0.0.1").replace("stacked:", "stacked :"))
    assert figures.stale_reason("tenant_gather", other, fresh["tenant_gather"]) is None

    changed = re.sub(r"fingerprint [0-9a-f]+", "fingerprint 0123456789abcdef", other.read_text())
    other.write_text(changed)
    assert "differs" in figures.stale_reason("tenant_gather", other, fresh["tenant_gather"])


def test_show_displays_the_installed_svg(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw: shown.append(obj))
    assert figures.show("three_forms") is None  # nothing for the cell to echo as Out[...]
    (bundle,) = shown
    tag = bundle["text/html"]
    assert tag.startswith('<img src="data:image/svg+xml;base64,') and "max-width:100%" in tag
    encoded = re.search(r"base64,([^\"]+)", tag).group(1)
    assert base64.b64decode(encoded) == figures.figure_path("three_forms").read_bytes()
    assert 'alt="Prompt tuning, deep prefix tuning' in tag
    with pytest.raises(KeyError, match="known: three_forms"):
        figures.show("three-forms")


def _references(notebook: Path) -> set[str]:
    """Figure names a notebook shows: ``show("name")`` in code, ``figures/name.svg`` in text."""
    names = set()
    for cell in json.loads(notebook.read_text())["cells"]:
        source = "".join(cell["source"])
        names.update(re.findall(r"\bshow\(\s*[\"']([\w-]+)[\"']\s*\)", source))
        names.update(re.findall(r"assets/figures/([\w-]+)\.svg", source))
    return names


def test_every_figure_a_notebook_shows_exists():
    notebooks = sorted(REPO.glob("solutions/*/*.ipynb")) + sorted(REPO.glob("notebooks/*/*.ipynb"))
    assert notebooks
    missing = [
        f"{nb.relative_to(REPO)}: {name}"
        for nb in notebooks
        for name in sorted(_references(nb))
        if name not in figures.FIGURES or not figures.figure_path(name).exists()
    ]
    assert not missing, f"notebooks show figures that do not exist: {missing}"


def test_the_figures_are_package_data():
    """A wheel (the student's, Colab's) must carry the files that show() reads."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["course"]
    for name in figures.FIGURES:
        relative = figures.figure_path(name).relative_to(REPO / "course").as_posix()
        assert any(fnmatch(relative, g) for g in globs), (
            f"course/{relative} is not package data: add 'assets/figures/*.svg' to "
            "[tool.setuptools.package-data] course in pyproject.toml"
        )


def _code_cells(notebook: Path) -> list[dict]:
    return [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]


SHOW = re.compile(r"^\s*show\(\s*[\"']([\w-]+)[\"']\s*\)", re.M)


def test_every_figure_is_shown_and_show_is_imported_in_the_setup():
    """No figure is orphaned: each one is shown by a ``show("name")`` code cell of some solution
    notebook; and a notebook that calls ``show`` imports it in its "Setup 2/2" cell."""
    shown: dict[str, list[str]] = {}
    unimported = []
    for notebook in sorted(REPO.glob("solutions/*/*.ipynb")):
        cells = _code_cells(notebook)
        names = [name for c in cells for name in SHOW.findall("".join(c["source"]))]
        for name in names:
            shown.setdefault(name, []).append(notebook.parent.name)
        setup = [c for c in cells if "".join(c["source"]).startswith("# Setup 2/2")]
        imports = len(setup) == 1 and re.search(
            r"^from course\.figures import show$", "".join(setup[0]["source"]), re.M
        )
        if names and not imports:
            unimported.append(notebook.parent.name)
    orphans = [name for name in figures.FIGURES if name not in shown]
    assert not orphans, f"figures no solution notebook shows (add a show() cell): {orphans}"
    assert not unimported, (
        f"notebooks that call show() without `from course.figures import show` in their "
        f"'Setup 2/2' cell: {unimported}"
    )


def test_release_check_names_a_stale_figure(tmp_path):
    from autograder.pipeline.coursedir import Course
    from autograder.pipeline.release import figure_problems

    assert figure_problems(Course(tmp_path)) == [], "a course without course/figures.py"
    folder = tmp_path / "course" / "assets" / "figures"
    shutil.copytree(figures.FIGURE_DIR, folder)
    (tmp_path / "course" / "figures.py").write_text("")
    assert figure_problems(Course(tmp_path)) == []

    stale = folder / "tenant_gather.svg"
    stale.write_text(stale.read_text().replace("stacked:", "stacked :"))
    (folder / "three_forms.svg").unlink()
    problems = figure_problems(Course(tmp_path))
    assert len(problems) == 2 and all(
        p.startswith("stale figure: ") and p.endswith("run: python -m course.figures --write")
        for p in problems
    )
    assert "three_forms" in problems[0] and "is missing" in problems[0]
    assert "tenant_gather" in problems[1] and "differs" in problems[1]
