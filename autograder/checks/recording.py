"""See what every layer of a model receives, whatever code drove the model.

:func:`record` switches a model to a registered attention implementation that records each
call and then runs the model's own eager attention, so outputs are unchanged. Per call it keeps
the layer index, the query and key lengths, the key/value tensors as attention received them
(graph kept: a check can ask whether the prefix part has a gradient path to a parameter) and
the additive mask. It also records the position ids the model embedded (GPT-2's ``wpe``,
Llama's rotary embedding), the keyword arguments of every top-level forward, and the hidden
states entering each decoder layer (taken at the layer's first norm, i.e. after any forward
pre-hook a student registered on the layer) and leaving it.

Shapes: queries ``(B, H, Tq, D)``; keys and values ``(B, H_kv, Tk, D)`` (before GQA repetition);
mask ``(B, 1, Tq, Tk)``, additive (0 = visible, very negative = hidden).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

__all__ = ["NAME", "AttentionCall", "Recording", "decoder_layers", "record"]

NAME = "autograder_recording"
_ACTIVE: list[Recording] = []


@dataclass
class AttentionCall:
    """One call of one layer's attention."""

    layer: int
    query_len: int
    key: torch.Tensor  # (B, H_kv, Tk, D)
    value: torch.Tensor  # (B, H_kv, Tk, D)
    mask: torch.Tensor | None  # (B, 1, Tq, Tk) additive

    @property
    def key_len(self) -> int:
        return self.key.shape[-2]

    def visible(self) -> torch.Tensor | None:
        """Boolean ``(B, Tq, Tk)``: which keys each query may attend to (None: no mask)."""
        if self.mask is None:
            return None
        m = self.mask.detach()
        if m.dtype == torch.bool:
            return m[:, 0]
        return (m > torch.finfo(m.dtype).min / 2)[:, 0]


@dataclass
class Recording:
    """Everything seen while :func:`record` was active."""

    calls: list[AttentionCall] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    model_inputs: list[dict[str, Any]] = field(default_factory=list)
    layer_inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    layer_outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def layer_calls(self, layer: int) -> list[AttentionCall]:
        """The attention calls of ``layer``, in order."""
        return [c for c in self.calls if c.layer == layer]

    def to_data(self, keys: bool = True, hidden: bool = False) -> dict[str, Any]:
        """The recording as observation data (:mod:`autograder.checks.protocol`), detached:
        per attention call its layer, query and key lengths, the mask as booleans
        ``(B, Tq, Tk)`` (``visible()``) and, with ``keys``, the key and value tensors; the
        recorded position ids; the keyword names of each top-level forward; with ``hidden``,
        the hidden states entering and leaving each layer."""
        calls = []
        for c in self.calls:
            call: dict[str, Any] = {
                "layer": c.layer,
                "query_len": c.query_len,
                "key_len": c.key_len,
                "visible": c.visible(),
            }
            if keys:
                call["key"] = c.key.detach()
                call["value"] = c.value.detach()
            calls.append(call)
        data: dict[str, Any] = {
            "calls": calls,
            "positions": [p.detach() for p in self.positions],
            "model_kwargs": [sorted(k for k, v in kw.items() if v is not None)
                             for kw in self.model_inputs],
        }  # fmt: skip
        if hidden:
            data["layer_inputs"] = {
                str(i): [t.detach() for t in ts] for i, ts in self.layer_inputs.items()
            }
            data["layer_outputs"] = {
                str(i): [t.detach() for t in ts] for i, ts in self.layer_outputs.items()
            }
        return data


def _recording_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if _ACTIVE:
        _ACTIVE[-1].calls.append(
            AttentionCall(
                layer=int(module.layer_idx),
                query_len=query.shape[-2],
                key=key,
                value=value,
                mask=None if attention_mask is None else attention_mask.detach(),
            )
        )
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, **kwargs)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a GPT-2 (``transformer.h``) or Llama (``model.layers``) model."""
    for module in model.modules():
        for name in ("h", "layers"):
            layers = getattr(module, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")


def _first_norm(layer: nn.Module) -> nn.Module:
    for module in layer.modules():
        if "norm" in type(module).__name__.lower():
            return module
    raise TypeError(f"{type(layer).__name__} has no normalisation module to observe")


def _hooks(model: nn.Module, rec: Recording) -> list[torch.utils.hooks.RemovableHandle]:
    def positions_from_embedding(_module, args):
        rec.positions.append(args[0].detach())

    def positions_from_rotary(_module, args, kwargs):
        pos = args[1] if len(args) > 1 else kwargs.get("position_ids")
        if pos is not None:
            rec.positions.append(pos.detach())

    def model_inputs(_module, args, kwargs):
        rec.model_inputs.append(dict(kwargs))

    def layer_input(index: int):
        def hook(_module, args):
            rec.layer_inputs.setdefault(index, []).append(args[0])

        return hook

    def layer_output(index: int):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            rec.layer_outputs.setdefault(index, []).append(hidden)

        return hook

    handles = [model.register_forward_pre_hook(model_inputs, with_kwargs=True)]
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.split(".")[-1] == "wpe":
            handles.append(module.register_forward_pre_hook(positions_from_embedding))
        elif "rotary" in type(module).__name__.lower():
            handles.append(
                module.register_forward_pre_hook(positions_from_rotary, with_kwargs=True)
            )
    for i, layer in enumerate(decoder_layers(model)):
        handles.append(_first_norm(layer).register_forward_pre_hook(layer_input(i)))
        handles.append(layer.register_forward_hook(layer_output(i)))
    return handles


@contextlib.contextmanager
def record(model: nn.Module) -> Iterator[Recording]:
    """Record what every layer of ``model`` receives while the block runs.

    The model's attention implementation is switched to the recording one (eager underneath,
    same outputs) and restored afterwards, and all hooks are removed.
    """
    # (re-)register on every use: a second copy of this module (loaded from its file) must
    # not leave the name pointing at a function that records into another module's list
    AttentionInterface.register(NAME, _recording_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    previous = model.config._attn_implementation
    rec = Recording()
    model.set_attn_implementation(NAME)
    handles = _hooks(model, rec)
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.remove(rec)
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
