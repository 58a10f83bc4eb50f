"""Activation patching sweeps (resid, heads, attn/mlp out, experts, routing), batched.

**Clean** = harmful prompts, **corrupt** = harmless prompts, paired one-to-one. *Denoising* runs the corrupt
prompts and patches in clean activations; *noising* runs the clean prompts and patches in corrupt ones.

**Position alignment.** Clean and corrupt prompts are tokenized together and left padded to one width, so
negative offsets address the same chat-template token in every prompt whatever the instruction length.
Only those aligned offsets are patched (default: the post-instruction template tokens,
:func:`moe_interp.refusal.directions.post_instruction_positions`); instruction tokens are not aligned
across prompts of different lengths and are never patched position-wise. ``positions="all"`` means every
offset that is a real token in every prompt (all positions when the prompts have equal length).
"All positions" sweeps (heads, experts, routing with ``by_position=False``) patch the whole aligned suffix.

**Metric.** Any callable ``logits [batch, pos, vocab] → scalar`` (default: the mean logit refusal score at the
last position). Results are normalised to ``(patched − corrupt) / (clean − corrupt)`` (``normalize=True``),
in both directions: denoising 1 = fully restores refusal, noising 0 = fully removes it.

**Batching.** ``batch_patches`` patches share one forward pass: the target prompts are repeated ``k`` times
and copy ``j`` receives patch ``j`` (one edit function per hook handles every copy).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from moe_interp.interventions import EditHook
from moe_interp.patching.metrics import Metric, call_metric, reads_last_position_only, refusal_metric
from moe_interp.tracing import HookContext

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moe_interp.model import MoEModel

Direction = Literal["denoising", "noising"]
Kind = Literal["resid", "attn_out", "mlp_out", "heads", "experts", "routing"]

__all__ = [
    "PairedBatch",
    "PatchItem",
    "PatchingResult",
    "patch_attn_mlp",
    "patch_experts",
    "patch_heads",
    "patch_resid",
    "patch_routing",
    "patching_sweep",
    "prepare_pairs",
    "run_patches",
]


# ----------------------------------------------------------------------------------- inputs
@dataclass
class PairedBatch:
    """Clean and corrupt prompts tokenized to one width (left padded) and the aligned offsets to patch."""

    clean_ids: Tensor
    clean_mask: Tensor
    corrupt_ids: Tensor
    corrupt_mask: Tensor
    positions: list[int]
    position_labels: list[str]

    @property
    def n(self) -> int:
        return int(self.clean_ids.shape[0])

    def target(self, direction: Direction) -> dict[str, Tensor]:
        if direction == "denoising":
            return {"input_ids": self.corrupt_ids, "attention_mask": self.corrupt_mask}
        return {"input_ids": self.clean_ids, "attention_mask": self.clean_mask}

    def source(self, direction: Direction) -> dict[str, Tensor]:
        return self.target("noising" if direction == "denoising" else "denoising")


def _check_prompts(prompts: Any, what: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a non-empty list of strings.")
    return list(prompts)


def check_direction(direction: Any) -> Direction:
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction must be 'denoising' or 'noising', got {direction!r}.")
    return direction


def prepare_pairs(
    model: MoEModel,
    clean: Sequence[str],
    corrupt: Sequence[str],
    positions: Sequence[int] | str | None = None,
) -> PairedBatch:
    """Tokenize clean/corrupt pairs together and validate the aligned offsets (see module docstring)."""
    clean = _check_prompts(clean, "clean prompts")
    corrupt = _check_prompts(corrupt, "corrupt prompts")
    if len(clean) != len(corrupt):
        raise ValueError(
            f"Patching needs paired prompts: got {len(clean)} clean and {len(corrupt)} corrupt prompts "
            "(expected equal numbers)."
        )
    enc = model.tokenize(clean + corrupt)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n, P = len(clean), ids.shape[1]
    min_len = int(mask.sum(1).min())
    if positions is None:
        from moe_interp.refusal.directions import post_instruction_positions

        pos = post_instruction_positions(model)
    elif isinstance(positions, str):
        if positions != "all":
            raise ValueError(f"positions must be None, 'all' or a list of ints, got {positions!r}.")
        pos = list(range(-min_len, 0))
    else:
        if isinstance(positions, int):
            positions = [positions]
        if not all(isinstance(p, int) for p in positions) or not positions:
            raise ValueError(f"positions must be a non-empty list of ints, got {positions!r}.")
        pos = [p - P if p >= 0 else p for p in positions]
    bad = [p for p in pos if not -min_len <= p < 0]
    if bad:
        raise ValueError(
            f"Positions {bad} are out of range: the shortest prompt has {min_len} tokens, so aligned "
            f"offsets must lie in [-{min_len}, -1] (or 0..{P - 1} for equal-length prompts)."
        )
    if len(set(pos)) != len(pos):
        raise ValueError(f"positions contains duplicates: {pos}.")
    first = ids[n].tolist()
    labels = [model.tokenizer.decode([first[p]]) for p in pos]
    return PairedBatch(ids[:n], mask[:n], ids[n:], mask[n:], pos, labels)


# ----------------------------------------------------------------------------------- engine
@dataclass(frozen=True)
class PatchItem:
    """One patch: overwrite ``hook`` at ``positions`` (and ``index`` along dim 2: head / expert) from the source."""

    hook: str
    positions: tuple[int, ...]
    index: int | None = None


def _patch_edit(entries: list[tuple[int, PatchItem]], source: Tensor, n: int) -> Any:
    def fn(x: Tensor, ctx: HookContext) -> Tensor:
        if not ctx.is_prompt:
            return x
        out = x.clone()
        src = source.to(device=x.device, dtype=x.dtype)
        for j, it in entries:
            if not it.positions:
                continue
            rows = slice(j * n, (j + 1) * n)
            pos = list(it.positions)
            if it.index is None:
                out[rows, pos] = src[:, pos]
            else:
                out[rows, pos, it.index] = src[:, pos, it.index]
        return out

    return fn


def run_patches(
    model: MoEModel,
    target: dict[str, Tensor],
    source_cache: dict[str, Tensor],
    items: Sequence[PatchItem],
    metric: Metric,
    batch_patches: int = 16,
    progress: bool = True,
    desc: str = "patching",
) -> Float[Tensor, " n_items"]:
    """Metric value of the target run with each patch applied (``batch_patches`` patches per forward)."""
    if batch_patches < 1:
        raise ValueError(f"batch_patches must be >= 1, got {batch_patches}.")
    ids, mask = target["input_ids"], target["attention_mask"]
    n = ids.shape[0]
    last_only = reads_last_position_only(metric)
    out: list[Tensor] = []
    chunks = [items[s : s + batch_patches] for s in range(0, len(items), batch_patches)]
    for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        k = len(chunk)
        by_hook: dict[str, list[tuple[int, PatchItem]]] = defaultdict(list)
        for j, it in enumerate(chunk):
            by_hook[it.hook].append((j, it))
        ivs = [EditHook(h, _patch_edit(e, source_cache[h], n)) for h, e in by_hook.items()]
        batch = {"input_ids": ids.repeat(k, 1), "attention_mask": mask.repeat(k, 1)}
        with torch.no_grad(), model.intervene(*ivs):
            logits = model.forward(batch, last_only=last_only)
        for j in range(k):
            out.append(call_metric(metric, logits[j * n : (j + 1) * n]).detach().float().cpu())
    return torch.stack(out) if out else torch.zeros(0)


def _baselines(
    model: MoEModel, pairs: PairedBatch, hooks: Sequence[str], metric: Metric, direction: Direction
) -> tuple[dict[str, Tensor], float, float]:
    """Source-run cache of ``hooks`` and the clean / corrupt metric values."""
    clean_logits, clean_cache = model.run_with_cache(pairs.target("noising"), names=list(hooks))
    corrupt_logits, corrupt_cache = model.run_with_cache(pairs.target("denoising"), names=list(hooks))
    m_clean = float(call_metric(metric, clean_logits))
    m_corrupt = float(call_metric(metric, corrupt_logits))
    src = clean_cache if direction == "denoising" else corrupt_cache
    return {h: src[h] for h in hooks}, m_clean, m_corrupt


def normalise(values: Tensor, m_clean: float, m_corrupt: float) -> Tensor:
    """``(values − corrupt) / (clean − corrupt)``; error if clean and corrupt give the same metric."""
    gap = m_clean - m_corrupt
    if abs(gap) < 1e-9:
        raise ValueError(
            f"The metric is the same on clean ({m_clean:.4g}) and corrupt ({m_corrupt:.4g}) prompts; "
            "cannot normalise (pass normalize=False)."
        )
    return (values - m_corrupt) / gap


# ----------------------------------------------------------------------------------- results
@dataclass
class PatchingResult:
    """A patching sweep: ``values`` laid out by ``dims`` (e.g. ``("layer", "head")``) for hook ``hook``."""

    values: Tensor
    kind: str
    hook: str
    dims: tuple[str, ...]
    direction: str
    positions: list[int]
    position_labels: list[str] = field(default_factory=list)
    clean_metric: float = float("nan")
    corrupt_metric: float = float("nan")
    normalized: bool = True
    method: str = "exhaustive"

    def __repr__(self) -> str:
        return (
            f"PatchingResult({self.method} {self.kind} {self.direction}, {self.hook}, "
            f"values {tuple(self.values.shape)} over {self.dims}, clean={self.clean_metric:.3f}, "
            f"corrupt={self.corrupt_metric:.3f})"
        )

    def plot(self, **kwargs: Any) -> Figure:
        """The matching figure from :mod:`moe_interp.plotting`."""
        from moe_interp import plotting

        raw = f"metric value, patched run (clean {self.clean_metric:.3g}, corrupt {self.corrupt_metric:.3g})"
        default = "normalised metric (patched − corrupt)/(clean − corrupt)" if self.normalized else raw
        label = kwargs.pop("metric_label", None) or default
        v = self.values
        if self.dims == ("layer", "position"):
            return plotting.plot_layer_position_heatmap(
                v, self.position_labels, hook_template=self.hook, metric_label=label, **kwargs
            )
        if self.dims[:2] == ("layer", "head"):
            if v.ndim == 3:
                v = v.mean(-1)
            return plotting.plot_layer_head_heatmap(v, hook=self.hook, metric_label=label, **kwargs)
        if self.dims[:2] == ("layer", "expert"):
            return plotting.plot_expert_heatmap(v, metric_label=label, **kwargs)
        if v.ndim == 1:
            return plotting.plot_layer_position_heatmap(
                v[:, None], ["aligned suffix"], hook_template=self.hook, metric_label=label, **kwargs
            )
        raise ValueError(f"No figure for dims {self.dims}.")


# ----------------------------------------------------------------------------------- sweeps
_RESID_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def _layers(model: MoEModel, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(model.spec.n_layers))
    return [model.check_layer(L) for L in layers]


def _whole_layer_items(
    template: str,
    Ls: Sequence[int],
    pos: tuple[int, ...],
    by_position: bool,
    only: set[int] | None = None,
) -> tuple[list[PatchItem], list[tuple[int, ...]], tuple[int, ...], tuple[str, ...]]:
    """Patch items for a whole-activation hook at each layer of ``Ls`` (skipping layers not in ``only``).

    One item per (layer, position) when ``by_position``, else one per layer over all of ``pos``; returns the
    items, their result coordinates, and the result shape and dims.
    """
    items: list[PatchItem] = []
    coords: list[tuple[int, ...]] = []
    for li, L in enumerate(Ls):
        if only is not None and L not in only:
            continue
        if by_position:
            for pi, p in enumerate(pos):
                items.append(PatchItem(template.format(L=L), (p,)))
                coords.append((li, pi))
        else:
            items.append(PatchItem(template.format(L=L), pos))
            coords.append((li,))
    shape = (len(Ls), len(pos)) if by_position else (len(Ls),)
    dims = ("layer", "position") if by_position else ("layer",)
    return items, coords, shape, dims


def patching_sweep(
    model: MoEModel,
    clean: Sequence[str],
    corrupt: Sequence[str],
    kind: Kind = "resid",
    *,
    site: str = "hook_resid_pre",
    by_position: bool | None = None,
    positions: Sequence[int] | str | None = None,
    layers: Sequence[int] | None = None,
    direction: Direction = "denoising",
    metric: Metric | None = None,
    normalize: bool = True,
    batch_patches: int = 16,
    progress: bool = True,
) -> PatchingResult:
    """Patch every component of one kind in turn; see the module docstring for alignment and the metric.

    ``kind``: ``resid`` (``site`` at each layer; by position by default), ``attn_out`` / ``mlp_out``,
    ``heads`` (``attn.hook_z`` per head), ``experts`` (slice ``e`` of ``mlp.hook_expert_out``), ``routing``
    (``mlp.hook_expert_weights`` from the source run, expert outputs recomputed on the target run).
    Layout: ``[n_layers, n_pos]`` by position, else ``[n_layers]`` / ``[n_layers, n_heads|n_experts]``
    (``[n_layers, n_heads, n_pos]`` for heads by position). Non-MoE layers give 0 for experts / routing.
    """
    direction = check_direction(direction)
    pairs = prepare_pairs(model, clean, corrupt, positions)
    metric = metric if metric is not None else refusal_metric(model)
    Ls = _layers(model, layers)
    pos = tuple(pairs.positions)
    spec = model.spec
    moe = set(spec.moe_layers)
    items: list[PatchItem] = []
    coords: list[tuple[int, ...]] = []
    if kind in ("resid", "attn_out", "mlp_out"):
        site = {"attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}.get(kind, site)
        if site not in _RESID_SITES:
            raise ValueError(f"site must be one of {_RESID_SITES}, got {site!r}.")
        by_position = (kind == "resid") if by_position is None else by_position
        template = f"blocks.{{L}}.{site}"
        items, coords, shape, dims = _whole_layer_items(template, Ls, pos, by_position)
    elif kind == "heads":
        by_position = bool(by_position)
        template = "blocks.{L}.attn.hook_z"
        names = set(model.hook_names())
        H = spec.n_heads
        for li, L in enumerate(Ls):
            if template.format(L=L) not in names:
                continue
            for h in range(model.layers[L].n_heads):
                if by_position:
                    for pi, p in enumerate(pos):
                        items.append(PatchItem(template.format(L=L), (p,), h))
                        coords.append((li, h, pi))
                else:
                    items.append(PatchItem(template.format(L=L), pos, h))
                    coords.append((li, h))
        shape = (len(Ls), H, len(pos)) if by_position else (len(Ls), H)
        dims = ("layer", "head", "position") if by_position else ("layer", "head")
    elif kind in ("experts", "routing"):
        if not moe:
            raise ValueError(f"kind={kind!r} needs an MoE model; this model has no MoE layers.")
        if kind == "experts":
            template = "blocks.{L}.mlp.hook_expert_out"
            for li, L in enumerate(Ls):
                if L in moe:
                    for e in range(model.layers[L].n_experts):
                        items.append(PatchItem(template.format(L=L), pos, e))
                        coords.append((li, e))
            shape, dims = (len(Ls), spec.n_experts), ("layer", "expert")
        else:
            by_position = bool(by_position)
            template = "blocks.{L}.mlp.hook_expert_weights"
            items, coords, shape, dims = _whole_layer_items(template, Ls, pos, by_position, only=moe)
    else:
        raise ValueError(
            f"Unknown kind {kind!r}: expected resid, attn_out, mlp_out, heads, experts or routing."
        )
    hooks = sorted({it.hook for it in items})
    src, m_clean, m_corrupt = _baselines(model, pairs, hooks, metric, direction)
    vals = run_patches(
        model, pairs.target(direction), src, items, metric, batch_patches, progress, f"patch {kind}"
    )
    # a component that is not patched (a dense layer among MoE ones, a layer without heads) has no effect:
    # it gets the target run's own value, as in attribution_patching, not a raw 0
    fill = torch.tensor([m_corrupt if direction == "denoising" else m_clean], dtype=torch.float32)
    if normalize:
        vals, fill = normalise(vals, m_clean, m_corrupt), normalise(fill, m_clean, m_corrupt)
    out = torch.full(shape, float(fill[0]))
    for c, v in zip(coords, vals, strict=True):
        out[c] = v
    return PatchingResult(
        out,
        kind,
        template,
        dims,
        direction,
        list(pos),
        pairs.position_labels,
        m_clean,
        m_corrupt,
        normalize,
    )


def patch_resid(
    model: MoEModel,
    clean: Sequence[str],
    corrupt: Sequence[str],
    site: str = "hook_resid_pre",
    **kwargs: Any,
) -> PatchingResult:
    """Layer × position sweep of a residual-stream site (``[n_layers, n_pos]``)."""
    return patching_sweep(model, clean, corrupt, "resid", site=site, **kwargs)


def patch_attn_mlp(
    model: MoEModel,
    clean: Sequence[str],
    corrupt: Sequence[str],
    which: Literal["attn_out", "mlp_out"] = "attn_out",
    by_position: bool = True,
    **kwargs: Any,
) -> PatchingResult:
    """Layer × position (or per layer over the aligned suffix) sweep of ``hook_attn_out`` / ``hook_mlp_out``."""
    return patching_sweep(model, clean, corrupt, which, by_position=by_position, **kwargs)


def patch_heads(
    model: MoEModel, clean: Sequence[str], corrupt: Sequence[str], by_position: bool = False, **kwargs: Any
) -> PatchingResult:
    """Layer × head sweep over ``attn.hook_z`` (all aligned positions at once, or per position)."""
    return patching_sweep(model, clean, corrupt, "heads", by_position=by_position, **kwargs)


def patch_experts(
    model: MoEModel, clean: Sequence[str], corrupt: Sequence[str], **kwargs: Any
) -> PatchingResult:
    """Layer × expert sweep: patch one expert's weighted contribution (slice of ``mlp.hook_expert_out``)."""
    return patching_sweep(model, clean, corrupt, "experts", **kwargs)


def patch_routing(
    model: MoEModel, clean: Sequence[str], corrupt: Sequence[str], by_position: bool = False, **kwargs: Any
) -> PatchingResult:
    """Per-layer sweep patching the routing decision (``mlp.hook_expert_weights``), not expert outputs."""
    return patching_sweep(model, clean, corrupt, "routing", by_position=by_position, **kwargs)
