"""Prompt-tuning mistakes (notebook 01): initialisation, prepending, labels, save/load, and
prompt tuning built as a key/value prefix; and valid but unusual implementations every check
must pass (:data:`VARIANTS`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from autograder.bugzoo import Bug, Variant
from autograder.reference import IGNORE_INDEX, SoftPrompt
from course.compat import cache_keyword, kv_geometry, make_cache

__all__ = ["BUGS", "VARIANTS"]


class UnitNormalSoftPrompt(SoftPrompt):
    """Random init drawn from N(0, 1), as PEFT's PromptEmbedding does, ignoring the scale of
    the real embeddings (std ~0.02 in GPT-2)."""

    def __init__(self, n_tokens, embedding, init="random", init_ids=None, seed=0) -> None:
        super().__init__(n_tokens, embedding, init, init_ids, seed)
        if init == "random":
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                self.weight.copy_(torch.randn(self.weight.shape, generator=gen))


class RepeatedRowSoftPrompt(SoftPrompt):
    """``init="random"`` draws ONE vector of d values at the right scale and repeats it for the
    P rows (a shape slip: ``randn(d)`` instead of ``randn(P, d)``): every prompt token starts
    identical."""

    def __init__(self, n_tokens, embedding, init="random", init_ids=None, seed=0) -> None:
        super().__init__(n_tokens, embedding, init, init_ids, seed)
        if init == "random":
            with torch.no_grad():
                self.weight.copy_(self.weight[:1].expand_as(self.weight))


class EmbeddingKeepingSoftPrompt(SoftPrompt):
    """Keeps the embedding as an attribute, which registers it as a submodule: the prompt's
    parameters() now include the whole vocabulary table."""

    def __init__(self, n_tokens, embedding, init="random", init_ids=None, seed=0) -> None:
        super().__init__(n_tokens, embedding, init, init_ids, seed)
        self.embedding = embedding


class ViewSoftPrompt(SoftPrompt):
    """``init="vocab"`` takes ``P`` consecutive rows as a slice of the embedding table: the
    prompt shares memory with the frozen vocabulary."""

    def __init__(self, n_tokens, embedding, init="random", init_ids=None, seed=0) -> None:
        super().__init__(n_tokens, embedding, init, init_ids, seed)
        if init == "vocab":
            gen = torch.Generator().manual_seed(seed)
            start = int(torch.randint(0, embedding.weight.shape[0] - n_tokens, (1,), generator=gen))
            self.weight = nn.Parameter(embedding.weight.data[start : start + n_tokens])


class TextIgnoringSoftPrompt(SoftPrompt):
    """``init="text"`` samples vocabulary rows and never looks at ``init_ids``."""

    def __init__(self, n_tokens, embedding, init="random", init_ids=None, seed=0) -> None:
        super().__init__(n_tokens, embedding, "vocab" if init == "text" else init, None, seed)


def _inputs(model, soft, input_ids, attention_mask, labels, *, after=False, soft_label=None):
    embeds = model.get_input_embeddings()(input_ids)
    batch, n = input_ids.shape[0], soft.shape[1]
    parts = [embeds, soft] if after else [soft, embeds]
    out = {
        "inputs_embeds": torch.cat(parts, dim=1),
        "attention_mask": torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1),
    }
    if labels is not None:
        fill = IGNORE_INDEX if soft_label is None else soft_label
        out["labels"] = torch.cat([labels.new_full((batch, n), fill), labels], dim=1)
    return out


def prepend_mask_not_extended(model, prompt, input_ids, attention_mask, labels=None):
    """Prepends the prompt but returns the original ``(B, T)`` mask."""
    soft = prompt(input_ids.shape[0])
    out = _inputs(model, soft, input_ids, attention_mask, labels)
    out["attention_mask"] = attention_mask
    return out


def prepend_labels_not_masked(model, prompt, input_ids, attention_mask, labels=None):
    """Extends the labels with token 0 instead of -100: the loss trains the model to predict
    token 0 at every soft position."""
    return _inputs(
        model, prompt(input_ids.shape[0]), input_ids, attention_mask, labels, soft_label=0
    )


def prepend_detached(model, prompt, input_ids, attention_mask, labels=None):
    """Detaches the prompt (``prompt(B).detach()``): no gradient ever reaches it."""
    soft = prompt(input_ids.shape[0]).detach()
    return _inputs(model, soft, input_ids, attention_mask, labels)


def prepend_after_tokens(model, prompt, input_ids, attention_mask, labels=None):
    """Concatenates the prompt AFTER the token embeddings."""
    return _inputs(model, prompt(input_ids.shape[0]), input_ids, attention_mask, labels, after=True)


def prepend_scaled(model, prompt, input_ids, attention_mask, labels=None):
    """Multiplies the prompt by sqrt(d), like an embedding scale some models apply."""
    soft = prompt(input_ids.shape[0]) * prompt.weight.shape[1] ** 0.5
    return _inputs(model, soft, input_ids, attention_mask, labels)


def prepend_as_kv_prefix(model, prompt, input_ids, attention_mask, labels=None):
    """Prompt tuning built as prefix tuning: the prompt vectors become every layer's
    keys/values (a cache) instead of input embeddings."""
    g = kv_geometry(model.config)
    batch, n = input_ids.shape[0], prompt.weight.shape[0]  # only what the notebook defines
    kv = prompt(batch).view(batch, n, g["n_kv_heads"], g["head_dim"]).transpose(1, 2)
    out = {
        "inputs_embeds": model.get_input_embeddings()(input_ids),
        "attention_mask": torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1),
        cache_keyword(model): make_cache([(kv, kv)] * g["n_layers"]),
    }
    if labels is not None:
        out["labels"] = labels
    return out


def load_prompt_float32(path: str | Path, embedding: nn.Embedding) -> SoftPrompt:
    """Loads the values but always as float32 on the CPU, whatever the embedding's dtype."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    prompt = SoftPrompt(state["weight"].shape[0], nn.Embedding(*embedding.weight.shape))
    with torch.no_grad():
        prompt.weight.copy_(state["weight"])
    return prompt


