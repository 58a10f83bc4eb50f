"""Fitting steering from prompts: shared helpers and the residual-stream methods.

Every ``fit_*`` function takes ``(model, harmful, harmless, **kw)`` and returns a
:class:`~moe_interp.steering.protocol.Steering` object; :mod:`moe_interp.steering.registry` lists them with
the data each needs. This module holds the residual-stream methods:

* ``dense`` / ``dense_multi`` — residual-stream difference of means (Arditi et al.), one layer or several;
  a negative coefficient removes refusal.
* ``ridge`` — ridge / confidence-weighted ridge directions, layers chosen by the correlation between
  the projection and the refusal confidence ("Refusal Steering", García-Ferrero et al.).
* ``topic_remove`` / ``topic_induce`` / ``topic_gated`` — fine-grained control: a topic direction
  (topic − harmless) made orthogonal to the safety direction (``keep`` − harmless), removed or added, or a
  ``dense_multi`` removal applied only where a topic detector fires.

The expert and router methods are in :mod:`moe_interp.steering.fit_experts`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.interventions import check_coeff
from moe_interp.refusal.directions import orthogonal_to
from moe_interp.refusal.evaluate import refusal_scores
from moe_interp.steering.edits import TopicGatedSteering
from moe_interp.steering.keys import SteeringKey
from moe_interp.steering.metadata import SteeringMetadata
from moe_interp.steering.vectors import SteeringVectors

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = [
    "check_prompt_list",
    "data_hash",
    "fit_dense",
    "fit_dense_multi",
    "fit_metadata",
    "fit_ridge",
    "fit_topic_gate",
    "fit_topic_gated",
    "fit_topic_induce",
    "fit_topic_remove",
    "mean_activations",
    "resid_acts",
]


# ------------------------------------------------------------------------------------------ helpers


def check_prompt_list(prompts: Any, what: str) -> list[str]:
    """A non-empty list of strings, or ``ValueError`` naming ``what``."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"{what} must be a non-empty list of strings.")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must contain only strings.")
    return list(prompts)


def data_hash(*prompt_sets: Sequence[str]) -> str:
    """Short sha256 of the training prompts (provenance for :class:`SteeringMetadata`)."""
    return hashlib.sha256(json.dumps([list(p) for p in prompt_sets]).encode()).hexdigest()[:16]


def subsample(prompts: list[str], n_max: int | None) -> list[str]:
    """The first ``n_max`` prompts (all of them for ``None``)."""
    return prompts if n_max is None or len(prompts) <= n_max else prompts[:n_max]


def require_moe(model: MoEModel, method: str) -> None:
    """``ValueError`` unless ``model`` has MoE layers."""
    if not model.spec.is_moe:
        raise ValueError(f"{method} is an expert method and needs an MoE model; {model.name} is dense.")


def check_moe_layer(model: MoEModel, L: int, method: str) -> None:
    """``ValueError`` unless layer ``L`` exists and is an MoE layer."""
    model.check_layer(L)
    if not model.layers[L].is_moe:
        raise ValueError(
            f"{method}: layer {L} is dense, but this expert method needs an MoE layer; "
            f"MoE layers: {list(model.spec.moe_layers)}."
        )


def check_min_layer(model: MoEModel, min_layer: int) -> int:
    """``min_layer`` — the earliest layer a method may choose by itself — checked: a layer of ``model``."""
    n = model.spec.n_layers
    if not isinstance(min_layer, int) or isinstance(min_layer, bool) or not 0 <= min_layer < n:
        raise ValueError(f"min_layer must be a layer index 0..{n - 1} of this model, got {min_layer!r}.")
    return min_layer


def last_positions(n: int) -> list[int]:
    """``[-n, ..., -1]`` for a positive int ``n``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"last_n must be a positive int, got {n!r}.")
    return list(range(-n, 0))


@torch.no_grad()
def mean_activations(
    model: MoEModel,
    prompts: Sequence[str],
    names: Sequence[str],
    positions: Sequence[int],
    batch_size: int = 32,
    per_prompt: bool = False,
) -> dict[str, Tensor]:
    """Mean over prompts (``[n_pos, ...]``, float64) of hook values at ``positions``, under active edits.

    ``per_prompt=True`` returns the stacked values ``[n_prompts, n_pos, ...]`` (float32) instead.
    """
    prompts = check_prompt_list(prompts, "prompts")
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for s in range(0, len(prompts), batch_size):
        _, cache = model.run_with_cache(
            prompts[s : s + batch_size], names=list(names), positions=list(positions), return_type=None
        )
        for n in names:
            out[n].append(cache[n].float().cpu())
    stacked = {n: torch.cat(v) for n, v in out.items()}
    if per_prompt:
        return stacked
    return {n: v.double().mean(0) for n, v in stacked.items()}


def fit_metadata(
    model: MoEModel, method: str, prompts: Sequence[Sequence[str]], **extra: Any
) -> SteeringMetadata:
    """Metadata of a fitted steering: the model's shapes, the method, a hash of the prompts, ``extra``."""
    return SteeringMetadata.from_model(model, method=method, data_hash=data_hash(*prompts), extra=extra)


