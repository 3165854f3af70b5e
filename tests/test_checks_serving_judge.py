"""The serving checks in two halves: each judge passes the reference's observation, rejects forged
ones (right structure, wrong values), calls a missing or mistyped field malformed, never
unpickles a file, and the observing half runs where ``autograder.reference`` cannot be
imported."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from forgery_tools import judge as _judge

from autograder import reference
from autograder.checks import protocol
from autograder.checks.protocol import MalformedObservation

GRADING = 918273
ROOT = Path(__file__).resolve().parents[1]
OBJECTS: dict[str, tuple] = {
    "check_save_load_prefix": (reference.save_prefix, reference.load_prefix),
    "check_mixed_prefix_forward": (reference.mixed_prefix_forward,),
    "check_mixed_generate": (reference.mixed_generate,),
}
_CACHE: dict[tuple[str, int], dict] = {}


def _observed(name: str, seed: int = 0) -> dict:
    """The reference's observation of check ``name`` on variant ``seed``, as the judge gets it
    (a fresh copy each time)."""
    if (name, seed) not in _CACHE:
        observe, _ = protocol.resolve(name)
        obs = protocol.observe_safely(observe, OBJECTS[name], seed)
        assert protocol.FAILED not in obs, obs
        _CACHE[name, seed] = protocol.decode(*protocol.encode(obs))
    return copy.deepcopy(_CACHE[name, seed])


def _rejects(name: str, data: dict, match: str, seed: int = 0) -> str:
    with pytest.raises(AssertionError, match=match) as info:
        _judge(name, data, seed)
    assert not isinstance(info.value, MalformedObservation), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("seed", [0, GRADING])
@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_reference_observation_passes(name: str, seed: int) -> None:
    _judge(name, _observed(name, seed), seed)


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_an_observation_of_another_variant_fails(name: str) -> None:
    """Answers computed in advance (on the visible variant) do not pass under grading."""
    with pytest.raises(AssertionError):
        _judge(name, _observed(name, 0), GRADING)


# --- malformed ---------------------------------------------------------------------------------
def _drop(path: tuple) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


def _set(path: tuple, value: object) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


MALFORMED = [
    ("check_save_load_prefix", _drop(("models",))),
    ("check_save_load_prefix", _drop(("models", 1, "loaded"))),
    ("check_save_load_prefix", _drop(("models", 0, "loaded_copy"))),
    ("check_save_load_prefix", _drop(("refusals", 2, "error"))),
    ("check_save_load_prefix", _set(("models", 0, "file", "bytes"), "PK...")),
    ("check_save_load_prefix", _set(("models", 0, "file", "size"), 12)),
    ("check_save_load_prefix", _set(("models", 0, "loaded", "meta"), "{not json")),
    ("check_mixed_prefix_forward", _drop(("models", 0, "out"))),
    ("check_mixed_prefix_forward", _drop(("models", 1, "gradient", "grads", "cafe"))),
    ("check_mixed_prefix_forward", _drop(("models", 0, "recording", "calls", 0, "key"))),
    ("check_mixed_prefix_forward", _set(("models", 0, "out", "logits"), [[0.0]])),
    ("check_mixed_prefix_forward", _set(("models", 0, "label"), "Llama-GQA")),
    ("check_mixed_prefix_forward", _set(("models", 1, "out", "loss"), "0.5")),
    ("check_mixed_generate", _drop(("models", 1, "new"))),
    ("check_mixed_generate", _drop(("models", 0, "different", "error"))),
    ("check_mixed_generate", _set(("models", 0, "new", "tokens"), [[1, 2]])),
]


@pytest.mark.parametrize(("name", "edit"), MALFORMED)
def test_missing_or_mistyped_field_is_malformed(name: str, edit: Callable[[dict], None]) -> None:
    data = _observed(name)
    edit(data)
    with pytest.raises(MalformedObservation):
        _judge(name, data)


# --- forged values: save_prefix / load_prefix ---------------------------------------------------
class _Payload:
    """Unpickling this creates ``marker``: proof that nothing unpickles the student's file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_file_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    data = pickle.dumps(_Payload(marker))
    obs = _observed("check_save_load_prefix")
    obs["models"][0]["file"] = {
        "exists": True,
        "size": len(data),
        "bytes": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }
    _rejects("check_save_load_prefix", obs, "not a safetensors file")
    assert not marker.exists()


