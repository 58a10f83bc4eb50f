"""Select the refusal direction among (layer, position) candidates, as in Arditi et al. 2024.

For each candidate direction ``r`` (diff-of-means at ``blocks.{layer}.hook_resid_pre``, position ``pos``):

* **bypass**: mean logit refusal score on harmful prompts with ``r̂`` ablated at every layer
  (:class:`~moe_interp.interventions.DirectionalAblation`); lower is better;
* **induce**: mean refusal score on harmless prompts with ``coeff · r`` (raw, un-normalised) added at the
  candidate's own layer, every position (:class:`~moe_interp.interventions.AddVector`);
* **kl**: mean ``KL(p_base ‖ p_ablated)`` of the harmless last-token distributions.

Candidates with ``kl > kl_threshold``, ``induce < induce_threshold`` or a layer in the last
``prune_last_frac`` of the model are discarded; the lowest bypass score among the rest wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from moe_interp.interventions import AddVector, DirectionalAblation, check_vector
from moe_interp.refusal.directions import RefusalDirections
from moe_interp.refusal.evaluate import first_token_kl
from moe_interp.refusal.judges import refusal_score, resolve_refusal_ids

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = ["NoDirectionSelected", "SelectionResult", "select_direction"]


@dataclass
class SelectionResult:
    """The chosen direction, its scores, and the full candidate table (for ``plot_selection_scores``).

    ``passed`` is False when no candidate passed the filters; the chosen entry is then the best by bypass
    score among all candidates and ``reason`` says why it was filtered.
    """

    layer: int
    pos: int
    direction: Float[Tensor, " d_model"]  # unit norm
    raw: Float[Tensor, " d_model"]  # un-normalised diff of means
    bypass: float
    induce: float
    kl: float
    passed: bool
    reason: str
    table: list[dict[str, Any]]
    baseline_harmful: float
    baseline_harmless: float
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (directions as lists)."""
        return {
            "layer": self.layer,
            "pos": self.pos,
            "bypass": self.bypass,
            "induce": self.induce,
            "kl": self.kl,
            "passed": self.passed,
            "reason": self.reason,
            "baseline_harmful": self.baseline_harmful,
            "baseline_harmless": self.baseline_harmless,
            "raw_norm": float(self.raw.norm()),
            "params": self.params,
            "table": self.table,
            "direction": self.direction.tolist(),
            "raw": self.raw.tolist(),
        }


class NoDirectionSelected(ValueError):
    """No candidate passed the filters; ``.result`` holds the best candidate by bypass and the table."""

    def __init__(self, message: str, result: SelectionResult) -> None:
        super().__init__(message)
        self.result = result


def _check_number(name: str, x: Any, *, allow_inf: bool = False) -> float:
    ok = isinstance(x, int | float) and not math.isnan(x) and (allow_inf or math.isfinite(x))
    if not ok:
        what = "a number (±inf disables the filter)" if allow_inf else "a finite number"
        raise ValueError(f"{name} must be {what}, got {x!r}.")
    return float(x)


def _batched_last_logits(
    model: MoEModel, encs: list[Any], interventions: Sequence[Any] = ()
) -> Float[Tensor, "n vocab"]:
    with model.intervene(*interventions):
        return torch.cat([model.forward(e, last_only=True).float()[:, -1] for e in encs])