# ------------------------------------------------------------------------------------------- methods


def dprime(pos: Tensor, neg: Tensor) -> Tensor:
    """d' along the first dimension: (mean pos − mean neg) / pooled standard deviation (unbiased variances)."""
    return (pos.mean(0) - neg.mean(0)) / ((pos.var(0) + neg.var(0)) / 2).sqrt().clamp_min(1e-12)


def _layer_separation(acts_h: Tensor, acts_l: Tensor) -> Tensor:
    """d' of the projection on the mean difference, per layer (acts ``[n, n_layers, d]``)."""
    diff = acts_h.mean(0) - acts_l.mean(0)
    r = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return dprime((acts_h * r).sum(-1), (acts_l * r).sum(-1))


def resid_acts(
    model: MoEModel, prompts: list[str], position: int, batch_size: int
) -> Float[Tensor, "n n_layers d_model"]:
    """``hook_resid_pre`` of every layer at one prompt position, per prompt."""
    names = [f"blocks.{L}.hook_resid_pre" for L in range(model.spec.n_layers)]
    acts = mean_activations(model, prompts, names, [position], batch_size, per_prompt=True)
    return torch.stack([acts[n][:, 0] for n in names], dim=1)  # [n, n_layers, d]


def fit_dense(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layer: int | None = None,
    min_layer: int = 0,
    position: int = -1,
    coeff: float = -1.0,
    n_max: int | None = 128,
    batch_size: int = 32,
) -> SteeringVectors:
    """Difference of means of ``hook_resid_pre`` at one layer (default: the best-separating layer from
    ``min_layer`` on), added at every position with ``coeff`` (−1 moves the harmful mean onto the harmless
    mean)."""
    return fit_dense_multi(
        model, harmful, harmless, layers=None if layer is None else [layer], n_layers=1, min_layer=min_layer,
        position=position, coeff=coeff, n_max=n_max, batch_size=batch_size, _method="dense",
    )  # fmt: skip


def fit_dense_multi(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    n_layers: int = 3,
    min_layer: int = 0,
    position: int = -1,
    coeff: float | None = None,
    n_max: int | None = 128,
    batch_size: int = 32,
    _method: str = "dense_multi",
) -> SteeringVectors:
    """Difference of means at several layers (default: the ``n_layers`` best-separating — d' of the
    projection — among layers ``>= min_layer`` and > 0); each layer's vector gets ``coeff`` (default
    ``−1/len(layers)``)."""
    check_min_layer(model, min_layer)
    harmful = subsample(check_prompt_list(harmful, "harmful"), n_max)
    harmless = subsample(check_prompt_list(harmless, "harmless"), n_max)
    ah = resid_acts(model, harmful, position, batch_size)
    al = resid_acts(model, harmless, position, batch_size)
    sep = _layer_separation(ah, al)
    if layers is None:
        order = [int(i) for i in sep.argsort(descending=True) if int(i) >= max(min_layer, 1)] or [min_layer]
        layers = sorted(order[:n_layers])
    layers = [model.check_layer(int(L)) for L in layers]
    c = check_coeff(-1.0 / len(layers) if coeff is None else coeff)
    diff = (ah.double().mean(0) - al.double().mean(0)).float()
    vectors: dict[SteeringKey, Tensor] = {(f"blocks.{L}.hook_resid_pre", None): diff[L] for L in layers}
    meta = fit_metadata(
        model, _method, [harmful, harmless], separation=[float(x) for x in sep], position=position
    )
    return SteeringVectors(vectors, meta, dict.fromkeys(vectors, c))


