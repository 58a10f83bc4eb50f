"""Circuit-discovery benchmark figure: rank of the planted component, methods × organisms."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from moe_interp.figures.style import cmap, finish, new_figure, style, text_colour_on

__all__ = ["plot_benchmark"]

#: Ranks are unsigned and ordinal: a sequential colour-blind-safe map, rank 1 brightest.
RANK_CMAP = "viridis_r"


def _ranks(orgs: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> np.ndarray:
    ranks = np.full((len(methods), len(orgs)), np.nan)
    for j, o in enumerate(orgs):
        for i, m in enumerate(methods):
            if m not in o["methods"]:
                raise ValueError(f"organism {o.get('name', j)!r} has no result for method {m!r}")
            r = o["methods"][m].get("rank")
            if r is not None:
                if not (math.isfinite(r) and r >= 1):
                    raise ValueError(f"{o.get('name', j)!r} / {m}: rank must be >= 1, got {r!r}")
                ranks[i, j] = r
    return ranks


def plot_benchmark(
    result: Mapping[str, Any],
    *,
    methods: Sequence[str] | None = None,
    title: str | None = "Rank of the planted component (bold: matching method)",
    save_to: str | Path | None = None,
) -> Figure:
    """Ranks (1 = found first) of each organism's planted component per discovery method, log colour scale.

    ``result`` is what :func:`moe_interp.benchmark.run_benchmark` returns; ``methods`` (default: the first
    organism's, in order) are the rows. Cells read the rank, ``miss`` (a matching method without the plant
    among its candidates) or ``–`` (not a candidate of the method's kind); matching methods are bold.
    Column labels carry the circuit's precision P and recall R against the plant.
    """
    orgs = list(result.get("organisms") or [])
    if not orgs:
        raise ValueError("result: no organisms, nothing to plot")
    methods = list(methods if methods is not None else orgs[0]["methods"])
    if not methods:
        raise ValueError("result: no methods, nothing to plot")
    ranks = _ranks(orgs, methods)
    top = float(np.nanmax(ranks)) if np.isfinite(ranks).any() else 2.0
    vmax = float(2 ** max(1, math.ceil(math.log2(max(top, 2.0)))))
    norm = LogNorm(vmin=1.0, vmax=vmax)
    cm = cmap(RANK_CMAP)
    with style():
        fig = new_figure((2.8 + 1.3 * len(orgs), 1.6 + 0.3 * len(methods)))
        ax = fig.add_subplot()
        im = ax.imshow(
            np.ma.masked_invalid(ranks), cmap=cm, norm=norm, aspect="auto", interpolation="nearest"
        )
        for i, m in enumerate(methods):
            for j, o in enumerate(orgs):
                r, matches = ranks[i, j], bool(o["methods"][m].get("matches"))
                txt = f"{int(r)}" if np.isfinite(r) else ("miss" if matches else "–")
                colour = text_colour_on(cm(norm(r))) if np.isfinite(r) else "black"
                weight = "bold" if matches else "normal"
                ax.text(j, i, txt, ha="center", va="center", fontsize=8, fontweight=weight, color=colour)
        ax.set_xticks(
            range(len(orgs)),
            [f"{o['name']}\nP={o['circuit']['precision']:.2f} R={o['circuit']['recall']:.2f}" for o in orgs],
        )
        ax.set_yticks(range(len(methods)), methods)
        ax.set_xlabel("planted organism (circuit precision P, recall R)")
        ax.set_ylabel("discovery method")
        for spine in ax.spines.values():
            spine.set_visible(False)
        ticks = [t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256) if t <= vmax]
        cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, ticks=ticks)
        cbar.ax.set_yticklabels([str(t) for t in ticks])
        cbar.ax.minorticks_off()
        cbar.set_label("rank of the planted component\n(1 = ranked first; log scale)")
        return finish(fig, title, save_to)
