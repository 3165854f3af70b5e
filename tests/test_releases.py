"""Notebook 05's broken releases (issue 13, part 6): the code the lab shows is the code that
produces each ticket's symptoms; a small patch of each release passes the same checks as notebook
02's functions, while the release, or a patch that fixes only one of its two bugs, fails with the
message naming what is left; and ``show_patch`` counts a student's changed lines."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from autograder import reference
from autograder.bugzoo import BUGS, graded_objects
from autograder.bugzoo import incidents as inc
from autograder.bugzoo import prefix as prefix_bugs
from autograder.bugzoo.releases import _FORWARD_OK, _PREAMBLE, RELEASES, release, service_forward
from autograder.checks import CHECKS, get_check
from autograder.checks.models import tiny_model

# release key -> [(old, new), ...]: the smallest patch that makes it right
PATCHES: dict[str, list[tuple[str, str]]] = {
    "build_prefix_cache_2_0": [
        (
            "    keys = prefix[0, 0].to(dtype).unsqueeze(0).expand(batch_size, -1, -1, -1)\n"
            "    values = prefix[0, 1].to(dtype).unsqueeze(0).expand(batch_size, -1, -1, -1)\n"
            "    return course.make_cache([(keys, values)])\n",
            "    pairs = [kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1) for kv in prefix]\n"
            "    pairs = torch.stack(pairs).to(dtype)\n"
            "    return course.make_cache([(kv[0], kv[1]) for kv in pairs])\n",
        )
    ],
    "prefix_forward_2_2": [
        (
            "    positions = torch.arange(p, p",
            "    mask = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)\n"
            "    positions = torch.arange(p, p",
        ),
        ("        attention_mask=attention_mask,\n", "        attention_mask=mask,\n"),
        (
            "build_prefix_cache(prefix, batch, prefix.dtype)",
            "build_prefix_cache(prefix, batch, model.dtype)",
        ),
    ],
    "prefix_forward_2_3": [
        ("torch.arange(length, device", "torch.arange(p, p + length, device"),
        (
            "build_prefix_cache(prefix, batch, prefix.dtype)",
            "build_prefix_cache(prefix, batch, model.dtype)",
        ),
    ],
    "prefix_forward_2_4": [
        (
            "    if encoder not in _CACHES:\n"
            "        prefix = encoder()\n"
            "        _CACHES[encoder] = build_prefix_cache(prefix, batch, prefix.dtype)\n"
            "    cache = _CACHES[encoder]\n",
            "    cache = build_prefix_cache(encoder(), batch, model.dtype)\n",
        )
    ],
    "freeze_backbone_2_6": [
        (
            "    model.eval()",
            "    for p in model.parameters():\n        p.requires_grad_(False)\n    model.eval()",
        )
    ],
    "soft_prompt_to_prefix_2_8": [("for layer in layers[1:]", "for layer in layers[:0]")],
}
PATCHES["build_prefix_cache_2_1"] = [
    (
        "[(keys, values)] * len(prefix)",
        "[(kv[0].unsqueeze(0).expand(batch_size, -1, -1, -1),"
        " kv[1].unsqueeze(0).expand(batch_size, -1, -1, -1)) for kv in prefix.to(dtype)]",
    )
]
CHECKS_OF = {  # what notebook 05 runs on each function, directly or through prefix_forward
    "build_prefix_cache": ("check_build_prefix_cache", "check_prefix_forward", "check_bf16"),
    "prefix_forward": ("check_prefix_forward", "check_bf16", "check_prefix_training"),
    "freeze_backbone": ("check_freeze_backbone", "check_prefix_training"),
    "soft_prompt_to_prefix": ("check_soft_prompt_to_prefix",),
}


def _patched(key: str, edits: list[tuple[str, str]]) -> object:
    source = RELEASES[key].source
    for old, new in edits:
        assert source.count(old) == 1, (key, old)
        source = source.replace(old, new)
    namespace: dict[str, object] = {"build_prefix_cache": reference.build_prefix_cache}
    exec(_PREAMBLE, namespace)  # noqa: S102
    exec(source, namespace)  # noqa: S102
    return namespace[RELEASES[key].function]


def _objects(function: str, fn: object) -> dict[str, object]:
    objects = graded_objects()
    objects[function] = fn
    if function == "build_prefix_cache":  # the service's prefix_forward, on this cache
        namespace: dict[str, object] = {}
        exec(_PREAMBLE + _FORWARD_OK, namespace)  # noqa: S102
        namespace["build_prefix_cache"] = fn
        forward = namespace["prefix_forward"]
        objects["prefix_forward"] = forward
    return objects


def _run(check: str, objects: dict[str, object]) -> None:
    get_check(check)(*(objects[name] for name in CHECKS[check][1]))


@pytest.mark.parametrize("key", sorted(PATCHES))
def test_a_small_patch_passes_every_check_the_release_fails(key: str) -> None:
    rel = RELEASES[key]
    fixed = _objects(rel.function, _patched(key, PATCHES[key]))
    broken = _objects(rel.function, release(key))
    failed = []
    for check in CHECKS_OF[rel.function]:
        _run(check, fixed)  # the patched release passes notebook 02's checks
        try:
            _run(check, broken)
        except AssertionError:
            failed.append(check)
    assert CHECKS_OF[rel.function][0] in failed, (key, failed)
    changed = sum(len(new.splitlines()) for _, new in PATCHES[key])
    assert changed <= 4, "the patch should stay small"


def test_release_2_4_needs_both_halves_of_its_patch() -> None:
    memo = PATCHES["prefix_forward_2_4"][0][0]
    only_cache = _patched(
        "prefix_forward_2_4",
        [
            (
                memo,
                "    prefix = encoder()\n"
                "    cache = build_prefix_cache(prefix, batch, prefix.dtype)\n",
            )
        ],
    )
    _run("check_prefix_forward", _objects("prefix_forward", only_cache))
    with pytest.raises(AssertionError, match="bfloat16 model"):
        _run("check_bf16", _objects("prefix_forward", only_cache))  # INC-7 left in
    only_dtype = _patched(
        "prefix_forward_2_4",
        [
            (
                "_CACHES[encoder] = build_prefix_cache(prefix, batch, prefix.dtype)",
                "_CACHES[encoder] = build_prefix_cache(prefix, batch, model.dtype)",
            )
        ],
    )
    with pytest.raises(AssertionError, match="build a fresh cache in every call"):
        _run("check_prefix_forward", _objects("prefix_forward", only_dtype))  # INC-6 left in


def _twin_logits(fn, model, encoder, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return fn(model, encoder, ids, mask).logits


def test_each_release_behaves_like_the_bug_it_is_said_to_be() -> None:
    model = tiny_model("GPT-2")
    encoder = reference.PrefixEncoder(model.config, 3, init_std=0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    same = {
        "INC-2": prefix_bugs.prefix_shared_by_layers,
        "INC-4": prefix_bugs.prefix_mask_not_extended,
        "INC-5": prefix_bugs.prefix_positions_from_zero,
    }
    for incident, twin in same.items():
        shown = _twin_logits(inc.INCIDENTS[incident], model, encoder, ids, mask)
        assert torch.allclose(shown, _twin_logits(twin, model, encoder, ids, mask), atol=1e-5)
        assert not torch.allclose(
            shown, _twin_logits(reference.prefix_forward, model, encoder, ids, mask), atol=1e-3
        )
    for fn in (inc.INCIDENTS["INC-1"], prefix_bugs.prefix_layer0_only):  # the same crash
        with pytest.raises(RuntimeError, match="must match the size"):
            fn(model, encoder, ids, mask)
    twice = [inc.INCIDENTS["INC-6"](model, encoder, ids, mask) for _ in range(2)]
    assert twice[1].logits.shape == twice[0].logits.shape  # ... but the cache grew:
    assert service_forward("build_prefix_cache_2_0") is inc.INCIDENTS["INC-1"]
    frozen = inc.INCIDENTS["INC-8"](tiny_model("GPT-2"))
    assert all(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert not any(
        p.requires_grad for p in inc.LAST_GOOD["INC-8"](tiny_model("GPT-2")).parameters()
    )
    prompt = torch.randn(3, model.config.n_embd)
    compiled, right = (
        inc.INCIDENTS["INC-10"](model, prompt),
        reference.soft_prompt_to_prefix(model, prompt),
    )
    assert torch.allclose(compiled[0], right[0], atol=1e-5)  # layer 0 right, the rest not
    assert not torch.allclose(compiled[1:], right[1:], atol=1e-2)


def test_every_release_is_a_bug_of_the_zoo_for_notebook_05() -> None:
    for key, rel in RELEASES.items():
        if rel.incidents:
            bug = BUGS[f"release_{key}"]
            assert bug.notebook == "05" and bug.replaces == {rel.function: release(key)}


def test_show_release_shows_the_code_that_runs(capsys) -> None:
    inc.show_release("INC-2")
    diff = capsys.readouterr().out
    assert "--- release 2.0\n+++ release 2.1" in diff
    assert "+    return course.make_cache([(keys, values)] * len(prefix))" in diff
    inc.show_release("prefix_forward 2.4", whole=True)
    assert capsys.readouterr().out.rstrip().endswith(RELEASES["prefix_forward_2_4"].source.rstrip())
    with pytest.raises(KeyError, match="INC-10"):
        inc.show_release("INC-99")


def _module_with(tmp_path: Path, source: str) -> object:
    path = tmp_path / "student_cell.py"
    path.write_text(_PREAMBLE + "\n" + source)
    spec = importlib.util.spec_from_file_location("student_cell", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["student_cell"] = module
    spec.loader.exec_module(module)
    return module


def test_show_patch_counts_the_changed_lines(tmp_path, capsys) -> None:
    key = "prefix_forward_2_4"
    patched = RELEASES[key].source
    for old, new in PATCHES[key]:
        patched = patched.replace(old, new)
    fn = _module_with(tmp_path, patched.split("\n\n\n", 1)[1]).prefix_forward
    assert inc.show_patch(fn, "prefix_forward 2.4") == (4, 1)
    assert "your patch of release 2.4: 4 line(s) removed, 1 added" in capsys.readouterr().out
    same = _module_with(tmp_path, RELEASES["freeze_backbone_2_6"].source).freeze_backbone
    assert inc.show_patch(same, "INC-8") == (0, 0)
    assert "nothing patched yet" in capsys.readouterr().out
