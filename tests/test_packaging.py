"""The install routes (pip / conda, student / instructor) must ask for the same versions."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    assert m, req
    return m.group(1).lower(), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    instructor = pyproject["project"]["optional-dependencies"]["instructor"]
    pip_reqs = dict(_split(r) for r in [*pyproject["project"]["dependencies"], *instructor])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            name, spec = _split(dep)
            if name not in ("python", "pip"):
                conda[CONDA_NAMES.get(name, name)] = spec
    assert conda == pip_reqs


def test_transformers_range_is_stated_in_the_readme():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    spec = dict(_split(r) for r in pyproject["project"]["dependencies"])["transformers"]
    assert spec in (ROOT / "README.md").read_text()
