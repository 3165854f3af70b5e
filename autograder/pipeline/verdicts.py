"""Grade test cells from observations the grader judges itself, never from what a kernel shows.

Stock nbgrader scores a test cell from its outputs: no error output means full points. Anything
the student's kernel can print, display or hook therefore decides the grade. Here the grading
kernel only *observes* (:mod:`autograder.checks.protocol`): every check call in a test cell
(``selfcheck.run``, ``selfcheck.hidden``, ``selfcheck.check_answer``) runs the student's objects
on inputs drawn from a secret variant of this grading run and writes what came out into a
channel folder. After each cell, :class:`GradedExecute` takes the new observations out of the
kernel's reach. When the notebook has run, it judges every graded test cell in this process,
where no student code runs: which checks the cell must deliver is read from the grader's own
copy of the cell (nbgrader restores locked cells before execution), each observation is judged
against the reference on the same variant, and the cell's outputs are REPLACED by the verdicts:

* every check passed: ``✓ <what passed>`` lines (the cell scores full points);
* a check failed: an ``AssertionError`` output with the check's message (0 points);
* an observation is missing although the cell ran without an error, or is malformed: a
  :data:`TAMPERING` output, "tampering suspected: …, review by hand" (0 points, reported as its
  own status by ``grade``); the other cells are judged as usual;
* the grader itself failed: a :data:`GRADER_ERROR` output (reported as a grading error).

What the cell printed to stdout is kept above the verdicts (capped), so a student still sees
their own output; nothing else the kernel sent survives in a graded cell.
"""

from __future__ import annotations

import ast
import os
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_core.utils import run_sync
from nbformat.notebooknode import NotebookNode
from traitlets import Bool, Dict, Integer, List, Unicode

from autograder.checks import protocol
from autograder.pipeline.execute import KERNEL_ERRORS, ResilientExecute, error_output

__all__ = [
    "GRADER_ERROR",
    "TAMPERING",
    "Expected",
    "GradedExecute",
    "expected_checks",
    "stamped_backbone",
]

TAMPERING = "Tampering"
"""``ename`` of a verdict that suspects tampering (the grade report shows it as such)."""
GRADER_ERROR = "GraderError"
"""``ename`` of a verdict the grader could not reach (a bug of the grader, not the student)."""
_RECORDED = "recorded for the grader:"
MAX_OBSERVATIONS_PER_CELL = 64
"""Observations taken from one cell (a test cell makes one to three)."""
_KEEP_STDOUT = 20_000
"""Characters of a graded cell's own stdout kept above its verdicts."""


@dataclass(frozen=True)
class Expected:
    """One check a graded cell must deliver: its name and the grader's settings for it."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        question = dict(self.params).get("question")
        return f"{self.name}({question})" if question else self.name


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _literal(node: ast.AST) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return False, None


def expected_checks(source: str) -> list[Expected]:
    """The checks a test cell's source calls, in order, without repeats.

    Recognised: ``selfcheck.run(<...>.check_x, ...)``, ``selfcheck.hidden("check_x", ...,
    key=<literal>)`` and ``selfcheck.check_answer("<question id>", ...)``. Only ever applied to
    the grader's own copy of a cell.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found: list[tuple[int, int, Expected]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        if not func.startswith("selfcheck."):
            continue
        kind = func.removeprefix("selfcheck.")
        item = None
        if kind == "run" and node.args:
            name = _dotted(node.args[0]).rpartition(".")[2]
            if name.startswith("check_"):
                item = Expected(name)
        elif kind == "hidden" and node.args:
            ok, name = _literal(node.args[0])
            params = []
            for kw in node.keywords:
                good, value = _literal(kw.value)
                if kw.arg and good:
                    params.append((kw.arg, value))
            if ok and isinstance(name, str):
                item = Expected(name, tuple(sorted(params)))
        elif kind == "check_answer" and node.args:
            ok, question = _literal(node.args[0])
            if ok and isinstance(question, str):
                item = Expected("check_answer", (("question", question),))
        if item is not None:
            found.append((node.lineno, node.col_offset, item))
    ordered: list[Expected] = []
    for _, _, item in sorted(found, key=lambda f: (f[0], f[1])):
        if item not in ordered:
            ordered.append(item)
    return ordered


