"""Single-expert ablation: mean outputs, an exhaustive L × E sweep with bootstrap CIs, and its gradient
estimate.

The sweep batches the ablations of one layer: batch row ``r`` ablates expert ``col[r]`` via one edit function
per hook (``mlp.hook_expert_weights`` for drop / renorm, ``mlp.hook_router_logits`` for reroute, the sparse
expert outputs for mean) — element-wise the arithmetic of :class:`moe_interp.AblateExpert`, whose
one-forward-per-expert loop (:func:`expert_ablation_loop`) is the reference. It restarts each forward at (or
after) the ablated layer from a cached unedited pass (:mod:`moe_interp.prefix`) and skips prompts an ablation
cannot change. The effect is the per-prompt change of the logit refusal score (last position), ablated −
unablated.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from moe_interp.experts import (
    INPUT_SCALED,
    excluded_logit,
    expert_forward,
    materialized,
    route,
    topk_to_dense,
)
from moe_interp.interventions import ABLATION_MODES, AblateExpert, EditHook, check_positions, position_mask
from moe_interp.patching.metrics import bootstrap_ci, refusal_logodds
from moe_interp.prefix import PrefixCache, cache_prefix, restart, restart_after
from moe_interp.refusal.judges import resolve_refusal_ids
from moe_interp.tracing import EditFn, HookContext, _get

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moe_interp.model import MoEModel

#: default rows (ablations × prompts) per forward of the sweep: on the CPU larger batches only add cache misses
ROWS_CPU: int = 64
ROWS_ACCELERATOR: int = 512

__all__ = [
    "ExpertAblationResult",
    "expert_ablation_attribution",
    "expert_ablation_loop",
    "expert_ablation_sweep",
    "expert_mean_outputs",
]


def _prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings.")
    return list(prompts)


def _moe_names(model: MoEModel) -> list[int]:
    if not model.spec.moe_layers:
        raise ValueError("This model has no MoE layers; expert ablation needs an MoE model.")
    return list(model.spec.moe_layers)


def expert_mean_outputs(
    model: MoEModel, prompts: Sequence[str], batch_size: int = 16
) -> Float[Tensor, "n_layers n_experts d_model"]:
    """Mean weighted output of each expert over the (prompt, position) pairs where it is routed.

    Non-MoE layers and never-routed experts give zero vectors. Use with ``AblateExpert(mode="mean")``.
    """
    prompts = _prompts(prompts)
    spec = model.spec
    moe = _moe_names(model)
    sums = torch.zeros(spec.n_layers, spec.n_experts, spec.d_model, dtype=torch.float64)
    counts = torch.zeros(spec.n_layers, spec.n_experts, dtype=torch.float64)
    names = [f"blocks.{L}.mlp.hook_expert_out" for L in moe]
    for s in range(0, len(prompts), batch_size):
        enc = model.tokenize(prompts[s : s + batch_size])
        with torch.no_grad():
            _, cache = model.run_with_cache(enc, names=names, return_type=None)
        valid = enc["attention_mask"].bool().cpu()
        for L, nm in zip(moe, names, strict=True):
            y = cache[nm].detach().double().cpu()  # [b, p, E, d]
            routed = (y != 0).any(-1) & valid[..., None]  # [b, p, E]
            sums[L, : y.shape[2]] += (y * routed[..., None]).sum(dim=(0, 1))
            counts[L, : y.shape[2]] += routed.sum(dim=(0, 1))
    return (sums / counts.clamp_min(1)[..., None]).float()


@dataclass
class ExpertAblationResult:
    """Per-expert effect (mean over prompts of ablated − base refusal score) with a bootstrap CI."""

    effect: Tensor  # [n_layers, n_experts]
    ci_low: Tensor
    ci_high: Tensor
    per_prompt: Tensor  # [n_layers, n_experts, n_prompts]
    base_scores: Tensor  # [n_prompts]
    mode: str

    def __repr__(self) -> str:
        flat = self.effect.flatten()
        i = int(flat.abs().nan_to_num(-1.0).argmax())  # NaN: dense layers, experts left out of the sweep
        L, e = divmod(i, self.effect.shape[1])
        return (
            f"ExpertAblationResult(mode={self.mode}, {tuple(self.effect.shape)} layers × experts, "
            f"{self.per_prompt.shape[-1]} prompts, largest |effect| at blocks.{L}.mlp.experts.{e}: "
            f"{float(flat[i]):+.3f} [{float(self.ci_low.flatten()[i]):+.3f}, "
            f"{float(self.ci_high.flatten()[i]):+.3f}])"
        )

    def plot(self, routing_risk_diff: Tensor | None = None, **kwargs: Any) -> Figure:
        from moe_interp.plotting import plot_expert_heatmap

        return plot_expert_heatmap(
            self.effect,
            routing_risk_diff,
            metric_label=f"Δ refusal score, log-odds (ablate, mode={self.mode})",
            **kwargs,
        )


def _selection(mask: Tensor, positions: Any) -> Tensor:
    """``[n, pos]`` bool: the positions an ablation edits (``positions`` within the attention mask)."""
    ctx = HookContext("", None, mask, True, 0)
    m = position_mask(ctx, check_positions(positions), mask.shape)
    return torch.zeros(mask.shape, dtype=torch.bool, device=mask.device) if m is None else m


def _layer_edits(
    model: MoEModel,
    L: int,
    mode: str,
    col: Tensor,
    sel: Tensor,
    means: Tensor | None,
) -> dict[str, EditFn]:
    """Edits of layer ``L`` under which batch row ``r`` ablates expert ``col[r]`` at positions ``sel[r]``.

    Element-wise the same arithmetic as :class:`AblateExpert`. A hook may show the last positions only
    (``[rows, 1, ...]`` when a restart cuts the last layer): ``sel``'s last columns are used.
    """
    E, pfx = model.layers[L].n_experts, f"blocks.{L}.mlp."

    def hit(x: Tensor) -> Tensor:  # [R, 1, E]: the ablated expert's column per row
        return (torch.arange(E, device=x.device) == col.to(x.device)[:, None])[:, None, :]

    def sel_of(x: Tensor) -> Tensor:  # [R, p]
        return sel.to(x.device)[:, -x.shape[1] :]

    if mode in ("drop", "renorm"):

        def weights_fn(w: Tensor, ctx: HookContext) -> Tensor:
            new = w.masked_fill(hit(w), 0)
            if mode == "renorm":
                total, rest = w.sum(-1, keepdim=True), new.sum(-1, keepdim=True)
                new = torch.where(rest > 0, new * total / rest.clamp_min(1e-30), new)
            return torch.where(sel_of(w)[..., None], new, w)

        return {pfx + "hook_expert_weights": weights_fn}
    if mode == "reroute":

        def logits_fn(z: Tensor, ctx: HookContext) -> Tensor:
            new = z.masked_fill(hit(z), excluded_logit(z.dtype))
            return torch.where(sel_of(z)[..., None], new, z)

        return {pfx + "hook_router_logits": logits_fn}
    assert means is not None
    mean = means[L]  # [E, d]

    def dense_fn(y: Tensor, ctx: HookContext) -> Tensor:  # [R, p, E, d]
        routed = (y != 0).any(-1) & hit(y) & sel_of(y)[..., None]
        return torch.where(routed[..., None], mean.to(y)[None, None], y)

    return {pfx + "hook_expert_out": dense_fn}


def _affected(model: MoEModel, prefix: PrefixCache, L: int, mode: str, sel: Tensor) -> Tensor:
    """``[E, n]`` bool: prompts whose last-position logits ablating each expert of layer ``L`` can change.

    An ablation is a no-op for a prompt where, at every position it edits, drop / renorm / mean find the
    expert unrouted (zero weight) and reroute finds the family's routing unchanged. Only the last position of
    the last layer reaches the logits.
    """
    rel = sel.clone()
    if L == model.spec.n_layers - 1 and model.family.mlp_broadcasts:
        rel[:, :-1] = False
    pfx = f"blocks.{L}.mlp."
    w = prefix.reads[pfx + "hook_expert_weights"]  # [n, p, E]
    if mode != "reroute":
        return ((w != 0) & rel[..., None]).any(1).T.cpu()
    info, spec = model.layers[L], model.family
    router = getattr(getattr(_get(model.hf_model, spec.layers)[L], info.mlp), spec.router)
    z = prefix.reads[pfx + "hook_router_logits"].flatten(0, 1)
    out = []
    for e in range(info.n_experts):
        new_w, idx = route(
            spec,
            router,
            z.index_fill(1, torch.tensor([e], device=z.device), excluded_logit(z.dtype)),
            info.top_k,
            w.dtype,
        )
        dense = spec.router_adapter.routed_dense(new_w, idx, info.n_experts)
        out.append(((dense.view_as(w) != w).any(-1) & rel).any(1))
    return torch.stack(out).cpu()


def _check_mode(model: MoEModel, mode: str, mean_outputs: Tensor | None) -> Tensor | None:
    if mode not in ABLATION_MODES:
        raise ValueError(f"Unknown ablation mode {mode!r}; expected one of {ABLATION_MODES}.")
    if mode != "mean":
        return None
    if mean_outputs is None:
        raise ValueError(
            "mode='mean' needs mean_outputs (from expert_mean_outputs(model, reference_prompts))."
        )
    s = model.spec
    if tuple(mean_outputs.shape) != (s.n_layers, s.n_experts, s.d_model):
        raise ValueError(
            f"mean_outputs must have shape {(s.n_layers, s.n_experts, s.d_model)}, got {tuple(mean_outputs.shape)}."
        )
    return mean_outputs


def _experts(model: MoEModel, experts: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    if experts is None:
        return [(L, e) for L in _moe_names(model) for e in range(model.layers[L].n_experts)]
    out = []
    for item in experts:
        L, e = item
        model.check_expert(L, e)
        out.append((L, e))
    return out


def _delta_path(model: MoEModel, mode: str) -> bool:
    """Whether an ablation's change of layer L's output follows without running layer L: drop and mean
    remove / replace one weighted output; renorm and reroute rescale the others' (output-scaled experts only;
    reroute adds the experts that take the freed slot, computed on those tokens only)."""
    fam = model.family
    if "hook_topk_expert_out" not in fam.router_adapter.sites:  # no per-slot outputs (dense-score layout)
        return False
    return mode in ("drop", "mean") or fam.expert_kind not in INPUT_SCALED


def _residual_delta(
    model: MoEModel,
    prefix: PrefixCache,
    L: int,
    mode: str,
    rows: Tensor,
    col: Tensor,
    sel: Tensor,
    means: Tensor | None,
) -> Float[Tensor, "rows pos d_model"]:
    """Change of ``blocks.L.hook_resid_post`` when row ``r`` ablates expert ``col[r]`` at positions ``sel[r]``
    (residual units). ``y_e``, the expert's weighted output, is recomputed from the cached MLP input on the
    tokens routed to it only: drop ``−y_e``; mean ``mean_e − y_e`` where ``y_e ≠ 0``; renorm
    ``(R − y_e)(total/rest − 1) − y_e`` with ``R`` the routed experts' sum (the other weights scaled by
    total/rest, as :class:`AblateExpert`); reroute :func:`_reroute_delta`. The cached pass is the plain
    forward (for reroute it reads the sparse expert outputs, computed by the adapter)."""
    pfx, info, spec = f"blocks.{L}.mlp.", model.layers[L], model.family
    dev = prefix.ids.device
    rows, col = rows.to(dev), col.to(dev)
    x = prefix.mlp_in[L].index_select(0, rows)  # [R, p, d]
    w = prefix.reads[pfx + "hook_expert_weights"].index_select(0, rows)  # [R, p, E]
    if mode == "reroute":
        return _reroute_delta(model, prefix, L, rows, col, sel.to(dev), x, w)
    we = w.gather(-1, col[:, None, None].expand(*w.shape[:2], 1)).squeeze(-1)  # [R, p]
    m = sel.to(dev) & (we != 0)
    experts = getattr(getattr(_get(model.hf_model, spec.layers)[L], info.mlp), spec.experts)
    ye = torch.zeros_like(x)
    r_idx, t_idx = m.nonzero(as_tuple=True)
    with materialized(experts):
        for e in torch.unique(col[r_idx]).tolist():
            sub = col[r_idx] == e
            r, t = r_idx[sub], t_idx[sub]
            y = expert_forward(spec, experts, e, x[r, t]) * we[r, t, None]
            ye[r, t] = (y * info.residual_multiplier).to(ye.dtype)
    if mode == "drop":
        delta = -ye
    elif mode == "mean":
        assert means is not None
        m = m & (ye != 0).any(-1)
        delta = means[L].to(ye).index_select(0, col)[:, None] - ye
    else:
        routed = prefix.reads[f"blocks.{L}.hook_mlp_out"].index_select(0, rows)
        if pfx + "hook_shared_out" in prefix.reads:
            routed = routed - prefix.reads[pfx + "hook_shared_out"].index_select(0, rows)
        hit = torch.arange(w.shape[-1], device=dev) == col[:, None, None]
        total, rest = w.sum(-1, keepdim=True), w.masked_fill(hit, 0).sum(-1, keepdim=True)
        scale = torch.where(rest > 0, total / rest.clamp_min(1e-30), torch.ones_like(rest))
        delta = (routed - ye) * (scale - 1).to(ye) - ye
    return torch.where(m[..., None], delta, torch.zeros_like(delta))


def _reroute_delta(
    model: MoEModel, prefix: PrefixCache, L: int, rows: Tensor, col: Tensor, sel: Tensor, x: Tensor, w: Tensor
) -> Tensor:
    """Residual change of rerouting (expert ``col[r]`` excluded at ``sel[r]``): the family's routing re-run on
    the cached router logits (:func:`~moe_interp.experts.route`, as :class:`AblateExpert`'s edit does), each
    previously routed expert's cached output scaled by its new / old weight, and the experts a token gains
    computed on that token only."""
    pfx, info, spec = f"blocks.{L}.mlp.", model.layers[L], model.family
    z = prefix.reads[pfx + "hook_router_logits"].index_select(0, rows)  # [R, p, E]
    hit = (torch.arange(z.shape[-1], device=z.device) == col[:, None, None]) & sel[..., None]
    router_experts = getattr(_get(model.hf_model, spec.layers)[L], info.mlp)
    new_w, new_i = route(
        spec,
        getattr(router_experts, spec.router),
        z.masked_fill(hit, excluded_logit(z.dtype)).flatten(0, 1),
        info.top_k,
    )
    w_new = topk_to_dense(new_w, new_i, z.shape[-1]).view_as(w).to(w.dtype)
    topk = prefix.reads[pfx + "hook_topk_expert_out"].index_select(0, rows)  # [R, p, k, d]
    idx = prefix.reads[pfx + "hook_expert_indices"].index_select(0, rows).long()  # [R, p, k]
    old, new = w.gather(-1, idx), w_new.gather(-1, idx)
    ratio = torch.where(
        old != 0, new / torch.where(old != 0, old, torch.ones_like(old)), torch.zeros_like(old)
    )
    delta = (topk * (ratio - 1).to(topk)[..., None]).sum(2)
    had = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, idx, old != 0)
    gained = (w_new != 0) & ~had  # experts a token now uses (or that had weight 0): computed here
    experts = getattr(router_experts, spec.experts)
    r_idx, t_idx, j_idx = gained.nonzero(as_tuple=True)
    with materialized(experts):
        for j in torch.unique(j_idx).tolist():
            sub = j_idx == j
            r, t = r_idx[sub], t_idx[sub]
            y = expert_forward(spec, experts, j, x[r, t]) * w_new[r, t, j, None]
            delta.index_put_((r, t), (y * info.residual_multiplier).to(delta.dtype), accumulate=True)
    return delta


def expert_ablation_sweep(
    model: MoEModel,
    prompts: Sequence[str],
    mode: str = "drop",
    *,
    mean_outputs: Tensor | None = None,
    experts: Sequence[tuple[int, int]] | None = None,
    positions: Any = "all",
    batch_experts: int | None = None,
    refusal_ids: Sequence[int] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    reuse_prefix: bool = True,
) -> ExpertAblationResult:
    """Ablate each (layer, expert) in turn and measure the refusal score; same results as the per-expert loop.

    ``experts`` restricts the sweep (default: all MoE layers × experts; others stay NaN). Effects are
    ``score(ablated) − score(base)`` per prompt; CIs are percentile bootstraps over prompts. Ablations of one
    layer share a forward (``batch_experts`` per forward, each on its own copy of the prompts; default: about
    64 rows per forward on the CPU, where big batches only cost cache misses, 512 on an accelerator).

    With ``reuse_prefix`` (and no active interventions) the unedited pass is run once and cached
    (:mod:`moe_interp.prefix`) and every ablation restarts from it. Drop, mean and (output-scaled experts)
    renorm change layer L's output by a known amount — the expert's weighted output, recomputed on the tokens
    routed to it — so they start at layer L + 1; reroute (and dense-score families) start at layer L's MLP.
    The last layer's MLP runs on the last position only, and prompts an ablation cannot change (the expert is
    never routed where it is ablated; at the last layer: at the last position) are not run (effect 0).
    Results agree with :func:`expert_ablation_loop` to float32 rounding (≤ 1e-5 per prompt, tested).
    """
    prompts = _prompts(prompts)
    means = _check_mode(model, mode, mean_outputs)
    items = _experts(model, experts)
    if batch_experts is not None and batch_experts < 1:
        raise ValueError(f"batch_experts must be >= 1, got {batch_experts}.")
    ids_r = resolve_refusal_ids(model, refusal_ids)
    enc = model.tokenize(prompts)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n, s = len(prompts), model.spec
    if batch_experts is None:
        batch_experts = max(1, (ROWS_CPU if ids.device.type == "cpu" else ROWS_ACCELERATOR) // n)
    sel = _selection(mask, positions)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for L, e in items:
        by_layer[L].append(e)
    prefix = None
    delta = _delta_path(model, mode)
    if reuse_prefix and not model.has_interventions:  # active interventions may read hooks a restart skips
        sites = ["mlp.hook_expert_weights"] + (["mlp.hook_router_logits"] if mode == "reroute" else [])
        if delta and mode == "reroute":
            sites += ["mlp.hook_topk_expert_out", "mlp.hook_expert_indices"]
        if delta and mode == "renorm":
            sites += ["hook_mlp_out", *(["mlp.hook_shared_out"] if s.shared_expert_layers else [])]
        reads = [
            f"blocks.{L}.{h}" for L in by_layer for h in sites if model.layers[L].shared or "shared" not in h
        ]
        with torch.no_grad():
            prefix = cache_prefix(model, ids, mask, by_layer, reads, inputs=not delta, outputs=delta)
        base = refusal_logodds(prefix.logits[:, -1], ids_r).cpu()
    else:
        with torch.no_grad():
            base = refusal_logodds(model.forward(enc, last_only=True)[:, -1], ids_r).cpu()
    per = torch.full((s.n_layers, s.n_experts, n), float("nan"))
    chunks = []
    for L, es in by_layer.items():
        per[L, es] = 0.0  # prompts an ablation cannot change keep 0
        aff = None if prefix is None else _affected(model, prefix, L, mode, sel)
        jobs = [(e, torch.arange(n) if aff is None else aff[e].nonzero().flatten()) for e in es]
        jobs = [(e, r) for e, r in jobs if len(r)]
        chunks += [(L, jobs[i : i + batch_experts]) for i in range(0, len(jobs), batch_experts)]
    for L, jobs in tqdm(chunks, desc=f"ablate experts ({mode})", disable=not progress, leave=False):
        rows = torch.cat([r for _, r in jobs])
        col = torch.cat([torch.full((len(r),), e) for e, r in jobs])
        args = (model, L, mode, col, sel[rows.to(sel.device)], means, positions)
        if prefix is None:
            logits = _run_chunk(*args, enc, jobs)
        elif delta:
            with torch.no_grad():
                d = _residual_delta(model, prefix, L, mode, rows, col, sel[rows.to(sel.device)], means)
                logits = restart_after(model, prefix, L, rows, d)
            _check_finite(logits, model, prefix, L, jobs, mode, means, positions)
        else:
            logits = _restart_chunk(*args, prefix, jobs)
        sc = refusal_logodds(logits[:, -1], ids_r).cpu()
        for (e, r), part in zip(jobs, sc.split([len(r) for _, r in jobs]), strict=True):
            per[L, e, r] = part - base[r]
    lo, hi = bootstrap_ci(per, n_boot=n_boot, seed=seed)
    return ExpertAblationResult(per.mean(-1), lo, hi, per, base, mode)


def _restart_chunk(
    model: MoEModel,
    L: int,
    mode: str,
    col: Tensor,
    sel: Tensor,
    means: Tensor | None,
    positions: Any,
    prefix: PrefixCache,
    jobs: list[tuple[int, Tensor]],
) -> Tensor:
    """Last-position logits of one chunk of layer-``L`` ablations, restarted at layer L's MLP."""
    edits = _layer_edits(model, L, mode, col, sel, means)
    logits = restart(model, prefix, L, torch.cat([r for _, r in jobs]), edits)
    _check_finite(logits, model, prefix, L, jobs, mode, means, positions)
    return logits


