"""moe-interp: mechanistic interpretability for Mixture-of-Experts language models.

The public names below are imported on first use (PEP 562), so that ``import moe_interp.organisms`` — the
organism's training and evaluation scripts — needs only torch, tokenizers and transformers, not nnsight or
transformer-lens.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "FAMILIES": "moe_interp.families",
    "FamilySpec": "moe_interp.families",
    "get_family": "moe_interp.families",
    "supported_families": "moe_interp.families",
    "AblateExpert": "moe_interp.interventions",
    "AddVector": "moe_interp.interventions",
    "DirectionalAblation": "moe_interp.interventions",
    "EditHook": "moe_interp.interventions",
    "ForceExpert": "moe_interp.interventions",
    "Patch": "moe_interp.interventions",
    "SteerRouter": "moe_interp.interventions",
    "ExpertDirectionalAblation": "moe_interp.interventions",
    "Generation": "moe_interp.model",
    "ModelSpec": "moe_interp.model",
    "MoECache": "moe_interp.model",
    "MoEModel": "moe_interp.model",
    "load": "moe_interp.model",
    "HookContext": "moe_interp.tracing",
    "NonFiniteOutputError": "moe_interp.errors",
    "DLAResult": "moe_interp.dla",
    "direct_logit_attribution": "moe_interp.dla",
    "direction_attribution": "moe_interp.dla",
    "LogitLensResult": "moe_interp.lens",
    "logit_lens": "moe_interp.lens",
    "PathPatchResult": "moe_interp.path_patching",
    "path_patch": "moe_interp.path_patching",
    "path_patch_sweep": "moe_interp.path_patching",
    "attention_view": "moe_interp.views",
    "dla_view": "moe_interp.views",
    "routing_view": "moe_interp.views",
}

__all__ = [
    "FAMILIES",
    "AblateExpert",
    "AddVector",
    "DirectionalAblation",
    "EditHook",
    "ExpertDirectionalAblation",
    "FamilySpec",
    "ForceExpert",
    "Generation",
    "HookContext",
    "MoECache",
    "MoEModel",
    "ModelSpec",
    "NonFiniteOutputError",
    "Patch",
    "SteerRouter",
    "get_family",
    "load",
    "supported_families",
    "DLAResult",
    "LogitLensResult",
    "PathPatchResult",
    "attention_view",
    "direct_logit_attribution",
    "direction_attribution",
    "dla_view",
    "logit_lens",
    "path_patch",
    "path_patch_sweep",
    "routing_view",
]

if TYPE_CHECKING:
    from moe_interp.dla import DLAResult, direct_logit_attribution, direction_attribution
    from moe_interp.errors import NonFiniteOutputError
    from moe_interp.families import FAMILIES, FamilySpec, get_family, supported_families
    from moe_interp.interventions import (
        AblateExpert,
        AddVector,
        DirectionalAblation,
        EditHook,
        ExpertDirectionalAblation,
        ForceExpert,
        Patch,
        SteerRouter,
    )
    from moe_interp.lens import LogitLensResult, logit_lens
    from moe_interp.model import Generation, ModelSpec, MoECache, MoEModel, load
    from moe_interp.path_patching import PathPatchResult, path_patch, path_patch_sweep
    from moe_interp.tracing import HookContext
    from moe_interp.views import attention_view, dla_view, routing_view


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule, e.g. moe_interp.model
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'moe_interp' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
