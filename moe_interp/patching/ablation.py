"""Single-expert ablation: mean outputs, an exhaustive batched L × E sweep with bootstrap CIs, and its
gradient estimate.

The sweep repeats the prompts ``k`` times per forward; copy ``j`` ablates a different (layer, expert) via
one edit function per hook (``mlp.hook_expert_weights`` for drop / renorm, ``mlp.hook_router_logits`` for
reroute, ``mlp.hook_expert_out`` for mean) — the same semantics as :class:`moe_interp.AblateExpert`.
The effect is the per-prompt change of the logit refusal score (last position), ablated − unablated.
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

from moe_interp.interventions import ABLATION_MODES, AblateExpert, EditHook, position_mask
from moe_interp.patching.metrics import _refusal_ids, bootstrap_ci, refusal_logodds
from moe_interp.tracing import HookContext

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moe_interp.model import MoEModel

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
            _, cache = model.run_with_cache(enc, names=names)
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
        i = int(flat.abs().argmax())
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
            metric_label=f"Δ refusal score (ablate, mode={self.mode})",
            **kwargs,
        )


def _block_edits(
    model: MoEModel,
    chunk: list[tuple[int, int]],
    n: int,
    mode: str,
    means: Tensor | None,
    positions: Any,
) -> list[EditHook]:
    """One edit per hook; batch copy ``j`` ablates ``chunk[j]``."""
    by_layer: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for j, (L, e) in enumerate(chunk):
        by_layer[L].append((j, e))
    out = []
    for L, entries in by_layer.items():
        if mode in ("drop", "renorm"):

            def fn(w: Tensor, ctx: HookContext, entries: list = entries) -> Tensor:
                m = position_mask(ctx, positions, w.shape)
                if m is None:
                    return w
                new = w.clone()
                for j, e in entries:
                    rows = slice(j * n, (j + 1) * n)
                    blk = w[rows].clone()
                    blk[..., e] = 0
                    if mode == "renorm":
                        tot, rest = w[rows].sum(-1, keepdim=True), blk.sum(-1, keepdim=True)
                        blk = torch.where(rest > 0, blk * tot / rest.clamp_min(1e-30), blk)
                    new[rows] = torch.where(m[rows, :, None], blk, w[rows])
                return new

            out.append(EditHook(f"blocks.{L}.mlp.hook_expert_weights", fn))
        elif mode == "reroute":

            def fn(z: Tensor, ctx: HookContext, entries: list = entries) -> Tensor:
                m = position_mask(ctx, positions, z.shape)
                if m is None:
                    return z
                new = z.clone()
                for j, e in entries:
                    rows = slice(j * n, (j + 1) * n)
                    col = new[rows, :, e]
                    new[rows, :, e] = torch.where(m[rows], torch.finfo(z.dtype).min / 4, col)
                return new

            out.append(EditHook(f"blocks.{L}.mlp.hook_router_logits", fn))
        else:
            assert means is not None

            def fn(y: Tensor, ctx: HookContext, entries: list = entries, L: int = L) -> Tensor:
                m = position_mask(ctx, positions, y.shape)
                if m is None:
                    return y
                new = y.clone()
                for j, e in entries:
                    rows = slice(j * n, (j + 1) * n)
                    ye = y[rows, :, e]
                    routed = (ye != 0).any(-1) & m[rows]
                    mean = means[L, e].to(device=y.device, dtype=y.dtype).expand_as(ye)
                    new[rows, :, e] = torch.where(routed[..., None], mean, ye)
                return new

            out.append(EditHook(f"blocks.{L}.mlp.hook_expert_out", fn))
    return out


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


def expert_ablation_sweep(
    model: MoEModel,
    prompts: Sequence[str],
    mode: str = "drop",
    *,
    mean_outputs: Tensor | None = None,
    experts: Sequence[tuple[int, int]] | None = None,
    positions: Any = "all",
    batch_experts: int = 16,
    refusal_ids: Sequence[int] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> ExpertAblationResult:
    """Ablate each (layer, expert) in turn (``batch_experts`` per forward) and measure the refusal score.

    ``experts`` restricts the sweep (default: all MoE layers × experts; others stay NaN). Effects are
    ``score(ablated) − score(base)`` per prompt; CIs are percentile bootstraps over prompts.
    """
    prompts = _prompts(prompts)
    means = _check_mode(model, mode, mean_outputs)
    items = _experts(model, experts)
    if batch_experts < 1:
        raise ValueError(f"batch_experts must be >= 1, got {batch_experts}.")
    ids_r = _refusal_ids(model, refusal_ids)
    enc = model.tokenize(prompts)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n = len(prompts)
    s = model.spec
    per = torch.full((s.n_layers, s.n_experts, n), float("nan"))
    with torch.no_grad():
        base = refusal_logodds(model.forward(enc, last_only=True)[:, -1], ids_r).cpu()
        chunks = [items[i : i + batch_experts] for i in range(0, len(items), batch_experts)]
        for chunk in tqdm(chunks, desc=f"ablate experts ({mode})", disable=not progress, leave=False):
            k = len(chunk)
            ivs = _block_edits(model, chunk, n, mode, means, positions)
            with model.intervene(*ivs):
                logits = model.forward(
                    {"input_ids": ids.repeat(k, 1), "attention_mask": mask.repeat(k, 1)}, last_only=True
                )
            sc = refusal_logodds(logits[:, -1], ids_r).cpu().reshape(k, n)
            for j, (L, e) in enumerate(chunk):
                per[L, e] = sc[j] - base
    lo, hi = bootstrap_ci(per, n_boot=n_boot, seed=seed)
    return ExpertAblationResult(per.mean(-1), lo, hi, per, base, mode)


def expert_ablation_loop(
    model: MoEModel,
    prompts: Sequence[str],
    mode: str = "drop",
    *,
    mean_outputs: Tensor | None = None,
    experts: Sequence[tuple[int, int]] | None = None,
    refusal_ids: Sequence[int] | None = None,
    progress: bool = False,
) -> Float[Tensor, "n_layers n_experts"]:
    """Reference implementation: one forward per expert with :class:`AblateExpert` (mean effect only)."""
    prompts = _prompts(prompts)
    means = _check_mode(model, mode, mean_outputs)
    items = _experts(model, experts)
    ids_r = _refusal_ids(model, refusal_ids)
    enc = model.tokenize(prompts)
    s = model.spec
    out = torch.full((s.n_layers, s.n_experts), float("nan"))
    with torch.no_grad():
        base = refusal_logodds(model.forward(enc, last_only=True)[:, -1], ids_r).cpu()
        for L, e in tqdm(items, desc="ablate experts (loop)", disable=not progress, leave=False):
            iv = AblateExpert(L, e, mode, mean_output=None if means is None else means[L, e])  # type: ignore[arg-type]
            with model.intervene(iv):
                sc = refusal_logodds(model.forward(enc, last_only=True)[:, -1], ids_r).cpu()
            out[L, e] = (sc - base).mean()
    return out


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
        _, cache = model.run_with_cache(inputs, names=names)
    grads, _ = hook_gradients(model, inputs, names, refusal_metric(model, refusal_ids))
    valid = enc["attention_mask"].bool()[..., None, None]
    s = model.spec
    out = torch.full((s.n_layers, s.n_experts), float("nan"))
    for L, nm in zip(moe, names, strict=True):
        y = cache[nm].float()
        if mode == "mean":
            routed = (y != 0).any(-1, keepdim=True)
            delta = torch.where(routed, means[L].to(y)[None, None] - y, torch.zeros_like(y))
        else:
            delta = -y
        out[L, : y.shape[2]] = (delta * grads[nm].float() * valid).sum(dim=(0, 1, 3))
    return out
