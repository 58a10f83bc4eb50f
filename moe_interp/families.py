"""The architecture table: everything moe-interp knows about each model family, as data.

Analysis code never branches on the family. It asks a :class:`FamilySpec` where a module lives, which
routing function the router applies and how the fused expert weights are laid out. Adding a family is
adding one entry to :data:`FAMILIES` (and, for tests, one tiny config in :mod:`moe_interp.tiny`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RouterKind = Literal[
    "softmax_topk",
    "topk_softmax",
    "sigmoid_group_topk",
    "softmax_group_greedy",
    "sparsemixer",
    "topk_sigmoid_dense",
]
ExpertKind = Literal["glu_chunk", "glu_interleaved_clamped", "input_scaled_glu"]


@dataclass(frozen=True)
class FamilySpec:
    """Where things live in one transformers family and what its MoE tensors mean.

    Module paths are attribute names relative to the decoder layer (``attn``, ``mlp``) or to the MoE block
    (``router``, ``experts``, ``shared``, ``shared_gate``). Tuples list alternatives, first match wins (e.g.
    MLA attention has ``q_b_proj`` instead of ``q_proj``).
    """

    model_type: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    attn: tuple[str, ...] = ("self_attn",)
    linear_attn: tuple[str, ...] = ()
    q: tuple[str, ...] = ("q_proj",)
    k: tuple[str, ...] = ("k_proj",)
    v: tuple[str, ...] = ("v_proj",)
    o: str = "o_proj"
    mlp: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    shared: str | None = None
    shared_gate: str | None = None
    #: execution order of the MoE block's sub-modules (nnsight reads modules in execution order)
    moe_order: tuple[str, ...] = ("router", "experts")
    router_kind: RouterKind = "softmax_topk"
    #: router returns (logits, top_k_weights, top_k_index) or (dense_scores, logits)
    router_output: Literal["logits_weights_indices", "scores_logits"] = "logits_weights_indices"
    expert_kind: ExpertKind = "glu_chunk"
    #: MoE block returns a tuple whose first element is the hidden states
    mlp_returns_tuple: bool = False
    norm_topk_default: bool = True
    #: attribute of the decoder layer scaling attn/mlp outputs before the residual add (Granite)
    residual_multiplier: str | None = None
    dense: bool = False
    #: the decoder layer adds the MLP output to the residual by broadcasting (False where it reshapes the
    #: output to the residual's shape): then the last layer's MLP may run on the last position alone
    mlp_broadcasts: bool = True
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


_Q_MLA = ("q_proj", "q_b_proj")

FAMILIES: dict[str, FamilySpec] = {
    s.model_type: s
    for s in [
        FamilySpec("mixtral"),
        FamilySpec(
            "qwen2_moe",
            shared="shared_expert",
            shared_gate="shared_expert_gate",
            moe_order=("shared", "router", "experts", "shared_gate"),
            norm_topk_default=False,
        ),
        FamilySpec("qwen3_moe", norm_topk_default=False),
        FamilySpec("olmoe", norm_topk_default=False),
        FamilySpec(
            "deepseek_v3",
            q=_Q_MLA,
            k=(),
            v=(),
            shared="shared_experts",
            moe_order=("router", "experts", "shared"),
            router_kind="sigmoid_group_topk",
            notes="MLA attention: hook_q from q_b_proj; keys/values are compressed (no hook_k/hook_v).",
        ),
        FamilySpec(
            "deepseek_v2",
            q=_Q_MLA,
            k=(),
            v=(),
            shared="shared_experts",
            moe_order=("router", "experts", "shared"),
            router_kind="softmax_group_greedy",
            notes="MLA attention: hook_q from q_b_proj; keys/values are compressed (no hook_k/hook_v).",
        ),
        FamilySpec(
            "gpt_oss",
            router="router",
            router_kind="topk_softmax",
            expert_kind="glu_interleaved_clamped",
            mlp_returns_tuple=True,
            notes="Router bias; attention sinks; alternating sliding-window layers.",
        ),
        FamilySpec(
            "granitemoe",
            mlp="block_sparse_moe",
            router="router",
            router_kind="topk_softmax",
            residual_multiplier="residual_multiplier",
            notes="Component outputs are reported in residual units (times residual_multiplier).",
        ),
        FamilySpec("phimoe", router="router", router_kind="sparsemixer"),
        FamilySpec(
            "qwen3_next",
            linear_attn=("linear_attn",),
            shared="shared_expert",
            shared_gate="shared_expert_gate",
            moe_order=("shared", "router", "experts", "shared_gate"),
            norm_topk_default=False,
            notes="Hybrid: gated-DeltaNet layers expose hook_attn_out only; full-attention layers expose heads.",
        ),
        FamilySpec(
            "llama4_text",
            mlp="feed_forward",
            router="router",
            shared="shared_expert",
            moe_order=("router", "experts", "shared"),
            router_kind="topk_sigmoid_dense",
            router_output="scores_logits",
            expert_kind="input_scaled_glu",
            mlp_returns_tuple=True,
            mlp_broadcasts=False,
            aliases=("llama4",),
            notes="Experts see the token scaled by its sigmoid router score (input scaling).",
        ),
        FamilySpec("llama", dense=True),
        FamilySpec("qwen2", dense=True),
        FamilySpec("qwen3", dense=True),
        FamilySpec("mistral", dense=True),
    ]
}


def supported_families() -> list[str]:
    """Names accepted by :func:`get_family` (HF ``config.model_type`` values)."""
    return sorted(FAMILIES)


def get_family(model_type: str) -> FamilySpec:
    """Look up a family by HF ``model_type``; raise with the supported list if unknown."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    for spec in FAMILIES.values():
        if model_type in spec.aliases:
            return spec
    raise ValueError(
        f"Unsupported model family {model_type!r}. Supported families: {', '.join(supported_families())}."
    )
