"""Candidate refusal directions for every layer x post-instruction position.

Following Arditi et al. (andyrdt/refusal_direction), a candidate direction is computed at each
layer's ``hook_resid_pre`` and each *post-instruction* position (the chat-template tokens after
the user's instruction, counted from the end of the left-padded prompt).  Methods:

* :func:`diff_of_means` -- ``mu_harmful - mu_harmless``;
* :func:`ridge_direction` -- ``(Sigma_c + lam I)^-1 (mu_r - mu_c)``: a regularised linear
  discriminant that whitens by the compliant-class covariance;
* :func:`weighted_ridge_direction` -- the same with class means / covariance weighted by judge
  confidences (``max(c, 0)`` for refusal, ``max(-c, 0)`` for compliance), as in García-Ferrero
  et al. "Refusal Steering";
* :func:`pca_direction` -- first principal direction of paired differences, sign-aligned with
  the mean difference.

Activations are streamed into :class:`~moe_interp.refusal.stats.StreamingMoments` by
:func:`collect_resid_stats`, so memory does not grow with the number of prompts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from moe_interp.refusal.stats import StreamingMoments

__all__ = [
    "RefusalDirections",
    "diff_of_means",
    "ridge_direction",
    "shrunk_lda_direction",
    "confidence_weights",
    "weighted_moments",
    "weighted_ridge_direction",
    "pca_direction",
    "post_instruction_positions",
    "resid_names",
    "iter_resid_acts",
    "collect_resid_acts",
    "collect_resid_stats",
    "directions_from_stats",
    "orthogonal_to",
]


def orthogonal_to(v: Float[Tensor, "*b d"], ref: Float[Tensor, "*b d"]) -> Float[Tensor, "*b d"]:
    """``v`` minus its component along ``ref``, over the last dimension (a zero ``ref`` leaves ``v``):
    ablating ``ref`` and the result is ablating the plane of ``ref`` and ``v``."""
    u = ref / ref.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return v - (v * u).sum(-1, keepdim=True) * u


# ---------------------------------------------------------------------------- container
@dataclass
class RefusalDirections:
    """Candidate directions ``[n_layers, n_pos, d]`` with the layers / positions they belong to.

    ``layers[i]`` is the model layer of row ``i`` (``blocks.{L}.hook_resid_pre``); ``positions[j]``
    is the (negative) position offset from the end of the prompt of column ``j``.
    """

    candidates: Float[Tensor, "n_layers n_pos d"]
    layers: list[int]
    positions: list[int]
    method: str = "diff_of_means"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.candidates
        if not isinstance(c, Tensor) or c.dim() != 3:
            shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"candidates must be a [n_layers, n_pos, d] tensor, got {shape}")
        self.layers = [int(x) for x in self.layers]
        self.positions = [int(x) for x in self.positions]
        if c.shape[0] != len(self.layers) or c.shape[1] != len(self.positions):
            raise ValueError(
                f"candidates shape {tuple(c.shape)} does not match len(layers)={len(self.layers)} "
                f"x len(positions)={len(self.positions)}"
            )
        if len(set(self.layers)) != len(self.layers) or len(set(self.positions)) != len(self.positions):
            raise ValueError("layers and positions must not contain duplicates")
        if not torch.isfinite(c).all():
            raise ValueError("candidates contain NaN or inf values")

    @property
    def d(self) -> int:
        return int(self.candidates.shape[-1])

    def raw(self, layer: int, pos: int) -> Float[Tensor, " d"]:
        """The un-normalised candidate at model layer ``layer`` and position offset ``pos``."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} not among the candidate layers {self.layers}")
        if pos not in self.positions:
            raise ValueError(f"position {pos} not among the candidate positions {self.positions}")
        return self.candidates[self.layers.index(layer), self.positions.index(pos)]

    def get(self, layer: int, pos: int) -> Float[Tensor, " d"]:
        """Unit-norm direction at model layer ``layer`` and position offset ``pos``."""
        v = self.raw(layer, pos)
        norm = v.norm()
        if norm == 0:
            raise ValueError(f"candidate at layer {layer}, position {pos} is the zero vector")
        return v / norm

    def unit(self) -> Float[Tensor, "n_layers n_pos d"]:
        """All candidates normalised to unit norm (zero vectors stay zero)."""
        n = self.candidates.norm(dim=-1, keepdim=True)
        return self.candidates / torch.where(n == 0, torch.ones_like(n), n)

    def norms(self) -> Float[Tensor, "n_layers n_pos"]:
        """Norm of each raw candidate (e.g. the size of the mean difference)."""
        return self.candidates.norm(dim=-1)


