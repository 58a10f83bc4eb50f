"""Fitting expert-aware and router steering (the MoE-specific methods of the registry).

* ``routing_experts`` — Expert-Aware Refusal Steering: experts whose top-1 selection % over the last 5
  prompt positions differs most between harmful and harmless, steered at their own outputs
  (``(blocks.L.mlp.hook_expert_out, e)``) with expert-specific directions.
* ``expert_conditioned`` — the same experts and directions, applied as ``h ← h + c·p_e(x)·r_e`` at the MoE
  output (``p_e`` = router softmax), through :class:`~moe_interp.steering.vectors.ExpertConditionedAdd`.
* ``expert_conditioned_all`` — ``h ← h + c·Σ_e p_e(x)·r_e`` over all experts of the chosen layers
  (``topk=True``: ``p_e`` zeroed outside the routed top-k).
* ``single_expert`` — one expert only (the top routing difference, or ``layer=``/``expert=``).
* ``steer_router`` — SteerMoE: deactivate (and optionally activate) experts chosen by routing risk
  difference, editing log-softmax router scores (:class:`~moe_interp.steering.edits.RouterSteering`).

Expert-specific directions (:func:`expert_specific_directions`) force the router to one expert with
``ForceExpert(L, e, mode="router_bias")`` (+100 / −100) and take ``mean(harmful) − mean(harmless)`` of
``blocks.L.hook_mlp_out`` at the last prompt positions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.interventions import ForceExpert, check_coeff
from moe_interp.steering.edits import RouterSteering
from moe_interp.steering.fit import (
    check_min_layer,
    check_moe_layer,
    check_prompt_list,
    fit_metadata,
    last_positions,
    mean_activations,
    require_moe,
    subsample,
)
from moe_interp.steering.keys import SteeringKey
from moe_interp.steering.memo import FitMemo, memo_read
from moe_interp.steering.vectors import Conditioning, SteeringVectors

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = [
    "expert_specific_directions",
    "fit_expert_conditioned",
    "fit_expert_conditioned_all",
    "fit_routing_experts",
    "fit_single_expert",
    "fit_steer_router",
    "select_experts",
]


# ------------------------------------------------------------------------- expert-specific directions


@torch.no_grad()
def expert_specific_directions(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    experts: Sequence[tuple[int, int]],
    positions: Sequence[int] = (-5, -4, -3, -2, -1),
    bias: float = 100.0,
    batch_size: int = 32,
    memo: FitMemo | None = None,
) -> dict[tuple[int, int], Float[Tensor, "n_pos d_model"]]:
    """Per (layer, expert): ``mean(harmful) − mean(harmless)`` of ``blocks.L.hook_mlp_out`` at ``positions``
    with the router forced to that expert (``ForceExpert(L, e, "router_bias", bias=±100)``). On families with
    shared experts (Qwen2-MoE, DeepSeek) ``hook_mlp_out`` includes the shared expert's output, so every
    direction of a layer also carries the shared expert's harmful − harmless difference. With ``memo``, a
    direction already read on the same prompts, positions, bias and batch size is reused."""
    harmful = check_prompt_list(harmful, "harmful")
    harmless = check_prompt_list(harmless, "harmless")
    positions = list(positions)
    out = {}
    for L, e in experts:
        check_moe_layer(model, L, "expert_specific_directions")
        model.check_expert(L, e)

        def read(L: int = L, e: int = e) -> Tensor:
            name = f"blocks.{L}.hook_mlp_out"
            with model.intervene(ForceExpert(L, e, mode="router_bias", bias=bias)):
                mh = mean_activations(model, harmful, [name], positions, batch_size)[name]
                ml = mean_activations(model, harmless, [name], positions, batch_size)[name]
            return (mh - ml).float()

        key = ("expert_direction", L, e, *positions, bias, batch_size, len(harmful), *harmful, *harmless)
        out[(L, e)] = memo_read(memo, model, key, read)
    return out


def _top1_difference(
    model: MoEModel, harmful: list[str], harmless: list[str], last_n: int, memo: FitMemo | None
) -> Tensor:
    """:func:`~moe_interp.patching.routing.top1_percentage_difference`, shared through ``memo``."""
    from moe_interp.patching.routing import top1_percentage_difference

    key = ("top1_difference", last_n, len(harmful), *harmful, *harmless)
    return memo_read(
        memo, model, key, lambda: top1_percentage_difference(model, harmful, harmless, last_n=last_n)
    )


def _moe_layers_from(model: MoEModel, min_layer: int) -> list[int]:
    """The MoE layers ``>= min_layer`` (checked), where an expert method may choose; ``ValueError`` if none."""
    moe = [L for L in model.spec.moe_layers if L >= check_min_layer(model, min_layer)]
    if not moe:
        raise ValueError(
            f"No MoE layer at or after min_layer={min_layer}; MoE layers: {list(model.spec.moe_layers)}."
        )
    return moe


def select_experts(
    scores: Float[Tensor, "n_layers n_experts"],
    model: MoEModel,
    threshold: float | None = None,
    top_n: int | None = 4,
    min_layer: int = 0,
) -> list[tuple[int, int]]:
    """(layer, expert) pairs of MoE layers ``>= min_layer`` with ``score > threshold``, or the ``top_n``
    largest scores."""
    moe = _moe_layers_from(model, min_layer)
    s = torch.full_like(scores.float(), -math.inf)
    s[moe] = scores.float()[moe]
    if threshold is not None:
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}.")
        pairs = [(int(L), int(e)) for L, e in (s > threshold).nonzero().tolist()]
        pairs.sort(key=lambda p: -float(s[p]))
    else:
        if not isinstance(top_n, int) or top_n < 1:
            raise ValueError(f"top_n must be a positive int, got {top_n!r}.")
        flat = s.flatten().topk(min(top_n, len(moe) * s.shape[1]))
        pairs = [divmod(int(i), s.shape[1]) for i in flat.indices]
        pairs = [(int(L), int(e)) for L, e in pairs if math.isfinite(float(s[L, e]))]
    if not pairs:
        raise ValueError(
            f"No expert passes the selection (threshold={threshold}); max score {float(s.max()):.3g}."
        )
    return pairs


def _routing_selection(
    model: MoEModel,
    harmful: list[str],
    harmless: list[str],
    threshold: float | None,
    top_n: int | None,
    last_n: int,
    experts: Sequence[tuple[int, int]] | None,
    min_layer: int = 0,
    memo: FitMemo | None = None,
) -> tuple[list[tuple[int, int]], Tensor | None]:
    if experts is not None:
        pairs = [(int(L), int(e)) for L, e in experts]
        for L, e in pairs:
            check_moe_layer(model, L, "expert selection")
            model.check_expert(L, e)
        return pairs, None
    diff = _top1_difference(model, harmful, harmless, last_n, memo)
    return select_experts(diff, model, threshold, top_n, min_layer), diff


def _expert_sv(
    model: MoEModel,
    method: str,
    dirs: Mapping[tuple[int, int], Tensor],
    coeff: float,
    conditioning: Conditioning,
    prompts: Sequence[Sequence[str]],
    **extra: Any,
) -> SteeringVectors:
    vectors: dict[SteeringKey, Tensor] = {
        (f"blocks.{L}.mlp.hook_expert_out", e): d.mean(0) for (L, e), d in dirs.items()
    }
    coeffs = {k: check_coeff(coeff) for k in vectors}
    return SteeringVectors(
        vectors,
        fit_metadata(model, method, prompts, **extra),
        coeffs,
        "all",
        conditioning,
    )


def fit_routing_experts(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    threshold: float | None = None,
    top_n: int | None = 4,
    last_n: int = 5,
    experts: Sequence[tuple[int, int]] | None = None,
    min_layer: int = 0,
    coeff: float = -1.0,
    n_max: int | None = 128,
    batch_size: int = 32,
    _conditioning: Conditioning = "none",
    _method: str = "routing_experts",
    _memo: FitMemo | None = None,
) -> SteeringVectors:
    """Expert-Aware Refusal Steering: select experts of layers ``>= min_layer`` by top-1 % difference
    (harmful − harmless, last ``last_n`` positions; ``threshold`` in percentage points, else ``top_n``), steer
    their outputs with their forced-router directions (mean over the last ``last_n`` positions). Given
    ``experts`` are used as they are. ``_memo`` (:mod:`moe_interp.steering.memo`) shares the routing difference
    and the directions with other fits on the same prompts."""
    require_moe(model, _method)
    harmful = subsample(check_prompt_list(harmful, "harmful"), n_max)
    harmless = subsample(check_prompt_list(harmless, "harmless"), n_max)
    pairs, diff = _routing_selection(
        model, harmful, harmless, threshold, top_n, last_n, experts, min_layer, _memo
    )
    dirs = expert_specific_directions(
        model, harmful, harmless, pairs, last_positions(last_n), batch_size=batch_size, memo=_memo
    )
    extra: dict[str, Any] = {"experts": [list(p) for p in pairs], "last_n": last_n}
    if diff is not None:
        extra["top1_pct_diff"] = [[round(float(x), 3) for x in row] for row in diff]
    return _expert_sv(model, _method, dirs, coeff, _conditioning, [harmful, harmless], **extra)


def fit_expert_conditioned(
    model: MoEModel, harmful: Sequence[str], harmless: Sequence[str], *, topk: bool = False, **kw: Any
) -> SteeringVectors:
    """Routing-selected experts with forced-router directions, applied as ``h ← h + c·p_e(x)·r_e``."""
    cond: Conditioning = "router_prob_topk" if topk else "router_prob"
    return fit_routing_experts(
        model, harmful, harmless, _conditioning=cond, _method="expert_conditioned", **kw
    )


def fit_expert_conditioned_all(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    n_layers: int = 2,
    min_layer: int = 0,
    topk: bool = False,
    last_n: int = 5,
    coeff: float = -1.0,
    n_max: int | None = 128,
    batch_size: int = 32,
    _memo: FitMemo | None = None,
) -> SteeringVectors:
    """``h ← h + c·Σ_e p_e(x)·r_e`` with every expert's forced-router direction at ``layers``
    (default: the ``n_layers`` MoE layers ``>= min_layer`` with the largest absolute top-1 % difference)."""
    require_moe(model, "expert_conditioned_all")
    check_min_layer(model, min_layer)
    harmful = subsample(check_prompt_list(harmful, "harmful"), n_max)
    harmless = subsample(check_prompt_list(harmless, "harmless"), n_max)
    if layers is None:
        diff = _top1_difference(model, harmful, harmless, last_n, _memo).abs().amax(-1)
        moe = _moe_layers_from(model, min_layer)
        layers = sorted(sorted(moe, key=lambda L: -float(diff[L]))[:n_layers])
    for L in layers:
        check_moe_layer(model, L, "expert_conditioned_all")
    pairs = [(L, e) for L in layers for e in range(model.layers[L].n_experts)]
    dirs = expert_specific_directions(
        model, harmful, harmless, pairs, last_positions(last_n), batch_size=batch_size, memo=_memo
    )
    cond: Conditioning = "router_prob_topk" if topk else "router_prob"
    return _expert_sv(
        model, "expert_conditioned_all", dirs, coeff, cond, [harmful, harmless], layers=list(layers)
    )


def fit_single_expert(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layer: int | None = None,
    expert: int | None = None,
    min_layer: int = 0,
    last_n: int = 5,
    coeff: float = -1.0,
    n_max: int | None = 128,
    batch_size: int = 32,
    _memo: FitMemo | None = None,
) -> SteeringVectors:
    """Steer one expert's output (where routed) with its forced-router direction; default expert: the
    largest top-1 % difference among layers ``>= min_layer``."""
    if (layer is None) != (expert is None):
        raise ValueError(
            "Pass both layer= and expert=, or neither (then the top routing difference is used)."
        )
    experts = None if layer is None or expert is None else [(layer, expert)]
    return fit_routing_experts(
        model, harmful, harmless, top_n=1, experts=experts, min_layer=min_layer, last_n=last_n, coeff=coeff,
        n_max=n_max, batch_size=batch_size, _method="single_expert", _memo=_memo,
    )  # fmt: skip


def fit_steer_router(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    n_deactivate: int = 4,
    n_activate: int = 0,
    positions: Sequence[int] | None = None,
    epsilon: float = 1e-2,
    induce: bool = False,
    n_max: int | None = 128,
) -> RouterSteering:
    """SteerMoE: deactivate the ``n_deactivate`` experts most associated with harmful prompts (largest
    routing risk difference) and activate the ``n_activate`` most associated with harmless ones
    (``induce=True`` swaps the roles, to induce refusal)."""
    require_moe(model, "steer_router")
    from moe_interp.patching.routing import routing_risk_difference

    harmful = subsample(check_prompt_list(harmful, "harmful"), n_max)
    harmless = subsample(check_prompt_list(harmless, "harmless"), n_max)
    rd = routing_risk_difference(model, harmful, harmless, positions=positions)
    if induce:
        rd = -rd
    deact: dict[int, list[int]] = {}
    act: dict[int, list[int]] = {}
    if n_deactivate > 0:
        for L, e in select_experts(rd, model, top_n=n_deactivate):
            deact.setdefault(L, []).append(e)
    if n_activate > 0:
        for L, e in select_experts(-rd, model, top_n=n_activate):
            if e not in deact.get(L, []):
                act.setdefault(L, []).append(e)
    meta = fit_metadata(
        model,
        "steer_router",
        [harmful, harmless],
        risk_difference=[[round(float(x), 4) for x in r] for r in rd],
    )
    return RouterSteering(
        meta, {L: tuple(v) for L, v in deact.items()}, {L: tuple(v) for L, v in act.items()}, epsilon
    )
