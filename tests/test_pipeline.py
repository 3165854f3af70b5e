"""The instructor pipeline end to end, on a tiny fixture course (``tests/fixtures/course``).

Every command runs as ``python -m autograder --root <copy of the fixture>`` in a subprocess,
as an instructor would run it. The fixture assignment has two tested functions (2 + 1 points),
a saved artifact scored under grading (1 point) and a written answer (1 point, by hand).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook

from autograder.pipeline import classroom
from autograder.pipeline.coursedir import REPO_ROOT, Course
from autograder.pipeline.release import compare

FIXTURE = Path(__file__).parent / "fixtures" / "course"
ASSIGNMENT = "99_fixture"
AUTO_POINTS = 4.0  # test_square 2 + test_cube 1 + test_artifact 1; "explain" is graded by hand
HIDDEN_TEXT = ("HIDDEN_SQUARE_MARKER", "HIDDEN_CUBE_MARKER", "hidden_input")


def make_course(root: Path, artifact: bool = True) -> Course:
    """A copy of the fixture course with this repo's config, a 5 s cell limit and, with
    ``artifact``, the file the instructor's run of the solution saved (``answer.pt``)."""
    shutil.copytree(FIXTURE, root)
    config = (REPO_ROOT / "nbgrader_config.py").read_text()
    (root / "nbgrader_config.py").write_text(config + "\nc.Execute.timeout = 5\n")
    if artifact:
        (root / "solutions" / ASSIGNMENT / "answer.pt").write_text("49")
    return Course.at(root)


def cli(course: Course, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m autograder --root <course> ARGS``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "autograder", "--root", str(course.root), *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def released(course: Course) -> Path:
    return course.notebooks / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"


def set_cell(nb: nbformat.NotebookNode, grade_id: str, source: str) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == grade_id:
            cell.source = source
    return nb


# --- release ---------------------------------------------------------------------------------
def test_plain_nbgrader_generate_leaves_the_instructors_artifacts_out(tmp_path: Path) -> None:
    """Formgrader's "Generate" and ``nbgrader generate_assignment`` use nbgrader_config.py
    directly: the instructor's trained ``answer.pt`` must not reach the release there either."""
    course = make_course(tmp_path / "course")
    (course.solutions / ASSIGNMENT / "answer.pt.backbone.json").write_text("{}")
    (course.solutions / ASSIGNMENT / "data.txt").write_text("a file students need")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "nbgrader", "generate_assignment", ASSIGNMENT, "--force"],
        cwd=course.root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    release = course.notebooks / ASSIGNMENT
    assert sorted(p.name for p in release.iterdir()) == ["99_fixture.ipynb", "data.txt"]
    assert "Not released: answer.pt" in done.stderr


def test_release_is_deterministic_and_check_finds_stale_notebooks(tmp_path: Path) -> None:
    course = make_course(tmp_path / "course")
    first = cli(course, "release")
    assert first.returncode == 0, first.stderr
    text = released(course).read_text()
    assert not (course.notebooks / ASSIGNMENT / "answer.pt").exists(), "artifacts are not released"
    for secret in ("BEGIN SOLUTION", "return x * x", "0 * 0 * 0", *HIDDEN_TEXT):
        assert secret not in text
    assert "YOUR CODE HERE" in text and "YOUR ANSWER HERE" in text
    nb = nbformat.reads(text, as_version=4)
    assert all(
        not c.get("outputs") and c.get("execution_count") is None
        for c in nb.cells
        if c.cell_type == "code"
    )

    assert cli(course, "release").returncode == 0
    assert released(course).read_text() == text, "a second release must be byte-identical"
    check = cli(course, "release", "--check")
    assert check.returncode == 0 and "up to date" in check.stdout

    source = course.solutions / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    original = source.read_text()
    nbformat.write(
        set_cell(
            nbformat.read(source, as_version=4),
            "test_cube",
            "check_cube(cube)\nassert cube(0) == 0",
        ),
        source,
    )
    stale = cli(course, "release", "--check")
    assert stale.returncode == 1
    assert f"stale: notebooks/{ASSIGNMENT}/{ASSIGNMENT}.ipynb" in stale.stdout
    assert "test_cube" in stale.stdout

    source.write_text(original)  # undo: up to date again
    saved = nbformat.read(released(course), as_version=4)  # as JupyterLab saves it after Validate
    saved.metadata["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "x"}
    saved.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for cell in saved.cells:
        cell.metadata["trusted"] = True
    released(course).write_text(nbformat.writes(saved, version=4).replace("\n ", "\n  "))
    assert cli(course, "release", "--check").returncode == 0, "a saved notebook is not stale"
    code = next(c for c in saved.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="16\n")]
    nbformat.write(saved, released(course))
    with_outputs = cli(course, "release", "--check")
    assert with_outputs.returncode == 1 and "1 cell(s) changed" in with_outputs.stdout

    lacking = tmp_path / "lacking"
    (lacking / ASSIGNMENT).mkdir(parents=True)
    (lacking / ASSIGNMENT / "extra.txt").write_text("")
    problems = compare(course.notebooks, lacking, [ASSIGNMENT])
    assert problems == [
        f"missing: notebooks/{ASSIGNMENT}/{ASSIGNMENT}.ipynb",
        f"not generated from solutions/: notebooks/{ASSIGNMENT}/extra.txt",
    ]


