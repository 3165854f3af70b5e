"""Reference implementations of everything the notebooks grade.

The solution notebooks implement the same objects; the checks compare a student's object with
these, and the benchmarks and demo use them. Shapes follow the course's notation:
``B`` batch, ``T`` real tokens, ``P`` prefix / prompt length, ``L`` layers, ``H`` key/value heads
(``num_key_value_heads`` under grouped-query attention), ``D`` head dim, ``d`` hidden size.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from course.compat import cache_keyword, kv_geometry, make_cache

IGNORE_INDEX = -100

__all__ = [
    "METHODS",
    "DeepPrompt",
    "Method",
    "PrefixEncoder",
    "SoftPrompt",
    "build_prefix_cache",
    "checkpoint_safe_prefix_forward",
    "count_trainable",
    "deep_prompt_forward",
    "freeze_backbone",
    "generate_with_prefix",
    "load_prefix",
    "load_prompt",
    "lora_targets",
    "make_method",
    "mixed_generate",
    "mixed_prefix_forward",
    "prefix_forward",
    "prefix_from_peft_weights",
    "prefix_to_peft_weights",
    "prepend_prompt",
    "prompt_forward",
    "run_sweep",
    "save_prefix",
    "save_prompt",
]


# ---------------------------------------------------------------------------------------------
# Freezing and counting
# ---------------------------------------------------------------------------------------------
def freeze_backbone(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``model``; returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def count_trainable(module: nn.Module) -> int:
    """Number of scalar parameters of ``module`` that require grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Prompt tuning (Lester et al. 2021): trainable vectors prepended to the input embeddings only
