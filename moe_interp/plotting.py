"""Publication-quality figures for MoE interpretability results.

Every function takes plain numpy arrays / torch tensors / lists, returns a
:class:`matplotlib.figure.Figure` and optionally saves it as PDF + PNG via
:func:`save_figure`. Figures are built as bare ``Figure`` objects (no pyplot
state, no ``plt.show``), so the module is safe with any backend, headless or in
Jupyter (where a returned ``Figure`` renders inline).

Conventions: layers run bottom (0) to top; signed effects use a diverging map
(``RdBu_r``) centred at 0 via :class:`~matplotlib.colors.TwoSlopeNorm` with
symmetric limits; unsigned data use ``viridis``; categories use the Okabe-Ito
palette. NaN cells are drawn light grey.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from moe_interp.refusal import stats

__all__ = [
    "OKABE_ITO",
    "STYLE",
    "plot_attribution_vs_exhaustive",
    "plot_circuit",
    "plot_coefficient_sweep",
    "plot_expert_heatmap",
    "plot_layer_head_heatmap",
    "plot_layer_position_heatmap",
    "plot_method_comparison",
    "plot_routing_difference",
    "plot_selection_scores",
    "save_figure",
]

#: Okabe-Ito colour-blind-safe categorical palette (black last: reserve it for references).
OKABE_ITO: list[str] = [
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#D55E00",  # vermillion
    "#F0E442",  # yellow
    "#000000",  # black
]

#: rc parameters applied (via ``mpl.rc_context``) while every figure is built and saved.
STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.titlesize": 12,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.8,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "axes.prop_cycle": mpl.cycler(color=OKABE_ITO),
    "image.cmap": "viridis",
    "pdf.fonttype": 42,  # embed TrueType (editable text in Illustrator / journals)
    "ps.fonttype": 42,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.05,
}

DIVERGING_CMAP = "RdBu_r"
SEQUENTIAL_CMAP = "viridis"
NAN_COLOUR = "#d9d9d9"
GREY = "#9e9e9e"
DEFAULT_RECOVERY_LABEL = "normalised refusal-score recovery (1 = clean)"
RISK_DIFF_LABEL = "routing risk difference\nP(sel | harmful) − P(sel | harmless)"

_KIND_STYLE: dict[str, tuple[str, str]] = {
    # kind: (marker, colour)
    "resid": ("s", OKABE_ITO[7]),
    "attn": ("^", OKABE_ITO[0]),
    "head": ("o", OKABE_ITO[4]),
    "mlp": ("D", OKABE_ITO[5]),
    "expert": ("h", OKABE_ITO[1]),
}
_KIND_ORDER = ["resid", "attn", "head", "mlp", "expert"]


# --------------------------------------------------------------------------- helpers


def save_figure(fig: Figure, path_stem: str | Path) -> list[Path]:
    """Save ``fig`` as ``<path_stem>.pdf`` and ``<path_stem>.png`` (dpi 200); return both paths.

    Parent directories are created. ``path_stem`` should have no suffix (a ``.pdf``/``.png``
    suffix is stripped).
    """
    stem = Path(path_stem)
    if stem.suffix.lower() in {".pdf", ".png"}:
        stem = stem.with_suffix("")
    if not stem.name:
        raise ValueError(f"save_figure: invalid path stem {str(path_stem)!r}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.pdf", stem.parent / f"{stem.name}.png"]
    with mpl.rc_context(STYLE):
        for p in paths:
            fig.savefig(p, dpi=200, bbox_inches="tight", pad_inches=0.05)
    return paths


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a tensor / array / nested list to a float64 numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().float().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: could not convert to a numeric array ({err})") from err
    return arr


def _as_array(x: Any, name: str, ndim: int, allow_nan: bool = True) -> np.ndarray:
    """Validate ``x`` as a non-empty ``ndim``-D numeric array that is not all-NaN."""
    arr = _to_numpy(x, name)
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name}: array is empty (shape {tuple(arr.shape)})")
    if np.isinf(arr).any():
        raise ValueError(f"{name}: contains infinite values")
    nan = np.isnan(arr)
    if nan.all():
        raise ValueError(f"{name}: all values are NaN, nothing to plot")
    if not allow_nan and nan.any():
        raise ValueError(f"{name}: contains NaN values")
    return arr


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def _finish(fig: Figure, title: str | None, save_to: str | Path | None) -> Figure:
    if title:
        fig.suptitle(title)
    if save_to is not None:
        save_figure(fig, save_to)
    return fig


def _diverging_norm(data: np.ndarray, vmax: float | None) -> TwoSlopeNorm:
    """Symmetric TwoSlopeNorm centred at 0 (honest colour scale for signed effects)."""
    if vmax is None:
        vmax = float(np.nanmax(np.abs(data)))
    if not (vmax > 0 and math.isfinite(vmax)):
        vmax = 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)


def _cmap(name: str) -> Colormap:
    return mpl.colormaps[name].with_extremes(bad=NAN_COLOUR)


def _tick_positions(n: int, max_ticks: int = 24) -> np.ndarray:
    stride = max(1, math.ceil(n / max_ticks))
    return np.arange(0, n, stride)


def _clean_token(tok: str) -> str:
    """Make a token string safe and visible as a tick label (escape mathtext, show whitespace)."""
    tok = tok.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    tok = tok.replace("$", r"\$")
    if tok.strip() == "":
        tok = "␣" * len(tok) if tok else "∅"
    elif tok.startswith(" "):
        tok = "␣" + tok[1:]
    return tok


def _full_hook(hook: str) -> str:
    """``'attn.hook_z'`` -> ``'blocks.{L}.attn.hook_z'`` (full templates are kept)."""
    return hook if hook.startswith("blocks.") else f"blocks.{{L}}.{hook}"


def _heatmap(
    ax: Axes,
    data: np.ndarray,
    *,
    diverging: bool = True,
    vmax: float | None = None,
    cbar_label: str,
    fig: Figure,
) -> None:
    """Draw ``data`` [n_layers, n_cols] with layer 0 at the bottom plus a colourbar."""
    masked = np.ma.masked_invalid(data)
    if diverging:
        im = ax.imshow(
            masked,
            cmap=_cmap(DIVERGING_CMAP),
            norm=_diverging_norm(data, vmax),
            aspect="auto",
            origin="lower",
            interpolation="nearest",
        )
    else:
        im = ax.imshow(
            masked,
            cmap=_cmap(SEQUENTIAL_CMAP),
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            vmax=vmax,
        )
    cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cbar.set_label(cbar_label)
    cbar.ax.tick_params(labelsize=8)
    n_layers = data.shape[0]
    yt = _tick_positions(n_layers)
    ax.set_yticks(yt, [str(i) for i in yt])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=2)


def _heatmap_size(n_rows: int, n_cols: int, extra_w: float = 0.0) -> tuple[float, float]:
    w = min(max(4.5, 2.0 + 0.22 * n_cols), 11.0) + extra_w
    h = min(max(3.0, 1.2 + 0.22 * n_rows), 12.0)
    return (w, h)


def _numbered_heatmap(
    data: np.ndarray,
    xlabel: str,
    metric_label: str,
    vmax: float | None,
    title: str | None,
    save_to: str | Path | None,
) -> Figure:
    """Single-panel layer x column heatmap with numbered columns (heads, experts)."""
    n_layers, n_cols = data.shape
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=_heatmap_size(n_layers, n_cols, extra_w=1.0), layout="constrained")
        ax = fig.add_subplot()
        _heatmap(ax, data, vmax=vmax, cbar_label=metric_label, fig=fig)
        xt = _tick_positions(n_cols, 32)
        ax.set_xticks(xt, [str(i) for i in xt])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer L")
        return _finish(fig, title, save_to)


# --------------------------------------------------------------------------- heatmaps


def plot_layer_position_heatmap(
    effects: Any,
    position_labels: Sequence[str] | None = None,
    hook_template: str = "blocks.{L}.hook_resid_pre",
    metric_label: str = DEFAULT_RECOVERY_LABEL,
    *,
    vmax: float | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Activation-patching heatmap: y = layer (0 at bottom), x = token position labelled by token.

    ``effects`` is ``[n_layers, n_pos]``; ``position_labels`` (token strings) must have length
    ``n_pos``. The diverging colour scale is centred at 0 and symmetric (``vmax`` overrides it).
    """
    data = _as_array(effects, "effects", 2)
    n_layers, n_pos = data.shape
    if position_labels is not None and len(position_labels) != n_pos:
        raise ValueError(
            f"position_labels has {len(position_labels)} entries but effects has {n_pos} positions "
            f"(shape {data.shape})"
        )
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=_heatmap_size(n_layers, n_pos, extra_w=1.0), layout="constrained")
        ax = fig.add_subplot()
        _heatmap(ax, data, vmax=vmax, cbar_label=metric_label, fig=fig)
        if position_labels is not None:
            ax.set_xticks(
                np.arange(n_pos),
                [f"{_clean_token(str(t))}" for t in position_labels],
                rotation=90 if n_pos > 6 else 0,
                fontsize=8 if n_pos <= 40 else 6,
            )
            ax.set_xlabel("token position")
        else:
            xt = _tick_positions(n_pos)
            ax.set_xticks(xt, [str(i) for i in xt])
            ax.set_xlabel("token position")
        ax.set_ylabel(f"layer L  ({hook_template})")
        return _finish(fig, title, save_to)