def stamped_backbone(folder: Path) -> tuple[str | None, list[str]]:
    """The backbone the artifacts in ``folder`` were trained for, if they agree on one the
    grader has, and notes for the report (a stamp naming a backbone the grader lacks, stamps
    that disagree)."""
    from autograder.checks.artifacts import graded_backbones
    from course.artifacts import STAMP_SUFFIX, read_stamp

    names: dict[str, str] = {}
    notes = []
    for path in sorted(folder.glob(f"*{STAMP_SUFFIX}")):
        artifact = path.with_name(path.name.removesuffix(STAMP_SUFFIX))
        try:
            stamp = read_stamp(artifact)
        except (OSError, ValueError) as err:
            notes.append(str(err))
            continue
        if stamp is not None:
            names[artifact.name] = stamp["name"]
    distinct = sorted(set(names.values()))
    if len(distinct) > 1:
        listed = ", ".join(f"{a}: {n}" for a, n in names.items())
        notes.append(f"artifacts trained for different backbones ({listed}); graded on the default")
        return None, notes
    if not distinct:
        return None, notes
    (name,) = distinct
    if name not in graded_backbones():
        notes.append(
            f"{', '.join(names)} trained for {name!r}, which this grader does not have "
            f"(it has {', '.join(graded_backbones())}): the notebook ran on the default backbone"
        )
        return None, notes
    return name, notes


@dataclass
class _Cell:
    observations: dict[str, list[Path]] = field(default_factory=dict)
    kernel_lost: bool = False


