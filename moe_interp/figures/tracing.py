"""Circuit-tracing figures of one run: DLA heatmaps, per-token DLA, logit lens and attention patterns.

The paper twins of the Jupyter views in :mod:`moe_interp.views`; axes name the hooks and units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moe_interp.figures.inputs import as_array, clean_token, to_numpy
from moe_interp.figures.style import (
    DIVERGING_CMAP,
    OKABE_ITO,
    SEQUENTIAL_CMAP,
    categorical_colours,
    cmap,
    diverging_norm,
    finish,
    new_figure,
    style,
)

if TYPE_CHECKING:
    from moe_interp.dla import DLAResult
    from moe_interp.lens import LogitLensResult

__all__ = ["plot_attention", "plot_dla_heatmap", "plot_dla_tokens", "plot_logit_lens"]


def _mathsafe(text: str) -> str:
    """``text`` with ``$`` escaped, so two dollar signs in a token label are not drawn as mathtext."""
    return text.replace("$", r"\$")


def _token_axis(ax: Axes, tokens: Sequence[str], axis: str = "x") -> None:
    ticks, labels = np.arange(len(tokens)), [clean_token(t) for t in tokens]
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=90)
    else:
        ax.set_yticks(ticks, labels)


def plot_dla_heatmap(
    result: DLAResult,
    *,
    pos: int = -1,
    batch: int | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Layer × head and layer × expert direct logit attribution at position ``pos`` (mean over prompts
    when ``batch`` is None), on one symmetric colour scale in logit units."""
    panels = [("head h", "blocks.L.attn.hook_result[h]", "head")] if result.n_heads else []
    if result.n_experts:
        panels.append(("expert e", "blocks.L.mlp.experts.e.hook_out", "expert"))
    if not panels:
        raise ValueError("plot_dla_heatmap: the result has neither heads nor experts to show")
    grids = [as_array(result.grid(kind, pos, batch), f"DLA {kind} grid", 2) for _, _, kind in panels]  # type: ignore[arg-type]
    norm = diverging_norm(np.concatenate([g.ravel() for g in grids]))
    widths = [max(g.shape[1], 2) for g in grids]
    with style():
        fig = new_figure((2.2 + 0.32 * sum(widths) + 1.2 * len(grids), 1.8 + 0.4 * result.n_layers))
        axes = fig.subplots(1, len(grids), squeeze=False, width_ratios=widths)[0]
        im = None
        for ax, g, (xlabel, hook, _) in zip(axes, grids, panels, strict=True):
            im = ax.imshow(g, cmap=cmap(DIVERGING_CMAP), norm=norm, origin="lower", aspect="auto")
            ax.set_xticks(np.arange(g.shape[1]))
            ax.set_yticks(np.arange(result.n_layers))
            ax.set_title(hook, fontsize=8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("layer L")
        assert im is not None
        fig.colorbar(
            im, ax=list(axes), label=f"DLA of {_mathsafe(result.direction.label)}\n(logits)", shrink=0.9
        )
        where = "mean over prompts" if batch is None else f"prompt {batch}"
        return finish(fig, title or f"Direct logit attribution at position {pos} ({where})", save_to)


def plot_dla_tokens(
    result: DLAResult,
    *,
    batch: int = 0,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Per token: each residual write's DLA (``hook_embed``, ``blocks.L.hook_attn_out`` / ``hook_mlp_out``),
    with the model's logit difference per token above (padding left out)."""
    sites, labels = result.by_site(batch)
    keep = result.attention_mask[batch].bool().numpy()
    data = as_array(to_numpy(sites, "DLA by site")[:, keep], "DLA by site", 2)
    tokens = [t for t, k in zip(result.str_tokens[batch], keep, strict=True) if k]
    diff = to_numpy(result.logit_diff[batch], "logit_diff")[keep]
    with style():
        fig = new_figure((3.0 + 0.3 * len(tokens), 2.6 + 0.25 * len(labels)))
        ax_top, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, max(len(labels) / 4, 1.5)])
        ax_top.plot(np.arange(len(tokens)), diff, color=OKABE_ITO[0], marker="o")
        ax_top.axhline(0, color=OKABE_ITO[7], lw=0.6)
        ax_top.set_ylabel("logit diff\n(logits)")
        im = ax.imshow(
            data, cmap=cmap(DIVERGING_CMAP), norm=diverging_norm(data), origin="lower", aspect="auto"
        )
        ax.set_yticks(np.arange(len(labels)), labels)
        _token_axis(ax, tokens)
        ax.set_xlabel("token")
        ax.set_ylabel("residual write (hook)")
        fig.colorbar(
            im, ax=[ax_top, ax], label=f"DLA of {_mathsafe(result.direction.label)} (logits)", shrink=0.8
        )
        return finish(fig, title or "Direct logit attribution per token", save_to)


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
    data = as_array(to_numpy(result.logprobs[:, batch, :, token], "logprobs")[:, keep], "logprobs", 2)
    toks = result.str_tokens[batch] if result.str_tokens else [str(i) for i in range(len(keep))]
    toks = [t for t, k in zip(toks, keep, strict=True) if k]
    n = len(result.labels)
    colours = categorical_colours(len(result.token_strs))
    with style():
        fig = new_figure((4.5 + 0.3 * len(toks), 1.6 + 0.35 * n))
        ax, ax2 = fig.subplots(1, 2, width_ratios=[max(len(toks), 4), 4])
        im = ax.imshow(data, cmap=cmap(SEQUENTIAL_CMAP), origin="lower", aspect="auto")
        ax.set_yticks(np.arange(n), result.labels)
        _token_axis(ax, toks)
        ax.set_xlabel("token")
        ax.set_ylabel("residual stream read (hook)")
        fig.colorbar(im, ax=ax, label=f"log P({clean_token(result.token_strs[token])}) (nats)")
        for j, t in enumerate(result.token_strs):
            lp = to_numpy(result.logprobs[:, batch, -1, j], "logprobs")
            ax2.plot(lp, np.arange(n), marker="o", color=colours[j], label=clean_token(t))
        ax2.set_yticks(np.arange(n), [""] * n)
        ax2.set_xlabel("log-prob at last token (nats)")
        ax2.legend(loc="best")
        return finish(fig, title or "Logit lens", save_to)


