"""Static figures for circuit tracing: DLA heatmaps, per-token DLA, logit lens, routing and attention.

The paper twins of the Jupyter views in :mod:`moe_interp.views`. One style with :mod:`moe_interp.plotting`:
built under its ``STYLE`` rc parameters on bare ``Figure`` objects (no pyplot state), signed values on a
symmetric diverging map centred at 0, unsigned on ``viridis``, categories in the Okabe–Ito palette; axes
name the hooks and units. ``save_to`` writes PDF + PNG via :func:`moe_interp.plotting.save_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib as mpl
import numpy as np
from jaxtyping import Float, Int
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from moe_interp.plotting import DIVERGING_CMAP, NAN_COLOUR, OKABE_ITO, SEQUENTIAL_CMAP, STYLE, save_figure

if TYPE_CHECKING:
    from moe_interp.dla import DLAResult
    from moe_interp.lens import LogitLensResult

__all__ = [
    "plot_attention",
    "plot_dla_heatmap",
    "plot_dla_tokens",
    "plot_logit_lens",
    "plot_routing",
]


def _tick(tok: str) -> str:
    """A token as a safe, visible tick label (mathtext escaped, whitespace shown)."""
    tok = tok.replace("\\", "\\\\").replace("$", r"\$").replace("\n", "\\n").replace("\t", "\\t")
    if tok.strip() == "":
        return "␣" * len(tok) if tok else "∅"
    return "␣" + tok[1:] if tok.startswith(" ") else tok


def _norm(data: np.ndarray) -> TwoSlopeNorm:
    vmax = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
    vmax = vmax if vmax > 0 and math.isfinite(vmax) else 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)


def _cmap(name: str) -> mpl.colors.Colormap:
    return mpl.colormaps[name].with_extremes(bad=NAN_COLOUR)


def _finish(fig: Figure, title: str | None, save_to: str | Path | None) -> Figure:
    if title:
        fig.suptitle(title)
    if save_to is not None:
        save_figure(fig, save_to)
    return fig


def _token_axis(ax: Axes, tokens: Sequence[str], axis: str = "x") -> None:
    ticks = np.arange(len(tokens))
    labels = [_tick(t) for t in tokens]
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=90)
    else:
        ax.set_yticks(ticks, labels)


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=float)


def plot_dla_heatmap(
    result: DLAResult,
    *,
    pos: int = -1,
    batch: int | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Layer × head and layer × expert direct logit attribution at position ``pos`` (mean over prompts when
    ``batch`` is None), on one symmetric colour scale in logit units."""
    panels = [("head", "blocks.L.attn.hook_result[h]")] if result.n_heads else []
    if result.n_experts:
        panels.append(("expert", "blocks.L.mlp.experts.e.hook_out"))
    grids = [_np(result.grid(k, pos, batch)) for k, _ in panels]  # type: ignore[arg-type]
    norm = _norm(np.concatenate([g.ravel() for g in grids]))
    widths = [max(g.shape[1], 2) for g in grids]
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(1.6 + 0.32 * sum(widths) + 1.2 * len(grids), 0.9 + 0.4 * result.n_layers))
        axes = fig.subplots(1, len(grids), squeeze=False, width_ratios=widths)[0]
        im = None
        for ax, g, (kind, hook) in zip(axes, grids, panels, strict=True):
            im = ax.imshow(g, cmap=_cmap(DIVERGING_CMAP), norm=norm, origin="lower", aspect="auto")
            ax.set_xticks(np.arange(g.shape[1]))
            ax.set_yticks(np.arange(result.n_layers))
            ax.set_title(hook, fontsize=8)
            ax.set_xlabel("head h" if kind == "head" else "expert e")
            ax.set_ylabel("layer L")
        fig.colorbar(im, ax=list(axes), label=f"DLA of {result.direction.label} (logits)", shrink=0.9)
        where = "mean over prompts" if batch is None else f"prompt {batch}"
        return _finish(fig, title or f"Direct logit attribution at position {pos} ({where})", save_to)


def plot_dla_tokens(
    result: DLAResult,
    *,
    batch: int = 0,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Per token: each residual write's DLA (``hook_embed``, ``blocks.L.hook_attn_out``/``hook_mlp_out``),
    with the model's logit difference per token above (padding left out)."""
    sites, labels = result.by_site(batch)
    keep = result.attention_mask[batch].bool().numpy()
    data = _np(sites)[:, keep]
    tokens = [t for t, k in zip(result.str_tokens[batch], keep, strict=True) if k]
    diff = _np(result.logit_diff[batch])[keep]
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(2.5 + 0.3 * len(tokens), 2.2 + 0.25 * len(labels)))
        ax_top, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, max(len(labels) / 4, 1.5)])
        ax_top.plot(np.arange(len(tokens)), diff, color=OKABE_ITO[0], marker="o")
        ax_top.axhline(0, color=OKABE_ITO[7], lw=0.6)
        ax_top.set_ylabel("logit diff\n(logits)")
        im = ax.imshow(data, cmap=_cmap(DIVERGING_CMAP), norm=_norm(data), origin="lower", aspect="auto")
        ax.set_yticks(np.arange(len(labels)), labels)
        _token_axis(ax, tokens)
        ax.set_xlabel("token")
        ax.set_ylabel("residual write (hook)")
        fig.colorbar(im, ax=[ax_top, ax], label=f"DLA of {result.direction.label} (logits)", shrink=0.8)
        return _finish(fig, title or "Direct logit attribution per token", save_to)


