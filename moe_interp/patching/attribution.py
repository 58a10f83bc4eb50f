"""Attribution patching: first-order (and integrated-gradients) estimates of every patch at once.

Linear attribution needs one clean forward, one corrupt forward and one forward + backward on the target
run: for each hook ``h`` the edit ``x ↦ x + δ`` (``δ`` a zero leaf with ``requires_grad``) exposes
``∂metric/∂h`` without cutting the graph to earlier hooks, and the estimate of patching a component is
``Σ (source − target) · ∂metric/∂h`` over its slice (positions, head / expert). Results use the same
normalisation as :mod:`moe_interp.patching.activation` so they are directly comparable.

The integrated-gradients variant interpolates one hook at a time (copy ``(h, s)`` of the batch sets hook
``h`` to ``target + α_s (source − target)`` on the aligned positions, ``α_s = (s + ½)/k``), averages the
gradients over the ``k`` steps and multiplies by ``source − target``; all copies share batched passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moe_interp.interventions import EditHook
from moe_interp.patching.activation import (
    Direction,
    PairedBatch,
    PatchingResult,
    check_direction,
    normalise,
    prepare_pairs,
)
from moe_interp.patching.metrics import Metric, call_metric, reads_last_position_only, refusal_metric
from moe_interp.tracing import HookContext

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

ALL_KINDS = ("resid", "heads", "experts", "attn_out", "mlp_out", "routing")

__all__ = ["ALL_KINDS", "attribution_patching", "compare_to_exhaustive", "hook_gradients"]


def _kind_hooks(model: MoEModel, kind: str) -> list[tuple[int, str]]:
    names = set(model.hook_names())
    tmpl = {
        "resid": "blocks.{L}.hook_resid_pre",
        "heads": "blocks.{L}.attn.hook_z",
        "experts": "blocks.{L}.mlp.hook_expert_out",
        "attn_out": "blocks.{L}.hook_attn_out",
        "mlp_out": "blocks.{L}.hook_mlp_out",
        "routing": "blocks.{L}.mlp.hook_expert_weights",
    }.get(kind)
    if tmpl is None:
        raise ValueError(f"Unknown kind {kind!r}; expected some of {ALL_KINDS}.")
    return [(L, tmpl.format(L=L)) for L in range(model.spec.n_layers) if tmpl.format(L=L) in names]


def hook_gradients(
    model: MoEModel,
    inputs: dict[str, Tensor],
    hooks: Sequence[str],
    metric: Metric,
) -> tuple[dict[str, Tensor], Tensor]:
    """``∂metric/∂h`` for every hook in one forward + backward (the graph is kept through every hook)."""
    deltas: dict[str, Tensor] = {}

    def make(h: str) -> Any:
        def fn(x: Tensor, ctx: HookContext) -> Tensor:
            d = torch.zeros_like(x, requires_grad=True)
            deltas[h] = d
            return x + d

        return fn

    with model.intervene(*[EditHook(h, make(h)) for h in hooks]):
        logits = model.forward(inputs, grad=True, last_only=reads_last_position_only(metric))
    m = call_metric(metric, logits)
    if not m.requires_grad:
        raise ValueError("The metric is not differentiable (its value does not require grad).")
    # gradients of the deltas only: m.backward() would also fill every parameter's .grad (for fused experts,
    # a full [E, ...] gradient per expert slice used: minutes at real width, bench/README.md)
    found = [h for h in hooks if h in deltas]
    got = torch.autograd.grad(m, [deltas[h] for h in found], allow_unused=True) if found else ()
    by_hook = dict(zip(found, got, strict=True))
    grads = {}
    for h in hooks:
        g = by_hook.get(h)
        if g is not None:
            grads[h] = g.detach()
        elif h in deltas:  # reached, but the metric does not depend on it
            grads[h] = torch.zeros_like(deltas[h])
        else:
            raise RuntimeError(f"Hook {h!r} was not reached by the forward pass: no gradient for it.")
    return grads, m.detach()


def _ig_gradients(
    model: MoEModel,
    inputs: dict[str, Tensor],
    hooks: Sequence[str],
    target_cache: dict[str, Tensor],
    source_cache: dict[str, Tensor],
    positions: list[int],
    metric: Metric,
    steps: int,
    batch_blocks: int,
    progress: bool,
) -> dict[str, Tensor]:
    """Mean gradient over ``steps`` interpolation points, one hook interpolated per batch copy."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n = ids.shape[0]
    blocks = [(h, (s + 0.5) / steps) for h in hooks for s in range(steps)]
    grads = {h: torch.zeros_like(target_cache[h]) for h in hooks}
    chunks = [blocks[i : i + batch_blocks] for i in range(0, len(blocks), batch_blocks)]
    for chunk in tqdm(chunks, desc="integrated gradients", disable=not progress, leave=False):
        k = len(chunk)
        deltas: dict[str, Tensor] = {}

        def make(h: str, mine: list[tuple[int, float]], deltas: dict[str, Tensor] = deltas) -> Any:
            def fn(x: Tensor, ctx: HookContext) -> Tensor:
                out = x.clone()
                tgt, src = target_cache[h].to(x), source_cache[h].to(x)
                for j, a in mine:
                    rows = slice(j * n, (j + 1) * n)
                    out[rows, positions] = (tgt + a * (src - tgt))[:, positions]
                d = torch.zeros_like(x, requires_grad=True)
                deltas[h] = d
                return out + d

            return fn

        per_hook: dict[str, list[tuple[int, float]]] = {}
        for j, (h, a) in enumerate(chunk):
            per_hook.setdefault(h, []).append((j, a))
        ivs = [EditHook(h, make(h, mine)) for h, mine in per_hook.items()]
        batch = {"input_ids": ids.repeat(k, 1), "attention_mask": mask.repeat(k, 1)}
        with model.intervene(*ivs):
            logits = model.forward(batch, grad=True, last_only=reads_last_position_only(metric))
        metrics = [call_metric(metric, logits[j * n : (j + 1) * n]) for j in range(k)]
        total = sum(metrics[1:], metrics[0])
        found = [h for h in per_hook if h in deltas]
        # gradients of the deltas only (as in hook_gradients): no parameter's .grad is filled
        got = torch.autograd.grad(total, [deltas[h] for h in found], allow_unused=True) if found else ()
        by_hook = dict(zip(found, got, strict=True))
        for h, mine in per_hook.items():
            g = by_hook.get(h)
            if g is None:  # the metric does not depend on this hook: zero gradient
                continue
            for j, _ in mine:
                grads[h] += g[j * n : (j + 1) * n].detach() / steps
    return grads


