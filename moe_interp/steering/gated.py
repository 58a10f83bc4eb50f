"""Conditional steering: a registered steering method applied only to the prompts a harm gate opens on.

Conditional activation steering (CAST, Lee et al. 2024) and the gated removal of "Refusal Steering"
(García-Ferrero et al.): a linear read-out of the residual stream at the last prompt position decides, on
the prompt pass, whether a prompt is steered; the decision is kept for the generated tokens. Prompts the gate
stays closed on are computed exactly as without steering, so the side effects on harmless prompts come only
from the harmless prompts the gate opens on — the gate's false positives — and the strength can be raised
until the steered prompts comply.

The object is :class:`~moe_interp.steering.edits.TopicGatedSteering` (the gate of the topic methods), so
saving, loading, scaling, the strength search and the comparison treat it like every other steering.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.errors import InputError
from moe_interp.steering.edits import TopicGatedSteering
from moe_interp.steering.fit import (
    _check_shrinkage,
    check_prompt_list,
    dprime,
    fit_gate,
    fit_metadata,
    resid_acts,
    subsample,
)
from moe_interp.steering.memo import FitMemo, memo_read
from moe_interp.steering.vectors import SteeringVectors

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = ["UngateableError", "fit_gated", "gate_layer_separation", "gated"]


class UngateableError(InputError):
    """No gate can precede the inner steering: the prompts do not differ at any layer up to its first one (a
    steering at layer 0). The pipeline reports such a method and leaves it out instead of failing the run."""


def fit_gated(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    inner: str = "dense",
    gate_layer: int | None = None,
    gate_shrinkage: float | None = 1.0,
    gate_harmful: Sequence[str] | None = None,
    gate_harmless: Sequence[str] | None = None,
    n_folds: int = 4,
    n_max: int | None = 128,
    batch_size: int = 32,
    _memo: FitMemo | None = None,
    **inner_kw: Any,
) -> TopicGatedSteering:
    """Fit the registered method ``inner`` (keywords ``inner_kw``, ``n_max``, ``batch_size``) on the same
    prompts and gate it on harm: the gate is :func:`~moe_interp.steering.fit.fit_gate` of the harmful against
    the harmless prompts at ``blocks.G.hook_resid_pre``, last prompt position — with the default
    ``gate_shrinkage`` a shrunk linear discriminant, thresholded at the best balanced training accuracy.
    ``gate_harmful`` / ``gate_harmless`` fit the gate on other (typically more) prompts than the steering,
    all of them (``n_max`` caps the steering's): a read-out in ``d_model`` dimensions fitted on a few dozen
    prompts opens on more harmless prompts than one fitted on a few hundred.

    ``gate_layer`` defaults to the layer, up to the first one ``inner`` steers (the gate must be decided before
    the steering acts), whose gate separates the two classes best on prompts it was not fitted on
    (:func:`gate_layer_separation`, ``n_folds``-fold cross-validation on the training prompts; recorded in
    the metadata as ``gate_cv_separation``, ``None`` where degenerate): a gate that fires on few harmless prompts is what keeps the side
    effects small. ``inner`` must be a method fitted on
    harmful vs harmless prompts whose strength is a coefficient scale and which returns
    :class:`~moe_interp.steering.vectors.SteeringVectors`: every such method of the registry (``dense``,
    ``dense_multi``, ``ridge``, ``routing_experts``, ``expert_conditioned[_all]``, ``single_expert``). A steering
    at a layer where the prompts do not yet differ (layer 0 of a chat model: every prompt ends on the same
    template token) cannot be gated, so the inner method chooses its layers or experts by itself only from the
    first layer where the gate prompts differ on (and from ``gate_layer`` on, if given): its ``min_layer``,
    unless passed; layers or experts given explicitly are used as they are. ``_memo`` (the pipeline's
    :class:`~moe_interp.steering.memo.FitMemo`) shares the gate prompts' activations, which every gated method
    reads the same, and is passed on to the inner method."""
    from moe_interp.steering.registry import method_spec

    spec = method_spec(inner)
    if spec.data != "harmful" or spec.tuning != "coefficient" or inner.startswith("gated"):
        raise ValueError(
            f"gated steering needs an ungated method fitted on harmful vs harmless prompts and tuned by its "
            f"coefficient, got inner={inner!r}."
        )
    _check_shrinkage(gate_shrinkage)
    harmful = subsample(check_prompt_list(harmful, "harmful"), n_max)
    harmless = subsample(check_prompt_list(harmless, "harmless"), n_max)
    gh = harmful if gate_harmful is None else check_prompt_list(gate_harmful, "gate_harmful")
    gl = harmless if gate_harmless is None else check_prompt_list(gate_harmless, "gate_harmless")
    if gate_layer is not None:
        model.check_layer(gate_layer)

    def acts(prompts: list[str]) -> Float[Tensor, "n n_layers d"]:
        key = ("resid_acts", -1, batch_size, *prompts)
        return memo_read(_memo, model, key, lambda: resid_acts(model, prompts, -1, batch_size))

    ah, al = acts(gh), acts(gl)  # [n, n_layers, d]
    if "min_layer" not in inner_kw and "min_layer" in spec.keywords:
        # the inner method chooses its layers among those a gate can precede
        gateable = [L for L in range(ah.shape[1]) if not _degenerate(ah[:, L], al[:, L])]
        inner_kw["min_layer"] = max(gateable[0] if gateable else 0, gate_layer or 0)
    if _memo is not None and spec.takes_memo:
        inner_kw["_memo"] = _memo
    steer = spec(model, harmful, harmless, n_max=n_max, batch_size=batch_size, **inner_kw)
    if not isinstance(steer, SteeringVectors):
        raise ValueError(
            f"gated steering needs an inner method that returns SteeringVectors; {inner!r} returns "
            f"{type(steer).__name__}."
        )
    first = min(steer.layers)
    if gate_layer is not None and gate_layer > first:
        raise ValueError(
            f"gate_layer {gate_layer} comes after the first layer {inner!r} steers ({first}); the gate must be "
            f"decided first: pass gate_layer <= {first}."
        )
    cv = gate_layer_separation(ah[:, : first + 1], al[:, : first + 1], gate_shrinkage, n_folds)
    G = int(cv.argmax()) if gate_layer is None else gate_layer
    if _degenerate(ah[:, G], al[:, G]):  # chosen by the user (a recipe error) or the only layer there is
        raise (InputError if gate_layer is not None and first > 0 else UngateableError)(
            f"the gate at layer {G} has no direction: the harmful and harmless prompts do not differ at their last "
            f"position there (at layer 0 every prompt ends on the same template token); gate {inner!r} from a "
            f"later layer (pass its layer= / experts= / min_layer=, or another gate_layer=)."
        )
    w, theta, acc = fit_gate(ah[:, G], [al[:, G]], gate_shrinkage, threshold="midpoint")
    inner_extra = dict(steer.metadata.extra) if steer.metadata is not None else {}
    data = [harmful, harmless] + ([] if gate_harmful is None and gate_harmless is None else [gh, gl])
    meta = fit_metadata(model, f"gated_{inner}", data, **inner_extra, inner=inner,
                        inner_min_layer=inner_kw.get("min_layer"), gate_layer=G,
                        gate_shrinkage=gate_shrinkage, gate_train_accuracy=acc, gate_n_prompts=[len(gh), len(gl)],
                        gate_cv_separation=[round(float(x), 3) if bool(x.isfinite()) else None for x in cv])  # fmt: skip
    return TopicGatedSteering(replace(steer, metadata=meta), G, w.float(), theta, meta)


def _degenerate(positive: Float[Tensor, "n_p d"], negative: Float[Tensor, "n_n d"]) -> bool:
    """Whether the two groups' means coincide up to rounding (relative 1e-5): e.g. at layer 0, where every
    prompt's last position is the same template token, whatever the group sizes."""
    mp, mn = positive.double().mean(0), negative.double().mean(0)
    return float((mp - mn).norm()) <= 1e-5 * max(float(mp.norm()), float(mn.norm()), 1e-30)


def gate_layer_separation(
    positive: Float[Tensor, "n_p n_layers d"],
    negative: Float[Tensor, "n_n n_layers d"],
    shrinkage: float | None,
    n_folds: int = 4,
) -> Float[Tensor, " n_layers"]:
    """Cross-validated separation of a gate per layer: each prompt's signed distance to the decision boundary
    of the gate fitted without its fold (:func:`~moe_interp.steering.fit.fit_gate`, midpoint threshold), then
    d' = (mean positive − mean negative) / pooled standard deviation of those distances. Folds interleave the
    prompts in order; layers where the groups' means coincide, or a fold's gate has a zero direction, score
    ``-inf``."""
    n_p, n_n = positive.shape[0], negative.shape[0]
    k = min(n_folds, n_p, n_n)
    if k < 2:
        raise ValueError(
            f"choosing the gate layer needs at least 2 harmful and 2 harmless prompts, got {n_p}, {n_n}"
        )
    fp, fn = torch.arange(n_p) % k, torch.arange(n_n) % k
    out = torch.full((positive.shape[1],), float("-inf"))
    for L in range(positive.shape[1]):
        if _degenerate(positive[:, L], negative[:, L]):
            continue
        dp, dn = torch.empty(n_p), torch.empty(n_n)
        ok = True
        for f in range(k):
            w, theta, _ = fit_gate(
                positive[fp != f, L], [negative[fn != f, L]], shrinkage, threshold="midpoint"
            )
            norm = float(w.norm())
            if not norm > 0:
                ok = False
                break
            dp[fp == f] = ((positive[fp == f, L] @ w) - theta).float() / norm
            dn[fn == f] = ((negative[fn == f, L] @ w) - theta).float() / norm
        if ok:
            out[L] = dprime(dp, dn)
    return out


def gated(inner: str) -> Callable[..., TopicGatedSteering]:
    """The registry's fit function of ``gated_<inner>``: :func:`fit_gated` with ``inner`` fixed (its signature is
    :func:`fit_gated`'s without ``inner``, so the registry's keyword check reads the gate's keywords from there)."""

    def fit(
        model: MoEModel, harmful: Sequence[str], harmless: Sequence[str], **kw: Any
    ) -> TopicGatedSteering:
        return fit_gated(model, harmful, harmless, inner=inner, **kw)

    sig = inspect.signature(fit_gated)
    fit.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "inner"])  # type: ignore[attr-defined]
    fit.__name__ = fit.__qualname__ = f"fit_gated_{inner}"
    fit.__doc__ = (
        f"``{inner}`` gated on harm: :func:`moe_interp.steering.gated.fit_gated` with inner={inner!r}."
    )
    return fit
