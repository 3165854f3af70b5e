"""A simulated Colab session with nothing but the student wheel.

A fresh virtual environment gets what a Colab runtime already has (torch, the course's
dependencies, a Jupyter kernel) but not the course. The student "uploads" the wheel that
``python -m autograder package`` built (it lies in the working folder, as Colab's Files pane puts
it), a stand-in ``google.colab`` module is imported at kernel start as in Colab, and nbclient runs
notebook 00 and notebook 01 with every exercise solved, top to bottom, on the bundled tiny LM:
the install cell installs the wheel (non-editable, so missing package data would show), and every
visible check runs without ``autograder/reference`` (stored fixtures).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nbformat
import pytest

from autograder.pipeline.coursedir import REPO_ROOT, Course
from autograder.pipeline.package import build_student_package

pytestmark = pytest.mark.slow

NOTEBOOKS = ("00_backbone_tour", "01_prompt_tuning")
MARKERS = re.compile(r"^\s*### (BEGIN|END) SOLUTION\s*$\n?", re.MULTILINE)

DRIVER = """
import json, sys, time
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

report = {}
for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True)
    client.execute(cwd=".")
    nbformat.write(nb, path)
    errors = [
        {"cell": i, "ename": o.get("ename"), "evalue": str(o.get("evalue"))[:500]}
        for i, c in enumerate(nb.cells) if c.cell_type == "code"
        for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    report[path] = {
        "seconds": time.perf_counter() - start, "errors": errors,
        "passed_checks": text.count("\\u2713"), "installed": "installing the course" in text,
    }
print(json.dumps(report))
"""


def solved(assignment: str) -> nbformat.NotebookNode:
    """The released student notebook with every solution cell filled in from ``solutions/``."""
    student = nbformat.read(REPO_ROOT / "notebooks" / assignment / f"{assignment}.ipynb", 4)
    source = nbformat.read(REPO_ROOT / "solutions" / assignment / f"{assignment}.ipynb", 4)
    answers = {
        c.metadata["nbgrader"]["grade_id"]: MARKERS.sub("", c.source)
        for c in source.cells
        if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"
    }
    for cell in student.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    return student


CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("PYTHON", "COURSE_", "VIRTUAL_ENV", "NBGRADER", "TQDM"))
}
"""This process's environment without what points Python at the repository (grading tests put
the course on PYTHONPATH) or changes the course's behaviour."""


def _run(command: list, **kwargs) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("env", CLEAN_ENV)
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, f"{command}:\n{done.stderr[-3000:]}"
    return done


def test_colab_runs_notebooks_00_and_01_from_the_student_wheel(tmp_path: Path) -> None:
    start = time.perf_counter()
    wheel = build_student_package(Course.at(REPO_ROOT), tmp_path / "dist", check_release=False)[
        "wheel"
    ]
    with zipfile.ZipFile(wheel) as zf:
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in zf.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        ]
    assert not any(r.startswith(("nbgrader", "jupyterlab", "pytest")) for r in requires), requires

    venv = tmp_path / "colab-venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "torch==2.13.0"])  # Colab ships torch; here the local CPU build
    _run([*pip, *requires, "ipykernel", "nbclient", "nbformat"])  # and the rest, not the course
    installed = _run([python, "-m", "pip", "list", "--format=json"]).stdout
    assert "soft-prompts-course" not in installed

    content = tmp_path / "content"  # Colab's working folder, where an uploaded file lands
    content.mkdir()
    shutil.copy(wheel, content / wheel.name)
    for assignment in NOTEBOOKS:
        nbformat.write(solved(assignment), content / f"{assignment}.ipynb")
    stub = tmp_path / "colab-stub"
    (stub / "google" / "colab").mkdir(parents=True)  # a namespace package, as google.* is
    (stub / "google" / "colab" / "__init__.py").write_text('"""stand-in for Colab"""\n')
    (stub / "sitecustomize.py").write_text("import google.colab  # Colab imports it at start\n")
    (content / "driver.py").write_text(DRIVER)
    env = dict(CLEAN_ENV)
    env.update(PYTHONPATH=str(stub), HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}:{env['PATH']}")
    ready = time.perf_counter() - start
    done = _run([python, "driver.py", *(f"{a}.ipynb" for a in NOTEBOOKS)], cwd=content, env=env)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"\nenvironment ready in {ready:.0f} s; notebooks: "
        + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in report.items())
    )
    first = report[f"{NOTEBOOKS[0]}.ipynb"]
    assert first["installed"], "the install cell installed the uploaded wheel"
    for name, result in report.items():
        assert result["errors"] == [], (name, result["errors"])
        assert result["passed_checks"] >= 4, (name, result)
    where = _run(  # from Colab's folder: `python -c` puts the current folder first on sys.path
        [python, "-c", "import autograder; print(autograder.__file__)"], env=env, cwd=content
    ).stdout
    assert "site-packages" in where, "the wheel was installed, not found in the repository"
    lacking = _run(
        [
            python,
            "-c",
            "import importlib.util as u; print(u.find_spec('autograder.reference.prefix'))",
        ],
        env=env,
        cwd=content,
    ).stdout
    assert lacking.strip() == "None"