def test_clear_errors_for_bad_input(tmp_path: Path) -> None:
    course = make_course(tmp_path / "course")
    unknown = cli(course, "release", "--assignment", "42")
    assert unknown.returncode == 2 and "unknown assignment '42'" in unknown.stderr
    missing = cli(course, "grade", tmp_path / "nowhere")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    not_a_course = subprocess.run(
        [sys.executable, "-m", "autograder", "--root", str(tmp_path), "release"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert not_a_course.returncode == 2 and "nbgrader_config.py" in not_a_course.stderr


# --- grading a class with every fault ----------------------------------------------------------
FAULT_STATUS = {
    "fault-crash": "crash: the kernel died",
    "fault-kill": "crash: the kernel died",
    "fault-loop": "hang:",
    "fault-duplicate": "duplicate: graded cell 'square' appears 2 times",
    "fault-deleted": "deleted: graded cell 'test_square' was deleted; restored",
    "fault-malformed": "malformed: 99_fixture.ipynb is not valid JSON",
    "fault-missing": "missing: 99_fixture.ipynb was not handed in",
}


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory: pytest.TempPathFactory):
    """Release the fixture, write a class (solution, blank, wrong artifact, hidden-test failure,
    many deleted cells, and one student per fault) and grade it with two workers."""
    root = tmp_path_factory.mktemp("class")
    course = make_course(root / "course")
    assert cli(course, "release").returncode == 0
    submissions = root / "submissions"
    ((_, done),) = classroom.notebooks_of(course, ASSIGNMENT).values()
    blank = nbformat.read(released(course), as_version=4)
    write = classroom.write_submission
    write(course, submissions, "solution", ASSIGNMENT, {ASSIGNMENT: done})
    write(course, submissions, "blank", ASSIGNMENT, {ASSIGNMENT: blank}, artifacts=False)
    wrong = write(course, submissions, "wrong-artifact", ASSIGNMENT, {ASSIGNMENT: done})
    (wrong / "answer.pt").write_text("48")  # must not be replaced by the instructor's 49
    hidden = set_cell(nbformat.from_dict(done), "square", "def square(x):\n    return 3 * x")
    write(course, submissions, "hidden-fail", ASSIGNMENT, {ASSIGNMENT: hidden})
    gutted = nbformat.from_dict(done)  # stock nbgrader aborts on this one (KeyError 'question')
    gutted.cells = [
        c
        for c in gutted.cells
        if c.metadata.get("nbgrader", {}).get("grade_id")
        not in ("setup", "square", "test_square", "explain")
    ]
    write(course, submissions, "deleted-more", ASSIGNMENT, {ASSIGNMENT: gutted})
    # code beside the notebook would come first on the kernel's sys.path: it must be removed
    shadow = write(course, submissions, "shadow", ASSIGNMENT, {ASSIGNMENT: done})
    failing = (
        "def check_square(f):\n    raise AssertionError('SHADOWED')\n\ncheck_cube = check_square\n"
    )
    (shadow / "fixturechecks.py").write_text(failing)
    (shadow / "autograder").mkdir()
    (shadow / "autograder" / "__init__.py").write_text("raise ImportError('SHADOWED')\n")
    classroom.make_fault_students(course, ASSIGNMENT, submissions)
    out = root / "grades.csv"
    run = cli(course, "grade", submissions, "--workers", "2", "--csv", out)
    with out.open() as handle:
        rows = {row["student"]: row for row in csv.DictReader(handle)}
    return course, run, rows


def test_every_student_is_graded_and_every_fault_reported(graded_class) -> None:
    _, run, rows = graded_class
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr == "", "grading noise belongs in .nbgrader/logs, not on stderr"
    assert len(rows) == 6 + len(FAULT_STATUS)
    assert float(rows["solution"]["score"]) == AUTO_POINTS
    assert rows["solution"]["status"] == "1 cell(s) to grade by hand"
    assert float(rows["blank"]["score"]) == 0
    assert float(rows["wrong-artifact"]["score"]) == AUTO_POINTS - 1
    assert float(rows["hidden-fail"]["score"]) == AUTO_POINTS - 2
    assert float(rows["deleted-more"]["score"]) == AUTO_POINTS - 2, "square is back as its stub"
    assert float(rows["shadow"]["score"]) == AUTO_POINTS, rows["shadow"]
    shadow = rows["shadow"]["status"]
    assert "removed code handed in beside the notebooks: autograder/" in shadow, shadow
    assert "fixturechecks.py (not a notebook, artifact, data or image file)" in shadow, shadow
    for restored in ("read-only cell 'setup'", "solution cell 'square'", "graded cell 'explain'"):
        assert restored in rows["deleted-more"]["status"]
    for student, status in FAULT_STATUS.items():
        assert status in rows[student]["status"], rows[student]
    for student in ("fault-crash", "fault-kill", "fault-loop", "fault-duplicate", "fault-deleted"):
        assert float(rows[student]["score"]) == AUTO_POINTS, rows[student]
    for student in ("fault-malformed", "fault-missing"):
        assert float(rows[student]["score"]) == 0 and rows[student]["max_score"] == "5.0"


def test_feedback_shows_no_hidden_test(graded_class) -> None:
    course, _, _ = graded_class
    feedback = course.feedback / "hidden-fail" / ASSIGNMENT / f"{ASSIGNMENT}.html"
    text = feedback.read_text()
    assert "square is wrong for a negative input" in text, "the failing check's message is shown"
    for student in ("solution", "blank", "hidden-fail", "fault-crash"):
        html = (course.feedback / student / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
        assert not [s for s in HIDDEN_TEXT if s in html], student


def test_regrade_keeps_manual_grades(graded_class, tmp_path: Path) -> None:
    course, _, _ = graded_class
    with course.gradebook() as gb:
        gb.find_grade("explain", ASSIGNMENT, ASSIGNMENT, "solution").manual_score = 1.0
        gb.db.commit()
    again = tmp_path / "again"
    shutil.copytree(course.root.parent / "submissions" / "solution", again / "solution")
    run = cli(course, "grade", again)
    assert run.returncode == 0, run.stdout + run.stderr
    with Gradebook(course.db_url, "") as gb:
        assert gb.find_submission(ASSIGNMENT, "solution").score == AUTO_POINTS + 1
        assert gb.find_submission(ASSIGNMENT, "blank").score == 0, "other students are kept"


def test_parallel_workers_grade_several_assignments_of_one_student(tmp_path: Path) -> None:
    """Two autograders starting the same student's two assignments at once both used to insert
    the student into the gradebook, and one failed (UNIQUE constraint failed: student.id)."""
    course = make_course(tmp_path / "course")
    second = course.solutions / "98_second"
    second.mkdir()
    shutil.copy(course.solutions / ASSIGNMENT / "answer.pt", second / "answer.pt")
    shutil.copy(course.solutions / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", second / "98_second.ipynb")
    assert cli(course, "release").returncode == 0
    submissions = tmp_path / "submissions"
    for assignment in ("98_second", ASSIGNMENT):
        ((_, done),) = classroom.notebooks_of(course, assignment).values()
        for student in ("ann", "bob"):
            classroom.write_submission(course, submissions, student, assignment, {assignment: done})
    out = tmp_path / "grades.csv"
    run = cli(course, "grade", submissions, "--workers", "2", "--csv", out)
    assert run.returncode == 0, run.stdout + run.stderr
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert all(float(row["score"]) == AUTO_POINTS for row in rows), rows


# --- verify ----------------------------------------------------------------------------------
def test_verify_flags_false_passes_and_false_fails(tmp_path: Path) -> None:
    course = make_course(tmp_path / "course", artifact=False)
    run = cli(course, "verify", "--bugs", "fixturebugs")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "a solved run saved answer.pt" in run.stdout, "solutions/ had no artifact"
    lines = {line.split()[1]: line for line in run.stdout.splitlines() if "99_fixture  " in line}
    assert lines["solution"].rstrip().endswith("ok")
    assert lines["blank"].rstrip().endswith("ok")
    assert lines["bug-square-linear"].rstrip().endswith("ok")
    assert lines["bug-cube-as-square"].rstrip().endswith("ok")
    assert "FALSE PASS in test_cube" in lines["bug-cube-slow"]
    assert "FALSE FAIL in test_cube" in lines["bug-both-wrong"]


# --- no sandbox: refuse, or grade --unsafe and say so everywhere -----------------------------
def test_grading_refuses_without_a_sandbox_unless_unsafe(tmp_path: Path, monkeypatch) -> None:
    from autograder.pipeline import sandbox
    from autograder.pipeline.coursedir import CourseError
    from autograder.pipeline.grade import UNSAFE, grade

    course = make_course(tmp_path / "course")
    assert cli(course, "release").returncode == 0
    ((_, done),) = classroom.notebooks_of(course, ASSIGNMENT).values()
    submissions = tmp_path / "submissions"
    classroom.write_submission(course, submissions, "ann", ASSIGNMENT, {ASSIGNMENT: done})
    missing = sandbox.SandboxStatus(False, "none", "cannot create namespaces", "sysctl -w x=1")
    monkeypatch.setattr(sandbox, "status", lambda refresh=False: missing)
    with pytest.raises(CourseError, match="cannot create namespaces.*sysctl -w x=1.*--unsafe"):
        grade(course, submissions)
    results, _ = grade(course, submissions, unsafe=True)
    assert [r.score for r in results] == [AUTO_POINTS]
    assert all(UNSAFE in r.status for r in results), [r.status for r in results]
