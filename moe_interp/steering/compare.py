"""Evaluating and comparing steering: harmless KL and refusal rates under one steering object or several.

Refusal verdicts and rates come from :mod:`moe_interp.refusal` (:func:`~moe_interp.refusal.evaluate.refusal_flags`
and :func:`~moe_interp.refusal.judges.refusal_rate`), the same functions behind the evaluation tables, so a
comparison's ``baseline`` row matches an evaluation of the same prompts with the same ``max_new_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.interventions import check_coeff
from moe_interp.refusal.evaluate import as_interventions, refusal_flags
from moe_interp.refusal.judges import N_BOOT, refusal_rate
from moe_interp.steering.edits import RouterSteering
from moe_interp.steering.fit import check_prompt_list
from moe_interp.steering.vectors import SteeringVectors

if TYPE_CHECKING:
    from moe_interp.model import Generation, MoEModel

__all__ = [
    "KL_STATISTICS",
    "KL_TRIM",
    "check_kl_statistic",
    "compare_methods",
    "completion_distinct2",
    "distinct2",
    "harmless_kl",
    "last_logits",
    "per_prompt_kl",
    "refusal_flags",
    "scaled",
    "summarise_kl",
    "touched",
    "with_coeff",
]


#: Statistics of the per-prompt harmless KL that a KL budget can be put on (see :func:`summarise_kl`).
KL_STATISTICS: tuple[str, ...] = ("mean", "median", "trimmed_mean")
#: Share of prompts cut from each end of the sorted per-prompt KLs for ``"trimmed_mean"``.
KL_TRIM: float = 0.05


def check_kl_statistic(statistic: str, name: str = "KL statistic") -> None:
    """ValueError naming ``name`` unless ``statistic`` is one of :data:`KL_STATISTICS`."""
    if statistic not in KL_STATISTICS:
        raise ValueError(f"Unknown {name} {statistic!r}; expected one of {KL_STATISTICS}.")


def summarise_kl(per_prompt: Float[Tensor, " n"], statistic: str = "mean") -> float:
    """One number from per-prompt KLs: ``"mean"``, ``"median"`` (mean of the two middle values for even n)
    or ``"trimmed_mean"`` (:data:`KL_TRIM` cut from each end; nothing is cut below 20 values). NaN if any
    value is NaN.

    The per-prompt KL of a steering vector is heavy-tailed (a few boundary prompts that it flips carry most of
    the sum), so a budget on the mean is decided by those few prompts; median and trimmed mean are steadier.
    """
    check_kl_statistic(statistic)
    x = per_prompt.double().flatten()
    if x.numel() == 0:
        raise ValueError("summarise_kl needs at least one per-prompt KL value.")
    if bool(x.isnan().any()):  # NaN must stay NaN (over any budget), not be sorted away by the trimming
        return math.nan
    if statistic == "mean":
        return float(x.mean())
    if statistic == "median":
        return float(x.quantile(0.5))
    cut = int(KL_TRIM * x.numel())
    return float(x.sort().values[cut : x.numel() - cut].mean())


@torch.no_grad()
def per_prompt_kl(
    model: MoEModel,
    prompts: Sequence[str],
    steer: Any,
    batch_size: int = 32,
    base_logits: Tensor | None = None,
) -> Float[Tensor, " n"]:
    """``KL(base ‖ steered)`` of the next-token distribution at the last prompt position, per prompt.

    Steering scoped to generated tokens only (``positions="generated"``) never acts there, so it is refused
    rather than measured as KL 0 (which would let a strength search accept any strength)."""
    prompts = check_prompt_list(prompts, "prompts")
    ivs = as_interventions(steer, model)
    if ivs and all(getattr(iv, "positions", None) == "generated" for iv in ivs):
        raise ValueError(
            "per-prompt KL is measured at the last prompt position, where steering with positions='generated' "
            "does nothing; measure it with positions 'all', 'after_first' or a list of ints."
        )
    if base_logits is None:
        base_logits = last_logits(model, prompts, [], batch_size)
    steered = last_logits(model, prompts, ivs, batch_size)
    lp, lq = torch.log_softmax(base_logits.double(), -1), torch.log_softmax(steered.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def harmless_kl(
    model: MoEModel,
    prompts: Sequence[str],
    steer: Any,
    batch_size: int = 32,
    base_logits: Tensor | None = None,
    statistic: str = "mean",
) -> float:
    """:func:`summarise_kl` (default: the mean) of :func:`per_prompt_kl`."""
    check_kl_statistic(statistic)
    return summarise_kl(per_prompt_kl(model, prompts, steer, batch_size, base_logits), statistic)


def last_logits(
    model: MoEModel, prompts: list[str], ivs: list[Any], batch_size: int
) -> Float[Tensor, "n vocab"]:
    """Next-token logits (float32) at the last prompt position under ``ivs``."""
    with model.intervene(*ivs):
        return torch.cat(
            [
                model.forward(prompts[s : s + batch_size], last_only=True)[:, -1].float()
                for s in range(0, len(prompts), batch_size)
            ]
        )


def distinct2(ids: Sequence[int]) -> float:
    """Share of distinct bigrams among a token sequence's bigrams (Li et al. 2016's distinct-2 of one
    completion; 1.0 when it has fewer than two tokens): degenerate loops such as ``A: A: A: …`` score low."""
    pairs = list(zip(ids, ids[1:], strict=False))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


@torch.no_grad()
def completion_distinct2(
    model: MoEModel,
    prompts: Sequence[str],
    steer: Any = (),
    *,
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> float:
    """Mean :func:`distinct2` of the greedy ``max_new_tokens``-token completions of ``prompts`` under ``steer``
    (anything :func:`~moe_interp.refusal.evaluate.as_interventions` takes; ``()``: unedited), counted on the
    generated token ids without the trailing end and padding tokens (:attr:`MoEModel.end_token_ids`, the pad id:
    a finished sequence padded to the batch's length must not count as a loop). A refusal rate counts a degenerate
    completion as compliance and a harmless-KL budget does not see an edit that a gate keeps off harmless
    prompts; this is the check on what the steered prompts get instead."""
    prompts = check_prompt_list(prompts, "prompts")
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2 for a bigram statistic, got {max_new_tokens}.")
    stop = model.end_token_ids | {model.tokenizer.pad_token_id}
    tot = 0.0
    with model.intervene(*as_interventions(steer, model)):
        for s in range(0, len(prompts), batch_size):
            gens = model.generate(
                prompts[s : s + batch_size], max_new_tokens=max_new_tokens, return_scores=True
            )
            for g in gens:  # return_scores=True: one list of Generation per prompt
                ids = list(cast("Generation", g[0]).token_ids)
                while ids and ids[-1] in stop:
                    ids.pop()
                tot += distinct2(ids)
    return tot / len(prompts)


def touched(steer: Any, model: MoEModel | None = None) -> dict[str, Any]:
    """Layers and (layer, expert) pairs a steering object touches (``layers=None``: all of ``model``'s)."""
    if steer is None:
        return {"layers": [], "n_layers": 0, "n_experts": 0}
    if isinstance(steer, RouterSteering):
        return {"layers": steer.layers, "n_layers": len(steer.layers), "n_experts": steer.n_expert_slots}
    if isinstance(getattr(steer, "steer", None), SteeringVectors):  # a gate around vectors: what they touch
        return touched(steer.steer, model)
    if isinstance(steer, SteeringVectors):
        n_exp = sum(1 for k in steer.keys if k[1] is not None or ".experts." in k[0])
        return {"layers": steer.layers, "n_layers": len(steer.layers), "n_experts": n_exp}
    every = list(range(model.spec.n_layers)) if model is not None else []
    layers = sorted(
        {L for iv in as_interventions(steer) for L in (every if getattr(iv, "layers", 0) is None else [])}
        | {L for iv in as_interventions(steer) for L in (getattr(iv, "layers", None) or [])}
        | {iv.layer for iv in as_interventions(steer) if isinstance(getattr(iv, "layer", None), int)}
    )
    return {"layers": layers, "n_layers": len(layers), "n_experts": 0}


def compare_methods(
    model: MoEModel,
    methods: Mapping[str, Any],
    harmful_test: Sequence[str],
    political_test: Sequence[str],
    harmless_test: Sequence[str],
    *,
    judge: str = "generation",
    max_new_tokens: int = 8,
    n_boot: int = N_BOOT,
    seed: int = 0,
    include_baseline: bool = True,
    baseline: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Per method (name → steering object or list of interventions): harmful / political / harmless refusal
    rates with 95% bootstrap CIs, harmless KL (last prompt position; mean, and median / trimmed mean as
    ``harmless_kl_median`` / ``harmless_kl_trimmed_mean``) and what it touches. With ``judge="generation"``,
    ``harmful_first_token_refusal`` is the harmful rate by the logit judge too (P(refusal first token) > 1/2),
    the judge strength searches use: under steering the two disagree when a refusal's first token ("I") is
    followed by no refusal, and the table shows it.

    Rates are :func:`~moe_interp.refusal.judges.refusal_rate` of
    :func:`~moe_interp.refusal.evaluate.refusal_flags`: with ``judge="generation"``, pass the
    ``max_new_tokens`` (and ``n_boot``) of the evaluation the table sits next to, so that the same prompts
    get the same baseline (the pipeline passes its config's ``max_new_tokens``). ``baseline`` (split →
    ``RefusalRate.to_dict()``, splits ``harmful`` / ``political`` / ``harmless``) gives the unsteered rates
    already measured, so the baseline row is not generated a second time."""
    if baseline is not None and not {"harmful", "political", "harmless"} <= set(baseline):
        raise ValueError(
            f"baseline must map 'harmful', 'political' and 'harmless' to refusal rates, got {sorted(baseline)}."
        )
    items = ([("baseline", None)] if include_baseline else []) + list(methods.items())
    harmless_test = check_prompt_list(harmless_test, "harmless_test")
    base = last_logits(model, harmless_test, [], batch_size)
    rows = []
    for name, steer in items:
        row: dict[str, Any] = {"method": name}
        for split, prompts in (
            ("harmful", harmful_test),
            ("political", political_test),
            ("harmless", harmless_test),
        ):
            if steer is None and baseline is not None:
                row[f"{split}_refusal"] = dict(baseline[split])
                continue
            flags = refusal_flags(
                model, prompts, steer, judge=judge, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            row[f"{split}_refusal"] = refusal_rate(flags, n_boot=n_boot, seed=seed).to_dict()
        if judge == "generation":  # one forward: the strength search's judge beside the table's
            first = refusal_flags(model, harmful_test, steer, judge="logit", batch_size=batch_size)
            row["harmful_first_token_refusal"] = refusal_rate(first, n_boot=n_boot, seed=seed).to_dict()
        kls = None if steer is None else per_prompt_kl(model, harmless_test, steer, batch_size, base)
        row["harmless_kl"] = 0.0 if kls is None else summarise_kl(kls, "mean")
        for stat in KL_STATISTICS[1:]:
            row[f"harmless_kl_{stat}"] = 0.0 if kls is None else summarise_kl(kls, stat)
        row.update(touched(steer, model))
        if isinstance(steer, SteeringVectors):
            row["coeffs"] = sorted({round(c, 4) for c in steer.coeffs.values()})
            row["conditioning"] = steer.conditioning
        rows.append(row)
    return rows


def scaled(steer: Any, factor: float) -> Any:
    """Deprecated (use ``steer.scaled(factor)``): scale :class:`SteeringVectors`, return anything else unchanged."""
    if isinstance(steer, SteeringVectors):
        return steer.scaled(factor)
    return steer


def with_coeff(sv: SteeringVectors, coeff: float) -> SteeringVectors:
    """Copy of ``sv`` with every coefficient set to ``coeff``."""
    return replace(sv, coeffs=dict.fromkeys(sv.vectors, check_coeff(coeff)))
