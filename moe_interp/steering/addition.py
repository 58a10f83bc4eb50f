"""The edit of one steering key: :class:`~moe_interp.interventions.AddVector`, made expert-aware.

:class:`AddSteering` uses the intervention protocol's own pieces — hook names of :mod:`moe_interp.hooks`,
:func:`~moe_interp.interventions.position_mask`, :func:`~moe_interp.interventions.check_coeff` and
:func:`~moe_interp.interventions.check_positions` — so a steering vector edits exactly the positions an
``AddVector`` edits: every non-padding position of every forward pass for ``"all"`` (prompt pass and each
generated token), only the prompt pass for ``"prompt"``, only generation steps for ``"generated"``.

What it adds: expert keys edit only expert ``e``'s slice of ``blocks.L.mlp.hook_expert_out`` (or
``blocks.L.mlp.experts.e.hook_out``), and only where that expert was routed (its output is not all zeros),
so steering an expert never makes it fire where the router did not pick it. It needs no model to build: the
object is its own edit function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.interventions import Positions, check_coeff, check_positions, position_mask
from moe_interp.steering.keys import parse_hook_name
from moe_interp.tracing import EditFn, HookContext

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = ["AddSteering", "check_steering_vector"]


def check_steering_vector(where: str, v: Any, d_model: int | None) -> None:
    """A 1-D finite floating-point tensor (of width ``d_model`` when given), or ``ValueError`` naming ``where``."""
    if not isinstance(v, Tensor):
        raise ValueError(f"vector for {where} must be a torch.Tensor, got {type(v).__name__}")
    if v.ndim != 1:
        raise ValueError(f"vector for {where} must be 1-D [d_model], got shape {tuple(v.shape)}")
    if d_model is not None and v.shape[0] != d_model:
        raise ValueError(f"vector for {where} has width {v.shape[0]}, expected d_model={d_model}")
    if not v.is_floating_point():
        raise ValueError(f"vector for {where} must be floating point, got {v.dtype}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"vector for {where} contains NaN or inf")


@dataclass(frozen=True, eq=False)
class AddSteering:
    """Add ``coeff * vector`` at one steering key ``(hook_name, expert)``, within ``positions``.

    ``edits(model)`` returns ``{hook_name: self}``: the object is the edit function. Padding is never edited;
    expert keys edit only where the expert was routed (module docstring).
    """

    hook_name: str
    vector: Float[Tensor, " d_model"]
    coeff: float = 1.0
    expert: int | None = None
    positions: Positions = "all"

    def __post_init__(self) -> None:
        parsed = parse_hook_name(self.hook_name)
        if parsed.kind == "expert_out" and self.expert is None:
            raise ValueError(f"{self.hook_name} needs an expert id")
        if parsed.kind != "expert_out" and self.expert is not None:
            raise ValueError(f"expert id {self.expert} given for non-expert hook {self.hook_name}")
        try:
            object.__setattr__(self, "positions", check_positions(self.positions))
        except ValueError as err:
            raise ValueError(f"AddSteering positions: {err}") from None
        check_steering_vector(self.hook_name, self.vector, None)
        try:
            check_coeff(self.coeff)
        except ValueError as err:
            raise ValueError(f"coefficient for {self.hook_name}: {err}") from None

    @property
    def routed_only(self) -> bool:
        """Whether the edit is limited to positions where an expert was routed."""
        return parse_hook_name(self.hook_name).kind in ("expert_out", "single_expert_out")

    def edits(self, model: MoEModel | None = None) -> dict[str, EditFn]:
        """``{hook_name: self}`` per the intervention protocol."""
        return {self.hook_name: self}

    def __call__(self, x: Tensor, ctx: HookContext) -> Tensor:
        """Return ``x`` with ``coeff * vector`` added at the selected positions."""
        mask = position_mask(ctx, self.positions, x)
        if mask is None:
            return x
        delta = (self.coeff * self.vector.to(device=x.device, dtype=torch.float32)).to(x.dtype)
        if self.expert is not None:
            if x.ndim != 4:
                raise ValueError(
                    f"{self.hook_name} expects [batch, pos, n_experts, d_model], got shape {tuple(x.shape)}"
                )
            if not 0 <= self.expert < x.shape[2]:
                raise ValueError(f"expert {self.expert} out of range for {x.shape[2]} experts")
            xe = x[:, :, self.expert, :]
            sel = mask & (xe != 0).any(dim=-1)
            out = x.clone()
            out[:, :, self.expert, :] = torch.where(sel[..., None], xe + delta, xe)
            return out
        if x.shape[-1] != delta.shape[0]:
            raise ValueError(f"{self.hook_name}: hook width {x.shape[-1]} != vector width {delta.shape[0]}")
        if self.routed_only:
            mask = mask & (x != 0).any(dim=-1)
        return torch.where(mask[..., None], x + delta, x)