# ---------------------------------------------------------------------------- methods
def _check_pair(a: StreamingMoments, b: StreamingMoments, names: tuple[str, str]) -> None:
    for x, nm in zip((a, b), names, strict=True):
        if not isinstance(x, StreamingMoments):
            raise ValueError(f"{nm} must be a StreamingMoments, got {type(x).__name__}")
        if x.weight_sum <= 0:
            raise ValueError(f"{nm} has no (positively weighted) samples")
    if (a.sites, a.d) != (b.sites, b.d):
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same sites and d, got {a.sites}+({a.d},) and {b.sites}+({b.d},)"
        )


def diff_of_means(harmful: StreamingMoments, harmless: StreamingMoments) -> Float[Tensor, "*sites d"]:
    """``mean(harmful) - mean(harmless)`` per site (float64)."""
    _check_pair(harmful, harmless, ("harmful", "harmless"))
    return harmful.mean - harmless.mean


def _ridge_solve(mu_diff: Tensor, cov: Tensor, lam: float) -> Tensor:
    if not lam >= 0:
        raise ValueError(f"lam must be a non-negative float, got {lam}")
    d = mu_diff.shape[-1]
    a = cov.to(torch.float64) + float(lam) * torch.eye(d, dtype=torch.float64, device=cov.device)
    v = torch.linalg.solve(a, mu_diff.to(torch.float64).unsqueeze(-1)).squeeze(-1)
    if not torch.isfinite(v).all():
        raise ValueError("ridge solve produced non-finite values; increase lam")
    return v


def ridge_direction(
    refusal_stats: StreamingMoments, compliant_stats: StreamingMoments, lam: float = 1.0
) -> Float[Tensor, "*sites d"]:
    """``(Sigma_c + lam I)^-1 (mu_r - mu_c)`` per site, float64.

    ``Sigma_c`` is the population covariance of ``compliant_stats`` (needs ``track_cov=True``).
    With ``lam -> inf`` the direction tends to ``(mu_r - mu_c) / lam``: diff-of-means.
    """
    _check_pair(refusal_stats, compliant_stats, ("refusal_stats", "compliant_stats"))
    if not compliant_stats.track_cov:
        raise ValueError("compliant_stats must be built with track_cov=True for a ridge direction")
    return _ridge_solve(refusal_stats.mean - compliant_stats.mean, compliant_stats.cov, lam)


def shrunk_lda_direction(
    mu_diff: Float[Tensor, " d"], groups: Sequence[Float[Tensor, "_n d"]], shrinkage: float
) -> Float[Tensor, " d"]:
    """``(S_w + s·mean(diag S_w)·I)^-1 mu_diff``, float64: a linear discriminant with shrinkage ``s``.

    ``S_w`` is the pooled within-group covariance (each group centred on its own mean), so directions along
    which the groups differ from one another are not penalised, only the spread inside each group. The
    shrinkage is relative to the mean variance (``s -> inf``: the direction of ``mu_diff`` itself, which is also
    the answer when nothing varies inside the groups, e.g. every prompt ending on the same token at layer 0).
    """
    if not shrinkage > 0:
        raise ValueError(f"shrinkage must be a positive float, got {shrinkage}")
    if len(groups) == 0 or any(g.dim() != 2 or g.shape[0] < 1 for g in groups):
        raise ValueError("groups must be a non-empty sequence of [n, d] tensors with n >= 1")
    x = torch.cat([g.to(torch.float64) - g.to(torch.float64).mean(0) for g in groups])
    cov = x.T @ x / x.shape[0]
    scale = float(cov.diagonal().mean())
    if scale <= 0:
        return mu_diff.to(torch.float64)
    return _ridge_solve(mu_diff, cov, shrinkage * scale)


