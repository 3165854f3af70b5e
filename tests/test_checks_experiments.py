"""The checks of notebook 03 (experiments): registered with buggy twins, the reference passes, the
hidden-test path works, and the saved-study check accepts a plausible study and names what is
wrong with an implausible one or a file of another structure. (Every twin failing with its
message, and every valid variant passing, is proven in ``test_bugzoo.py``.)"""

from __future__ import annotations

import random

import pytest
import torch

from autograder import reference
from autograder.bugzoo import BUGS, VARIANTS, graded_objects
from autograder.bugzoo import experiments as experiment_bugs
from autograder.checks import CHECKS, experiments, get_check
from course.compat import kv_geometry

NEW_CHECKS = ("check_method_parameters", "check_method_functions", "check_run_sweep")
NEW_BUGS = [bug.name for bug in experiment_bugs.BUGS]


def _run(check: str, objects: dict[str, object]) -> None:
    get_check(check)(*(objects[name] for name in CHECKS[check][1]))


def test_new_checks_are_registered_with_twins_and_variants() -> None:
    assert set(NEW_CHECKS) <= set(CHECKS)
    assert set(NEW_BUGS) <= set(BUGS) and len(NEW_BUGS) >= 6
    assert {c for name in NEW_BUGS for c in BUGS[name].caught_by} == set(NEW_CHECKS)
    assert {BUGS[name].notebook for name in NEW_BUGS} == {"03"}
    replaced = {n for v in experiment_bugs.VARIANTS for n in v.replaces}
    assert replaced == {"make_method", "run_sweep"}
    assert all(VARIANTS[v.name] is v for v in experiment_bugs.VARIANTS)


@pytest.mark.parametrize("check", NEW_CHECKS)
def test_reference_passes(check: str) -> None:
    _run(check, graded_objects())


