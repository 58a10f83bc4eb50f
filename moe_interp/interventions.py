"""Small intervention dataclasses for ``with model.intervene(...)``.

An intervention is any object with ``edits(model) -> {hook_name: fn(tensor, ctx) -> tensor}``; each edit
function receives the hook value laid out ``[batch, pos, ...]`` and a :class:`HookContext`. Edits run in
execution order within one forward pass, so an intervention may read one hook (returning it unchanged) and
use what it read at a later hook (see :class:`ExpertConditionedAdd` in :mod:`moe_interp.steering`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.errors import InputError
from moe_interp.experts import excluded_logit
from moe_interp.tracing import EditFn, HookContext

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

Scope = Literal["all", "prompt", "generated", "after_first"]
Positions = Scope | Sequence[int]
SCOPES_TEXT = ", ".join(repr(x) for x in get_args(Scope))

RESID_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def position_mask(ctx: HookContext, positions: Positions, value: Tensor | torch.Size) -> Tensor | None:
    """Boolean ``[batch, pos]`` mask of positions to edit in this forward pass (None: edit nothing), on the
    device of ``value`` (the hook's tensor; a layer of a ``device_map`` model may sit on another GPU than the
    attention mask). A bare shape keeps the attention mask's device.

    ``"all"`` edits every non-padding position of every forward pass, ``"prompt"`` only the prompt pass,
    ``"generated"`` only the single-token generation steps, ``"after_first"`` every position but each
    prompt's first real token (where decoder LMs keep their attention sink: a token with a massive residual
    norm that an edit of every position also rewrites), and a list of ints those positions (negative
    indices count from the end, which aligns chat-template tokens across left-padded prompts). A generation
    step has one position, so a list holding 0 or −1 also edits every generated token; one without them edits
    the prompt pass only.
    """
    shape, device = (value.shape, value.device) if isinstance(value, Tensor) else (value, None)
    b, p = shape[0], shape[1]
    mask = ctx.attention_mask
    if mask is not None and device is not None:
        mask = mask.to(device)
    if mask is None or mask.shape != (b, p):  # None: no mask known; generation steps add no padding
        mask = torch.ones(b, p, dtype=torch.bool, device=device if mask is None else mask.device)
    mask = mask.bool()
    if isinstance(positions, str):
        if positions == "all":
            return mask
        if positions == "prompt":
            return mask if ctx.is_prompt else None
        if positions == "generated":
            return None if ctx.is_prompt else mask
        if positions == "after_first":
            return mask & (mask.long().cumsum(1) > 1) if ctx.is_prompt else mask
        raise ValueError(f"Unknown position scope {positions!r}: expected {SCOPES_TEXT} or a list of ints.")
    sel = torch.zeros(b, p, dtype=torch.bool, device=mask.device)
    idx = [i for i in positions if -p <= i < p]
    if not idx:
        return None
    sel[:, idx] = True
    return sel & mask


def check_positions(positions: Any) -> Positions:
    """Validate a position scope or list of position indices."""
    if isinstance(positions, str):
        if positions not in get_args(Scope):
            raise ValueError(
                f"Unknown position scope {positions!r}: expected {SCOPES_TEXT} or a list of ints."
            )
        return cast(Scope, positions)
    if isinstance(positions, int):
        return [positions]
    if not isinstance(positions, Sequence) or not all(isinstance(i, int) for i in positions) or not positions:
        raise ValueError(f"positions must be {SCOPES_TEXT} or a non-empty list of ints, got {positions!r}.")
    return list(positions)


def check_vector(vector: Any, d_model: int, what: str = "vector") -> Tensor:
    """A finite 1-D float tensor of width ``d_model``, or a clear error."""
    v = torch.as_tensor(vector)
    if v.ndim != 1:
        raise ValueError(f"The {what} must be 1-D of size d_model={d_model}, got shape {tuple(v.shape)}.")
    if v.shape[0] != d_model:
        raise ValueError(f"The {what} has size {v.shape[0]}, but this model has d_model={d_model}.")
    if not torch.isfinite(v).all():
        raise ValueError(f"The {what} contains NaN or inf values.")
    return v.float()


def check_coeff(coeff: Any) -> float:
    """A finite int or float as a float (``bool`` is refused: ``True`` is not a strength)."""
    if isinstance(coeff, bool) or not isinstance(coeff, int | float) or not math.isfinite(coeff):
        raise ValueError(f"Coefficients must be finite numbers, got {coeff!r}.")
    return float(coeff)


def check_epsilon(epsilon: Any) -> float:
    """SteerRouter's margin: a finite number >= 0 (a negative one would invert activate/deactivate)."""
    eps = epsilon
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"SteerRouter.epsilon must be a finite number >= 0, got {eps!r}.")
    return float(eps)