# ---------------------------------------------------------------------------------------------
class SoftPrompt(nn.Module):
    """``n_tokens`` trainable input embeddings.

    Args:
        n_tokens: prompt length ``P``.
        embedding: the backbone's input embedding (``model.get_input_embeddings()``), read only to
            size and initialise the prompt; it is not stored.
        init: ``"random"`` (normal at the std of the real embedding rows), ``"vocab"`` (copies of
            randomly sampled rows), or ``"text"`` (the rows of ``init_ids``, cycled to ``P``).
        init_ids: token ids for ``init="text"``.
        seed: seeds the random and vocab initialisations.
    """

    def __init__(
        self,
        n_tokens: int,
        embedding: nn.Embedding,
        init: str = "random",
        init_ids: list[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        table = embedding.weight.detach()
        gen = torch.Generator().manual_seed(seed)
        if init == "random":
            std = table.float().std().item()
            values = torch.randn(n_tokens, table.shape[1], generator=gen) * std
        elif init == "vocab":
            ids = torch.randint(0, table.shape[0], (n_tokens,), generator=gen)
            values = table[ids].float().cpu().clone()
        elif init == "text":
            if not init_ids:
                raise ValueError('init="text" needs init_ids (the token ids of the text)')
            ids = torch.tensor([init_ids[i % len(init_ids)] for i in range(n_tokens)])
            values = table[ids].float().cpu().clone()
        else:
            raise ValueError(f'init must be "random", "vocab" or "text", got {init!r}')
        self.weight = nn.Parameter(values.to(device=table.device, dtype=table.dtype))

    @property
    def n_tokens(self) -> int:
        return self.weight.shape[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prompt repeated for the batch: ``(batch_size, P, d)``."""
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


def prepend_prompt(
    model: PreTrainedModel,
    prompt: SoftPrompt,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs with the soft prompt in front of the token embeddings.

    Returns ``inputs_embeds (B, P+T, d)``, ``attention_mask (B, P+T)`` (ones over the prompt) and,
    when ``labels (B, T)`` is given, ``labels (B, P+T)`` with ``-100`` over the prompt.
    """
    embeds = model.get_input_embeddings()(input_ids)
    batch = input_ids.shape[0]
    soft = prompt(batch).to(embeds.dtype)
    n = soft.shape[1]
    out = {
        "inputs_embeds": torch.cat([soft, embeds], dim=1),
        "attention_mask": torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1),
    }
    if labels is not None:
        out["labels"] = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
    return out


def prompt_forward(model, prompt, input_ids, attention_mask, labels=None):
    """Forward pass with a soft prompt; ``logits`` cover ``P+T`` positions."""
    return model(**prepend_prompt(model, prompt, input_ids, attention_mask, labels))


def save_prompt(prompt: SoftPrompt, path: str | Path) -> Path:
    """Save only the prompt vectors (a few KB) to ``path``."""
    path = Path(path)
    torch.save({"weight": prompt.weight.detach().cpu(), "kind": "soft_prompt"}, path)
    return path


def load_prompt(path: str | Path, embedding: nn.Embedding) -> SoftPrompt:
    """Load a prompt saved by :func:`save_prompt` onto ``embedding``'s device and dtype."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if state.get("kind") != "soft_prompt":
        raise ValueError(f"{path} does not hold a soft prompt saved by save_prompt")
    weight = state["weight"]
    if weight.shape[1] != embedding.weight.shape[1]:
        raise ValueError(
            f"prompt width {weight.shape[1]} != model hidden size {embedding.weight.shape[1]}"
        )
    prompt = SoftPrompt(weight.shape[0], embedding)
    with torch.no_grad():
        prompt.weight.copy_(weight)
    return prompt


# ---------------------------------------------------------------------------------------------
# Deep prefix tuning (Li & Liang 2021; P-tuning v2): trainable keys/values at every layer
# ---------------------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """Per-layer key/value prefixes, optionally reparameterised by an MLP.

    Args:
        config: the backbone's config (GPT-2 or Llama family; GQA uses ``num_key_value_heads``).
        prefix_len: ``P``.
        reparam: when True, ``P`` embeddings of size ``d`` pass through
            ``Linear(d, hidden) -> Tanh -> Linear(hidden, L*2*H*D)`` (Li & Liang 2021); call
            :meth:`export` after training to get the plain prefix and drop the MLP.
        hidden: width of the reparameterisation MLP.
        init_std: std of the random initialisation of the direct prefix / the MLP input.
        seed: seeds the initialisation.
    """

    def __init__(
        self,
        config,
        prefix_len: int,
        reparam: bool = False,
        hidden: int = 512,
        init_std: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if prefix_len < 1:
            raise ValueError(f"prefix_len must be >= 1, got {prefix_len}")
        g = kv_geometry(config)
        self.n_layers, self.n_kv_heads, self.head_dim = (
            g["n_layers"],
            g["n_kv_heads"],
            g["head_dim"],
        )
        self.prefix_len = prefix_len
        self.reparam = reparam
        gen = torch.Generator().manual_seed(seed)
        shape = (self.n_layers, 2, self.n_kv_heads, prefix_len, self.head_dim)
        if reparam:
            d = g["hidden_size"]
            self.embedding = nn.Parameter(torch.randn(prefix_len, d, generator=gen) * init_std)
            self.mlp = nn.Sequential(
                nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, self.n_layers * 2 * d_kv(g))
            )
        else:
            self.prefix = nn.Parameter(torch.randn(*shape, generator=gen) * init_std)

    def forward(self) -> torch.Tensor:
        """The prefix keys and values: ``(L, 2, H, P, D)`` (index 0 = keys, 1 = values)."""
        if not self.reparam:
            return self.prefix
        flat = self.mlp(self.embedding)  # (P, L*2*H*D)
        out = flat.view(self.prefix_len, self.n_layers, 2, self.n_kv_heads, self.head_dim)
        return out.permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def export(self) -> PrefixEncoder:
        """A direct (MLP-free) encoder holding this encoder's current prefix values."""
        plain = PrefixEncoder.__new__(PrefixEncoder)
        nn.Module.__init__(plain)
        plain.n_layers, plain.n_kv_heads, plain.head_dim = (
            self.n_layers,
            self.n_kv_heads,
            self.head_dim,
        )
        plain.prefix_len, plain.reparam = self.prefix_len, False
        plain.prefix = nn.Parameter(self().detach().clone())
        return plain


def d_kv(geometry: dict[str, int]) -> int:
    """Width of one layer's keys (or values): ``H * D``."""
    return geometry["n_kv_heads"] * geometry["head_dim"]


def build_prefix_cache(prefix: torch.Tensor, batch_size: int, dtype: torch.dtype) -> DynamicCache:
    """A FRESH cache holding the prefix at every layer.

    Args:
        prefix: ``(L, 2, H, P, D)``.
        batch_size: ``B``; each layer gets keys and values of shape ``(B, H, P, D)``.
        dtype: the model's dtype (an fp32 prefix into a bf16 model fails in SDPA).
    """
    layers = []
    for layer in prefix.to(dtype):
        key = layer[0].unsqueeze(0).expand(batch_size, -1, -1, -1)
        value = layer[1].unsqueeze(0).expand(batch_size, -1, -1, -1)
        layers.append((key, value))
    return make_cache(layers)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _max_positions(model: nn.Module) -> int | None:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def prefix_forward(
    model: PreTrainedModel,
    encoder: PrefixEncoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
):
    """Forward pass with the prefix at every layer.

    The mask is extended by ``P`` ones in front and the real tokens take positions
    ``P .. P+T-1`` (as transformers and PEFT do); ``logits`` cover the ``T`` real tokens.
    """
    batch, length = input_ids.shape
    p = encoder.prefix_len
    limit = _max_positions(model)
    if limit is not None and p + length > limit:
        raise ValueError(
            f"prefix ({p}) + tokens ({length}) = {p + length} exceeds the model's "
            f"{limit} positions: shorten the input or the prefix"
        )
    mask = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)
    positions = torch.arange(p, p + length, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    cache = build_prefix_cache(encoder(), batch, _model_dtype(model))
    kwargs = {cache_keyword(model): cache}
    return model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        labels=labels,
        use_cache=False,
        **kwargs,
    )


@torch.no_grad()
def generate_with_prefix(
    model: PreTrainedModel,
    encoder: PrefixEncoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int = 20,
    **generate_kwargs,
) -> torch.Tensor:
    """Greedy ``model.generate`` conditioned on the prefix; returns only the new tokens
    ``(B, <= max_new_tokens)``. Prompts in a batch must be left-padded."""
    batch = input_ids.shape[0]
    mask = torch.cat([attention_mask.new_ones(batch, encoder.prefix_len), attention_mask], dim=1)
    cache = build_prefix_cache(encoder(), batch, _model_dtype(model))
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", model.config.eos_token_id)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        **{cache_keyword(model): cache},
        **generate_kwargs,
    )
    return out[:, input_ids.shape[1] :]