def _perturb(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    out.view(-1)[0] += 1e-3
    return out


def test_save_load_forgeries_fail() -> None:
    name = "check_save_load_prefix"
    obs = _observed(name)
    obs["models"][1]["loaded"]["prefix"] = _perturb(obs["models"][1]["loaded"]["prefix"])
    _rejects(name, obs, "differ from the ones in the file")

    obs = _observed(name)
    obs["models"][0]["loaded"]["meta"] = json.dumps({"tenant": "acme", "task": "sentiment"})
    _rejects(name, obs, "meta")

    obs = _observed(name)  # the copy loaded as the original: values not read from the file
    obs["models"][0]["loaded_copy"] = obs["models"][0]["loaded"]
    _rejects(name, obs, "read the values from the file")

    obs = _observed(name)  # the two files swapped
    gpt2 = obs["models"][0]
    gpt2["file"], gpt2["file_no_meta"] = gpt2["file_no_meta"], gpt2["file"]
    _rejects(name, obs, "the prefix file holds")

    obs = _observed(name)
    obs["refusals"][3]["error"]["message"] = "this prefix does not fit"
    _rejects(name, obs, "does not name")

    obs = _observed(name)
    obs["refusals"][0] = {"label": obs["refusals"][0]["label"], "error": None, "returned": "tuple"}
    _rejects(name, obs, "must be refused")


# --- forged values: mixed_prefix_forward --------------------------------------------------------
def test_mixed_forward_forgeries_fail() -> None:
    name = "check_mixed_prefix_forward"
    obs = _observed(name)
    logits = obs["models"][0]["out"]["logits"]
    logits[2, -1, 5] += 1e-3
    _rejects(name, obs, "differs from running tenant 'cafe' alone")

    obs = _observed(name)  # rows of two tenants swapped
    logits = obs["models"][1]["out"]["logits"]
    logits[[0, 1]] = logits[[1, 0]]
    _rejects(name, obs, "row 0")

    obs = _observed(name)
    obs["models"][0]["out"]["loss"] += 1e-3
    _rejects(name, obs, "loss")

    obs = _observed(name)  # layer 2 shows layer 0's prefix keys
    calls = obs["models"][0]["recording"]["calls"]
    calls[2]["key"][:, :, :4] = calls[0]["key"][:, :, :4]
    _rejects(name, obs, "LAYER-0")

    obs = _observed(name)
    grads = obs["models"][1]["gradient"]["grads"]
    grads["acme"] = grads["acme"] * 1.01
    _rejects(name, obs, "prefix of tenant 'acme'")

    obs = _observed(name)  # keys' and values' gradients swapped
    grads = obs["models"][0]["gradient"]["grads"]
    grads["bistro"] = grads["bistro"].flip(1)
    _rejects(name, obs, "gradient of the keys of the prefix of tenant 'bistro'")

    obs = _observed(name)
    obs["models"][0]["gradient"]["grads"]["cafe"][:, 1] = 0
    _rejects(name, obs, "no gradient reaches the values of the prefix of tenant 'cafe'")

    obs = _observed(name)
    obs["models"][1]["bf16"]["out"]["logits"] += 0.1
    _rejects(name, obs, "bfloat16")

    obs = _observed(name)
    obs["models"][0]["unknown"] = {"returned": "tensor (2, 5, 64) float32"}
    _rejects(name, obs, "unknown tenant 'nobody'")

    obs = _observed(name)
    obs["models"][1]["prefixes_after"]["acme"] = obs["models"][1]["prefixes_after"]["acme"] * 2
    _rejects(name, obs, "changed the stored prefixes")

    obs = _observed(name)  # a padded prefix slot opened in the mask
    different = obs["models"][0]["different"]["recording"]["calls"]
    for call in different:
        call["visible"][0, :, 0] = True
    _rejects(name, obs, "padded prefix slots")


# --- forged values: mixed_generate --------------------------------------------------------------
def test_mixed_generate_forgeries_fail() -> None:
    name = "check_mixed_generate"
    obs = _observed(name)
    tokens = obs["models"][0]["new"]["tokens"]
    tokens[3, 1] = (tokens[3, 1] + 1) % 64
    _rejects(name, obs, "row 3")

    obs = _observed(name)
    obs["models"][1]["new"]["tokens"] = obs["models"][1]["new"]["tokens"][:, :3]
    _rejects(name, obs, "max_new_tokens")

    obs = _observed(name)
    obs["models"][0]["new"]["tokens"][0, 0] = 10_000
    _rejects(name, obs, "outside the vocabulary")

    obs = _observed(name)
    tokens = obs["models"][1]["different"]["new"]["tokens"]
    tokens[1, 0] = (tokens[1, 0] + 1) % 64
    _rejects(name, obs, "rows")

    obs = _observed(name)
    obs["models"][0]["unknown"] = {"raised": "KeyError", "message": "'someone'"}
    _rejects(name, obs, "name the unknown tenant")


# --- observing without the reference ------------------------------------------------------------
_KERNEL = """
import sys
sys.modules["autograder.reference"] = None  # as in a grading kernel: no reference solutions
from pathlib import Path

import torch

import course
from autograder.checks import protocol

exec(compile(sys.stdin.read(), "solutions", "exec"))
folder, seed = Path(sys.argv[1]), int(sys.argv[2])
objects = {
    "check_save_load_prefix": (save_prefix, load_prefix),
    "check_mixed_prefix_forward": (mixed_prefix_forward,),
    "check_mixed_generate": (mixed_generate,),
}
for name, args in objects.items():
    observe, _ = protocol.resolve(name)
    protocol.write(folder / f"{name}.safetensors", protocol.observe_safely(observe, args, seed))
"""
_GRADED = ("save_prefix", "load_prefix", "mixed_prefix_forward", "mixed_generate")


def _solutions() -> str:
    """The notebook's own solution cells of the graded serving functions."""
    notebook = json.loads((ROOT / "solutions/04_serving/04_serving.ipynb").read_text())
    cells = [
        "".join(cell["source"])
        for cell in notebook["cells"]
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") in _GRADED
    ]
    assert len(cells) == len(_GRADED)
    return "\n\n".join(cells)


def test_observing_needs_no_reference_and_the_notebook_solutions_pass(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _KERNEL, str(tmp_path), str(GRADING)],
        input=_solutions(), capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for name in OBJECTS:
        data = protocol.read(tmp_path / f"{name}.safetensors")
        assert protocol.FAILED not in data, data[protocol.FAILED]
        protocol.judge_file(name, tmp_path / f"{name}.safetensors", GRADING)