def plot_layer_head_heatmap(
    effects: Any,
    hook: str = "attn.hook_z",
    metric_label: str = DEFAULT_RECOVERY_LABEL,
    *,
    vmax: float | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Per-head patching heatmap: y = layer, x = head; ``effects`` is ``[n_layers, n_heads]``.

    ``hook`` may be relative (``"attn.hook_z"``) or a full template (``"blocks.{L}.attn.hook_z"``).
    """
    data = _as_array(effects, "effects", 2)
    full = _full_hook(hook)
    return _numbered_heatmap(data, f"head H  ({full}[:, :, H])", metric_label, vmax, title, save_to)


def plot_expert_heatmap(
    effects: Any,
    routing_risk_diff: Any | None = None,
    metric_label: str = DEFAULT_RECOVERY_LABEL,
    *,
    hook_template: str = "blocks.{L}.mlp.experts.{e}.hook_out",
    vmax: float | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Layer x expert effect heatmap; with ``routing_risk_diff`` a second panel (shared y) shows
    P(selected | harmful) − P(selected | harmless) per expert. Both are ``[n_layers, n_experts]``.
    """
    data = _as_array(effects, "effects", 2)
    rd = None
    if routing_risk_diff is not None:
        rd = _as_array(routing_risk_diff, "routing_risk_diff", 2)
        _check_same_shape(data, rd, "effects", "routing_risk_diff")
        if np.nanmax(np.abs(rd)) > 1.0 + 1e-9:
            raise ValueError("routing_risk_diff: a difference of probabilities must lie in [-1, 1]")
    n_layers, n_exp = data.shape
    n_panels = 1 if rd is None else 2
    w, h = _heatmap_size(n_layers, n_exp, extra_w=1.0)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(w if n_panels == 1 else min(2 * w - 0.5, 14.0), h), layout="constrained")
        axes = fig.subplots(1, n_panels, sharey=True, squeeze=False)[0]
        xt = _tick_positions(n_exp, 32)
        _heatmap(axes[0], data, vmax=vmax, cbar_label=metric_label, fig=fig)
        axes[0].set_title("expert effect")
        if rd is not None:
            _heatmap(axes[1], rd, cbar_label=RISK_DIFF_LABEL, fig=fig)
            axes[1].set_title("routing risk difference")
        for ax in axes:
            ax.set_xticks(xt, [str(i) for i in xt])
            ax.set_xlabel(f"expert e  ({hook_template})")
        axes[0].set_ylabel("layer L")
        return _finish(fig, title, save_to)


