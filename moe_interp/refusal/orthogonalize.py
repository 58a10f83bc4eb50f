"""Weight orthogonalisation (Arditi et al. 2024): bake directional ablation into the weights.

Every matrix that writes into the residual stream is replaced by ``W ← W − r̂ r̂ᵀ W`` (along its
``d_model`` axis), so no component can write along ``r̂`` and the residual stream stays orthogonal to
it. This is equivalent to :class:`~moe_interp.interventions.DirectionalAblation` at every layer.

The list of residual-writing parameters is derived from the model's :class:`~moe_interp.tracing.LayerInfo`
and :class:`~moe_interp.families.FamilySpec` (embedding path, attention / linear-attention module, MLP
module, fused experts and their ``expert_kind`` layout, shared experts), never from the family name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor, nn

from moe_interp.interventions import check_vector
from moe_interp.tracing import _get

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from moe_interp.model import MoEModel

__all__ = ["ResidualWriter", "orthogonalize", "residual_writers"]

#: attribute names of the projection that writes a sub-module's output into the residual stream
#: (tried in order after the spec's own ``o`` path); e.g. qwen3_next's gated-DeltaNet ``out_proj``
OUTPUT_PROJ_NAMES: tuple[str, ...] = ("o_proj", "out_proj", "down_proj", "dense", "c_proj", "w2", "fc2")

#: axis of the fused ``experts.down_proj`` [E, ·, ·] that has size d_model, per ``FamilySpec.expert_kind``
#: (``glu_chunk``: [E, H, I] used as ``F.linear(h, W[e])``; the others: [E, I, H] used as ``h @ W[e]``)
EXPERT_DOWN_AXIS: dict[str, int] = {"glu_chunk": 1, "glu_interleaved_clamped": 2, "input_scaled_glu": 2}


@dataclass(frozen=True)
class ResidualWriter:
    """One parameter that writes into the residual stream and the axis of it that lives in d_model."""

    name: str  # dotted parameter name inside ``model.hf_model``
    param: Tensor  # an nn.Parameter
    axis: int


def _out_proj(module: nn.Module, first: str | None, d_model: int, where: str) -> tuple[str, nn.Linear]:
    names = ([first] if first else []) + [n for n in OUTPUT_PROJ_NAMES if n != first]
    for n in names:
        lin = getattr(module, n, None)
        if isinstance(lin, nn.Linear) and lin.out_features == d_model:
            return n, lin
    raise ValueError(
        f"Cannot find the output projection of {where} ({type(module).__name__}): expected an nn.Linear "
        f"with out_features={d_model} named one of {names}."
    )


def _linear_writers(prefix: str, lin: nn.Linear) -> list[ResidualWriter]:
    out = [ResidualWriter(f"{prefix}.weight", lin.weight, 0)]
    if lin.bias is not None:
        out.append(ResidualWriter(f"{prefix}.bias", lin.bias, 0))
    return out


def residual_writers(model: MoEModel) -> list[ResidualWriter]:
    """Every parameter of ``model`` whose output is added to the residual stream, with its d_model axis.

    Embedding rows; each layer's attention (or linear-attention) output projection and its bias; the dense
    MLP's down projection, or for an MoE layer every expert's slice of the fused ``experts.down_proj``
    (axis from ``expert_kind``) plus ``down_proj_bias`` if present, and the shared expert's down projection.
    """
    hf, fam, d = model.hf_model, model.family, model.spec.d_model
    emb = _get(hf, fam.embed)
    writers = [ResidualWriter(f"{fam.embed}.weight", emb.weight, 1)]
    for info in model.layers:
        lp = f"{fam.layers}.{info.index}"
        layer = _get(hf, lp)
        attn_path = info.attn or info.linear_attn
        if attn_path is not None:
            attn = getattr(layer, attn_path)
            first = info.o if info.attn else None
            n, lin = _out_proj(attn, first, d, f"layer {info.index} attention {attn_path!r}")
            writers += _linear_writers(f"{lp}.{attn_path}.{n}", lin)
        mlp = getattr(layer, info.mlp)
        mp = f"{lp}.{info.mlp}"
        if not info.is_moe:
            n, lin = _out_proj(mlp, None, d, f"layer {info.index} MLP {info.mlp!r}")
            writers += _linear_writers(f"{mp}.{n}", lin)
            continue
        experts = getattr(mlp, fam.experts)
        axis = EXPERT_DOWN_AXIS[fam.expert_kind]
        down = experts.down_proj
        if down.ndim != 3 or down.shape[axis] != d:
            raise ValueError(
                f"Layer {info.index}: fused experts.down_proj has shape {tuple(down.shape)}; expected size "
                f"d_model={d} on axis {axis} for expert_kind={fam.expert_kind!r}."
            )
        writers.append(ResidualWriter(f"{mp}.{fam.experts}.down_proj", down, axis))
        bias = getattr(experts, "down_proj_bias", None)
        if isinstance(bias, Tensor):
            writers.append(ResidualWriter(f"{mp}.{fam.experts}.down_proj_bias", bias, bias.ndim - 1))
        if info.shared is not None:
            shared = getattr(mlp, info.shared)
            n, lin = _out_proj(shared, None, d, f"layer {info.index} shared expert {info.shared!r}")
            writers += _linear_writers(f"{mp}.{info.shared}.{n}", lin)
    return writers


@torch.no_grad()
def _project_out(p: Tensor, r: Tensor, axis: int) -> None:
    """In place: remove the component along unit ``r`` of ``p`` on ``axis`` (computed in float64)."""
    x = p.data.movedim(axis, -1).to(torch.float64)
    rr = r.to(device=p.device, dtype=torch.float64)
    x = x - (x @ rr)[..., None] * rr
    p.data.copy_(x.movedim(-1, axis).to(p.dtype))


def _untie_output_embeddings(hf: PreTrainedModel, emb_weight: Tensor) -> None:
    out = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None and out.weight is emb_weight:
        out.weight = nn.Parameter(emb_weight.detach().clone(), requires_grad=emb_weight.requires_grad)
        if hasattr(hf.config, "tie_word_embeddings"):
            hf.config.tie_word_embeddings = False


def orthogonalize(
    model: MoEModel, direction: Float[Tensor, " d_model"], *, in_place: bool = False
) -> MoEModel:
    """Project ``direction`` out of every residual-writing weight: ``W ← W − r̂ r̂ᵀ W``.

    Returns a new :class:`MoEModel` over a deep copy of the HF model (same tokenizer), or edits ``model``
    in place (and returns it) when ``in_place=True``. The result equals
    ``DirectionalAblation(direction)`` at all layers. Tied input/output embeddings are untied first, so
    the unembedding is left unchanged (as directional ablation leaves it).
    """
    from moe_interp.model import MoEModel

    r = check_vector(direction, model.spec.d_model, "direction").to(torch.float64)
    norm = float(r.norm())
    if norm == 0.0:
        raise ValueError("The direction is the zero vector; it cannot be projected out.")
    r = r / norm
    target = model
    if not in_place:
        target = MoEModel(copy.deepcopy(model.hf_model), model.tokenizer, name=f"{model.name}+orthogonalized")
        target.refusal_phrases = model.refusal_phrases  # same refusal score tokens as the original
    writers = residual_writers(target)
    _untie_output_embeddings(target.hf_model, writers[0].param)
    seen: set[int] = set()
    for w in writers:
        if id(w.param) in seen:  # a parameter shared between modules is edited once
            continue
        seen.add(id(w.param))
        _project_out(w.param, r, w.axis)
    return target
