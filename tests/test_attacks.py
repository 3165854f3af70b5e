"""The attack suite: a class of adversarial students graded through the real pipeline.

Notebook 00 (every cell judged by the grader, no artifacts: fast) is released into a scratch
course; a solved "victim" and a blank student are graded in the same batch as one BLANK student
per attack of :mod:`autograder.pipeline.attacks` (rewriting the grader's files, the gradebook and
other students' folders, reading the solutions, the network, a fork bomb, memory and disk hogs, a
50 MB line of output, tampering with every layer a verdict used to pass through, forged and
symlinked observations, killing every process in sight, hidden-test markers in student text),
with the course's own configuration: sandboxed kernels, hidden reference implementations.

Each attack must: score nothing; leave the victim's score and files, the blank's score, the
grader's files and the gradebook as they were; and let the batch complete.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path

import nbformat
import pytest

from autograder.pipeline import attacks, classroom, sandbox
from autograder.pipeline.coursedir import CONFIG_NAME, REPO_ROOT, Course
from autograder.pipeline.grade import grade
from autograder.pipeline.release import build

ASSIGNMENT = "00_backbone_tour"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sandbox.status().available, reason=f"no sandbox here: {sandbox.status().message}"
    ),
]


def _tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (byte-code caches and git metadata left out)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in files:
            if path.is_file() and "__pycache__" not in path.parts and ".git" not in path.parts:
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _auto(result) -> tuple[float, float]:
    """(score, maximum) over the autograded cells of one notebook's result."""
    cells = [c for c in result.cells.values() if c.autograded]
    return sum(c.score or 0 for c in cells), sum(c.max_score for c in cells)


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("attacks")
    real = Course.at(REPO_ROOT)
    scratch = Course(root / "course")
    scratch.solutions.mkdir(parents=True)
    shutil.copy(real.root / CONFIG_NAME, scratch.root / CONFIG_NAME)
    shutil.copytree(real.solutions / ASSIGNMENT, scratch.solutions / ASSIGNMENT)
    build(real, [ASSIGNMENT], scratch.notebooks)
    submissions = root / "submissions"
    ((released, solved),) = classroom.notebooks_of(scratch, ASSIGNMENT).values()
    victim = classroom.write_submission(
        scratch, submissions, "victim", ASSIGNMENT, {ASSIGNMENT: solved}
    )
    classroom.write_submission(
        scratch, submissions, "blank", ASSIGNMENT, {ASSIGNMENT: released}, artifacts=False
    )
    # a correct notebook whose graded cells had their nbgrader flags rewritten
    classroom.write_submission(
        scratch, submissions, "flipped", ASSIGNMENT, {ASSIGNMENT: attacks.flip_flags(solved)}
    )
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    students = attacks.make_attack_students(scratch, ASSIGNMENT, submissions, "victim", port)
    guarded = (
        REPO_ROOT / "course",
        REPO_ROOT / "autograder",
        REPO_ROOT / "solutions",
        REPO_ROOT / CONFIG_NAME,
        scratch.root / CONFIG_NAME,
        scratch.solutions,
        victim,
    )
    before = _tree_hashes(*guarded)
    results, _ = grade(scratch, submissions, [ASSIGNMENT], workers=2)
    after = _tree_hashes(*guarded)
    try:
        connected = listener.accept()
    except BlockingIOError:
        connected = None
    finally:
        listener.close()
    by_student = {r.student: r for r in results}
    return scratch, students, by_student, before, after, connected


def test_the_batch_completes_and_the_victims_are_untouched(attacked) -> None:
    _, students, results, _, _, _ = attacked
    assert set(results) == {"victim", "blank", "flipped", *students}
    assert all(r.score is not None for r in results.values()), {
        s: r.status for s, r in results.items() if r.score is None
    }
    score, maximum = _auto(results["victim"])
    assert maximum > 0 and score == maximum, results["victim"].status
    assert _auto(results["blank"])[0] == 0


@pytest.mark.parametrize("attack", [*sorted(attacks.ATTACKS), "oracle", "deep-json", "flag-flips"])
def test_no_attack_scores(attacked, attack: str) -> None:
    _, _, results, _, _, _ = attacked
    result = results[f"attack-{attack}"]
    assert _auto(result)[0] == 0, (result.status, {n: c.score for n, c in result.cells.items()})
    assert not any(i.kind == "error" for i in result.issues), result.status


