"""nnsight plumbing: read and edit hook points inside one trace, in execution order.

Every hook value is produced from what the HF forward really computes (module inputs and outputs read
through nnsight) and laid out ``[batch, pos, ...]``. Edits are written back to the module input or output
they came from, so they propagate downstream. Modules are visited strictly in execution order (nnsight's
rule); the order inside an MoE block is data (:attr:`FamilySpec.moe_order`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import einops
import torch
from torch import Tensor

from moe_interp.buffers import BUFFERS
from moe_interp.experts import (
    materialized,
    module_pair_outputs,
    route,
    sums_like_module,
    topk_expert_outputs,
)
from moe_interp.families import FamilySpec
from moe_interp.hooks import check_writable


@dataclass
class HookContext:
    """What an edit function knows about the forward pass it is editing."""

    name: str
    layer: int | None
    attention_mask: Tensor
    is_prompt: bool
    step: int


EditFn = Callable[[Tensor, HookContext], Tensor]


@dataclass
class LayerInfo:
    """Resolved module paths and geometry of one decoder layer."""

    index: int
    attn: str | None
    linear_attn: str | None
    q: str | None
    k: str | None
    v: str | None
    o: str | None
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_head_v: int
    mlp: str
    is_moe: bool
    n_experts: int = 0
    top_k: int = 0
    shared: str | None = None
    shared_gate: str | None = None
    residual_multiplier: float = 1.0


@dataclass
class EditRecord:
    """Finiteness of one edit function's input and output (recorded when diagnosing non-finite logits)."""

    name: str
    label: str
    step: int
    input_finite: bool
    output_finite: bool
    output_absmax: float


def finite(x: Tensor, name: str) -> bool:
    """No NaN/inf in ``x``; a −inf router logit is allowed (it excludes that expert from selection)."""
    if name.endswith("hook_router_logits"):
        return not bool((torch.isnan(x) | torch.isposinf(x)).any())
    return bool(torch.isfinite(x).all())


@dataclass
class TraceRequest:
    """Which hook points to save and which to edit in one forward pass."""

    reads: set[str] = field(default_factory=set)
    edits: dict[str, list[EditFn]] = field(default_factory=dict)
    positions: Any = None  # None, slice or list of ints: positions kept in the cache
    #: per hook, a label per edit function (the intervention it came from), for error messages
    labels: dict[str, list[str]] = field(default_factory=dict)
    #: when a list, every edit appends an :class:`EditRecord` (diagnosis of non-finite outputs only)
    monitor: list[EditRecord] | None = None

    def wants(self, name: str) -> bool:
        return name in self.reads or name in self.edits

    def any_prefix(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in self.reads) or any(n.startswith(prefix) for n in self.edits)


def _get(envoy: Any, path: str) -> Any:
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def _first(x: Any) -> Tensor:
    return x[0] if isinstance(x, tuple) else x


def _replace_first(old: Any, new: Tensor) -> Any:
    return (new, *old[1:]) if isinstance(old, tuple) else new


def _scaled(x: Tensor, factor: float) -> Tensor:
    """``x * factor``, without a full copy when the factor is 1 (every family but Granite)."""
    return x if factor == 1.0 else x * factor


def _exact(x: Tensor) -> bool:
    """fp32/fp64: a re-summation equals the module's own result to rounding; in half precision it does not."""
    return x.dtype in (torch.float32, torch.float64)


def _unscale(orig: Tensor, ref: Tensor, new: Tensor, mult: float) -> Tensor:
    """The module tensor to write back for an edit ``ref → new`` of a hook read as ``orig · mult``.

    With a multiplier (Granite) the edit goes back as a delta, ``orig + (new − ref) / mult``: where nothing
    was edited the delta is exactly 0 and ``orig`` keeps its bits (``x · m / m`` is not ``x`` in bf16)."""
    if mult == 1.0:
        return new.to(orig.dtype)
    return (orig + (new - ref).reshape(orig.shape) / mult).to(orig.dtype)


