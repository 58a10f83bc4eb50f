"""Automatic steering hyper-parameters ("Refusal Steering", García-Ferrero et al.).

* :func:`layer_correlation` — per layer, the Pearson correlation between the projection of each prompt's
  activation on the layer's direction and the judge's refusal confidence (used by
  :func:`moe_interp.steering.fit.fit_ridge` to pick layers).
* :func:`coefficient_search` — grow the coefficient scale along a grid and keep the scale that removes the
  most refusal while the harmless KL (mean over prompts, or another ``kl_statistic``) stays within
  ``kl_budget`` (and, optionally, a ``keep`` prompt set
  keeps a minimum refusal rate); stops early once the KL budget or the keep constraint is broken (both
  grow with the scale), once the target refusal rate is reached, or after ``patience`` steps without gain
  once the rate has started to move (a rate that has not responded yet keeps the search going: on a model
  whose refusal only gives way at larger scales the search would otherwise stop inside the budget).
  With ``distinct2_floor`` the chosen strength must also leave non-degenerate completions on the steered
  prompts (mean distinct-2 of greedy completions ≥ the floor × the unedited model's on harmless prompts).
* :func:`search_candidates` — the same selection over any list of steering objects (e.g. SteerMoE with
  more and more deactivated experts).
* :func:`autotune` — fit a registered method on training prompts and tune it on validation prompts, the way
  its registry entry (:class:`~moe_interp.steering.registry.MethodSpec`) says.

Refusal rates are :func:`~moe_interp.refusal.judges.refusal_rate` of
:func:`~moe_interp.refusal.evaluate.refusal_flags`, like everywhere else in the library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.refusal.evaluate import refusal_flags, steered_refusal_scores
from moe_interp.refusal.judges import refusal_rate
from moe_interp.steering.compare import check_kl_statistic, completion_distinct2, harmless_kl, last_logits
from moe_interp.steering.fit import check_prompt_list
from moe_interp.steering.protocol import Steering
from moe_interp.steering.registry import METHODS, fit_method
from moe_interp.steering.vectors import SteeringVectors

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = [
    "DEFAULT_SCALES",
    "QUALITY_TOKENS",
    "FINER_FRACTIONS",
    "NoCandidateError",
    "TuneResult",
    "autotune",
    "coefficient_search",
    "layer_correlation",
    "search_candidates",
]

#: coefficient scales tried by :func:`coefficient_search` (multiplying the fitted coefficients)
DEFAULT_SCALES: tuple[float, ...] = (
    0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0
)  # fmt: skip
#: Fractions of the smallest scale tried when that scale is already over the KL budget.
FINER_FRACTIONS: tuple[float, ...] = (0.125, 0.25, 0.5)
#: Greedy completion length on which :func:`search_candidates`' ``distinct2_floor`` is checked.
QUALITY_TOKENS: int = 24


def layer_correlation(
    acts: Float[Tensor, "n n_layers d"],
    directions: Float[Tensor, "n_layers d"],
    confidences: Sequence[float] | Tensor,
) -> Float[Tensor, " n_layers"]:
    """Pearson correlation, per layer, between ``acts · r̂_L`` and the refusal confidence of each prompt."""
    c = torch.as_tensor(confidences, dtype=torch.float32).reshape(-1)
    if acts.ndim != 3 or directions.ndim != 2 or acts.shape[1:] != directions.shape:
        raise ValueError(
            f"acts must be [n, n_layers, d] and directions [n_layers, d]; got {tuple(acts.shape)} "
            f"and {tuple(directions.shape)}."
        )
    if c.shape[0] != acts.shape[0]:
        raise ValueError(f"confidences must have one value per prompt ({acts.shape[0]}), got {c.shape[0]}.")
    r = directions.float() / directions.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    p = (acts.float() * r).sum(-1)
    pc, cc = p - p.mean(0), c - c.mean()
    return (pc * cc[:, None]).sum(0) / (pc.norm(dim=0) * cc.norm()).clamp_min(1e-12)


class NoCandidateError(ValueError):
    """No candidate strength satisfies the constraints; ``history`` holds every step tried."""

    def __init__(self, message: str, history: list[dict[str, Any]], kl_budget: float) -> None:
        super().__init__(message)
        self.history = history
        self.kl_budget = kl_budget

    @property
    def first_over_kl_budget(self) -> bool:
        """True when already the weakest candidate was over the KL budget (NaN counts as over)."""
        return bool(self.history) and not self.history[0]["kl"] <= self.kl_budget


@dataclass
class TuneResult:
    """The chosen steering object, its validation figures and every step tried."""

    steer: Any
    label: Any
    refusal_rate: float
    kl: float
    keep_rate: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""
    #: mean logit refusal score on the harmful prompts (None with the generation judge)
    refusal_score: float | None = None
    #: mean logit refusal score of the harmful prompts still refused (None: generation judge or none refused)
    refused_score: float | None = None
    #: mean distinct-2 of the steered harmful completions (None: no ``distinct2_floor``)
    distinct2: float | None = None
    #: the unedited model's mean distinct-2 on the harmless prompts, the floor's reference
    distinct2_reference: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "refusal_rate": self.refusal_rate,
            "refusal_score": self.refusal_score,
            "refused_score": self.refused_score,
            "kl": self.kl,
            "keep_rate": self.keep_rate,
            "distinct2": self.distinct2,
            "distinct2_reference": self.distinct2_reference,
            "stopped": self.stopped,
            "history": self.history,
        }


def search_candidates(
    model: MoEModel,
    candidates: Iterable[tuple[Any, Any]],
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    kl_budget: float = 0.1,
    target_rate: float | None = None,
    keep: Sequence[str] | None = None,
    keep_min_rate: float = 0.9,
    patience: int = 3,
    judge: str = "logit",
    max_new_tokens: int = 8,
    maximize_refusal: bool = False,
    batch_size: int = 32,
    kl_statistic: str = "mean",
    distinct2_floor: float | None = None,
    distinct2_reference: float | None = None,
    harmless_logits: Float[Tensor, "n vocab"] | None = None,
) -> TuneResult:
    """Walk ``(label, steer)`` candidates in order of increasing strength; keep the one with the lowest
    harmful refusal rate (highest with ``maximize_refusal``) whose harmless KL ≤ ``kl_budget`` and whose
    ``keep`` refusal rate ≥ ``keep_min_rate``. A rate over n prompts moves in steps of 1/n, so with the logit
    judge, once the rate has moved from the first candidate's, a tie on the rate goes to the lower mean refusal
    score of the prompts still refused (higher, of those still complying, with ``maximize_refusal``): the
    judge's continuous confidence, as "Refusal Steering" tunes on, where it can still flip a prompt.
    Otherwise (a rate that has not responded, or the generation judge) a tie keeps the earlier (weaker)
    candidate. The walk stops at
    ``target_rate`` (default: 0 when lowering refusal, 1 when raising it); ``patience`` steps without gain
    stop it only after the rate has moved from the first candidate's.

    ``kl_statistic`` (one of :data:`~moe_interp.steering.compare.KL_STATISTICS`) is what the budget applies
    to: the mean per-prompt KL (default), its median or its trimmed mean (steadier under the heavy tail of
    per-prompt KLs).

    ``distinct2_floor`` (a share in (0, 1]; default: no check) guards against an edit strong enough to break
    the model on the prompts it steers — which a refusal rate counts as compliance, and a harmless-KL budget
    does not see when a gate keeps the edit off harmless prompts. The chosen candidate's greedy
    :data:`QUALITY_TOKENS`-token completions of the harmful prompts must keep a mean
    :func:`~moe_interp.steering.compare.distinct2` of at least ``distinct2_floor`` × ``distinct2_reference``
    (default: the unedited model's on the harmless prompts, which the pipeline computes once). Checked after
    the walk, on the candidates that were each in turn the best so far: the last one first, and if it fails,
    the earlier ones going back in doubling steps, then bisected (degeneration grows with strength), so a few
    generations per search.

    ``harmless_logits``: the unedited model's :func:`~moe_interp.steering.compare.last_logits` on ``harmless``
    at ``batch_size``, the KL's reference (default: computed here; the pipeline computes it once for all its
    methods)."""
    if not kl_budget > 0:
        raise ValueError(f"kl_budget must be a positive number, got {kl_budget!r}.")
    if distinct2_floor is not None and not 0 < distinct2_floor <= 1:
        raise ValueError(f"distinct2_floor must be a share in (0, 1] or None, got {distinct2_floor!r}.")
    if distinct2_reference is not None and (distinct2_floor is None or not 0 < distinct2_reference <= 1):
        raise ValueError(
            f"distinct2_reference must be a distinct-2 in (0, 1] given with distinct2_floor; got "
            f"{distinct2_reference!r} with distinct2_floor={distinct2_floor!r}."
        )
    check_kl_statistic(kl_statistic, "kl_statistic")
    harmful = check_prompt_list(harmful, "harmful")
    harmless = check_prompt_list(harmless, "harmless")
    if harmless_logits is None:
        base = last_logits(model, harmless, [], batch_size)
    elif harmless_logits.ndim != 2 or harmless_logits.shape[0] != len(harmless):
        raise ValueError(
            f"harmless_logits must be [n_harmless={len(harmless)}, vocab] (the unedited model's last-position "
            f"logits on the harmless prompts), got {tuple(harmless_logits.shape)}."
        )
    else:
        base = harmless_logits
    sign = -1.0 if maximize_refusal else 1.0
    target = (1.0 if maximize_refusal else 0.0) if target_rate is None else float(target_rate)
    best: TuneResult | None = None
    chain: list[tuple[TuneResult, dict[str, Any]]] = []  # each best so far (and its step), weakest first
    history: list[dict[str, Any]] = []
    stale, stopped = 0, "grid exhausted"
    first: float | None = None  # the first candidate's rate; patience counts only once the rate has moved
    moved = False
    # the last gate seen, and whether it stays closed on every harmless prompt
    gate: tuple[Any, ...] | None = None
    for label, steer in candidates:
        if hasattr(steer, "fires"):  # gated: prompts its gate stays closed on are computed unsteered
            if gate is None or not _same_gate(gate[0], steer):
                gate = (steer, not bool(steer.fires(model, harmless, batch_size).any()))
            closed = gate[1]
        else:
            closed = False
        # a gate that opens on no harmless prompt leaves every logit as it was: KL exactly 0, no forward pass
        kl = 0.0 if closed else harmless_kl(model, harmless, steer, batch_size, base, kl_statistic)
        step: dict[str, Any] = {"label": label, "kl": kl}
        history.append(step)
        if not kl <= kl_budget:  # NaN counts as over budget
            stopped = f"KL ({kl_statistic}) {kl:.3g} > budget {kl_budget} at {label}"
            break
        score: float | None = None
        refused: float | None = None
        if judge == "logit":
            scores = steered_refusal_scores(model, harmful, steer)
            rate, score = float(refusal_rate(scores > 0)), float(scores.mean())
            side = scores[scores > 0] if not maximize_refusal else scores[scores <= 0]
            refused = float(side.mean()) if side.numel() else None
        else:
            rate = float(
                refusal_rate(refusal_flags(model, harmful, steer, judge=judge, max_new_tokens=max_new_tokens))
            )
        step["refusal_rate"] = rate
        if score is not None:
            step["refusal_score"] = score
            step["refused_score"] = refused
        keep_rate = None
        if keep is not None:
            keep_rate = float(
                refusal_rate(refusal_flags(model, keep, steer, judge=judge, max_new_tokens=max_new_tokens))
            )
            step["keep_rate"] = keep_rate
            if keep_rate < keep_min_rate:
                stopped = f"keep refusal {keep_rate:.3g} < {keep_min_rate} at {label}"
                break
        first = rate if first is None else first
        moved = moved or abs(rate - first) > 1e-9
        # a tie on the rate is broken by the score only once the rate has responded, and only by the prompts
        # not yet flipped: a score that falls while no prompt flips buys no change in behaviour (the weaker edit
        # costs less), and prompts that have flipped already would reward strength for its own sake
        tie = moved and best is not None and abs(rate - best.refusal_rate) <= 1e-9
        if (
            best is None
            or sign * rate < sign * best.refusal_rate - 1e-9
            or (
                tie
                and refused is not None
                and best.refused_score is not None
                and sign * refused < sign * best.refused_score - 1e-6 * max(1.0, abs(best.refused_score))
            )
        ):
            best = TuneResult(steer, label, rate, kl, keep_rate, refusal_score=score, refused_score=refused)
            chain.append((best, step))
            stale = 0
        elif moved:  # a rate that has not responded yet is not a plateau: keep growing while KL allows
            stale += 1
        if sign * rate <= sign * target:
            stopped = f"target refusal rate {target:g} reached at {label}"
            break
        if stale >= patience:
            stopped = f"no improvement for {patience} steps"
            break
    if best is None:
        raise NoCandidateError(
            f"No candidate satisfies the constraints (KL budget {kl_budget} on the {kl_statistic}"
            + (f", keep refusal >= {keep_min_rate}" if keep is not None else "")
            + f"); first step: {history[0] if history else 'none'}.",
            history,
            kl_budget,
        )
    if distinct2_floor is not None:
        best, stopped = _quality_check(
            model, chain, harmful, harmless, stopped, distinct2_floor, distinct2_reference, batch_size
        )
        if best is None:
            raise NoCandidateError(
                f"No candidate keeps the steered completions fluent: {stopped}.", history, kl_budget
            )
    best.history, best.stopped = history, stopped
    return best


def _same_gate(a: Any, b: Any) -> bool:
    """Whether two gated steerings open on the same prompts (same layer, threshold and read-out; scaling keeps them)."""
    return a.gate_layer == b.gate_layer and a.threshold == b.threshold and bool(torch.equal(a.gate, b.gate))


def _quality_check(
    model: MoEModel,
    chain: list[tuple[TuneResult, dict[str, Any]]],
    harmful: list[str],
    harmless: list[str],
    stopped: str,
    floor: float,
    reference: float | None,
    batch_size: int,
) -> tuple[TuneResult | None, str]:
    """The strongest of ``chain`` whose harmful completions keep distinct-2 ≥ ``floor`` × ``reference``
    (the last one checked first, then a galloping search back), and why the walk stopped; None when none does."""
    if reference is None:
        reference = completion_distinct2(
            model, harmless, max_new_tokens=QUALITY_TOKENS, batch_size=batch_size
        )

    def passes(i: int) -> bool:
        res, step = chain[i]
        if res.distinct2 is None:
            res.distinct2 = step["distinct2"] = completion_distinct2(
                model, harmful, res.steer, max_new_tokens=QUALITY_TOKENS, batch_size=batch_size
            )
        res.distinct2_reference = reference
        return res.distinct2 >= floor * reference

    if passes(len(chain) - 1):
        return chain[-1][0], stopped
    # chain[hi] fails, chain[lo] passes (lo = -1: none known to). Gallop back from the end (the strength just
    # before the failing one is the usual answer: one more generation), then bisect what is left.
    lo, hi, step = -1, len(chain) - 1, 1
    while hi - step >= 0:
        if passes(hi - step):
            lo = hi - step
            break
        hi, step = hi - step, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    last = chain[-1][0]
    why = (
        f"distinct-2 {last.distinct2:.3g} < {floor:g} x {reference:.3g} (the unedited model's on the harmless "
        f"prompts) at {last.label}"
    )
    if lo < 0:
        return None, why
    kept = chain[lo][0]
    return kept, f"{stopped}; {why}: kept {kept.label} (distinct-2 {kept.distinct2:.3g})"


def coefficient_search(
    model: MoEModel,
    sv: Steering,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    **kw: Any,
) -> TuneResult:
    """:func:`search_candidates` over ``sv.scaled(s)`` for increasing ``s`` in ``scales``.

    If even the smallest scale is over the KL budget, the search is repeated once on
    :data:`FINER_FRACTIONS` of it (1/8, 1/4, 1/2), so a model that is sensitive to steering still gets
    the strongest strength inside the budget rather than none."""
    if not isinstance(sv, SteeringVectors) and not hasattr(sv, "scaled"):
        raise ValueError(
            f"coefficient_search needs SteeringVectors (or a scalable steering), got {type(sv).__name__}."
        )
    scales = [float(s) for s in scales]
    if not scales or any(not (s > 0 and s < float("inf")) for s in scales):
        raise ValueError(f"scales must be finite positive numbers, got {scales!r}.")
    scales = sorted(scales)
    try:
        return search_candidates(model, ((s, sv.scaled(s)) for s in scales), harmful, harmless, **kw)
    except NoCandidateError as err:
        if not err.first_over_kl_budget:
            raise  # the first step fit the KL budget (a fluency-floor failure is not retried at finer scales)
        finer = [scales[0] * f for f in FINER_FRACTIONS]
        res = search_candidates(model, ((s, sv.scaled(s)) for s in finer), harmful, harmless, **kw)
        res.history = err.history + res.history
        res.stopped = f"{res.stopped} (after scale {scales[0]:g} exceeded the KL budget)"
        return res


def autotune(
    name: str,
    model: MoEModel,
    harmful_train: Sequence[str],
    harmless_train: Sequence[str],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    fit_kwargs: dict[str, Any] | None = None,
    router_grid: Sequence[int] = (1, 2, 4, 8, 12, 16),
    fit: Callable[..., Any] | None = None,
    **search_kw: Any,
) -> TuneResult:
    """Fit method ``name`` on the training prompts and tune its strength on the validation prompts, as its
    registry entry's ``tuning`` says: the coefficient scale (``"coefficient"``, and for names outside the
    registry), or the fit keyword it names swept over ``router_grid`` (``steer_router``: ``n_deactivate``).
    Topic methods take ``keep=`` in ``fit_kwargs`` and ``keep=`` / ``keep_min_rate=`` in ``search_kw``."""
    fit_kwargs = dict(fit_kwargs or {})
    fitter = fit or (lambda **k: fit_method(name, model, harmful_train, harmless_train, **k))
    spec = METHODS.get(name)
    tuning = "coefficient" if spec is None else spec.tuning
    if tuning != "coefficient":
        cands = ((n, fitter(**{**fit_kwargs, tuning: n})) for n in router_grid)
        return search_candidates(model, cands, harmful_val, harmless_val, **search_kw)
    return coefficient_search(model, fitter(**fit_kwargs), harmful_val, harmless_val, **search_kw)
