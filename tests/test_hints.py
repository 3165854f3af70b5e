"""Collapsible hints, expected times and "Going further" sections (issue 13, deliverable 7).

A hint is a ``<details><summary>…</summary> … </details>`` block in a markdown cell. The release
refuses a block that would show a student nothing (no summary, an empty summary or an empty
body), naming the notebook and the cell; the real notebooks pass.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from test_pipeline import ASSIGNMENT, cli, make_course, released

from autograder.pipeline.coursedir import REPO_ROOT, Course, CourseError
from autograder.pipeline.release import check_hints, hint_problems

COURSE = Course.at(REPO_ROOT)
HINTED = {  # notebook -> the graded functions with hints (the six hardest of the course)
    "02_prefix_tuning": ["prefix_encoder", "prefix_forward", "deep_prompt_forward"],
    "04_serving": ["mixed_prefix_forward", "mixed_generate"],
    "05_debugging": ["checkpoint_safe_prefix_forward"],
}
WITH_TIME = ["00_backbone_tour", "01_prompt_tuning", "02_prefix_tuning", "03_experiments"]
WITH_TIME += ["04_serving", "05_debugging"]
PAPERS = {"2104.08691", "2101.00190", "2110.07602", "2203.12119", "2107.13586"}


def solution(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COURSE.solutions / name / f"{name}.ipynb", as_version=4)


def student(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COURSE.notebooks / name / f"{name}.ipynb", as_version=4)


def grade_id(cell: nbformat.NotebookNode) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def notebook_with(source: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# title"), nbformat.v4.new_markdown_cell(source)]
    return nb


# --- the validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in COURSE.solutions.iterdir() if p.is_dir()))
def test_every_solution_notebooks_hints_are_well_formed(name):
    assert hint_problems(solution(name), name) == []


def test_the_release_check_passes_on_the_real_course():
    check_hints(COURSE, COURSE.resolve(None))  # raises CourseError on a bad hint


GOOD = "<details><summary>Hint 1: shapes</summary>\n\nThe mask is `(B, P+T)`.\n\n</details>"
BAD = {
    "empty body": (
        "<details><summary>Hint 1: shapes</summary>\n\n</details>",
        "('Hint 1: shapes') is empty",
    ),
    "body of tags only": (
        "<details><summary>Hint 1: shapes</summary><p> </p></details>",
        "is empty",
    ),
    "no summary": ("<details>\n\nThe mask is `(B, P+T)`.\n\n</details>", "has no <summary>"),
    "empty summary": ("<details><summary> </summary>text</details>", "has an empty <summary>"),
    "unclosed": ("<details><summary>Hint 1</summary>\n\ntext", "2 <details> but 1 </details>"),
}


def test_a_well_formed_hint_passes():
    assert hint_problems(notebook_with(GOOD), "nb.ipynb") == []
    assert hint_problems(notebook_with(GOOD + "\n\n" + GOOD), "nb.ipynb") == []


@pytest.mark.parametrize("fault", sorted(BAD))
def test_a_hint_without_content_is_named_with_notebook_and_cell(fault):
    source, message = BAD[fault]
    problems = hint_problems(notebook_with(GOOD + "\n\n" + source), "nb.ipynb")
    assert len(problems) == 1, problems
    assert problems[0].startswith("nb.ipynb: cell 1 "), problems
    assert message in problems[0], problems


def test_a_details_block_in_a_code_cell_is_not_a_hint():
    nb = notebook_with(GOOD)
    nb.cells.append(nbformat.v4.new_code_cell('html = "<details></details>"'))
    assert hint_problems(nb, "nb.ipynb") == []


def test_release_refuses_an_empty_hint_and_releases_a_filled_one(tmp_path: Path):
    course = make_course(tmp_path / "course")
    path = course.solutions / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    nb = nbformat.read(path, as_version=4)
    empty = nbformat.v4.new_markdown_cell(BAD["empty body"][0])
    nb.cells.insert(1, empty)
    nbformat.write(nb, path)
    for args in (("release",), ("release", "--check")):
        done = cli(course, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert f"solutions/{ASSIGNMENT}/{ASSIGNMENT}.ipynb: cell 1" in done.stderr, done.stderr
        assert "is empty" in done.stderr, done.stderr
    assert not released(course).exists(), "nothing is released while a hint is empty"
    with pytest.raises(CourseError, match="cell 1"):
        check_hints(course, [ASSIGNMENT])

    empty.source = GOOD
    nbformat.write(nb, path)
    assert cli(course, "release").returncode == 0
    assert GOOD in [c.source for c in nbformat.read(released(course), as_version=4).cells]


# --- the course's hints, times and "Going further" --------------------------------------------
@pytest.mark.parametrize("name", sorted(HINTED))
def test_each_hint_cell_sits_right_before_its_function_with_two_or_three_levels(name):
    for nb in (solution(name), student(name)):
        cells = nb.cells
        hinted = []
        for i, cell in enumerate(cells):
            if cell.cell_type != "markdown" or "<details><summary>Hint" not in cell.source:
                continue
            after = cells[i + 1]
            assert after.metadata.get("nbgrader", {}).get("solution"), (name, i)
            hinted.append(grade_id(after))
            levels = [int(n) for n in re.findall(r"<summary>Hint (\d):", cell.source)]
            assert levels in ([1, 2], [1, 2, 3]), (name, grade_id(after), levels)
            assert "### BEGIN SOLUTION" not in cell.source
        assert hinted == HINTED[name]
    assert sum(len(v) for v in HINTED.values()) == 6


@pytest.mark.parametrize("name", WITH_TIME)
def test_expected_time_comes_first_and_the_compute_budget_is_an_instructor_note(name):
    header = solution(name).cells[0].source
    time = re.search(
        r"\*\*Expected time\*\* \(an estimate[^)]*\): about [\d.]+–[\d.]+ hours", header
    )
    assert time, name
    assert (
        time.start() < header.index("Compute budget (for instructors") < header.index("**Budget.**")
    )
    assert student(name).cells[0].source == header


@pytest.mark.parametrize("name", WITH_TIME)
def test_going_further_ends_the_notebook_with_challenges_and_real_paper_links(name):
    last = solution(name).cells[-1]
    assert last.cell_type == "markdown" and last.source.startswith("## Going further")
    challenges = re.findall(r"^\*\*\d\. ", last.source, re.M)
    assert 2 <= len(challenges) <= 3, name
    assert last.source.count("*Observe:*") == len(challenges), name
    cited = set(re.findall(r"https://arxiv\.org/abs/(\d{4}\.\d{5})", last.source))
    assert cited and cited <= PAPERS, cited - PAPERS
    assert student(name).cells[-1].source == last.source
