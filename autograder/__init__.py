"""The Soft Prompts Course autograder: checks, reference implementations, bug zoo, pipeline.

Threat model (README, "Grading you can trust", says the same for instructors). A submitted
notebook is untrusted code whose author has read this package. The grader guarantees:

* **No verdict rests on anything the kernel can reach.** Checks are split
  (:mod:`autograder.checks.protocol`): the kernel only *observes* the student's functions on
  inputs drawn from a secret per-run seed and hands the data over; the grader *judges* it in its
  own process (:mod:`autograder.pipeline.verdicts`), where no student code runs, against the
  reference on the same inputs, and replaces the test cell's outputs with the verdicts. Which
  checks a cell owes comes from the grader's copy of the cell. A withheld or malformed
  observation is reported as tampering, for that cell only.
* **The kernel is confined** (:mod:`autograder.pipeline.sandbox`): its own namespaces and root,
  read-only course code, the reference implementations of what it is graded on, the answer
  keys and the bug zoo hidden, no network, no view of the grader, the gradebook, the solutions
  or any other student, bounded processes, memory, file sizes and disk, its own host uid.
  Grading refuses to start without a sandbox unless ``--unsafe`` is given, and then says so in
  every report line.

Not guaranteed: facts that only exist inside the kernel and are not outputs of graded functions
(a ``requires_grad`` flag, a file size, the values a random initialisation drew, the numbers in a
saved study) are the kernel's word, checked for structure and consistency only; memory is bounded
per process (no cgroups); a notebook that copies a classmate's code is plagiarism, which no
behaviour check can tell from honest work — and so is one that copies :mod:`autograder.reference`,
which this installed package still contains (hidden only from grading kernels) until a student
package without it exists. Trained artifacts are scored on inputs drawn from a secret no kernel
sees; a submission nbgrader cannot grade scores 0 and is marked for review, never keeping an
earlier score.

Packages: :mod:`autograder.checks` (observe/judge pairs, one module per notebook),
:mod:`autograder.reference` (one module per concept), :mod:`autograder.bugzoo` (known-buggy twins
and must-pass variants), :mod:`autograder.pipeline` (release, grade, verify, demo, sandbox,
verdicts), :mod:`autograder.selfcheck` (what notebook cells call).
"""