class GradedExecute(ResilientExecute):
    """:class:`ResilientExecute` whose graded test cells are judged by the grader (module
    docstring). Configure it as the execute preprocessor of ``Autograde``."""

    judge_verdicts = Bool(
        True,
        help="Judge graded test cells from the kernel's observations in the grader's process "
        "(False: stock nbgrader scoring from the cell outputs; for debugging only).",
    ).tag(config=True)

    stdout_limit = Integer(_KEEP_STDOUT, help="Characters of a graded cell's stdout kept.").tag(
        config=True
    )

    hide_answers = Bool(
        True,
        help="Hide the reference implementations, the answer keys and the bug zoo from grading "
        "kernels (sandboxed). False only for the instructor's own notebooks: verify and demo "
        "grade bug-zoo students that import the zoo.",
    ).tag(config=True)

    reference_visible = Dict(
        value_trait=List(Unicode()),
        default_value={"03_experiments": ["common", "prompt", "prefix"]},
        help="Per assignment, the reference modules (autograder/reference/<name>.py) its "
        "notebook imports on purpose; every other reference module stays hidden. Notebook 03 "
        "builds on the reference prompt and prefix of 01 and 02, never on make_method's.",
    ).tag(config=True)

    requires = Dict(
        value_trait=List(Unicode()),
        default_value={
            "check_prompt_artifact": [
                "check_soft_prompt",
                "check_prepend_prompt",
                "check_save_load_prompt",
            ],
            "check_prefix_artifact": ["check_prefix_encoder", "check_prefix_forward"],
            "check_sweep_artifact": [
                "check_method_parameters",
                "check_method_functions",
                "check_run_sweep",
            ],
        },
        help="A check whose points also need these checks passed earlier in the same notebook: "
        "a trained artifact or a saved study counts only with code that can have produced it "
        "(the grader cannot tell a file someone else made from one the student's code made).",
    ).tag(config=True)

    def hidden_for(self, assignment: str) -> list[str]:
        """What a sandboxed kernel grading ``assignment`` sees empty."""
        from autograder.pipeline.sandbox import DEFAULT_HIDDEN, PACKAGE_ROOT

        if not self.hide_answers:
            return []
        visible = self.reference_visible.get(assignment)
        if not visible:
            return list(DEFAULT_HIDDEN)
        modules = sorted(
            p.stem
            for p in (PACKAGE_ROOT / "autograder" / "reference").glob("*.py")
            if p.stem != "__init__" and p.stem not in visible
        )
        rest = [h for h in DEFAULT_HIDDEN if h != "autograder/reference"]
        return [f"autograder/reference/{m}.py" for m in modules] + rest

    def preprocess(
        self, nb: NotebookNode, resources: Any = None, km: Any = None
    ) -> tuple[NotebookNode, Any]:
        """Run the notebook with an observation channel, then judge its graded cells."""
        if not self.judge_verdicts:
            return super().preprocess(nb, resources, km)
        self._channel = protocol.scratch_channel()
        self._channel_id = _identity(self._channel)
        self._store = Path(tempfile.mkdtemp(prefix="verdicts-kept-"))
        self._seed = secrets.randbelow(2**62) + 1  # the kernel gets it: it observes on it
        self._secret = secrets.randbelow(2**62) + 1  # never leaves this process
        self._cells: dict[int, _Cell] = {}
        self._kept = 0
        self._passed: dict[str, bool] = {}
        self._backbone, notes = (None, [])
        path = (resources or {}).get("metadata", {}).get("path")
        if path:
            self._backbone, notes = stamped_backbone(Path(path))
        for note in notes:
            self.log.warning("backbone: %s", note)
        self.sandbox_writable = [*self.sandbox_writable, str(self._channel)]
        if path:
            self.sandbox_hidden = self.hidden_for(Path(path).name)
        try:
            nb, resources = super().preprocess(nb, resources, km)
            for index, cell in enumerate(nb.cells):
                try:
                    self._judge_cell(cell, index)
                except Exception as err:  # noqa: BLE001 - one cell's failure costs that cell only
                    self.log.error("judging cell %d failed", index, exc_info=True)
                    output = error_output(
                        GRADER_ERROR,
                        f"the grader could not judge this cell: {type(err).__name__}: "
                        f"{str(err)[:500]} — review by hand",
                    )
                    cell.outputs = [output]
                    self._events.append(
                        {"cell": index, "ename": output.ename, "evalue": output.evalue}
                    )
            self.write_events(nb)
        finally:
            shutil.rmtree(self._channel, ignore_errors=True)
            shutil.rmtree(self._store, ignore_errors=True)
        return nb, resources

    async def async_start_new_kernel(self, **kwargs: Any) -> None:
        if self.judge_verdicts and getattr(self, "_channel", None) is not None:
            env = dict(kwargs.pop("env", None) or os.environ)
            env[protocol.CHANNEL_ENV] = str(self._channel)
            env[protocol.SEED_ENV] = str(self._seed)
            if self._backbone:
                env["COURSE_BACKBONE"] = self._backbone
            kwargs["env"] = env
        await super().async_start_new_kernel(**kwargs)

    start_new_kernel = run_sync(async_start_new_kernel)  # nbclient binds the sync one per class

    def preprocess_cell(self, cell: NotebookNode, resources: Any, index: int) -> tuple[Any, Any]:
        """Execute one cell, then take the observations it produced out of the kernel's reach."""
        cell, resources = super().preprocess_cell(cell, resources, index)
        if self.judge_verdicts and getattr(self, "_channel", None) is not None:
            self._collect(cell, index)
        return cell, resources

    # -------------------------------------------------------------------------- collection

    def _collect(self, cell: NotebookNode, index: int) -> None:
        record = self._cells.setdefault(index, _Cell())
        lost = any(e["cell"] == index and e["ename"] in KERNEL_ERRORS for e in self._events)
        record.kernel_lost = record.kernel_lost or lost
        if _identity(self._channel) != self._channel_id:  # replaced (only possible unsandboxed)
            self.log.error("the observation channel %s was replaced", self._channel)
            return
        try:
            names = sorted(os.listdir(self._channel))
        except OSError:
            return
        taken = 0
        for name in names:
            source = self._channel / name
            if name.startswith(".") or not name.endswith(".safetensors"):
                continue  # a write in progress, or not an observation
            if taken >= MAX_OBSERVATIONS_PER_CELL:
                self.log.warning("cell %d: more than %d observations", index, taken)
                break
            kept = self._store / f"{index:04d}-{self._kept:05d}.safetensors"
            self._kept += 1
            if not _copy_regular(source, kept):
                continue
            taken += 1
            if not lost:
                check = name.removesuffix(".safetensors").split("-", 2)[-1]
                record.observations.setdefault(check, []).append(kept)
        _empty(self._channel)  # whatever the kernel left there: read once, never again

    # -------------------------------------------------------------------------- judging

    def _judge_cell(self, cell: NotebookNode, index: int) -> None:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.cell_type != "code" or not meta.get("grade") or meta.get("solution"):
            return
        expected = expected_checks(cell.source)
        if not expected:
            return
        record = self._cells.get(index, _Cell())
        kernel_error = next(
            (o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None
        )
        passed: list[str] = []
        failures: list[NotebookNode] = []
        for item in expected:
            verdict = self._verdict(item, record, kernel_error)
            needed = [n for n in self.requires.get(item.name, []) if not self._passed.get(n)]
            if isinstance(verdict, str) and needed:
                verdict = (
                    error_output(
                        "AssertionError",
                        f"{item.label} counts only once the code that makes it passes its own "
                        f"checks in this notebook; still failing: {', '.join(needed)}",
                    ),
                    False,
                )
            self._passed[item.name] = self._passed.get(item.name, True) and isinstance(verdict, str)
            if isinstance(verdict, str):
                passed.append(verdict)
                continue
            output, by_grader = verdict
            failures.append(output)
            if by_grader:
                self._events.append({"cell": index, "ename": output.ename, "evalue": output.evalue})
        cell.outputs = [*self._own_stdout(cell), *_stdout_lines(passed), *failures]

    def _verdict(
        self, item: Expected, record: _Cell, kernel_error: NotebookNode | None
    ) -> str | tuple[NotebookNode, bool]:
        """``"✓ ..."`` for a pass, else the error output to show and whether the grader made it
        (a tampering or grader-error verdict) rather than passing on the kernel's error."""
        params = dict(item.params)
        paths = record.observations.get(item.name, [])
        if item.name == "check_answer":
            paths = [p for p in paths if _answers_question(p, params["question"])] or paths[:0]
        if not paths:
            if kernel_error is not None:
                ename = str(kernel_error.get("ename", "Error"))
                return error_output(ename, _evalue(kernel_error)), False
            if record.kernel_lost:
                return error_output("KernelDied", "the kernel was lost while this cell ran"), False
            return _ours(
                TAMPERING,
                f"tampering suspected: the cell ran without an error but no observation for "
                f"{item.label} reached the grader (was a check function or selfcheck replaced?)"
                " — review by hand",
            )
        try:
            protocol.judge_file(item.name, paths[0], self._seed, params, self._secret)
        except protocol.MalformedObservation as err:
            return _ours(TAMPERING, f"tampering suspected: {item.label}: {err} — review by hand")
        except AssertionError as err:
            return error_output("AssertionError", str(err)), False
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            # what torch raises on values of an unexpected dtype or shape (float64 hidden
            # states, a ragged list): the student's output, not the grader, is what differs.
            # (The solutions and the must-pass variants show these judges do not raise on
            # valid outputs; a grader bug of this kind would fail them in the test suite.)
            self.log.warning("judging %s: %r", item.label, err)
            detail = (
                f"{item.label}: your output could not be compared with the expected one "
                f"({type(err).__name__}: {str(err)[:300]}) — check the dtype and shape of what "
                "your function returns"
            )
            return error_output("AssertionError", detail), False
        except Exception as err:  # noqa: BLE001 - a grader bug must not look like a pass
            self.log.error("judging %s failed", item.label, exc_info=True)
            detail = f"the grader could not judge {item.label}: {type(err).__name__}: {err}"
            return _ours(GRADER_ERROR, detail)
        return _pass_line(item)

    def _own_stdout(self, cell: NotebookNode) -> list[NotebookNode]:
        text = "".join(
            o.get("text", "")
            for o in cell.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == "stdout"
        )
        lines = [line for line in text.splitlines(True) if not line.startswith(_RECORDED)]
        text = "".join(lines)
        if len(text) > self.stdout_limit:
            text = text[: self.stdout_limit] + "\n[... output truncated by the grader]\n"
        return [_stream(text)] if text.strip() else []


def _ours(ename: str, evalue: str) -> tuple[NotebookNode, bool]:
    """An error output the grader made, marked so that ``_judge_cell`` records it as a grader
    event (an error passed on from the kernel is not one)."""
    return error_output(ename, evalue), True


def _answers_question(path: Path, question: str) -> bool:
    """Whether the observation at ``path`` answers ``question``; False for anything malformed
    (which then counts as no answer delivered)."""
    try:
        data = protocol.read(path)
        return isinstance(data, dict) and data.get("question") == question
    except Exception:  # noqa: BLE001 - an untrusted file must never stop the judging
        return False


def _pass_line(item: Expected) -> str:
    if item.name == "check_answer":
        return f"✓ {dict(item.params)['question']}: correct"
    from autograder.checks import get_check

    doc = (get_check(item.name).__doc__ or item.name).strip().split("\n\n")[0]
    return "✓ " + " ".join(doc.split())


def _evalue(output: NotebookNode) -> str:
    value = str(output.get("evalue", ""))
    return value if len(value) <= 4000 else value[:4000] + " [...]"


def _stream(text: str) -> NotebookNode:
    return NotebookNode(output_type="stream", name="stdout", text=text)


def _stdout_lines(lines: list[str]) -> list[NotebookNode]:
    return [_stream("".join(f"{line}\n" for line in lines))] if lines else []


def _copy_regular(source: Path, target: Path) -> bool:
    """Copy ``source`` to the grader's own ``target`` if it is a regular file no larger than an
    observation may be, never following a symlink. A copy, not a rename: a kernel that kept the
    file open could otherwise still rewrite what the grader will read."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as src:
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > protocol.MAX_BYTES:
            return False
        data = src.read(protocol.MAX_BYTES + 1)
    if len(data) > protocol.MAX_BYTES:
        return False
    target.write_bytes(data)
    return True


def _empty(folder: Path) -> None:
    """Remove everything inside ``folder`` (never following a symlink out of it)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def _identity(folder: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of a real directory (None for a symlink or anything else)."""
    try:
        st = os.lstat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
