"""moe-interp: mechanistic interpretability for Mixture-of-Experts language models."""

__version__ = "0.1.0"

from moe_interp.families import FAMILIES, FamilySpec, get_family, supported_families  # noqa: E402
from moe_interp.interventions import (  # noqa: E402
    AblateExpert,
    AddVector,
    DirectionalAblation,
    EditHook,
    ForceExpert,
    Patch,
    SteerRouter,
)
from moe_interp.model import Generation, ModelSpec, MoECache, MoEModel, load  # noqa: E402
from moe_interp.tracing import HookContext  # noqa: E402

__all__ = [
    "AblateExpert",
    "AddVector",
    "DirectionalAblation",
    "EditHook",
    "ForceExpert",
    "Patch",
    "SteerRouter",
    "FAMILIES",
    "FamilySpec",
    "Generation",
    "HookContext",
    "MoECache",
    "MoEModel",
    "ModelSpec",
    "get_family",
    "load",
    "supported_families",
]
