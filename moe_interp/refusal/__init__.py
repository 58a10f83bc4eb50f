"""Refusal analysis: judges, streaming activation statistics and candidate refusal directions.

One name per refusal measure (every module reports these, so the same prompts give the same numbers):

===========================  ===================================================================================
concept                      function
===========================  ===================================================================================
score (per prompt)           :func:`refusal_score` — log-odds of a refusal first token from last-position logits
                             (checked, float64); :func:`refusal_logodds` is its differentiable core (patching's
                             ``refusal_metric`` is the batch mean of it as a gradient metric);
                             :func:`~moe_interp.refusal.evaluate.refusal_scores` — the score of each prompt of a
                             model under its active edits (``moe_interp.patching`` re-exports it);
                             :func:`resolve_refusal_ids` — the refusal tokens every score uses (given ids
                             checked against the vocabulary, else the model's own)
confidence (per prompt)      :func:`refusal_confidence` / :meth:`LLMJudge.confidences` — LLM-judge value in [-1, 1]
verdict (per prompt)         :class:`JudgeResult` from a :class:`Judge`; for a model under edits
                             :func:`~moe_interp.refusal.evaluate.refusal_flags` (greedy generation + substring
                             judge as in :func:`evaluate`, or ``score > 0``); it was ``steering.methods.refusal_flags``
rate (over prompts)          :func:`refusal_rate` — fraction refused + bootstrap 95% CI (:class:`RefusalRate`, a
                             float); :func:`evaluate`, steering comparisons and autotuning all use it (it replaces
                             steering's ``_rate`` and the inline mean of ``evaluate``)
===========================  ===================================================================================
"""

from moe_interp.refusal.directions import (
    RefusalDirections,
    collect_resid_acts,
    collect_resid_stats,
    confidence_weights,
    diff_of_means,
    directions_from_stats,
    iter_resid_acts,
    pca_direction,
    post_instruction_positions,
    resid_names,
    ridge_direction,
    weighted_moments,
    weighted_ridge_direction,
)
from moe_interp.refusal.evaluate import (
    EvalResult,
    as_interventions,
    bootstrap_ci,
    evaluate,
    first_token_kl,
    refusal_flags,
    refusal_scores,
)
from moe_interp.refusal.judges import (
    N_BOOT,
    REFUSAL_PHRASES,
    REFUSAL_START_PHRASES,
    Judge,
    JudgeResult,
    LogitJudge,
    RefusalRate,
    SubstringJudge,
    refusal_first_token_ids,
    refusal_logodds,
    refusal_rate,
    refusal_score,
    resolve_refusal_ids,
)
from moe_interp.refusal.llm_judge import (
    JUDGE_PROMPT,
    JudgeBackendError,
    LabelBackend,
    LLMJudge,
    ModelLabelBackend,
    OpenAIChatBackend,
    SubstringLabelBackend,
    parse_label,
    refusal_confidence,
)
from moe_interp.refusal.orthogonalize import ResidualWriter, orthogonalize, residual_writers
from moe_interp.refusal.prompts_io import load_prompt_file
from moe_interp.refusal.selection import NoDirectionSelected, SelectionResult, select_direction
from moe_interp.refusal.stats import StreamingMoments

__all__ = [
    "JUDGE_PROMPT",
    "N_BOOT",
    "REFUSAL_PHRASES",
    "REFUSAL_START_PHRASES",
    "Judge",
    "JudgeBackendError",
    "JudgeResult",
    "LLMJudge",
    "LabelBackend",
    "LogitJudge",
    "ModelLabelBackend",
    "OpenAIChatBackend",
    "RefusalDirections",
    "RefusalRate",
    "StreamingMoments",
    "SubstringJudge",
    "SubstringLabelBackend",
    "collect_resid_acts",
    "collect_resid_stats",
    "confidence_weights",
    "diff_of_means",
    "directions_from_stats",
    "iter_resid_acts",
    "parse_label",
    "pca_direction",
    "post_instruction_positions",
    "refusal_confidence",
    "refusal_first_token_ids",
    "refusal_flags",
    "refusal_rate",
    "refusal_logodds",
    "refusal_score",
    "resolve_refusal_ids",
    "refusal_scores",
    "resid_names",
    "ridge_direction",
    "weighted_moments",
    "weighted_ridge_direction",
    # selection / orthogonalisation / evaluation
    "EvalResult",
    "as_interventions",
    "NoDirectionSelected",
    "ResidualWriter",
    "SelectionResult",
    "bootstrap_ci",
    "evaluate",
    "first_token_kl",
    "load_prompt_file",
    "orthogonalize",
    "residual_writers",
    "select_direction",
]
