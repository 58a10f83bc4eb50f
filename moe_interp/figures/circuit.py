"""Circuit diagram: components as markers on layer rows, sized by |effect|, with a faithfulness panel."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from moe_interp.figures.inputs import is_instance
from moe_interp.figures.style import GREY, OKABE_ITO, categorical_colours, finish, new_figure, style

if TYPE_CHECKING:
    from moe_interp.circuits import Circuit

__all__ = ["plot_circuit"]

#: kind -> (marker, colour): kind is encoded twice, by shape and by Okabe–Ito colour.
KIND_STYLE: dict[str, tuple[str, str]] = {
    "resid": ("s", OKABE_ITO[7]),
    "attn": ("^", OKABE_ITO[0]),
    "head": ("o", OKABE_ITO[4]),
    "mlp": ("D", OKABE_ITO[5]),
    "expert": ("h", OKABE_ITO[1]),
}
KIND_ORDER = ["resid", "attn", "head", "mlp", "expert"]
Faith = list[tuple[str, float, "tuple[float, float] | None"]]


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
        if c["kind"] not in KIND_STYLE:
            raise ValueError(f"components[{i}]: kind {c['kind']!r} not in {KIND_ORDER}")
        layer = int(c["layer"])
        if not 0 <= layer < n_layers:
            raise ValueError(f"components[{i}]: layer {layer} outside [0, {n_layers})")
        eff = float(c["effect"])
        if not math.isfinite(eff):
            raise ValueError(f"components[{i}] ({c['name']}): effect must be finite, got {eff}")
        out.append({"name": str(c["name"]), "kind": c["kind"], "layer": layer, "effect": eff})
    return out


def _validate_faithfulness(faithfulness: Mapping[str, Any]) -> Faith:
    faith: Faith = []
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
    return faith


def _from_circuit(circuit: Circuit) -> tuple[list[dict[str, Any]], int, dict[str, Any] | None]:
    """Components, layer count and the circuit / random faithfulness (CIs that contain the value)."""
    n_layers = int(circuit.metadata.get("spec", {}).get("n_layers", 0))
    if n_layers <= 0:
        raise ValueError("circuit: metadata['spec']['n_layers'] is missing; pass n_layers")
    faith: dict[str, Any] = {}
    for k in ("circuit", "random"):
        v, ci = circuit.faithfulness.get(k), circuit.faithfulness.get(f"{k}_ci")
        if v is None:
            continue
        faith[k] = v
        if ci and ci[0] <= v <= ci[1]:
            faith[f"{k}_ci"] = tuple(ci)
    return circuit.components, n_layers, faith or None


def _short_name(name: str, layer: int) -> str:
    prefix = f"blocks.{layer}."
    return name[len(prefix) :] if name.startswith(prefix) else name


def _layout(comps: list[dict[str, Any]], rows: list[int]) -> int:
    """Set each component's ``x`` (centred within its row) and ``y`` (row); return the widest row."""
    row_of = {layer: r for r, layer in enumerate(rows)}
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for c in comps:
        by_layer.setdefault(c["layer"], []).append(c)
    widest = 1
    for layer, cs in by_layer.items():
        cs.sort(key=lambda c: (KIND_ORDER.index(c["kind"]), -abs(c["effect"])))
        widest = max(widest, len(cs))
        for j, c in enumerate(cs):
            c["x"], c["y"] = j - (len(cs) - 1) / 2.0, row_of[layer]
    return widest


