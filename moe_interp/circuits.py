"""Locate the refusal circuit: rank heads / experts / attn / mlp by effect, pick a greedy minimal set, and
measure its faithfulness on held-out prompts against random sets of the same size.

**Ablation used throughout: position-wise mean ablation on the aligned suffix.** Each component's output at
the post-instruction template offsets (left padding aligns them, see :mod:`moe_interp.patching.activation`)
is replaced by its mean over the *finding* harmless prompts at the same offset: a head's ``attn.hook_z``
slice, an expert's slice of ``mlp.hook_expert_out`` (its weighted output, zero where unrouted, so the mean
includes the routing probability), a layer's ``hook_attn_out`` / ``hook_mlp_out``. Instruction tokens are
not ablated. ``fraction removed = (score(harmful) − score(harmful, ablated)) / (score(harmful) −
score(harmless))`` with mean logit refusal scores at the last position.

Effects (the ranking) are the fraction of the gap removed by ablating one component alone on the finding
harmful prompts: ``method="exhaustive"`` measures every one (batched), ``method="attribution"`` estimates
all of them from one forward + backward (``Σ (mean − value) · ∂score/∂value``).
"""

from __future__ import annotations

import hashlib
import html
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moe_interp.guards import check_count
from moe_interp.interventions import EditHook
from moe_interp.patching.metrics import bootstrap_ci, refusal_logodds, refusal_scores
from moe_interp.refusal.judges import resolve_refusal_ids
from moe_interp.tracing import HookContext

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moe_interp.model import MoEModel

CANDIDATES = ("heads", "experts", "attn", "mlp")

__all__ = ["CANDIDATES", "Circuit", "ablate_components", "locate_refusal_circuit"]  # + make_figures (lazy)


# ----------------------------------------------------------------------------------- components
def _component(kind: str, layer: int, idx: int | None = None) -> dict[str, Any]:
    if kind == "head":
        return {"name": f"blocks.{layer}.attn.hook_z", "kind": kind, "layer": layer, "head": idx}
    if kind == "expert":
        return {
            "name": f"blocks.{layer}.mlp.experts.{idx}.hook_out",
            "kind": kind,
            "layer": layer,
            "expert": idx,
        }
    if kind == "attn":
        return {"name": f"blocks.{layer}.hook_attn_out", "kind": kind, "layer": layer}
    return {"name": f"blocks.{layer}.hook_mlp_out", "kind": kind, "layer": layer}


def _key(c: dict[str, Any]) -> str:
    idx = c.get("head", c.get("expert"))
    return c["name"] if idx is None or c["kind"] == "expert" else f"{c['name']}[{idx}]"


def _site(c: dict[str, Any]) -> tuple[str, int | None]:
    """The hook edited to ablate ``c`` and the index along dim 2 (head / expert)."""
    if c["kind"] == "head":
        return c["name"], int(c["head"])
    if c["kind"] == "expert":
        return f"blocks.{c['layer']}.mlp.hook_expert_out", int(c["expert"])
    return c["name"], None


def _enumerate(model: MoEModel, candidates: Sequence[str]) -> list[dict[str, Any]]:
    bad = [c for c in candidates if c not in CANDIDATES]
    if bad or not candidates:
        raise ValueError(f"candidates must be a non-empty subset of {CANDIDATES}, got {list(candidates)}.")
    names = set(model.hook_names())
    out = []
    for L, info in enumerate(model.layers):
        if "attn" in candidates and f"blocks.{L}.hook_attn_out" in names:
            out.append(_component("attn", L))
        if "heads" in candidates and f"blocks.{L}.attn.hook_z" in names:
            out += [_component("head", L, h) for h in range(info.n_heads)]
        if "mlp" in candidates:
            out.append(_component("mlp", L))
        if "experts" in candidates and info.is_moe:
            out += [_component("expert", L, e) for e in range(info.n_experts)]
    return out


