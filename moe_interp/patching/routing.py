"""Routing statistics: which experts are selected on harmful vs harmless prompts.

- :func:`expert_selection_frequency`: P(expert in top-k) per layer over (prompt, position) pairs;
- :func:`routing_risk_difference`: P(selected | harmful) − P(selected | harmless) (SteerMoE);
- :func:`top1_percentage_difference`: % of the last ``n`` prompt positions where the expert is top-1,
  harmful minus harmless (Expert-Aware Refusal Steering);
- :func:`routing_predicts_ablation`: Spearman between |risk difference| and |ablation effect|.

Non-MoE layers give zero rows. Prompts are left padded, so negative offsets (``[-5, ..., -1]``) align the
chat template's last tokens across prompts of any length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = [
    "expert_selection_counts",
    "expert_selection_frequency",
    "routing_predicts_ablation",
    "routing_risk_difference",
    "top1_frequency",
    "top1_percentage_difference",
]


def _check_prompt_list(prompts: Any, what: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"{what} must be a non-empty list of strings.")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must contain only strings.")
    return list(prompts)


def _check_offsets(positions: Any) -> list[int] | None:
    if positions is None:
        return None
    if isinstance(positions, int):
        positions = [positions]
    if not isinstance(positions, Sequence) or not positions or not all(isinstance(p, int) for p in positions):
        raise ValueError(f"positions must be None or a non-empty list of ints, got {positions!r}.")
    return list(positions)


def _position_select(mask: Tensor, positions: list[int] | None) -> Tensor:
    """Boolean ``[batch, pos]``: non-padding positions, restricted to ``positions`` if given."""
    b, p = mask.shape
    valid = mask.bool()
    if positions is None:
        return valid
    bad = [i for i in positions if not -p <= i < p]
    if bad:
        raise ValueError(
            f"Positions {bad} are out of range for prompts of {p} tokens (valid: {-p}..{p - 1})."
        )
    sel = torch.zeros(b, p, dtype=torch.bool, device=mask.device)
    sel[:, positions] = True
    return sel & valid


def _routing_pass(
    model: MoEModel,
    prompts: list[str],
    positions: list[int] | None,
    batch_size: int,
    top1: bool,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """Counts ``[n_layers, n_experts]`` (selected, or top-1 when ``top1``) and the number of (prompt, pos)."""
    spec = model.spec
    E = max(spec.n_experts, 1)
    counts = torch.zeros(spec.n_layers, E, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    moe = list(spec.moe_layers)
    if not moe:
        return counts, total
    names = [f"blocks.{L}.mlp.hook_expert_weights" for L in moe]
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}.")
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc="routing", disable=not progress, leave=False):
        chunk = prompts[s : s + batch_size]
        enc = model.tokenize(chunk)
        with torch.no_grad():
            _, cache = model.run_with_cache(enc, names=names, return_type=None)
        sel = _position_select(enc["attention_mask"], positions).cpu()
        total += sel.sum()
        for L, name in zip(moe, names, strict=True):
            w = cache[name].detach().float().cpu()  # [b, p, E], zero where not selected
            n_e = w.shape[-1]
            if top1:
                chosen = torch.nn.functional.one_hot(w.argmax(-1), n_e).bool()
            else:
                chosen = w != 0
            counts[L, :n_e] += (chosen & sel[..., None]).sum(dim=(0, 1)).double()
    return counts, total


def expert_selection_counts(
    model: MoEModel,
    prompts: Sequence[str],
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[Float[Tensor, "n_layers n_experts"], int]:
    """Raw counts of (prompt, position) pairs where each expert is selected, and the number of pairs."""
    prompts = _check_prompt_list(prompts, "prompts")
    counts, total = _routing_pass(model, prompts, _check_offsets(positions), batch_size, False, progress)
    return counts.float(), int(total)


def _routing_frequency(
    model: MoEModel,
    prompts: Sequence[str],
    positions: Sequence[int] | None,
    batch_size: int,
    top1: bool,
    progress: bool,
) -> Float[Tensor, "n_layers n_experts"]:
    """:func:`_routing_pass` counts divided by the number of (prompt, position) pairs."""
    prompts = _check_prompt_list(prompts, "prompts")
    counts, total = _routing_pass(model, prompts, _check_offsets(positions), batch_size, top1, progress)
    return (counts / total.clamp_min(1)).float()


def expert_selection_frequency(
    model: MoEModel,
    prompts: Sequence[str],
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> Float[Tensor, "n_layers n_experts"]:
    """Fraction of (prompt, position) pairs where each expert is in the top-k (rows of non-MoE layers: 0).

    ``positions=None`` uses every non-padding position; otherwise a list of offsets (negative offsets such
    as ``[-5, ..., -1]`` align the chat template's last tokens across left-padded prompts).
    """
    return _routing_frequency(model, prompts, positions, batch_size, False, progress)


def top1_frequency(
    model: MoEModel,
    prompts: Sequence[str],
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> Float[Tensor, "n_layers n_experts"]:
    """Fraction of (prompt, position) pairs where each expert has the largest routing weight."""
    return _routing_frequency(model, prompts, positions, batch_size, True, progress)


def routing_risk_difference(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    positions: Sequence[int] | None = None,
    batch_size: int = 16,
) -> Float[Tensor, "n_layers n_experts"]:
    """SteerMoE risk difference ``P(selected | harmful) − P(selected | harmless)`` per layer and expert."""
    harmful = _check_prompt_list(harmful, "harmful")
    harmless = _check_prompt_list(harmless, "harmless")
    return expert_selection_frequency(model, harmful, positions, batch_size) - expert_selection_frequency(
        model, harmless, positions, batch_size
    )


def top1_percentage_difference(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    last_n: int = 5,
    batch_size: int = 16,
) -> Float[Tensor, "n_layers n_experts"]:
    """Percentage (0–100) of the last ``last_n`` prompt positions where the expert is top-1, harmful − harmless."""
    if not isinstance(last_n, int) or last_n < 1:
        raise ValueError(f"last_n must be a positive int, got {last_n!r}.")
    harmful = _check_prompt_list(harmful, "harmful")
    harmless = _check_prompt_list(harmless, "harmless")
    pos = list(range(-last_n, 0))
    return 100.0 * (
        top1_frequency(model, harmful, pos, batch_size) - top1_frequency(model, harmless, pos, batch_size)
    )


def routing_predicts_ablation(
    risk_difference: Float[Tensor, "n_layers n_experts"],
    ablation_effect: Float[Tensor, "n_layers n_experts"],
    moe_layers: Sequence[int] | None = None,
) -> float:
    """Spearman rank correlation between |routing risk difference| and |ablation effect| (MoE rows only)."""
    from moe_interp.refusal.stats import spearman

    a, b = torch.as_tensor(risk_difference).float(), torch.as_tensor(ablation_effect).float()
    if a.shape != b.shape:
        raise ValueError(
            f"risk_difference {tuple(a.shape)} and ablation_effect {tuple(b.shape)} must have the same shape."
        )
    if moe_layers is not None:
        a, b = a[list(moe_layers)], b[list(moe_layers)]
    x, y = a.abs().flatten().numpy(), b.abs().flatten().numpy()
    if x.size < 2:
        raise ValueError("Need at least two (layer, expert) entries to correlate.")
    return spearman(x, y)
