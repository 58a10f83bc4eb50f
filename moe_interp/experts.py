"""Routing and per-expert computation from fused expert weights.

transformers 5.x stores a layer's experts as fused 3-D parameters and has no per-expert module to hook, so
per-expert outputs are computed here from the experts module's inputs and weights. Which formula applies is
data (:attr:`FamilySpec.expert_kind`, :attr:`FamilySpec.router_kind`), never a branch on the family name.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from moe_interp.families import ExpertKind, FamilySpec, RouterKind

# --------------------------------------------------------------------------------------------- routing
# Each routing function takes ``exclude``: None, or a bool ``[n_tok, n_experts]`` mask of experts that must not
# be selected. It is applied to the score each family *selects* on (after any correction bias, before
# group-limited top-k), so an excluded expert never takes a slot, whatever the routing kind.

Exclude = Tensor | None

#: A transformers router or experts module read by duck typing: its family-specific attributes (plain ints,
#: methods, fused parameters) are not declared on ``nn.Module``, whose ``__getattr__`` types them all as
#: ``Tensor | Module``.
FamilyModule = Any


def _mask(x: Tensor, exclude: Exclude, value: float = float("-inf")) -> Tensor:
    return x if exclude is None else x.masked_fill(exclude, value)


def _softmax_topk(
    router: nn.Module, logits: Tensor, k: int, spec: FamilySpec, exclude: Exclude = None
) -> tuple[Tensor, Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    idx = torch.topk(_mask(probs, exclude), k, dim=-1).indices
    top = probs.gather(-1, idx)
    if getattr(router, "norm_topk_prob", spec.norm_topk_default):
        top = top / top.sum(dim=-1, keepdim=True)
    return top, idx


def _topk_softmax(
    router: nn.Module, logits: Tensor, k: int, spec: FamilySpec, exclude: Exclude = None
) -> tuple[Tensor, Tensor]:
    top, idx = torch.topk(_mask(logits, exclude), k, dim=-1)
    return torch.softmax(top.float(), dim=-1), idx


def _sigmoid_group_topk(
    router: nn.Module, logits: Tensor, k: int, spec: FamilySpec, exclude: Exclude = None
) -> tuple[Tensor, Tensor]:
    scores = logits.float().sigmoid()
    bias = getattr(router, "e_score_correction_bias", None)
    # the correction bias can make an expert with sigmoid score 0 win: exclusion masks the biased score
    choice = _mask(scores + bias if bias is not None else scores, exclude)
    n_group = getattr(router, "num_group", getattr(router, "n_group", 1)) or 1
    topk_group = getattr(router, "topk_group", n_group) or n_group
    n_exp = logits.shape[-1]
    if n_group > 1:
        group_scores = choice.view(-1, n_group, n_exp // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_exp // n_group).reshape(-1, n_exp)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, idx)
    if getattr(router, "norm_topk_prob", spec.norm_topk_default):
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * getattr(router, "routed_scaling_factor", 1.0)
    return weights, idx


def _softmax_group_greedy(
    router: FamilyModule, logits: Tensor, k: int, spec: FamilySpec, exclude: Exclude = None
) -> tuple[Tensor, Tensor]:
    scores = _mask(logits.float().softmax(dim=-1), exclude, 0.0)
    if getattr(router, "topk_method", "greedy") == "group_limited_greedy":
        n_group, n_exp = router.num_group, logits.shape[-1]
        group_scores = scores.view(-1, n_group, n_exp // n_group).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_exp // n_group).reshape(-1, n_exp)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    # masked-out groups score 0 (as in transformers); an excluded expert is below them
    idx = torch.topk(_mask(scores, exclude), k=k, dim=-1, sorted=False).indices
    weights = scores.gather(-1, idx)
    return weights * getattr(router, "routed_scaling_factor", 1.0), idx


def _sparsemixer(
    router: nn.Module, logits: Tensor, k: int, spec: FamilySpec, exclude: Exclude = None
) -> tuple[Tensor, Tensor]:
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    # sparsemixer selects by argmax of the logits: a finite floor excludes (−inf would give inf/inf = NaN)
    return sparsemixer(
        _mask(logits, exclude, excluded_logit(logits.dtype)),
        jitter_eps=getattr(router, "router_jitter_noise", 0.01),
        training=False,
        top_k=k,
    )


def _topk_sigmoid_dense(
    router: nn.Module, logits: Tensor, k: int, spec: FamilySpec, exclude: Exclude = None
) -> tuple[Tensor, Tensor]:
    top, idx = torch.topk(_mask(logits, exclude), k, dim=1)
    dense = torch.full_like(logits, float("-inf")).scatter_(1, idx, top)
    return torch.sigmoid(dense.float()), idx


ROUTERS: dict[RouterKind, Callable[[nn.Module, Tensor, int, FamilySpec, Exclude], tuple[Tensor, Tensor]]] = {
    "softmax_topk": _softmax_topk,
    "topk_softmax": _topk_softmax,
    "sigmoid_group_topk": _sigmoid_group_topk,
    "softmax_group_greedy": _softmax_group_greedy,
    "sparsemixer": _sparsemixer,
    "topk_sigmoid_dense": _topk_sigmoid_dense,
}


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[None]:
    """Inside the block, weights that accelerate offloads (``device_map`` with cpu/disk offload keeps them on
    the meta device outside the module's own forward) are loaded on the execution device, as for a forward.
    The adapter reads fused weights outside that forward (per-expert outputs, per-head results, re-routing)."""
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # no accelerate: nothing can be offloaded
        yield
        return
    with contextlib.ExitStack() as stack:
        for m in module.modules():
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m))
        yield


def route(
    spec: FamilySpec,
    router: nn.Module,
    logits: Float[Tensor, "n_tok n_experts"],
    top_k: int,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Int[Tensor, "n_tok k"]]:
    """Re-run the family's routing function on (edited) router logits.

    A logit of −inf (or at most ``finfo.min / 4``, :func:`excluded_logit`) excludes that expert from the
    selection, in every routing kind (correction biases and group scores included). Returns
    ``(weights, indices)``: top-k weights ``[n_tok, k]`` for most families, or dense scores
    ``[n_tok, n_experts]`` where the router emits dense scores (:class:`~moe_interp.adapters.DenseScoreRouter`).
    Weights are computed in float32 and returned in ``dtype`` (default: the routing function's own, float32
    for most kinds): pass the dtype of the router's own weights to reproduce them bit for bit.
    """
    floor = excluded_logit(logits.dtype)
    exclude = logits <= floor
    # finite logits: −inf would make the softmax/sigmoid arithmetic produce NaN in some routing functions
    with materialized(router):  # correction biases of an offloaded router
        weights, idx = ROUTERS[spec.router_kind](
            router, logits.masked_fill(exclude, floor), top_k, spec, exclude
        )
    if bool(exclude.gather(1, idx.long()).any()):  # one check per edited router, no per-token work
        n_left = int((~exclude).sum(-1).min())
        raise ValueError(
            f"Router logits exclude too many experts: a token has {n_left} selectable experts left (within "
            f"the groups {spec.router_kind} allows), but the router selects top_k={top_k}."
        )
    return (weights if dtype is None else weights.to(dtype)), idx


def excluded_logit(dtype: torch.dtype) -> float:
    """The router logit that removes an expert from selection (``finfo(dtype).min / 4``; −inf also does)."""
    return torch.finfo(dtype).min / 4


def dense_to_topk(
    dense: Float[Tensor, "n_tok n_experts"], min_k: int = 1
) -> tuple[Float[Tensor, "n_tok k"], Int[Tensor, "n_tok k"]]:
    """Convert dense per-expert weights back to (weights, indices), k = the largest number of non-zeros of a
    token but at least ``min_k`` (the router's top-k: zero-weight slots pad it, so the width of
    ``hook_topk_expert_out`` does not depend on which prompts share the batch)."""
    nonzero = dense != 0
    k = max(int(nonzero.sum(-1).max().item()) if dense.numel() else 1, 1)
    k = min(max(k, min_k), dense.shape[-1])
    order = torch.argsort(nonzero.to(torch.int8), dim=-1, descending=True, stable=True)[:, :k]
    return dense.gather(1, order), order


def topk_to_dense(
    weights: Float[Tensor, "n_tok k"], indices: Int[Tensor, "n_tok k"], n_experts: int
) -> Float[Tensor, "n_tok n_experts"]:
    """Scatter top-k weights into a dense ``[n_tok, n_experts]`` tensor (zero where not routed)."""
    dense = torch.zeros(weights.shape[0], n_experts, dtype=weights.dtype, device=weights.device)
    return dense.scatter_add(1, indices.long(), weights)


# ----------------------------------------------------------------------------------- expert functions


def _glu_chunk(experts: FamilyModule, e: int, x: Tensor) -> Tensor:
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def _glu_interleaved_clamped(experts: FamilyModule, e: int, x: Tensor) -> Tensor:
    gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
    return experts._apply_gate(gate_up) @ experts.down_proj[e] + experts.down_proj_bias[e]


def _input_scaled_glu(experts: FamilyModule, e: int, x: Tensor) -> Tensor:
    gate, up = (x @ experts.gate_up_proj[e]).chunk(2, dim=-1)
    return (up * experts.act_fn(gate)) @ experts.down_proj[e]


EXPERT_FNS: dict[ExpertKind, Callable[[nn.Module, int, Tensor], Tensor]] = {
    "glu_chunk": _glu_chunk,
    "glu_interleaved_clamped": _glu_interleaved_clamped,
    "input_scaled_glu": _input_scaled_glu,
}

#: expert kinds whose routing weight scales the expert's input rather than its output
INPUT_SCALED: frozenset[str] = frozenset({"input_scaled_glu"})


def expert_forward(
    spec: FamilySpec, experts: nn.Module, e: int, x: Float[Tensor, "n d"]
) -> Float[Tensor, "n d"]:
    """Unweighted output of expert ``e`` on tokens ``x``, from the fused weights."""
    return EXPERT_FNS[spec.expert_kind](experts, e, x)


#: transformers experts implementations (``config._experts_implementation``) whose output is the sum, over the
#: top-k slots in slot order, of the weighted per-pair outputs (``view(n, k, d).sum(1)``): for these the sum of
#: :func:`module_pair_outputs` is the module's own output, bit for bit, in every dtype.
SLOT_SUM_IMPLEMENTATIONS: frozenset[str] = frozenset({"grouped_mm", "batched_mm"})


@functools.cache
def _slot_sum_functions() -> tuple[Callable[..., Tensor], ...]:
    try:
        from transformers.integrations import moe as hf_moe
    except ImportError:
        return ()
    return tuple(
        f
        for f in (
            getattr(hf_moe, "grouped_mm_experts_forward", None),
            getattr(hf_moe, "batched_mm_experts_forward", None),
        )
        if f is not None
    )


def sums_like_module(experts: nn.Module, dtype: torch.dtype) -> bool:
    """Whether the sum over slots of :func:`module_pair_outputs` (on inputs of ``dtype``) is the experts
    module's own output bit for bit.

    True only when the class ``forward`` is transformers' ``use_experts_implementation`` dispatcher, the function
    it dispatches to is transformers' own ``grouped_mm`` or ``batched_mm`` (not another function registered under
    that name, e.g. a quantised backend's), and every floating-point weight has the activations' dtype (the
    module casts its output to that dtype, which must not round a pair before it is weighted). Anything else
    answers False, and the adapter then keeps the module's own output.
    """
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    fwd = type(experts).forward
    if impl not in SLOT_SUM_IMPLEMENTATIONS or getattr(fwd, "__wrapped__", None) is None:
        return False
    code, closure = getattr(fwd, "__code__", None), getattr(fwd, "__closure__", None) or ()
    cells = dict(zip(code.co_freevars, closure, strict=False)) if code is not None else {}
    interface = getattr(cells.get("experts_interface"), "cell_contents", None)
    get = getattr(interface, "get_interface", None)
    if get is None or get(impl, None) not in _slot_sum_functions():
        return False
    return all(p.dtype == dtype for p in experts.parameters() if p.is_floating_point())


def module_pair_outputs(
    spec: FamilySpec,
    experts: nn.Module,
    x: Float[Tensor, "n_tok d"],
    weights: Float[Tensor, "n_tok k"],
    indices: Int[Tensor, "n_tok k"],
) -> Float[Tensor, "n_tok k d"]:
    """The weighted output of each (token, slot) pair, computed by the experts module itself.

    The module's class ``forward`` (not the instance's: no nnsight or accelerate hooks) is called once with each
    pair as a token of its own routed to one expert, with weight 1. The flattened expert ids are those of the
    module's own call, so it sorts, gathers and multiplies the same rows with the same kernels; the routing
    weight is then applied as the module applies it (``proj * w`` in the promoted dtype: fp32 for bf16 outputs
    and fp32 weights), so each pair's output is the one the module sums inside its own call. Returned in that
    promoted dtype; where the weight scales the expert's input (:data:`INPUT_SCALED`) it goes in with the input.
    """
    n, k = indices.shape
    scale_input = spec.expert_kind in INPUT_SCALED
    w = weights.reshape(n * k, 1)
    with materialized(experts):
        out = type(experts).forward(
            experts,
            x.repeat_interleave(k, dim=0),
            indices.reshape(n * k, 1),
            w if scale_input else torch.ones_like(w),
        )
    out = out.view(n, k, -1)
    return out if scale_input else out * weights.unsqueeze(-1)


def topk_expert_outputs(
    spec: FamilySpec,
    experts: nn.Module,
    x: Float[Tensor, "n_tok d"],
    weights: Float[Tensor, "n_tok k"],
    indices: Int[Tensor, "n_tok k"],
) -> Float[Tensor, "n_tok k d"]:
    """Sparse form: the weighted outputs of each token's top-k experts, aligned with ``indices``.

    The (token, slot) pairs are sorted by expert once (stable: each expert sees its tokens in order), gathered
    in one ``index_select``, each expert runs on its contiguous slice, and one row gather puts the results back
    in slot order — per expert the same rows and ops as a per-expert ``nonzero`` loop.
    """
    with materialized(experts):
        return _topk_expert_outputs(spec, experts, x, weights, indices)


def _topk_expert_outputs(
    spec: FamilySpec, experts: nn.Module, x: Tensor, weights: Tensor, indices: Tensor
) -> Tensor:
    n_tok, k = indices.shape
    d = x.shape[-1]
    flat = indices.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=1).tolist()  # one host sync for all experts
    xs = x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    ws = weights.reshape(-1).index_select(0, order)[:, None]
    if spec.expert_kind in INPUT_SCALED:
        xs = xs * ws
    ys = x.new_empty(n_tok * k, d)
    start = 0
    for e, c in enumerate(counts):
        if c:
            y, dst, w = (
                expert_forward(spec, experts, e, xs[start : start + c]),
                ys[start : start + c],
                ws[start : start + c],
            )
            if spec.expert_kind in INPUT_SCALED:
                dst.copy_(y)
            elif not torch.is_grad_enabled() and torch.result_type(y, w) == dst.dtype:
                torch.mul(y, w, out=dst)  # out= has no autograd: only without grad
            else:
                dst.copy_(y * w)
        start += c
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return ys.index_select(0, inverse).view(n_tok, k, d)  # a row gather: cheaper than index_copy_
