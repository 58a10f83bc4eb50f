"""Steering vectors: storage, validation, application and llama.cpp export."""

from moe_interp.steering.gguf_io import (
    export_control_vector_gguf,
    read_control_vector_gguf,
    read_control_vector_model_hint,
)
from moe_interp.steering.methods import (
    KL_STATISTICS,
    METHODS,
    ExpertConditionedAdd,
    RouterSteering,
    compare_methods,
    expert_specific_directions,
    fit_method,
    harmless_kl,
    per_prompt_kl,
    summarise_kl,
)
from moe_interp.steering.vectors import (
    AddSteering,
    Conditioning,
    PositionScope,
    SteeringKey,
    SteeringMetadata,
    SteeringVectors,
    decode_key,
    encode_key,
    parse_hook_name,
)

__all__ = [
    "KL_STATISTICS",
    "METHODS",
    "AddSteering",
    "ExpertConditionedAdd",
    "RouterSteering",
    "compare_methods",
    "expert_specific_directions",
    "fit_method",
    "harmless_kl",
    "per_prompt_kl",
    "summarise_kl",
    "Conditioning",
    "PositionScope",
    "SteeringKey",
    "SteeringMetadata",
    "SteeringVectors",
    "decode_key",
    "encode_key",
    "export_control_vector_gguf",
    "parse_hook_name",
    "read_control_vector_gguf",
    "read_control_vector_model_hint",
]
