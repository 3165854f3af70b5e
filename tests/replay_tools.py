"""Run the visible checks as a student package runs them (``tests/test_student_checks.py``).

A student package has no ``autograder.reference``, ``autograder.bugzoo`` or
``autograder.pipeline``: the judges answer from the stored reference results
(:mod:`autograder.checks.fixtures`). ``python tests/replay_tools.py JOBS OUT`` loads every
implementation the jobs name first (the reference's objects, the bug zoo's variants and twins,
notebook 00's solutions and twins from ``tests/test_checks_tour.py``: that is the students'
code), then makes those packages unimportable (a meta-path finder raising
``ModuleNotFoundError``, the loaded modules dropped) and only then runs the checks. It also
runs a few probes of what the replay does with inputs it does not know, and the reference's
objects under the two layouts ``python -m autograder package`` ships: the reference package
with no concept module, and with those of notebooks 01-02 unlocked.

A job is ``(source, check)``: ``source`` is ``"reference"``, ``"variant:<name>"``,
``"bug:<name>"``, ``"tour:solution"`` or ``"tour:<twin function>"``. A verdict is ``None``
(passed), ``"FAIL: <message>"`` (``AssertionError``) or ``"ERROR: <traceback>"``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("autograder.reference", "autograder.bugzoo", "autograder.pipeline")
TOUR = {
    "count": "check_count_parameters_by_group",
    "freeze": "check_freeze_except",
    "hidden": "check_layer_hidden_states",
    "cache": "check_predict_cache_shapes",
}
UNLOCKED_01_02 = ("common", "prompt", "prefix", "deep")
"""Concept modules of ``--unlock 01 02`` (``autograder.pipeline.package.UNLOCKS``)."""


def tour_module():
    """``tests/test_checks_tour.py`` under a private name: notebook 00's solutions and twins."""
    spec = importlib.util.spec_from_file_location(
        "_tour_solutions", Path(__file__).with_name("test_checks_tour.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jobs() -> list[tuple[str, str]]:
    """Every visible check on the reference's objects (notebook 00: the solutions), on every
    must-pass variant and known-buggy twin that replaces one of its objects."""
    from autograder.bugzoo import BUGS, VARIANTS
    from autograder.checks import CHECKS
    from autograder.checks.fixtures import VISIBLE_CHECKS

    out = [("reference", c) for c in VISIBLE_CHECKS if c in CHECKS]
    out += [("tour:solution", c) for c in TOUR.values()]
    out += [("tour:" + fn.__name__, TOUR[short]) for short, fn, _ in tour_module().tour_twins]
    for kind, registry in (("variant", VARIANTS), ("bug", BUGS)):
        for name, item in registry.items():
            for check in VISIBLE_CHECKS:
                if check in CHECKS and set(CHECKS[check][1]) & set(item.replaces):
                    out.append((f"{kind}:{name}", check))
    return out


class Arguments:
    """The objects each job passes to its check (loaded while the packages still import)."""

    def __init__(self) -> None:
        from autograder.bugzoo import BUGS, VARIANTS, graded_objects
        from autograder.checks import CHECKS

        self.checks = CHECKS
        self.zoo = {"reference": graded_objects()}
        self.zoo.update({f"variant:{n}": graded_objects(v) for n, v in VARIANTS.items()})
        self.zoo.update({f"bug:{n}": graded_objects(b) for n, b in BUGS.items()})
        tour = tour_module()
        self.tour = {"solution": {TOUR[s]: fn for s, (_, fn) in tour.CHECKS.items()}}
        for short, fn, _ in tour.tour_twins:
            self.tour[fn.__name__] = {TOUR[short]: fn}

    def __call__(self, source: str, check: str) -> tuple:
        if source.startswith("tour:"):
            return (self.tour[source.removeprefix("tour:")][check],)
        objects = self.zoo[source]
        return tuple(objects[n] for n in self.checks[check][1])


def verdict(check: str, args: tuple, run: Callable | None = None) -> str | None:
    from autograder.checks import get_check

    try:
        (run or get_check(check))(*args)
    except AssertionError as err:
        return f"FAIL: {err}"
    except Exception:  # noqa: BLE001 - a crash is what the test reports
        return "ERROR: " + traceback.format_exc()[-3000:]
    return None


class Blocker(importlib.abc.MetaPathFinder):
    """Makes ``blocked`` packages (and everything under them) unimportable, except ``allowed``."""

    def __init__(self) -> None:
        self.blocked: tuple[str, ...] = ()
        self.allowed: tuple[str, ...] = ()

    def hides(self, name: str) -> bool:
        if name in self.allowed:
            return False
        return any(name == b or name.startswith(b + ".") for b in self.blocked)

    def find_spec(self, name, path=None, target=None):
        if self.hides(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def hide(blocker: Blocker, blocked: tuple[str, ...], allowed: tuple[str, ...] = ()) -> None:
    """Make ``blocked`` unimportable (but ``allowed``) and forget every loaded module of them."""
    import autograder

    blocker.blocked, blocker.allowed = blocked, allowed
    for name in list(sys.modules):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            del sys.modules[name]
    for attr in ("reference", "bugzoo", "pipeline"):
        autograder.__dict__.pop(attr, None)


def probes(real) -> dict[str, tuple[str, tuple]]:
    """Implementations no recording has seen: ``name -> (check, arguments)``."""
    import torch

    def generate_one_token_off(model, encoder, input_ids, attention_mask, max_new_tokens=20):
        new = real.generate_with_prefix(model, encoder, input_ids, attention_mask, max_new_tokens)
        new = new.clone()
        new[:, -1] = (new[:, -1] + 5) % model.config.vocab_size
        return new

    class SoftPromptOtherSeed(real.SoftPrompt):
        """Valid: its random draws come from ``seed + 7919``."""

        def __init__(self, n_tokens, embedding, init="random", init_ids=None, seed=0):
            super().__init__(n_tokens, embedding, init, init_ids, seed + 7919)

    torch.manual_seed(0)
    return {
        "generate_one_token_off": (
            "check_generate_with_prefix",
            (generate_one_token_off, real.PrefixEncoder, real.prefix_forward),
        ),
        "soft_prompt_other_seed": (
            "check_prompt_training",
            (real.freeze_backbone, SoftPromptOtherSeed, real.prepend_prompt),
        ),
    }


def _refusals(prefix_forward_args: tuple) -> dict[str, str | None]:
    """What the replay says to a check run on another variant (grading's job), to a call with a
    model it never saw (other library versions build other tiny models), and to a function it
    has no results of."""
    import torch

    from autograder.checks import fixtures, protocol
    from autograder.checks.models import Batch, tiny_model
    from autograder.checks.prefix import FixedPrefix

    out: dict[str, str | None] = {}
    ref = fixtures.reference()
    model = tiny_model("GPT-2")
    batch = Batch()
    values = torch.randn(3, 2, 4, 4, 8, generator=torch.Generator().manual_seed(11))

    def outcome(fn: Callable[[], object]) -> str | None:
        try:
            fn()
        except AssertionError as err:
            return f"FAIL: {err}"
        except Exception:  # noqa: BLE001
            return "ERROR: " + traceback.format_exc()[-3000:]
        return None

    def other_variant():
        halves = protocol.resolve("check_prefix_forward")
        protocol.run_check(*halves, *prefix_forward_args, seed=918273)

    def other_model():
        with torch.no_grad():
            model.transformer.wte.weight.add_(1e-3)
        ref.prefix_forward(model, FixedPrefix(values), batch.input_ids, batch.attention_mask)

    out["other_variant"] = outcome(other_variant)
    out["other_model"] = outcome(other_model)
    out["no_such_function"] = outcome(lambda: ref.no_such_function)
    return out


def main(argv: list[str]) -> int:
    jobs_path, out_path = Path(argv[0]), Path(argv[1])
    todo = [tuple(job) for job in json.loads(jobs_path.read_text())]
    start = time.perf_counter()
    import autograder.reference as real

    for name in dir(real):  # load every concept module: the objects below use them
        getattr(real, name)
    arguments = Arguments()
    prepared = {f"{s}|{c}": (c, arguments(s, c)) for s, c in todo}
    probe_jobs = probes(real)
    reference_jobs = {k: v for k, v in prepared.items() if k.startswith(("reference|", "tour:sol"))}

    blocker = Blocker()
    sys.meta_path.insert(0, blocker)
    hide(blocker, BLOCKED)
    from autograder.checks import fixtures

    env = {"replay": fixtures.is_replay(), "imports": {}}
    for name in BLOCKED:
        try:
            importlib.import_module(name)
            env["imports"][name] = "imported"
        except ModuleNotFoundError:
            env["imports"][name] = "ModuleNotFoundError"
    loaded = time.perf_counter()
    results = {key: verdict(check, args) for key, (check, args) in prepared.items()}
    ran = time.perf_counter()
    probe_results = {name: verdict(check, args) for name, (check, args) in probe_jobs.items()}
    probe_results.update(_refusals(prepared["reference|check_prefix_forward"][1]))

    layouts = {}
    # the default student wheel: autograder/reference/__init__.py without any concept module
    hide(blocker, BLOCKED, allowed=("autograder.reference",))
    layouts["no concept module"] = {
        "kind": type(fixtures.reference()).__name__,
        "verdicts": {k: verdict(c, a) for k, (c, a) in reference_jobs.items()},
    }
    # `python -m autograder package --unlock 01 02`
    allowed = ("autograder.reference", *(f"autograder.reference.{m}" for m in UNLOCKED_01_02))
    hide(blocker, BLOCKED, allowed=allowed)
    layouts["01-02 unlocked"] = {
        "kind": type(fixtures.reference()).__name__,
        "verdicts": {k: verdict(c, a) for k, (c, a) in reference_jobs.items()},
    }
    out_path.write_text(
        json.dumps(
            {
                "env": env,
                "verdicts": results,
                "probes": probe_results,
                "layouts": layouts,
                "seconds": {"load": loaded - start, "jobs": ran - loaded},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
