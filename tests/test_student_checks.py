"""The visible checks work in a student package, which has no ``autograder.reference``,
``autograder.bugzoo`` or ``autograder.pipeline``: their judges answer from the stored reference
results (:mod:`autograder.checks.fixtures`), and judge exactly as the full checks do.

One subprocess (``tests/replay_tools.py``) makes those packages unimportable and runs every
visible check on the reference's objects, every must-pass variant and every known-buggy twin
that replaces one of the check's objects (notebook 00: the solutions and twins of
``tests/test_checks_tour.py``), plus probes of inputs no recording has seen. Meanwhile this
process runs the same jobs with the real reference. Then:

* the reference's objects and every must-pass variant pass in replay;
* every twin fails each check its ``fails`` or ``downstream`` names, with an AssertionError;
* every job's replay verdict — pass, or the failure message itself — equals the full one;
* a call the stored results do not know fails plainly (no KeyError, no replay traceback).

The stored results must also be current: recorded from today's reference, bug zoo, checks and
library versions (``python -m autograder.checks.fixtures --write`` regenerates them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import replay_tools

from autograder.bugzoo import BUGS
from autograder.checks import CHECKS, NOTEBOOK_CHECKS, fixtures

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN = "your code gave this check different inputs than a correct implementation does"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``{"full": verdicts with the reference, "replay": what the subprocess reports}``."""
    tmp = tmp_path_factory.mktemp("replay")
    jobs = replay_tools.jobs()
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "replay_tools.py"), str(tmp / "jobs.json"),
         str(tmp / "out.json")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:  # the full verdicts, on the other core meanwhile
        arguments = replay_tools.Arguments()
        full = {f"{s}|{c}": replay_tools.verdict(c, arguments(s, c)) for s, c in jobs}
        import autograder.reference as real

        probes = replay_tools.probes(real)
        full_probes = {n: replay_tools.verdict(c, a) for n, (c, a) in probes.items()}
        _, err = child.communicate(timeout=900)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err[-4000:]
    replay = json.loads((tmp / "out.json").read_text())
    return {"jobs": jobs, "full": full, "full_probes": full_probes, "replay": replay}


def _show(problems: list[str], limit: int = 8) -> str:
    return "\n".join(problems[:limit]) + (f"\n... {len(problems)} in all" if problems else "")


def test_the_subprocess_is_a_student_package(runs) -> None:
    env = runs["replay"]["env"]
    assert env["replay"] is True
    assert env["imports"] == dict.fromkeys(replay_tools.BLOCKED, "ModuleNotFoundError")


def test_every_visible_check_is_run(runs) -> None:
    checks = {c for _, c in runs["jobs"]}
    assert checks == set(fixtures.VISIBLE_CHECKS)


@pytest.mark.parametrize("check", fixtures.VISIBLE_CHECKS)
def test_reference_passes_in_replay(runs, check: str) -> None:
    source = "reference" if check in CHECKS else "tour:solution"
    assert runs["replay"]["verdicts"][f"{source}|{check}"] is None


def test_must_pass_variants_pass_in_replay(runs) -> None:
    failed = [
        f"{key}: {verdict[:300]}"
        for key, verdict in runs["replay"]["verdicts"].items()
        if key.startswith("variant:") and verdict is not None
    ]
    assert failed == [], _show(failed)


def test_bug_twins_fail_their_checks_in_replay(runs) -> None:
    expected, wrong = 0, []
    for key, verdict in runs["replay"]["verdicts"].items():
        source, check = key.split("|")
        if not source.startswith("bug:"):
            continue
        bug = BUGS[source.removeprefix("bug:")]
        if check in bug.fails or check in bug.downstream:
            expected += 1
            if verdict is None or not verdict.startswith("FAIL: "):
                wrong.append(f"{key}: {verdict if verdict is None else verdict[:300]}")
    assert expected >= sum(len(b.fails) for b in BUGS.values())
    assert wrong == [], _show(wrong)


def test_replay_verdicts_equal_the_full_verdicts(runs) -> None:
    """Pass or fail, and the failure's message, for every job: reference, variants, twins."""
    full, replay = runs["full"], runs["replay"]["verdicts"]
    assert set(full) == set(replay)
    differ = [
        f"{key}:\n  full: {(full[key] or 'pass')[:300]}\n  replay: {(replay[key] or 'pass')[:300]}"
        for key in full
        if full[key] != replay[key]
    ]
    assert differ == [], _show(differ)
    crashed = [key for key, verdict in replay.items() if verdict and verdict.startswith("ERROR")]
    assert crashed == []


