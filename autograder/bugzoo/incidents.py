"""The broken releases of the debugging lab (notebook 05), by ticket, and the tools that show
their code: :func:`show_release` prints a release's source or its diff against the release
before, :func:`show_patch` the diff between a student's patched function and the release it
patches.

The releases are notebook 02's functions with their bugs (:mod:`autograder.bugzoo.releases`), so a
student package has them only once notebook 02 is released to students
(``python -m autograder package --unlock 01 02``).
"""

from __future__ import annotations

import difflib
import inspect
import textwrap

try:
    from autograder.bugzoo.prefix import prefix_as_input_embeddings
    from autograder.bugzoo.releases import RELEASES, release, service_forward
except ModuleNotFoundError as err:
    raise ModuleNotFoundError(
        "the broken releases of notebook 05 are built from notebooks 01-02's reference, which "
        "this course package does not include yet: your instructor adds it once those are due "
        f"(`python -m autograder package --unlock 01 02`) [{err}]"
    ) from None

__all__ = ["INCIDENTS", "LAST_GOOD", "show_patch", "show_release"]

INCIDENTS: dict[str, object] = {
    "INC-1": service_forward("build_prefix_cache_2_0"),
    "INC-2": service_forward("build_prefix_cache_2_1"),
    "INC-3": prefix_as_input_embeddings,
    "INC-4": release("prefix_forward_2_2"),
    "INC-5": release("prefix_forward_2_3"),
    "INC-6": release("prefix_forward_2_4"),
    "INC-7": release("prefix_forward_2_4"),
    "INC-8": release("freeze_backbone_2_6"),
    "INC-10": release("soft_prompt_to_prefix_2_8"),
}
"""Incident id -> what the platform ran: a ``prefix_forward(model, encoder, input_ids,
attention_mask, labels=None)`` (INC-1 and INC-2: the service's forward on that release's
``build_prefix_cache``), INC-8's ``freeze_backbone(model)`` and INC-10's
``soft_prompt_to_prefix(model, prompt)``. INC-3 is a pull request, shown by its symptoms only;
the lab's INC-9, gradient checkpointing, breaks the student's own fixed ``prefix_forward``."""

LAST_GOOD: dict[str, object] = {"INC-8": release("freeze_backbone_2_5")}
"""Incident id -> the release before it, where that one was right (INC-8's 2.5 freeze)."""


def _releases(which: str) -> list:
    """The releases behind an incident id (``"INC-6"``) or one release (``"prefix_forward 2.4"``
    or ``"2.4"``)."""
    found = [r for r in RELEASES.values() if which in r.incidents]
    if not found:
        found = [r for r in RELEASES.values() if which in (r.version, f"{r.function} {r.version}")]
    if not found:
        names = sorted({i for r in RELEASES.values() for i in r.incidents})
        raise KeyError(f"no release for {which!r}: one of {', '.join(names)}, or a version")
    return found


def _show(text: str, language: str) -> None:
    """``text`` as a highlighted code block in a notebook, as plain text elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover - IPython comes with the course
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Markdown(f"```{language}\n{text.rstrip()}\n```"))
    else:
        print(text.rstrip())


def _by_version(function: str, version: str):
    return next(r for r in RELEASES.values() if r.function == function and r.version == version)


def show_release(which: str, whole: bool = False) -> None:
    """Show what a release shipped: its source, or (``whole=False`` and a release before it)
    the unified diff against that release. ``which``: an incident (``"INC-2"``) or a release
    (``"prefix_forward 2.4"``)."""
    for rel in _releases(which):
        if rel.before is None or whole:
            title = f"# release {rel.version}: {rel.function}, as shipped\n"
            _show(title + rel.source, "python")
            continue
        before = _by_version(rel.function, rel.before)
        diff = difflib.unified_diff(
            before.source.splitlines(),
            rel.source.splitlines(),
            f"release {before.version}",
            f"release {rel.version}",
            lineterm="",
        )
        _show("\n".join(diff), "diff")


def _function_lines(source: str) -> list[str]:
    """The lines of a function's own source: from its decorator or ``def`` to its end."""
    lines = textwrap.dedent(source).splitlines()
    start = next(
        (i for i, line in enumerate(lines) if line.startswith(("def ", "@", "async def "))), 0
    )
    marker = ("### BEGIN SOLUTION", "### END SOLUTION")
    return [line.rstrip() for line in lines[start:] if line.strip() and line.strip() not in marker]


def show_patch(fn: object, which: str) -> tuple[int, int]:
    """Show the diff from a release's function to ``fn`` (the student's patched version) and
    return ``(lines removed, lines added)``. The fix should be small: the rest of the release
    is right."""
    candidates = _releases(which)
    name = getattr(fn, "__name__", None)
    rel = next((r for r in candidates if r.function == name), candidates[0])
    try:
        mine = inspect.getsource(fn)
    except (OSError, TypeError):
        print(f"no source for {getattr(fn, '__name__', fn)!r} (define it in a notebook cell)")
        return (0, 0)
    diff = list(
        difflib.unified_diff(
            _function_lines(rel.source),
            _function_lines(mine),
            f"release {rel.version}",
            "your patch",
            lineterm="",
        )
    )
    removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
    added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
    if not diff:
        print(f"your {rel.function} is release {rel.version} as shipped: nothing patched yet")
        return (0, 0)
    _show("\n".join(diff), "diff")
    print(f"your patch of release {rel.version}: {removed} line(s) removed, {added} added")
    return (removed, added)
