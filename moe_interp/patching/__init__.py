"""Causal analysis: activation and attribution patching, single-expert ablation, routing statistics."""

from moe_interp.patching.ablation import (
    ExpertAblationResult,
    expert_ablation_attribution,
    expert_ablation_loop,
    expert_ablation_sweep,
    expert_mean_outputs,
)
from moe_interp.patching.activation import (
    PairedBatch,
    PatchingResult,
    PatchItem,
    patch_attn_mlp,
    patch_experts,
    patch_heads,
    patch_resid,
    patch_routing,
    patching_sweep,
    prepare_pairs,
    run_patches,
)
from moe_interp.patching.attribution import attribution_patching, compare_to_exhaustive, hook_gradients
from moe_interp.patching.metrics import (
    bootstrap_ci,
    last_position_metric,
    refusal_logodds,
    refusal_metric,
    refusal_scores,
)
from moe_interp.patching.routing import (
    expert_selection_frequency,
    routing_predicts_ablation,
    routing_risk_difference,
    top1_frequency,
    top1_percentage_difference,
)

__all__ = [
    "ExpertAblationResult",
    "PairedBatch",
    "PatchItem",
    "PatchingResult",
    "attribution_patching",
    "bootstrap_ci",
    "compare_to_exhaustive",
    "expert_ablation_attribution",
    "expert_ablation_loop",
    "expert_ablation_sweep",
    "expert_mean_outputs",
    "expert_selection_frequency",
    "hook_gradients",
    "last_position_metric",
    "patch_attn_mlp",
    "patch_experts",
    "patch_heads",
    "patch_resid",
    "patch_routing",
    "patching_sweep",
    "prepare_pairs",
    "refusal_logodds",
    "refusal_metric",
    "refusal_scores",
    "routing_predicts_ablation",
    "routing_risk_difference",
    "run_patches",
    "top1_frequency",
    "top1_percentage_difference",
]
