"""Patching figures: layer × position / head / expert heatmaps and attribution vs exhaustive patching.

Each function takes a :class:`~moe_interp.patching.activation.PatchingResult` (or, for the expert heatmap,
an :class:`~moe_interp.patching.ablation.ExpertAblationResult`) or a plain array / tensor; from a result
the hook, position labels and metric label are read off it unless given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from matplotlib.figure import Figure

from moe_interp.figures.heatmap import draw_heatmap, heatmap_size, numbered_heatmap
from moe_interp.figures.inputs import (
    as_array,
    check_same_shape,
    clean_token,
    full_hook,
    is_instance,
    tick_positions,
)
from moe_interp.figures.style import GREY, OKABE_ITO, finish, new_figure, style
from moe_interp.refusal import stats

if TYPE_CHECKING:
    from moe_interp.patching.ablation import ExpertAblationResult
    from moe_interp.patching.activation import PatchingResult

__all__ = [
    "DEFAULT_RECOVERY_LABEL",
    "RISK_DIFF_LABEL",
    "plot_attribution_vs_exhaustive",
    "plot_expert_heatmap",
    "plot_layer_head_heatmap",
    "plot_layer_position_heatmap",
]

DEFAULT_RECOVERY_LABEL = "normalised refusal-score recovery (1 = clean)"
RISK_DIFF_LABEL = "routing risk difference\nP(sel | harmful) − P(sel | harmless)"
_NORMALISED_LABEL = "normalised metric (patched − corrupt)/(clean − corrupt); 1 = clean"
_PATCHING = ("moe_interp.patching.activation", "PatchingResult")


def _unpack(effects: Any, metric_label: str | None) -> tuple[Any, PatchingResult | None, str]:
    """(values, the PatchingResult or None, metric label) of a result or a plain array."""
    if is_instance(effects, *_PATCHING):
        label = _NORMALISED_LABEL if effects.normalized else "metric value (patched run)"
        return effects.values, effects, metric_label or label
    return effects, None, metric_label or DEFAULT_RECOVERY_LABEL


def plot_layer_position_heatmap(
    effects: PatchingResult | Any,
    position_labels: Sequence[str] | None = None,
    hook_template: str | None = None,
    metric_label: str | None = None,
    *,
    vmax: float | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Activation-patching heatmap: y = layer (0 at bottom), x = token position labelled by token.

    ``effects`` is a ``[n_layers, n_pos]`` result or array; ``position_labels`` (token strings) must have
    length ``n_pos``. The diverging scale is centred at 0 and symmetric (``vmax`` overrides it).
    """
    values, res, metric_label = _unpack(effects, metric_label)
    if res is not None:
        position_labels = position_labels or res.position_labels or None
        hook_template = hook_template or res.hook
    hook_template = hook_template or "blocks.{L}.hook_resid_pre"
    data = as_array(values, "effects", 2)
    n_layers, n_pos = data.shape
    if position_labels is not None and len(position_labels) != n_pos:
        raise ValueError(
            f"position_labels has {len(position_labels)} entries but effects has {n_pos} positions "
            f"(shape {data.shape})"
        )
    with style():
        fig = new_figure(heatmap_size(n_layers, n_pos, extra_w=1.0))
        ax = fig.add_subplot()
        draw_heatmap(ax, data, fig, vmax=vmax, cbar_label=metric_label)
        if position_labels is not None:
            ax.set_xticks(
                np.arange(n_pos),
                [clean_token(str(t)) for t in position_labels],
                rotation=90 if n_pos > 6 else 0,
                fontsize=8 if n_pos <= 40 else 6,
            )
        else:
            xt = tick_positions(n_pos)
            ax.set_xticks(xt, [str(i) for i in xt])
        ax.set_xlabel("token position")
        ax.set_ylabel(f"layer L  ({hook_template})")
        return finish(fig, title, save_to)


