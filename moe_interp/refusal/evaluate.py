"""Evaluate a (possibly edited) model on a prompt set: refusal rate, logit refusal score, side effects.

Side effects are measured against the unedited model (``base_model``, by default ``model`` without the
interventions): the first-token KL ``KL(p_base ‖ p_edited)`` at the last prompt position, and the
cross-entropy of the unedited model's greedy completions under the edited model.

:func:`refusal_flags` is the one per-prompt verdict under edits (greedy generation + substring judge, as in
:func:`evaluate`, or the logit score); :func:`~moe_interp.refusal.judges.refusal_rate` turns verdicts into
the one refusal rate (+ CI) that evaluation tables and steering comparisons report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from moe_interp.guards import check_prompts
from moe_interp.refusal.judges import (
    N_BOOT,
    Judge,
    JudgeResult,
    SubstringJudge,
    refusal_rate,
    refusal_score,
    resolve_refusal_ids,
)
from moe_interp.refusal.stats import bootstrap_ci

if TYPE_CHECKING:
    from moe_interp.model import Generation, MoEModel

__all__ = [
    "EvalResult",
    "as_interventions",
    "bootstrap_ci",
    "evaluate",
    "first_token_kl",
    "refusal_flags",
    "refusal_scores",
]


@dataclass
class EvalResult:
    """Aggregate figures of one evaluation plus per-prompt ``details``."""

    n: int
    refusal_rate: float
    refusal_rate_ci: tuple[float, float]
    mean_refusal_score: float
    kl_to_baseline: float | None
    ce_of_baseline_completions: float | None
    ce_of_baseline_completions_unedited: float | None = None
    details: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    #: the unedited model's greedy completions (``baseline=True``), to pass to another evaluation of the same
    #: prompts as ``baseline_generations``; not part of :meth:`to_dict`
    baseline_generations: list[Generation] = field(default_factory=list, repr=False)
    #: the evaluated (edited) model's greedy completions with their log-probabilities: with no interventions,
    #: what another evaluation of the same prompts can take as ``baseline_generations``; not part of :meth:`to_dict`
    generations: list[Generation] = field(default_factory=list, repr=False)

    def to_dict(self, details: bool = True) -> dict[str, Any]:
        """JSON-ready dict (``details=False`` drops the per-prompt rows)."""
        d = asdict(self)
        d.pop("baseline_generations")
        d.pop("generations")
        d["refusal_rate_ci"] = list(self.refusal_rate_ci)
        if not details:
            d.pop("details")
        return d


def first_token_kl(
    logits_base: Float[Tensor, "batch vocab"], logits_edit: Float[Tensor, "batch vocab"]
) -> Float[Tensor, " batch"]:
    """``KL(softmax(base) ‖ softmax(edit))`` per row, in float64."""
    lb = torch.log_softmax(logits_base.to(torch.float64), -1)
    le = torch.log_softmax(logits_edit.to(torch.float64), -1)
    return (lb.exp() * (lb - le)).sum(-1)


def _forced_nll(model: MoEModel, batch: list[str], comps: list[list[int]]) -> tuple[list[float], list[int]]:
    """Summed NLL of each completion under ``model`` and the active interventions, and its length: the
    completion teacher-forced through the generation loop, so each intervention acts as when generating (a
    gate decided at the last prompt position, position scopes counted on the prompt) — a single forward over
    prompt + completion would show them the completion as prompt."""
    gens = model.generate(batch, force=comps, return_scores=True)
    lps = [cast("Generation", g[0]).token_logprobs for g in gens]
    return [-float(sum(x)) for x in lps], [len(c) for c in comps]


def as_interventions(edits: Any, model: MoEModel | None = None) -> list[Any]:
    """A list of interventions from ``None``, one intervention, a sequence of them, or a steering object or
    circuit (anything with ``to_interventions(model)``; ``model`` lets it check that it fits)."""
    if edits is None:
        return []
    if hasattr(edits, "to_interventions"):
        return list(edits.to_interventions() if model is None else edits.to_interventions(model))
    if isinstance(edits, str) or not isinstance(edits, Sequence):
        return [edits]
    return list(edits)


@torch.no_grad()
def refusal_scores(
    model: MoEModel,
    prompts: Sequence[str],
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 32,
) -> Float[Tensor, " n"]:
    """Per-prompt logit refusal score (:func:`~moe_interp.refusal.judges.refusal_score`, float64) at the last
    prompt position, under the model's active interventions; ``refusal_ids`` default to the model's."""
    prompts = check_prompts(prompts)
    ids = resolve_refusal_ids(model, refusal_ids)
    out = [
        refusal_score(model.forward(prompts[s : s + batch_size], last_only=True)[:, -1], ids)
        for s in range(0, len(prompts), batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def steered_refusal_scores(
    model: MoEModel, prompts: Sequence[str], interventions: Any = (), *, batch_size: int = 32
) -> Float[Tensor, " n"]:
    """:func:`refusal_scores` under ``interventions`` (anything :func:`as_interventions` takes): the logit
    judge's continuous confidence, of which ``judge="logit"`` refusal flags are the sign."""
    with model.intervene(*as_interventions(interventions, model)):
        return refusal_scores(model, check_prompts(prompts), batch_size=batch_size)