def _check_positions(model: MoEModel, enc: Any, positions: Sequence[int] | None) -> list[int]:
    if positions is None:
        from moe_interp.refusal.directions import post_instruction_positions

        positions = post_instruction_positions(model)
    pos = [int(p) for p in positions]
    min_len = int(enc["attention_mask"].sum(1).min())
    bad = [p for p in pos if not -min_len <= p < 0]
    if not pos or bad:
        raise ValueError(
            f"positions must be negative offsets in [-{min_len}, -1] (the shortest prompt has {min_len} "
            f"tokens), got {pos}."
        )
    return pos


def _component_means(
    model: MoEModel, prompts: list[str], comps: list[dict[str, Any]], pos: list[int], batch_size: int
) -> dict[str, Tensor]:
    """Mean over prompts of each component's hook slice at the aligned offsets: ``[n_pos, ...]``."""
    hooks = sorted({_site(c)[0] for c in comps})
    sums: dict[str, Tensor] = {}
    for s in range(0, len(prompts), batch_size):
        with torch.no_grad():
            _, cache = model.run_with_cache(
                prompts[s : s + batch_size], names=hooks, positions=pos, return_type=None
            )
        for h in hooks:
            v = cache[h].double().sum(0)
            sums[h] = v if h not in sums else sums[h] + v
    hook_mean = {h: (v / len(prompts)).float() for h, v in sums.items()}
    out = {}
    for c in comps:
        h, idx = _site(c)
        out[_key(c)] = hook_mean[h] if idx is None else hook_mean[h][:, idx]
    return out


def _set_edits(
    sets: Sequence[Sequence[dict[str, Any]]], means: dict[str, Tensor], n: int, pos: list[int]
) -> list[EditHook]:
    """Edits for a batch of ``len(sets)`` copies of ``n`` prompts; copy ``j`` mean-ablates ``sets[j]``."""
    per_hook: dict[str, list[tuple[int, int | None, Tensor]]] = defaultdict(list)
    for j, comps in enumerate(sets):
        for c in comps:
            h, idx = _site(c)
            per_hook[h].append((j, idx, means[_key(c)]))
    edits = []
    for h, entries in per_hook.items():

        def fn(x: Tensor, ctx: HookContext, entries: list = entries, h: str = h) -> Tensor:
            if not ctx.is_prompt:
                return x
            if not all(-x.shape[1] <= i < x.shape[1] for i in pos):
                raise ValueError(
                    f"{h}: the circuit's positions {pos} do not fit prompts of {x.shape[1]} tokens."
                )
            out = x.clone()
            for j, idx, mean in entries:
                rows = slice(j * n, (j + 1) * n) if n > 0 else slice(None)
                m = mean.to(device=x.device, dtype=x.dtype)
                if idx is None:
                    out[rows, pos] = m
                else:
                    out[rows, pos, idx] = m
            return out

        edits.append(EditHook(h, fn))
    return edits


def ablate_components(
    model: MoEModel,
    prompts: Sequence[str],
    sets: Sequence[Sequence[dict[str, Any]]],
    means: dict[str, Tensor],
    positions: list[int],
    refusal_ids: Sequence[int],
    batch_sets: int = 16,
    progress: bool = False,
) -> Tensor:
    """Per-prompt refusal scores ``[len(sets), n_prompts]`` with each set mean-ablated (batched)."""
    enc = model.tokenize(list(prompts))
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n = ids.shape[0]
    out = []
    chunks = [sets[i : i + batch_sets] for i in range(0, len(sets), batch_sets)]
    for chunk in tqdm(chunks, desc="ablate sets", disable=not progress, leave=False):
        k = len(chunk)
        with torch.no_grad(), model.intervene(*_set_edits(chunk, means, n, positions)):
            logits = model.forward(
                {"input_ids": ids.repeat(k, 1), "attention_mask": mask.repeat(k, 1)}, last_only=True
            )
        out.append(refusal_logodds(logits[:, -1], refusal_ids).cpu().reshape(k, n))
    return torch.cat(out) if out else torch.zeros(0, n)