def _check_finite(
    logits: Tensor,
    model: MoEModel,
    prefix: PrefixCache,
    L: int,
    jobs: list[tuple[int, Tensor]],
    mode: str,
    means: Tensor | None,
    positions: Any,
) -> None:
    if not bool(torch.isfinite(logits).all()):
        _diagnose(model, prefix, L, [e for e, _ in jobs], mode, means, positions)


def _run_chunk(
    model: MoEModel,
    L: int,
    mode: str,
    col: Tensor,
    sel: Tensor,
    means: Tensor | None,
    positions: Any,
    enc: Any,
    jobs: list[tuple[int, Tensor]],
) -> Tensor:
    """The same chunk as full forwards under the active interventions (no prefix reuse)."""
    rows = torch.cat([r for _, r in jobs]).to(enc["input_ids"].device)
    edits = _layer_edits(model, L, mode, col, sel, means)
    inputs = {"input_ids": enc["input_ids"][rows], "attention_mask": enc["attention_mask"][rows]}
    with torch.no_grad(), model.intervene(*[EditHook(k, fn) for k, fn in edits.items()]):
        return model.forward(inputs, last_only=True)


def _diagnose(
    model: MoEModel,
    prefix: PrefixCache,
    L: int,
    experts: list[int],
    mode: str,
    means: Tensor | None,
    positions: Any,
) -> None:
    """Non-finite logits in a restart: rerun those ablations one by one with :class:`AblateExpert`, whose
    forward names the hook and intervention that produced NaN/inf (:func:`guards.check_finite`)."""
    inputs = {"input_ids": prefix.ids, "attention_mask": prefix.mask}
    for e in experts:
        mean = None if means is None else means[L, e]
        # mode was checked against ABLATION_MODES (_check_mode)
        iv = AblateExpert(L, e, mode, mean_output=mean, positions=positions)  # type: ignore[arg-type]
        with torch.no_grad(), model.intervene(iv):
            model.forward(inputs, last_only=True)
    raise FloatingPointError(f"Non-finite logits when ablating experts {experts} of layer {L} (mode={mode}).")


