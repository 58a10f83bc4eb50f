"""Layer × column heatmaps shared by the patching and routing figures (layer 0 at the bottom)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from moe_interp.figures.inputs import tick_positions
from moe_interp.figures.style import (
    DIVERGING_CMAP,
    SEQUENTIAL_CMAP,
    cmap,
    diverging_norm,
    finish,
    new_figure,
    style,
)

__all__ = ["draw_heatmap", "heatmap_size", "numbered_heatmap"]


def draw_heatmap(
    ax: Axes,
    data: np.ndarray,
    fig: Figure,
    *,
    cbar_label: str,
    diverging: bool = True,
    vmax: float | None = None,
) -> None:
    """Draw ``data`` ``[n_layers, n_cols]`` in ``ax`` (of ``fig``) with layer 0 at the bottom, plus a labelled colour bar."""
    masked = np.ma.masked_invalid(data)
    norm: Normalize
    if diverging:
        cm, norm = cmap(DIVERGING_CMAP), diverging_norm(data, vmax)
    else:
        cm, norm = cmap(SEQUENTIAL_CMAP), Normalize(vmax=vmax)
    im = ax.imshow(masked, cmap=cm, norm=norm, aspect="auto", origin="lower", interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cbar.set_label(cbar_label)
    cbar.ax.tick_params(labelsize=8)
    yt = tick_positions(data.shape[0])
    ax.set_yticks(yt, [str(i) for i in yt])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=2)


def heatmap_size(n_rows: int, n_cols: int, extra_w: float = 0.0) -> tuple[float, float]:
    """Figure size (inches) that keeps cells readable for ``n_rows`` × ``n_cols``, capped for large grids."""
    w = min(max(4.5, 2.0 + 0.22 * n_cols), 11.0) + extra_w
    h = min(max(3.0, 1.2 + 0.22 * n_rows), 12.0)
    return (w, h)


def numbered_heatmap(
    data: np.ndarray,
    xlabel: str,
    metric_label: str,
    vmax: float | None,
    title: str | None,
    save_to: str | Path | None,
) -> Figure:
    """Single-panel signed layer × column heatmap with numbered columns (heads, experts)."""
    n_layers, n_cols = data.shape
    with style():
        fig = new_figure(heatmap_size(n_layers, n_cols, extra_w=1.0))
        ax = fig.add_subplot()
        draw_heatmap(ax, data, fig, vmax=vmax, cbar_label=metric_label)
        xt = tick_positions(n_cols, 32)
        ax.set_xticks(xt, [str(i) for i in xt])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer L")
        return finish(fig, title, save_to)