def plot_routing_difference(
    diff: Any,
    title: str | None = "Routing difference (harmful − harmless)",
    metric_label: str = "top-1 routing difference, harmful − harmless (pp)",
    *,
    hook_template: str = "blocks.{L}.mlp.experts.{e}",
    vmax: float | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Heatmap of per-expert routing differences ``[n_layers, n_experts]`` (diverging, centred at 0).

    Use ``metric_label`` to state the quantity, e.g. ``"routing risk difference"`` or top-1 %
    difference in percentage points.
    """
    data = _as_array(diff, "diff", 2)
    return _numbered_heatmap(data, f"expert e  ({hook_template})", metric_label, vmax, title, save_to)


# --------------------------------------------------------------------------- scatter


def _fmt_corr(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}"


def plot_attribution_vs_exhaustive(
    attrib: Any,
    exhaustive: Any,
    labels: Sequence[str] | None = None,
    spearman: float | None = None,
    *,
    pearson: float | None = None,
    n_annotate: int = 5,
    xlabel: str = "attribution-patching estimate",
    ylabel: str = "exhaustive activation patching",
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Scatter of attribution estimates vs exhaustive patching effects with a y = x reference.

    Spearman rho / Pearson r are computed from the data when not given (NaN pairs dropped). With
    ``labels`` the ``n_annotate`` components with the largest |exhaustive| effect are annotated.
    """
    a = _as_array(attrib, "attrib", 1)
    e = _as_array(exhaustive, "exhaustive", 1)
    _check_same_shape(a, e, "attrib", "exhaustive")
    if labels is not None and len(labels) != len(a):
        raise ValueError(f"labels has {len(labels)} entries but attrib/exhaustive have {len(a)}")
    ok = np.isfinite(a) & np.isfinite(e)
    if not ok.any():
        raise ValueError("attrib/exhaustive: no component has finite values in both arrays")
    a_ok, e_ok = a[ok], e[ok]
    if spearman is None:
        spearman = stats.spearman(a_ok, e_ok)
    if pearson is None:
        pearson = stats.pearson(a_ok, e_ok)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(4.8, 4.4), layout="constrained")
        ax = fig.add_subplot()
        lo = float(min(a_ok.min(), e_ok.min()))
        hi = float(max(a_ok.max(), e_ok.max()))
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.1
        lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], ls="--", lw=1.0, color=GREY, label="y = x", zorder=1)
        ax.axhline(0, color="#cccccc", lw=0.6, zorder=0)
        ax.axvline(0, color="#cccccc", lw=0.6, zorder=0)
        ax.scatter(
            a_ok,
            e_ok,
            s=18,
            color=OKABE_ITO[0],
            alpha=0.75,
            edgecolors="white",
            linewidths=0.4,
            zorder=2,
            label=(
                f"components (n = {int(ok.sum())})\n"
                f"Spearman ρ = {_fmt_corr(spearman)}, Pearson r = {_fmt_corr(pearson)}"
            ),
        )
        if labels is not None and n_annotate > 0:
            idx = np.flatnonzero(ok)
            top = idx[np.argsort(-np.abs(e[idx]), kind="stable")[:n_annotate]]
            ax.scatter(
                a[top],
                e[top],
                s=30,
                facecolors="none",
                edgecolors=OKABE_ITO[5],
                lw=1.0,
                zorder=3,
                label=f"top-{len(top)} by |exhaustive effect|",
            )
            for k, i in enumerate(top):
                ax.annotate(
                    _clean_token(str(labels[i])),
                    (a[i], e[i]),
                    xytext=(4, 4 if k % 2 == 0 else -9),
                    textcoords="offset points",
                    fontsize=7,
                    color="#333333",
                )
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper left")
        return _finish(fig, title, save_to)


