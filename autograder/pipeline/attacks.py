"""What a student who read the grader's source might try: attack students for verify and tests.

Each attack is the source of a cell put right after the setup of a BLANK notebook (no
implementation, no artifacts). Whatever it does, that student must score 0 on every autograded
cell, no other student may be affected, the grader's files and gradebook must stay as they were
and the batch must complete. ``{victim}`` in a source is another student of the same class,
``{port}`` a TCP port on the grader's localhost (0 when nobody listens).

``python -m autograder verify`` grades one student per attack beside the solution, the blank and
the bug zoo; ``tests/test_attacks.py`` does the same with a listener on the port and checks the
files, the gradebook and the victim.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
from nbformat.notebooknode import NotebookNode

from autograder.pipeline.classroom import (
    _first_solution_index,
    _new_code_cell,
    notebooks_of,
    write_submission,
)
from autograder.pipeline.coursedir import Course

__all__ = ["ATTACKS", "make_attack_students", "with_attack"]

_HELPERS = """
import os, pathlib, socket, sys
import autograder
ROOT = pathlib.Path(autograder.__file__).resolve().parents[1]
def attempt(what, action):
    try:
        print(what, "->", repr(action())[:200])
    except BaseException as err:  # noqa: BLE001
        print(what, "-> refused:", type(err).__name__, str(err)[:120])
"""

_REWRITE = """
here = pathlib.Path.cwd()  # <course>/autograded/<student>/<assignment>
for path in [*ROOT.joinpath("autograder").rglob("*.py"), ROOT / "nbgrader_config.py"]:
    attempt(f"append to {path}", lambda p=path: p.open("a").write("# owned\\n"))
for book in (ROOT / ".nbgrader" / "gradebook.db", here.parents[2] / ".nbgrader" / "gradebook.db"):
    attempt(f"open {book} for writing", lambda b=book: open(b, "r+b").close())
attempt("new check", lambda: (ROOT / "autograder" / "checks" / "owned.py").write_text("x = 1"))
attempt("course config", lambda: (here.parents[2] / "nbgrader_config.py").open("a").close())
"""

_OTHERS = """
here = pathlib.Path.cwd()
for target in (here.parents[1] / "{victim}", here.parents[2] / "submitted" / "{victim}"):
    for path in target.rglob("*"):
        attempt(f"overwrite {path}", lambda p=path: p.write_bytes(b"owned"))
    attempt(f"list {target}", lambda t=target: os.listdir(t))
"""

_READ = """
for path in ROOT.joinpath("solutions").rglob("*.ipynb"):
    attempt(f"read {path}", lambda p=path: p.read_text())
attempt("reference", lambda: __import__("autograder.reference.prompt", fromlist=["x"]).SoftPrompt)
"""

_NETWORK = """
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=3))
attempt("dns", lambda: socket.getaddrinfo("pypi.org", 443))
attempt("internet", lambda: socket.create_connection(("1.1.1.1", 53), timeout=3))
"""

_FORK_BOMB = """
import os, time
children = 0
try:
    while children < 100_000:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as err:
    print("stopped after", children, "children:", err)
"""

_HOGS = """
chunks = []
try:
    while len(chunks) < 10_000:
        chunks.append(bytearray(256 << 20))
except MemoryError:
    print("memory stopped at", len(chunks) * 256, "MiB")
del chunks
try:
    with open("hog.bin", "wb") as f:
        for _ in range(100_000):
            f.write(b"x" * (1 << 20))
except OSError as err:
    print("disk stopped:", err)
"""

_TAMPER = """
import sys
from IPython.display import display
from autograder import selfcheck
selfcheck.run = lambda *a, **k: print("✓ all good")
selfcheck.hidden = lambda *a, **k: print("✓ all good")
selfcheck.check_answer = lambda *a, **k: True
get_ipython().events.register("post_run_cell", lambda result: display("ok"))
get_ipython().set_custom_exc((BaseException,), lambda *a, **k: None)
sys.excepthook = lambda *a: None
"""

_FORGE = """
from autograder.checks import NOTEBOOK_CHECKS, protocol
channel = pathlib.Path(os.environ.get(protocol.CHANNEL_ENV, "/nonexistent"))
for n, name in enumerate(NOTEBOOK_CHECKS):
    attempt(f"forge {name}", lambda n=n, name=name: protocol.write(
        channel / f"{os.getpid()}-9{n:03d}-{name}.safetensors", {"models": [], "question": "x"}))
    attempt(f"symlink {name}", lambda n=n, name=name: os.symlink(
        "/etc/passwd", channel / f"{os.getpid()}-8{n:03d}-{name}.safetensors"))