def _faithfulness_panel(fax: Axes, faith: Faith) -> None:
    names = [f[0] for f in faith]
    vals = np.array([f[1] for f in faith])
    err = np.array([[v - ci[0], ci[1] - v] if ci else [0.0, 0.0] for _, v, ci in faith]).T
    xs = np.arange(len(faith))
    fax.bar(
        xs, vals, color=categorical_colours(len(faith)), width=0.65, yerr=err, capsize=3, ecolor="#333333"
    )
    tops = [max(v, ci[1]) if ci else v for _, v, ci in faith]
    for x, v, top in zip(xs, vals, tops, strict=True):
        fax.text(float(x), max(top, 0.0) + 0.03, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    fax.set_ylim(min(0.0, float(np.min(vals - err[0]))) - 0.05, max(1.1, max(tops) + 0.12))
    fax.set_xticks(xs, names, rotation=30 if len(names) > 2 else 0)
    fax.axhline(1.0, ls="--", color=GREY, lw=0.8)
    fax.axhline(0.0, color="#333333", lw=0.6)
    fax.set_ylabel("faithfulness: fraction of the\nrefusal-score gap removed")
    fax.set_title("faithfulness", fontsize=9)


def plot_circuit(
    components: Circuit | Sequence[Mapping[str, Any]],
    n_layers: int | None = None,
    faithfulness: Mapping[str, Any] | None = None,
    *,
    edges: Sequence[tuple[str, str]] | None = None,
    compact: bool | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Circuit diagram: layers are rows (0 at bottom), components are markers sized by |effect|.

    ``components`` is a :class:`~moe_interp.circuits.Circuit` (layer count and faithfulness read off it)
    or dicts with ``name`` (hook-style), ``kind`` in {head, expert, attn, mlp, resid}, ``layer`` and signed
    ``effect``. Kind is encoded by marker shape and Okabe–Ito colour; filled = positive effect, hollow =
    negative. ``edges`` (pairs of names) are drawn as arrows. ``faithfulness`` (e.g. ``{"circuit": .85,
    "circuit_ci": (.8, .9), "random": .1}``) adds a bar panel with CIs. ``compact`` (default: when
    ``n_layers > 16``) shows only layers that hold components.
    """
    if is_instance(components, "moe_interp.circuits", "Circuit"):
        comps_in, spec_layers, spec_faith = _from_circuit(components)  # type: ignore[arg-type]
        n_layers = spec_layers if n_layers is None else n_layers
        faithfulness = spec_faith if faithfulness is None else faithfulness
    else:
        comps_in = components  # type: ignore[assignment]
    if n_layers is None:
        raise ValueError("n_layers: required when components is a list of dicts")
    comps = _validate_components(comps_in, n_layers)
    faith = _validate_faithfulness(faithfulness) if faithfulness is not None else []
    if compact is None:
        compact = n_layers > 16
    rows = sorted({c["layer"] for c in comps}) if compact else list(range(n_layers))
    widest = _layout(comps, rows)
    max_abs = max(abs(c["effect"]) for c in comps) or 1.0
    pos = {c["name"]: (c["x"], c["y"]) for c in comps}
    for src, dst in edges or []:
        for n in (src, dst):
            if n not in pos:
                raise ValueError(f"edges: unknown component name {n!r}")

    with style():
        w = min(max(5.0, 1.9 * widest + 2.0), 16.0) + (2.0 if faith else 0.0)
        fig = new_figure((w, min(max(3.0, 0.55 * len(rows) + 1.6), 14.0)))
        if faith:
            gs = fig.add_gridspec(1, 2, width_ratios=[4, 1])
            ax = fig.add_subplot(gs[0, 0])
            _faithfulness_panel(fig.add_subplot(gs[0, 1]), faith)
        else:
            ax = fig.add_subplot()
        for r in range(len(rows)):
            ax.axhline(r, color="#eeeeee", lw=0.8, zorder=0)
        for src, dst in edges or []:
            arrow = {"arrowstyle": "-|>", "color": GREY, "lw": 0.8, "shrinkA": 8, "shrinkB": 8}
            ax.annotate("", xy=pos[dst], xytext=pos[src], arrowprops=arrow, zorder=1)
        for c in comps:
            marker, colour = KIND_STYLE[c["kind"]]
            size = 40 + 460 * abs(c["effect"]) / max_abs
            ax.scatter(
                [c["x"]],
                [c["y"]],
                s=size,
                marker=marker,
                facecolors=colour if c["effect"] >= 0 else "white",
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
        half = max(1.0, (widest - 1) / 2.0 + 0.7)
        ax.set_xlim(-half, half)
        ax.set_xticks([])
        ax.spines["bottom"].set_visible(False)
        ax.set_ylabel("layer (residual stream flows upward)" + ("; empty layers hidden" if compact else ""))
        kinds = [k for k in KIND_ORDER if any(c["kind"] == k for c in comps)]
        handles = [
            Line2D([], [], ls="", marker=KIND_STYLE[k][0], color=KIND_STYLE[k][1], markersize=7, label=k)
            for k in kinds
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
        return finish(fig, title, save_to)
