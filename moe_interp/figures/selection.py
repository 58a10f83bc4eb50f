"""Refusal-direction selection figure: bypass, induce and KL scores of every (layer, position) candidate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from moe_interp.figures.inputs import is_instance, to_numpy
from moe_interp.figures.style import GREY, OKABE_ITO, categorical_colours, finish, new_figure, style

if TYPE_CHECKING:
    from moe_interp.refusal.selection import SelectionResult

__all__ = ["plot_selection_scores"]

_KEYS = ("layer", "pos", "bypass", "induce", "kl", "kept")


def _table_and_choice(
    table: SelectionResult | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    chosen: tuple[int, int] | None,
) -> tuple[Sequence[Mapping[str, Any]], tuple[int, int] | None]:
    """Rows and chosen (layer, pos) of a :class:`SelectionResult`, its ``to_dict()`` or a bare table."""
    if is_instance(table, "moe_interp.refusal.selection", "SelectionResult"):
        res = cast("SelectionResult", table)
        return res.table, chosen or (res.layer, res.pos)
    if isinstance(table, Mapping):
        if "table" not in table:
            raise ValueError("table: a mapping must be a SelectionResult.to_dict() with a 'table' entry")
        if chosen is None and "layer" in table and "pos" in table:
            chosen = (int(table["layer"]), int(table["pos"]))
        return table["table"], chosen
    return cast("Sequence[Mapping[str, Any]]", table), chosen


def plot_selection_scores(
    table: SelectionResult | Mapping[str, Any] | Sequence[Mapping[str, Any]],
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
    """Bypass, induce and KL scores vs layer, one line per position, for refusal-direction selection.

    ``table`` is a :class:`~moe_interp.refusal.selection.SelectionResult` (or its ``to_dict()``; the chosen
    candidate is read off it) or its rows: ``layer``, ``pos``, ``bypass``, ``induce``, ``kl``, ``kept``.
    Discarded candidates are grey crosses; the chosen candidate (default: the kept one with the best
    bypass score) is starred. Three panels share x: bypass (top), induce, KL (filter thresholds dashed).
    """
    rows, chosen = _table_and_choice(table, chosen)
    if len(rows) == 0:
        raise ValueError("table: empty, nothing to plot")
    for i, row in enumerate(rows):
        missing = [k for k in _KEYS if k not in row]
        if missing:
            raise ValueError(f"table[{i}] is missing keys {missing}")
    layer = np.array([int(r["layer"]) for r in rows])
    pos = np.array([int(r["pos"]) for r in rows])
    kept = np.array([bool(r["kept"]) for r in rows])
    cols = {k: to_numpy([r[k] for r in rows], k) for k in ("bypass", "induce", "kl")}
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
    colours = dict(zip(positions, categorical_colours(len(positions)), strict=True))
    panels = [
        ("bypass", score_label, None),
        ("induce", "induce score (refusal log-odds)", induce_threshold),
        ("kl", "KL on harmless (nats)", kl_threshold),
    ]
    with style():
        fig = new_figure((6.4, 6.0))
        axes = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1, 1]})
        for ax, (key, label, thr) in zip(axes, panels, strict=True):
            y = cols[key]
            for p in positions:
                sel = np.flatnonzero(pos == p)
                sel = sel[np.argsort(layer[sel], kind="stable")]
                ax.plot(layer[sel], y[sel], color=colours[p], lw=1.0, alpha=0.5, label=f"pos {p}")
                k_sel = sel[kept[sel]]
                ax.plot(layer[k_sel], y[k_sel], ls="", marker="o", color=colours[p], markersize=4)
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
            Line2D([], [], ls="", marker="o", color="#555555", markersize=4),
            Line2D([], [], ls="", marker="x", color=GREY, markersize=4),
        ]
        labels += ["kept", "discarded (filter)"]
        if chosen is not None and chosen_idx is not None:
            handles.append(Line2D([], [], ls="", marker="*", mfc=OKABE_ITO[6], mec="black", markersize=10))
            labels.append(f"chosen (L={chosen[0]}, pos {chosen[1]})")
        axes[0].legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4)
        return finish(fig, title, save_to)