def plot_attention(
    tokens: Sequence[str],
    pattern: Any,
    layer: int,
    heads: Sequence[int],
    *,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """One panel per head of ``blocks.{layer}.attn.hook_pattern``: query token (rows) × key token."""
    pat = as_array(pattern, "pattern", 3)
    n = len(heads)
    if pat.shape != (n, len(tokens), len(tokens)):
        raise ValueError(f"pattern has shape {pat.shape}, expected ({n}, {len(tokens)}, {len(tokens)})")
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    size = 1.2 + 0.18 * len(tokens)
    with style():
        fig = new_figure((cols * size + 1.0, rows * size + 0.4))
        axes = fig.subplots(rows, cols, squeeze=False)
        im = None
        for i, ax in enumerate(axes.ravel()):
            if i >= n:
                ax.set_axis_off()
                continue
            im = ax.imshow(pat[i], cmap=cmap(SEQUENTIAL_CMAP), vmin=0.0, vmax=1.0, aspect="equal")
            ax.set_title(f"head {heads[i]}")
            _token_axis(ax, tokens, "x")
            ax.set_xlabel("key token")
            if i % cols == 0:
                _token_axis(ax, tokens, "y")
                ax.set_ylabel("query token")
            else:
                ax.set_yticks([])
        assert im is not None
        fig.colorbar(im, ax=list(axes.ravel()), label="attention probability", shrink=0.8)
        return finish(fig, title or f"blocks.{layer}.attn.hook_pattern", save_to)