@torch.no_grad()
def refusal_flags(
    model: MoEModel,
    prompts: Sequence[str],
    interventions: Any = (),
    *,
    judge: str = "generation",
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> Bool[Tensor, " n"]:
    """Bool ``[n]``: refused or not, under ``interventions`` (anything :func:`as_interventions` takes).

    ``judge="generation"``: greedy ``max_new_tokens`` tokens judged by :class:`SubstringJudge`, exactly as in
    :func:`evaluate` (pass the evaluation's ``max_new_tokens`` wherever rates are compared with it);
    ``judge="logit"``: :func:`refusal_scores` > 0 (no generation). Feed the flags to
    :func:`~moe_interp.refusal.judges.refusal_rate` for the rate.
    """
    prompts = check_prompts(prompts)
    if judge == "logit":
        return steered_refusal_scores(model, prompts, interventions, batch_size=batch_size) > 0
    ivs = as_interventions(interventions, model)
    if judge != "generation":
        raise ValueError(f"judge must be 'generation' or 'logit', got {judge!r}.")
    _check_sizes(batch_size, max_new_tokens)
    flags: list[bool] = []  # evaluate's verdicts, without the logit scores it computes beside them
    sub = SubstringJudge()
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s : s + batch_size]
        _, verdicts = _judged_completions(model, batch, ivs, sub, max_new_tokens, scores=False)
        flags += [bool(v.refused) for v in verdicts]
    return torch.tensor(flags, dtype=torch.bool)


