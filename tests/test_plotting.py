"""Behaviour of the figures (moe_interp.figures, re-exported by moe_interp.plotting).

Each test reads what a figure actually draws (image arrays, bar heights, line data, artist colours,
saved files) and compares it with the input, so it fails when a figure misdraws, miscolours or mislabels.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb, to_rgba
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.markers import MarkerStyle
from matplotlib.patches import Rectangle

from moe_interp import plotting as P
from moe_interp.circuits import Circuit
from moe_interp.patching.activation import PatchingResult
from moe_interp.refusal import stats
from moe_interp.refusal.selection import SelectionResult

RNG = np.random.default_rng(0)

# --------------------------------------------------------------------------- inputs

COMPONENTS = [
    {"name": "blocks.1.attn.hook_z[3]", "kind": "head", "layer": 1, "effect": 0.4},
    {"name": "blocks.2.mlp.experts.5.hook_out", "kind": "expert", "layer": 2, "effect": -0.2},
    {"name": "blocks.2.mlp.experts.7.hook_out", "kind": "expert", "layer": 2, "effect": 0.9},
    {"name": "blocks.3.hook_resid_pre", "kind": "resid", "layer": 3, "effect": 0.1},
    {"name": "blocks.0.attn.hook_result", "kind": "attn", "layer": 0, "effect": 0.05},
    {"name": "blocks.3.hook_mlp_out", "kind": "mlp", "layer": 3, "effect": 0.3},
]
FAITH = {"circuit": 0.85, "circuit_ci": (0.8, 0.9), "random": 0.1, "random_ci": (0.0, 0.2)}


def _selection_table() -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    return [
        {
            "layer": layer,
            "pos": pos,
            "bypass": float(rng.normal()),
            "induce": float(rng.normal()),
            "kl": float(abs(rng.normal(scale=0.1))),
            "kept": layer < 6,
        }
        for layer in range(8)
        for pos in (-1, -2, -3)
    ]


def _benchmark_result(n_methods: int = 5) -> dict[str, Any]:
    methods = [f"method_{i}" for i in range(n_methods)]
    orgs = []
    for j, name in enumerate(("expert", "head")):
        ms = {m: {"rank": 1 + (3 * i + j) % 20, "matches": i % 2 == j} for i, m in enumerate(methods)}
        ms[methods[-1]] = {"rank": None, "matches": j == 0}
        orgs.append({"name": name, "methods": ms, "circuit": {"precision": 1.0, "recall": 0.5}})
    return {"organisms": orgs}


def _patching(values: torch.Tensor, kind: str, hook: str, dims: tuple[str, ...]) -> PatchingResult:
    return PatchingResult(values, kind, hook, dims, "denoising", [-1], ["a", "b", "c"][: values.shape[1]])


#: Every array-drawn figure, on small inputs (the tracing figures need a model: see the end of the file).
BUILDERS: dict[str, Callable[[], Figure]] = {
    "layer_position": lambda: P.plot_layer_position_heatmap(RNG.normal(size=(4, 6)), list("abcdef")),
    "layer_head": lambda: P.plot_layer_head_heatmap(RNG.normal(size=(3, 4))),
    "expert": lambda: P.plot_expert_heatmap(RNG.normal(size=(3, 8)), RNG.uniform(-0.5, 0.5, (3, 8))),
    "routing_difference": lambda: P.plot_routing_difference(RNG.normal(size=(3, 16))),
    "attribution": lambda: P.plot_attribution_vs_exhaustive(
        RNG.normal(size=12), RNG.normal(size=12), [f"c{i}" for i in range(12)]
    ),
    "circuit": lambda: P.plot_circuit(
        COMPONENTS, 4, FAITH, edges=[(COMPONENTS[0]["name"], COMPONENTS[5]["name"])]
    ),
    "sweep": lambda: P.plot_coefficient_sweep(
        [-2.0, 0.0, 2.0], {"harmful refusal": [0.9, 0.5, 0.1]}, secondary={"harmless KL": [0.3, 0.0, 0.4]}
    ),
    "methods": lambda: P.plot_method_comparison(
        ["none", "ActAdd"],
        {"harmful": [0.9, 0.2], "harmless": [0.0, 0.1]},
        {"harmful": [(0.8, 1.0), (0.1, 0.3)]},
    ),
    "selection": lambda: P.plot_selection_scores(_selection_table()),
    "routing": lambda: P.plot_routing(
        ["a", "b", "c"], [0, 1], torch.tensor(RNG.integers(0, 8, (2, 3, 2))), torch.rand(2, 3, 2)
    ),
    "attention": lambda: P.plot_attention(["a", "b", "c"], torch.rand(2, 3, 3), 0, [0, 1]),
    "benchmark": lambda: P.plot_benchmark(_benchmark_result()),
}

# --------------------------------------------------------------------------- colour helpers

_LUTS = {name: matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] for name in P.CB_SAFE_CMAPS}
_PALETTE = {c.lower() for c in P.OKABE_ITO}


def _is_safe_colour(rgba: Any) -> bool:
    """Okabe–Ito, a neutral grey (incl. black and white) or a colour of a colour-blind-safe map."""
    rgb = np.array(to_rgb(rgba))
    if to_hex(rgb) in _PALETTE or rgb.max() - rgb.min() <= 8 / 255:
        return True
    return any(np.abs(lut - rgb).max(axis=1).min() <= 1.5 / 255 for lut in _LUTS.values())


def _artist_colours(fig: Figure) -> list[tuple[float, float, float, float]]:
    """Colours of every line, marker, patch and non-colour-mapped collection drawn in ``fig``."""
    out: list[Any] = []
    for ax in fig.axes:
        for ln in ax.get_lines():
            if ln.get_linestyle() not in ("None", "", " "):
                out.append(ln.get_color())
            if ln.get_marker() not in (None, "None", "none", ""):
                out.append(ln.get_markeredgecolor())
                if MarkerStyle(ln.get_marker()).is_filled() and ln.get_fillstyle() != "none":
                    out.append(ln.get_markerfacecolor())
        out += [p.get_facecolor() for p in ax.patches if p.get_fill()]
        for coll in ax.collections:
            if coll.get_array() is None:
                out += list(coll.get_facecolors()) + list(coll.get_edgecolors())
    rgba = [to_rgba(c) for c in out if not (isinstance(c, str) and c == "none")]
    return [c for c in rgba if c[3] > 0]


def _luminance(c: Any) -> float:
    lin = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in to_rgb(c)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _contrast(a: Any, b: Any) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _images(fig: Figure) -> list[AxesImage]:
    return [im for ax in fig.axes for im in ax.images]


def _plot_axes(fig: Figure) -> list[Any]:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _colourbar_labels(fig: Figure) -> list[str]:
    return [ax.get_ylabel() or ax.get_xlabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_figure_is_saved_as_valid_pdf_and_png(name: str, tmp_path: Path) -> None:
    paths = P.save_figure(BUILDERS[name](), tmp_path / "sub" / f"{name}.png")  # suffix is stripped
    assert [p.name for p in paths] == [f"{name}.pdf", f"{name}.png"]
    pdf = paths[0].read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF") and b"/Type /Page" in pdf
    img = mpimg.imread(paths[1])
    assert img.shape[0] > 150 and img.shape[1] > 150
    assert img[..., :3].std() > 0.05  # something is drawn, not a blank page


def test_save_to_writes_both_formats(tmp_path: Path) -> None:
    P.plot_routing_difference(RNG.normal(size=(2, 3)), save_to=tmp_path / "rd")
    assert (tmp_path / "rd.pdf").read_bytes()[:4] == b"%PDF"
    assert (tmp_path / "rd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_is_200_dpi(tmp_path: Path) -> None:
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1])
    h, w = mpimg.imread(P.save_figure(fig, tmp_path / "small")[1]).shape[:2]
    assert 320 < w < 480 and 160 < h < 280  # 2 x 1 in at dpi 200 (bbox "tight" trims a little)


def test_figures_leave_pyplot_and_rc_params_alone() -> None:
    import matplotlib.pyplot as plt

    before = dict(matplotlib.rcParams)
    for name in ("benchmark", "layer_head", "sweep"):
        BUILDERS[name]()
    assert plt.get_fignums() == []  # bare Figures, never registered with pyplot
    assert dict(matplotlib.rcParams) == before


# --------------------------------------------------------------------------- plotted data equals input


def test_heatmaps_draw_the_input_matrix() -> None:
    data = RNG.normal(size=(4, 6))
    data[1, 2] = np.nan
    rd = RNG.uniform(-0.5, 0.5, size=(4, 6))
    cases = [
        (P.plot_layer_position_heatmap(data, list("abcdef")), [data]),
        (P.plot_layer_head_heatmap(torch.tensor(data)), [data]),
        (P.plot_routing_difference(data), [data]),
        (P.plot_expert_heatmap(data, rd), [data, rd]),
    ]
    for fig, expected in cases:
        images = _images(fig)
        assert len(images) == len(expected)
        for im, want in zip(images, expected, strict=True):
            got = np.ma.filled(im.get_array().astype(float), np.nan)
            np.testing.assert_allclose(got, want, rtol=1e-6)  # NaN where NaN; tensors pass through float32
            assert im.origin == "lower"  # layer 0 at the bottom
            norm = im.norm
            assert norm.vmin == -norm.vmax  # symmetric around 0, spanning the largest |value|
            assert norm.vmax == pytest.approx(np.nanmax(np.abs(want)), rel=1e-6)


def test_heatmaps_read_a_patching_result() -> None:
    values = torch.tensor(RNG.normal(size=(3, 4, 2)), dtype=torch.float32)  # layer × head × position
    res = _patching(values, "heads", "blocks.{L}.attn.hook_z", ("layer", "head", "position"))
    fig = P.plot_layer_head_heatmap(res)
    np.testing.assert_allclose(_images(fig)[0].get_array(), values.mean(-1).numpy(), rtol=1e-6)
    assert "blocks.{L}.attn.hook_z" in fig.axes[0].get_xlabel()
    assert "(clean − corrupt)" in _colourbar_labels(fig)[0]
    pos = _patching(values[:, :3, 0], "resid", "blocks.{L}.hook_resid_mid", ("layer", "position"))
    fig = P.plot_layer_position_heatmap(pos)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b", "c"]
    assert "blocks.{L}.hook_resid_mid" in fig.axes[0].get_ylabel()


def test_bar_heights_and_error_bars_equal_the_values() -> None:
    metrics = {"harmful": [0.9, 0.3, 0.1], "harmless": [0.02, 0.05, 0.2]}
    cis = {"harmful": [(0.8, 0.95), (0.2, 0.4), (0.0, 0.2)]}
    ax = P.plot_method_comparison(["a", "b", "c"], metrics, cis).axes[0]
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}
    for k, v in metrics.items():
        np.testing.assert_allclose([p.get_height() for p in bars[k].patches], v)
    segs = bars["harmful"].errorbar.lines[2][0].get_segments()
    np.testing.assert_allclose([(s[0][1], s[1][1]) for s in segs], cis["harmful"])
    assert bars["harmless"].errorbar is None
    fax = P.plot_circuit(COMPONENTS, 4, FAITH).axes[1]
    np.testing.assert_allclose([p.get_height() for p in fax.patches], [0.85, 0.1])


def test_sweep_lines_are_the_input_sorted_by_coefficient() -> None:
    coeffs, rate, kl = [2.0, -4.0, 0.0], [0.1, 0.9, 0.5], [0.4, 1.0, 0.0]
    fig = P.plot_coefficient_sweep(coeffs, {"rate": rate}, secondary={"KL": kl})
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "rate"]
    np.testing.assert_allclose(line.get_xdata(), [-4.0, 0.0, 2.0])
    np.testing.assert_allclose(line.get_ydata(), [0.9, 0.5, 0.1])
    (kl_line,) = fig.axes[1].get_lines()
    np.testing.assert_allclose(kl_line.get_ydata(), [1.0, 0.0, 0.4])


def test_scatter_points_and_rank_correlation() -> None:
    x = np.arange(10.0)
    y = x**3  # monotone: Spearman 1, Pearson < 1
    y[4] = np.nan  # dropped pair
    ax = P.plot_attribution_vs_exhaustive(x, y).axes[0]
    ok = np.isfinite(y)
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.c_[x[ok], y[ok]])
    legend = "\n".join(t.get_text() for t in ax.get_legend().get_texts())
    rho = float(re.search(r"Spearman ρ = (-?[\d.]+)", legend).group(1))  # type: ignore[union-attr]
    r = float(re.search(r"Pearson r = (-?[\d.]+)", legend).group(1))  # type: ignore[union-attr]
    assert rho == round(stats.spearman(x[ok], y[ok]), 2) == 1.0
    assert r == round(stats.pearson(x[ok], y[ok]), 2) < 1.0


def test_scatter_reads_patching_results_with_a_mask() -> None:
    hook = "blocks.{L}.mlp.hook_expert_out"
    a = _patching(torch.randn(3, 4), "experts", hook, ("layer", "expert"))
    e = _patching(torch.randn(3, 4), "experts", hook, ("layer", "expert"))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1:] = True
    ax = P.plot_attribution_vs_exhaustive(a, e, mask=mask).axes[0]
    np.testing.assert_allclose(
        ax.collections[0].get_offsets(), np.c_[a.values[mask], e.values[mask]], rtol=1e-6
    )
    assert hook in ax.get_xlabel() and hook in ax.get_ylabel()


def test_circuit_object_draws_the_same_as_its_parts() -> None:
    circuit = Circuit(COMPONENTS, dict(FAITH), {"spec": {"n_layers": 4}})
    fig_a, fig_b = P.plot_circuit(circuit), P.plot_circuit(COMPONENTS, 4, FAITH)
    for ax_a, ax_b in zip(fig_a.axes, fig_b.axes, strict=True):
        pts_a = [tuple(c.get_offsets()[0]) for c in ax_a.collections]
        assert pts_a == [tuple(c.get_offsets()[0]) for c in ax_b.collections]
        assert [p.get_height() for p in ax_a.patches] == [p.get_height() for p in ax_b.patches]
    assert len(fig_a.axes[0].collections) == len(COMPONENTS)
    # marker area grows linearly with |effect| (largest |effect| = 0.9); negative effects are hollow
    collections = fig_a.axes[0].collections
    sizes = [c.get_sizes()[0] for c in collections]
    np.testing.assert_allclose(sizes, [40 + 460 * abs(c["effect"]) / 0.9 for c in COMPONENTS])
    hollow = [to_hex(c.get_facecolors()[0]) == "#ffffff" for c in collections]
    assert hollow == [c["effect"] < 0 for c in COMPONENTS]


def test_selection_result_stars_its_chosen_candidate() -> None:
    table = _selection_table()
    layer, pos = 7, -2
    res = SelectionResult(
        layer, pos, torch.zeros(4), torch.zeros(4), 0.0, 0.0, 0.0, False, "", table, 1.0, -1.0
    )
    for source in (res, res.to_dict()):
        ax = P.plot_selection_scores(source).axes[0]
        stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
        row = next(r for r in table if (r["layer"], r["pos"]) == (layer, pos))
        assert [(s.get_xdata()[0], s.get_ydata()[0]) for s in stars] == [(layer, row["bypass"])]
    # the bare table stars the best kept candidate; each position's line is its rows, by layer
    ax = P.plot_selection_scores(table).axes[0]
    kept = [r for r in table if r["kept"]]
    best = min(kept, key=lambda r: r["bypass"])
    (star,) = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (best["layer"], best["bypass"])
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "pos -3"]
    np.testing.assert_allclose(line.get_ydata(), [r["bypass"] for r in table if r["pos"] == -3])


def test_benchmark_cells_show_the_ranks() -> None:
    result = _benchmark_result()
    ax = _plot_axes(P.plot_benchmark(result))[0]
    ranks = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    for j, o in enumerate(result["organisms"]):
        for i, row in enumerate(o["methods"].values()):
            want = np.nan if row["rank"] is None else row["rank"]
            np.testing.assert_equal(ranks[i, j], want)
    cell = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert cell[(4, 0)].get_text() == "miss" and cell[(4, 1)].get_text() == "–"
    assert cell[(0, 1)].get_fontweight() == "normal" and cell[(1, 1)].get_fontweight() == "bold"


# --------------------------------------------------------------------------- colour


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_colour_is_colour_blind_safe(name: str) -> None:
    fig = BUILDERS[name]()
    for im in _images(fig) + [c for ax in fig.axes for c in ax.collections if c.get_array() is not None]:
        assert im.get_cmap().name in P.CB_SAFE_CMAPS, f"{name}: colour map {im.get_cmap().name}"
    bad = sorted({to_hex(c) for c in _artist_colours(fig) if not _is_safe_colour(c)})
    assert not bad, f"{name}: colours outside the colour-blind-safe palette: {bad}"


@pytest.mark.parametrize("n_experts", [4, 8, 12, 64])
def test_routing_gives_every_expert_its_own_colour(n_experts: int) -> None:
    gen = torch.Generator().manual_seed(n_experts)
    n_l, n_p = 4, 16
    idx = torch.stack([torch.randperm(n_experts, generator=gen)[:2] for _ in range(n_l * n_p)]).view(
        n_l, n_p, 2
    )
    idx[0, : min(n_p, n_experts), 0] = torch.arange(min(n_p, n_experts))
    w = torch.rand(n_l, n_p, 2, generator=gen)
    w[..., 0] += 1.0  # slot 0 holds the top expert
    ax = P.plot_routing([f"t{i}" for i in range(n_p)], list(range(n_l)), idx, w, n_experts=n_experts).axes[0]
    cells = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(cells) == n_l * n_p
    colour_of: dict[int, str] = {}
    for cell in cells:
        L, p = round(cell.get_y() + 0.5), round(cell.get_x() + 0.5)
        top = int(idx[L, p, 0])
        hexc = to_hex(cell.get_facecolor())
        assert colour_of.setdefault(top, hexc) == hexc, f"expert {top} drawn in two colours"
        assert _is_safe_colour(cell.get_facecolor())
    assert len(set(colour_of.values())) == len(colour_of), "two experts share a colour"
    rgb = np.array([to_rgb(c) for c in colour_of.values()])
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 9
    assert dist.min() > (0.15 if n_experts <= 8 else 0.005)
    for t in ax.texts:  # cell labels stay readable on their fill
        L, p = round(t.get_position()[1]), round(t.get_position()[0])
        assert _contrast(t.get_color(), colour_of[int(idx[L, p, 0])]) >= 3.0
    legend = {
        t.get_text(): to_hex(h.get_facecolor())
        for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles, strict=True)
    }
    assert legend == {f"e{e}": c for e, c in sorted(colour_of.items())}


def test_many_series_get_distinct_colours() -> None:
    n = 10
    series = {f"s{i}": np.linspace(0, 1, 3) * i for i in range(n)}
    lines = [
        ln
        for ln in P.plot_coefficient_sweep([0.0, 1.0, 2.0], series).axes[0].get_lines()
        if ln.get_label() in series
    ]
    assert len({to_hex(ln.get_color()) for ln in lines}) == n
    assert len({ln.get_marker() for ln in lines[:8]}) == 8  # markers separate them too
    metrics = {f"m{i}": [0.1 * i, 0.2] for i in range(9)}
    ax = P.plot_method_comparison(["a", "b"], metrics).axes[0]
    colours = [to_hex(c.patches[0].get_facecolor()) for c in ax.containers if isinstance(c, BarContainer)]
    assert len(set(colours)) == 9
    assert all(_is_safe_colour(c) for c in colours)


# --------------------------------------------------------------------------- labels: hooks and units

HOOK = re.compile(r"blocks\.(\{L\}|L\b|\d+\b)|hook_")
UNIT = re.compile(r"\((pp|nats|logits|[^)]*1 = [^)]*)\)|log-odds|probability|fraction|rank|P\(sel")


def _is_number(text: str) -> bool:
    try:
        float(text.replace("−", "-"))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    ("name", "promise"),
    [
        ("layer_position", "y-hook"),
        ("layer_head", "x-hook"),
        ("expert", "x-hook"),
        ("routing_difference", "x-hook"),
        ("selection", "x-hook"),
        ("routing", "y-hook"),
        ("circuit", "y-hook"),
        ("attribution", "unit"),
        ("sweep", "unit"),
        ("methods", "unit"),
        ("benchmark", "unit"),
        ("attention", "unit"),
    ],
)
def test_axes_are_labelled_with_hooks_and_units(name: str, promise: str) -> None:
    fig = BUILDERS[name]()
    fig.draw_without_rendering()
    axes = _plot_axes(fig)
    for ax in axes:  # every axis with numeric ticks is labelled (categorical ticks name themselves)
        for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            ticks = [t.get_text() for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            if ax.axison and axis.get_visible() and ticks and all(_is_number(t) for t in ticks):
                shared = axis is ax.yaxis and len(ax.get_shared_y_axes().get_siblings(ax)) > 1
                assert label or shared, f"{name}: unlabelled {axis.axis_name} axis"
    for label in _colourbar_labels(fig):
        assert UNIT.search(label) or HOOK.search(label) or "difference" in label, (
            f"{name}: colour bar {label!r}"
        )
    labels = [lab for ax in axes for lab in (ax.get_xlabel(), ax.get_ylabel())] + _colourbar_labels(fig)
    if promise == "x-hook":
        assert any(HOOK.search(ax.get_xlabel()) for ax in axes), f"{name}: no hook on the x axis"
    elif promise == "y-hook":
        ys = [ax.get_ylabel() + " ".join(t.get_text() for t in ax.get_yticklabels()) for ax in axes]
        assert any(HOOK.search(y) for y in ys), f"{name}: no hook on the y axis"
    else:
        assert any(UNIT.search(lab) for lab in labels + [ax.get_title() for ax in axes]), f"{name}: no unit"


# --------------------------------------------------------------------------- bad input


def _raises_one_line(fn: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        fn()
    assert "\n" not in str(err.value), f"multi-line error: {err.value}"


NAN2 = np.full((2, 3), np.nan)
BAD_INPUTS: dict[str, tuple[Callable[[], Any], str]] = {
    "heatmap empty": (lambda: P.plot_layer_head_heatmap(np.zeros((0, 3))), "empty"),
    "heatmap all NaN": (lambda: P.plot_layer_position_heatmap(NAN2), "NaN"),
    "heatmap inf": (lambda: P.plot_routing_difference(np.array([[1.0, np.inf]])), "infinite"),
    "heatmap 1-D": (lambda: P.plot_expert_heatmap(np.zeros(3)), "2-D"),
    "labels mismatch": (
        lambda: P.plot_layer_position_heatmap(np.zeros((2, 3)), ["a", "b"]),
        "position_labels",
    ),
    "risk diff shape": (lambda: P.plot_expert_heatmap(np.zeros((2, 3)), np.zeros((2, 4))), "shape mismatch"),
    "risk diff range": (lambda: P.plot_expert_heatmap(np.zeros((2, 3)), np.full((2, 3), 2.0)), r"\[-1, 1\]"),
    "scatter empty": (lambda: P.plot_attribution_vs_exhaustive([], []), "empty"),
    "scatter NaN": (lambda: P.plot_attribution_vs_exhaustive([np.nan, 1.0], [1.0, np.nan]), "no component"),
    "scatter mask on array": (lambda: P.plot_attribution_vs_exhaustive([1.0], [1.0], mask=[True]), "mask"),
    "circuit empty": (lambda: P.plot_circuit([], n_layers=4), "empty"),
    "circuit NaN": (
        lambda: P.plot_circuit([{"name": "x", "kind": "head", "layer": 0, "effect": np.nan}], 4),
        "finite",
    ),
    "circuit no n_layers": (lambda: P.plot_circuit(COMPONENTS), "n_layers"),
    "circuit CI": (
        lambda: P.plot_circuit(COMPONENTS, 4, {"circuit": 0.5, "circuit_ci": (0.8, 0.9)}),
        "outside",
    ),
    "sweep empty": (lambda: P.plot_coefficient_sweep([0.0], {}), "empty"),
    "sweep NaN coeff": (lambda: P.plot_coefficient_sweep([np.nan, 1.0], {"a": [1, 2]}), "NaN"),
    "methods empty": (lambda: P.plot_method_comparison([], {"x": []}), "empty"),
    "methods NaN": (lambda: P.plot_method_comparison(["a"], {"x": [np.nan]}), "NaN"),
    "selection empty": (lambda: P.plot_selection_scores([]), "empty"),
    "selection NaN": (
        lambda: P.plot_selection_scores(
            [{"layer": 0, "pos": -1, "bypass": np.nan, "induce": 0.0, "kl": 0.0, "kept": True}]
        ),
        "NaN",
    ),
    "benchmark empty": (lambda: P.plot_benchmark({"organisms": []}), "no organisms"),
    "benchmark NaN rank": (
        lambda: P.plot_benchmark(
            {"organisms": [{"name": "x", "methods": {"m": {"rank": float("nan")}}, "circuit": {}}]}
        ),
        "rank",
    ),
    "routing empty": (lambda: P.plot_routing([], [], torch.zeros(0, 0, 2), torch.zeros(0, 0, 2)), "empty"),
    "routing NaN": (
        lambda: P.plot_routing(["a"], [0], torch.zeros(1, 1, 1), torch.tensor([[[np.nan]]])),
        "NaN",
    ),
    "routing expert out of range": (
        lambda: P.plot_routing(["a"], [0], torch.tensor([[[9]]]), torch.ones(1, 1, 1), n_experts=8),
        r"\[0, 8\)",
    ),
    "attention shape": (lambda: P.plot_attention(["a", "b"], torch.rand(1, 3, 3), 0, [0]), "shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_a_one_line_error(case: str) -> None:
    fn, match = BAD_INPUTS[case]
    _raises_one_line(fn, match)


# --------------------------------------------------------------------------- tracing figures (tiny model)


def _overlapping_titles(fig: Figure) -> list[str]:
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()
    boxes = [("suptitle", fig._suptitle.get_window_extent(renderer))] if fig._suptitle else []  # noqa: SLF001
    boxes += [(ax.get_title(), ax.title.get_window_extent(renderer)) for ax in fig.axes if ax.get_title()]
    return [f"{a} / {b}" for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1 :] if ba.overlaps(bb)]


def test_tracing_figures_draw_the_result_without_overlap(tiny_model) -> None:  # noqa: ANN001
    from moe_interp.dla import direct_logit_attribution
    from tests.conftest import PROMPTS

    model = tiny_model("qwen3_next")
    res = direct_logit_attribution(model, PROMPTS[:2])
    fig = P.plot_dla_heatmap(res)
    assert _overlapping_titles(fig) == []
    images = _images(fig)
    for im, kind in zip(images, ("head", "expert"), strict=True):
        want = res.grid(kind, -1, None).numpy()
        np.testing.assert_allclose(np.ma.filled(im.get_array().astype(float), np.nan), want, rtol=1e-6)
        assert im.norm is images[0].norm  # one colour scale across panels
    assert all("(logits)" in lab for lab in _colourbar_labels(fig))
    fig = P.plot_dla_tokens(res, batch=0)
    assert _overlapping_titles(fig) == []
    keep = res.attention_mask[0].bool()
    np.testing.assert_allclose(_images(fig)[0].get_array(), res.by_site(0)[0][:, keep].numpy(), rtol=1e-6)
    for f in (P.plot_dla_heatmap(res), fig):
        assert not [c for c in _artist_colours(f) if not _is_safe_colour(c)]


def test_make_figures_writes_every_figure_and_returns_its_numbers(tiny_model, tmp_path) -> None:  # noqa: ANN001
    from moe_interp.circuits import make_figures
    from moe_interp.patching import patch_experts

    m = tiny_model("olmoe")
    harm, less = ["How do I make a bomb", "steal a car fast"], ["bake bread", "hello there friend"]
    res = make_figures(m, harm, less, tmp_path)
    for stem in ("patch_resid_layer_position", "patch_heads_layer_head", "patch_experts_layer_expert",
                 "attribution_vs_exhaustive"):  # fmt: skip
        assert (tmp_path / f"{stem}.pdf").stat().st_size > 0 and (tmp_path / f"{stem}.png").stat().st_size > 0
    assert res["experts"] == patch_experts(m, harm, less, progress=False).values.tolist()


# --------------------------------------------------------------------------- saving, scales and labels


def test_a_failed_save_leaves_no_folders_and_no_half_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moe_interp.errors import InputError

    fig = P.plot_routing_difference(RNG.normal(size=(3, 8)))
    with pytest.raises(InputError, match="cannot save the figure") as err:
        P.save_figure(fig, tmp_path / "a" / "b" / ("x" * 300))
    assert "\n" not in str(err.value) and not (tmp_path / "a").exists()
    old = P.save_figure(fig, tmp_path / "fig")
    before = [p.read_bytes() for p in old]
    real = Figure.savefig

    def png_fails(self: Figure, fname: Any, *a: Any, **k: Any) -> None:
        if k.get("format") == "png":
            raise OSError(28, "No space left on device")
        real(self, fname, *a, **k)

    monkeypatch.setattr(Figure, "savefig", png_fails)
    with pytest.raises(InputError, match="No space left"):
        P.save_figure(P.plot_routing_difference(RNG.normal(size=(3, 8))), tmp_path / "fig")
    assert [p.read_bytes() for p in old] == before  # the PDF was not replaced without its PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png"]


@pytest.mark.parametrize("vmax", [-1.0, 0.0, float("nan"), float("inf"), "1"])
def test_a_bad_vmax_is_refused_not_replaced(vmax: Any) -> None:
    _raises_one_line(lambda: P.plot_routing_difference(RNG.normal(size=(3, 8)), vmax=vmax), "vmax must be")
    assert (
        _images(P.plot_routing_difference(RNG.normal(size=(3, 8)), vmax=np.float32(2.0)))[0].norm.vmax == 2.0
    )


def test_unnormalised_patching_is_not_labelled_as_recovery() -> None:
    hook = "blocks.{L}.mlp.hook_expert_out"
    raw = PatchingResult(
        torch.randn(3, 4),
        "experts",
        hook,
        ("layer", "expert"),
        "denoising",
        [-1],
        clean_metric=2.5,
        corrupt_metric=-1.0,
        normalized=False,
    )
    ax = P.plot_attribution_vs_exhaustive(raw, raw).axes[0]
    assert "normalised" not in ax.get_xlabel() + ax.get_ylabel() and "metric value" in ax.get_xlabel()
    assert "metric value, patched run (clean 2.5, corrupt -1)" in _colourbar_labels(raw.plot())[0]
    assert _colourbar_labels(raw.plot(metric_label="my metric"))[0] == "my metric"
    normed = _patching(torch.randn(3, 4), "experts", hook, ("layer", "expert"))
    assert "normalised recovery" in P.plot_attribution_vs_exhaustive(normed, normed).axes[0].get_xlabel()


def test_dollar_signs_in_a_dla_label_are_not_mathtext(tiny_model) -> None:  # noqa: ANN001
    from dataclasses import replace

    from moe_interp.dla import direct_logit_attribution
    from tests.conftest import PROMPTS

    res = direct_logit_attribution(tiny_model("olmoe"), PROMPTS[:1])
    res = replace(res, direction=replace(res.direction, label="'$' + ' $' − ' USD'"))
    for fig in (P.plot_dla_heatmap(res), P.plot_dla_tokens(res, batch=0)):
        label = _colourbar_labels(fig)[0]
        assert r"'\$' + ' \$'" in label
        fig.draw_without_rendering()  # mathtext would parse "$' + ' $" and fail or render maths
