"""Loading the frozen backbone: a hub model, or the bundled tiny LM, through one path.

``load_backbone("tiny")`` loads ``course/assets/tiny-lm`` with ``from_pretrained`` exactly as a
hub model would be loaded, so nothing in the notebooks depends on which one they got.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

__all__ = [
    "TINY_LM_DIR",
    "BackboneChoice",
    "BackboneError",
    "HUB_DEFAULT",
    "check_tokenizer",
    "hub_reachable",
    "load_backbone",
    "pick_device",
    "resolve_backbone",
]

TINY_LM_DIR = Path(__file__).resolve().parent / "assets" / "tiny-lm"
HUB_DEFAULT = "gpt2"
_HUB_HOST = "huggingface.co"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class BackboneError(ValueError):
    """A backbone could not be loaded; the message says how to fix it."""


@dataclass(frozen=True)
class BackboneChoice:
    """What ``load_backbone`` will load and why (shown in notebooks and by the doctor)."""

    source: str  # a hub id, or the path of the bundled tiny LM
    is_tiny: bool
    reason: str


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the one asked for, else cuda, then mps, then cpu.

    Raises :class:`BackboneError` for an unknown device string or one that is not available here.
    """
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BackboneError(
            f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:0', 'mps', or None to pick one"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(
            f"device {device!r} asked for, but no CUDA GPU is visible: use device=None or 'cpu' "
            "(in Colab: Runtime > Change runtime type > GPU)"
        )
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise BackboneError(f"device {device!r} asked for, but MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BackboneError(f"device {device!r} is not supported: use 'cpu', 'cuda' or 'mps'")
    return dev


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the model hub answers within ``timeout`` seconds (False when offline is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection((_HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_backbone(name: str = "auto", device: torch.device | None = None) -> BackboneChoice:
    """Decide what ``name`` means here.

    ``"tiny"``: the bundled tiny LM. ``"auto"``: GPT-2 from the hub on a GPU runtime when the hub
    answers quickly, else the bundled tiny LM (GPT-2 trains too slowly on a CPU for the notebooks'
    budgets). A local directory or any other string is taken as a hub id / path.
    """
    if not isinstance(name, str) or not name.strip():
        raise BackboneError(
            f"backbone name must be 'auto', 'tiny', a hub id or a directory, got {name!r}"
        )
    if name == "tiny":
        return BackboneChoice(str(TINY_LM_DIR), True, "asked for the bundled tiny LM")
    if name == "auto":
        device = device if device is not None else pick_device()
        if device.type == "cpu":
            return BackboneChoice(
                str(TINY_LM_DIR), True, "auto on a CPU: the bundled tiny LM keeps the budgets"
            )
        if hub_reachable():
            return BackboneChoice(HUB_DEFAULT, False, f"auto on {device.type} with the hub online")
        return BackboneChoice(str(TINY_LM_DIR), True, "auto: the hub is not reachable (offline)")
    if Path(name).expanduser().is_dir():
        return BackboneChoice(str(Path(name).expanduser()), False, "a local model directory")
    if name.startswith((".", "/", "~")):
        raise BackboneError(f"model directory {name!r} does not exist")
    return BackboneChoice(name, False, "a hub id")


def check_tokenizer(model: PreTrainedModel, tokenizer) -> None:
    """Raise :class:`BackboneError` when ``tokenizer`` cannot belong to ``model``.

    Every token id the tokenizer can produce must index the model's embedding table, and the
    special tokens the course uses (eos, pad) must exist.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise BackboneError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding table has "
            f"{vocab} rows: they come from different models. Load both with "
            "course.load_backbone(name), or pass the matching tokenizer."
        )
    if tokenizer.eos_token_id is None:
        raise BackboneError("the tokenizer has no eos token; the course needs one to end targets")


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise BackboneError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)} or a torch.dtype")


def load_backbone(
    name: str = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | None = None,
):
    """Load a causal LM and its tokenizer, ready for the course.

    Args:
        name: ``"auto"``, ``"tiny"`` (the bundled tiny LM), a hub id (``"gpt2"``) or a directory.
        device: ``None`` picks cuda, then mps, then cpu.
        dtype: ``None`` (float32), ``"bf16"``, ``"fp16"`` or a ``torch.dtype``.
        tokenizer: load the tokenizer from here instead of ``name`` (checked for a match).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer pads on the
        right and has a pad token. ``model.course_choice`` says what was loaded and why.
    """
    dev = pick_device(device)
    torch_dtype = _resolve_dtype(dtype)
    choice = resolve_backbone(name, dev)
    local = choice.is_tiny or Path(choice.source).is_dir()
    if choice.is_tiny and not (TINY_LM_DIR / "config.json").is_file():
        raise BackboneError(
            f"the bundled tiny LM is missing from {TINY_LM_DIR}: reinstall the package, or "
            "rebuild it with `python -m course.pretrain`"
        )
    if not local and not hub_reachable():
        raise BackboneError(
            f"{choice.source!r} would come from the model hub, which is not reachable here "
            "(offline, or HF_HUB_OFFLINE is set). Use name='tiny' for the bundled model, or a "
            "local directory that holds a saved model."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            choice.source, dtype=torch_dtype, local_files_only=local
        )
        tok = AutoTokenizer.from_pretrained(tokenizer or choice.source, local_files_only=local)
    except OSError as err:
        raise BackboneError(
            f"could not load {choice.source!r}: {err}. Check the hub id (e.g. 'gpt2', "
            "'HuggingFaceTB/SmolLM2-135M'), or use name='tiny'."
        ) from err
    except ValueError as err:
        raise BackboneError(
            f"{choice.source!r} is not a causal language model the course can use: {err}"
        ) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    check_tokenizer(model, tok)
    model.to(dev)
    model.eval()
    model.course_choice = choice
    return model, tok
