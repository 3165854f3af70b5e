"""Cap what a graded notebook's outputs may weigh, in bytes as well as lines.

nbgrader's ``LimitOutput`` counts lines: a single 50 MB line passes through into the autograded
notebook, the gradebook's copy and the feedback HTML. :class:`LimitOutputBytes` truncates every
text output (streams, ``text/*`` data, tracebacks) beyond :attr:`LimitOutputBytes.cell_bytes`
per cell and replaces binary payloads (images) beyond it with a note, so one cell cannot hold
more than about that much, and a notebook not more than :attr:`LimitOutputBytes.notebook_bytes`.
"""

from __future__ import annotations

from typing import Any

from nbconvert.preprocessors import Preprocessor
from nbconvert.preprocessors.sanitize import SanitizeHTML
from nbformat.notebooknode import NotebookNode
from traitlets import Bool, Integer

__all__ = ["LimitOutputBytes", "SanitizeStudentContent"]

NOTE = "\n[... {n} more bytes of output removed by the grader]\n"


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace"))
    if isinstance(value, list):
        return sum(_size(v) for v in value)
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    return len(str(value))


def _cut(text: str, budget: int) -> tuple[str, int]:
    """``text`` within ``budget`` bytes (with a note when cut) and the bytes it now uses."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= budget:
        return text, len(raw)
    kept = raw[: max(0, budget)].decode("utf-8", "ignore")
    cut = kept + NOTE.format(n=len(raw) - len(kept.encode()))
    return cut, budget


class LimitOutputBytes(Preprocessor):
    """Truncate outputs to :attr:`cell_bytes` per cell and :attr:`notebook_bytes` in all."""

    enabled = Bool(True, help="nbconvert runs a preprocessor only when enabled").tag(config=True)

    cell_bytes = Integer(200_000, help="Most bytes of output kept per cell.").tag(config=True)
    notebook_bytes = Integer(5_000_000, help="Most bytes of output kept per notebook.").tag(
        config=True
    )

    def preprocess(self, nb: NotebookNode, resources: Any) -> tuple[NotebookNode, Any]:
        self._left = self.notebook_bytes
        return super().preprocess(nb, resources)

    def preprocess_cell(
        self, cell: NotebookNode, resources: Any, index: int
    ) -> tuple[NotebookNode, Any]:
        if cell.cell_type != "code":
            return cell, resources
        budget = min(self.cell_bytes, self._left)
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            if kind == "stream":
                text = output.get("text", "")
                text = "".join(text) if isinstance(text, list) else str(text)
                output.text, used = _cut(text, budget)
            elif kind == "error":
                output.evalue, used = _cut(str(output.get("evalue", "")), budget)
                lines, spent = [], 0
                for line in output.get("traceback", []):
                    line, n = _cut(str(line), budget - used - spent)
                    lines.append(line)
                    spent += n
                    if spent >= budget - used:
                        break
                output.traceback = lines
                used += spent
            elif kind in ("display_data", "execute_result"):
                used = 0
                data = output.get("data", {})
                for mime in list(data):
                    size = _size(data[mime])
                    if mime.startswith("text/") or mime.endswith("json"):
                        if isinstance(data[mime], (dict, list)) and size > budget - used:
                            data[mime] = NOTE.format(n=size)
                            used += len(data[mime])
                            continue
                        text = data[mime]
                        text = "".join(text) if isinstance(text, list) else str(text)
                        data[mime], n = _cut(text, budget - used)
                        used += n
                    elif size > budget - used:
                        del data[mime]
                    else:
                        used += size
                if not data:
                    data["text/plain"] = NOTE.format(n=_size(output.get("data", {})))
                output.data = data
            else:
                used = _size(output)
            budget = max(0, budget - used)
            self._left = max(0, self._left - used)
        return cell, resources


class SanitizeStudentContent(SanitizeHTML):
    """Escape the HTML a student controls before anyone's browser renders it.

    Formgrader shows the autograded notebook to the instructor, in the instructor's session:
    a ``<script>`` in a student's markdown answer, or a ``display(HTML(...))`` / JavaScript
    output of a student's cell, would run there (and could call Formgrader's API to change
    grades). Student markdown and raw cells are sanitised with bleach; every code cell's rich
    outputs keep only safe types (text, PNG/JPEG, JSON), HTML escaped, scripts and widget views
    dropped. The grader's own locked cells are left alone (nbgrader checks their checksums)."""

    enabled = Bool(True, help="nbconvert runs a preprocessor only when enabled").tag(config=True)

    def preprocess_cell(
        self, cell: NotebookNode, resources: Any, index: int
    ) -> tuple[NotebookNode, Any]:
        locked = cell.get("metadata", {}).get("nbgrader", {}).get("locked", False)
        if cell.cell_type in ("markdown", "raw") and locked:
            return cell, resources
        return super().preprocess_cell(cell, resources, index)
