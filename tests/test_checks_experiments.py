"""The checks of notebook 03 (experiments): registered with buggy twins, the reference passes,
other correct designs pass too, the hidden-test path works, and the saved-study check accepts a
plausible study and names what is wrong with an implausible one. (Every twin failing with its
message is proven in ``test_bugzoo.py``.)"""

from __future__ import annotations

import random
import typing

import pytest
import torch

from autograder import reference
from autograder.bugzoo import BUGS, graded_objects
from autograder.bugzoo import experiments as experiment_bugs
from autograder.checks import CHECKS, experiments, get_check, guard
from course.compat import kv_geometry

NEW_CHECKS = ("check_method_parameters", "check_method_functions", "check_run_sweep")
NEW_BUGS = [bug.name for bug in experiment_bugs.BUGS]


def _run(check: str, objects: dict[str, object]) -> None:
    get_check(check)(*(objects[name] for name in CHECKS[check][1]))


def test_new_checks_are_registered_with_twins() -> None:
    assert set(NEW_CHECKS) <= set(CHECKS)
    assert set(NEW_BUGS) <= set(BUGS) and len(NEW_BUGS) >= 6
    assert {c for name in NEW_BUGS for c in BUGS[name].caught_by} == set(NEW_CHECKS)
    assert {BUGS[name].notebook for name in NEW_BUGS} == {"03"}


@pytest.mark.parametrize("check", NEW_CHECKS)
def test_reference_passes(check: str) -> None:
    _run(check, graded_objects())


def test_hidden_test_path_uses_a_fresh_module() -> None:
    module = guard.fresh("autograder.checks.experiments")
    assert module is not experiments
    module.check_run_sweep(reference.run_sweep)


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


# --- other correct designs pass ----------------------------------------------------------------
class MethodTuple(typing.NamedTuple):
    name: str
    params: list
    loss_fn: typing.Callable
    generate_fn: typing.Callable
    n_trainable: int
    n_stored: int


def make_method_tuple_wide_lora(name, model, tok, **options):
    """A named tuple instead of the dataclass; LoRA on Llama also adapts the output projection."""
    if name == "lora" and model.config.model_type != "gpt2":
        from peft import LoraConfig, get_peft_model

        reference.freeze_backbone(model)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        get_peft_model(model, LoraConfig(r=options.get("rank", 4), target_modules=targets))
        params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)

        def loss_fn(batch):
            return model(**batch).loss

        def generate_fn(ids, mask, max_new):
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )  # fmt: skip
            return out[:, ids.shape[1] :]

        return MethodTuple(name, params, loss_fn, generate_fn, n, n)
    method = reference.make_method(name, model, tok, **options)
    return MethodTuple(*(getattr(method, f) for f in MethodTuple._fields))


@pytest.mark.parametrize("check", ["check_method_parameters", "check_method_functions"])
def test_another_correct_make_method_passes(check: str) -> None:
    get_check(check)(make_method_tuple_wide_lora)


def run_sweep_seeding_first(
    configs, load, make_method, task, train_examples, eval_examples, steps, batch_size=8, seed=0
):
    """Seeds torch alone, before loading; a percentage of the backbone with its adapters."""
    import course

    rows = []
    for config in configs:
        config = dict(config)
        name, lr = config.pop("method"), config.pop("lr")
        label, n_train = config.pop("label", name), config.pop("n_train", None)
        torch.manual_seed(seed)
        model, tok = load()
        method = make_method(name, model, tok, **config)
        total = sum(p.numel() for p in model.parameters())  # adapters included: within 2%
        data = course.batches(tok, train_examples[:n_train], batch_size, seed=seed)
        run = course.train(method.loss_fn, method.params, data, steps=steps, lr=lr, seed=seed)
        scores = course.evaluate(
            task, None, tok, eval_examples, show_progress=False, generate=method.generate_fn
        )
        rows.append(
            {
                "label": label,
                "method": name,
                "trainable": method.n_trainable,
                "stored": method.n_stored,
                "pct": 100 * method.n_trainable / total,
                "steps": run.steps,
                "seconds": run.seconds,
                **{k: v for k, v in scores.items() if k != "predictions"},
            }
        )
    return rows


def test_another_correct_run_sweep_passes() -> None:
    experiments.check_run_sweep(run_sweep_seeding_first)


# --- the saved study ---------------------------------------------------------------------------
GEOMETRY = {"n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "head_dim": 48, "hidden_size": 192}
TOTAL = 2_025_600


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
        "geometry": GEOMETRY,
        "metric": "slot_accuracy",
        "steps": 30,
        "configs": configs,
        "baseline": {"slot_accuracy": 0.7, "bleu": 1.0},
    }
    return study


def test_a_plausible_study_passes() -> None:
    experiments.check_sweep_artifact(_study())


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda s: s.pop("init"), "no rows for init"),
        (lambda s: s["length"][1].update(steps=12), "same number of steps"),
        (lambda s: s["methods"][2].update(trainable=15_360), "expected"),
        (lambda s: s["methods"][0].update(slot_accuracy=140.0), "[0, 100]"),
        (lambda s: [r.update(slot_accuracy=1.0) for r in s["methods"]], "did training run"),
        (lambda s: s["methods"].pop(), "rows for"),
    ],
)
def test_an_implausible_study_is_named(spoil, message: str) -> None:
    study = _study()
    spoil(study)
    with pytest.raises(AssertionError, match=message.replace("[", r"\[").replace("]", r"\]")):
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