def prefix_to_peft_weights(prefix: torch.Tensor) -> torch.Tensor:
    """Our ``(L, 2, H, P, D)`` prefix as PEFT PrefixTuning's embedding ``(P, L*2*H*D)``."""
    n_layers, two, heads, p, dim = prefix.shape
    return prefix.permute(3, 0, 1, 2, 4).reshape(p, n_layers * two * heads * dim)


def prefix_from_peft_weights(weight: torch.Tensor, config) -> torch.Tensor:
    """PEFT PrefixTuning's ``(P, L*2*H*D)`` embedding as our ``(L, 2, H, P, D)`` prefix."""
    g = kv_geometry(config)
    p = weight.shape[0]
    view = weight.view(p, g["n_layers"], 2, g["n_kv_heads"], g["head_dim"])
    return view.permute(1, 2, 3, 0, 4).contiguous()


# ---------------------------------------------------------------------------------------------
# The literal "prepend to the hidden states at every layer" form (VPT-deep style)
# ---------------------------------------------------------------------------------------------
def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("h", "layers"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")


class DeepPrompt(nn.Module):
    """``P`` trainable hidden-state vectors for each of the ``L`` layers: ``(L, P, d)``.

    Layer 0 receives them as input embeddings (like a soft prompt); before every later layer, the
    hidden states at the ``P`` prompt positions (the previous layer's outputs there) are REPLACED
    by that layer's own vectors. Unlike a key/value prefix the vectors are also queries and pass
    through each layer's frozen projections and MLP.
    """

    def __init__(self, config, prompt_len: int, init_std: float = 0.02, seed: int = 0) -> None:
        super().__init__()
        g = kv_geometry(config)
        gen = torch.Generator().manual_seed(seed)
        self.prompt_len = prompt_len
        self.weight = nn.Parameter(
            torch.randn(g["n_layers"], prompt_len, g["hidden_size"], generator=gen) * init_std
        )


def deep_prompt_forward(model, deep: DeepPrompt, input_ids, attention_mask, labels=None):
    """Forward pass with a :class:`DeepPrompt`; hooks are removed afterwards.

    ``logits`` cover ``P+T`` positions; ``labels (B, T)`` are extended with ``-100``.
    """
    p = deep.prompt_len
    batch = input_ids.shape[0]
    embeds = model.get_input_embeddings()(input_ids)
    first = deep.weight[0].to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    inputs = {
        "inputs_embeds": torch.cat([first, embeds], dim=1),
        "attention_mask": torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1),
    }
    if labels is not None:
        inputs["labels"] = torch.cat([labels.new_full((batch, p), IGNORE_INDEX), labels], dim=1)

    def make_hook(layer_idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            vec = deep.weight[layer_idx].to(hidden.dtype).unsqueeze(0).expand(batch, -1, -1)
            hidden = torch.cat([vec, hidden[:, p:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    handles = [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(_decoder_layers(model))
        if i > 0
    ]
    try:
        return model(**inputs)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Serving many tenants (notebook 04): prefix files, mixed-tenant batches
# ---------------------------------------------------------------------------------------------
PREFIX_FORMAT = "soft-prompts-course/prefix-v1"


def save_prefix(encoder_or_tensor, path: str | Path, meta: dict | None = None) -> Path:
    """Save one tenant's prefix values ``(L, 2, H, P, D)`` as a safetensors file.

    Args:
        encoder_or_tensor: a prefix encoder (called to get its values; a reparameterised
            encoder's MLP is NOT saved) or the ``(L, 2, H, P, D)`` tensor itself.
        path: the file to write.
        meta: JSON-serialisable facts about the prefix (tenant, task, steps ...), stored as JSON
            in the file's metadata and returned by :func:`load_prefix`.
    """
    from safetensors.torch import save_file

    values = encoder_or_tensor if isinstance(encoder_or_tensor, torch.Tensor) else None
    if values is None:
        with torch.no_grad():
            values = encoder_or_tensor()
    if values.dim() != 5 or values.shape[1] != 2:
        raise ValueError(f"a prefix is (L, 2, H, P, D), got shape {tuple(values.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"prefix": values.detach().float().cpu().contiguous()},
        str(path),
        metadata={"format": PREFIX_FORMAT, "meta": json.dumps(meta or {})},
    )
    return path


def load_prefix(path: str | Path, config) -> tuple[torch.Tensor, dict]:
    """Load a prefix saved by :func:`save_prefix` for a model with ``config``.

    Returns ``(prefix (L, 2, H, P, D) float32 on the CPU, meta)``. Raises ``ValueError`` naming
    both shapes when the file's geometry does not fit ``config`` (another number of layers,
    key/value heads or head dim): such a prefix would crash or silently misbehave.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if "prefix" not in f.keys():
            raise ValueError(f"{path} holds no prefix (tensors: {sorted(f.keys())})")
        values = f.get_tensor("prefix")
    g = kv_geometry(config)
    want = (g["n_layers"], 2, g["n_kv_heads"], values.shape[3] if values.dim() == 5 else "P",
            g["head_dim"])  # fmt: skip
    if tuple(values.shape) != want:
        raise ValueError(
            f"{path}: the prefix has shape {tuple(values.shape)} but this model needs "
            f"{want} (L, 2, H_kv, P, D): it was trained for another backbone"
        )
    return values, json.loads(metadata.get("meta", "{}"))


def _gather_prefixes(model, prefixes, tenant_ids, batch: int, device):
    """Per-row prefixes as one fresh cache, plus the visible prefix slots and lengths.

    Tenants whose prefixes are shorter than the longest one in the batch are LEFT-padded with
    zero keys/values in masked slots, so each row's real prefix sits right before its tokens.
    Returns ``(cache with (B, H, P_max, D) per layer, slots (B, P_max) bool, lengths (B,))``.
    """
    if len(tenant_ids) != batch:
        raise ValueError(f"{len(tenant_ids)} tenant ids for a batch of {batch} rows")
    unknown = sorted({t for t in tenant_ids if t not in prefixes})
    if unknown:
        raise KeyError(f"unknown tenant(s) {unknown}; known tenants: {sorted(prefixes)}")
    rows = [prefixes[t] for t in tenant_ids]
    lengths = torch.tensor([r.shape[3] for r in rows], device=device)
    p = int(lengths.max())
    dtype = _model_dtype(model)
    padded = [
        nn.functional.pad(r.to(device=device, dtype=dtype), (0, 0, p - r.shape[3], 0)) for r in rows
    ]
    stacked = torch.stack(padded, dim=2)  # (L, 2, B, H, P_max, D)
    cache = make_cache([(layer[0], layer[1]) for layer in stacked])
    slots = torch.arange(p, device=device)[None, :] >= (p - lengths)[:, None]
    return cache, slots, lengths


def mixed_prefix_forward(
    model: PreTrainedModel,
    prefixes: dict[str, torch.Tensor],
    tenant_ids: list[str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
):
    """One forward pass over a batch whose row ``b`` uses ``prefixes[tenant_ids[b]]``.

    Each layer's cache holds ``(B, H, P_max, D)`` keys/values gathered row by row; shorter
    prefixes are left-padded into masked slots and each row's tokens take positions
    ``P_b .. P_b+T-1``, so every row equals :func:`prefix_forward` with its own tenant alone.
    """
    batch, length = input_ids.shape
    cache, slots, lengths = _gather_prefixes(model, prefixes, tenant_ids, batch, input_ids.device)
    limit = _max_positions(model)
    if limit is not None and int(lengths.max()) + length > limit:
        raise ValueError(
            f"prefix ({int(lengths.max())}) + tokens ({length}) exceeds the model's {limit} "
            "positions: shorten the input or the prefix"
        )
    mask = torch.cat([slots.to(attention_mask.dtype), attention_mask], dim=1)
    positions = lengths[:, None] + torch.arange(length, device=input_ids.device)[None, :]
    return model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        labels=labels,
        use_cache=False,
        **{cache_keyword(model): cache},
    )


@torch.no_grad()
def mixed_generate(
    model: PreTrainedModel,
    prefixes: dict[str, torch.Tensor],
    tenant_ids: list[str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int = 20,
    **generate_kwargs,
) -> torch.Tensor:
    """Greedy generation for a mixed-tenant batch (prompts left-padded); returns only the new
    tokens ``(B, <= max_new_tokens)``. ``generate`` derives each row's positions from the mask,
    so padded prefix slots shift nothing."""
    batch = input_ids.shape[0]
    cache, slots, _ = _gather_prefixes(model, prefixes, tenant_ids, batch, input_ids.device)
    mask = torch.cat([slots.to(attention_mask.dtype), attention_mask], dim=1)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", model.config.eos_token_id)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        **{cache_keyword(model): cache},
        **generate_kwargs,
    )
    return out[:, input_ids.shape[1] :]


# ---------------------------------------------------------------------------------------------
# A prefix that survives gradient checkpointing (notebook 05)
# ---------------------------------------------------------------------------------------------
PREFIX_ATTENTION = "reference_prefix_attention"


def _prefix_attention(module, query, key, value, attention_mask, prefix_kv=None, **kwargs):
    """Eager attention with ``prefix_kv[layer, 0]`` / ``[layer, 1]`` put in front of the keys and
    values (and the mask opened over them). Without ``prefix_kv`` it is plain eager attention."""
    if prefix_kv is not None:
        batch = key.shape[0]
        layer = prefix_kv[module.layer_idx].to(key.dtype)
        key = torch.cat([layer[0].unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([layer[1].unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
        if attention_mask is not None:
            shape = (*attention_mask.shape[:-1], layer.shape[2])
            visible = (
                attention_mask.new_ones(shape)
                if attention_mask.dtype == torch.bool
                else attention_mask.new_zeros(shape)
            )
            attention_mask = torch.cat([visible, attention_mask], dim=-1)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, **kwargs)


def checkpoint_safe_prefix_forward(
    model: PreTrainedModel,
    encoder: PrefixEncoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
):
    """:func:`prefix_forward` that also works under gradient checkpointing.

    Checkpointing recomputes each layer in backward and drops a cache passed to ``forward``.
    Here the prefix travels as a forward keyword (``prefix_kv``), which the model hands to every
    layer's attention and checkpointing replays, and a registered attention function puts it in
    front of the keys/values. No state outlives the call: the model switches to that attention
    function, which is plain eager attention whenever no ``prefix_kv`` is given.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(PREFIX_ATTENTION, _prefix_attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, eager_mask)
    if model.config._attn_implementation != PREFIX_ATTENTION:
        model.set_attn_implementation(PREFIX_ATTENTION)
    batch, length = input_ids.shape
    p = encoder.prefix_len
    positions = torch.arange(p, p + length, device=input_ids.device).expand(batch, -1)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        labels=labels,
        use_cache=False,
        prefix_kv=encoder(),
    )


# ---------------------------------------------------------------------------------------------
# Experiments (notebook 03): every method behind one interface, and an equal-budget sweep
# ---------------------------------------------------------------------------------------------
METHODS = ("prompt", "prefix", "prefix_reparam", "lora", "full")
"""The methods :func:`make_method` builds, from the fewest trained values to the most."""


@dataclass
class Method:
    """One way of adapting a backbone to a task, ready to train and to generate with.

    Attributes:
        name: one of :data:`METHODS`.
        params: the tensors the optimizer updates; nothing else may change during training.
        loss_fn: ``batch -> scalar loss``; ``batch`` holds ``input_ids``, ``attention_mask`` and
            ``labels``, each ``(B, T)`` (right-padded, ``-100`` where no loss is taken).
        generate_fn: ``(input_ids (B, T), attention_mask (B, T), max_new_tokens) -> new token
            ids (B, <= max_new_tokens)``: greedy, prompts LEFT-padded (``course.evaluate``'s
            ``generate=``).
        n_trainable: the number of values trained (a reparameterisation MLP included).
        n_stored: the number of values kept per task after training (a reparameterised prefix
            is exported without its MLP; full fine-tuning keeps a whole model).
    """

    name: str
    params: list[nn.Parameter]
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    generate_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    n_trainable: int
    n_stored: int


def lora_targets(config) -> list[str]:
    """The attention projections LoRA adapts: GPT-2's fused ``c_attn`` (query, key and value in
    one ``Conv1D``), else (Llama family) ``q_proj``, ``k_proj`` and ``v_proj``."""
    return ["c_attn"] if config.model_type == "gpt2" else ["q_proj", "k_proj", "v_proj"]


def _greedy_kwargs(model: nn.Module, tok) -> dict:
    eos = getattr(tok, "eos_token_id", None)
    eos = model.config.eos_token_id if eos is None else eos
    pad = getattr(tok, "pad_token_id", None)
    return {"do_sample": False, "pad_token_id": eos if pad is None else pad, "eos_token_id": eos}


def make_method(
    name: str,
    model: PreTrainedModel,
    tok,
    length: int = 10,
    init: str = "vocab",
    init_text: str = "",
    hidden: int = 128,
    rank: int = 4,
    init_std: float = 0.5,
    seed: int = 0,
) -> Method:
    """Adapt ``model`` with method ``name`` (one of :data:`METHODS`); returns a :class:`Method`.

    Every method but ``"full"`` freezes the whole backbone first.

    Args:
        name: ``"prompt"`` (a :class:`SoftPrompt` of ``length`` vectors, ``(P, d)``),
            ``"prefix"`` (a direct :class:`PrefixEncoder`, ``(L, 2, H, P, D)``),
            ``"prefix_reparam"`` (the same through an MLP of width ``hidden``; only the exported
            prefix is stored), ``"lora"`` (PEFT LoRA of rank ``rank`` on :func:`lora_targets`,
            in place on ``model``) or ``"full"`` (every backbone parameter).
        tok: the tokenizer: ``init_text`` and the pad / eos ids of greedy generation.
        init: the soft prompt's initialisation, ``"random"``, ``"vocab"`` or ``"text"`` (the
            embeddings of ``init_text``); for the prefixes, ``"text"`` starts from the keys and
            values the frozen model computes for ``init_text`` (direct prefix only) and anything
            else from a normal draw of std ``init_std``.
        seed: seeds the prompt's and the prefix's initial draw.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    greedy = _greedy_kwargs(model, tok)

    def plain_generate(ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, **greedy)
        return out[:, ids.shape[1] :]

    def plain_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())  # tied weights appear once
        count = sum(p.numel() for p in params)
        return Method(name, params, plain_loss, plain_generate, count, count)

    freeze_backbone(model)
    device = model.get_input_embeddings().weight.device
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        gpt2 = model.config.model_type == "gpt2"
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=lora_targets(model.config),
            fan_in_fan_out=gpt2,  # GPT-2's Conv1D stores its weight as (in, out)
        )
        with warnings.catch_warnings():  # PEFT 0.21 calls a deprecated transformers 5.24 API
            warnings.simplefilter("ignore")
            get_peft_model(model, config)  # injects the adapters into model's own modules
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        count = sum(p.numel() for p in params)
        return Method(name, params, plain_loss, plain_generate, count, count)

    if name == "prompt":
        ids = tok(init_text, add_special_tokens=False)["input_ids"] if init == "text" else None
        prompt = SoftPrompt(length, model.get_input_embeddings(), init, ids, seed).to(device)

        def prompt_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(**prepend_prompt(model, prompt, **batch)).loss

        def prompt_generate(ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
            # from inputs_embeds, generate returns only the new tokens
            inputs = prepend_prompt(model, prompt, ids, mask)
            return model.generate(**inputs, max_new_tokens=n, **greedy)

        count = count_trainable(prompt)
        return Method(name, list(prompt.parameters()), prompt_loss, prompt_generate, count, count)

    reparam = name == "prefix_reparam"
    encoder = PrefixEncoder(model.config, length, reparam, hidden, init_std, seed)
    if init == "text" and not reparam:
        from course.serving import prefix_from_text

        with torch.no_grad():
            encoder.prefix.copy_(prefix_from_text(model, tok, init_text, length))
    encoder.to(device)

    def prefix_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return prefix_forward(model, encoder, **batch).loss

    def prefix_generate(ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        return generate_with_prefix(model, encoder, ids, mask, n, **greedy)

    g = kv_geometry(model.config)
    stored = g["n_layers"] * 2 * g["n_kv_heads"] * length * g["head_dim"]
    params = list(encoder.parameters())
    return Method(name, params, prefix_loss, prefix_generate, count_trainable(encoder), stored)


def run_sweep(
    configs: list[dict],
    load: Callable[[], tuple[PreTrainedModel, object]],
    make_method: Callable[..., Method],
    task,
    train_examples: list,
    eval_examples: list,
    steps: int,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict]:
    """Train and evaluate every configuration under the same budget; one row per configuration.

    For each ``config`` (``{"method": name, "lr": float}``, optionally ``"label"``, ``"n_train"``
    (train on the first ``n_train`` examples only) and any option of ``make_method``), in order:
    a FRESH backbone from ``load()``; the random state reset to ``seed``; the method built;
    exactly ``steps`` AdamW steps on batches of ``batch_size`` drawn in the same seeded order;
    greedy generation on ``eval_examples`` scored by ``task`` (``course.evaluate``).

    Returns rows ``{"label", "method", "config", "trainable", "stored", "pct", "steps",
    "seconds", "final_loss", **metrics}``: ``trainable`` and ``stored`` are the method's
    ``n_trainable`` and ``n_stored``, ``pct`` is ``100 * trainable / backbone size`` (the backbone
    as loaded), ``seconds`` the training time, ``metrics`` the task's scores.
    """
    import course

    rows = []
    for config in configs:
        config = dict(config)
        name, lr = config.pop("method"), config.pop("lr")
        label = config.pop("label", name)
        n_train = config.pop("n_train", None)
        model, tok = load()
        total = sum(p.numel() for p in model.parameters())
        device = model.get_input_embeddings().weight.device
        course.seed_everything(seed)
        method = make_method(name, model, tok, **config)
        data = course.batches(tok, train_examples[:n_train], batch_size, seed=seed, device=device)
        run = course.train(
            method.loss_fn, method.params, data, steps=steps, lr=lr, seed=seed, desc=label
        )
        with torch.no_grad():
            scores = course.evaluate(
                task, None, tok, eval_examples, device=device, show_progress=False,
                generate=method.generate_fn,
            )  # fmt: skip
        scores.pop("predictions")
        rows.append(
            {
                "label": label,
                "method": name,
                "config": {"method": name, "lr": lr, "n_train": n_train, **config},
                "trainable": method.n_trainable,
                "stored": method.n_stored,
                "pct": 100 * method.n_trainable / total,
                "steps": run.steps,
                "seconds": run.seconds,
                "final_loss": run.final_loss,
                **scores,
            }
        )
    return rows