class LayerTracer:
    """Runs inside a trace: visits hook points of one forward pass in order, saving and editing them."""

    def __init__(
        self,
        nn_model: Any,
        spec: FamilySpec,
        layers: list[LayerInfo],
        request: TraceRequest,
        store: dict[str, list[Tensor]],
        batch: int,
        seq: int,
        attention_mask: Tensor,
        step: int = 0,
    ) -> None:
        self.nn = nn_model
        self.spec = spec
        self.layers = layers
        self.req = request
        self.store = store
        self.b, self.p = batch, seq
        self.mask = attention_mask
        self.step = step
        if step == 0 and request.edits:  # MoEModel checks interventions earlier; this covers direct requests
            check_writable(request.edits, spec.read_only_sites)

    # ----------------------------------------------------------------------------- helpers
    def _ctx(self, name: str, layer: int | None) -> HookContext:
        return HookContext(name, layer, self.mask, self.step == 0, self.step)

    def _edit(self, name: str, value: Tensor, layer: int | None) -> Tensor | None:
        fns = self.req.edits.get(name)
        if not fns:
            return None
        new = value
        monitor = self.req.monitor
        for i, fn in enumerate(fns):
            in_finite = finite(new, name) if monitor is not None else True  # before fn: it may edit in place
            new = fn(new, self._ctx(name, layer))
            if not isinstance(new, Tensor) or new.shape != value.shape:
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise ValueError(
                    f"An edit of {name} must return a tensor of shape {tuple(value.shape)}, got {got}."
                )
            if monitor is not None:
                labels = self.req.labels.get(name, [])
                label = labels[i] if i < len(labels) else getattr(fn, "__name__", type(fn).__name__)
                big = new.detach().abs().nan_to_num(nan=0.0, posinf=0.0)
                absmax = float(big.max()) if big.numel() else 0.0
                monitor.append(EditRecord(name, label, self.step, in_finite, finite(new, name), absmax))
        return new

    def _save(self, name: str, value: Tensor, pos_dim: int = 1) -> None:
        if name not in self.req.reads:
            return
        pos = self.req.positions
        if pos is not None:
            index: list[slice | Tensor] = [slice(None)] * value.ndim
            index[pos_dim] = pos if isinstance(pos, slice) else torch.as_tensor(pos, dtype=torch.long)
            value = value[tuple(index)]
        self.store.setdefault(name, [])
        self.store[name].append(value)

    def _bp(self, flat: Tensor) -> Tensor:
        return flat.reshape(self.b, self.p, *flat.shape[1:])

    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(self.b * self.p, *x.shape[2:])

    def _ref(self, value: Tensor, *names: str, always: bool = False) -> Tensor:
        """``value`` as read, kept for a delta write-back: copied when one of ``names`` is edited (an edit may
        work in place), and only where a delta is needed (``always``, or ``value`` is a scaled copy)."""
        if always and any(self.req.edits.get(n) for n in names):
            return value.clone()
        return value

    def _site(self, name: str, value: Tensor, layer: int | None, pos_dim: int = 1) -> Tensor | None:
        """Edit then save one hook value; returns the edited tensor or None if unedited."""
        new = self._edit(name, value, layer)
        self._save(name, value if new is None else new, pos_dim)
        return new

    # ------------------------------------------------------------------------------- forward
    def run(self) -> None:
        if self.req.wants("hook_embed"):
            emb = _get(self.nn, self.spec.embed)
            # in residual units, like blocks.0.hook_resid_pre (Granite scales embeddings after the module)
            attr = self.spec.embedding_multiplier
            mult = float(getattr(self.nn.config, attr, None) or 1.0) if attr else 1.0
            raw = emb.output
            val = _scaled(raw, mult)
            ref = self._ref(val, "hook_embed", always=mult != 1.0)
            new = self._site("hook_embed", val, None)
            if new is not None:
                emb.output = _unscale(raw, ref, new, mult)
        for info in self.layers:
            if self.req.any_prefix(f"blocks.{info.index}."):
                self._layer(info)
        if self.req.wants("ln_final.hook_normalized"):
            norm = _get(self.nn, self.spec.final_norm)
            new = self._site("ln_final.hook_normalized", norm.output, None)
            if new is not None:
                norm.output = new

    def _layer(self, info: LayerInfo) -> None:
        L = info.index
        pre_name, mid_name = f"blocks.{L}.hook_resid_pre", f"blocks.{L}.hook_resid_mid"
        layer = _get(self.nn, self.spec.layers)[L]
        resid_pre = None
        if self.req.wants(pre_name) or self.req.wants(mid_name):
            args, kwargs = layer.inputs
            resid_pre = args[0] if args else kwargs["hidden_states"]
            new = self._site(pre_name, resid_pre, L)
            if new is not None:
                resid_pre = new
                if args:
                    layer.inputs = ((new, *args[1:]), kwargs)
                else:
                    layer.inputs = (args, {**kwargs, "hidden_states": new})
        if (
            self.req.any_prefix(f"blocks.{L}.attn.")
            or self.req.wants(f"blocks.{L}.hook_attn_out")
            or self.req.wants(mid_name)
        ):
            self._attention(info, layer, resid_pre)
        if (
            self.req.any_prefix(f"blocks.{L}.mlp.")
            or self.req.wants(f"blocks.{L}.hook_mlp_out")
            or self.req.wants(f"blocks.{L}.hook_resid_post")
        ):
            self._mlp(info, layer)
        post = f"blocks.{L}.hook_resid_post"
        if self.req.wants(post):
            out = layer.output
            new = self._site(post, _first(out), L)
            if new is not None:
                layer.output = _replace_first(out, new)

    def _attention(self, info: LayerInfo, layer: Any, resid_pre: Tensor | None) -> None:
        L = info.index
        prefix = f"blocks.{L}.attn."
        if info.attn is not None:
            attn = getattr(layer, info.attn)
            for key, path, heads in (
                ("hook_q", info.q, info.n_heads),
                ("hook_k", info.k, info.n_kv_heads),
                ("hook_v", info.v, info.n_kv_heads),
            ):
                name = prefix + key
                if path is not None and self.req.wants(name):
                    mod = _get(attn, path)
                    out = mod.output
                    val = out.reshape(*out.shape[:-1], heads, -1)  # q may carry a gate: [q_h | gate_h]
                    new = self._site(name, val, L)
                    if new is not None:
                        mod.output = new.reshape(out.shape)
            z_name, r_name = prefix + "hook_z", prefix + "hook_result"
            if info.o is not None and (self.req.wants(z_name) or self.req.wants(r_name)):
                o = getattr(attn, info.o)
                z_flat = o.input
                z = z_flat.reshape(*z_flat.shape[:-1], info.n_heads, info.d_head_v)
                new = self._site(z_name, z, L)
                if new is not None:
                    z = new
                    o.input = new.reshape(z_flat.shape)
                if self.req.wants(r_name):
                    with materialized(o._module):  # offloaded weights (accelerate): load them first
                        w_o = einops.rearrange(o._module.weight, "d (h dv) -> h dv d", h=info.n_heads)
                        result = _scaled(
                            einops.einsum(z, w_o.to(z.dtype), "b p h dv, h dv d -> b p h d"),
                            info.residual_multiplier,
                        )
                        bias = o._module.bias  # a reference stays valid after offloading
                    # The output projection is the sum of the per-head results (+ bias). When the module is a
                    # plain Linear in fp32/fp64, that sum replaces it (nnsight skip), so o_proj's matmul is not
                    # done twice (bench/bench_hooks.py); the sum equals o_proj to rounding. Otherwise o_proj runs
                    # as usual and an edit is added to its output as a delta: observing must not change the
                    # forward by the per-head roundings, nor an edit the positions it leaves alone.
                    plain = type(o._module) is torch.nn.Linear
                    fast = plain and _exact(z)
                    ref = self._ref(result, r_name, always=not fast)
                    new = self._site(r_name, result, L)
                    if fast:
                        out = (result if new is None else new).sum(dim=2)
                        if info.residual_multiplier != 1.0:
                            out = out / info.residual_multiplier
                        if bias is not None:
                            out = out + bias
                        o.skip(out.to(z.dtype))
                    elif new is not None:
                        delta = (new - ref).sum(dim=2)
                        if info.residual_multiplier != 1.0:
                            delta = delta / info.residual_multiplier
                        o.output = (o.output + delta).to(z.dtype)
        else:
            attn = getattr(layer, info.linear_attn) if info.linear_attn else None
        if attn is None:
            return
        a_name, m_name, p_name = (
            f"blocks.{L}.hook_attn_out",
            f"blocks.{L}.hook_resid_mid",
            prefix + "hook_pattern",
        )
        if not (self.req.wants(a_name) or self.req.wants(m_name) or self.req.wants(p_name)):
            return
        out = attn.output
        if self.req.wants(p_name):
            pattern = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if pattern is None:
                raise RuntimeError(
                    f"{p_name} needs attention weights; run with eager attention (done automatically by "
                    "run_with_cache when hook_pattern is requested)."
                )
            self._save(p_name, pattern, pos_dim=2)
        mult = info.residual_multiplier
        raw = _first(out)
        attn_out = raw * mult
        ref = self._ref(attn_out, a_name, always=mult != 1.0)
        new_attn = self._site(a_name, attn_out, L)
        if self.req.wants(m_name):
            assert resid_pre is not None  # read by _layer whenever resid_mid is wanted
            mid = resid_pre + (attn_out if new_attn is None else new_attn)
            ref_mid = self._ref(mid, m_name, always=True)
            new_mid = self._site(m_name, mid, L)
            if new_mid is not None:  # as a delta: (pre + a) − pre is not a in half precision
                new_attn = (attn_out if new_attn is None else new_attn) + (new_mid - ref_mid)
        if new_attn is not None:
            attn.output = _replace_first(out, _unscale(raw, ref, new_attn, mult))

    def _mlp(self, info: LayerInfo, layer: Any) -> None:
        L = info.index
        pfx = f"blocks.{L}.mlp."
        mlp = getattr(layer, info.mlp)
        mult = info.residual_multiplier
        shared_delta: Tensor | None = None
        if info.is_moe:
            spec = self.spec
            shared_raw = None
            want_router = any(
                self.req.wants(pfx + s)
                for s in ("hook_router_logits", "hook_expert_indices", "hook_expert_weights")
            )
            want_experts = (
                self.req.any_prefix(pfx + "experts.")
                or self.req.wants(pfx + "hook_expert_out")
                or self.req.wants(pfx + "hook_topk_expert_out")
            )
            want_shared = info.shared is not None and self.req.wants(pfx + "hook_shared_out")
            for part in spec.moe_order:
                if part == "shared" and want_shared and info.shared is not None:
                    shared_raw = getattr(mlp, info.shared).output
                    if info.shared_gate is None:
                        shared_delta = self._shared_delta(pfx, self._bp(self._flat_any(shared_raw * mult)), L)
                elif part == "shared_gate" and want_shared and info.shared_gate is not None:
                    assert shared_raw is not None  # "shared" precedes "shared_gate" in moe_order
                    gate = getattr(mlp, info.shared_gate).output
                    shared_out = self._bp(torch.sigmoid(gate) * self._flat_any(shared_raw)) * mult
                    shared_delta = self._shared_delta(pfx, shared_out, L)
                elif part == "router" and want_router:
                    self._router(info, getattr(mlp, spec.router))
                elif part == "experts" and want_experts:
                    self._experts(info, getattr(mlp, spec.experts))
        mo_name = f"blocks.{L}.hook_mlp_out"
        if self.req.wants(mo_name) or shared_delta is not None:
            out = mlp.output
            first = _first(out)
            mlp_out = first.reshape(self.b, self.p, -1) * mult
            ref = self._ref(mlp_out, mo_name, always=mult != 1.0)
            new = mlp_out + shared_delta if shared_delta is not None else None
            edited = self._site(mo_name, new if new is not None else mlp_out, L)
            if edited is not None:
                new = edited
            if new is not None:
                mlp.output = _replace_first(out, _unscale(first, ref, new, mult).reshape(first.shape))

    def _shared_delta(self, pfx: str, shared_out: Tensor, L: int) -> Tensor | None:
        """Edit of ``hook_shared_out`` as a delta to add to the MLP output (None: no edit). The reference is
        copied first when an edit exists, so an edit made in place is not lost (new − new = 0)."""
        ref = self._ref(shared_out, pfx + "hook_shared_out", always=True)
        new = self._site(pfx + "hook_shared_out", shared_out, L)
        return None if new is None else new - ref

    def _flat_any(self, x: Tensor) -> Tensor:
        return x.reshape(self.b * self.p, x.shape[-1])

    def _router(self, info: LayerInfo, router: Any) -> None:
        L, pfx, spec = info.index, f"blocks.{info.index}.mlp.", self.spec
        io = spec.router_adapter
        routing = io.read(router.output)
        changed = False
        new_logits = self._site(pfx + "hook_router_logits", self._bp(routing.logits), L)
        if new_logits is not None:
            logits = self._flat(new_logits)
            # in the router's own weight dtype (Mixtral: fp32 under bf16 logits; Granite: the reverse), so an
            # edit at some positions leaves the others' weights bit-identical
            routing = io.rerouted(
                logits, *route(spec, router._module, logits, info.top_k, routing.weights.dtype)
            )
            changed = True
        idx_name, w_name = pfx + "hook_expert_indices", pfx + "hook_expert_weights"
        indices = io.selected(routing, info.top_k)
        new_idx = self._site(idx_name, self._bp(indices), L)
        if new_idx is not None:
            indices = self._flat(new_idx).to(indices.dtype)
            lo, hi = (int(indices.min()), int(indices.max())) if indices.numel() else (0, 0)
            if lo < 0 or hi >= info.n_experts:
                raise ValueError(
                    f"An edit of {idx_name} must give expert indices in [0, {info.n_experts}), got values in "
                    f"[{lo}, {hi}]."
                )
            routing = io.with_indices(routing, indices)
            changed = True
        if self.req.wants(w_name):
            new_dense = self._site(w_name, self._bp(io.dense(routing, info.n_experts)), L)
            if new_dense is not None:
                routing = io.with_dense(routing, self._flat(new_dense))
                changed = True
        if changed:
            router.output = io.write(routing)

    def _experts(self, info: LayerInfo, experts: Any) -> None:
        L, pfx, spec = info.index, f"blocks.{info.index}.mlp.", self.spec
        E, mult = info.n_experts, info.residual_multiplier
        per_expert_names = [f"{pfx}experts.{e}.hook_out" for e in range(E)]
        edit_names = (pfx + "hook_expert_out", *per_expert_names)
        want_dense = self.req.wants(pfx + "hook_expert_out") or any(
            self.req.wants(n) for n in per_expert_names
        )
        io = spec.router_adapter
        raw = io.expert_outputs(experts, E)  # None: the module returns only the sum of the routed experts
        if raw is not None:
            if self.req.wants(pfx + "hook_topk_expert_out"):
                raise ValueError(
                    f"{pfx}hook_topk_expert_out is not available for this family; use hook_expert_out."
                )
            read = self._bp(_scaled(raw, mult))
            before = self._ref(read, *edit_names, always=mult != 1.0)
            after, changed = self._expert_sites(pfx, read, per_expert_names, L)
            if changed:
                experts.output = io.combine(_unscale(raw, self._flat(before), self._flat(after), mult))
            return
        args, kwargs = experts.inputs
        x, indices, weights = (list(args) + [kwargs.get(k) for k in ("top_k_index", "top_k_weights")])[:3]
        want_topk = self.req.wants(pfx + "hook_topk_expert_out")
        if not (want_dense or want_topk):
            return
        # The experts' weighted output per (token, slot) pair, computed once. fp32/fp64: by the adapter's
        # per-expert loop (the cheapest on a CPU), whose sum replaces the skipped module's output to rounding.
        # Half precision: by the module itself (experts.module_pair_outputs); where its implementation sums the
        # pairs over the slots (experts.sums_like_module) that sum is its output bit for bit and the module is
        # skipped, otherwise the module runs as well and an edit is added to its output as a delta.
        module = experts._module
        per_pair = len(args) == 3  # the module takes (x, indices, weights)
        by_module = per_pair and not _exact(x)
        own = by_module and sums_like_module(module, x.dtype)
        fast = own or (per_pair and _exact(x))
        own_pairs = (
            module_pair_outputs(spec, module, x, weights, indices)
            if by_module
            else topk_expert_outputs(spec, module, x, weights, indices)
        )
        pairs = _scaled(own_pairs.to(x.dtype), mult)
        n_tok, k, d = pairs.shape
        if want_topk:  # read-only (hooks.READ_ONLY_SITES): edits are refused before the trace
            self._save(pfx + "hook_topk_expert_out", self._bp(pairs))
        cur: Tensor | None = None
        ref: Tensor | None = None
        edited = False
        if want_dense:
            # Row-wise index_add_ into the flattened [n_tok * E, d] buffer: ~2x cheaper on CPU than an element-wise
            # scatter_add over d, zero-fill included (bench/README.md); duplicates still accumulate. The buffer
            # comes from a pool (moe_interp.buffers): reused once the previous call's cache is dropped, so no
            # fresh pages are faulted in on every call, and told which rows were written, so that reuse
            # zeroes only those (k of every E rows) while no in-place op has touched the buffer since.
            rows = (torch.arange(n_tok, device=pairs.device)[:, None] * E + indices.long()).reshape(-1)
            dense = BUFFERS.zeros((n_tok * E, d), pairs.dtype, pairs.device)
            dense.index_add_(0, rows, pairs.reshape(-1, d))
            BUFFERS.written(dense, rows)
            dense_bp = self._bp(dense.view(n_tok, E, d))
            ref = self._ref(dense_bp, *edit_names, always=own or not fast)
            cur, edited = self._expert_sites(pfx, dense_bp, per_expert_names, L)
        if fast:
            if edited and not own:
                # fp32/fp64: the sum of the edited outputs, equal to the module's to rounding
                assert cur is not None
                total = io.combine(self._flat(cur)) / mult
            else:
                total = own_pairs.sum(dim=1).to(x.dtype)
                if edited:  # as a delta, exactly 0 where nothing was edited: those positions keep their bits
                    assert cur is not None and ref is not None
                    total = total + io.combine(self._flat(cur - ref)) / mult
            experts.skip(total.to(x.dtype))
        elif edited:
            assert cur is not None and ref is not None
            delta = io.combine(self._flat(cur - ref))
            orig = experts.output
            experts.output = (orig + (delta if mult == 1.0 else delta / mult)).to(orig.dtype)

    def _expert_sites(
        self, pfx: str, dense_bp: Tensor, per_expert_names: list[str], L: int
    ) -> tuple[Tensor, bool]:
        """Edit then save ``hook_expert_out`` and each ``experts.e.hook_out``; the edited value and whether any
        edit happened."""
        new = self._site(pfx + "hook_expert_out", dense_bp, L)
        edited = new is not None
        cur = dense_bp if new is None else new
        for e, name in enumerate(per_expert_names):
            if self.req.wants(name):
                new_e = self._site(name, cur[:, :, e], L)
                if new_e is not None:
                    cur = cur.clone()
                    cur[:, :, e] = new_e
                    edited = True
        return cur, edited
