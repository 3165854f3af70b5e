"""Interactive explorers for the notebooks, each with a plain-function form.

Three explorers, each in three layers:

* data: :func:`trainable_counts`, :func:`prefix_attention`, :func:`nearest_tokens` return numbers;
* figure: :func:`param_figure`, :func:`prefix_attention_figure`, :func:`nearest_tokens_figure`
  return a matplotlib ``Figure``;
* widget: :func:`param_explorer`, :func:`prefix_attention_explorer`, :func:`nearest_tokens_explorer`
  return an ipywidgets widget, or a static figure when ipywidgets is not installed (or
  ``static=True``), so a notebook works the same in JupyterLab, Colab and a script. Under
  nbgrader (``NBGRADER_EXECUTION`` set) the explorers draw nothing and return ``None``: nobody
  looks at them there, and a graded run must stay fast.

An explorer's widget holds only its controls. Its figure is an ordinary output right below them
(an image with a display id, redrawn in place when a control moves), not the content of an
``Output`` widget: a saved notebook keeps the figure wherever it is opened again — after the
kernel has stopped, in nbviewer or on GitHub, in Formgrader (which drops widget views) — even
where the widget state was not saved. The controls themselves come back after the kernel has
stopped only when JupyterLab saves widget state (Settings → "Save Widget State Automatically",
i.e. ``@jupyter-widgets/jupyterlab-manager:plugin`` ``saveState``, off by default).

None of this is graded; the forward passes it inspects are the student's own.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from course.compat import kv_geometry
from course.plots import human_count
from course.training import is_grading

__all__ = [
    "PRESETS",
    "nearest_tokens",
    "nearest_tokens_explorer",
    "nearest_tokens_figure",
    "param_explorer",
    "param_figure",
    "prefix_attention",
    "prefix_attention_explorer",
    "prefix_attention_figure",
    "record_attention",
    "trainable_counts",
    "widgets_available",
]


def widgets_available() -> bool:
    """Whether ipywidgets can be imported here."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _explorer_class():
    """``FigureExplorer``: a ``VBox`` of controls that shows its figure as an ordinary output."""
    import ipywidgets as w
    from IPython.display import display, update_display

    class FigureExplorer(w.VBox):
        """The controls of an explorer; displaying it shows them, then its current figure as an
        image output with its own display id, which :meth:`show` redraws in place."""

        def __init__(self, rows, name: str):
            super().__init__(rows)
            self.figure: Figure | None = None
            self.display_id = f"course-explorer-{uuid.uuid4().hex}"
            self._name = name
            self._shown = False

        def show(self, fig: Figure) -> None:
            """Make ``fig`` the figure, redrawing every place this explorer is displayed."""
            self.figure = fig
            if self._shown:
                update_display(fig, display_id=self.display_id)

        def _ipython_display_(self):
            bundle = self._repr_mimebundle_()
            # what a viewer without widgets shows instead of the controls
            bundle["text/plain"] = f"[{self._name}: controls that need a running kernel]"
            display(bundle, raw=True)
            if self.figure is not None:
                display(self.figure, display_id=self.display_id)
                self._shown = True

    return FigureExplorer


def _explorer(rows, name: str):
    return _explorer_class()(rows, name)


# ---------------------------------------------------------------------------------------------
# 1. How many parameters does each method train?
# ---------------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, int]] = {
    # geometry as course.kv_geometry returns it, plus the backbone's parameter count
    # (computed from the public configs with transformers on the meta device).
    "gpt2 (124M)": {
        "n_layers": 12, "n_heads": 12, "n_kv_heads": 12, "head_dim": 64, "hidden_size": 768,
        "backbone": 124_439_808,
    },
    "gpt2-medium (355M)": {
        "n_layers": 24, "n_heads": 16, "n_kv_heads": 16, "head_dim": 64, "hidden_size": 1024,
        "backbone": 354_823_168,
    },
    "SmolLM2-135M (Llama, GQA 9/3)": {
        "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64, "hidden_size": 576,
        "backbone": 134_515_008,
    },
}  # fmt: skip