def fit_ridge(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    confidences: Sequence[float] | None = None,
    weighted: bool = True,
    lam: float = 1.0,
    n_layers: int = 2,
    layers: Sequence[int] | None = None,
    min_layer: int = 0,
    position: int = -1,
    coeff: float | None = None,
    n_max: int | None = 128,
    batch_size: int = 32,
    seed: int = 0,
) -> SteeringVectors:
    """ "Refusal Steering": (confidence-weighted) ridge directions at ``hook_resid_pre``, layers (from
    ``min_layer`` on) chosen by the correlation between the projection and the refusal confidence (fit on
    one half of the prompts, correlation on the other half).

    ``confidences`` (one per harmful then harmless prompt, in [−1, 1]) come from an LLM judge
    (:meth:`moe_interp.refusal.LLMJudge.confidences`); by default the cheap stand-in
    ``tanh(refusal_score / 4)`` of the unsteered model's logit refusal score is used. With
    ``weighted=False`` the labels (+1 harmful, −1 harmless) replace the confidences (given ones are ignored).
    ``n_max`` cuts each list and its confidences alike. Each vector is
    ``r̂ · gap`` (gap: refusal minus compliant mean projection), so ``coeff = −1`` removes the gap.
    """
    from moe_interp.refusal.directions import ridge_direction, weighted_moments

    harmful, harmless = check_prompt_list(harmful, "harmful"), check_prompt_list(harmless, "harmless")
    check_min_layer(model, min_layer)
    given: Tensor | None = None
    if confidences is not None and weighted:
        given = torch.as_tensor(list(confidences), dtype=torch.float64)
        if given.shape != (len(harmful) + len(harmless),):
            raise ValueError(
                f"confidences must have one value per harmful then harmless prompt "
                f"({len(harmful)} + {len(harmless)}), got {tuple(given.shape)}."
            )
    nh = len(harmful)
    harmful, harmless = subsample(harmful, n_max), subsample(harmless, n_max)
    prompts = harmful + harmless
    if given is not None:  # cut the confidences as the prompts were cut
        conf = torch.cat([given[: len(harmful)], given[nh : nh + len(harmless)]])
        source = "given (LLM judge)"
    elif weighted:
        conf = torch.tanh(refusal_scores(model, prompts, batch_size=batch_size) / 4.0)
        source = "tanh(logit refusal score / 4) of the unsteered model"
    else:
        conf = torch.tensor([1.0] * len(harmful) + [-1.0] * len(harmless), dtype=torch.float64)
        source = "labels"
    if given is None and not (bool((conf > 0).sum() >= 2) and bool((conf < 0).sum() >= 2)):
        conf = torch.tensor([1.0] * len(harmful) + [-1.0] * len(harmless), dtype=torch.float64)
        source = "labels (the logit refusal scores were one-sided)"
    acts = torch.cat(
        [
            resid_acts(model, harmful, position, batch_size),
            resid_acts(model, harmless, position, batch_size),
        ]
    )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(prompts), generator=g)
    fit_idx, val_idx = perm[: len(prompts) // 2], perm[len(prompts) // 2 :]

    def directions(idx: Tensor) -> Tensor:
        ref, comp = weighted_moments(acts[idx].double(), conf[idx], track_cov=True)
        return ridge_direction(ref, comp, lam).float()  # [n_layers, d]

    r_half = directions(fit_idx)
    r_hat = r_half / r_half.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj = (acts[val_idx] * r_hat).sum(-1)  # [n_val, n_layers]
    cv = conf[val_idx].float()
    pc, cc = proj - proj.mean(0), cv - cv.mean()
    corr = (pc * cc[:, None]).sum(0) / (pc.norm(dim=0) * cc.norm()).clamp_min(1e-12)
    if layers is None:
        layers = sorted([int(i) for i in corr.argsort(descending=True) if int(i) >= min_layer][:n_layers])
    layers = [model.check_layer(int(L)) for L in layers]
    r_all = directions(torch.arange(len(prompts)))
    r_all = r_all / r_all.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w_r, w_c = conf.clamp(min=0).float(), (-conf).clamp(min=0).float()
    vectors: dict[SteeringKey, Tensor] = {}
    for L in layers:
        p = acts[:, L] @ r_all[L]
        gap = (p * w_r).sum() / w_r.sum().clamp_min(1e-12) - (p * w_c).sum() / w_c.sum().clamp_min(1e-12)
        vectors[(f"blocks.{L}.hook_resid_pre", None)] = r_all[L] * gap
    c = check_coeff(-1.0 / len(layers) if coeff is None else coeff)
    meta = fit_metadata(
        model, "ridge" if weighted else "ridge_unweighted", [harmful, harmless],
        layer_correlation=[round(float(x), 4) for x in corr], confidence_source=source, lam=lam,
    )  # fmt: skip
    return SteeringVectors(vectors, meta, dict.fromkeys(vectors, c))


def _topic_direction(
    model: MoEModel,
    topic: list[str],
    harmless: list[str],
    keep: list[str],
    position: int,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """(topic − harmless) ⟂ (keep − harmless) per layer ``[n_layers, d]``, and the topic/harmless d'."""
    acts = [resid_acts(model, p, position, batch_size) for p in (topic, harmless, keep)]
    return _topic_direction_of(*acts)


def _topic_direction_of(
    at: Float[Tensor, "n_t n_layers d"],
    al: Float[Tensor, "n_l n_layers d"],
    ak: Float[Tensor, "n_k n_layers d"],
) -> tuple[Tensor, Tensor]:
    """:func:`_topic_direction` from the three groups' ``hook_resid_pre`` at every layer."""
    t = at.double().mean(0) - al.double().mean(0)
    s = ak.double().mean(0) - al.double().mean(0)
    t_perp = orthogonal_to(t, s)
    r = (t_perp / t_perp.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()
    pt, pl = (at * r).sum(-1), (al * r).sum(-1)
    sep = dprime(pt, pl)
    return t_perp.float(), sep


def fit_topic_remove(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    keep: Sequence[str],
    layer: int | None = None,
    position: int = -1,
    coeff: float = -1.0,
    n_max: int | None = 128,
    batch_size: int = 32,
    _method: str = "topic_remove",
) -> SteeringVectors:
    """Fine-grained removal: ``harmful`` are the topic prompts (e.g. political), ``keep`` the refusals to
    preserve (e.g. harmful). Direction: (topic − harmless) made orthogonal to (keep − harmless), at the
    layer where it separates topic from harmless best; ``coeff = −1`` removes the topic shift."""
    topic = subsample(check_prompt_list(harmful, "topic prompts"), n_max)
    harmless = subsample(check_prompt_list(harmless, "harmless"), n_max)
    keep = subsample(check_prompt_list(keep, "keep"), n_max)
    t_perp, sep = _topic_direction(model, topic, harmless, keep, position, batch_size)
    if layer is None:
        layer = int(sep[1:].argmax()) + 1 if sep.shape[0] > 1 else 0
    L = model.check_layer(int(layer))
    key: SteeringKey = (f"blocks.{L}.hook_resid_pre", None)
    meta = fit_metadata(model, _method, [topic, harmless, keep], separation=[round(float(x), 3) for x in sep])
    return SteeringVectors({key: t_perp[L]}, meta, {key: check_coeff(coeff)})


def fit_topic_induce(
    model: MoEModel, harmful: Sequence[str], harmless: Sequence[str], *, coeff: float = 1.0, **kw: Any
) -> SteeringVectors:
    """The reverse of :func:`fit_topic_remove`: add the topic direction (``coeff > 0``) to induce the
    topic refusal; pair with ``positions``/prompt selection to target it."""
    return fit_topic_remove(model, harmful, harmless, coeff=coeff, _method="topic_induce", **kw)


def _check_shrinkage(shrinkage: float | None) -> None:
    if shrinkage is not None and not (isinstance(shrinkage, int | float) and 0 < shrinkage < float("inf")):
        raise ValueError(f"gate_shrinkage must be a positive finite float or None, got {shrinkage!r}")


def fit_gate(
    positive: Float[Tensor, "n_p d"],
    negatives: Sequence[Float[Tensor, "_n d"]],
    shrinkage: float | None = None,
    threshold: Literal["lowest", "midpoint"] = "lowest",
) -> tuple[Float[Tensor, " d"], float, float]:
    """A linear gate from one site's activations: ``(direction, threshold, balanced training accuracy)``.
    Direction: the positive mean minus the mean of the negative groups' means, or with ``shrinkage`` the shrunk
    discriminant of all the groups (:func:`~moe_interp.refusal.directions.shrunk_lda_direction`); threshold:
    the lowest projection with the best balanced accuracy of positive against all negatives (``"lowest"``,
    which sits on a training prompt's projection), or the middle of the interval of thresholds that reach it
    (``"midpoint"``: where the training classes separate, half-way across the gap between them)."""
    if threshold not in ("lowest", "midpoint"):
        raise ValueError(f"threshold must be 'lowest' or 'midpoint', got {threshold!r}")
    from moe_interp.refusal.directions import shrunk_lda_direction

    _check_shrinkage(shrinkage)
    if len(negatives) == 0:
        raise ValueError("fit_gate needs at least one group of negative activations.")
    w = positive.mean(0) - torch.stack([g.mean(0) for g in negatives]).mean(0)
    if shrinkage is not None:
        w = shrunk_lda_direction(w, [positive, *negatives], shrinkage).to(w.dtype)
    pos, neg = positive @ w, torch.cat(list(negatives)) @ w
    cands = torch.cat([pos, neg]).sort().values
    acc = torch.stack([((pos > c).float().mean() + (neg <= c).float().mean()) / 2 for c in cands])
    i = int(acc.argmax())
    theta = float(cands[i])
    above = cands[cands > cands[i]]
    if threshold == "midpoint" and above.numel():  # the same accuracy holds up to the next projection
        theta = float((cands[i] + above[0]) / 2)
    return w, theta, float(acc.max())


def fit_topic_gate(
    topic: Float[Tensor, "n_t d"],
    harmless: Float[Tensor, "n_l d"],
    keep: Float[Tensor, "n_k d"],
    shrinkage: float | None = None,
) -> tuple[Float[Tensor, " d"], float, float]:
    """The topic gate of :func:`fit_topic_gated` from one site's activations: :func:`fit_gate` of the topic
    against harmless and keep (direction topic − mean(harmless, keep), or the shrunk discriminant of the
    three groups)."""
    return fit_gate(topic, [harmless, keep], shrinkage)


def fit_topic_gated(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    keep: Sequence[str],
    gate_layer: int = 1,
    gate_shrinkage: float | None = None,
    removal: Literal["add", "ablate"] = "add",
    n_layers: int = 3,
    coeff: float | None = None,
    n_max: int | None = 128,
    batch_size: int = 32,
) -> TopicGatedSteering:
    """Topic-gated refusal removal: ``dense_multi`` (topic prompts vs harmless, at layers ≥ ``gate_layer``)
    applied only where a topic detector fires. The detector is the direction topic − mean(keep, harmless)
    at ``blocks.G.hook_resid_pre`` (last prompt position), thresholded at the best training accuracy.
    ``gate_shrinkage=s`` turns that difference of means into a shrunk linear discriminant
    (:func:`~moe_interp.refusal.directions.shrunk_lda_direction` over the three groups): it discounts
    directions along which prompts of one group vary, which a plain difference of means mistakes for topic.
    ``removal="ablate"``: instead of adding vectors, ablate the topic direction of :func:`fit_topic_remove`
    (topic − harmless, orthogonal to keep − harmless, taken at ``gate_layer``) from ``hook_resid_pre`` of every
    layer from ``gate_layer`` on (``coeff``, default 1, scales the removed component; ``n_layers`` is not used):
    it changes a prompt in proportion to its topic component, where adding a vector shifts every gated prompt
    by the same amount.
    (``coeff > 0`` with the topic's refusal direction induces a targeted refusal instead.)"""
    topic = subsample(check_prompt_list(harmful, "topic prompts"), n_max)
    harmless = subsample(check_prompt_list(harmless, "harmless"), n_max)
    keep = subsample(check_prompt_list(keep, "keep"), n_max)
    model.check_layer(gate_layer)
    _check_shrinkage(gate_shrinkage)
    if removal not in ("add", "ablate"):
        raise ValueError(f"removal must be 'add' or 'ablate', got {removal!r}")
    # every layer's last position, once: the gate reads its layer, the ablated direction all of them
    acts = [resid_acts(model, p, -1, batch_size) for p in (topic, harmless, keep)]
    at, al, ak = (a[:, gate_layer] for a in acts)
    w, theta, acc = fit_topic_gate(at, al, ak, gate_shrinkage)
    meta = fit_metadata(model, "topic_gated", [topic, harmless, keep], gate_train_accuracy=acc,
                 gate_layer=gate_layer, gate_shrinkage=gate_shrinkage, removal=removal)  # fmt: skip
    if removal == "ablate":
        t_perp, _ = _topic_direction_of(*acts)
        keys = [(f"blocks.{L}.hook_resid_pre", None) for L in range(gate_layer, model.spec.n_layers)]
        c = check_coeff(1.0 if coeff is None else coeff)
        if c < 0:
            raise ValueError(f"removal='ablate' needs coeff >= 0 (the share of the topic removed), got {c}")
        ablate = SteeringVectors(
            dict.fromkeys(keys, t_perp[gate_layer]), meta, dict.fromkeys(keys, c), operation="ablate"
        )
        return TopicGatedSteering(ablate, gate_layer, w.float(), theta, meta)
    layers = [L for L in range(gate_layer, model.spec.n_layers) if L > 0]
    inner = fit_dense_multi(model, topic, harmless, n_layers=n_layers, coeff=coeff, n_max=n_max,
                            batch_size=batch_size, layers=None if len(layers) > n_layers else layers)  # fmt: skip
    if min(inner.layers) < gate_layer:
        inner = fit_dense_multi(model, topic, harmless, layers=layers[:n_layers], coeff=coeff, n_max=n_max)
    return TopicGatedSteering(replace(inner, metadata=meta), gate_layer, w.float(), theta, meta)