_real = protocol.capture
protocol.capture = lambda name, objects, channel: _real(name, (), channel)
"""

_DEEP_HEADERS = """
from safetensors.torch import save_file
from autograder.checks import NOTEBOOK_CHECKS, protocol
channel = pathlib.Path(os.environ.get(protocol.CHANNEL_ENV, "/nonexistent"))
deep = "[" * 200_000 + "]" * 200_000  # deeper than json.loads can go: RecursionError
def _flood(result, count=[0]):
    for name in ("check_answer", *NOTEBOOK_CHECKS):
        count[0] += 1
        try:
            path = channel / f"{os.getpid()}-7{count[0]:05d}-{name}.safetensors"
            save_file({}, str(path), metadata={"observation": deep})
        except OSError:
            pass
get_ipython().events.register("post_run_cell", _flood)
"""

_KILL = """
import os, signal
for pid in range(2, 400):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
try:
    os.kill(-1, signal.SIGKILL)
except OSError:
    pass
"""

_FORGED_SIGNATURES = """
# A message on the kernel's own output channel whose HMAC is wrong: jupyter_client refuses it
# with ValueError("Invalid Signature"), which nbgrader does not expect (a fork bomb that leaves
# pyzmq no thread for a large output garbles messages the same way).
kernel = get_ipython().kernel
kernel.iopub_socket.send_multipart([b"<IDS|MSG>", b"0" * 64, b"{}", b"{}", b"{}", b"{}"])
import time
time.sleep(1)
print("sent")
"""

_FAKE_ERRORS = """
import autograder.selfcheck as s
s.run = s.hidden = s.check_answer = lambda *a, **k: print("✓ passed")
class KernelUnavailable(Exception):
    pass
raise KernelUnavailable("not run: the kernel could not be restored after an earlier crash or hang")
"""

_THROUGH_SYMLINKS = """
import json, sqlite3
try:
    for c in json.load(open("notes.json"))["cells"]:
        if c["cell_type"] == "code" and c["metadata"].get("nbgrader", {}).get("solution"):
            exec("".join(c["source"]), globals())
    print("copied the victim's code")
except Exception as err:
    print("no victim:", type(err).__name__, err)
try:
    db = sqlite3.connect("file:gradebook.txt?mode=ro", uri=True)
    print(list(db.execute("select id from student")))
except Exception as err:
    print("no gradebook:", type(err).__name__, err)