@torch.no_grad()
def select_direction(
    model: MoEModel,
    directions: RefusalDirections,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    refusal_token_ids: Sequence[int] | None = None,
    kl_threshold: float = 0.1,
    induce_threshold: float = 0.0,
    prune_last_frac: float = 0.2,
    coeff: float = 1.0,
    batch_size: int = 32,
    strict: bool = True,
    progress: bool = False,
) -> SelectionResult:
    """Score every candidate of ``directions`` and pick the refusal direction (Arditi et al.).

    Raises :class:`NoDirectionSelected` (a ``ValueError`` carrying ``.result``) when no candidate passes
    the filters; with ``strict=False`` that result is returned instead, with ``passed=False``.
    """
    from moe_interp.model import _check_prompts

    if not isinstance(directions, RefusalDirections):
        raise ValueError(f"directions must be a RefusalDirections, got {type(directions).__name__}.")
    d = model.spec.d_model
    if directions.d != d:
        raise ValueError(
            f"The candidate directions have size {directions.d}, but this model has d_model={d}."
        )
    if not torch.isfinite(directions.candidates).all():
        raise ValueError("The candidate directions contain NaN or inf values.")
    for L in directions.layers:
        model.check_layer(L)
    harmful = _check_prompts(harmful_val)
    harmless = _check_prompts(harmless_val)
    kl_threshold = _check_number("kl_threshold", kl_threshold, allow_inf=True)
    induce_threshold = _check_number("induce_threshold", induce_threshold, allow_inf=True)
    coeff = _check_number("coeff", coeff)
    prune_last_frac = _check_number("prune_last_frac", prune_last_frac)
    if not 0.0 <= prune_last_frac < 1.0:
        raise ValueError(f"prune_last_frac must be in [0, 1), got {prune_last_frac}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    ids = resolve_refusal_ids(model, refusal_token_ids)

    def encode(prompts: list[str]) -> list[Any]:
        return [model.tokenize(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]

    enc_harmful, enc_harmless = encode(harmful), encode(harmless)
    base_harmless = _batched_last_logits(model, enc_harmless)
    base_harmful = _batched_last_logits(model, enc_harmful)
    baseline_harmful = float(refusal_score(base_harmful, ids).mean())
    baseline_harmless = float(refusal_score(base_harmless, ids).mean())
    n_layers = model.spec.n_layers
    first_pruned = int(n_layers * (1.0 - prune_last_frac))

    table: list[dict[str, Any]] = []
    cands = [(i, j) for j in range(len(directions.positions)) for i in range(len(directions.layers))]
    for i, j in tqdm(cands, desc="select direction", disable=not progress):
        layer, pos = directions.layers[i], directions.positions[j]
        raw = directions.candidates[i, j].float()
        row: dict[str, Any] = {"layer": layer, "pos": pos, "bypass": math.nan, "induce": math.nan}
        row["kl"] = math.nan
        if float(raw.norm()) == 0.0:
            row.update(kept=False, reason="zero vector")
            table.append(row)
            continue
        abl = [DirectionalAblation(raw)]
        row["bypass"] = float(refusal_score(_batched_last_logits(model, enc_harmful, abl), ids).mean())
        row["kl"] = float(
            first_token_kl(base_harmless, _batched_last_logits(model, enc_harmless, abl)).mean()
        )
        add = [AddVector(f"blocks.{layer}.hook_resid_pre", raw, coeff=coeff, positions="all")]
        row["induce"] = float(refusal_score(_batched_last_logits(model, enc_harmless, add), ids).mean())
        reasons = []
        if any(math.isnan(row[k]) for k in ("bypass", "induce", "kl")):
            reasons.append("NaN score")
        if layer >= first_pruned:
            reasons.append(f"layer {layer} in the last {prune_last_frac:.0%} of layers (>= {first_pruned})")
        if row["kl"] > kl_threshold:
            reasons.append(f"kl {row['kl']:.4g} > kl_threshold {kl_threshold:g}")
        if row["induce"] < induce_threshold:
            reasons.append(f"induce {row['induce']:.4g} < induce_threshold {induce_threshold:g}")
        row.update(kept=not reasons, reason="; ".join(reasons) if reasons else "kept")
        table.append(row)

    kept = [r for r in table if r["kept"]]
    scored = [r for r in table if not math.isnan(r["bypass"])]
    if not scored:
        raise ValueError("Every candidate direction is the zero vector; nothing to select.")
    pool = kept or scored
    best = min(pool, key=lambda r: r["bypass"])
    raw = directions.raw(best["layer"], best["pos"]).float()
    result = SelectionResult(
        layer=best["layer"],
        pos=best["pos"],
        direction=check_vector(raw / raw.norm(), d, "direction"),
        raw=raw.clone(),
        bypass=best["bypass"],
        induce=best["induce"],
        kl=best["kl"],
        passed=bool(kept),
        reason=best["reason"],
        table=table,
        baseline_harmful=baseline_harmful,
        baseline_harmless=baseline_harmless,
        params=dict(
            kl_threshold=kl_threshold,
            induce_threshold=induce_threshold,
            prune_last_frac=prune_last_frac,
            coeff=coeff,
            refusal_token_ids=ids,
            n_harmful=len(harmful),
            n_harmless=len(harmless),
        ),
    )
    if not kept:
        msg = (
            f"No candidate direction passed the filters (kl <= {kl_threshold:g}, induce >= {induce_threshold:g}, "
            f"layer < {first_pruned}). Best by bypass score: layer {best['layer']}, pos {best['pos']} "
            f"(bypass {best['bypass']:.4g}), filtered because: {best['reason']}."
        )
        if strict:
            raise NoDirectionSelected(msg, result)
    return result
