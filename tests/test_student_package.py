"""The student wheel holds no graded solution: no reference module, no bug-zoo twin, no pipeline,
no object that has a graded object's name or signature, no function whose code is the
reference's under another name. ``--unlock`` adds exactly the notebooks named."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from autograder.pipeline.coursedir import REPO_ROOT, Course
from autograder.pipeline.package import UNLOCKS, build_student_package

pytestmark = pytest.mark.slow


def _build(tmp: Path, unlock: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    summary = build_student_package(Course.at(REPO_ROOT), tmp, unlock, check_release=False)
    wheel = summary["wheel"]
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp / "unpacked")
    return tmp / "unpacked", summary["members"]


@pytest.fixture(scope="module")
def default_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    return _build(tmp_path_factory.mktemp("student"))


def _python(unpacked: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with the unpacked wheel first on the path (not the repository)."""
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=unpacked,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_student_wheel_holds_no_reference_twins_or_pipeline(default_wheel) -> None:
    _, members = default_wheel
    code = [m for m in members if m.endswith(".py")]
    leaked = [
        m
        for m in code
        if m.startswith(("autograder/reference/", "autograder/bugzoo/", "autograder/pipeline/"))
        and m
        not in (
            "autograder/reference/__init__.py",
            "autograder/bugzoo/__init__.py",
            "autograder/bugzoo/incidents.py",
        )
    ]
    assert leaked == []
    assert not any(m.startswith(("solutions/", "tests/", "benchmarks/")) for m in members)
    assert "autograder/cli.py" not in members and "autograder/student.py" in members
    assert "course/assets/tiny-lm/model.safetensors" in members
    settings = "data/share/jupyter/lab/settings/overrides.d/soft-prompts-course.json"
    assert any(m.endswith(".data/" + settings) for m in members), "JupyterLab saves widget state"
    assert any(m.startswith("autograder/checks/fixture_data/") for m in members), (
        "the visible checks' stored reference outputs must ship"
    )


def _reference_functions() -> dict[str, tuple[list[str], str]]:
    """Every function and method of the reference: name -> (parameter names, body AST dump)."""
    found = {}
    for path in sorted((REPO_ROOT / "autograder" / "reference").glob("[!_]*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = [n for n in node.body if not _is_docstring(n)]
                if len(body) >= 3:  # two-line helpers (a model.generate call) are no solution
                    found[f"{path.stem}.{node.name}"] = (
                        [a.arg for a in node.args.args],
                        ast.dump(ast.Module(body=body, type_ignores=[])),
                    )
    return found


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant)


def test_no_function_in_the_wheel_is_a_reference_function_renamed(default_wheel) -> None:
    unpacked, members = default_wheel
    reference = {dump: name for name, (_, dump) in _reference_functions().items()}
    copies = []
    for member in members:
        if not member.endswith(".py"):
            continue
        for node in ast.walk(ast.parse((unpacked / member).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = [n for n in node.body if not _is_docstring(n)]
                dump = ast.dump(ast.Module(body=body, type_ignores=[]))
                if dump in reference:
                    copies.append(f"{member}:{node.name} = reference {reference[dump]}")
    assert copies == []


def test_no_object_in_the_wheel_has_a_graded_name_or_signature(default_wheel) -> None:
    """Import every module of the wheel; nothing may be named like a graded object, nor take
    exactly the parameters of one (a renamed solution)."""
    import inspect

    from autograder.bugzoo import GRADED, graded_objects

    signatures = {}
    for name, obj in graded_objects().items():
        target = obj.__init__ if inspect.isclass(obj) else obj
        signatures[name] = [p for p in inspect.signature(target).parameters if p != "self"]
    unpacked, _ = default_wheel
    script = f"""
import importlib, inspect, json, pkgutil, sys
graded = {json.dumps(sorted(GRADED))}
signatures = {json.dumps(signatures)}
found, failed = [], []
import autograder, course
assert autograder.__file__.startswith({str(unpacked)!r}), autograder.__file__
for package in (autograder, course):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as err:
            failed.append(f"{{info.name}}: {{err}}")
            continue
        for attr, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if attr in graded:
                found.append(f"{{module.__name__}}.{{attr}} (a graded name)")
            if callable(obj):
                try:
                    target = obj.__init__ if inspect.isclass(obj) else obj
                    params = [p for p in inspect.signature(target).parameters if p != "self"]
                except (TypeError, ValueError):
                    continue
                for name, wanted in signatures.items():
                    if params == wanted and len(wanted) >= 2:
                        found.append(f"{{module.__name__}}.{{attr}} (the signature of {{name}})")
print(json.dumps({{"found": found, "failed": failed}}))
"""
    done = _python(unpacked, script)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["found"] == []
    # the one module that cannot import is notebook 05's broken releases, and it says why
    assert len(result["failed"]) == 1, result["failed"]
    assert "autograder.bugzoo.incidents" in result["failed"][0]
    assert "--unlock 01 02" in result["failed"][0]


def test_unlock_adds_exactly_the_notebooks_named(tmp_path: Path) -> None:
    unpacked, members = _build(tmp_path, ("01", "02"))
    for notebook, files in UNLOCKS.items():
        present = [f in members for f in files]
        assert (
            all(present)
            if notebook in ("01_prompt_tuning", "02_prefix_tuning")
            else not any(present)
        ), notebook
    done = _python(
        unpacked,
        "from autograder.bugzoo.incidents import INCIDENTS; print(len(INCIDENTS))\n"
        "from autograder.reference import prefix_forward\n"
        "try:\n    from autograder.reference import make_method\n"
        "except ModuleNotFoundError as err:\n    print(err)\n",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "9"
    assert "make_method is the reference of notebook 03_experiments" in lines[1]
    assert "--unlock 03" in lines[1]
    assert "student.py" in " ".join(members)
    manifest = (tmp_path / "MANIFEST.txt").read_text()  # notebook 05 re-grades 02's objects
    assert "warning: 05_debugging grades objects of an unlocked notebook again (13 " in manifest
    student = (unpacked / "autograder" / "student.py").read_text()
    assert "('01_prompt_tuning', '02_prefix_tuning')" in student


def test_every_check_module_that_judges_a_graded_object_has_its_notebook() -> None:
    """``regraded`` counts a later notebook's cells by the notebook of the check module they
    call: a module missing from the map would hide points the unlocked reference answers."""
    from autograder.checks import NOTEBOOK_CHECKS
    from autograder.pipeline.package import CHECK_MODULE_NOTEBOOK

    judged = {module for module, _ in NOTEBOOK_CHECKS.values()}
    assert judged - {"quiz", "artifacts"} <= set(
        CHECK_MODULE_NOTEBOOK
    )  # answers, files: no reference
