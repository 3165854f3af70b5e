"""Load a check module afresh from its file, and refuse to grade a kernel that patched it.

Student code runs in the grading kernel, so a notebook could replace what the hidden tests
import (``prefix.check_prefix_forward = lambda *a: None``, or ``reference.prefix_forward =
my_prefix_forward`` so that every comparison agrees). Hidden tests therefore go through
:func:`fresh`::

    from autograder.checks import guard
    guard.fresh("autograder.checks.prefix").check_prefix_forward(prefix_forward, PrefixEncoder)

:func:`fresh` first compares every loaded grader module (``autograder.reference``,
``course.compat``, ``autograder.checks.*``) with its file on disk — each function's and method's
code object, each top-level name, each ``from … import`` of another grader module, and the
module objects registered in ``sys.modules`` — and raises ``AssertionError`` naming what was
replaced. Then it executes the requested module and every grader module it imports from their
files into new module objects, so even a patch this comparison missed cannot reach the copy it
returns. ``sys.modules`` is left as it was.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
import types
from pathlib import Path

import torch

__all__ = ["fresh", "tampering"]

_ROOT = Path(__file__).resolve().parents[2]
_EXTRA = ("autograder.reference", "course.compat")


def _source_path(name: str) -> Path | None:
    """The file a grader module ``name`` is loaded from, or None (not a module of ours)."""
    base = _ROOT.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _is_grader_module(name: str) -> bool:
    ours = name in _EXTRA or name == "autograder.checks" or name.startswith("autograder.checks.")
    return ours and _source_path(name) is not None


def _codes(code: types.CodeType, found: dict[str, list[types.CodeType]]) -> None:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found.setdefault(getattr(const, "co_qualname", const.co_name), []).append(const)
            _codes(const, found)


def _code_of(obj: object) -> types.CodeType | None:
    """The code object of a function, a decorated function, a property or a static/class
    method; None for anything else."""
    if isinstance(obj, property):
        obj = obj.fget
    elif isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if callable(obj):
        obj = inspect.unwrap(obj)
    return obj.__code__ if inspect.isfunction(obj) else None


def _defined(qualname: str, live: object, compiled: dict[str, list[types.CodeType]]) -> bool:
    """Whether ``live`` runs the code compiled from the file under ``qualname``."""
    code = _code_of(live)
    # Python 3.10 code objects carry no qualname: fall back to the bare name
    candidates = compiled.get(qualname) or compiled.get(qualname.rpartition(".")[2], [])
    return code is not None and code in candidates


# Parsing and compiling a file is most of a check's cost when a notebook's hidden tests call
# fresh() dozens of times; each file is read every time and parsed once per distinct text.
_PARSED: dict[tuple[Path, str], tuple[list[ast.stmt], dict[str, list[types.CodeType]]]] = dict()


def _parse(path: Path) -> tuple[list[ast.stmt], dict[str, list[types.CodeType]]]:
    """The top-level statements of the file at ``path`` and its code objects by qualname."""
    source = path.read_text(encoding="utf-8")
    key = (path, source)
    if key not in _PARSED:
        compiled: dict[str, list[types.CodeType]] = {}
        _codes(compile(source, str(path), "exec"), compiled)
        _PARSED[key] = (ast.parse(source).body, compiled)
    return _PARSED[key]


def _module_problems(name: str, module: types.ModuleType) -> list[str]:
    path = _source_path(name)
    if Path(getattr(module, "__file__", "") or "").resolve() != path:
        return [f"sys.modules[{name!r}] is not the module loaded from {path}"]
    body, compiled = _parse(path)
    problems = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not _defined(node.name, getattr(module, node.name, None), compiled):
                problems.append(f"{name}.{node.name} was replaced")
        elif isinstance(node, ast.ClassDef):
            cls = getattr(module, node.name, None)
            if not inspect.isclass(cls) or cls.__module__ != name:
                problems.append(f"{name}.{node.name} was replaced")
                continue
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    live = vars(cls).get(item.name)
                    if not _defined(f"{node.name}.{item.name}", live, compiled):
                        problems.append(f"{name}.{node.name}.{item.name} was replaced")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            for target in targets:
                if isinstance(target, ast.Name) and getattr(module, target.id, None) != value:
                    problems.append(f"{name}.{target.id} was changed")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                bound = alias.asname or alias.name
                target = f"{node.module}.{alias.name}"
                if _is_grader_module(target):
                    expected = sys.modules.get(target)
                elif _is_grader_module(node.module):
                    expected = getattr(sys.modules.get(node.module), alias.name, None)
                else:
                    continue
                if getattr(module, bound, None) is not expected:
                    problems.append(f"{name}.{bound} was replaced")
    return problems


def tampering() -> list[str]:
    """What was replaced in the grader modules loaded in this process (empty when nothing)."""
    problems = []
    for name, module in list(sys.modules.items()):
        if not _is_grader_module(name) or module is None:
            continue
        problems.extend(_module_problems(name, module))
        parent, _, child = name.rpartition(".")
        if parent in sys.modules and getattr(sys.modules[parent], child, module) is not module:
            problems.append(f"{parent}.{child} is not sys.modules[{name!r}]")
    for fn in ("equal", "allclose"):
        if not isinstance(getattr(torch, fn), types.BuiltinFunctionType):
            problems.append(f"torch.{fn} was replaced")
    return problems


def _grader_imports(name: str) -> list[str]:
    """The grader modules that ``name``'s file imports (directly)."""
    found = []
    for node in _parse(_source_path(name))[0]:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                if _is_grader_module(target):
                    found.append(target)
                elif _is_grader_module(node.module):
                    found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if _is_grader_module(a.name))
    return found


def _load_order(name: str, order: list[str]) -> list[str]:
    if name not in order:
        for dep in _grader_imports(name):
            _load_order(dep, order)
        order.append(name)
    return order


def fresh(module_name: str) -> types.ModuleType:
    """``module_name`` executed anew from its file, with fresh copies of the grader modules it
    imports; raises ``AssertionError`` if this kernel replaced any grader code."""
    if not _is_grader_module(module_name):
        raise ValueError(f"guard.fresh loads grader modules only, not {module_name!r}")
    problems = tampering()
    if problems:
        raise AssertionError(
            "the grader's code was modified in this kernel: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". Restart the kernel and run the notebook without changing the autograder."
        )
    order = _load_order(module_name, [])
    saved_modules = {name: sys.modules.get(name) for name in order}
    saved_attrs = []
    try:
        for name in order:
            spec = importlib.util.spec_from_file_location(name, _source_path(name))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                holder = sys.modules[parent]
                saved_attrs.append((holder, child, holder.__dict__.get(child)))
                setattr(holder, child, module)
            spec.loader.exec_module(module)
        return sys.modules[module_name]
    finally:
        for holder, child, value in reversed(saved_attrs):
            if value is None:
                holder.__dict__.pop(child, None)
            else:
                setattr(holder, child, value)
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