def _geometry(config_or_geometry) -> dict[str, int]:
    if isinstance(config_or_geometry, Mapping):
        missing = {"n_layers", "n_kv_heads", "head_dim", "hidden_size"} - set(config_or_geometry)
        if missing:
            raise ValueError(f"geometry dict lacks {sorted(missing)}")
        return dict(config_or_geometry)
    return kv_geometry(config_or_geometry)


def trainable_counts(
    config_or_geometry,
    prefix_len: int,
    n_prefix_layers: int | None = None,
    reparam_hidden: int = 512,
) -> dict[str, int]:
    """Trainable parameters of each method for one task.

    Args:
        config_or_geometry: a model config, or a dict as :func:`course.kv_geometry` returns.
        prefix_len: ``P``, the number of prompt / prefix positions.
        n_prefix_layers: how many layers get a prefix (default: all ``L``).
        reparam_hidden: width of the reparameterisation MLP.

    Returns:
        ``prompt tuning`` (``P*d``), ``deep prompt`` (``n*P*d``), ``prefix (KV)``
        (``n*P*2*H*D``; with ``H*D = d`` unless grouped-query attention shrinks it) and
        ``prefix + MLP (training)`` (``P*d + d*h + h + h*n*2*H*D + n*2*H*D``), with ``n`` the
        number of prefixed layers.
    """
    g = _geometry(config_or_geometry)
    if prefix_len < 1:
        raise ValueError(f"prefix_len must be >= 1, got {prefix_len}")
    n = g["n_layers"] if n_prefix_layers is None else n_prefix_layers
    if not 1 <= n <= g["n_layers"]:
        raise ValueError(f"n_prefix_layers must be in 1..{g['n_layers']}, got {n}")
    d, kv = g["hidden_size"], g["n_kv_heads"] * g["head_dim"]
    h = reparam_hidden
    return {
        "prompt tuning": prefix_len * d,
        "deep prompt": n * prefix_len * d,
        "prefix (KV)": n * prefix_len * 2 * kv,
        "prefix + MLP (training)": prefix_len * d + d * h + h + h * n * 2 * kv + n * 2 * kv,
    }