def expert_ablation_loop(
    model: MoEModel,
    prompts: Sequence[str],
    mode: str = "drop",
    *,
    mean_outputs: Tensor | None = None,
    experts: Sequence[tuple[int, int]] | None = None,
    refusal_ids: Sequence[int] | None = None,
    progress: bool = False,
    per_prompt: bool = False,
) -> Float[Tensor, "n_layers n_experts"] | Float[Tensor, "n_layers n_experts n_prompts"]:
    """Reference implementation: one full forward per expert with :class:`AblateExpert`.

    Returns the mean effect per (layer, expert), or with ``per_prompt`` the effect per prompt.
    """
    prompts = _prompts(prompts)
    means = _check_mode(model, mode, mean_outputs)
    items = _experts(model, experts)
    ids_r = resolve_refusal_ids(model, refusal_ids)
    enc = model.tokenize(prompts)
    s = model.spec
    out = torch.full((s.n_layers, s.n_experts, len(prompts)), float("nan"))
    with torch.no_grad():
        base = refusal_logodds(model.forward(enc, last_only=True)[:, -1], ids_r).cpu()
        for L, e in tqdm(items, desc="ablate experts (loop)", disable=not progress, leave=False):
            # mode was checked against ABLATION_MODES (_check_mode)
            iv = AblateExpert(L, e, mode, mean_output=None if means is None else means[L, e])  # type: ignore[arg-type]
            with model.intervene(iv):
                sc = refusal_logodds(model.forward(enc, last_only=True)[:, -1], ids_r).cpu()
            out[L, e] = sc - base
    return out if per_prompt else out.mean(-1)


