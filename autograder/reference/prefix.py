"""Deep prefix tuning (notebook 02; Li & Liang 2021, P-tuning v2): keys/values at every layer."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel  # noqa: F401

from course.compat import cache_keyword, kv_geometry, make_cache


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