def _scores(model: MoEModel, prompts: list[str], ids_r: list[int], batch_size: int) -> Tensor:
    return refusal_scores(model, prompts, ids_r, batch_size).cpu()


def _attribution_effects(
    model: MoEModel,
    prompts: list[str],
    comps: list[dict[str, Any]],
    means: dict[str, Tensor],
    pos: list[int],
    ids_r: list[int],
) -> list[float]:
    """Estimated change of the mean refusal score when each component alone is mean-ablated."""
    from moe_interp.patching.attribution import hook_gradients
    from moe_interp.patching.metrics import refusal_metric

    enc = model.tokenize(prompts)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    hooks = sorted({_site(c)[0] for c in comps})
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names=hooks, return_type=None)
    grads, _ = hook_gradients(model, inputs, hooks, refusal_metric(model, ids_r))
    est = []
    for c in comps:
        h, idx = _site(c)
        v, g = cache[h][:, pos].float(), grads[h][:, pos].float()
        if idx is not None:
            v, g = v[:, :, idx], g[:, :, idx]
        est.append(float(((means[_key(c)].float() - v) * g).sum()))
    return est


# ----------------------------------------------------------------------------------- circuit
@dataclass
class Circuit:
    """A refusal circuit: ranked components, faithfulness on held-out prompts and provenance."""

    components: list[dict[str, Any]]
    faithfulness: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    means: dict[str, Tensor] = field(default_factory=dict, repr=False)
    ranking: list[dict[str, Any]] = field(default_factory=list, repr=False)

    # -- io
    def to_dict(self) -> dict[str, Any]:
        return {
            "components": self.components,
            "faithfulness": self.faithfulness,
            "metadata": self.metadata,
            "means": {k: v.tolist() for k, v in self.means.items()},
            "ranking": self.ranking,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | Path, model: MoEModel | None = None) -> Circuit:
        """Read what :meth:`save` wrote; with ``model``, also check every component's hook exists on it.

        Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the field that is wrong.
        """
        from moe_interp.circuits_io import check_circuit_dict, check_circuit_fits
        from moe_interp.fileio import read_json_object

        p = Path(path)
        d = read_json_object(p, "a saved Circuit (Circuit.save)")
        check_circuit_dict(d, p)
        means = {k: torch.tensor(v, dtype=torch.float32) for k, v in d.get("means", {}).items()}
        circuit = cls(d["components"], d["faithfulness"], d["metadata"], means, d.get("ranking", []))
        if model is not None:
            check_circuit_fits(circuit, model, p)
        return circuit

    # -- use
    def to_interventions(self, model: MoEModel) -> list[EditHook]:
        """Interventions that mean-ablate the circuit (prompt forward pass, aligned offsets)."""
        spec = self.metadata.get("spec", {})
        for k in ("n_layers", "d_model", "n_heads", "n_experts"):
            if k in spec and spec[k] != getattr(model.spec, k):
                raise ValueError(
                    f"This circuit was found on a model with {k}={spec[k]}, this model has {getattr(model.spec, k)}."
                )
        missing = [_key(c) for c in self.components if _key(c) not in self.means]
        if missing:
            raise ValueError(f"The circuit has no mean values for {missing[:3]}; it cannot be ablated.")
        return _set_edits([self.components], self.means, 0, list(self.metadata["positions"]))

    def plot(self, **kwargs: Any) -> Figure:
        """:func:`~moe_interp.plotting.plot_circuit` of this circuit (layers and faithfulness read off it)."""
        from moe_interp.plotting import plot_circuit

        return plot_circuit(self, **kwargs)

    def __len__(self) -> int:
        return len(self.components)

    def __repr__(self) -> str:
        f = self.faithfulness
        kinds: dict[str, int] = defaultdict(int)
        for c in self.components:
            kinds[c["kind"]] += 1
        k = ", ".join(f"{v} {n}s" for n, v in kinds.items())
        top = ", ".join(_key(c) for c in self.components[:3])
        return (
            f"Circuit({len(self.components)} components: {k}; top: {top}{'…' if len(self) > 3 else ''}; "
            f"removes {f.get('circuit', float('nan')):.0%} of the refusal gap held-out vs "
            f"{f.get('random', float('nan')):.0%} for random sets)"
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td><code>{html.escape(_key(c))}</code></td><td>{c['kind']}</td><td>{c['effect']:+.3f}</td></tr>"
            for c in self.components
        )
        return (
            f"<p>{html.escape(repr(self))}</p><table><tr><th>component</th><th>kind</th><th>effect</th></tr>"
            f"{rows}</table>"
        )


