"""Instructor pipeline over nbgrader: release, verify, grade, feedback and the demo.

Each command is a module (``release``, ``verify``, ``grade``, ``demo``); ``coursedir`` finds
the course folders, loads ``nbgrader_config.py`` and sets up the grading environment;
``execute`` and ``feedback`` hold the two nbgrader preprocessors the config plugs in;
``submissions`` checks and repairs what students handed in before nbgrader sees it; ``report``
reads the gradebook into tables and CSV; ``classroom`` writes synthetic students (solved,
blank, bug-zoo, faulty) for ``verify``, ``demo`` and the tests.
"""

import sys

# nbformat imports jsonschema, which compiles an IRI grammar at import when ``rfc3987_syntax`` is
# installed: 3 to 6 s per process on a 2-CPU machine, for a string format no notebook schema uses.
sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]
