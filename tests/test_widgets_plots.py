"""course.widgets and course.plots: the data, the figures, and the widget/static fallbacks."""

from __future__ import annotations

import builtins
import copy

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from autograder import reference  # noqa: E402
from course import plots, widgets  # noqa: E402
from course.compat import kv_geometry  # noqa: E402
from course.training import TrainResult  # noqa: E402


class CharTokenizer:
    def decode(self, ids, **_):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture
def no_ipywidgets(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "ipywidgets" or name.startswith("ipywidgets."):
            raise ImportError("no ipywidgets here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


# --- parameter counts ----------------------------------------------------------------------
def test_counts_match_the_papers_numbers_for_gpt2():
    counts = widgets.trainable_counts(widgets.PRESETS["gpt2 (124M)"], 10)
    assert counts["prompt tuning"] == 7_680
    assert counts["prefix (KV)"] == 184_320
    assert counts["deep prompt"] == 92_160
    assert round(counts["prefix + MLP (training)"] / 1e6, 2) == 9.86


def test_counts_match_the_reference_modules(tiny_model):
    p = 3
    counts = widgets.trainable_counts(tiny_model.config, p, reparam_hidden=16)
    emb = tiny_model.get_input_embeddings()
    assert counts["prompt tuning"] == reference.SoftPrompt(p, emb).weight.numel()
    assert counts["prefix (KV)"] == reference.count_trainable(
        reference.PrefixEncoder(tiny_model.config, p)
    )
    assert counts["prefix + MLP (training)"] == reference.count_trainable(
        reference.PrefixEncoder(tiny_model.config, p, reparam=True, hidden=16)
    )
    assert counts["deep prompt"] == reference.DeepPrompt(tiny_model.config, p).weight.numel()


def test_gqa_shrinks_the_kv_prefix_only():
    g = widgets.PRESETS["SmolLM2-135M (Llama, GQA 9/3)"]
    counts = widgets.trainable_counts(g, 10)
    assert counts["prefix (KV)"] == 10 * 30 * 2 * 3 * 64
    assert counts["deep prompt"] == 10 * 30 * 576


def test_fewer_prefixed_layers_and_bad_arguments():
    g = widgets.PRESETS["gpt2 (124M)"]
    assert widgets.trainable_counts(g, 10, n_prefix_layers=6)["prefix (KV)"] == 92_160
    with pytest.raises(ValueError, match="prefix_len"):
        widgets.trainable_counts(g, 0)
    with pytest.raises(ValueError, match="n_prefix_layers"):
        widgets.trainable_counts(g, 10, n_prefix_layers=13)
    with pytest.raises(ValueError, match="lacks"):
        widgets.trainable_counts({"n_layers": 2}, 10)


def test_presets_backbone_sizes_are_the_configs_sizes():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        n = sum(p.numel() for p in GPT2LMHeadModel(GPT2Config()).parameters())
    assert widgets.PRESETS["gpt2 (124M)"]["backbone"] == n
    assert kv_geometry(GPT2Config()).items() <= widgets.PRESETS["gpt2 (124M)"].items()


def test_param_figure_and_explorer(tiny_model, no_ipywidgets):
    fig = widgets.param_figure(widgets.PRESETS["gpt2 (124M)"], 10, name="gpt2")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert isinstance(widgets.param_explorer(tiny_model), Figure)  # no ipywidgets: static


def test_param_explorer_widget(tiny_model):
    pytest.importorskip("ipywidgets")
    box = widgets.param_explorer(tiny_model)
    model_dd = box.children[0].children[0]
    slider = box.children[1].children[1]
    assert model_dd.value == "this notebook's model"
    model_dd.value = "gpt2 (124M)"
    assert slider.max == 12 and slider.value == 12


# --- attention to the prefix ------------------------------------------------------------------
def _batch(model):
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    return ids, mask


def test_record_attention_is_transparent_and_restores(tiny_model):
    ids, mask = _batch(tiny_model)
    encoder = reference.PrefixEncoder(tiny_model.config, 4)
    before = tiny_model.config._attn_implementation
    with torch.no_grad():
        want = reference.prefix_forward(tiny_model, encoder, ids, mask).logits
        with widgets.record_attention(tiny_model) as records:
            got = reference.prefix_forward(tiny_model, encoder, ids, mask).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert tiny_model.config._attn_implementation == before
    assert len(records) == kv_geometry(tiny_model.config)["n_layers"]
    heads = kv_geometry(tiny_model.config)["n_heads"]
    assert records[0].shape == (2, heads, 5, 9)
    assert torch.allclose(records[0].sum(-1), torch.ones(2, heads, 5), atol=1e-5)


def test_prefix_attention_shares(tiny_model):
    ids, mask = _batch(tiny_model)
    g = kv_geometry(tiny_model.config)
    encoder = reference.PrefixEncoder(tiny_model.config, 4)
    shares = widgets.prefix_attention(
        tiny_model, lambda i, m: reference.prefix_forward(tiny_model, encoder, i, m), ids, mask, 4
    )
    assert shares.shape == (g["n_layers"], 2, g["n_heads"], 5)
    assert (shares >= 0).all() and (shares <= 1 + 1e-6).all()
    prompt = reference.SoftPrompt(3, tiny_model.get_input_embeddings())
    shares = widgets.prefix_attention(
        tiny_model, lambda i, m: reference.prompt_forward(tiny_model, prompt, i, m), ids, mask, 3
    )
    assert shares.shape == (g["n_layers"], 2, g["n_heads"], 8)
    assert torch.allclose(shares[:, :, :, 0], torch.ones(()))  # the first position sees itself


def test_prefix_attention_refuses_a_forward_that_does_not_run_the_model(tiny_model):
    ids, mask = _batch(tiny_model)
    with pytest.raises(RuntimeError, match="no attention was recorded"):
        widgets.prefix_attention(tiny_model, lambda i, m: None, ids, mask, 2)


def test_prefix_attention_figure_and_explorer(tiny_model, no_ipywidgets):
    ids, mask = _batch(tiny_model)
    encoder = reference.PrefixEncoder(tiny_model.config, 2)

    def forward(i, m):
        return reference.prefix_forward(tiny_model, encoder, i, m)

    shares = widgets.prefix_attention(tiny_model, forward, ids, mask, 2)
    fig = widgets.prefix_attention_figure(shares, [str(t) for t in ids[0].tolist()], head=1)
    assert isinstance(fig, Figure)
    out = widgets.prefix_attention_explorer(
        tiny_model, forward, ids, mask, 2, tokenizer=CharTokenizer()
    )
    assert isinstance(out, Figure)


def test_prefix_attention_explorer_widget(tiny_model):
    pytest.importorskip("ipywidgets")
    ids, mask = _batch(tiny_model)
    encoder = reference.PrefixEncoder(tiny_model.config, 2)
    box = widgets.prefix_attention_explorer(
        tiny_model, lambda i, m: reference.prefix_forward(tiny_model, encoder, i, m), ids, mask, 2
    )
    example, head = box.children[0].children
    example.value, head.value = 1, 0  # redraws without error


# --- nearest tokens -----------------------------------------------------------------------------
def test_nearest_tokens_finds_copied_rows(tiny_model):
    emb = tiny_model.get_input_embeddings()
    prompt = reference.SoftPrompt(3, emb, init="text", init_ids=[5, 9, 17])
    for metric in ("cosine", "l2"):
        found = widgets.nearest_tokens(prompt.weight, emb.weight, CharTokenizer(), 4, metric)
        assert [row[0][0] for row in found] == ["<5>", "<9>", "<17>"]
        assert all(len(row) == 4 for row in found)
    cosine = widgets.nearest_tokens(prompt.weight, emb.weight, CharTokenizer(), 2)
    assert cosine[0][0][1] == pytest.approx(1.0, abs=1e-5)
    assert cosine[0][0][1] >= cosine[0][1][1]


def test_nearest_tokens_rejects_bad_input(tiny_model):
    emb = tiny_model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="vectors must be"):
        widgets.nearest_tokens(torch.zeros(2, 3), emb, CharTokenizer())
    with pytest.raises(ValueError, match="metric"):
        widgets.nearest_tokens(emb[:2], emb, CharTokenizer(), metric="dot")


def test_nearest_tokens_figure_and_explorer(tiny_model, no_ipywidgets):
    emb = tiny_model.get_input_embeddings().weight
    found = widgets.nearest_tokens(emb[:3] + 0.01, emb, CharTokenizer(), 3, "l2")
    assert isinstance(widgets.nearest_tokens_figure(found, "l2"), Figure)
    assert isinstance(widgets.nearest_tokens_explorer(emb[:3], emb, CharTokenizer()), Figure)


def test_nearest_tokens_explorer_widget(tiny_model):
    pytest.importorskip("ipywidgets")
    emb = tiny_model.get_input_embeddings().weight
    box = widgets.nearest_tokens_explorer(emb[:3], emb, CharTokenizer())
    k, metric = box.children[0].children
    k.value, metric.value = 2, "l2"


def test_static_flag_forces_a_figure(tiny_model):
    emb = tiny_model.get_input_embeddings().weight
    assert isinstance(widgets.nearest_tokens_explorer(emb[:2], emb, CharTokenizer(), True), Figure)
    assert isinstance(widgets.param_explorer(tiny_model, static=True), Figure)


# --- plots ------------------------------------------------------------------------------------
def test_smooth():
    assert plots.smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert plots.smooth([5.0], 10) == [5.0]
    with pytest.raises(ValueError):
        plots.smooth([1], 0)


def test_human_count():
    assert plots.human_count(7680) == "7.68K"
    assert plots.human_count(124_439_808) == "124M"
    assert plots.human_count(42) == "42"


def test_plot_losses_accepts_lists_and_train_results():
    result = TrainResult(losses=[3.0, 2.5, 2.0] * 10, steps=30)
    fig = plots.plot_losses({"prompt": result, "prefix": [3.0, 1.0]}, window=5, logy=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["prompt", "prefix"]
    with pytest.raises(ValueError):
        plots.plot_losses({})
    with pytest.raises(TypeError, match="TrainResult"):
        plots.plot_losses({"bad": 3})


def test_plot_bars_and_param_counts():
    fig = plots.plot_bars({"no prompt": 10.0, "soft prompt": 70.5}, ylabel="slot accuracy")
    assert len(fig.axes[0].patches) == 2
    fig = plots.plot_param_counts({"prompt": 7_680, "prefix": 184_320}, total=124_439_808)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert any("0.148%" in t for t in labels)


def test_plots_draw_on_a_given_axis():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    assert plots.plot_bars({"a": 1.0}, ax=ax) is fig
    plt.close(fig)


def test_widgets_do_not_change_the_model(tiny_model):
    ids, mask = _batch(tiny_model)
    state = copy.deepcopy(tiny_model.state_dict())
    encoder = reference.PrefixEncoder(tiny_model.config, 2)
    widgets.prefix_attention(
        tiny_model, lambda i, m: reference.prefix_forward(tiny_model, encoder, i, m), ids, mask, 2
    )
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_explorers_draw_nothing_under_nbgrader(tiny_model, monkeypatch):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    ids, mask = _batch(tiny_model)
    emb = tiny_model.get_input_embeddings().weight
    assert widgets.param_explorer(tiny_model) is None
    assert widgets.nearest_tokens_explorer(emb[:2], emb, CharTokenizer()) is None
    assert widgets.prefix_attention_explorer(tiny_model, lambda i, m: None, ids, mask, 2) is None


_DISPLAY_PROBE = """
import json
from IPython.core.interactiveshell import InteractiveShell
from IPython.display import display
from IPython.utils.capture import capture_output
from course import widgets

InteractiveShell.instance()
box = widgets.param_explorer()  # the presets only
with capture_output() as captured:
    display(box)
    box.children[1].children[0].value = 20  # prefix P: the figure is redrawn
print(json.dumps([[sorted(o.data), o.transient, o.update] for o in captured.outputs]))
"""


def test_explorer_figure_is_an_ordinary_output_redrawn_in_place():
    """Displayed, an explorer shows its controls as a widget, then its figure as an output of its
    own with a display id, which a moved control updates in place: a saved notebook keeps the
    figure where widget state was not saved. (In a subprocess: an IPython shell is global.)"""
    pytest.importorskip("ipywidgets")
    import json
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _DISPLAY_PROBE], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (controls, _, _), (_, shown, shown_update), (_, redrawn, redrawn_update) = json.loads(
        run.stdout.strip().splitlines()[-1]
    )
    assert "application/vnd.jupyter.widget-view+json" in controls
    assert shown["display_id"] == redrawn["display_id"]
    assert (shown_update, redrawn_update) == (False, True)
