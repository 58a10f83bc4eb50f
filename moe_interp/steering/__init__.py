"""Steering: vectors and other steering objects (one :class:`Steering` protocol), fitting methods behind one
registry, file formats behind one loader, comparison, and llama.cpp export."""

from moe_interp.steering.addition import AddSteering
from moe_interp.steering.compare import (
    KL_STATISTICS,
    compare_methods,
    harmless_kl,
    per_prompt_kl,
    summarise_kl,
)
from moe_interp.steering.edits import RouterSteering, TopicGatedSteering
from moe_interp.steering.fit_experts import expert_specific_directions
from moe_interp.steering.formats import FORMATS, load_steering
from moe_interp.steering.gated import fit_gated
from moe_interp.steering.gguf_io import (
    export_control_vector_gguf,
    read_control_vector_gguf,
    read_control_vector_model_hint,
)
from moe_interp.steering.keys import SteeringKey, decode_key, encode_key, parse_hook_name
from moe_interp.steering.memo import FitMemo
from moe_interp.steering.metadata import SteeringMetadata
from moe_interp.steering.protocol import Steering
from moe_interp.steering.registry import METHODS, MethodSpec, fit_method
from moe_interp.steering.vectors import (
    Conditioning,
    ExpertConditionedAdd,
    Operation,
    PositionScope,
    SteeringVectors,
)

__all__ = [
    "FORMATS",
    "KL_STATISTICS",
    "METHODS",
    "AddSteering",
    "Conditioning",
    "ExpertConditionedAdd",
    "FitMemo",
    "MethodSpec",
    "Operation",
    "PositionScope",
    "RouterSteering",
    "Steering",
    "SteeringKey",
    "SteeringMetadata",
    "SteeringVectors",
    "TopicGatedSteering",
    "compare_methods",
    "decode_key",
    "encode_key",
    "expert_specific_directions",
    "export_control_vector_gguf",
    "fit_gated",
    "fit_method",
    "harmless_kl",
    "load_steering",
    "parse_hook_name",
    "per_prompt_kl",
    "read_control_vector_gguf",
    "read_control_vector_model_hint",
    "summarise_kl",
]