def _where(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    m = mask.reshape(*mask.shape, *([1] * (old.ndim - 2)))
    return torch.where(m, new, old)


@dataclass
class EditHook:
    """Apply an arbitrary function to one hook point."""

    hook: str
    fn: EditFn

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        return {self.hook: self.fn}


@dataclass
class AddVector:
    """Activation addition: ``x ← x + coeff · vector`` at ``hook`` (one name or several), within ``positions``."""

    hook: str | Sequence[str]
    vector: Float[Tensor, " d_model"]
    coeff: float = 1.0
    positions: Positions = "all"

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        v = check_vector(self.vector, model.spec.d_model)
        c = check_coeff(self.coeff)
        pos = check_positions(self.positions)

        def fn(x: Tensor, ctx: HookContext) -> Tensor:
            m = position_mask(ctx, pos, x)
            if m is None:
                return x
            return _where(m, x + c * v.to(device=x.device, dtype=x.dtype), x)

        hooks = [self.hook] if isinstance(self.hook, str) else list(self.hook)
        return {h: fn for h in hooks}


@dataclass
class DirectionalAblation:
    """Project a direction out: ``x ← x − (x·r̂) r̂`` at every chosen layer's resid_pre, attn_out and mlp_out.

    With all layers (the default) this is Arditi et al.'s directional ablation, and it is equivalent to
    :func:`moe_interp.refusal.orthogonalize` on the weights. ``coeff`` scales the removed component
    (``x − c (x·r̂) r̂``: 1 ablates, 0.5 halves it, 2 reflects it).
    """

    direction: Float[Tensor, " d_model"]
    layers: Sequence[int] | None = None
    sites: Sequence[str] = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")
    positions: Positions = "all"
    coeff: float = 1.0

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        fn = _ablation(self.direction, model.spec.d_model, self.positions, self.coeff)
        layers = (
            range(model.spec.n_layers) if self.layers is None else [model.check_layer(L) for L in self.layers]
        )
        for s in self.sites:
            if s not in RESID_SITES:
                raise ValueError(
                    f"Unknown site {s!r} for directional ablation; expected some of {RESID_SITES}."
                )
        return {f"blocks.{L}.{s}": fn for L in layers for s in self.sites}


def _ablation(direction: Tensor, d_model: int, positions: Positions, coeff: float) -> EditFn:
    """The edit ``x ← x − c (x·r̂) r̂`` at ``positions`` (checked: width, non-zero, positions, coefficient)."""
    r = check_vector(direction, d_model, "direction")
    if float(r.norm()) == 0.0:
        raise ValueError("The direction is the zero vector; it cannot be ablated.")
    r = r / r.norm()
    pos = check_positions(positions)
    c = check_coeff(coeff)

    def fn(x: Tensor, ctx: HookContext) -> Tensor:
        m = position_mask(ctx, pos, x)
        if m is None:
            return x
        rr = r.to(device=x.device, dtype=x.dtype)
        return _where(m, x - c * (x @ rr)[..., None] * rr, x)

    return fn


@dataclass
class ExpertDirectionalAblation:
    """Project a direction out of one expert's weighted output: ``y_e ← y_e − c (y_e·r̂) r̂`` at
    ``blocks.L.mlp.experts.e.hook_out`` (zero, so unchanged, where the expert was not routed).

    The expert-level form of :class:`DirectionalAblation`: it asks whether one expert's *write* of a
    direction matters, where ablating the residual stream removes every component's share at once.
    """

    layer: int
    expert: int
    direction: Float[Tensor, " d_model"]
    positions: Positions = "all"
    coeff: float = 1.0

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        model.check_expert(self.layer, self.expert)
        fn = _ablation(self.direction, model.spec.d_model, self.positions, self.coeff)
        return {f"blocks.{self.layer}.mlp.experts.{self.expert}.hook_out": fn}


@dataclass
class Patch:
    """Replace a hook's value with a stored one (e.g. from another run's cache) at ``positions``.

    ``value`` has the hook's full shape ``[batch, pos, ...]`` (or broadcasts to it). Patching applies to the
    prompt forward pass only.
    """

    hook: str
    value: Tensor
    positions: Sequence[int] | None = None

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        pos = None if self.positions is None else check_positions(self.positions)
        if isinstance(pos, str):  # Patch applies to the prompt pass only: positions are indices
            raise InputError(f"Patch.positions must be None (all) or a list of ints, got {pos!r}.")

        def fn(x: Tensor, ctx: HookContext) -> Tensor:
            if not ctx.is_prompt:
                return x
            val = self.value.to(device=x.device, dtype=x.dtype)
            try:
                val = val.expand_as(x)
            except RuntimeError as err:
                raise ValueError(
                    f"Patch value for {self.hook} has shape {tuple(self.value.shape)}, hook has {tuple(x.shape)}."
                ) from err
            if pos is None:
                return val.clone()
            out = x.clone()
            out[:, pos] = val[:, pos]
            return out

        return {self.hook: fn}


AblationMode = Literal["drop", "renorm", "reroute", "mean"]
ABLATION_MODES: tuple[str, ...] = ("drop", "renorm", "reroute", "mean")


@dataclass
class AblateExpert:
    """Ablate one expert; ``mode`` must be explicit because "ablate" is ambiguous in top-k MoE.

    - ``drop``: zero its routing weight, no renormalisation (the token gets k−1 experts);
    - ``renorm``: zero it and rescale the remaining top-k weights to the original total;
    - ``reroute``: exclude it from the selection (router logit → :func:`~moe_interp.experts.excluded_logit`,
      masked out of the family's selection score, correction bias and group scores included) and re-run the
      family's routing, so the next-best expert takes its slot. That is the model's own routing without the
      expert, not a slot swap: a softmax without top-k renormalisation (OLMoE, Qwen2-MoE) raises the kept
      experts' weights by 1/(1 − p_e), and group-limited routing (DeepSeek-V3) can change the group;
    - ``mean``: where it is routed, replace its weighted output with ``mean_output`` (its mean weighted
      output over a reference set, see :func:`moe_interp.patching.ablation.expert_mean_outputs`).
    """

    layer: int
    expert: int
    mode: AblationMode
    mean_output: Tensor | None = None
    positions: Positions = "all"

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        model.check_expert(self.layer, self.expert)
        if self.mode not in ABLATION_MODES:
            raise ValueError(f"Unknown ablation mode {self.mode!r}; expected one of {ABLATION_MODES}.")
        pos = check_positions(self.positions)
        e, L = self.expert, self.layer
        if self.mode in ("drop", "renorm"):
            renorm = self.mode == "renorm"

            def weights_fn(w: Tensor, ctx: HookContext) -> Tensor:
                m = position_mask(ctx, pos, w)
                if m is None:
                    return w
                new = w.clone()
                new[..., e] = 0
                if renorm:
                    total, rest = w.sum(-1, keepdim=True), new.sum(-1, keepdim=True)
                    new = torch.where(rest > 0, new * total / rest.clamp_min(1e-30), new)
                return _where(m, new, w)

            return {f"blocks.{L}.mlp.hook_expert_weights": weights_fn}
        if self.mode == "reroute":

            def logits_fn(z: Tensor, ctx: HookContext) -> Tensor:
                m = position_mask(ctx, pos, z)
                if m is None:
                    return z
                new = z.clone()
                new[..., e] = excluded_logit(z.dtype)
                return _where(m, new, z)

            return {f"blocks.{L}.mlp.hook_router_logits": logits_fn}
        if self.mean_output is None:
            raise ValueError(
                "mode='mean' needs mean_output (the expert's mean weighted output, size d_model)."
            )
        mean = check_vector(self.mean_output, model.spec.d_model, "mean_output")

        def mean_fn(y: Tensor, ctx: HookContext) -> Tensor:
            m = position_mask(ctx, pos, y)
            if m is None:
                return y
            routed = (y != 0).any(-1) & m
            return _where(routed, mean.to(device=y.device, dtype=y.dtype).expand_as(y), y)

        return {f"blocks.{L}.mlp.experts.{e}.hook_out": mean_fn}


ForceMode = Literal["add", "only", "router_bias"]


@dataclass
class ForceExpert:
    """Force an expert on.

    - ``add``: add it to every token's selection with routing weight ``weight`` (default: the token's
      largest current weight), keeping the others;
    - ``only``: route every token to this expert alone, with weight ``weight`` (default 1);
    - ``router_bias``: add ``+bias`` to its router logit and ``−bias`` to all others, then re-run the
      family's routing function ("Expert-Aware Refusal Steering" forces the router this way).
    """

    layer: int
    expert: int
    mode: ForceMode
    weight: float | None = None
    bias: float = 100.0
    positions: Positions = "all"

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        model.check_expert(self.layer, self.expert)
        if self.mode not in ("add", "only", "router_bias"):
            raise ValueError(f"Unknown force mode {self.mode!r}; expected 'add', 'only' or 'router_bias'.")
        if self.weight is not None:
            check_coeff(self.weight)
        pos = check_positions(self.positions)
        e, L = self.expert, self.layer
        if self.mode == "router_bias":

            def logits_fn(z: Tensor, ctx: HookContext) -> Tensor:
                m = position_mask(ctx, pos, z)
                if m is None:
                    return z
                bias = torch.full_like(z, -self.bias)
                bias[..., e] = self.bias
                return _where(m, z + bias, z)

            return {f"blocks.{L}.mlp.hook_router_logits": logits_fn}
        only = self.mode == "only"

        def weights_fn(w: Tensor, ctx: HookContext) -> Tensor:
            m = position_mask(ctx, pos, w)
            if m is None:
                return w
            if only:
                new = torch.zeros_like(w)
                new[..., e] = 1.0 if self.weight is None else self.weight
            else:
                new = w.clone()
                new[..., e] = w.max(-1).values if self.weight is None else self.weight
            return _where(m, new, w)

        return {f"blocks.{L}.mlp.hook_expert_weights": weights_fn}


@dataclass
class SteerRouter:
    """SteerMoE: (de)activate experts by editing the router logits before top-k.

    For each token, activated experts get the row's max logit ``+ epsilon`` and deactivated ones the row's
    min ``− epsilon`` (``epsilon >= 0``; with ``epsilon > 0`` at least one step of the logits' dtype, so the
    margin survives bf16); the family's routing function then re-runs. For softmax routers this is SteerMoE's
    edit of log-softmax scores (which differ from the logits by a per-token constant); on sigmoid routers
    (DeepSeek-V3, Llama 4) editing the logits leaves the other experts' scores as they were.
    """

    layer: int
    activate: Sequence[int] = ()
    deactivate: Sequence[int] = ()
    epsilon: float = 1e-2
    positions: Positions = "all"
    _: Any = field(default=None, repr=False)

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        for e in (*self.activate, *self.deactivate):
            model.check_expert(self.layer, e)
        if set(self.activate) & set(self.deactivate):
            raise ValueError("An expert cannot be both activated and deactivated.")
        eps = check_epsilon(self.epsilon)
        pos = check_positions(self.positions)
        act, deact = list(self.activate), list(self.deactivate)

        def fn(z: Tensor, ctx: HookContext) -> Tensor:
            m = position_mask(ctx, pos, z)
            if m is None:
                return z
            top, bottom = z.max(-1, keepdim=True).values, z.min(-1, keepdim=True).values
            hi, lo = (top.float() + eps).to(z.dtype), (bottom.float() - eps).to(z.dtype)
            if eps > 0:  # a margin the dtype rounded away becomes one representable step
                hi = torch.where(hi > top, hi, torch.nextafter(top, torch.full_like(top, math.inf)))
                lo = torch.where(lo < bottom, lo, torch.nextafter(bottom, torch.full_like(bottom, -math.inf)))
            new = z.clone()
            if act:
                new[..., act] = hi.expand(*hi.shape[:-1], len(act))
            if deact:
                new[..., deact] = lo.expand(*lo.shape[:-1], len(deact))
            return _where(m, new, z)

        return {f"blocks.{self.layer}.mlp.hook_router_logits": fn}