# --------------------------------------------------------------------------- circuit


def _validate_components(components: Sequence[Mapping[str, Any]], n_layers: int) -> list[dict[str, Any]]:
    if n_layers <= 0:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    if len(components) == 0:
        raise ValueError("components: empty list, nothing to plot")
    out = []
    for i, c in enumerate(components):
        missing = {"name", "kind", "layer", "effect"} - set(c)
        if missing:
            raise ValueError(f"components[{i}] is missing keys {sorted(missing)}")
        if c["kind"] not in _KIND_STYLE:
            raise ValueError(f"components[{i}]: kind {c['kind']!r} not in {_KIND_ORDER}")
        layer = int(c["layer"])
        if not 0 <= layer < n_layers:
            raise ValueError(f"components[{i}]: layer {layer} outside [0, {n_layers})")
        eff = float(c["effect"])
        if not math.isfinite(eff):
            raise ValueError(f"components[{i}] ({c['name']}): effect must be finite, got {eff}")
        out.append({"name": str(c["name"]), "kind": c["kind"], "layer": layer, "effect": eff})
    return out


def _short_name(name: str, layer: int) -> str:
    prefix = f"blocks.{layer}."
    return name[len(prefix) :] if name.startswith(prefix) else name


def plot_circuit(
    components: Sequence[Mapping[str, Any]],
    n_layers: int,
    faithfulness: Mapping[str, Any] | None = None,
    *,
    edges: Sequence[tuple[str, str]] | None = None,
    compact: bool | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Circuit diagram: layers are rows (0 at bottom), components are markers sized by |effect|.

    ``components``: dicts with ``name`` (hook-style), ``kind`` in {head, expert, attn, mlp,
    resid}, ``layer`` and signed ``effect``. Kind is encoded by marker shape and Okabe-Ito
    colour; filled = positive effect, hollow = negative. Labels drop the ``blocks.{L}.`` prefix
    (the row tick carries it). ``edges`` (pairs of names) are drawn as arrows. ``faithfulness``
    (e.g. ``{"circuit": .85, "circuit_ci": (.8, .9), "random": .1}``) adds a bar panel with CIs.
    ``compact`` (default: when ``n_layers > 16``) shows only layers that hold components.
    """
    comps = _validate_components(components, n_layers)
    faith: list[tuple[str, float, tuple[float, float] | None]] = []
    if faithfulness is not None:
        for k, v in faithfulness.items():
            if k.endswith("_ci"):
                if k[:-3] not in faithfulness:
                    raise ValueError(f"faithfulness: {k!r} given without {k[:-3]!r}")
                continue
            val = float(v)
            if not math.isfinite(val):
                raise ValueError(f"faithfulness[{k!r}] must be finite, got {v!r}")
            ci = faithfulness.get(f"{k}_ci")
            if ci is not None:
                if len(ci) != 2:
                    raise ValueError(f"faithfulness[{k + '_ci'!r}] must be a (lo, hi) pair, got {ci!r}")
                ci = (float(ci[0]), float(ci[1]))
                if not ci[0] <= val <= ci[1]:
                    raise ValueError(f"faithfulness: {k}={val} lies outside its CI {ci}")
            faith.append((k, val, ci))
        if not faith:
            raise ValueError("faithfulness: no scores given")

    if compact is None:
        compact = n_layers > 16
    rows = sorted({c["layer"] for c in comps}) if compact else list(range(n_layers))
    row_of = {layer: r for r, layer in enumerate(rows)}

    by_layer: dict[int, list[dict[str, Any]]] = {}
    for c in comps:
        by_layer.setdefault(c["layer"], []).append(c)
    max_per_row = 1
    for layer, cs in by_layer.items():
        cs.sort(key=lambda c: (_KIND_ORDER.index(c["kind"]), -abs(c["effect"])))
        n = len(cs)
        max_per_row = max(max_per_row, n)
        for j, c in enumerate(cs):
            c["x"] = j - (n - 1) / 2.0
            c["y"] = row_of[layer]

    max_abs = max(abs(c["effect"]) for c in comps) or 1.0
    pos = {c["name"]: (c["x"], c["y"]) for c in comps}
    if edges:
        for src, dst in edges:
            for n in (src, dst):
                if n not in pos:
                    raise ValueError(f"edges: unknown component name {n!r}")

    with mpl.rc_context(STYLE):
        w = min(max(5.0, 1.9 * max_per_row + 2.0), 16.0) + (2.0 if faith else 0.0)
        h = min(max(3.0, 0.55 * len(rows) + 1.6), 14.0)
        fig = Figure(figsize=(w, h), layout="constrained")
        if faith:
            gs = fig.add_gridspec(1, 2, width_ratios=[4, 1])
            ax = fig.add_subplot(gs[0, 0])
            fax = fig.add_subplot(gs[0, 1])
        else:
            ax = fig.add_subplot()
            fax = None
        for r in range(len(rows)):
            ax.axhline(r, color="#eeeeee", lw=0.8, zorder=0)
        if edges:
            for src, dst in edges:
                ax.annotate(
                    "",
                    xy=pos[dst],
                    xytext=pos[src],
                    arrowprops={"arrowstyle": "-|>", "color": GREY, "lw": 0.8, "shrinkA": 8, "shrinkB": 8},
                    zorder=1,
                )
        for c in comps:
            marker, colour = _KIND_STYLE[c["kind"]]
            size = 40 + 460 * abs(c["effect"]) / max_abs
            positive = c["effect"] >= 0
            ax.scatter(
                [c["x"]],
                [c["y"]],
                s=size,
                marker=marker,
                facecolors=colour if positive else "white",
                edgecolors=colour,
                linewidths=1.5,
                zorder=3,
            )
            ax.annotate(
                f"{_short_name(c['name'], c['layer'])}\n({c['effect']:+.2f})",
                (c["x"], c["y"]),
                xytext=(0, -8 - 0.5 * math.sqrt(size)),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize=7,
                zorder=4,
            )
        ax.set_yticks(range(len(rows)), [f"blocks.{layer}" for layer in rows])
        ax.set_ylim(-0.9, len(rows) - 0.4)
        half = max(1.0, (max_per_row - 1) / 2.0 + 0.7)
        ax.set_xlim(-half, half)
        ax.set_xticks([])
        ax.spines["bottom"].set_visible(False)
        ax.set_ylabel("layer (residual stream flows upward)" + ("; empty layers hidden" if compact else ""))
        kinds_present = [k for k in _KIND_ORDER if any(c["kind"] == k for c in comps)]
        handles = [
            Line2D([], [], ls="", marker=_KIND_STYLE[k][0], color=_KIND_STYLE[k][1], markersize=7, label=k)
            for k in kinds_present
        ]
        handles.append(
            Line2D(
                [], [], ls="", marker="o", mfc="white", mec="#555555", markersize=7, label="negative effect"
            )
        )
        ax.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            ncol=len(handles),
            handletextpad=0.3,
            columnspacing=1.0,
        )
        if fax is not None:
            names = [f[0] for f in faith]
            vals = np.array([f[1] for f in faith])
            err = np.array([[v - ci[0], ci[1] - v] if ci else [0.0, 0.0] for _, v, ci in faith]).T
            colours = [OKABE_ITO[i % 7] for i in range(len(faith))]
            xs = np.arange(len(faith))
            fax.bar(xs, vals, color=colours, width=0.65, yerr=err, capsize=3, ecolor="#333333")
            tops = [max(v, ci[1]) if ci else v for _, v, ci in faith]
            for x, v, top in zip(xs, vals, tops, strict=True):
                fax.text(x, max(top, 0.0) + 0.03, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
            fax.set_ylim(min(0.0, float(np.min(vals - err[0]))) - 0.05, max(1.1, max(tops) + 0.12))
            fax.set_xticks(xs, names, rotation=30 if len(names) > 2 else 0)
            fax.axhline(1.0, ls="--", color=GREY, lw=0.8)
            fax.axhline(0.0, color="#333333", lw=0.6)
            fax.set_ylabel("faithfulness: fraction of the\nrefusal-score gap removed")
            fax.set_title("faithfulness", fontsize=9)
        return _finish(fig, title, save_to)


# --------------------------------------------------------------------------- line / bar charts

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h"]


def plot_coefficient_sweep(
    coeffs: Any,
    series: Mapping[str, Any],
    ylabel: str = "refusal rate",
    *,
    xlabel: str = "steering coefficient",
    secondary: Mapping[str, Any] | None = None,
    secondary_ylabel: str = "KL divergence (nats)",
    series_ci: Mapping[str, tuple[Any, Any]] | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Lines with markers vs steering coefficient; optional ``secondary`` series on a right axis
    (dashed) and ``series_ci`` ({name: (lo, hi)}) shaded bands for primary series.
    """
    x = _as_array(coeffs, "coeffs", 1, allow_nan=False)
    if not series:
        raise ValueError("series: empty, nothing to plot")

    def _check(d: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
        out = {}
        for k, v in d.items():
            arr = _as_array(v, f"{what}[{k!r}]", 1)
            if arr.shape != x.shape:
                raise ValueError(f"{what}[{k!r}] has {arr.shape[0]} values but coeffs has {x.shape[0]}")
            out[k] = arr
        return out

    prim = _check(series, "series")
    sec = _check(secondary, "secondary") if secondary else {}
    bands: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k, (lo, hi) in (series_ci or {}).items():
        if k not in prim:
            raise ValueError(f"series_ci[{k!r}] has no matching series")
        lo_a, hi_a = _as_array(lo, f"series_ci[{k!r}] lo", 1), _as_array(hi, f"series_ci[{k!r}] hi", 1)
        if lo_a.shape != x.shape or hi_a.shape != x.shape:
            raise ValueError(f"series_ci[{k!r}]: bounds must have {x.shape[0]} values")
        bands[k] = (lo_a, hi_a)
    order = np.argsort(x, kind="stable")
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(5.4, 3.6), layout="constrained")
        ax = fig.add_subplot()
        handles = []
        for i, (k, y) in enumerate(prim.items()):
            c = OKABE_ITO[i % 7]
            if k in bands:
                ax.fill_between(x[order], bands[k][0][order], bands[k][1][order], color=c, alpha=0.2, lw=0)
            (ln,) = ax.plot(x[order], y[order], marker=_MARKERS[i % len(_MARKERS)], color=c, label=k)
            handles.append(ln)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.axvline(0, color="#cccccc", lw=0.6, zorder=0)
        if sec:
            ax2 = ax.twinx()
            ax2.spines["right"].set_visible(True)
            for j, (k, y) in enumerate(sec.items()):
                i = len(prim) + j
                (ln,) = ax2.plot(
                    x[order],
                    y[order],
                    marker=_MARKERS[i % len(_MARKERS)],
                    ls="--",
                    color=OKABE_ITO[i % 7],
                    label=f"{k} (right axis)",
                )
                handles.append(ln)
            ax2.set_ylabel(secondary_ylabel)
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(handles), 3))
        return _finish(fig, title, save_to)