def expert_ablation_attribution(
    model: MoEModel,
    prompts: Sequence[str],
    mode: str = "drop",
    *,
    mean_outputs: Tensor | None = None,
    refusal_ids: Sequence[int] | None = None,
) -> Float[Tensor, "n_layers n_experts"]:
    """First-order estimate of :func:`expert_ablation_sweep`'s mean effect from one forward + backward.

    ``Σ Δ · ∂score/∂hook_expert_out`` with ``Δ = −output`` (drop) or ``mean − output`` where routed (mean);
    renorm / reroute are approximated as drop.
    """
    from moe_interp.patching.attribution import hook_gradients
    from moe_interp.patching.metrics import refusal_metric

    prompts = _prompts(prompts)
    means = _check_mode(model, mode, mean_outputs)
    moe = _moe_names(model)
    enc = model.tokenize(prompts)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    names = [f"blocks.{L}.mlp.hook_expert_out" for L in moe]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names=names, return_type=None)
    grads, _ = hook_gradients(model, inputs, names, refusal_metric(model, refusal_ids))
    valid = enc["attention_mask"].bool()[..., None, None]
    s = model.spec
    out = torch.full((s.n_layers, s.n_experts), float("nan"))
    for L, nm in zip(moe, names, strict=True):
        y = cache[nm].float()
        if means is not None:  # (mode == "mean")
            routed = (y != 0).any(-1, keepdim=True)
            delta = torch.where(routed, means[L].to(y)[None, None] - y, torch.zeros_like(y))
        else:
            delta = -y
        out[L, : y.shape[2]] = (delta * grads[nm].float() * valid).sum(dim=(0, 1, 3))
    return out