def load_prompt_reinitialised(path: str | Path, embedding: nn.Embedding) -> SoftPrompt:
    """Reads the file only for the prompt length and returns a freshly initialised prompt."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    return SoftPrompt(state["weight"].shape[0], embedding)


def load_prompt_ignoring_width(path: str | Path, embedding: nn.Embedding) -> SoftPrompt:
    """Puts the saved tensor in as the prompt's weight, whatever its width: a prompt saved for
    another model loads without complaint (and fails later, deep inside the forward pass)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    prompt = SoftPrompt(state["weight"].shape[0], embedding)
    weight = state["weight"].to(embedding.weight.device, embedding.weight.dtype)
    prompt.weight = nn.Parameter(weight)
    return prompt


BUGS = [
    Bug(
        name="prompt_init_unit_normal",
        description=(
            "random soft prompt drawn from N(0, 1) (PEFT's default) instead of at the std of the "
            "real embedding rows: vectors ~50x too large for GPT-2"
        ),
        notebook="01",
        replaces={"SoftPrompt": UnitNormalSoftPrompt},
        caught_by=("check_soft_prompt",),
        message_contains="N(0, 1)",
    ),
    Bug(
        name="prompt_random_rows_repeated",
        description=(
            "init='random' draws one d-vector and repeats it for every prompt token: the scale "
            "is right but the P rows start identical"
        ),
        notebook="01",
        replaces={"SoftPrompt": RepeatedRowSoftPrompt},
        caught_by=("check_soft_prompt",),
        message_contains="identical rows",
    ),
    Bug(
        name="prompt_keeps_embedding",
        description=(
            "SoftPrompt stores the embedding as self.embedding: the vocabulary table becomes a "
            "submodule, its parameters count as the prompt's and a saved prompt carries it"
        ),
        notebook="01",
        replaces={"SoftPrompt": EmbeddingKeepingSoftPrompt},
        caught_by=("check_soft_prompt",),
        message_contains="parameter values",
    ),
    Bug(
        name="prompt_vocab_init_is_a_view",
        description=(
            "init='vocab' slices the embedding table (a view): training the prompt writes into "
            "the frozen vocabulary"
        ),
        notebook="01",
        replaces={"SoftPrompt": ViewSoftPrompt},
        caught_by=("check_soft_prompt",),
        message_contains="shares memory",
    ),
    Bug(
        name="prompt_text_init_ignored",
        description="init='text' ignores init_ids and samples random vocabulary rows",
        notebook="01",
        replaces={"SoftPrompt": TextIgnoringSoftPrompt},
        caught_by=("check_soft_prompt", "check_prompt_equivalence"),
        message_contains="init_ids",
    ),
    Bug(
        name="prompt_mask_not_extended",
        description="prepend_prompt returns the original (B, T) attention mask",
        notebook="01",
        replaces={"prepend_prompt": prepend_mask_not_extended},
        caught_by=("check_prepend_prompt",),
        message_contains="extend the mask",
        also_fails=("check_peft_prompt_equivalence", "check_prompt_equivalence"),
        downstream=("check_prompt_training",),  # their training uses this prepend
    ),
    Bug(
        name="prompt_labels_not_masked",
        description="labels over the soft positions are filled with token 0 instead of -100",
        notebook="01",
        replaces={"prepend_prompt": prepend_labels_not_masked},
        caught_by=("check_prepend_prompt",),
        message_contains="-100",
        also_fails=("check_peft_prompt_equivalence",),
        downstream=("check_prompt_training",),  # their training uses this prepend
    ),
    Bug(
        name="prompt_detached",
        description="prepend_prompt detaches the prompt: it never receives a gradient",
        notebook="01",
        replaces={"prepend_prompt": prepend_detached},
        caught_by=("check_prepend_prompt", "check_prompt_training"),
        message_contains="gradient",
    ),
    Bug(
        name="prompt_after_tokens",
        description="the soft prompt is concatenated after the token embeddings",
        notebook="01",
        replaces={"prepend_prompt": prepend_after_tokens},
        caught_by=("check_prepend_prompt",),
        message_contains="AFTER",
        also_fails=("check_peft_prompt_equivalence", "check_prompt_equivalence"),
        downstream=("check_prompt_training",),  # their training uses this prepend
    ),
    Bug(
        name="prompt_scaled",
        description="prepend_prompt multiplies the prompt by sqrt(d) before prepending it",
        notebook="01",
        replaces={"prepend_prompt": prepend_scaled},
        caught_by=(
            "check_prepend_prompt",
            "check_prompt_equivalence",
            "check_peft_prompt_equivalence",
        ),
        message_contains="unscaled",
        downstream=("check_prompt_training",),  # their training uses this prepend
    ),
    Bug(
        name="prompt_built_as_prefix",
        description=(
            "prompt tuning submitted as prefix tuning: prepend_prompt feeds the prompt vectors "
            "to every layer as keys/values instead of prepending them to the input embeddings"
        ),
        notebook="01",
        replaces={"prepend_prompt": prepend_as_kv_prefix},
        caught_by=("check_prepend_prompt",),
        message_contains="key/value",
        also_fails=("check_peft_prompt_equivalence", "check_prompt_equivalence"),
        downstream=("check_prompt_training",),  # their training uses this prepend
    ),
    Bug(
        name="load_prompt_ignores_dtype",
        description="load_prompt always returns a float32 prompt, whatever the model's dtype",
        notebook="01",
        replaces={"load_prompt": load_prompt_float32},
        caught_by=("check_save_load_prompt",),
        message_contains="dtype",
    ),
    Bug(
        name="load_prompt_reinitialises",
        description="load_prompt builds a new random prompt and never copies the saved values",
        notebook="01",
        replaces={"load_prompt": load_prompt_reinitialised},
        caught_by=("check_save_load_prompt",),
        message_contains="differs from the saved one",
        downstream=("check_prompt_artifact",),
    ),
    Bug(
        name="load_prompt_ignores_width",
        description=(
            "load_prompt installs the saved tensor whatever its width: a prompt saved for another "
            "model loads silently instead of raising ValueError (the notebook catches ValueError "
            "to retrain; a wrong width otherwise fails later inside torch.cat)"
        ),
        notebook="01",
        replaces={"load_prompt": load_prompt_ignoring_width},
        caught_by=("check_save_load_prompt",),
        message_contains="ValueError",
    ),
]


