"""moe-interp: mechanistic interpretability for Mixture-of-Experts language models."""

__version__ = "0.1.0"

from moe_interp.families import FAMILIES, FamilySpec, get_family, supported_families  # noqa: E402
from moe_interp.model import Generation, MoECache, MoEModel, ModelSpec, load  # noqa: E402
from moe_interp.tracing import HookContext  # noqa: E402

__all__ = [
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