def test_an_unknown_call_fails_plainly(runs) -> None:
    """Generated tokens no recorded implementation produced: the full check explains the
    mistake; the replay cannot run the reference on them and says so, naming the step."""
    full, replay = runs["full_probes"], runs["replay"]["probes"]
    assert full["generate_one_token_off"].startswith("FAIL: ")
    assert "greedy choices" in full["generate_one_token_off"]
    got = replay["generate_one_token_off"]
    assert got.startswith("FAIL: check_generate_with_prefix: " + UNKNOWN), got
    assert "the reference's prefix_forward(...)" in got
    assert "KeyError" not in got and "Traceback" not in got


def test_a_valid_prompt_with_other_random_draws_is_judged_in_replay(runs) -> None:
    """check_prompt_training starts training from the grader's values, not the student's random
    draws, so a valid SoftPrompt whose draws no recorded implementation makes is judged from
    stored results exactly as by the full check."""
    assert runs["full_probes"]["soft_prompt_other_seed"] is None
    assert runs["replay"]["probes"]["soft_prompt_other_seed"] is None


def test_the_replay_refuses_what_it_cannot_know(runs) -> None:
    probes = runs["replay"]["probes"]
    assert (
        "cover only the visible inputs (variant 0), not variant 918273" in probes["other_variant"]
    )
    assert "tiny test models built here differ" in probes["other_model"]
    if fixtures.recorded_versions() == fixtures._versions():  # not an install issue then
        assert "restart the kernel" in probes["other_model"]
    else:  # the compatibility run on the oldest transformers: the message names the versions
        assert "recorded with" in probes["other_model"], probes["other_model"]
    assert "needs the reference's no_such_function" in probes["no_such_function"]
    assert not any(p.startswith("ERROR") for p in probes.values() if p), probes


@pytest.mark.parametrize("layout", ["no concept module", "01-02 unlocked"])
def test_the_packaged_reference_layouts(runs, layout: str) -> None:
    """``python -m autograder package`` ships ``autograder/reference/__init__.py`` and the
    concept modules of unlocked notebooks only: real where present, replayed elsewhere."""
    result = runs["replay"]["layouts"][layout]
    assert result["kind"] == "_Partial"
    failed = {k: v for k, v in result["verdicts"].items() if v is not None}
    assert failed == {}
    assert len(result["verdicts"]) == len(fixtures.VISIBLE_CHECKS)


# ---------------------------------------------------------------------------------------------
# the stored results and the judges' access to the reference
# ---------------------------------------------------------------------------------------------
def test_the_stored_results_are_current() -> None:
    """Sources and stored tensors; the library versions only say what was recorded with (the
    replay tests above run on the oldest transformers of the range too, in CI)."""
    reasons = fixtures.stale_reasons(versions=False)
    assert reasons == [], (
        "the stored reference results in autograder/checks/fixture_data are stale ("
        + "; ".join(reasons)
        + f"): regenerate them with `{fixtures.REGENERATE}` and commit the result"
    )


def test_the_stored_results_are_small() -> None:
    size = sum(p.stat().st_size for p in fixtures.DATA_DIR.iterdir())
    assert size < 3_000_000


def test_the_stored_results_ship_as_package_data() -> None:
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "fixture_data/*" in data["package-data"]["autograder.checks"]


def test_judges_reach_the_reference_only_through_fixtures() -> None:
    direct = re.compile(
        r"^\s*(from autograder\.reference\b|import autograder\.reference\b"
        r"|from autograder import .*\breference\b)"
    )
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted((ROOT / "autograder" / "checks").glob("*.py"))
        if path.name not in ("fixtures.py", "quiz.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if direct.search(line)
    ]
    assert offenders == []


def test_the_visible_checks_are_those_the_notebooks_call() -> None:
    called = set()
    for path in sorted((ROOT / "solutions").glob("*/*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            for module, name in re.findall(r"selfcheck\.run\(\s*checks\.(\w+)\.(\w+)", source):
                assert NOTEBOOK_CHECKS[name][0] == module, (path.name, name)
                called.add(name)
    assert called == set(fixtures.VISIBLE_CHECKS)
