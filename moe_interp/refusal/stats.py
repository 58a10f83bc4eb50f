"""Streaming (single-pass, constant-memory) mean and covariance of activation vectors.

Refusal directions are built from per-class means (and, for ridge directions, covariances) of
residual-stream activations at every layer x position.  Holding all activations of thousands of
prompts is wasteful, so :class:`StreamingMoments` accumulates the sufficient statistics batch by
batch with the parallel (Chan et al.) update in float64, optionally with per-sample weights.

Conventions
-----------
* ``update(x)`` takes ``x`` of shape ``[batch, *sites, d]``: a leading batch axis, then any number
  of "site" axes (e.g. ``[n_layers, n_positions]``), then the feature axis ``d``.
* Weights are *reliability* weights (non-negative, any scale).  With all weights equal to one the
  statistics are the usual unweighted ones.
* :attr:`StreamingMoments.cov` is the **population** covariance ``M2 / W`` (``W`` = sum of weights);
  :meth:`StreamingMoments.covariance` with ``unbiased=True`` divides by ``W - sum(w^2) / W`` instead,
  which equals ``n - 1`` for unit weights and matches ``numpy.cov(..., aweights=w)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["StreamingMoments", "average_ranks", "bootstrap_ci", "pearson", "spearman"]


class StreamingMoments:
    """Running (weighted) mean, variance and optionally covariance over a grid of sites.

    Args:
        sites: shape of the site grid, e.g. ``(n_layers, n_positions)``; ``()`` or an ``int``
            is accepted too.
        d: feature dimension.
        track_cov: also accumulate the full ``d x d`` covariance per site (memory
            ``prod(sites) * d^2 * 8`` bytes); otherwise only the mean and per-feature variance.
    """

    def __init__(self, sites: Sequence[int] | int, d: int, track_cov: bool = False) -> None:
        sites_t = (int(sites),) if isinstance(sites, int) else tuple(int(s) for s in sites)
        if any(s <= 0 for s in sites_t):
            raise ValueError(f"sites must be positive sizes, got {sites_t}")
        if int(d) <= 0:
            raise ValueError(f"d must be a positive int, got {d}")
        self.sites: tuple[int, ...] = sites_t
        self.d: int = int(d)
        self.track_cov: bool = bool(track_cov)
        self.meta: dict[str, Any] = {}  # free-form labels, e.g. layers / positions of the sites
        self._n: int = 0
        self._w: float = 0.0  # sum of weights
        self._w2: float = 0.0  # sum of squared weights
        self._mean = torch.zeros(*sites_t, self.d, dtype=torch.float64)
        self._m2_diag = torch.zeros(*sites_t, self.d, dtype=torch.float64)
        self._m2: Tensor | None = (
            torch.zeros(*sites_t, self.d, self.d, dtype=torch.float64) if self.track_cov else None
        )

    # ------------------------------------------------------------------ update
    def update(
        self, x: Float[Tensor, "batch *sites d"], weights: Float[Tensor, " batch"] | None = None
    ) -> None:
        """Fold a batch of vectors (optionally weighted) into the running statistics."""
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor of shape [batch, *{self.sites}, {self.d}]")
        expected = (*self.sites, self.d)
        if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape [batch, {', '.join(map(str, expected))}], got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return
        x = x.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf values")
        b = x.shape[0]
        if weights is None:
            w = torch.ones(b, dtype=torch.float64)
        else:
            w = torch.as_tensor(weights).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            if w.shape[0] != b:
                raise ValueError(
                    f"weights must have shape [batch]=[{b}], got {tuple(torch.as_tensor(weights).shape)}"
                )
            if not torch.isfinite(w).all() or (w < 0).any():
                raise ValueError("weights must be finite and non-negative")
        wb = float(w.sum())
        self._n += b
        if wb == 0.0:
            return
        wshape = (b,) + (1,) * (x.dim() - 1)
        wv = w.reshape(wshape)
        mean_b = (wv * x).sum(0) / wb
        xc = x - mean_b
        m2d_b = (wv * xc * xc).sum(0)
        m2_b = torch.einsum("b...i,b...j->...ij", wv * xc, xc) if self._m2 is not None else None

        w_old = self._w
        w_new = w_old + wb
        delta = mean_b - self._mean
        self._mean += delta * (wb / w_new)
        f = w_old * wb / w_new
        self._m2_diag += m2d_b + delta * delta * f
        if self._m2 is not None and m2_b is not None:
            self._m2 += m2_b + delta.unsqueeze(-1) * delta.unsqueeze(-2) * f
        self._w = w_new
        self._w2 += float((w * w).sum())

    def merge(self, other: StreamingMoments) -> None:
        """Fold another accumulator (same sites, d, cov tracking) into this one (parallel update)."""
        if (other.sites, other.d) != (self.sites, self.d):
            raise ValueError(
                f"cannot merge moments of shape {other.sites}+({other.d},) into {self.sites}+({self.d},)"
            )
        if self.track_cov and not other.track_cov:
            raise ValueError("cannot merge moments without covariance into one that tracks covariance")
        self._n += other._n
        if other._w == 0.0:
            return
        w_new = self._w + other._w
        delta = other._mean - self._mean
        f = self._w * other._w / w_new
        self._mean += delta * (other._w / w_new)
        self._m2_diag += other._m2_diag + delta * delta * f
        if self._m2 is not None and other._m2 is not None:
            self._m2 += other._m2 + delta.unsqueeze(-1) * delta.unsqueeze(-2) * f
        self._w = w_new
        self._w2 += other._w2

    # --------------------------------------------------------------- accessors
    @property
    def n(self) -> int:
        """Number of samples seen (including zero-weight ones)."""
        return self._n

    @property
    def weight_sum(self) -> float:
        """Sum of sample weights (equals :attr:`n` when unweighted)."""
        return self._w

    def _require_data(self) -> None:
        if self._w <= 0.0:
            raise ValueError("no (positively weighted) samples have been accumulated yet")

    @property
    def mean(self) -> Float[Tensor, "*sites d"]:
        """Weighted mean per site, float64."""
        self._require_data()
        return self._mean.clone()

    def _denominator(self, unbiased: bool) -> float:
        self._require_data()
        if not unbiased:
            return self._w
        denom = self._w - self._w2 / self._w
        if denom <= 0.0:
            raise ValueError("unbiased covariance needs at least two samples with positive weight")
        return denom

    def variance(self, unbiased: bool = False) -> Float[Tensor, "*sites d"]:
        """Per-feature variance (diagonal of the covariance); population unless ``unbiased``."""
        return self._m2_diag / self._denominator(unbiased)

    def covariance(self, unbiased: bool = False) -> Float[Tensor, "*sites d d"]:
        """Full covariance per site; population (``/W``) unless ``unbiased`` (``/(W - sum w^2 / W)``)."""
        if self._m2 is None:
            raise ValueError("covariance was not tracked: construct StreamingMoments(..., track_cov=True)")
        return self._m2 / self._denominator(unbiased)

    @property
    def var(self) -> Float[Tensor, "*sites d"]:
        """Population per-feature variance."""
        return self.variance(unbiased=False)

    @property
    def cov(self) -> Float[Tensor, "*sites d d"]:
        """Population covariance (divides by the weight sum); see :meth:`covariance`."""
        return self.covariance(unbiased=False)

    def __repr__(self) -> str:
        return f"StreamingMoments(sites={self.sites}, d={self.d}, track_cov={self.track_cov}, n={self._n})"


def bootstrap_ci(
    values: Tensor | Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, dim: int = -1
) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap ``(1 − alpha)`` CI of the mean over ``dim`` (resampling that dim), float64.

    Returns ``(lo, hi)`` with the other dimensions kept (0-d tensors for a 1-D input). The one bootstrap
    used by every module (evaluation, patching, ablation sweeps, circuits, steering comparisons).
    """
    x = torch.as_tensor(values, dtype=torch.float64)
    if x.numel() == 0:
        raise ValueError("bootstrap_ci needs at least one value, got none.")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"alpha must be in (0, 1) and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}.")
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    means = x[..., idx].mean(-1)  # [..., n_boot]
    return torch.quantile(means, alpha / 2, dim=-1), torch.quantile(means, 1 - alpha / 2, dim=-1)


def _as_vector(values: Any) -> np.ndarray:
    x = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    return x.reshape(-1) if x.ndim else x.reshape(1)


def average_ranks(values: Any) -> np.ndarray:
    """Ranks 0..n-1 of a 1-D array, ties sharing their mean rank (like ``scipy.stats.rankdata`` minus one)."""
    x = _as_vector(values)
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0, counts)
    return ranks


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation of two equally long sequences; NaN when either is constant or shorter than 2."""
    a, b = _as_vector(x), _as_vector(y)
    if a.shape != b.shape:
        raise ValueError(f"pearson needs two sequences of equal length, got {a.size} and {b.size}.")
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float(np.clip((a @ b) / np.sqrt((a @ a) * (b @ b)), -1.0, 1.0))


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation (Pearson of average ranks): the library's one rank correlation."""
    a, b = _as_vector(x), _as_vector(y)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two sequences of equal length, got {a.size} and {b.size}.")
    return pearson(average_ranks(a), average_ranks(b))
