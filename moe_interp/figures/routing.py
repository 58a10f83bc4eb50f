"""Routing figures: per-expert routing differences (layer × expert) and one prompt's routing (token × layer).

Experts are categories: up to eight get Okabe–Ito colours, more get evenly sampled ``viridis`` colours
(:func:`~moe_interp.figures.style.categorical_colours`), so no two experts share a colour; every cell is
also labelled with its expert numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from moe_interp.figures.heatmap import numbered_heatmap
from moe_interp.figures.inputs import as_array, clean_token, to_numpy
from moe_interp.figures.style import categorical_colours, finish, new_figure, style, text_colour_on

__all__ = ["plot_routing", "plot_routing_difference"]


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

    ``metric_label`` names the quantity and unit, e.g. routing risk difference or top-1 difference in
    percentage points (pp).
    """
    data = as_array(diff, "diff", 2)
    return numbered_heatmap(data, f"expert e  ({hook_template})", metric_label, vmax, title, save_to)


def plot_routing(
    tokens: Sequence[str],
    layers: Sequence[int],
    indices: Any,
    weights: Any,
    *,
    n_experts: int | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Token × MoE layer routing of one prompt (``blocks.L.mlp.hook_expert_indices`` / ``hook_expert_weights``).

    ``indices`` / ``weights`` are ``[layer, pos, k]``. Each cell is filled with its top-weighted expert's
    colour (one distinct colour per expert of ``n_experts``, default ``max(indices) + 1``) and labelled
    ``expert:weight`` for its two largest weights; a legend maps colours to experts.
    """
    idx_f, w = to_numpy(indices, "indices"), to_numpy(weights, "weights")
    if idx_f.ndim != 3 or idx_f.size == 0:
        raise ValueError(f"indices: expected a non-empty [layer, pos, k] array, got shape {idx_f.shape}")
    if w.shape != idx_f.shape:
        raise ValueError(f"shape mismatch: indices has shape {idx_f.shape} but weights has shape {w.shape}")
    if not (np.isfinite(idx_f).all() and np.isfinite(w).all()):
        raise ValueError("indices/weights: contain NaN or infinite values")
    idx = idx_f.astype(int)
    n_l, n_p, k = idx.shape
    if len(tokens) != n_p or len(layers) != n_l:
        raise ValueError(
            f"indices has shape {idx.shape} but there are {len(layers)} layers and {len(tokens)} tokens"
        )
    n_exp = int(idx.max()) + 1 if n_experts is None else n_experts
    if idx.min() < 0 or idx.max() >= n_exp:
        raise ValueError(f"indices: expert numbers must lie in [0, {n_exp}), got {idx.min()}..{idx.max()}")
    colours = categorical_colours(n_exp)
    with style():
        fig = new_figure((2.6 + 0.55 * n_p, 1.4 + 0.5 * n_l))
        ax = fig.add_subplot()
        used: set[int] = set()
        for L in range(n_l):
            for p in range(n_p):
                order = np.argsort(-w[L, p], kind="stable")
                top = int(idx[L, p, order[0]])
                used.add(top)
                ax.add_patch(Rectangle((p - 0.5, L - 0.5), 1, 1, facecolor=colours[top], edgecolor="white"))
                text = "\n".join(f"{idx[L, p, o]}:{w[L, p, o]:.2f}" for o in order[: min(k, 2)])
                ax.text(p, L, text, ha="center", va="center", fontsize=5, color=text_colour_on(colours[top]))
        ax.set_xlim(-0.5, n_p - 0.5)
        ax.set_ylim(-0.5, n_l - 0.5)
        ax.set_xticks(np.arange(n_p), [clean_token(t) for t in tokens], rotation=90)
        ax.set_yticks(np.arange(n_l), [f"blocks.{L}.mlp" for L in layers])
        ax.set_xlabel("token")
        ax.set_ylabel("MoE layer (hook_expert_indices)")
        handles = [Rectangle((0, 0), 1, 1, facecolor=colours[e], label=f"e{e}") for e in sorted(used)]
        ax.legend(
            handles=handles,
            title="top expert",
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            ncol=1 + len(handles) // 12,
            handlelength=1.0,
        )
        return finish(fig, title or "Routing: expert:weight per token (colour = top expert)", save_to)