def _refine(
    model: MoEModel,
    harmful: list[str],
    circuit: list[dict[str, Any]],
    comps: list[dict[str, Any]],
    means: dict[str, Tensor],
    pos: list[int],
    ids_r: list[int],
    base: Tensor,
    gap: float,
    need: float,
    batch_size: int,
    progress: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Replace each whole-layer component (attn / mlp) by the best single head / expert of its layer when the
    set with that replacement still removes ``>= need`` on the finding prompts; returns the set and the swaps."""
    out, swaps = list(circuit), []
    for i, c in enumerate(circuit):
        sub = {"attn": "head", "mlp": "expert"}.get(c["kind"])
        taken = {_key(x) for x in out}
        subs = [x for x in comps if x["kind"] == sub and x["layer"] == c["layer"] and _key(x) not in taken]
        if not subs:
            continue
        sc = ablate_components(
            model,
            harmful,
            [[*out[:i], x, *out[i + 1 :]] for x in subs],
            means,
            pos,
            ids_r,
            batch_size,
            progress,
        )
        fr = (base - sc.mean(1)) / gap
        j = int(fr.argmax())
        if float(fr[j]) >= need:
            swaps.append({"from": _key(c), "to": _key(subs[j]), "removed": float(fr[j])})
            out[i] = subs[j]
    return out, swaps


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"Cannot serialise {type(o).__name__}")


def _hash(*lists: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([list(x) for x in lists]).encode()).hexdigest()[:16]


def _check_list(x: Any, what: str) -> list[str]:
    if isinstance(x, str) or not isinstance(x, Sequence) or not x or not all(isinstance(p, str) for p in x):
        raise ValueError(f"{what} must be a non-empty list of strings.")
    return list(x)


def locate_refusal_circuit(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    heldout_harmful: Sequence[str] | None = None,
    heldout_harmless: Sequence[str] | None = None,
    candidates: Sequence[str] = CANDIDATES,
    method: str = "attribution",
    target: float = 0.8,
    max_components: int = 64,
    positions: Sequence[int] | None = None,
    n_random: int = 20,
    selection: str = "prefix",
    refine: bool = False,
    pool: int | None = None,
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> Circuit:
    """Rank components by effect, take the greedy minimal set that removes ``>= target`` of the refusal gap
    on the finding prompts, and measure faithfulness on the held-out prompts (see the module docstring).

    Without held-out prompts the faithfulness is measured in-sample (``faithfulness["in_sample"] = True``).
    ``refine=True`` then replaces each whole-layer component of the set by the single head / expert of that
    layer that keeps the set's removal (``>= target``), so a layer is reported only when no single one of its
    heads / experts carries its effect (see :func:`_refine`; planted-organism benchmark, docs/circuit.md).
    ``pool`` limits the set search (greedy candidates, prefix length) to the ``pool`` best-ranked components:
    the cost of a greedy step is one batched ablation per candidate, so a large model needs a small pool.
    """
    harmful = _check_list(harmful, "harmful")
    harmless = _check_list(harmless, "harmless")
    if selection not in ("prefix", "greedy"):
        raise ValueError(f"selection must be 'prefix' or 'greedy', got {selection!r}.")
    if method not in ("attribution", "exhaustive"):
        raise ValueError(f"method must be 'attribution' or 'exhaustive', got {method!r}.")
    if not 0 < target <= 1:
        raise ValueError(f"target must be a fraction in (0, 1], got {target!r}.")
    pool = check_count("pool", pool, allow_none=True)
    if (heldout_harmful is None) != (heldout_harmless is None):
        raise ValueError("Pass both heldout_harmful and heldout_harmless, or neither.")
    in_sample = heldout_harmful is None
    h_harm = harmful if in_sample else _check_list(heldout_harmful, "heldout_harmful")
    h_less = harmless if in_sample else _check_list(heldout_harmless, "heldout_harmless")
    ids_r = resolve_refusal_ids(model, refusal_ids)
    comps = _enumerate(model, candidates)
    pos = _check_positions(model, model.tokenize(harmful + harmless + h_harm + h_less), positions)
    means = _component_means(model, harmless, comps, pos, batch_size)

    base_harm = _scores(model, harmful, ids_r, batch_size)
    base_less = _scores(model, harmless, ids_r, batch_size)
    gap = float(base_harm.mean() - base_less.mean())
    if gap <= 0:
        raise ValueError(
            f"Harmful prompts do not score higher than harmless ones (gap {gap:.3g}); there is no refusal "
            "gap to explain."
        )
    # 1. effects of single components (fraction of the gap removed)
    if method == "exhaustive":
        sc = ablate_components(model, harmful, [[c] for c in comps], means, pos, ids_r, batch_size, progress)
        eff = ((base_harm.mean() - sc.mean(1)) / gap).tolist()
    else:
        est = _attribution_effects(model, harmful, comps, means, pos, ids_r)
        eff = [-e / gap for e in est]
    for c, e in zip(comps, eff, strict=True):
        c["effect"] = float(e)
    ranked = sorted(comps, key=lambda c: -c["effect"])
    # 2. minimal set. "prefix": the smallest prefix of the ranking that removes >= target on the finding
    # prompts. "greedy": forward selection, adding at each step the component whose ablation together with
    # the set so far removes the most (finds smaller sets when components are redundant).
    K = min(max_components, len(ranked), pool or len(ranked))
    if selection == "prefix":
        prefixes = [ranked[: k + 1] for k in range(K)]
        sc = ablate_components(model, harmful, prefixes, means, pos, ids_r, batch_size, progress)
        removed = ((base_harm.mean() - sc.mean(1)) / gap).tolist()
        order = ranked
    else:
        order, removed, left = [], [], list(ranked[:K])
        for _ in range(K):
            sets = [[*order, c] for c in left]
            sc = ablate_components(model, harmful, sets, means, pos, ids_r, batch_size, progress)
            fr = (base_harm.mean() - sc.mean(1)) / gap
            best = int(fr.argmax())
            order.append(left.pop(best))
            removed.append(float(fr[best]))
            if removed[-1] >= target:
                break
        K = len(order)
    hit = next((k for k, r in enumerate(removed) if r >= target), None)
    size = (hit + 1) if hit is not None else int(max(range(K), key=lambda k: removed[k])) + 1
    circuit = order[:size]
    swaps: list[dict[str, Any]] = []
    if refine:
        need = target if hit is not None else removed[size - 1] - 1e-3
        circuit, swaps = _refine(
            model,
            harmful,
            circuit,
            comps,
            means,
            pos,
            ids_r,
            base_harm.mean(),
            gap,
            need,
            batch_size,
            progress,
        )
    # 3. faithfulness on held-out prompts, against random sets of the same size
    hb = _scores(model, h_harm, ids_r, batch_size)
    hl = _scores(model, h_less, ids_r, batch_size)
    h_gap = float(hb.mean() - hl.mean())
    rng = random.Random(seed)
    rand_sets = [rng.sample(comps, size) for _ in range(n_random)]
    # the stricter control: as many components of each kind as the circuit has (layers for layers, ...)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in {_key(c): c for c in [*comps, *circuit]}.values():
        by_kind[c["kind"]].append(c)
    need = {k: sum(c["kind"] == k for c in circuit) for k in by_kind}
    same_sets = [[c for k, n in need.items() for c in rng.sample(by_kind[k], n)] for _ in range(n_random)]
    sets = [circuit, *rand_sets, *same_sets]
    sc = ablate_components(model, h_harm, sets, means, pos, ids_r, batch_size, progress)
    per_prompt = (hb[None] - sc) / h_gap  # [1 + 2 n_random, n]
    frac = per_prompt.mean(1)
    c_lo, c_hi = bootstrap_ci(per_prompt[0], seed=seed)
    rand, same = frac[1 : 1 + n_random], frac[1 + n_random :]
    r_lo, r_hi = bootstrap_ci(rand, seed=seed) if n_random > 1 else (rand.mean(), rand.mean())
    s_lo, s_hi = bootstrap_ci(same, seed=seed) if n_random > 1 else (same.mean(), same.mean())
    key = {_key(c) for c in circuit}
    faith = {
        "circuit": float(frac[0]),
        "circuit_ci": [float(c_lo), float(c_hi)],
        "random": float(rand.mean()) if n_random else float("nan"),
        "random_ci": [float(r_lo), float(r_hi)] if n_random else None,
        "random_range": [float(rand.quantile(0.025)), float(rand.quantile(0.975))] if n_random else None,
        "random_draws": [float(x) for x in rand],
        "random_same_kinds": float(same.mean()) if n_random else float("nan"),
        "random_same_kinds_ci": [float(s_lo), float(s_hi)] if n_random else None,
        "random_same_kinds_draws": [float(x) for x in same],
        # draws that are not the circuit itself (0 when each kind has no more candidates than the circuit uses)
        "random_same_kinds_distinct": sum({_key(c) for c in st} != key for st in same_sets),
        "random_same_kinds_sets": [[_key(c) for c in st] for st in same_sets],
        "finding_removed": float(removed[size - 1]),
        "finding_curve": [float(r) for r in removed],
        "reached_target": hit is not None,
        "target": target,
        "size": size,
        "n_candidates": len(comps),
        "gap_heldout": h_gap,
        "gap_finding": gap,
        "in_sample": in_sample,
        "refined": swaps,
    }
    s = model.spec
    metadata = {
        "model": model.name,
        "family": s.family,
        "spec": {
            "n_layers": s.n_layers,
            "d_model": s.d_model,
            "n_heads": s.n_heads,
            "n_experts": s.n_experts,
            "top_k": s.top_k,
            "moe_layers": list(s.moe_layers),
        },
        "method": method,
        "selection": selection,
        "refine": refine,
        "pool": pool,
        "candidates": list(candidates),
        "positions": pos,
        "ablation": "mean over finding harmless prompts at the aligned post-instruction offsets",
        "prompts_hash": _hash(harmful, harmless, h_harm, h_less),
        "n_prompts": {"harmful": len(harmful), "harmless": len(harmless), "heldout_harmful": len(h_harm)},
    }
    keep = {_key(c) for c in circuit}
    return Circuit(
        [dict(c) for c in circuit],
        faith,
        metadata,
        {k: v for k, v in means.items() if k in keep},
        [dict(c) for c in ranked],
    )


def __getattr__(name: str) -> Any:
    """``make_figures`` lives in :mod:`moe_interp.figures.standard` (imported on first use: matplotlib)."""
    if name == "make_figures":
        from moe_interp.figures.standard import make_figures

        return make_figures
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
