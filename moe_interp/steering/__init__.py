"""Steering vectors: storage, validation, application and llama.cpp export."""

from moe_interp.steering.gguf_io import (
    export_control_vector_gguf,
    read_control_vector_gguf,
    read_control_vector_model_hint,
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
    "AddSteering",
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
