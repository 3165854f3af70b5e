"""Instructor pipeline over nbgrader: release, verify, grade, feedback and the demo.

Each command is a module (``release``, ``verify``, ``grade``, ``demo``); ``course`` finds the
course folders and loads ``nbgrader_config.py``; ``execute`` and ``feedback`` hold the two
nbgrader preprocessors the config plugs in; ``submissions`` checks and repairs what students
handed in before nbgrader sees it; ``report`` reads the gradebook into tables and CSV.
"""
