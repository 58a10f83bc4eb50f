"""Tiny, seeded, random-init configs per family: for tests, docs and benchmarks (no network)."""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

_MOE: dict[str, Any] = dict(num_experts_per_tok=2)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=32, num_local_experts=8, **_MOE),
    "qwen2_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=8,
        norm_topk_prob=False,
        **_MOE,
    ),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8, head_dim=16, **_MOE),
    "olmoe": dict(intermediate_size=32, num_experts=8, **_MOE),
    "deepseek_v3": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **_MOE,
    ),
    "deepseek_v2": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=2,
        first_k_dense_replace=1,
        topk_method="greedy",
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **_MOE,
    ),
    "gpt_oss": dict(
        intermediate_size=32,
        num_local_experts=8,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        **_MOE,
    ),
    "granitemoe": dict(
        intermediate_size=32, num_local_experts=8, residual_multiplier=0.5, embedding_multiplier=2.0, **_MOE
    ),
    "phimoe": dict(intermediate_size=32, num_local_experts=8, **_MOE),
    "qwen3_next": dict(
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=8,
        head_dim=16,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        **_MOE,
    ),
    "llama4_text": dict(
        intermediate_size=32,
        intermediate_size_mlp=96,
        num_local_experts=8,
        num_experts_per_tok=1,
        head_dim=16,
        interleave_moe_layer_step=1,
        no_rope_layers=[1, 1, 1],
    ),
    "llama": dict(intermediate_size=128),
    "qwen2": dict(intermediate_size=128),
    "qwen3": dict(intermediate_size=128, head_dim=16),
}


def tiny_families() -> list[str]:
    """Families that have a tiny config."""
    return sorted(TINY_CONFIGS)


def tiny_config(family: str, **overrides: Any) -> Any:
    """A transformers config of ``family`` with tiny geometry (``overrides`` replace any field)."""
    from transformers import AutoConfig

    if family not in TINY_CONFIGS:
        raise ValueError(f"No tiny config for family {family!r}. Available: {', '.join(tiny_families())}.")
    kwargs = {**_COMMON, **TINY_CONFIGS[family], **overrides}
    cfg = AutoConfig.for_model(family, **kwargs)
    cfg.architectures = [_ARCH.get(family, type(cfg).__name__.replace("Config", "ForCausalLM"))]
    return cfg


_ARCH = {"llama4_text": "Llama4ForCausalLM"}
