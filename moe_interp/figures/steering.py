"""Steering figures: metrics vs steering strength, and a grouped comparison of steering methods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moe_interp.figures.inputs import as_array, to_numpy
from moe_interp.figures.style import categorical_colours, finish, new_figure, style

__all__ = ["MARKERS", "plot_coefficient_sweep", "plot_method_comparison"]

#: Marker per series, so lines stay apart in greyscale and for any colour vision.
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h"]


def _series(d: Mapping[str, Any], what: str, n: int) -> dict[str, np.ndarray]:
    out = {}
    for k, v in d.items():
        arr = as_array(v, f"{what}[{k!r}]", 1)
        if arr.shape[0] != n:
            raise ValueError(f"{what}[{k!r}] has {arr.shape[0]} values but coeffs has {n}")
        out[k] = arr
    return out


def plot_coefficient_sweep(
    coeffs: Any,
    series: Mapping[str, Any],
    ylabel: str = "refusal rate (fraction of prompts)",
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
    x = as_array(coeffs, "coeffs", 1, allow_nan=False)
    if not series:
        raise ValueError("series: empty, nothing to plot")
    prim = _series(series, "series", len(x))
    sec = _series(secondary, "secondary", len(x)) if secondary else {}
    bands: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k, (lo, hi) in (series_ci or {}).items():
        if k not in prim:
            raise ValueError(f"series_ci[{k!r}] has no matching series")
        lo_a, hi_a = as_array(lo, f"series_ci[{k!r}] lo", 1), as_array(hi, f"series_ci[{k!r}] hi", 1)
        if lo_a.shape != x.shape or hi_a.shape != x.shape:
            raise ValueError(f"series_ci[{k!r}]: bounds must have {x.shape[0]} values")
        bands[k] = (lo_a, hi_a)
    order = np.argsort(x, kind="stable")
    colours = categorical_colours(len(prim) + len(sec))
    with style():
        fig = new_figure((5.4, 3.6))
        ax = fig.add_subplot()
        handles = []
        for i, (k, y) in enumerate(prim.items()):
            if k in bands:
                lo_b, hi_b = bands[k]
                ax.fill_between(x[order], lo_b[order], hi_b[order], color=colours[i], alpha=0.2, lw=0)
            (ln,) = ax.plot(x[order], y[order], marker=MARKERS[i % len(MARKERS)], color=colours[i], label=k)
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
                    marker=MARKERS[i % len(MARKERS)],
                    ls="--",
                    color=colours[i],
                    label=f"{k} (right axis)",
                )
                handles.append(ln)
            ax2.set_ylabel(secondary_ylabel)
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(handles), 3))
        return finish(fig, title, save_to)


def plot_method_comparison(
    methods: Sequence[str],
    metrics: Mapping[str, Any],
    cis: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    *,
    ylabel: str = "refusal rate (fraction of prompts)",
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
        arr = as_array(v, f"metrics[{k!r}]", 1)
        if arr.shape[0] != n:
            raise ValueError(f"metrics[{k!r}] has {arr.shape[0]} values but there are {n} methods")
        vals[k] = arr
    errs: dict[str, np.ndarray] = {}
    for k, ci in (cis or {}).items():
        if k not in vals:
            raise ValueError(f"cis[{k!r}] has no matching metric")
        ci_a = to_numpy(ci, f"cis[{k!r}]")
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
    colours = categorical_colours(m)
    with style():
        fig = new_figure((min(max(4.5, 1.0 + 0.35 * n * m + 0.6 * n), 14.0), 3.8))
        ax = fig.add_subplot()
        for i, (k, v) in enumerate(vals.items()):
            bars = ax.bar(
                xs + (i - (m - 1) / 2) * width,
                v,
                width=width * 0.92,
                color=colours[i],
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
        return finish(fig, title, save_to)