def _check_sizes(batch_size: int, max_new_tokens: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")


def _judged_completions(
    model: MoEModel,
    batch: list[str],
    interventions: Sequence[Any],
    judge: Judge,
    max_new_tokens: int,
    scores: bool = True,
) -> tuple[list[Generation] | None, list[JudgeResult]]:
    """Greedy completions of one batch under ``interventions`` and the judge's verdicts on their texts: the one
    generation judgement of :func:`evaluate` and :func:`refusal_flags`. With ``scores``, the completions with
    each token's log-probability; without, only the verdicts (generation keeps no per-step logits)."""
    with model.intervene(*interventions):
        out = model.generate(batch, max_new_tokens=max_new_tokens, return_scores=scores)
        if not scores:  # the texts (generate's return type is a union)
            return None, list(judge.judge(batch, cast("list[str]", out)))
        gens = [cast("Generation", g[0]) for g in out]  # one list of Generation per prompt
        return gens, list(judge.judge(batch, [g.text for g in gens]))


@torch.no_grad()
def evaluate(
    model: MoEModel,
    prompts: Sequence[str],
    interventions: Sequence[Any] = (),
    judge: Judge | None = None,
    *,
    max_new_tokens: int = 32,
    baseline: bool = True,
    base_model: MoEModel | None = None,
    baseline_generations: Sequence[Generation] | None = None,
    refusal_token_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    n_boot: int = N_BOOT,
    seed: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Refusal rate (with bootstrap 95% CI), mean logit refusal score and side effects of an edit.

    The edited model is ``model`` under ``interventions`` (e.g. ``[DirectionalAblation(r)]``, or none for
    an orthogonalised model). ``judge`` (default :class:`SubstringJudge`) labels greedy completions of
    ``max_new_tokens``; a model-bound judge (``LogitJudge(model)``) is called inside the interventions.
    With ``baseline=True`` the unedited model (``base_model``, default ``model`` with no interventions)
    also generates greedily, giving ``kl_to_baseline`` (mean first-token ``KL(p_base ‖ p_edited)`` at the
    last prompt position) and ``ce_of_baseline_completions`` (token-mean NLL of the unedited completions
    under the edited model, teacher-forced through the generation loop so that every edit acts as when
    generating; ``ce_of_baseline_completions_unedited`` is the same under the unedited model, read from the
    baseline completions' own log-probabilities). ``interventions`` may also be a steering
    object (see :func:`as_interventions`). The rate and its CI come from
    :func:`~moe_interp.refusal.judges.refusal_rate` (``n_boot`` resamples). ``baseline_generations`` (an
    earlier result's ``baseline_generations`` for the same prompts, ``max_new_tokens`` and base model) skips
    generating the baseline again when several edits are evaluated on one prompt set.
    """
    prompts = check_prompts(prompts)
    interventions = as_interventions(interventions, model)
    _check_sizes(batch_size, max_new_tokens)
    if baseline_generations is not None and len(baseline_generations) != len(prompts):
        raise ValueError(
            f"baseline_generations has {len(baseline_generations)} completions for {len(prompts)} prompts; pass "
            "the baseline_generations of an evaluation of the same prompts."
        )
    judge = SubstringJudge() if judge is None else judge
    if not hasattr(judge, "judge"):
        raise TypeError(f"judge must have judge(instructions, completions); got {type(judge).__name__}.")
    base = model if base_model is None else base_model
    tok_ids = resolve_refusal_ids(model, refusal_token_ids)

    details: list[dict[str, Any]] = []
    all_base_gens: list[Generation] = []
    all_gens: list[Generation] = []
    tot_nll = tot_nll_base = 0.0
    tot_tok = 0
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc="evaluate", disable=not progress):
        batch = prompts[s : s + batch_size]
        enc = model.tokenize(batch, chat=True)
        base_gens = None
        if baseline and baseline_generations is not None:
            base_gens = list(baseline_generations[s : s + batch_size])
        elif baseline:
            # return_scores=True: one list of Generation per prompt (generate's return type is a union)
            base_gens = [
                cast("Generation", g[0])
                for g in base.generate(batch, max_new_tokens=max_new_tokens, return_scores=True)
            ]
        all_base_gens.extend(base_gens or [])
        gens, verdicts = _judged_completions(model, batch, interventions, judge, max_new_tokens)
        assert gens is not None  # scored completions (scores=True)
        all_gens.extend(gens)
        with model.intervene(*interventions):
            # first-token logits from the prompt alone, so interventions placed by position offset (e.g. a
            # circuit's post-instruction positions) act where they were meant to
            last = model.forward(enc, last_only=True).float()[:, -1]
            if base_gens is not None:
                comps = [list(g.token_ids) for g in base_gens]
                nll, ntok = _forced_nll(model, batch, comps)
        scores = refusal_score(last, tok_ids)
        if base_gens is not None:
            last_b = base.forward(enc, last_only=True).float()[:, -1]
            if all(len(g.token_logprobs) == len(g.token_ids) for g in base_gens):  # scored when generated
                nll_b = [-float(sum(g.token_logprobs)) for g in base_gens]
            else:  # e.g. completions built by hand
                nll_b, _ = _forced_nll(base, batch, comps)
            kls = first_token_kl(last_b, last)
            tot_nll += sum(nll)
            tot_nll_base += sum(nll_b)
            tot_tok += sum(ntok)
        for i, p in enumerate(batch):
            row: dict[str, Any] = {
                "prompt": p,
                "completion": gens[i].text,
                "refused": bool(verdicts[i].refused),
                "judge_score": float(verdicts[i].score),
                "refusal_score": float(scores[i]),
            }
            if base_gens is not None:
                row.update(
                    baseline_completion=base_gens[i].text,
                    kl=float(kls[i]),
                    ce=nll[i] / ntok[i] if ntok[i] else None,
                )
            details.append(row)

    rate = refusal_rate([bool(d["refused"]) for d in details], n_boot=n_boot, seed=seed)
    kl = sum(d["kl"] for d in details) / len(details) if baseline else None
    return EvalResult(
        n=len(details),
        refusal_rate=float(rate),
        refusal_rate_ci=rate.ci,
        mean_refusal_score=sum(d["refusal_score"] for d in details) / len(details),
        kl_to_baseline=kl,
        ce_of_baseline_completions=tot_nll / tot_tok if baseline and tot_tok else None,
        ce_of_baseline_completions_unedited=tot_nll_base / tot_tok if baseline and tot_tok else None,
        details=details,
        config={
            "judge": type(judge).__name__,
            "max_new_tokens": max_new_tokens,
            "interventions": [type(iv).__name__ for iv in interventions],
            "refusal_token_ids": tok_ids,
        },
        baseline_generations=all_base_gens,
        generations=all_gens,
    )