def confidence_weights(confidences: Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample (refusal, compliance) weights ``(max(c, 0), max(-c, 0))`` from confidences in [-1, 1]."""
    c = torch.as_tensor(confidences, dtype=torch.float64).reshape(-1)
    if c.numel() == 0 or not torch.isfinite(c).all():
        raise ValueError("confidences must be a non-empty sequence of finite floats in [-1, 1]")
    if (c.abs() > 1 + 1e-9).any():
        raise ValueError("confidences must lie in [-1, 1]")
    return c.clamp(min=0), (-c).clamp(min=0)


def weighted_moments(
    acts: Float[Tensor, "batch *sites d"],
    confidences: Sequence[float] | Tensor,
    track_cov: bool = True,
    into: tuple[StreamingMoments, StreamingMoments] | None = None,
) -> tuple[StreamingMoments, StreamingMoments]:
    """Confidence-weighted (refusal, compliant) moments of ``acts``; pass ``into`` to stream batches."""
    if not isinstance(acts, Tensor) or acts.dim() < 2:
        raise ValueError("acts must be a tensor of shape [batch, *sites, d]")
    w_r, w_c = confidence_weights(confidences)
    if w_r.shape[0] != acts.shape[0]:
        raise ValueError(f"confidences must have one value per sample ({acts.shape[0]}), got {w_r.shape[0]}")
    if into is None:
        sites, d = tuple(acts.shape[1:-1]), int(acts.shape[-1])
        into = (StreamingMoments(sites, d, track_cov=False), StreamingMoments(sites, d, track_cov=track_cov))
    ref, comp = into
    ref.update(acts, w_r)
    comp.update(acts, w_c)
    return ref, comp


def weighted_ridge_direction(
    acts: Float[Tensor, "batch *sites d"], confidences: Sequence[float] | Tensor, lam: float = 1.0
) -> Float[Tensor, "*sites d"]:
    """Ridge direction with class statistics weighted by judge confidences.

    Refusal mean uses weights ``max(c, 0)``; compliant mean and covariance use ``max(-c, 0)``.
    For batches too large for memory, stream with :func:`weighted_moments` (``into=``) and call
    :func:`ridge_direction` on the result.
    """
    ref, comp = weighted_moments(acts, confidences, track_cov=True)
    if ref.weight_sum <= 0 or comp.weight_sum <= 0:
        raise ValueError("weighted ridge needs at least one sample with c > 0 and one with c < 0")
    return ridge_direction(ref, comp, lam)


def pca_direction(
    harmful: Float[Tensor, "batch *sites d"], harmless: Float[Tensor, "batch *sites d"], center: bool = False
) -> Float[Tensor, "*sites d"]:
    """Unit first principal direction of paired differences ``harmful_i - harmless_i`` per site.

    By default the differences are *not* centred, so the direction maximises the mean squared
    projection of the differences (it contains the mean shift); ``center=True`` gives classical
    PCA of the differences' variation.  The sign is chosen so the direction has a non-negative
    dot product with the mean difference.
    """
    if not isinstance(harmful, Tensor) or not isinstance(harmless, Tensor):
        raise ValueError("harmful and harmless must be tensors of shape [batch, *sites, d]")
    if harmful.shape != harmless.shape or harmful.dim() < 2:
        raise ValueError(
            f"harmful and harmless must be paired [batch, *sites, d] tensors of equal shape, "
            f"got {tuple(harmful.shape)} and {tuple(harmless.shape)}"
        )
    if harmful.shape[0] < (2 if center else 1):
        raise ValueError(f"pca_direction needs at least {2 if center else 1} pairs, got {harmful.shape[0]}")
    diffs = harmful.to(torch.float64) - harmless.to(torch.float64)
    if not torch.isfinite(diffs).all():
        raise ValueError("activations contain NaN or inf values")
    mean = diffs.mean(0)
    x = diffs - mean if center else diffs
    x = x.movedim(0, -2)  # [*sites, batch, d]
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    v = vh[..., 0, :]
    sign = torch.where((v * mean).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(v.dtype)
    return v * sign


# ---------------------------------------------------------------------------- collection
def resid_names(layers: Sequence[int]) -> list[str]:
    """Hook names ``blocks.{L}.hook_resid_pre`` for the given layers."""
    return [f"blocks.{int(L)}.hook_resid_pre" for L in layers]


def _encode_ids(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        enc = tokenizer(text, add_special_tokens=False)
        return list(enc["input_ids"]), None


def post_instruction_positions(model: Any, instruction: str = "Tell me about the weather today") -> list[int]:
    """Negative offsets of the chat-template tokens after the instruction, e.g. ``[-5, ..., -1]``.

    Formats a dummy instruction with ``model.format_chat`` and counts the tokens that start at or
    after the end of the instruction text (via offset mappings; falls back to comparing the token
    counts of the full prompt and of the prompt cut at the instruction's end).
    """
    formatted = model.format_chat([instruction])[0]
    end = formatted.rfind(instruction)
    if end < 0:
        raise ValueError("format_chat output does not contain the instruction text")
    end += len(instruction)
    ids, offsets = _encode_ids(model.tokenizer, formatted)
    if offsets is not None and len(offsets) == len(ids):
        # last token overlapping the instruction text; everything after it is template
        inside = [i for i, (s, e) in enumerate(offsets) if s < end and e > s]
        n_after = len(ids) - (inside[-1] + 1) if inside else 0
    else:
        prefix_ids, _ = _encode_ids(model.tokenizer, formatted[:end])
        n_after = len(ids) - len(prefix_ids)
    if n_after <= 0:
        raise ValueError("the chat template adds no tokens after the instruction; pass positions explicitly")
    return list(range(-n_after, 0))


def _resolve(
    model: Any, prompts: Sequence[str], layers: Sequence[int] | None, positions: Sequence[int] | None
):
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty sequence of str")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must contain only str")
    n_layers = int(model.spec.n_layers)
    layers = list(range(n_layers)) if layers is None else [int(L) for L in layers]
    if not layers or any(not 0 <= L < n_layers for L in layers):
        raise ValueError(f"layers must be a non-empty list of ints in [0, {n_layers}), got {layers}")
    positions = post_instruction_positions(model) if positions is None else [int(p) for p in positions]
    if not positions or any(p >= 0 for p in positions):
        raise ValueError(
            f"positions must be a non-empty list of negative offsets from the end, got {positions}"
        )
    return list(prompts), layers, positions


def iter_resid_acts(
    model: Any,
    prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Iterator[Float[Tensor, "batch n_layers n_pos d"]]:
    """Yield residual activations ``[batch, n_layers, n_pos, d]`` (float32, CPU) batch by batch."""
    prompts, layers, positions = _resolve(model, prompts, layers, positions)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    names = resid_names(layers)
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc="resid acts", disable=not progress, total=len(starts)):
        batch = prompts[s : s + batch_size]
        with torch.no_grad():
            _, cache = model.run_with_cache(batch, names=names, positions=positions, return_type=None)
        per_layer = []
        for nm in names:
            t = cache[nm]
            if t.shape[1] != len(positions):  # full sequence returned: select the positions
                t = t[:, positions]
            per_layer.append(t.detach().float().cpu())
        yield torch.stack(per_layer, dim=1)


def collect_resid_acts(
    model: Any,
    prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Float[Tensor, "batch n_layers n_pos d"]:
    """All residual activations ``[n_prompts, n_layers, n_pos, d]`` (for PCA / weighted ridge)."""
    return torch.cat(list(iter_resid_acts(model, prompts, layers, positions, batch_size, progress)))


def collect_resid_stats(
    model: Any,
    prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    track_cov: bool = False,
    weights: Sequence[float] | Tensor | None = None,
    progress: bool = True,
) -> StreamingMoments:
    """Stream ``hook_resid_pre`` activations at ``layers`` x ``positions`` into moments.

    ``positions`` are negative offsets from the end of the (left-padded, chat-formatted) prompt;
    default :func:`post_instruction_positions`.  The result has sites ``[n_layers, n_pos]``; the
    layers / positions used are stored in ``.meta["layers"]`` / ``.meta["positions"]``.
    """
    prompts, layers, positions = _resolve(model, prompts, layers, positions)
    w = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.shape[0] != len(prompts):
            raise ValueError(f"weights must have one value per prompt ({len(prompts)}), got {w.shape[0]}")
    stats = StreamingMoments((len(layers), len(positions)), int(model.spec.d_model), track_cov=track_cov)
    s = 0
    for acts in iter_resid_acts(model, prompts, layers, positions, batch_size, progress):
        b = acts.shape[0]
        stats.update(acts, None if w is None else w[s : s + b])
        s += b
    stats.meta.update(layers=layers, positions=positions)
    return stats


def directions_from_stats(
    harmful: StreamingMoments,
    harmless: StreamingMoments,
    method: str = "diff_of_means",
    lam: float = 1.0,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> RefusalDirections:
    """Build :class:`RefusalDirections` from ``[n_layers, n_pos]``-site moments.

    ``method`` is ``"diff_of_means"`` or ``"ridge"`` (``harmless`` needs ``track_cov=True``).
    ``layers`` / ``positions`` default to ``harmful.meta`` as set by :func:`collect_resid_stats`.
    """
    if len(harmful.sites) != 2:
        raise ValueError(f"moments must have sites [n_layers, n_pos], got {harmful.sites}")
    layers = list(harmful.meta.get("layers", [])) if layers is None else list(layers)
    positions = list(harmful.meta.get("positions", [])) if positions is None else list(positions)
    if method == "diff_of_means":
        cand = diff_of_means(harmful, harmless)
    elif method == "ridge":
        cand = ridge_direction(harmful, harmless, lam)
    else:
        raise ValueError(f"method must be 'diff_of_means' or 'ridge', got {method!r}")
    meta = {"lam": lam} if method == "ridge" else {}
    return RefusalDirections(cand.float(), layers, positions, method=method, meta=meta)