def plot_logit_lens(
    result: LogitLensResult,
    *,
    batch: int = 0,
    token: int = 0,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Left: log-probability of ``result.tokens[token]`` read off each layer (rows, hook names) at each
    position. Right: every chosen token's log-probability across layers at the last position."""
    keep = result.attention_mask[batch].bool().numpy()
    data = _np(result.logprobs[:, batch, :, token])[:, keep]
    toks = result.str_tokens[batch] if result.str_tokens else [str(i) for i in range(len(keep))]
    toks = [t for t, k in zip(toks, keep, strict=True) if k]
    n = len(result.labels)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(4.5 + 0.3 * len(toks), 1.2 + 0.35 * n))
        ax, ax2 = fig.subplots(1, 2, width_ratios=[max(len(toks), 4), 4])
        im = ax.imshow(data, cmap=_cmap(SEQUENTIAL_CMAP), origin="lower", aspect="auto")
        ax.set_yticks(np.arange(n), result.labels)
        _token_axis(ax, toks)
        ax.set_xlabel("token")
        ax.set_ylabel("residual stream read (hook)")
        fig.colorbar(im, ax=ax, label=f"log P({_tick(result.token_strs[token])}) (nats)")
        for j, t in enumerate(result.token_strs):
            ax2.plot(
                _np(result.logprobs[:, batch, -1, j]),
                np.arange(n),
                marker="o",
                color=OKABE_ITO[j % 7],
                label=_tick(t),
            )
        ax2.set_yticks(np.arange(n), [""] * n)
        ax2.set_xlabel("log-prob at last token (nats)")
        ax2.legend(loc="best")
        return _finish(fig, title or "Logit lens", save_to)


def plot_routing(
    tokens: Sequence[str],
    layers: Sequence[int],
    indices: Int[Tensor, "layer pos k"],
    weights: Float[Tensor, "layer pos k"],
    *,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Token × MoE layer routing: each cell coloured by the top-weighted expert (Okabe–Ito, cycling),
    annotated with the selected experts and their weights (``blocks.L.mlp.hook_expert_indices`` /
    ``hook_expert_weights``)."""
    idx, w = _np(indices).astype(int), _np(weights)
    n_l, n_p, k = idx.shape
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(1.5 + 0.55 * n_p, 1.0 + 0.5 * n_l))
        ax = fig.subplots()
        for L in range(n_l):
            for p in range(n_p):
                order = np.argsort(-w[L, p])
                top = idx[L, p, order[0]]
                alpha = 0.2 + 0.8 * float(w[L, p, order[0]] / max(float(w.max()), 1e-12))
                ax.add_patch(Rectangle((p - 0.5, L - 0.5), 1, 1, color=OKABE_ITO[top % 7], alpha=alpha))
                text = "\n".join(f"{idx[L, p, o]}:{w[L, p, o]:.2f}" for o in order[: min(k, 2)])
                ax.text(p, L, text, ha="center", va="center", fontsize=5)
        ax.set_xlim(-0.5, n_p - 0.5)
        ax.set_ylim(-0.5, n_l - 0.5)
        _token_axis(ax, tokens)
        ax.set_yticks(np.arange(n_l), [f"blocks.{L}.mlp" for L in layers])
        ax.set_xlabel("token")
        ax.set_ylabel("MoE layer (hook_expert_indices, weights)")
        return _finish(fig, title or "Routing: expert:weight per token (colour = top expert)", save_to)


def plot_attention(
    tokens: Sequence[str],
    pattern: Float[Tensor, "head q k"],
    layer: int,
    heads: Sequence[int],
    *,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """One panel per head of ``blocks.{layer}.attn.hook_pattern``: query token (rows) × key token."""
    pat = _np(pattern)
    n = len(heads)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    size = 1.2 + 0.18 * len(tokens)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(cols * size + 1.0, rows * size))
        axes = fig.subplots(rows, cols, squeeze=False)
        im = None
        for i, ax in enumerate(axes.ravel()):
            if i >= n:
                ax.set_axis_off()
                continue
            im = ax.imshow(pat[i], cmap=_cmap(SEQUENTIAL_CMAP), vmin=0.0, vmax=1.0, aspect="equal")
            ax.set_title(f"head {heads[i]}")
            _token_axis(ax, tokens, "x")
            ax.set_xlabel("key token")
            if i % cols == 0:
                _token_axis(ax, tokens, "y")
                ax.set_ylabel("query token")
            else:
                ax.set_yticks([])
        fig.colorbar(im, ax=list(axes.ravel()), label="attention probability", shrink=0.8)
        return _finish(fig, title or f"blocks.{layer}.attn.hook_pattern", save_to)
