"""nbgrader configuration for the Soft Prompts Course; the course root is the folder of this file.

nbgrader reads this file only from the current directory: run ``nbgrader ...`` from here, or use
``python -m autograder ...`` (it loads this file explicitly and works from any directory).

- ``solutions/NN_name/`` are the instructor sources, ``notebooks/NN_name/`` the student releases.
- The gradebook lives in ``.nbgrader/`` (git-ignored); ``?timeout=60`` lets several autograde
  processes share the sqlite file.
- Grading kernels get the part of this process's environment that libraries read, with warnings
  and progress bars switched off (nbgrader scores a test cell 0 as soon as it writes anything to
  stderr). Loading this file changes nothing in the server's own environment.
- A cell that crashes the kernel or keeps running after the timeout's interrupt no longer aborts
  the whole submission: ``ResilientExecute`` records the error in that cell, restarts the kernel,
  runs the earlier cells again and carries on.
- Test cells are scored by the GRADER, not from what the kernel displays: the kernel only records
  observations of the student's code on secret inputs; ``GradedExecute`` judges them in its own
  process and writes the verdicts into the cells (``autograder/pipeline/verdicts.py``).
- Grading kernels are "warm" (Linux): forked from one process that has already imported torch,
  transformers, the course and the checks, which saves about 8 s per notebook; each notebook
  still gets its own kernel process (``autograder/pipeline/warm.py``).
- Files a student saved next to the notebook (``prefix.pt`` ...) are never overwritten by the
  instructor's copies of the same name, and the instructor's copies never enter a release.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if (ROOT / "autograder").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the custom preprocessors below live in this repo

from nbconvert.preprocessors import ClearMetadataPreprocessor, CSSHTMLHeaderPreprocessor  # noqa: E402
from nbgrader import preprocessors  # noqa: E402

from autograder.pipeline.coursedir import ARTIFACT_PATTERNS  # noqa: E402
from autograder.pipeline.feedback import HideHiddenTests  # noqa: E402
from autograder.pipeline.outputs import LimitOutputBytes, SanitizeStudentContent  # noqa: E402
from autograder.pipeline.release import keep_artifacts_out_of_releases  # noqa: E402
from autograder.pipeline.verdicts import GradedExecute  # noqa: E402

c = get_config()  # noqa: F821  (provided by traitlets when it executes this file)

c.CourseDirectory.root = str(ROOT)
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "notebooks"
(ROOT / ".nbgrader").mkdir(exist_ok=True)
c.CourseDirectory.db_url = f"sqlite:///{ROOT / '.nbgrader' / 'gradebook.db'}?timeout=60"
# Submissions arrive as folders (`python -m autograder grade SUBMISSIONS`), not through nbgrader's
# exchange; a course-local exchange keeps Formgrader from warning about a missing system folder.
(ROOT / ".nbgrader" / "exchange").mkdir(exist_ok=True)
c.Exchange.root = str(ROOT / ".nbgrader" / "exchange")

# Execution: a deliberate per-cell limit; interrupt, then recover instead of aborting.
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True
c.Execute.raise_on_iopub_timeout = False
# Fork each grading kernel from one process that has imported torch, transformers, the course and
# the checks (Linux only; autograder/pipeline/warm.py). False: start every kernel from scratch.
c.ResilientExecute.warm_kernels = True
c.Autograde.autograde_preprocessors = [
    GradedExecute,
    preprocessors.IgnorePattern,
    ClearMetadataPreprocessor,
    preprocessors.LimitOutput,
    LimitOutputBytes,
    SanitizeStudentContent,  # no student script runs in the instructor's Formgrader session
    preprocessors.SaveAutoGrades,
    preprocessors.AssignLatePenalties,
    preprocessors.CheckCellMetadata,
]

# Stderr noise must not zero a passing test cell. Grading kernels get PYTHONWARNINGS=ignore,
# TQDM_DISABLE=1 and TRANSFORMERS_VERBOSITY=error in their own environment
# (autograder.pipeline.sandbox.GRADING_ENV); this file never changes os.environ, so a JupyterLab
# or Formgrader server that loads it keeps progress bars and warnings in students' kernels.
c.IgnorePattern.enabled = True
c.IgnorePattern.pattern = r"[A-Za-z]*Warning\b|warnings\.warn|\d+%\|.*\|"

# Deleted graded cells come back from the gradebook. (``python -m autograder grade`` puts back
# every deleted nbgrader cell before nbgrader runs; this covers the plain ``nbgrader`` CLI.)
c.OverwriteCells.add_missing_cells = True

# The instructor's trained prompt.pt / prefix.pt... never enter a release, by any route
# (Formgrader's "Generate" and the plain `nbgrader generate_assignment` included).
keep_artifacts_out_of_releases()

# A student's saved artifacts win over the instructor's files of the same name.
c.Autograde.exclude_overwriting = {
    folder.name: sorted(
        str(path.relative_to(folder))
        for pattern in ARTIFACT_PATTERNS
        for path in folder.rglob(pattern)
    )
    for folder in (ROOT / "solutions").glob("*")
    if folder.is_dir()
}

# Feedback never shows hidden tests, in the source or in a traceback.
c.GenerateFeedback.preprocessors = [
    preprocessors.GetGrades,
    HideHiddenTests,
    CSSHTMLHeaderPreprocessor,
]