# ---------------------------------------------------------------------------------------------
# valid but unusual implementations
# ---------------------------------------------------------------------------------------------
class EmbeddingLayoutSoftPrompt(nn.Module):
    """PEFT's layout: the prompt is an ``nn.Embedding(P, d)`` (its parameter is named
    ``embedding.weight``), exposed as ``weight``; built by an ``nn.Embedding`` constructor, which
    draws from the global random state before the seeded values replace it."""

    def __init__(self, n_tokens, embedding, init="random", init_ids=None, seed=0) -> None:
        super().__init__()
        values = SoftPrompt(n_tokens, embedding, init, init_ids, seed).weight.detach()
        self.embedding = nn.Embedding(*values.shape, device=values.device, dtype=values.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(values)

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)


class OtherDrawSoftPrompt(nn.Module):
    """Random values drawn another way (``normal_`` on an empty tensor, at the mean per-row std,
    from a generator offset by one draw), vocabulary rows sampled without replacement, and
    ``forward`` returning a copy (``repeat``) rather than a view."""

    def __init__(self, n_tokens, embedding, init="random", init_ids=None, seed=0) -> None:
        super().__init__()
        table = embedding.weight.detach()
        gen = torch.Generator().manual_seed(seed)
        torch.rand(1, generator=gen)
        if init == "random":
            std = table.float().std(dim=1).mean().item()
            values = torch.empty(n_tokens, table.shape[1]).normal_(0.0, std, generator=gen)
        elif init == "vocab":
            values = table[torch.randperm(table.shape[0], generator=gen)[:n_tokens]].float()
        elif init == "text":
            values = torch.stack([table[init_ids[i % len(init_ids)]] for i in range(n_tokens)])
        else:
            raise ValueError(f"unknown init {init!r}")
        self.weight = nn.Parameter(values.clone().to(table.device, table.dtype))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).repeat(batch_size, 1, 1)


