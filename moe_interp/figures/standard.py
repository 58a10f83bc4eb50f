"""The standard patching figures of a refusal circuit in one call (PDF + PNG), with the numbers behind them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moe_interp.circuits import Circuit
    from moe_interp.model import MoEModel

__all__ = ["make_figures"]


def make_figures(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    out_dir: str | Path,
    *,
    circuit: Circuit | None = None,
    n_pairs: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the standard figures (PDF + PNG) and return the numbers behind them.

    resid layer × position heatmap, layer × head heatmap, layer × expert effect with routing risk
    difference, attribution vs exhaustive scatter (experts), and the circuit diagram (if given).
    """
    from moe_interp.patching import (
        attribution_patching,
        compare_to_exhaustive,
        patch_experts,
        patch_heads,
        patch_resid,
        routing_risk_difference,
    )
    from moe_interp.plotting import plot_attribution_vs_exhaustive

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = min(len(harmful), len(harmless)) if n_pairs is None else n_pairs
    h, s = list(harmful)[:n], list(harmless)[:n]
    resid = patch_resid(model, h, s, progress=progress)
    resid.plot(save_to=out / "patch_resid_layer_position")
    heads = patch_heads(model, h, s, progress=progress)
    heads.plot(save_to=out / "patch_heads_layer_head")
    res: dict[str, Any] = {"resid": resid.values.tolist(), "heads": heads.values.tolist()}
    if model.spec.is_moe:
        experts = patch_experts(model, h, s, progress=progress)
        rd = routing_risk_difference(model, h, s)
        experts.plot(routing_risk_diff=rd, save_to=out / "patch_experts_layer_expert")
        attr = attribution_patching(model, h, s, kinds=("experts",), progress=progress)["experts"]
        moe = torch.zeros_like(experts.values, dtype=torch.bool)
        moe[list(model.spec.moe_layers)] = True
        corr = compare_to_exhaustive(attr, experts, moe)
        labels = [f"L{L}.E{e}" for L in model.spec.moe_layers for e in range(model.spec.n_experts)]
        plot_attribution_vs_exhaustive(
            attr.values[moe],
            experts.values[moe],
            labels,
            corr["spearman"],
            save_to=out / "attribution_vs_exhaustive",
        )
        res.update(
            experts=experts.values.tolist(), risk_difference=rd.tolist(), attribution_vs_exhaustive=corr
        )
    if circuit is not None:
        circuit.plot(save_to=out / "circuit")
    return res