def plot_layer_head_heatmap(
    effects: PatchingResult | Any,
    hook: str | None = None,
    metric_label: str | None = None,
    *,
    vmax: float | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Per-head patching heatmap: y = layer, x = head; ``effects`` is ``[n_layers, n_heads]``.

    A result with a trailing position axis is averaged over positions. ``hook`` may be relative
    (``"attn.hook_z"``) or a full template (``"blocks.{L}.attn.hook_z"``).
    """
    values, res, metric_label = _unpack(effects, metric_label)
    if res is not None:
        hook = hook or res.hook
        if values.ndim == 3:
            values = values.mean(-1)
    data = as_array(values, "effects", 2)
    full = full_hook(hook or "attn.hook_z")
    return numbered_heatmap(data, f"head H  ({full}[:, :, H])", metric_label, vmax, title, save_to)


def plot_expert_heatmap(
    effects: PatchingResult | ExpertAblationResult | Any,
    routing_risk_diff: Any | None = None,
    metric_label: str | None = None,
    *,
    hook_template: str | None = None,
    vmax: float | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Layer × expert effect heatmap; with ``routing_risk_diff`` a second panel (shared y) shows
    P(selected | harmful) − P(selected | harmless) per expert. Both are ``[n_layers, n_experts]``.
    """
    if is_instance(effects, "moe_interp.patching.ablation", "ExpertAblationResult"):
        ablation = cast("ExpertAblationResult", effects)
        values = ablation.effect
        metric_label = metric_label or f"Δ refusal score, log-odds (ablate, mode={ablation.mode})"
    else:
        values, res, metric_label = _unpack(effects, metric_label)
        if res is not None:
            hook_template = hook_template or res.hook
    hook_template = hook_template or "blocks.{L}.mlp.experts.{e}.hook_out"
    data = as_array(values, "effects", 2)
    rd = None
    if routing_risk_diff is not None:
        rd = as_array(routing_risk_diff, "routing_risk_diff", 2)
        check_same_shape(data, rd, "effects", "routing_risk_diff")
        if np.nanmax(np.abs(rd)) > 1.0 + 1e-9:
            raise ValueError("routing_risk_diff: a difference of probabilities must lie in [-1, 1]")
    n_layers, n_exp = data.shape
    w, h = heatmap_size(n_layers, n_exp, extra_w=1.0)
    with style():
        fig = new_figure((w if rd is None else min(2 * w - 0.5, 14.0), h))
        axes = fig.subplots(1, 1 if rd is None else 2, sharey=True, squeeze=False)[0]
        draw_heatmap(axes[0], data, fig, vmax=vmax, cbar_label=metric_label)
        axes[0].set_title("expert effect")
        if rd is not None:
            draw_heatmap(axes[1], rd, fig, cbar_label=RISK_DIFF_LABEL)
            axes[1].set_title("routing risk difference")
        xt = tick_positions(n_exp, 32)
        for ax in axes:
            ax.set_xticks(xt, [str(i) for i in xt])
            ax.set_xlabel(f"expert e  ({hook_template})")
        axes[0].set_ylabel("layer L")
        return finish(fig, title, save_to)


def _fmt_corr(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _scatter_values(x: Any, name: str, mask: Any | None) -> tuple[np.ndarray, str | None, bool | None]:
    """Flat values of a result (selected by ``mask``) or a 1-D array, the result's hook, and whether it is
    normalised (None for an array: the default label assumes it)."""
    hook, normalized = None, None
    if is_instance(x, *_PATCHING):
        hook, normalized, x = x.hook, bool(x.normalized), x.values
        x = x[mask] if mask is not None else x.flatten()
    elif mask is not None:
        raise ValueError(f"mask: only applies to PatchingResult inputs, {name} is an array")
    return as_array(x, name, 1), hook, normalized


def _scatter_unit(normalized: bool | None) -> str:
    return "(normalised recovery, 1 = clean)" if normalized in (None, True) else "(metric value, patched run)"


def plot_attribution_vs_exhaustive(
    attrib: PatchingResult | Any,
    exhaustive: PatchingResult | Any,
    labels: Sequence[str] | None = None,
    spearman: float | None = None,
    *,
    mask: Any | None = None,
    pearson: float | None = None,
    n_annotate: int = 5,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    save_to: str | Path | None = None,
) -> Figure:
    """Scatter of attribution estimates vs exhaustive patching effects with a y = x reference.

    Results are flattened (or selected by the boolean ``mask``). Spearman ρ
    (:func:`moe_interp.refusal.stats.spearman`) and Pearson r are computed when not given (NaN pairs
    dropped). With ``labels`` the ``n_annotate`` components of largest |exhaustive| effect are annotated.
    """
    a, hook_a, norm_a = _scatter_values(attrib, "attrib", mask)
    e, hook_e, norm_e = _scatter_values(exhaustive, "exhaustive", mask)
    check_same_shape(a, e, "attrib", "exhaustive")
    if labels is not None and len(labels) != len(a):
        raise ValueError(f"labels has {len(labels)} entries but attrib/exhaustive have {len(a)}")
    ok = np.isfinite(a) & np.isfinite(e)
    if not ok.any():
        raise ValueError("attrib/exhaustive: no component has finite values in both arrays")
    a_ok, e_ok = a[ok], e[ok]
    rho = stats.spearman(a_ok, e_ok) if spearman is None else spearman
    r = stats.pearson(a_ok, e_ok) if pearson is None else pearson
    hook = hook_e or hook_a
    where = f", {hook}" if hook else ""
    with style():
        fig = new_figure((4.8, 4.4))
        ax = fig.add_subplot()
        lo, hi = float(min(a_ok.min(), e_ok.min())), float(max(a_ok.max(), e_ok.max()))
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
            label=f"components (n = {int(ok.sum())})\nSpearman ρ = {_fmt_corr(rho)}, Pearson r = {_fmt_corr(r)}",
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
                    clean_token(str(labels[i])),
                    (a[i], e[i]),
                    xytext=(4, 4 if k % 2 == 0 else -9),
                    textcoords="offset points",
                    fontsize=7,
                    color="#333333",
                )
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel(xlabel or f"attribution-patching estimate{where}\n{_scatter_unit(norm_a)}")
        ax.set_ylabel(ylabel or f"exhaustive activation patching{where}\n{_scatter_unit(norm_e)}")
        ax.legend(loc="upper left")
        return finish(fig, title, save_to)