def prepend_bool_mask(model, prompt, input_ids, attention_mask, labels=None):
    """Looks the tokens up in the embedding table directly, returns a boolean mask and
    ``labels=None`` when no labels are given."""
    embeds = model.get_input_embeddings().weight[input_ids]
    soft = prompt(input_ids.shape[0])
    n = soft.shape[1]
    ones = torch.ones(input_ids.shape[0], n, dtype=torch.bool, device=input_ids.device)
    return {
        "inputs_embeds": torch.cat([soft.to(embeds.dtype), embeds], dim=1),
        "attention_mask": torch.cat([ones, attention_mask.bool()], dim=1),
        "labels": None
        if labels is None
        else torch.cat([torch.full_like(labels[:, :n], IGNORE_INDEX), labels], dim=1),
    }


def save_prompt_safetensors(prompt, path: str | Path) -> Path:
    """Writes the prompt as a safetensors file (not a pickle)."""
    from safetensors.torch import save_file

    save_file({"prompt": prompt.weight.detach().cpu().contiguous()}, str(path))
    return Path(path)


def load_prompt_safetensors(path: str | Path, embedding: nn.Embedding) -> SoftPrompt:
    """Reads :func:`save_prompt_safetensors`' file straight onto the embedding's device and
    dtype; a prompt of another width is refused with ValueError."""
    from safetensors.torch import load_file

    weight = load_file(str(path))["prompt"]
    if weight.shape[1] != embedding.weight.shape[1]:
        raise ValueError(f"width {weight.shape[1]} != {embedding.weight.shape[1]}")
    prompt = SoftPrompt(weight.shape[0], embedding, init="text", init_ids=[0])
    with torch.no_grad():
        prompt.weight.copy_(weight)
    return prompt


VARIANTS = [
    Variant(
        name="prompt_peft_layout",
        description=(
            "SoftPrompt keeps its (P, d) values in an nn.Embedding(P, d) as PEFT does, exposed as "
            ".weight: the parameter is named embedding.weight"
        ),
        notebook="01",
        replaces={"SoftPrompt": EmbeddingLayoutSoftPrompt},
    ),
    Variant(
        name="prompt_other_draws",
        description=(
            "SoftPrompt draws its random init and its vocabulary rows differently (still normal at "
            "the embedding's scale, still seeded) and forward returns a copy, not a view"
        ),
        notebook="01",
        replaces={"SoftPrompt": OtherDrawSoftPrompt},
    ),
    Variant(
        name="prepend_bool_mask",
        description=(
            "prepend_prompt returns a boolean attention mask and labels=None when no labels are "
            "given, and indexes the embedding table instead of calling the module"
        ),
        notebook="01",
        replaces={"prepend_prompt": prepend_bool_mask},
    ),
    Variant(
        name="prompt_saved_as_safetensors",
        description="save_prompt / load_prompt use a safetensors file instead of torch.save",
        notebook="01",
        replaces={"save_prompt": save_prompt_safetensors, "load_prompt": load_prompt_safetensors},
    ),
]