def param_figure(
    config_or_geometry,
    prefix_len: int = 10,
    n_prefix_layers: int | None = None,
    reparam_hidden: int = 512,
    backbone_params: int | None = None,
    name: str = "",
) -> Figure:
    """Bars of :func:`trainable_counts` (log scale, each labelled with its share of the
    backbone) beside how they grow with the prefix length."""
    g = _geometry(config_or_geometry)
    backbone = backbone_params or g.get("backbone")
    counts = trainable_counts(g, prefix_len, n_prefix_layers, reparam_hidden)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4), layout="constrained")
    names = list(counts)[::-1]
    vals = [counts[k] for k in names]
    bars = left.barh(names, vals, color=[f"C{i}" for i in range(len(names))])
    labels = [human_count(v) + (f" ({100 * v / backbone:.3g}%)" if backbone else "") for v in vals]
    left.bar_label(bars, labels=labels, padding=3)
    left.set_xscale("log")
    left.margins(x=0.45)
    n = g["n_layers"] if n_prefix_layers is None else n_prefix_layers
    head = f"{name}: " if name else ""
    left.set_title(f"{head}P={prefix_len}, prefix in {n}/{g['n_layers']} layers")
    left.set_xlabel("trainable parameters (log)")

    lengths = sorted({1, 5, 10, 20, 50, 100, 200, prefix_len})
    for i, key in enumerate(counts):
        ys = [trainable_counts(g, p, n_prefix_layers, reparam_hidden)[key] for p in lengths]
        right.plot(
            lengths, ys, marker="o", markersize=3, color=f"C{len(counts) - 1 - i}", label=key
        )
    if backbone:
        right.axhline(backbone, color="k", linestyle="--", linewidth=1, label="backbone (frozen)")
    right.axvline(prefix_len, color="grey", linewidth=0.8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("prefix length P (log)")
    right.set_ylabel("parameters (log)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    plt.close(fig)
    return fig


def param_explorer(model_or_config=None, static: bool = False):
    """Sliders for the prefix length, the number of prefixed layers and the MLP width, over the
    given model and the presets in :data:`PRESETS`.

    Returns an ipywidgets ``VBox`` of the controls (displayed, it shows the figure below them),
    or (no ipywidgets, or ``static=True``) the figure for the given model at ``P=10``; ``None``
    under nbgrader.
    """
    if is_grading():
        return None
    choices: dict[str, dict[str, int]] = {}
    if model_or_config is not None:
        config = getattr(model_or_config, "config", model_or_config)
        geo = kv_geometry(config)
        if hasattr(model_or_config, "parameters"):
            geo["backbone"] = sum(p.numel() for p in model_or_config.parameters())
        choices["this notebook's model"] = geo
    choices.update(PRESETS)
    first = next(iter(choices))
    if static or not widgets_available():
        return param_figure(choices[first], 10, name=first)

    import ipywidgets as w

    model = w.Dropdown(options=list(choices), value=first, description="model")
    plen = w.IntSlider(10, min=1, max=200, description="prefix P", continuous_update=False)
    layers = w.IntSlider(
        choices[first]["n_layers"], min=1, max=choices[first]["n_layers"],
        description="layers", continuous_update=False,
    )  # fmt: skip
    hidden = w.Dropdown(options=[128, 256, 512, 800], value=512, description="MLP width")
    box = _explorer([w.HBox([model, hidden]), w.HBox([plen, layers])], "param_explorer")

    def redraw(*_):
        geo = choices[model.value]
        layers.max = geo["n_layers"]
        box.show(param_figure(geo, plen.value, layers.value, hidden.value, name=model.value))

    def on_model(change):
        layers.max = choices[change["new"]]["n_layers"]
        layers.value = layers.max

    model.observe(on_model, names="value")
    for ctl in (model, plen, layers, hidden):
        ctl.observe(redraw, names="value")
    redraw()
    return box


# ---------------------------------------------------------------------------------------------
# 2. How much does each layer attend to the prefix?
# ---------------------------------------------------------------------------------------------
_RECORDER = "course_record_attention"
_records: list[torch.Tensor] | None = None


def _recording_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """Eager attention that also stores its weights ``(B, Hq, Tq, Tk)`` (grouped-query aware)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    if _records is not None:
        _records.append(weights.detach().float().cpu())
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register_recorder() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_RECORDER, _recording_attention)
    AttentionMaskInterface.register(_RECORDER, eager_mask)


@contextmanager
def record_attention(model):
    """Within the block, every attention layer of ``model`` stores its weights in the yielded
    list, one ``(B, Hq, Tq, Tk)`` tensor per layer call, in call order. The model's attention
    implementation is restored afterwards."""
    global _records
    _register_recorder()
    previous = model.config._attn_implementation
    records: list[torch.Tensor] = []
    model.set_attn_implementation(_RECORDER)
    _records = records
    try:
        yield records
    finally:
        _records = None
        model.set_attn_implementation(previous)


@torch.no_grad()
def prefix_attention(
    model,
    forward: Callable[[torch.Tensor, torch.Tensor], object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix_len: int,
) -> torch.Tensor:
    """Share of each query's attention that lands on the first ``prefix_len`` keys.

    Args:
        forward: runs ``model`` with the prefix (or prompt), e.g.
            ``lambda ids, am: prefix_forward(model, encoder, ids, am)``.
        input_ids, attention_mask: ``(B, T)``.
        prefix_len: ``P``: the keys at positions ``0..P-1`` are the prefix (a KV prefix, or a soft
            prompt's positions).

    Returns:
        ``(L, B, H, Tq)``: per layer, example, query head and query position, the attention mass
        on the prefix keys (0..1). ``Tq`` is ``T`` for a KV prefix and ``P+T`` for a soft prompt,
        whose own positions are queries too.
    """
    with record_attention(model) as records:
        forward(input_ids, attention_mask)
    if not records:
        raise RuntimeError("no attention was recorded: does `forward` run `model`?")
    n_layers = kv_geometry(model.config)["n_layers"]
    if len(records) != n_layers:
        raise RuntimeError(
            f"recorded {len(records)} attention calls for a {n_layers}-layer model: "
            "`forward` must run the model exactly once"
        )
    shares = [w[..., :prefix_len].sum(-1) for w in records]  # each (B, H, Tq)
    return torch.stack(shares)


def prefix_attention_figure(
    shares: torch.Tensor,
    tokens: Sequence[str] | None = None,
    example: int = 0,
    head: int | None = None,
    title: str = "attention paid to the prefix",
) -> Figure:
    """Heatmap layers x query positions of :func:`prefix_attention` for one example (mean over
    heads, or one ``head``), with a per-layer mean beside it."""
    grid = shares[:, example]
    grid = grid.mean(1) if head is None else grid[:, head]  # (L, Tq)
    n_layers, n_q = grid.shape
    fig, (ax, side) = plt.subplots(
        1, 2, figsize=(min(2 + 0.45 * n_q, 13), 0.45 * n_layers + 1.8),
        gridspec_kw={"width_ratios": [max(n_q, 4), 3]}, layout="constrained",
    )  # fmt: skip
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(n_layers), [f"layer {i}" for i in range(n_layers)])
    if tokens is not None:
        labels = list(tokens)
        if len(labels) < n_q:  # a soft prompt's own positions come first
            labels = [f"[p{i}]" for i in range(n_q - len(labels))] + labels
        ax.set_xticks(range(n_q), labels[:n_q], rotation=70, fontsize=8)
    ax.set_xlabel("query position")
    which = "mean over heads" if head is None else f"head {head}"
    ax.set_title(f"{title} ({which})")
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of attention on the prefix")
    side.barh(range(n_layers), grid.mean(1).numpy(), color="C1")
    side.set_ylim(n_layers - 0.5, -0.5)
    side.set_yticks([])
    side.set_xlim(0, 1)
    side.set_title("layer mean")
    plt.close(fig)
    return fig


def prefix_attention_explorer(
    model,
    forward: Callable[[torch.Tensor, torch.Tensor], object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix_len: int,
    tokenizer=None,
    static: bool = False,
):
    """Pick an example and a head (or the mean over heads) and see the heatmap of
    :func:`prefix_attention_figure`. Falls back to the static figure of example 0."""
    if is_grading():
        return None
    shares = prefix_attention(model, forward, input_ids, attention_mask, prefix_len)

    def tokens_of(i: int) -> list[str] | None:
        if tokenizer is None:
            return None
        n = int(attention_mask[i].sum())
        return [tokenizer.decode([t]) for t in input_ids[i, :n].tolist()] + ["<pad>"] * (
            input_ids.shape[1] - n
        )

    if static or not widgets_available():
        return prefix_attention_figure(shares, tokens_of(0))

    import ipywidgets as w

    example = w.IntSlider(0, min=0, max=shares.shape[1] - 1, description="example")
    head = w.Dropdown(
        options=[("mean", -1)] + [(str(h), h) for h in range(shares.shape[2])],
        value=-1, description="head",
    )  # fmt: skip
    box = _explorer([w.HBox([example, head])], "prefix_attention_explorer")

    def redraw(*_):
        h = None if head.value < 0 else head.value
        box.show(prefix_attention_figure(shares, tokens_of(example.value), example.value, h))

    example.observe(redraw, names="value")
    head.observe(redraw, names="value")
    redraw()
    return box


# ---------------------------------------------------------------------------------------------
# 3. Which vocabulary tokens is a trained soft prompt closest to?
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def nearest_tokens(
    vectors: torch.Tensor,
    embedding_weight: torch.Tensor,
    tokenizer,
    k: int = 5,
    metric: str = "cosine",
) -> list[list[tuple[str, float]]]:
    """The ``k`` vocabulary tokens closest to each soft-prompt vector.

    Args:
        vectors: ``(P, d)`` (e.g. ``prompt.weight``).
        embedding_weight: ``(V, d)`` (``model.get_input_embeddings().weight``).
        metric: ``"cosine"`` (similarity, higher is closer) or ``"l2"`` (distance, lower is closer).

    Returns:
        for each of the ``P`` vectors, ``k`` pairs ``(token text, similarity or distance)``,
        closest first.
    """
    if vectors.dim() != 2 or vectors.shape[1] != embedding_weight.shape[1]:
        raise ValueError(
            f"vectors must be (P, {embedding_weight.shape[1]}), got {tuple(vectors.shape)}"
        )
    v = vectors.detach().float().cpu()
    table = embedding_weight.detach().float().cpu()
    k = max(1, min(k, table.shape[0]))
    if metric == "cosine":
        sim = (
            torch.nn.functional.normalize(v, dim=-1)
            @ torch.nn.functional.normalize(table, dim=-1).T
        )
        vals, idx = sim.topk(k, dim=-1)
    elif metric == "l2":
        dist = torch.cdist(v, table)
        vals, idx = dist.topk(k, dim=-1, largest=False)
    else:
        raise ValueError(f'metric must be "cosine" or "l2", got {metric!r}')
    return [
        [(tokenizer.decode([int(i)]), float(s)) for i, s in zip(row_i, row_v)]
        for row_i, row_v in zip(idx.tolist(), vals.tolist())
    ]


def nearest_tokens_figure(
    neighbours: list[list[tuple[str, float]]],
    metric: str = "cosine",
    title: str = "nearest vocabulary tokens of each prompt vector",
) -> Figure:
    """A table-like heatmap: one row per prompt vector, its neighbours left to right, each cell
    showing the token and coloured by similarity (or distance)."""
    n_rows, k = len(neighbours), len(neighbours[0])
    values = torch.tensor([[s for _, s in row] for row in neighbours])
    fig, ax = plt.subplots(figsize=(1.3 * k + 2.2, 0.38 * n_rows + 1.2), layout="constrained")
    cmap = "viridis" if metric == "cosine" else "viridis_r"
    im = ax.imshow(values.numpy(), cmap=cmap, aspect="auto")
    for r, row in enumerate(neighbours):
        for c, (tok, s) in enumerate(row):
            red, green, blue, _ = im.cmap(im.norm(s))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            text = repr(tok)[1:-1] or "∅"
            ax.text(c, r, f"{text[:10]}\n{s:.2f}", ha="center", va="center", fontsize=7,
                    color="w" if dark else "k")  # fmt: skip
    ax.set_yticks(range(n_rows), [f"p{i}" for i in range(n_rows)])
    ax.set_xticks(range(k), [f"#{i + 1}" for i in range(k)])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="cosine similarity" if metric == "cosine" else "L2 distance")
    plt.close(fig)
    return fig


def nearest_tokens_explorer(
    vectors: torch.Tensor, embedding_weight: torch.Tensor, tokenizer, static: bool = False
):
    """Slider for ``k`` and a choice of metric over :func:`nearest_tokens_figure`; falls back to
    the static cosine figure with ``k=5``."""
    if is_grading():
        return None
    if static or not widgets_available():
        return nearest_tokens_figure(nearest_tokens(vectors, embedding_weight, tokenizer, 5))

    import ipywidgets as w

    k = w.IntSlider(5, min=1, max=10, description="k")
    metric = w.ToggleButtons(options=["cosine", "l2"], value="cosine", description="metric")
    box = _explorer([w.HBox([k, metric])], "nearest_tokens_explorer")

    def redraw(*_):
        found = nearest_tokens(vectors, embedding_weight, tokenizer, k.value, metric.value)
        box.show(nearest_tokens_figure(found, metric.value))

    k.observe(redraw, names="value")
    metric.observe(redraw, names="value")
    redraw()
    return box