def plot_method_comparison(
    methods: Sequence[str],
    metrics: Mapping[str, Any],
    cis: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    *,
    ylabel: str = "refusal rate",
    annotate: bool = False,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Grouped bar chart: one group per method, one bar per metric, CIs as error bars.

    ``metrics[name]`` has one value per method; ``cis[name]`` (optional) one ``(lo, hi)`` per method.
    """
    if len(methods) == 0:
        raise ValueError("methods: empty, nothing to plot")
    if not metrics:
        raise ValueError("metrics: empty, nothing to plot")
    n = len(methods)
    vals: dict[str, np.ndarray] = {}
    for k, v in metrics.items():
        arr = _as_array(v, f"metrics[{k!r}]", 1)
        if arr.shape[0] != n:
            raise ValueError(f"metrics[{k!r}] has {arr.shape[0]} values but there are {n} methods")
        vals[k] = arr
    errs: dict[str, np.ndarray] = {}
    for k, ci in (cis or {}).items():
        if k not in vals:
            raise ValueError(f"cis[{k!r}] has no matching metric")
        ci_a = _to_numpy(ci, f"cis[{k!r}]")
        if ci_a.shape != (n, 2):
            raise ValueError(f"cis[{k!r}] must be {n} (lo, hi) pairs, got shape {ci_a.shape}")
        v = vals[k]
        bad = np.isfinite(v) & ((ci_a[:, 0] > v + 1e-12) | (ci_a[:, 1] < v - 1e-12))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"cis[{k!r}]: value {v[i]} for {methods[i]!r} lies outside its CI {tuple(ci_a[i])}"
            )
        errs[k] = np.stack([v - ci_a[:, 0], ci_a[:, 1] - v])
    m = len(vals)
    width = 0.8 / m
    xs = np.arange(n)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(min(max(4.5, 1.0 + 0.35 * n * m + 0.6 * n), 14.0), 3.8), layout="constrained")
        ax = fig.add_subplot()
        for i, (k, v) in enumerate(vals.items()):
            off = (i - (m - 1) / 2) * width
            bars = ax.bar(
                xs + off,
                v,
                width=width * 0.92,
                color=OKABE_ITO[i % 7],
                label=k,
                yerr=errs.get(k),
                capsize=2.5,
                error_kw={"elinewidth": 0.9, "ecolor": "#333333"},
            )
            if annotate:
                ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=2)
        ax.set_xticks(xs, list(methods), rotation=20 if n > 4 else 0, ha="right" if n > 4 else "center")
        ax.set_ylabel(ylabel)
        ax.set_xlabel("method")
        ax.axhline(0, color="#333333", lw=0.6)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(m, 4))
        return _finish(fig, title, save_to)


# --------------------------------------------------------------------------- direction selection


def plot_selection_scores(
    table: Sequence[Mapping[str, Any]],
    *,
    chosen: tuple[int, int] | None = None,
    lower_is_better: bool = True,
    induce_threshold: float | None = 0.0,
    kl_threshold: float | None = 0.1,
    hook_template: str = "blocks.{L}.hook_resid_pre",
    score_label: str = "bypass score (refusal log-odds,\ndirection ablated)",
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Refusal-direction selection: bypass, induce and KL scores vs layer, one line per position.

    ``table`` rows: ``layer``, ``pos``, ``bypass``, ``induce``, ``kl``, ``kept``. Discarded
    candidates are grey crosses; the chosen candidate (default: the kept one with the best bypass
    score) is starred. Three panels share x: bypass (top), induce, KL (filter thresholds dashed).
    """
    if len(table) == 0:
        raise ValueError("table: empty, nothing to plot")
    keys = ("layer", "pos", "bypass", "induce", "kl", "kept")
    for i, row in enumerate(table):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"table[{i}] is missing keys {missing}")
    layer = np.array([int(r["layer"]) for r in table])
    pos = np.array([int(r["pos"]) for r in table])
    kept = np.array([bool(r["kept"]) for r in table])
    cols = {k: _to_numpy([r[k] for r in table], k) for k in ("bypass", "induce", "kl")}
    if np.isnan(cols["bypass"]).all():
        raise ValueError("table: all bypass scores are NaN, nothing to plot")
    if chosen is None:
        cand = np.flatnonzero(kept & np.isfinite(cols["bypass"]))
        if len(cand):
            b = cols["bypass"][cand]
            best = cand[int(np.argmin(b) if lower_is_better else np.argmax(b))]
            chosen = (int(layer[best]), int(pos[best]))
    chosen_idx = None
    if chosen is not None:
        hits = np.flatnonzero((layer == chosen[0]) & (pos == chosen[1]))
        if len(hits) == 0:
            raise ValueError(f"chosen (layer, pos) = {chosen} is not in the table")
        chosen_idx = int(hits[0])
    positions = sorted(set(pos.tolist()))
    if len(positions) <= 7:
        colours = {p: OKABE_ITO[i] for i, p in enumerate(positions)}
    else:
        cmap = mpl.colormaps[SEQUENTIAL_CMAP]
        colours = {p: cmap(i / max(1, len(positions) - 1)) for i, p in enumerate(positions)}
    panels = [
        ("bypass", score_label, None),
        ("induce", "induce score (refusal log-odds)", induce_threshold),
        ("kl", "KL on harmless (nats)", kl_threshold),
    ]
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(6.4, 6.0), layout="constrained")
        axes = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1, 1]})
        for ax, (key, label, thr) in zip(axes, panels, strict=True):
            y = cols[key]
            for p in positions:
                sel = np.flatnonzero(pos == p)
                sel = sel[np.argsort(layer[sel], kind="stable")]
                c = colours[p]
                ax.plot(layer[sel], y[sel], color=c, lw=1.0, alpha=0.5, label=f"pos {p}")
                k_sel = sel[kept[sel]]
                ax.plot(layer[k_sel], y[k_sel], ls="", marker="o", color=c, markersize=4)
            d_sel = np.flatnonzero(~kept)
            ax.plot(layer[d_sel], y[d_sel], ls="", marker="x", color=GREY, markersize=4, zorder=2)
            if chosen_idx is not None and np.isfinite(y[chosen_idx]):
                ax.plot(
                    [layer[chosen_idx]],
                    [y[chosen_idx]],
                    ls="",
                    marker="*",
                    markersize=14,
                    mfc=OKABE_ITO[6],
                    mec="black",
                    mew=0.8,
                    zorder=5,
                )
            if thr is not None:
                ax.axhline(thr, ls="--", color=GREY, lw=0.8)
            ax.set_ylabel(label)
        axes[-1].set_xlabel(f"layer L of candidate direction  ({hook_template})")
        axes[-1].xaxis.get_major_locator().set_params(integer=True)
        handles, labels = axes[0].get_legend_handles_labels()
        handles += [
            Line2D([], [], ls="", marker="o", color="#555555", markersize=4, label="kept"),
            Line2D([], [], ls="", marker="x", color=GREY, markersize=4, label="discarded (filter)"),
        ]
        labels += ["kept", "discarded (filter)"]
        if chosen_idx is not None:
            handles.append(
                Line2D(
                    [], [], ls="", marker="*", mfc=OKABE_ITO[6], mec="black", markersize=10, label="chosen"
                )
            )
            labels.append(f"chosen (L={chosen[0]}, pos {chosen[1]})")  # type: ignore[index]
        axes[0].legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4)
        return _finish(fig, title, save_to)
