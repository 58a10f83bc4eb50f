"""What a wrapped HF model looks like: per-layer module paths and geometry, the model spec, its hook points.

Resolved once when an :class:`~moe_interp.model.MoEModel` is built, from the family table
(:class:`~moe_interp.families.FamilySpec`) and the modules the checkpoint really has (MLA attention, hybrid
linear-attention layers, dense layers between MoE layers).
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from typing import Any

from transformers import PreTrainedModel

from moe_interp.families import FamilySpec
from moe_interp.tracing import LayerInfo, _get


@dataclass(frozen=True)
class ModelSpec:
    """Geometry of a loaded model, in one place for analysis code, CLI output and steering metadata."""

    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    vocab_size: int
    moe_layers: tuple[int, ...]
    n_experts: int
    top_k: int
    shared_expert_layers: tuple[int, ...]
    attention: tuple[str, ...]  # per layer: "softmax" or "linear"
    notes: str = ""

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{k}</td><td>{html.escape(str(v))}</td></tr>" for k, v in self.to_dict().items()
        )
        return f"<table><tr><th>ModelSpec</th><th></th></tr>{rows}</table>"


def _has(module: Any, path: str) -> bool:
    return module is not None and getattr(module, path, None) is not None


def resolve_layers(hf_model: PreTrainedModel, fam: FamilySpec) -> list[LayerInfo]:
    """Module paths and geometry of every decoder layer (first matching alternative of each family path)."""
    cfg = hf_model.config
    infos = []
    for i, layer in enumerate(_get(hf_model, fam.layers)):
        attn_path = next((p for p in fam.attn if hasattr(layer, p)), None)
        lin_path = next((p for p in fam.linear_attn if hasattr(layer, p)), None)
        attn = getattr(layer, attn_path) if attn_path else None
        q = next((p for p in fam.q if _has(attn, p)), None)
        k = next((p for p in fam.k if _has(attn, p)), None)
        v = next((p for p in fam.v if _has(attn, p)), None)
        o = fam.o if _has(attn, fam.o) else None
        n_heads = int(cfg.num_attention_heads)
        # k/v head size from the key heads: q_proj may also carry an output gate (Qwen3-Next)
        n_kv_cfg = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        if k:
            d_head, n_kv = getattr(attn, k).out_features // n_kv_cfg, n_kv_cfg
        else:  # MLA: no per-head keys
            d_head, n_kv = (getattr(attn, q).out_features // n_heads if q else 0), n_heads
        d_head_v = getattr(attn, o).in_features // n_heads if o else 0
        mlp = getattr(layer, fam.mlp)
        is_moe = hasattr(mlp, fam.router) and hasattr(mlp, fam.experts)
        n_exp = top_k = 0
        if is_moe:
            ex, router = getattr(mlp, fam.experts), getattr(mlp, fam.router)
            n_exp = int(getattr(ex, "num_experts", 0) or ex.gate_up_proj.shape[0])
            top_k = int(getattr(router, "top_k", 0) or cfg.num_experts_per_tok)
        mult = float(getattr(layer, fam.residual_multiplier, 1.0)) if fam.residual_multiplier else 1.0
        infos.append(
            LayerInfo(
                index=i,
                attn=attn_path,
                linear_attn=lin_path if attn_path is None else None,
                q=q,
                k=k,
                v=v,
                o=o,
                n_heads=n_heads,
                n_kv_heads=n_kv,
                d_head=d_head,
                d_head_v=d_head_v,
                mlp=fam.mlp,
                is_moe=is_moe,
                n_experts=n_exp,
                top_k=top_k,
                shared=fam.shared if is_moe and fam.shared and hasattr(mlp, fam.shared) else None,
                shared_gate=fam.shared_gate
                if is_moe and fam.shared_gate and hasattr(mlp, fam.shared_gate)
                else None,
                residual_multiplier=mult,
            )
        )
    return infos


def make_spec(hf_model: PreTrainedModel, fam: FamilySpec, layers: list[LayerInfo]) -> ModelSpec:
    """The :class:`ModelSpec` of resolved layers (head geometry from the first softmax-attention layer)."""
    cfg = hf_model.config
    moe = [i for i in layers if i.is_moe]
    first_attn = next((i for i in layers if i.attn), layers[0])
    return ModelSpec(
        family=fam.model_type,
        n_layers=len(layers),
        d_model=int(cfg.hidden_size),
        n_heads=first_attn.n_heads,
        n_kv_heads=first_attn.n_kv_heads,
        d_head=first_attn.d_head,
        vocab_size=int(cfg.vocab_size),
        moe_layers=tuple(i.index for i in moe),
        n_experts=moe[0].n_experts if moe else 0,
        top_k=moe[0].top_k if moe else 0,
        shared_expert_layers=tuple(i.index for i in moe if i.shared),
        attention=tuple("softmax" if i.attn else "linear" for i in layers),
        notes=fam.notes,
    )


def enumerate_hooks(fam: FamilySpec, layers: list[LayerInfo]) -> list[str]:
    """Every hook point of the model, in execution order (MoE sites from the family's router adapter)."""
    names = ["hook_embed"]
    for info in layers:
        L = info.index
        for site in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            names.append(f"blocks.{L}.{site}")
        if info.attn:
            for key, path in (("hook_q", info.q), ("hook_k", info.k), ("hook_v", info.v)):
                if path:
                    names.append(f"blocks.{L}.attn.{key}")
            if info.o:
                names += [f"blocks.{L}.attn.hook_z", f"blocks.{L}.attn.hook_result"]
            names.append(f"blocks.{L}.attn.hook_pattern")
        if info.is_moe:
            names += [f"blocks.{L}.mlp.{s}" for s in fam.router_adapter.sites]
            if info.shared:
                names.append(f"blocks.{L}.mlp.hook_shared_out")
            names += [f"blocks.{L}.mlp.experts.{e}.hook_out" for e in range(info.n_experts)]
    names.append("ln_final.hook_normalized")
    return names
