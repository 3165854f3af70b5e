"""Checks for notebook 01, prompt tuning: ``SoftPrompt``, ``prepend_prompt``, training,
save/load, and equivalence with a hard prompt and with PEFT's PromptTuning.

Prompt tuning puts ``P`` trainable vectors in front of the token embeddings and nowhere else:
the checks run the student's objects on tiny GPT-2 and Llama-GQA models and record every
layer's attention, so a prompt that sneaks in as a key/value prefix is caught, as are a wrong
mask, unmasked labels, a detached prompt or an initialisation at the wrong scale.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from autograder import reference
from autograder.checks.frozen import verify_training
from autograder.checks.harness import describe, max_diff, sandbox, student_call
from autograder.checks.models import Batch, tiny_model, tiny_models
from autograder.checks.recording import Recording, record

__all__ = [
    "check_peft_prompt_equivalence",
    "check_prepend_prompt",
    "check_prompt_equivalence",
    "check_prompt_training",
    "check_save_load_prompt",
    "check_soft_prompt",
]

IGNORE_INDEX = -100
_CACHE_KEYS = ("cache", "past_key_values")


def _make_prompt(SoftPrompt: type, n_tokens: int, embedding: nn.Embedding, **kwargs) -> nn.Module:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return student_call(
        f"SoftPrompt({n_tokens}, embedding{', ' + args if args else ''})",
        SoftPrompt,
        n_tokens,
        embedding,
        **kwargs,
    )


def _model_inputs(label: str, out: object) -> Mapping:
    if not isinstance(out, Mapping):
        raise AssertionError(
            f"{label}: prepend_prompt returned {describe(out)}, expected a dict of model inputs "
            "(inputs_embeds, attention_mask, labels) for model(**inputs)"
        )
    return out


def _weight(label: str, prompt: nn.Module, shape: tuple[int, int], how: str) -> torch.Tensor:
    weight = getattr(prompt, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise AssertionError(
            f"{label}: SoftPrompt({how}).weight is {describe(weight)}, expected an nn.Parameter "
            f"of shape {shape} (P, d)"
        )
    if tuple(weight.shape) != shape:
        raise AssertionError(
            f"{label}: SoftPrompt({how}).weight has shape {tuple(weight.shape)}, expected "
            f"{shape} (P, d): one row of the hidden size d per prompt token"
        )
    return weight


# ---------------------------------------------------------------------------------------------
# SoftPrompt
# ---------------------------------------------------------------------------------------------
def _check_random_init(label: str, SoftPrompt: type, embedding: nn.Embedding) -> None:
    p, d = 5, embedding.weight.shape[1]
    table = embedding.weight.detach().clone()
    prompt = _make_prompt(SoftPrompt, p, embedding, init="random", seed=0)
    weight = _weight(label, prompt, (p, d), "5, embedding, init='random'")
    params = list(prompt.named_parameters())
    total = sum(t.numel() for _, t in params)
    if total != p * d:
        raise AssertionError(
            f"{label}: SoftPrompt(5, embedding) has {total} parameter values "
            f"({', '.join(n for n, _ in params)}), expected P·d = {p * d}. Store only the (P, d) "
            "prompt: read the embedding in __init__ to size and initialise the prompt, but do "
            "not keep it as an attribute (it would become a submodule, and its whole vocabulary "
            "table would count as prompt parameters)"
        )
    if not weight.requires_grad:
        raise AssertionError(f"{label}: SoftPrompt.weight does not require grad")
    std, target = weight.detach().float().std().item(), table.float().std().item()
    if not 0.5 * target < std < 2.0 * target:
        hint = (
            " — it looks like N(0, 1): multiply by the std of the real embedding rows"
            if 0.7 < std < 1.4
            else ""
        )
        raise AssertionError(
            f"{label}: init='random' gives values with std {std:.3f}, expected about the std of "
            f"the real embedding rows, {target:.3f}{hint}. Vectors far larger or smaller than "
            "real token embeddings train badly"
        )
    again = _make_prompt(SoftPrompt, p, embedding, init="random", seed=0)
    other = _make_prompt(SoftPrompt, p, embedding, init="random", seed=1)
    if not torch.equal(again.weight, weight):
        raise AssertionError(
            f"{label}: two SoftPrompt(5, embedding, init='random', seed=0) differ: seed a "
            "torch.Generator with `seed` and draw from it"
        )
    if torch.equal(other.weight, weight):
        raise AssertionError(
            f"{label}: seed=0 and seed=1 give the same random prompt: the seed is ignored"
        )
    out = student_call("prompt(3)", prompt, 3)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (3, p, d):
        raise AssertionError(
            f"{label}: prompt(3) returned {describe(out)}, expected a tensor (3, {p}, {d}) "
            "(batch_size, P, d)"
        )
    if not all(torch.equal(row, weight) for row in out):
        raise AssertionError(f"{label}: prompt(3)[b] is not prompt.weight for every b")
    out.sum().backward()
    if weight.grad is None or not weight.grad.abs().sum() > 0:
        raise AssertionError(
            f"{label}: prompt(3).sum().backward() leaves no gradient on prompt.weight: return "
            "the weight itself expanded (weight.unsqueeze(0).expand(...)), not a detached copy"
        )
    if not torch.equal(embedding.weight, table):
        raise AssertionError(f"{label}: building a SoftPrompt changed the embedding table")


def _check_vocab_init(label: str, SoftPrompt: type, embedding: nn.Embedding) -> None:
    p, d = 5, embedding.weight.shape[1]
    table = embedding.weight.detach().clone()
    prompt = _make_prompt(SoftPrompt, p, embedding, init="vocab", seed=0)
    weight = _weight(label, prompt, (p, d), "5, embedding, init='vocab'")
    is_row = (weight.detach()[:, None, :] == table[None]).all(-1).any(-1)
    if not is_row.all():
        bad = is_row.logical_not().nonzero().flatten().tolist()
        raise AssertionError(
            f"{label}: init='vocab': prompt rows {bad} are not rows of the embedding table; copy "
            "the rows of randomly sampled token ids"
        )
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    shared = not torch.equal(embedding.weight, table)
    with torch.no_grad():
        embedding.weight.copy_(table)
    if shared:
        raise AssertionError(
            f"{label}: init='vocab': changing the prompt changed the embedding table — the prompt "
            "shares memory with the model's weights (a slice/view of embedding.weight). Copy "
            "the rows (.clone()), or training the prompt edits the frozen vocabulary"
        )
    again = _make_prompt(SoftPrompt, p, embedding, init="vocab", seed=0)
    other = _make_prompt(SoftPrompt, p, embedding, init="vocab", seed=1)
    if not torch.equal(again.weight, original):
        raise AssertionError(
            f"{label}: two SoftPrompt(5, embedding, init='vocab', seed=0) differ: sample the ids "
            "with a torch.Generator seeded with `seed`"
        )
    if torch.equal(other.weight, again.weight):
        raise AssertionError(
            f"{label}: init='vocab' with seed=0 and seed=1 picks the same rows: sample random "
            "token ids with the seeded generator"
        )


def _check_text_init(label: str, SoftPrompt: type, embedding: nn.Embedding) -> None:
    d = embedding.weight.shape[1]
    table = embedding.weight.detach()
    ids = [5, 9, 17, 33, 4]
    prompt = _make_prompt(SoftPrompt, 5, embedding, init="text", init_ids=ids)
    weight = _weight(label, prompt, (5, d), f"5, embedding, init='text', init_ids={ids}")
    if not torch.equal(weight.detach(), table[ids]):
        raise AssertionError(
            f"{label}: init='text', init_ids={ids}: the prompt rows are not embedding rows "
            f"{ids} in order (max |diff| {max_diff(weight, table[ids]):.3g}); row i must be "
            "embedding.weight[init_ids[i]]"
        )
    short = [11, 22, 33]
    want = [short[i % 3] for i in range(7)]
    prompt = _make_prompt(SoftPrompt, 7, embedding, init="text", init_ids=short)
    weight = _weight(label, prompt, (7, d), f"7, embedding, init='text', init_ids={short}")
    if not torch.equal(weight.detach(), table[want]):
        raise AssertionError(
            f"{label}: init='text' with 3 ids for P=7 should repeat the text: rows {want}"
        )


def check_soft_prompt(SoftPrompt: type) -> None:
    """SoftPrompt: a (P, d) parameter and nothing else; random init at the scale of real
    embeddings, seeded; 'vocab' copies real rows; 'text' copies the text's rows; forward(B) is
    (B, P, d) with a gradient path."""
    with sandbox():
        for label, model in tiny_models():
            embedding = model.get_input_embeddings()
            _check_random_init(label, SoftPrompt, embedding)
            _check_vocab_init(label, SoftPrompt, embedding)
            _check_text_init(label, SoftPrompt, embedding)


# ---------------------------------------------------------------------------------------------
# prepend_prompt
# ---------------------------------------------------------------------------------------------
def _no_kv_prefix(label: str, rec: Recording, inputs: Mapping) -> None:
    """Prompt tuning leaves every layer with as many keys as queries."""
    for key in _CACHE_KEYS:
        if inputs.get(key) is not None:
            raise AssertionError(
                f"{label}: prepend_prompt returned a key/value cache ({key!r}): that is prefix "
                "tuning. Prompt tuning only prepends P vectors to inputs_embeds; the model "
                "computes every layer's keys and values from them"
            )
    for call in rec.calls:
        if call.key_len != call.query_len:
            raise AssertionError(
                f"{label}: layer {call.layer}: attention saw {call.key_len} keys for "
                f"{call.query_len} queries — the soft prompt became a key/value prefix (prefix "
                "tuning). Prompt tuning feeds it ONLY as input embeddings, so every layer has as "
                "many keys as queries"
            )


def _check_prepended(
    label: str, model: nn.Module, prompt: nn.Module, batch: Batch, out: Mapping
) -> None:
    b, t = batch.shape
    weight = prompt.weight.detach()
    p, d = weight.shape
    embeds = out.get("inputs_embeds")
    if "input_ids" in out or not isinstance(embeds, torch.Tensor):
        raise AssertionError(
            f"{label}: prepend_prompt returned keys {sorted(out)}, expected 'inputs_embeds' "
            "(B, P+T, d) and 'attention_mask' (B, P+T) (and 'labels' when labels are given), "
            "no 'input_ids': the model reads the embeddings you built instead of the ids"
        )
    if tuple(embeds.shape) != (b, p + t, d):
        raise AssertionError(
            f"{label}: inputs_embeds has shape {tuple(embeds.shape)}, expected {(b, p + t, d)} "
            f"(B, P+T, d): the {p} prompt vectors followed by the {t} token embeddings"
        )
    tokens = model.get_input_embeddings()(batch.input_ids).detach()
    if torch.allclose(embeds[:, t:], weight.expand(b, -1, -1)):
        raise AssertionError(
            f"{label}: the prompt sits AFTER the tokens in inputs_embeds; it must come first: "
            "torch.cat([prompt(B), token_embeddings], dim=1)"
        )
    if not torch.allclose(embeds[:, :p], weight.expand(b, -1, -1)):
        raise AssertionError(
            f"{label}: inputs_embeds[:, :P] is not the prompt (max |diff| "
            f"{max_diff(embeds[:, :p], weight.expand(b, -1, -1)):.3g}); put prompt(B), unscaled, "
            "in front"
        )
    if not torch.allclose(embeds[:, p:], tokens):
        raise AssertionError(
            f"{label}: inputs_embeds[:, P:] is not the token embeddings "
            "model.get_input_embeddings()(input_ids)"
        )
    mask = out.get("attention_mask")
    want_mask = torch.cat(
        [torch.ones(b, p, dtype=batch.attention_mask.dtype), batch.attention_mask], 1
    )
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, p + t):
        raise AssertionError(
            f"{label}: attention_mask is {describe(mask)}, expected shape {(b, p + t)} (B, P+T): "
            f"extend the mask with {p} ones in front, one per prompt vector"
        )
    if not torch.equal(mask.long(), want_mask.long()):
        front = mask[:, :p].tolist()
        raise AssertionError(
            f"{label}: attention_mask is wrong: its first P columns are {front}, expected all 1 "
            "(the prompt is always visible), followed by the original mask"
        )
    labels = out.get("labels")
    want = torch.cat([torch.full((b, p), IGNORE_INDEX), batch.labels], 1)
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (b, p + t):
        raise AssertionError(
            f"{label}: labels is {describe(labels)}, expected shape {(b, p + t)} (B, P+T): "
            f"extend the labels with {p} entries of -100 in front"
        )
    if not torch.equal(labels[:, :p], want[:, :p]):
        raise AssertionError(
            f"{label}: labels at the {p} soft-prompt positions are {labels[0, :p].tolist()}, "
            "expected -100 (no loss there: the prompt has no target token)"
        )
    if not torch.equal(labels, want):
        raise AssertionError(f"{label}: labels[:, P:] are not the original labels")


def check_prepend_prompt(prepend_prompt: Callable, SoftPrompt: type) -> None:
    """prepend_prompt: the prompt enters ONLY as the first P input embeddings (no layer sees
    extra keys), mask extended with ones, labels -100 over the prompt, a gradient reaches the
    prompt."""
    with sandbox():
        for label, model in tiny_models():
            reference.freeze_backbone(model)
            batch = Batch()
            prompt = _make_prompt(SoftPrompt, 4, model.get_input_embeddings(), seed=0)
            out = student_call(
                "prepend_prompt(model, prompt, input_ids, attention_mask, labels)",
                prepend_prompt, model, prompt, batch.input_ids, batch.attention_mask, batch.labels,
            )  # fmt: skip
            _model_inputs(label, out)
            with record(model) as rec:
                try:
                    outputs, error = model(**out), None
                except Exception as err:  # noqa: BLE001 - reported after the structural checks
                    outputs, error = None, err
            _no_kv_prefix(label, rec, out)
            _check_prepended(label, model, prompt, batch, out)
            if error is not None:
                raise AssertionError(
                    f"{label}: model(**prepend_prompt(...)) raised {type(error).__name__}: {error}"
                )
            bare = student_call(
                "prepend_prompt(model, prompt, input_ids, attention_mask) without labels",
                prepend_prompt, model, prompt, batch.input_ids, batch.attention_mask,
            )  # fmt: skip
            if _model_inputs(label, bare).get("labels") is not None:
                raise AssertionError(
                    f"{label}: without labels, prepend_prompt still returned labels: leave them "
                    "out (or None) so the model computes no loss"
                )
            if outputs.loss.requires_grad:
                outputs.loss.backward()
            grad = prompt.weight.grad
            if grad is None or not grad.abs().sum() > 0:
                raise AssertionError(
                    f"{label}: after loss.backward() the prompt has no gradient: the soft vectors "
                    "must enter inputs_embeds through the graph (no .detach(), .data or "
                    "torch.no_grad())"
                )


# ---------------------------------------------------------------------------------------------
# equivalences
# ---------------------------------------------------------------------------------------------
def check_prompt_equivalence(SoftPrompt: type, prepend_prompt: Callable) -> None:
    """A soft prompt initialised from a text's embedding rows reproduces the logits of that text
    used as a hard prompt, on every real position."""
    text = [7, 21, 40, 11]
    p = len(text)
    with sandbox():
        for label, model in tiny_models():
            batch = Batch()
            b = batch.shape[0]
            prompt = _make_prompt(
                SoftPrompt, p, model.get_input_embeddings(), init="text", init_ids=text
            )
            inputs = student_call(
                "prepend_prompt(model, prompt, input_ids, attention_mask)",
                prepend_prompt, model, prompt, batch.input_ids, batch.attention_mask,
            )  # fmt: skip
            with torch.no_grad():
                soft = student_call(
                    "model(**prepend_prompt(...))", model, **_model_inputs(label, inputs)
                ).logits
                hard = model(
                    input_ids=torch.cat([torch.tensor(text).expand(b, -1), batch.input_ids], 1),
                    attention_mask=torch.cat(
                        [torch.ones(b, p, dtype=torch.long), batch.attention_mask], 1
                    ),
                ).logits
            if soft.shape != hard.shape:
                raise AssertionError(
                    f"{label}: logits with the soft prompt have shape {tuple(soft.shape)}, with "
                    f"the hard prompt {tuple(hard.shape)}"
                )
            diff = max_diff(soft[:, p:], hard[:, p:])
            if diff > 1e-5:
                raise AssertionError(
                    f"{label}: a soft prompt initialised from the text {text} gives logits that "
                    f"differ from the hard prompt's by up to {diff:.3g} on the real positions, "
                    "expected equal: init='text' must copy embedding rows init_ids in order, and "
                    "prepend_prompt must put them, unscaled, in front of the token embeddings"
                )


def check_peft_prompt_equivalence(SoftPrompt: type, prepend_prompt: Callable) -> None:
    """The same prompt vectors loaded into PEFT's PromptTuning give the same logits and loss as
    model(**prepend_prompt(...))."""
    from peft import PromptTuningConfig, get_peft_model

    p = 4
    with sandbox():
        for label, model in tiny_models():
            batch = Batch()
            prompt = _make_prompt(SoftPrompt, p, model.get_input_embeddings(), seed=2)
            inputs = student_call(
                "prepend_prompt(model, prompt, input_ids, attention_mask, labels)",
                prepend_prompt, model, prompt, batch.input_ids, batch.attention_mask, batch.labels,
            )  # fmt: skip
            with torch.no_grad():
                ours = student_call(
                    "model(**prepend_prompt(...))", model, **_model_inputs(label, inputs)
                )
                peft_model = get_peft_model(
                    tiny_model(label),
                    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p),
                )
                peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt.weight)
                theirs = peft_model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    labels=batch.labels,
                )
            if ours.logits.shape != theirs.logits.shape:
                raise AssertionError(
                    f"{label}: logits {tuple(ours.logits.shape)}, PEFT PromptTuning gives "
                    f"{tuple(theirs.logits.shape)} (B, P+T, vocab)"
                )
            diff = max_diff(ours.logits, theirs.logits)
            loss = abs(ours.loss.item() - theirs.loss.item())
            if diff > 1e-5 or loss > 1e-5:
                raise AssertionError(
                    f"{label}: PEFT PromptTuning with the same {p} vectors differs: max |Δlogits| "
                    f"{diff:.3g}, |Δloss| {loss:.3g}. PEFT prepends the vectors, unscaled, to the "
                    "input embeddings, extends the mask with ones and the labels with -100"
                )


# ---------------------------------------------------------------------------------------------
# training, save / load
# ---------------------------------------------------------------------------------------------
def check_prompt_training(
    freeze_backbone: Callable, SoftPrompt: type, prepend_prompt: Callable
) -> None:
    """Training a soft prompt with the grader's optimizer leaves the backbone bit-identical and
    trains exactly P·d values."""
    p = 4

    def soft_prompt(model: nn.Module) -> nn.Module:
        return _make_prompt(SoftPrompt, p, model.get_input_embeddings(), seed=0)

    def forward(model: nn.Module, prompt: nn.Module, input_ids, attention_mask, labels):
        inputs = prepend_prompt(model, prompt, input_ids, attention_mask, labels)
        return model(**inputs)

    with sandbox():
        for label, model in tiny_models():
            d = model.get_input_embeddings().weight.shape[1]
            verify_training(
                label, model, freeze_backbone, soft_prompt, forward,
                expected_trainable=(p * d, f"P·d = {p}·{d}"), what="the soft prompt",
            )  # fmt: skip


def check_save_load_prompt(save_prompt: Callable, load_prompt: Callable, SoftPrompt: type) -> None:
    """save_prompt writes a small file (the prompt only); load_prompt restores the exact values
    on the given embedding's device and dtype."""
    p = 5
    with sandbox():
        for label, model in tiny_models():
            embedding = model.get_input_embeddings()
            prompt = _make_prompt(SoftPrompt, p, embedding, seed=3)
            with torch.no_grad():
                prompt.weight.add_(torch.randn_like(prompt.weight) * 0.1)  # "trained" values
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "prompt.pt"
                student_call("save_prompt(prompt, path)", save_prompt, prompt, path)
                if not path.is_file():
                    found = sorted(x.name for x in Path(tmp).iterdir())
                    raise AssertionError(
                        f"{label}: save_prompt(prompt, path) wrote no file at path (found "
                        f"{found}); save exactly to the path given"
                    )
                size, raw = path.stat().st_size, prompt.weight.numel() * 4
                if size > 10 * raw + 4096:
                    raise AssertionError(
                        f"{label}: the prompt file has {size} bytes for a prompt of {raw} bytes: "
                        "save only the prompt's weight (not the model, not the embedding table)"
                    )
                loaded = student_call("load_prompt(path, embedding)", load_prompt, path, embedding)
                weight = getattr(loaded, "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.shape != prompt.weight.shape:
                    raise AssertionError(
                        f"{label}: load_prompt returned an object whose .weight is "
                        f"{describe(weight)}, expected {tuple(prompt.weight.shape)} (P, d)"
                    )
                if not torch.equal(weight.detach(), prompt.weight.detach()):
                    raise AssertionError(
                        f"{label}: the loaded prompt differs from the saved one (max |diff| "
                        f"{max_diff(weight, prompt.weight):.3g}): copy the saved values into the "
                        "new prompt (a fresh SoftPrompt holds its random init)"
                    )
                half = nn.Embedding(*embedding.weight.shape, dtype=torch.bfloat16)
                loaded = student_call("load_prompt(path, bf16_embedding)", load_prompt, path, half)
                weight = loaded.weight
                if weight.dtype != half.weight.dtype or weight.device != half.weight.device:
                    raise AssertionError(
                        f"{label}: load_prompt(path, embedding) with a bfloat16 embedding gave a "
                        f"{weight.dtype} prompt on {weight.device}, expected {half.weight.dtype} "
                        f"on {half.weight.device}: use the embedding's device and dtype"
                    )
                if not torch.equal(weight.detach(), prompt.weight.detach().to(torch.bfloat16)):
                    raise AssertionError(f"{label}: the prompt loaded in bfloat16 has other values")
                out = student_call("loaded_prompt(2)", loaded, 2)
                if tuple(out.shape) != (2, *prompt.weight.shape):
                    raise AssertionError(
                        f"{label}: loaded_prompt(2) has shape {tuple(out.shape)}, expected "
                        f"{(2, *prompt.weight.shape)}"
                    )
