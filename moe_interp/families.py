"""The architecture table: everything moe-interp knows about each model family, as data.

Analysis code never branches on the family. It asks a :class:`FamilySpec` where a module lives, which
routing function the router applies and how the fused expert weights are laid out. Adding a family is
adding one entry to :data:`FAMILIES` (and, for tests, one tiny config in :mod:`moe_interp.tiny`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from moe_interp.adapters import DENSE_SCORE_ROUTER, TOPK_ROUTER, RouterAdapter
from moe_interp.hooks import READ_ONLY_SITES

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
    #: how the router hands its decision to the experts module (:mod:`moe_interp.adapters`)
    router_adapter: RouterAdapter = TOPK_ROUTER
    expert_kind: ExpertKind = "glu_chunk"
    #: MoE block returns a tuple whose first element is the hidden states
    mlp_returns_tuple: bool = False
    norm_topk_default: bool = True
    #: attribute of the decoder layer scaling attn/mlp outputs before the residual add (Granite)
    residual_multiplier: str | None = None
    #: attribute of the model config scaling the embeddings after the embedding module (Granite)
    embedding_multiplier: str | None = None
    dense: bool = False
    #: the decoder layer adds the MLP output to the residual by broadcasting (False where it reshapes the
    #: output to the residual's shape): then the last layer's MLP may run on the last position alone
    mlp_broadcasts: bool = True
    notes: str = ""
    #: other ``model_type`` values naming this family
    aliases: tuple[str, ...] = field(default_factory=tuple)
    #: ``model_type`` of multimodal configs whose ``text_config`` is this family's (Llama 4)
    wrapper_types: tuple[str, ...] = field(default_factory=tuple)

    @property
    def read_only_sites(self) -> Mapping[str, str]:
        """Hook sites that cannot be written in this family -> what to edit instead."""
        return {**READ_ONLY_SITES, **self.router_adapter.read_only_sites}


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
            embedding_multiplier="embedding_multiplier",
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
            router_adapter=DENSE_SCORE_ROUTER,
            expert_kind="input_scaled_glu",
            mlp_returns_tuple=True,
            mlp_broadcasts=False,
            wrapper_types=("llama4",),
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
        if model_type in spec.aliases or model_type in spec.wrapper_types:
            return spec
    raise ValueError(
        f"Unsupported model family {model_type!r}. Supported families: {', '.join(supported_families())}."
    )


def text_config(cfg: Any) -> Any:
    """The text model's config: ``cfg.text_config`` for a multimodal wrapper (:attr:`FamilySpec.wrapper_types`),
    else ``cfg`` itself."""
    wrapped = any(cfg.model_type in spec.wrapper_types for spec in FAMILIES.values())
    return getattr(cfg, "text_config", None) if wrapped else cfg