def attribution_patching(
    model: MoEModel,
    clean: Sequence[str],
    corrupt: Sequence[str],
    kinds: Sequence[str] = ("resid", "heads", "experts"),
    *,
    positions: Sequence[int] | str | None = None,
    direction: Direction = "denoising",
    metric: Metric | None = None,
    normalize: bool = True,
    method: str = "linear",
    ig_steps: int = 8,
    batch_blocks: int = 16,
    progress: bool = True,
) -> dict[str, PatchingResult]:
    """Estimate every patch of ``kinds`` at once; returns ``{kind: PatchingResult}`` laid out as the
    exhaustive sweeps (resid: ``[n_layers, n_pos]``, heads ``[n_layers, n_heads]``, experts
    ``[n_layers, n_experts]``, attn_out / mlp_out / routing ``[n_layers]`` over the aligned suffix).

    ``method="linear"`` (gradient at the target run) or ``"ig"`` (integrated gradients, ``ig_steps``).
    """
    direction = check_direction(direction)
    if method not in ("linear", "ig"):
        raise ValueError(f"method must be 'linear' or 'ig', got {method!r}.")
    if method == "ig" and (not isinstance(ig_steps, int) or ig_steps < 1):
        raise ValueError(f"ig_steps must be a positive int, got {ig_steps!r}.")
    pairs: PairedBatch = prepare_pairs(model, clean, corrupt, positions)
    metric = metric if metric is not None else refusal_metric(model)
    kind_hooks = {k: _kind_hooks(model, k) for k in kinds}
    hooks = sorted({h for v in kind_hooks.values() for _, h in v})
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(pairs.target("noising"), names=hooks)
        corrupt_logits, corrupt_cache = model.run_with_cache(pairs.target("denoising"), names=hooks)
    m_clean = float(call_metric(metric, clean_logits))
    m_corrupt = float(call_metric(metric, corrupt_logits))
    tgt_cache, src_cache = (
        (corrupt_cache, clean_cache) if direction == "denoising" else (clean_cache, corrupt_cache)
    )
    m_target = m_corrupt if direction == "denoising" else m_clean
    pos = pairs.positions
    target = pairs.target(direction)
    if method == "linear":
        grads, _ = hook_gradients(model, target, hooks, metric)
    else:
        grads = _ig_gradients(
            model,
            target,
            hooks,
            {h: tgt_cache[h] for h in hooks},
            {h: src_cache[h] for h in hooks},
            pos,
            metric,
            ig_steps,
            batch_blocks,
            progress,
        )
    out: dict[str, PatchingResult] = {}
    n_layers = model.spec.n_layers
    for kind, lh in kind_hooks.items():
        contrib = {}
        for L, h in lh:
            delta = (src_cache[h] - tgt_cache[h]).float()
            c = (delta * grads[h].float())[:, pos]  # [n, n_pos, ...]
            contrib[L] = c
        if kind == "resid":
            vals = torch.zeros(n_layers, len(pos))
            for L, c in contrib.items():
                vals[L] = c.sum(dim=(0, *range(2, c.ndim)))
            dims: tuple[str, ...] = ("layer", "position")
        elif kind in ("heads", "experts"):
            width = model.spec.n_heads if kind == "heads" else model.spec.n_experts
            vals = torch.zeros(n_layers, width)
            for L, c in contrib.items():
                vals[L, : c.shape[2]] = c.sum(dim=(0, 1, 3))
            dims = ("layer", "head" if kind == "heads" else "expert")
        else:
            vals = torch.zeros(n_layers)
            for L, c in contrib.items():
                vals[L] = c.sum()
            dims = ("layer",)
        vals = vals + m_target
        if normalize:
            vals = normalise(vals, m_clean, m_corrupt)
        hook_t = lh[0][1].replace(f"blocks.{lh[0][0]}.", "blocks.{L}.", 1) if lh else kind
        out[kind] = PatchingResult(
            vals,
            kind,
            hook_t,
            dims,
            direction,
            list(pos),
            pairs.position_labels,
            m_clean,
            m_corrupt,
            normalize,
            method=f"attribution-{method}",
        )
    return out


def compare_to_exhaustive(
    attribution: PatchingResult | Tensor,
    exhaustive: PatchingResult | Tensor,
    mask: Tensor | None = None,
) -> dict[str, float]:
    """Spearman and Pearson correlation between attribution estimates and exhaustive patching values."""
    from moe_interp.refusal.stats import pearson, spearman

    a = attribution.values if isinstance(attribution, PatchingResult) else torch.as_tensor(attribution)
    e = exhaustive.values if isinstance(exhaustive, PatchingResult) else torch.as_tensor(exhaustive)
    if a.shape != e.shape:
        raise ValueError(f"Shapes differ: attribution {tuple(a.shape)} vs exhaustive {tuple(e.shape)}.")
    if mask is not None:
        a, e = a[mask], e[mask]
    x, y = a.flatten().double().numpy(), e.flatten().double().numpy()
    return {
        "spearman": spearman(x, y),
        "pearson": pearson(x, y),
        "n": int(x.size),
    }