"""

_MARKERS = """notes = '''
### BEGIN HIDDEN TESTS
assert False
'''
print(notes)"""

ATTACKS: dict[str, str] = {
    "rewrite-grader-files": _HELPERS + _REWRITE,
    "other-students": _HELPERS + _OTHERS,
    "read-solutions": _HELPERS + _READ,
    "network": _HELPERS + _NETWORK,
    "fork-bomb": _FORK_BOMB,
    "memory-and-disk-hog": _HOGS,
    "huge-output": "print('x' * 50_000_000)",
    "verdict-tampering": _TAMPER,
    "forged-observations": _HELPERS + _FORGE,
    "deep-observation-headers": _HELPERS + _DEEP_HEADERS,
    "kill-everything": _KILL,
    "hidden-test-markers": _MARKERS,
    "fake-grader-errors": _FAKE_ERRORS,
    "forged-signatures": _FORGED_SIGNATURES,
    "copy-through-symlinks": _THROUGH_SYMLINKS,
}
"""Attack cells by name (see the module docstring)."""

ORACLES: dict[str, str] = {
    "count_parameters_by_group": (
        "from autograder.checks.tour import expected_groups\n\n\n"
        "def count_parameters_by_group(model):\n    return expected_groups(model)"
    ),
    "predict_cache_shapes": (
        "from autograder.checks import tour\nfrom transformers import AutoModelForCausalLM\n\n\n"
        "def predict_cache_shapes(config, batch, seq):\n"
        "    model = AutoModelForCausalLM.from_config(config).eval()\n"
        "    return tour._actual_cache_shapes(model, batch, seq)"
    ),
    "make_method": (
        "from autograder.reference import make_method  # the reference, if the kernel can see it"
    ),
    "prefix_forward": "from autograder.reference import prefix_forward",
    "SoftPrompt": "from autograder.reference import SoftPrompt",
}
"""Solution cells (by the name they define) replaced by calls into the grader's own code: the
"oracle" student. The grading sandbox hides every module that computes a graded answer."""


def _files(folder: Path, victim: str, assignment: str, course: Course) -> None:
    """What the symlink attacks hand in beside the notebook."""
    (folder / "notes.json").symlink_to(Path("..", "..", victim, assignment, f"{assignment}.ipynb"))
    (folder / "gradebook.txt").symlink_to(course.state / "gradebook.db")
    (folder / "loop").symlink_to("..")
    (folder / "timestamp.txt").write_text("2000-01-01 00:00:00.000000 UTC")
    script = "<script>fetch('/api/contents').then(r => r.text()).then(alert)</script>"
    (folder / "figure.html").write_text(f"<html><body>{script}</body></html>")
    (folder / "figure.svg").write_text(f'<svg xmlns="http://www.w3.org/2000/svg">{script}</svg>')


def with_attack(nb: NotebookNode, source: str, label: str) -> NotebookNode:
    """``nb`` with a cell running ``source`` inserted right after its setup cells."""
    nb = copy.deepcopy(nb)
    nb.cells.insert(_first_solution_index(nb), _new_code_cell(source, f"attack-{label}"))
    return nb


def make_attack_students(
    course: Course, assignment: str, out: Path, victim: str, port: int = 0, oracle: bool = True
) -> dict[str, str]:
    """One BLANK student per attack (``attack-<name>``), without artifacts; returns
    ``{student: attack}``. ``oracle``: also the student whose solutions call the grader's own
    reference (meaningful only where grading hides it, as ``grade`` does)."""
    pairs = notebooks_of(course, assignment)
    students = {}
    for name, source in ATTACKS.items():
        code = source.replace("{victim}", victim).replace("{port}", str(port))
        notebooks = {n: with_attack(released, code, name) for n, (released, _) in pairs.items()}
        student = f"attack-{name}"
        folder = write_submission(course, out, student, assignment, notebooks, artifacts=False)
        if name == "copy-through-symlinks":
            _files(folder, victim, assignment, course)
        students[student] = name
    oracles = {n: _with_oracles(released) for n, (released, _) in pairs.items()}
    if oracle and any(o is not None for o in oracles.values()):
        write_submission(course, out, "attack-oracle", assignment, oracles, False)
        students["attack-oracle"] = "oracle"
    deep = {n: "[" * 200_000 for n in pairs}
    write_submission(course, out, "attack-deep-json", assignment, deep, artifacts=False)
    students["attack-deep-json"] = "deep-json"
    flipped = {n: flip_flags(released) for n, (released, _) in pairs.items()}
    write_submission(course, out, "attack-flag-flips", assignment, flipped, artifacts=False)
    students["attack-flag-flips"] = "flag-flips"
    return students


def flip_flags(nb: NotebookNode) -> NotebookNode:
    """``nb`` with the nbgrader flags of its graded cells rewritten: every other hidden test
    made a "solution" (which nbgrader would leave to manual grading), the rest un-graded, and
    one test cell turned into markdown. nbgrader restores the source of such cells, not their
    flags; unrepaired, this makes nbgrader reject the whole notebook."""
    nb = copy.deepcopy(nb)
    tests = [c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade")]
    tests = [c for c in tests if c.cell_type == "code" and not c.metadata.nbgrader.get("solution")]
    for i, cell in enumerate(tests):
        if i % 2:
            cell.metadata.nbgrader["solution"] = True
        else:
            cell.metadata.nbgrader["grade"] = False
            cell.metadata.nbgrader.pop("points", None)
    if tests:
        cell = tests[-1]
        index = nb.cells.index(cell)
        md = nbformat.v4.new_markdown_cell(cell.source, metadata=cell.metadata)
        md.id = cell.get("id", md.id)
        nb.cells[index] = md
    return nb


def _with_oracles(released: NotebookNode) -> NotebookNode | None:
    """``released`` with every solution cell that defines a name of :data:`ORACLES` replaced by
    the oracle; None when it defines none of them."""
    nb = copy.deepcopy(released)
    found = False
    for cell in nb.cells:
        if not cell.get("metadata", {}).get("nbgrader", {}).get("solution"):
            continue
        for name, source in ORACLES.items():
            if f"def {name}(" in cell.source or f"class {name}" in cell.source:
                cell.source = source
                found = True
    return nb if found else None