def test_the_graders_files_and_the_gradebook_are_unchanged(attacked) -> None:
    scratch, students, _, before, after, _ = attacked
    changed = sorted(k for k in before if before[k] != after.get(k))
    assert not changed, changed
    assert not (REPO_ROOT / "autograder" / "checks" / "owned.py").exists()
    with scratch.gradebook() as gb:
        names = {s.id for s in gb.students}
    assert names == {"victim", "blank", "flipped", *students}


def test_nothing_reached_the_network(attacked) -> None:
    assert attacked[5] is None, "an attacker connected to the grader's localhost"


def test_attack_outcomes_are_reported(attacked) -> None:
    scratch, _, results, _, _, _ = attacked
    tampered = results["attack-verdict-tampering"]
    assert "tampering" in tampered.status, tampered.status
    notebook = scratch.autograded / "attack-huge-output" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    assert notebook.stat().st_size < 5_000_000
    feedback = scratch.feedback / "attack-hidden-test-markers" / ASSIGNMENT / f"{ASSIGNMENT}.html"
    assert feedback.is_file()
    graded = nbformat.read(
        scratch.autograded / "attack-read-solutions" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb",
        as_version=4,
    )
    printed = "".join(o.get("text", "") for c in graded.cells for o in c.get("outputs", []))
    assert "BEGIN SOLUTION" not in printed and "refused" in printed
    # a student's exception named like the grader's own errors reports nothing false
    faker = results["attack-fake-grader-errors"]
    assert "tampering" in faker.status and not faker.failed, faker.status
    # symlinks and a forged timestamp are left out, and said so
    linker = results["attack-copy-through-symlinks"].status
    assert "left out of the submission" in linker and "a symlink" in linker, linker
    assert "timestamp.txt" in linker
    # active content Formgrader would serve from the instructor's origin is never copied in
    assert "figure.html" in linker and "figure.svg" in linker, linker
    graded = scratch.autograded / "attack-copy-through-symlinks" / ASSIGNMENT
    assert not list(graded.glob("figure.*"))
    assert "malformed" in results["attack-deep-json"].status
    # rewritten nbgrader flags are restored from the release: graded as released, and said so
    flipped = results["flipped"]
    score, maximum = _auto(flipped)
    assert maximum == _auto(results["victim"])[1] and score == maximum, flipped.status
    assert "restored from the release" in flipped.status, flipped.status
    assert "restored from the release" in results["attack-flag-flips"].status


def _nbgrader_fails(job):
    """A worker's job that fails, after noting the score the gradebook holds while it runs (an
    instructor who interrupts a stuck regrade finds that one)."""
    from autograder.pipeline.grade import JobResult

    with Course.at(job.root).gradebook() as gb:
        during = gb.find_submission(job.assignment, job.student).score
    (Path(job.root) / "score-during-the-run.txt").write_text(str(during))
    return JobResult(False, "simulated nbgrader failure", "-", 0.0)


def test_a_regrade_that_fails_keeps_no_earlier_score(attacked, monkeypatch) -> None:
    """A resubmission that makes nbgrader fail must not leave the last score standing (runs
    last: it regrades the victim)."""
    from autograder.pipeline import grade as grading

    scratch, _, results, _, _, _ = attacked
    assert _auto(results["victim"])[0] > 0
    monkeypatch.setattr(grading, "_run_job", _nbgrader_fails)  # the forked workers inherit it
    resubmitted = scratch.root.parent / "resubmitted"
    shutil.copytree(scratch.root.parent / "submissions" / "victim", resubmitted / "victim")
    again, _ = grade(scratch, resubmitted, [ASSIGNMENT], workers=1)
    (victim,) = [r for r in again if r.student == "victim"]
    assert _auto(victim)[0] == 0, victim.status
    assert float((scratch.root / "score-during-the-run.txt").read_text()) == 0
    assert "simulated nbgrader failure" in victim.status, victim.status
    assert "review by hand" in victim.status, victim.status
    assert not (scratch.autograded / "victim" / ASSIGNMENT).exists()
