"""Tests for moe_interp.plotting: structure, labels, saving and input validation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from moe_interp import plotting as P

RNG = np.random.default_rng(0)


def _texts(fig: Figure) -> str:
    """All axis labels, tick labels, titles, legend and annotation texts of a figure, joined."""
    parts: list[str] = []
    if fig._suptitle is not None:  # noqa: SLF001
        parts.append(fig._suptitle.get_text())  # noqa: SLF001
    for ax in fig.axes:
        parts += [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]
        parts += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        parts += [t.get_text() for t in ax.texts]
        leg = ax.get_legend()
        if leg is not None:
            parts += [t.get_text() for t in leg.get_texts()]
    return "\n".join(parts)


def _close(fig: Figure) -> None:
    fig.clear()


# --------------------------------------------------------------------------- save_figure


def test_save_figure_writes_pdf_and_png(tmp_path: Path) -> None:
    fig = P.plot_layer_head_heatmap(RNG.normal(size=(3, 4)))
    paths = P.save_figure(fig, tmp_path / "nested" / "dir" / "heads")
    assert [p.suffix for p in paths] == [".pdf", ".png"]
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    assert paths[0].read_bytes()[:4] == b"%PDF"
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_to_argument(tmp_path: Path) -> None:
    P.plot_routing_difference(RNG.normal(size=(2, 3)), save_to=tmp_path / "rd")
    assert (tmp_path / "rd.pdf").stat().st_size > 0
    assert (tmp_path / "rd.png").stat().st_size > 0


def test_png_dpi_200(tmp_path: Path) -> None:
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1])
    png = P.save_figure(fig, tmp_path / "small")[1]
    import matplotlib.image as mpimg

    h, w = mpimg.imread(png).shape[:2]
    # a 2x1 in figure at dpi 200 is ~400x200 px (bbox_inches="tight" adjusts a little); dpi 100 would be ~200x100
    assert 320 < w < 480 and 160 < h < 280


def test_style_and_palette() -> None:
    assert len(P.OKABE_ITO) == 8 and all(c.startswith("#") for c in P.OKABE_ITO)
    assert P.STYLE["savefig.dpi"] == 200
    matplotlib.rcParams.validate  # noqa: B018 - STYLE must be valid rc keys
    with matplotlib.rc_context(P.STYLE):
        pass


# --------------------------------------------------------------------------- heatmaps


def test_layer_position_heatmap() -> None:
    toks = ["<bos>", " How", " to", " make", "\n", "$x"]
    fig = P.plot_layer_position_heatmap(torch.randn(4, 6), toks, title="resid patching")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2  # heatmap + colourbar
    txt = _texts(fig)
    assert "blocks.{L}.hook_resid_pre" in fig.axes[0].get_ylabel()
    assert "␣How" in txt and "\\n" in txt and r"\$x" in txt
    assert "normalised refusal-score recovery (1 = clean)" in fig.axes[1].get_ylabel()
    assert "resid patching" in txt
    # layer 0 at the bottom
    assert fig.axes[0].get_ylim()[0] < fig.axes[0].get_ylim()[1]


def test_layer_position_heatmap_tolerates_partial_nan() -> None:
    data = RNG.normal(size=(3, 3))
    data[0, 0] = np.nan
    fig = P.plot_layer_position_heatmap(data, ["a", "b", "c"], metric_label="logit diff")
    assert fig.axes[1].get_ylabel() == "logit diff"


def test_layer_head_heatmap() -> None:
    fig = P.plot_layer_head_heatmap(RNG.normal(size=(5, 8)), metric_label="Δ refusal score")
    assert len(fig.axes) == 2
    assert "blocks.{L}.attn.hook_z" in fig.axes[0].get_xlabel()
    assert fig.axes[1].get_ylabel() == "Δ refusal score"
    fig2 = P.plot_layer_head_heatmap(RNG.normal(size=(2, 2)), hook="blocks.{L}.attn.hook_pattern")
    assert "blocks.{L}.attn.hook_pattern" in fig2.axes[0].get_xlabel()


def test_expert_heatmap_one_and_two_panels() -> None:
    eff = RNG.normal(size=(4, 8))
    fig1 = P.plot_expert_heatmap(eff)
    assert len(fig1.axes) == 2
    assert "blocks.{L}.mlp.experts.{e}.hook_out" in fig1.axes[0].get_xlabel()
    rd = RNG.uniform(-0.5, 0.5, size=(4, 8))
    fig2 = P.plot_expert_heatmap(eff, rd, metric_label="recovery")
    assert len(fig2.axes) == 4  # two heatmaps + two colourbars
    heat = [ax for ax in fig2.axes if ax.get_title()]
    assert len(heat) == 2
    assert heat[0].get_shared_y_axes().joined(heat[0], heat[1])
    txt = _texts(fig2) + "".join(ax.get_ylabel() for ax in fig2.axes)
    assert "P(sel | harmful) − P(sel | harmless)" in txt


def test_routing_difference() -> None:
    fig = P.plot_routing_difference(RNG.normal(size=(3, 16)))
    assert len(fig.axes) == 2
    assert "blocks.{L}.mlp.experts.{e}" in fig.axes[0].get_xlabel()
    assert "harmful − harmless" in fig._suptitle.get_text()  # noqa: SLF001


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: P.plot_layer_position_heatmap(x),
        lambda x: P.plot_layer_head_heatmap(x),
        lambda x: P.plot_expert_heatmap(x),
        lambda x: P.plot_routing_difference(x),
    ],
)
@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        (np.zeros((0, 3)), "empty"),
        (np.full((2, 3), np.nan), "NaN"),
        (np.zeros(3), "2-D"),
        (np.array([[1.0, np.inf]]), "infinite"),
    ],
)
def test_heatmaps_reject_bad_input(fn, bad: np.ndarray, msg: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=msg):
        fn(bad)


def test_heatmap_label_mismatch() -> None:
    with pytest.raises(ValueError, match="position_labels has 2 entries but effects has 3 positions"):
        P.plot_layer_position_heatmap(np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="shape mismatch"):
        P.plot_expert_heatmap(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        P.plot_expert_heatmap(np.zeros((2, 3)), np.full((2, 3), 2.0))


def test_all_zero_heatmap_ok() -> None:
    fig = P.plot_layer_head_heatmap(np.zeros((2, 2)))
    assert isinstance(fig, Figure)


# --------------------------------------------------------------------------- scatter


def test_attribution_vs_exhaustive() -> None:
    x = RNG.normal(size=20)
    y = x + 0.1 * RNG.normal(size=20)
    labels = [f"blocks.{i // 4}.attn.hook_z[{i % 4}]" for i in range(20)]
    fig = P.plot_attribution_vs_exhaustive(x, torch.tensor(y), labels)
    assert len(fig.axes) == 1
    txt = _texts(fig)
    assert "Spearman ρ = " in txt and "Pearson r = " in txt and "y = x" in txt
    assert len(fig.axes[0].texts) == 5
    top = labels[int(np.argmax(np.abs(y)))]
    assert top in txt
    fig2 = P.plot_attribution_vs_exhaustive(x, y, spearman=0.123)
    assert "0.12" in _texts(fig2) and len(fig2.axes[0].texts) == 0


def test_attribution_spearman_computed_correctly() -> None:
    x = np.arange(10.0)
    fig = P.plot_attribution_vs_exhaustive(x, x**3)  # monotone: rho = 1, r < 1
    txt = _texts(fig)
    assert "Spearman ρ = 1.00" in txt
    assert "Pearson r = 1.00" not in txt


def test_attribution_bad_input() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        P.plot_attribution_vs_exhaustive(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="labels has 2 entries"):
        P.plot_attribution_vs_exhaustive(np.zeros(3), np.zeros(3), ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        P.plot_attribution_vs_exhaustive([], [])
    with pytest.raises(ValueError, match="NaN"):
        P.plot_attribution_vs_exhaustive([np.nan, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="no component has finite values"):
        P.plot_attribution_vs_exhaustive([np.nan, 1.0], [1.0, np.nan])


# --------------------------------------------------------------------------- circuit

COMPONENTS = [
    {"name": "blocks.1.attn.hook_z[3]", "kind": "head", "layer": 1, "effect": 0.4},
    {"name": "blocks.2.mlp.experts.5.hook_out", "kind": "expert", "layer": 2, "effect": -0.2},
    {"name": "blocks.2.mlp.experts.7.hook_out", "kind": "expert", "layer": 2, "effect": 0.9},
    {"name": "blocks.3.hook_resid_pre", "kind": "resid", "layer": 3, "effect": 0.1},
    {"name": "blocks.0.attn.hook_result", "kind": "attn", "layer": 0, "effect": 0.05},
    {"name": "blocks.3.hook_mlp_out", "kind": "mlp", "layer": 3, "effect": 0.3},
]


def test_circuit_without_faithfulness() -> None:
    fig = P.plot_circuit(COMPONENTS, n_layers=4, edges=[("blocks.1.attn.hook_z[3]", "blocks.3.hook_mlp_out")])
    assert len(fig.axes) == 1
    txt = _texts(fig)
    assert "mlp.experts.7.hook_out" in txt and "blocks.2" in txt
    for kind in ("head", "expert", "attn", "mlp", "resid"):
        assert kind in txt
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [f"blocks.{i}" for i in range(4)]


def test_circuit_with_faithfulness_and_compact() -> None:
    faith = {"circuit": 0.85, "circuit_ci": (0.8, 0.9), "random": 0.1, "random_ci": (0.0, 0.2)}
    fig = P.plot_circuit(COMPONENTS, n_layers=40, faithfulness=faith, title="refusal circuit")
    assert len(fig.axes) == 2
    assert "faithfulness" in fig.axes[1].get_ylabel()
    # compact mode: only layers with components get a row
    assert len(fig.axes[0].get_yticks()) == 4


def test_circuit_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        P.plot_circuit([], n_layers=4)
    with pytest.raises(ValueError, match="kind 'neuron'"):
        P.plot_circuit([{"name": "x", "kind": "neuron", "layer": 0, "effect": 1.0}], n_layers=4)
    with pytest.raises(ValueError, match="outside"):
        P.plot_circuit([{"name": "x", "kind": "head", "layer": 9, "effect": 1.0}], n_layers=4)
    with pytest.raises(ValueError, match="missing keys"):
        P.plot_circuit([{"name": "x", "kind": "head"}], n_layers=4)
    with pytest.raises(ValueError, match="finite"):
        P.plot_circuit([{"name": "x", "kind": "head", "layer": 0, "effect": float("nan")}], n_layers=4)
    with pytest.raises(ValueError, match="outside its CI"):
        P.plot_circuit(COMPONENTS, n_layers=4, faithfulness={"circuit": 0.5, "circuit_ci": (0.8, 0.9)})
    with pytest.raises(ValueError, match="unknown component"):
        P.plot_circuit(COMPONENTS, n_layers=4, edges=[("nope", "blocks.3.hook_mlp_out")])


# --------------------------------------------------------------------------- line / bar charts


def test_coefficient_sweep() -> None:
    c = np.linspace(-8, 8, 9)
    fig = P.plot_coefficient_sweep(
        c,
        {"harmful refusal rate": np.linspace(0, 1, 9), "harmless refusal rate": np.linspace(0, 0.5, 9)},
        ylabel="refusal rate",
        secondary={"KL": torch.linspace(0, 2, 9)},
        series_ci={"harmful refusal rate": (np.linspace(0, 1, 9) - 0.05, np.linspace(0, 1, 9) + 0.05)},
    )
    assert len(fig.axes) == 2
    assert fig.axes[0].get_ylabel() == "refusal rate"
    assert fig.axes[1].get_ylabel() == "KL divergence (nats)"
    assert "KL (right axis)" in _texts(fig)
    fig1 = P.plot_coefficient_sweep(c, {"refusal": np.ones(9)})
    assert len(fig1.axes) == 1


def test_coefficient_sweep_bad_input() -> None:
    with pytest.raises(ValueError, match="has 3 values but coeffs has 4"):
        P.plot_coefficient_sweep(np.arange(4), {"a": np.arange(3)})
    with pytest.raises(ValueError, match="empty"):
        P.plot_coefficient_sweep(np.arange(4), {})
    with pytest.raises(ValueError, match="NaN"):
        P.plot_coefficient_sweep(np.arange(2), {"a": [np.nan, np.nan]})


def test_method_comparison() -> None:
    methods = ["none", "ActAdd", "directional ablation", "expert steering"]
    metrics = {"harmful": [0.9, 0.3, 0.1, 0.2], "political": [0.5, 0.2, 0.1, 0.4], "harmless": [0.02] * 4}
    cis = {"harmful": [(v - 0.05, v + 0.05) for v in metrics["harmful"]]}
    fig = P.plot_method_comparison(methods, metrics, cis, annotate=True)
    assert len(fig.axes) == 1
    txt = _texts(fig)
    for m in methods + list(metrics):
        assert m in txt
    assert len(fig.axes[0].patches) == 12


def test_method_comparison_bad_input() -> None:
    with pytest.raises(ValueError, match="has 2 values but there are 3 methods"):
        P.plot_method_comparison(["a", "b", "c"], {"x": [1, 2]})
    with pytest.raises(ValueError, match="empty"):
        P.plot_method_comparison([], {"x": []})
    with pytest.raises(ValueError, match="outside its CI"):
        P.plot_method_comparison(["a"], {"x": [0.5]}, {"x": [(0.6, 0.7)]})
    with pytest.raises(ValueError, match="NaN"):
        P.plot_method_comparison(["a"], {"x": [np.nan]})


# --------------------------------------------------------------------------- selection


def _selection_table() -> list[dict[str, float | int | bool]]:
    rows: list[dict[str, float | int | bool]] = []
    for layer in range(8):
        for pos in (-1, -2, -3):
            rows.append(
                {
                    "layer": layer,
                    "pos": pos,
                    "bypass": float(RNG.normal()),
                    "induce": float(RNG.normal()),
                    "kl": float(abs(RNG.normal(scale=0.1))),
                    "kept": layer < 6,
                }
            )
    return rows


def test_selection_scores() -> None:
    table = _selection_table()
    fig = P.plot_selection_scores(table)
    assert len(fig.axes) == 3
    txt = _texts(fig)
    assert "blocks.{L}.hook_resid_pre" in fig.axes[-1].get_xlabel()
    assert "pos -1" in txt and "discarded (filter)" in txt
    kept = [r for r in table if r["kept"]]
    best = min(kept, key=lambda r: r["bypass"])
    assert f"chosen (L={best['layer']}, pos {best['pos']})" in txt
    fig2 = P.plot_selection_scores(table, chosen=(7, -2))
    assert "chosen (L=7, pos -2)" in _texts(fig2)


def test_selection_scores_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        P.plot_selection_scores([])
    with pytest.raises(ValueError, match="missing keys"):
        P.plot_selection_scores([{"layer": 0, "pos": -1}])
    row = {"layer": 0, "pos": -1, "bypass": float("nan"), "induce": 0.0, "kl": 0.0, "kept": True}
    with pytest.raises(ValueError, match="NaN"):
        P.plot_selection_scores([row])
    with pytest.raises(ValueError, match="not in the table"):
        P.plot_selection_scores(_selection_table(), chosen=(99, -1))