def test_checks_are_silent_and_leave_the_random_state_alone(capfd) -> None:
    random.seed(7)
    torch.manual_seed(7)
    expected = (random.random(), torch.rand(2))
    random.seed(7)
    torch.manual_seed(7)
    threads = torch.get_num_threads()
    for check in NEW_CHECKS:
        _run(check, graded_objects())
    assert (random.random(), *torch.rand(2).tolist()) == (expected[0], *expected[1].tolist())
    assert torch.get_num_threads() == threads
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_tiny_tokenizer_round_trips() -> None:
    tok = experiments.tiny_tokenizer()
    ids = tok("abc>cba", add_special_tokens=False)["input_ids"]
    assert max(ids) < 64 and tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == (
        "abc>cba"
    )
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_module_imports_no_reference_or_bug_zoo_at_top_level() -> None:
    import ast
    from pathlib import Path

    tree = ast.parse(Path(experiments.__file__).read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            names = {f"{node.module}.{a.name}" for a in node.names} | {node.module or ""}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        else:
            continue
        assert not any(n.startswith(("autograder.reference", "autograder.bugzoo")) for n in names)


# --- the saved study ---------------------------------------------------------------------------
GEOMETRY = {"n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "head_dim": 48, "hidden_size": 192}
TOTAL = 2_025_600  # the bundled tiny LM


def _row(config: dict, steps: int = 30, score: float = 20.0) -> dict:
    trained, stored = experiments.expected_counts(
        config["method"], GEOMETRY, config.get("length", 10), config.get("hidden", 128), TOTAL
    )
    if trained is None:  # LoRA
        trained = stored = 12_288
    return {
        "label": config["label"],
        "method": config["method"],
        "trainable": trained,
        "stored": stored,
        "pct": 100 * trained / TOTAL,
        "steps": steps,
        "seconds": 3.0,
        "slot_accuracy": score,
        "bleu": 20.0,
    }


def _study() -> dict:
    configs = {
        "methods": [
            {
                "method": m,
                "lr": 0.01,
                "label": m,
                **({} if m in ("lora", "full") else {"length": 10}),
            }
            for m in reference.METHODS
        ],
        "length": [
            {"method": "prefix", "lr": 0.05, "label": f"P={n}", "length": n} for n in (1, 4)
        ],
        "low_data": [{"method": "full", "lr": 1e-3, "label": "full, 20", "n_train": 20}],
        "init": [{"method": "prompt", "lr": 0.03, "label": "random", "init": "random"}],
    }
    study = {name: [_row(c) for c in rows] for name, rows in configs.items()}
    study["setup"] = {
        "backbone": "tiny",
        "backbone_params": TOTAL,
        "geometry": dict(GEOMETRY),
        "task": "data_to_text",
        "metric": "slot_accuracy",
        "steps": 30,
        "batch_size": 4,
        "n_eval": 24,
        "configs": configs,
        "baseline": {"slot_accuracy": 0.7, "bleu": 1.0},
    }
    return study


def test_a_plausible_study_passes() -> None:
    experiments.check_sweep_artifact(_study())


def _swap_rows(s: dict) -> None:
    s["methods"][0], s["methods"][1] = s["methods"][1], s["methods"][0]


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda s: s.pop("init"), "no rows for init"),
        (lambda s: s["length"][1].update(steps=12), "same number of steps"),
        (lambda s: s["methods"][2].update(trainable=15_360), "expected"),
        (lambda s: s["methods"][0].update(slot_accuracy=140.0), "[0, 100]"),
        (lambda s: [r.update(slot_accuracy=1.0) for r in s["methods"]], "did training run"),
        (lambda s: s["methods"].pop(), "rows for"),
        (_swap_rows, "rows follow the configurations"),
        (lambda s: s["methods"][3].update(trainable=900_000, stored=900_000), "LoRA trains"),
        (lambda s: s["setup"].update(n_eval=4), "at least 24"),
        # the baseline is recomputed for the tiny LM: a forged one is refused ...
        (lambda s: s["setup"]["baseline"].update(slot_accuracy=40.0), "frozen tiny LM scores"),
        # ... and the geometry and size are those of the real tiny LM, whatever the kernel says
        (lambda s: s["setup"].update(backbone_params=TOTAL + 1), "backbone size"),
        (lambda s: s["setup"]["geometry"].update(n_layers=5), "backbone geometry"),
    ],
)
def test_an_implausible_study_is_named(spoil, message: str) -> None:
    study = _study()
    spoil(study)
    with pytest.raises(AssertionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        experiments.check_sweep_artifact(study)


def test_a_lower_forged_baseline_does_not_lower_the_bar() -> None:
    """The floor is the tiny LM's own score (0.7 here) even where the study claims less."""
    study = _study()
    study["setup"]["baseline"]["slot_accuracy"] = 0.0
    for row in study["methods"]:
        row["slot_accuracy"] = 5.0  # above the forged 0 + 5, below the real 0.7 + 5
    with pytest.raises(AssertionError, match="did training run"):
        experiments.check_sweep_artifact(study)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda s: s["setup"].update(steps="30"), "setup.steps is '30', expected an int"),
        (lambda s: s["methods"].__setitem__(0, "row"), "expected a list of dicts"),
        (lambda s: s["setup"].pop("geometry"), "setup.geometry is None, expected a dict"),
        (lambda s: s["setup"]["configs"].update(length="P=1"), "expected a list of rows"),
        (lambda s: s["methods"][0].update(trainable=torch.zeros(3)), "expected an int"),
        (lambda s: s["setup"].update(metric="bleu"), "do not go together"),
    ],
)
def test_a_study_of_another_structure_gets_a_message_about_the_file(spoil, message) -> None:
    study = _study()
    spoil(study)
    with pytest.raises(AssertionError, match=message) as info:
        experiments.check_sweep_artifact(study)
    assert not isinstance(info.value, experiments.MalformedObservation)


@pytest.mark.parametrize("study", [None, [], "sweep.pt", {"methods": []}])
def test_no_study_at_all_is_named(study) -> None:
    with pytest.raises(AssertionError, match="without its 'setup'"):
        experiments.check_sweep_artifact(study)


def test_the_study_must_fit_the_backbone(tiny_lm) -> None:
    model, _ = tiny_lm
    study = _study()
    assert model.course_choice.is_tiny and study["setup"]["backbone"] == "tiny"
    assert kv_geometry(model.config) == GEOMETRY
    experiments.check_sweep_artifact(study, model)
    study["setup"]["backbone_params"] = TOTAL + 1
    with pytest.raises(AssertionError, match="backbone size"):
        experiments.check_sweep_artifact(study, model)


def test_a_hub_backbone_is_checked_against_the_notebooks_model(tiny_lm) -> None:
    """A study of another backbone is compared with what the notebook's model reports."""
    model, _ = tiny_lm
    study = _study()
    study["setup"]["backbone"] = "gpt2"
    data = experiments.observe_sweep_artifact(study, model)
    data["model"] = {"backbone": "gpt2", "params": TOTAL, "geometry": GEOMETRY}
    experiments.judge_sweep_artifact(experiments.Observed(data))
    data["model"]["params"] = TOTAL * 2
    with pytest.raises(AssertionError, match="backbone size"):
        experiments.judge_sweep_artifact(experiments.Observed(data))
