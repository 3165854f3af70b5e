"""Plumbing for notebook 04 (serving many tenants): mixed-tenant batches, a folder of tenant
prefix files, a text-based prefix initialisation, and latency/memory measurements.

Nothing here is graded. Functions that need a graded object (``load_prefix``,
``mixed_prefix_forward``) take it as an argument, so the notebook runs on the student's own code.

Shapes: a prefix is ``(L, 2, H, P, D)`` (``H`` key/value heads), a soft prompt ``(P, d)``.
"""

from __future__ import annotations

import copy
import functools
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import nn

from course.compat import kv_geometry, output_cache
from course.training import encode_examples

__all__ = [
    "Measurement",
    "latency_ms",
    "load_registry",
    "measure_serving",
    "mixed_batches",
    "plot_serving",
    "prefix_from_text",
    "tenant_examples",
]


# ---------------------------------------------------------------------------------------------
# Data and registry
# ---------------------------------------------------------------------------------------------
def mixed_batches(
    tokenizer,
    examples: Mapping[str, Sequence],
    batch_size: int,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[dict]:
    """An endless, seeded stream of batches whose rows come from randomly chosen tenants.

    Args:
        examples: ``{tenant: training examples}`` (``course.data.Example``).

    Yields ``input_ids``, ``attention_mask``, ``labels`` ``(B, T)`` (right-padded, loss on the
    targets only, as :func:`course.batches`) and ``tenant_ids``, the tenant of each row.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not examples or any(len(v) == 0 for v in examples.values()):
        raise ValueError("every tenant needs at least one training example")
    rng = random.Random(seed)
    tenants = sorted(examples)
    while True:
        tenant_ids = [rng.choice(tenants) for _ in range(batch_size)]
        rows = [rng.choice(examples[t]) for t in tenant_ids]
        enc = encode_examples(tokenizer, rows)
        if device is not None:
            enc = {k: v.to(device) for k, v in enc.items()}
        yield {**enc, "tenant_ids": tenant_ids}


def tenant_examples(tasks: Mapping[str, object], split: str, n: int) -> list[tuple[str, object]]:
    """``n`` examples of ``split`` per tenant, interleaved: ``[(tenant, example), ...]``.

    Args:
        tasks: ``{tenant: course.data.Task}``.
    """
    per = {t: task.examples(split, n) for t, task in tasks.items()}
    return [(t, per[t][i]) for i in range(n) for t in sorted(per) if i < len(per[t])]


def load_registry(
    folder: str | Path, load_prefix: Callable, config
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Every ``<tenant>.safetensors`` in ``folder``, loaded with ``load_prefix(path, config)``.

    Returns ``(prefixes, metas)``, both keyed by tenant (the file's stem). A file that
    ``load_prefix`` refuses (another backbone) is reported and skipped, not served.
    """
    prefixes, metas = {}, {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            prefixes[path.stem], metas[path.stem] = load_prefix(path, config)
        except ValueError as err:
            print(f"skipped {path.name}: {err}")
    return prefixes, metas


@torch.no_grad()
def prefix_from_text(model, tokenizer, text: str, length: int | None = None) -> torch.Tensor:
    """The keys and values the frozen ``model`` computes for ``text``: a prefix initialised from
    real activations (Li & Liang, 2021), ``(L, 2, H, P, D)`` on the CPU in float32 — exactly what
    the hard prompt ``text`` puts in every layer's cache.

    ``length``: ``P``; the text's tokens are repeated or cut to that many (default: as many as
    the text has).
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the text has no tokens")
    if length is not None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        ids = [ids[i % len(ids)] for i in range(length)]
    device = model.get_input_embeddings().weight.device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in output_cache(out).layers]
    return torch.stack(layers).float().cpu()


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device=None) -> float:
    """Median wall-clock milliseconds of ``fn()`` (no gradients; synchronised on a GPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(dev)
        start = time.perf_counter()
        fn()
        _sync(dev)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _bytes(module_or_tensor) -> int:
    if isinstance(module_or_tensor, torch.Tensor):
        return module_or_tensor.numel() * module_or_tensor.element_size()
    return sum(p.numel() * p.element_size() for p in module_or_tensor.parameters())


@dataclass(frozen=True)
class Measurement:
    """One serving configuration: ``method`` with ``n_tenants`` tenants and prompt/prefix length
    ``prompt_len``, serving one mixed batch of ``batch`` requests of ``tokens`` tokens.

    ``latency_ms``: median time of the batch's forward pass(es). ``weights_mb``: parameters the
    server holds (backbone + every tenant's prompt/prefix, or one full copy per tenant).
    ``kv_mb``: the keys/values the batch attends over, all layers (prefix/prompt positions
    included). ``compile_ms``: for prompts compiled into caches, the one-time cost of compiling
    one tenant's prompt (median over the tenants), paid when the server loads it; else None."""

    method: str
    n_tenants: int
    prompt_len: int
    batch: int
    tokens: int
    latency_ms: float
    weights_mb: float
    kv_mb: float
    compile_ms: float | None = None


def _soft_prompt_forward(model, prompts, tenant_ids, input_ids, attention_mask):
    """Prompt tuning for a mixed batch: row ``b`` gets ``prompts[tenant_ids[b]] (P, d)`` in
    front of its token embeddings (P extra positions through every layer)."""
    embeds = model.get_input_embeddings()(input_ids)
    soft = torch.stack([prompts[t] for t in tenant_ids]).to(embeds.dtype)
    mask = torch.cat([attention_mask.new_ones(soft.shape[:2]), attention_mask], dim=1)
    return model(inputs_embeds=torch.cat([soft, embeds], dim=1), attention_mask=mask)


def _per_copy(copies: dict, rows: dict, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Each tenant's rows through that tenant's own model copy, one copy after the other."""
    for tenant, idx in rows.items():
        if idx:
            copies[tenant](input_ids=input_ids[idx], attention_mask=mask[idx])


def measure_serving(
    model: nn.Module,
    mixed_prefix_forward: Callable,
    prompt_lens: Sequence[int] = (4, 16, 64),
    tenant_counts: Sequence[int] = (1, 2, 4, 8),
    fixed_prompt_len: int = 16,
    fixed_tenants: int = 4,
    batch: int = 8,
    tokens: int = 32,
    repeats: int = 5,
    seed: int = 0,
    compile_prompt: Callable | None = None,
) -> list[Measurement]:
    """Serve one mixed batch three ways (four with ``compile_prompt``) and measure each.

    * ``"prompt tuning"``: one forward pass, every request carries its tenant's ``P`` soft tokens
      as extra INPUT positions (through every layer, attention and MLP);
    * ``"prefix tuning"``: one forward pass with ``mixed_prefix_forward`` (yours): every layer
      attends to the tenant's ``P`` cached keys/values, no extra positions to compute;
    * ``"fine-tuned copies"``: one full model copy per tenant, so the batch is split by tenant
      and each part runs on its own copy, one pass after the other;
    * ``"prompt tuning, compiled"`` (when ``compile_prompt(model, prompt (P, d)) -> (L, 2, H, P,
      D)`` is given, e.g. notebook 02's ``soft_prompt_to_prefix``): the same soft prompts,
      compiled once per tenant into the key/value prefix they give (timed separately, as
      ``compile_ms``), then served with ``mixed_prefix_forward``.

    Two sweeps: ``prompt_len`` over ``prompt_lens`` with ``fixed_tenants`` tenants, and the
    number of tenants over ``tenant_counts`` with ``fixed_prompt_len``. The rows of the batch
    cycle through the tenants. Prompt and prefix values are random: cost does not depend on
    them.
    """
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    g = kv_geometry(model.config)
    size = g["n_layers"] * 2 * g["n_kv_heads"] * g["head_dim"]  # one position's K and V
    elem = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=gen).to(device)
    mask = torch.ones_like(ids)
    base_mb = _bytes(model) / 2**20
    results = []
    configs = [(fixed_tenants, p) for p in prompt_lens]
    configs += [(n, fixed_prompt_len) for n in tenant_counts if n != fixed_tenants]
    configs += [(fixed_tenants, fixed_prompt_len)] if fixed_prompt_len not in prompt_lens else []
    for n_tenants, p in configs:
        names = [f"tenant{i}" for i in range(n_tenants)]
        tenant_ids = [names[i % n_tenants] for i in range(batch)]
        prompts = {
            t: (torch.randn(p, g["hidden_size"], generator=gen) * 0.02).to(device, dtype)
            for t in names
        }
        prefixes = {
            t: (torch.randn(g["n_layers"], 2, g["n_kv_heads"], p, g["head_dim"], generator=gen)
                * 0.5).to(device, dtype)
            for t in names
        }  # fmt: skip
        common = {"n_tenants": n_tenants, "prompt_len": p, "batch": batch, "tokens": tokens}
        kv_mb = batch * (p + tokens) * size * elem / 2**20
        runs = {
            "prompt tuning": (
                functools.partial(_soft_prompt_forward, model, prompts, tenant_ids, ids, mask),
                base_mb + sum(_bytes(v) for v in prompts.values()) / 2**20,
                kv_mb,
            ),
            "prefix tuning": (
                functools.partial(mixed_prefix_forward, model, prefixes, tenant_ids, ids, mask),
                base_mb + sum(_bytes(v) for v in prefixes.values()) / 2**20,
                kv_mb,
            ),
        }
        compile_ms = None
        if compile_prompt is not None:
            compiled, times = {}, []
            for t in names:
                _sync(device)
                start = time.perf_counter()
                with torch.no_grad():
                    compiled[t] = compile_prompt(model, prompts[t]).to(device, dtype)
                _sync(device)
                times.append((time.perf_counter() - start) * 1000)
            compile_ms = statistics.median(times)
            runs["prompt tuning, compiled"] = (
                functools.partial(mixed_prefix_forward, model, compiled, tenant_ids, ids, mask),
                base_mb + sum(_bytes(v) for v in compiled.values()) / 2**20,
                kv_mb,
            )
        if p == fixed_prompt_len:
            copies = {t: copy.deepcopy(model) for t in names}
            rows = {t: [i for i, u in enumerate(tenant_ids) if u == t] for t in names}
            kv_copies = batch * tokens * size * elem / 2**20
            runs["fine-tuned copies"] = (
                functools.partial(_per_copy, copies, rows, ids, mask),
                n_tenants * base_mb,
                kv_copies,
            )
        for method, (fn, weights_mb, kv) in runs.items():
            with torch.no_grad():
                ms = latency_ms(fn, repeats, 1, device)
            extra = {"compile_ms": compile_ms} if method == "prompt tuning, compiled" else {}
            results.append(Measurement(method, **common, latency_ms=ms, weights_mb=weights_mb,
                                       kv_mb=kv, **extra))  # fmt: skip
    return results


_STYLE = {
    "prompt tuning": ("C0", "o-"),
    "prompt tuning, compiled": ("C3", "s--"),
    "prefix tuning": ("C1", "o-"),
    "fine-tuned copies": ("C2", "o-"),
}
_LABEL = {
    "prompt tuning": "prompt tuning, served naively (P soft tokens per request)",
    "prompt tuning, compiled": "prompt tuning, compiled once per tenant into a cache",
}
"""Legend text: the naive prompt runs as input positions in every request; compiled into a
cache once per tenant it is served like a prefix."""


def plot_serving(results: Sequence[Measurement], fixed_prompt_len: int = 16,
                 fixed_tenants: int = 4) -> Figure:  # fmt: skip
    """Three panels: latency vs prompt/prefix length, latency vs tenants, memory vs tenants."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    for method, (color, line) in _STYLE.items():
        by_len = sorted(
            (r.prompt_len, r.latency_ms)
            for r in results
            if r.method == method and r.n_tenants == fixed_tenants
        )
        by_tenants = sorted(
            (r.n_tenants, r.latency_ms, r.weights_mb)
            for r in results
            if r.method == method and r.prompt_len == fixed_prompt_len
        )
        if len(by_len) > 1:
            axes[0].plot(*zip(*by_len), line, color=color, label=_LABEL.get(method, method))
        if by_tenants:
            n, ms, mb = zip(*by_tenants)
            axes[1].plot(n, ms, line, color=color, label=_LABEL.get(method, method))
            axes[2].plot(n, mb, line, color=color, label=_LABEL.get(method, method))
    b = results[0].batch if results else 0
    axes[0].set(xlabel="prompt / prefix length P", ylabel="ms per batch",
                title=f"latency, {fixed_tenants} tenants, batch {b}")  # fmt: skip
    axes[1].set(xlabel="tenants in the batch", ylabel="ms per batch",
                title=f"latency, P = {fixed_prompt_len}")  # fmt: skip
    axes[2].set(xlabel="tenants served", ylabel="MB of weights held",
                title="memory: backbone + adapters, or copies")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    plt.close(fig)
    return fig
