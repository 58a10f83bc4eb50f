"""Steering methods for MoE refusal: dense, expert-aware, router and ridge, behind one registry.

Every ``fit_*`` function takes ``(model, harmful, harmless, **kw)`` and returns a steering object with
``to_interventions()`` / ``apply(model)``: a :class:`~moe_interp.steering.vectors.SteeringVectors` for
every additive method, and a :class:`RouterSteering` for SteerMoE (router edits are not additive vectors).

Methods (``METHODS`` registry; :func:`fit_method` dispatches by name):

* ``dense`` / ``dense_multi`` — residual-stream difference of means (Arditi et al.), one layer or several;
  a negative coefficient removes refusal.
* ``routing_experts`` — Expert-Aware Refusal Steering: experts whose top-1 selection % over the last 5
  prompt positions differs most between harmful and harmless, steered at their own outputs
  (``(blocks.L.mlp.hook_expert_out, e)``) with expert-specific directions.
* ``expert_conditioned`` — the same experts and directions, applied as ``h ← h + c·p_e(x)·r_e`` at the MoE
  output (``p_e`` = router softmax), through :class:`ExpertConditionedAdd`.
* ``expert_conditioned_all`` — ``h ← h + c·Σ_e p_e(x)·r_e`` over all experts of the chosen layers
  (``topk=True``: ``p_e`` zeroed outside the routed top-k).
* ``single_expert`` — one expert only (the top routing difference, or ``layer=``/``expert=``).
* ``steer_router`` — SteerMoE: deactivate (and optionally activate) experts chosen by routing risk
  difference, editing log-softmax router scores (:class:`~moe_interp.interventions.SteerRouter`).
* ``ridge`` — ridge / confidence-weighted ridge directions, layers chosen by the correlation between
  the projection and the refusal confidence ("Refusal Steering", García-Ferrero et al.).
* ``topic_remove`` / ``topic_induce`` — fine-grained control: a topic direction (topic − harmless) made
  orthogonal to the safety direction (``keep`` − harmless), removed or added.

Expert-specific directions (:func:`expert_specific_directions`) force the router to one expert with
``ForceExpert(L, e, mode="router_bias")`` (+100 / −100) and take ``mean(harmful) − mean(harmless)`` of
``blocks.L.hook_mlp_out`` at the last prompt positions.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.errors import InputError
from moe_interp.fileio import atomic_path, read_json_object
from moe_interp.interventions import ForceExpert, SteerRouter, check_coeff, check_positions, position_mask
from moe_interp.steering.files import ROUTER_FORMAT, gate_base, layer_experts, read_gate, write_gate
from moe_interp.steering.vectors import SteeringKey, SteeringMetadata, SteeringVectors, _spec_n_experts
from moe_interp.tracing import EditFn, HookContext

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = [
    "METHODS",
    "ExpertConditionedAdd",
    "RouterSteering",
    "Steerable",
    "TopicGatedSteering",
    "compare_methods",
    "data_hash",
    "expert_specific_directions",
    "fit_dense",
    "fit_dense_multi",
    "fit_expert_conditioned",
    "fit_expert_conditioned_all",
    "fit_method",
    "fit_ridge",
    "fit_routing_experts",
    "fit_single_expert",
    "fit_steer_router",
    "fit_topic_gated",
    "fit_topic_induce",
    "fit_topic_remove",
    "KL_STATISTICS",
    "KL_TRIM",
    "check_kl_statistic",
    "harmless_kl",
    "per_prompt_kl",
    "summarise_kl",
    "mean_activations",
    "refusal_flags",
    "select_experts",
]


class Steerable(Protocol):
    """Anything a method returns: it turns into interventions for ``model.intervene``."""

    def to_interventions(self) -> list[Any]: ...


# ------------------------------------------------------------------------------ the conditioned edit


@dataclass
class ExpertConditionedAdd:
    """Router-conditioned addition at one MoE layer: ``h ← h + coeff · Σ_e p_e(x) · r_e``.

    ``p = softmax(router_logits)`` is read at ``blocks.L.mlp.hook_router_logits`` (returned unchanged) and
    used at ``blocks.L.hook_mlp_out`` in the same forward pass. ``vectors`` maps expert id → ``r_e``
    (experts not listed contribute nothing; one entry is the single-expert form ``h + c·p_e·r_e``).
    ``topk=True`` zeroes ``p_e`` for experts outside the token's routed top-k (no renormalisation).
    """

    layer: int
    vectors: Mapping[int, Float[Tensor, " d_model"]]
    coeff: float = 1.0
    topk: bool = False
    positions: Any = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.vectors, Mapping) or not self.vectors:
            raise ValueError("ExpertConditionedAdd needs a non-empty {expert_id: vector} mapping.")
        check_coeff(self.coeff)
        self.positions = check_positions(self.positions)

    def stacked(self, model: MoEModel) -> Float[Tensor, "n_experts d_model"]:
        """The ``[n_experts, d_model]`` matrix ``R`` (zero rows for experts without a vector), validated."""
        d, L = model.spec.d_model, self.layer
        if not isinstance(L, int) or not 0 <= L < model.spec.n_layers:
            raise ValueError(
                f"Layer {L!r} is out of range: this model has layers 0..{model.spec.n_layers - 1}."
            )
        if not model.layers[L].is_moe:
            raise ValueError(
                f"Layer {L} is dense, but expert-conditioned steering needs an MoE layer; "
                f"MoE layers: {list(model.spec.moe_layers)}."
            )
        n_exp = model.layers[L].n_experts
        R = torch.zeros(n_exp, d)
        for e, v in self.vectors.items():
            model.check_expert(L, e)
            R[e] = _check_width(v, d, f"vector for expert {e} at layer {L}")
        return R

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        R = self.stacked(model)
        c, pos, top_k = float(self.coeff), self.positions, model.layers[self.layer].top_k
        state: dict[str, Tensor] = {}

        def read_router(z: Tensor, ctx: HookContext) -> Tensor:
            p = torch.softmax(z.float(), dim=-1)
            if self.topk:
                keep = torch.zeros_like(p, dtype=torch.bool)
                keep.scatter_(-1, z.topk(top_k, dim=-1).indices, True)
                p = p * keep
            state["p"] = p
            return z

        def add(h: Tensor, ctx: HookContext) -> Tensor:
            p = state.pop("p", None)
            if p is None:
                raise RuntimeError(f"ExpertConditionedAdd: no router probabilities for layer {self.layer}.")
            m = position_mask(ctx, pos, h.shape)
            if m is None:
                return h
            delta = c * (p @ R.to(p.device))  # [batch, pos, d_model]
            return torch.where(m[..., None], h + delta.to(h.dtype), h)

        L = self.layer
        return {f"blocks.{L}.mlp.hook_router_logits": read_router, f"blocks.{L}.hook_mlp_out": add}


def _check_width(v: Any, d_model: int, what: str) -> Tensor:
    t = torch.as_tensor(v)
    if t.ndim != 1 or t.shape[0] != d_model:
        raise ValueError(
            f"The {what} has shape {tuple(t.shape)}; expected a 1-D vector of d_model={d_model}."
        )
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise ValueError(f"The {what} must be a finite floating-point vector (got NaN/inf or {t.dtype}).")
    return t.float()


def conditioned_interventions(sv: SteeringVectors) -> list[ExpertConditionedAdd]:
    """One :class:`ExpertConditionedAdd` per layer for a router-conditioned :class:`SteeringVectors`.

    Keys must be ``(blocks.L.mlp.hook_expert_out, e)``; ``coeff_e · r_e`` is the per-expert vector.
    """
    from moe_interp.steering.vectors import parse_hook_name

    by_layer: dict[int, dict[int, Tensor]] = {}
    for key in sv.keys:
        parsed = parse_hook_name(key[0])
        if parsed.kind != "expert_out" or key[1] is None:
            raise NotImplementedError(
                f"conditioning={sv.conditioning!r}: the router-conditioned edit applies to "
                f"(blocks.L.mlp.hook_expert_out, e) keys only, got {key!r}"
            )
        by_layer.setdefault(parsed.layer, {})[key[1]] = sv.effective(key)
    topk = sv.conditioning == "router_prob_topk"
    return [ExpertConditionedAdd(L, vecs, 1.0, topk, sv.positions) for L, vecs in sorted(by_layer.items())]


# ------------------------------------------------------------------------------------ router steering


@dataclass(frozen=True)
class RouterSteering:
    """SteerMoE router edits per layer (not additive, so not a :class:`SteeringVectors`).

    ``deactivate[L]`` / ``activate[L]``: expert ids whose log-softmax router score is set to the row's
    min − ``epsilon`` / max + ``epsilon`` before top-k.
    """

    metadata: SteeringMetadata
    deactivate: dict[int, tuple[int, ...]] = field(default_factory=dict)
    activate: dict[int, tuple[int, ...]] = field(default_factory=dict)
    epsilon: float = 1e-2
    positions: str = "all"

    def __post_init__(self) -> None:
        if not self.deactivate and not self.activate:
            raise ValueError("RouterSteering needs at least one expert to activate or deactivate.")
        check_coeff(self.epsilon)
        check_positions(self.positions)

    @property
    def layers(self) -> list[int]:
        return sorted({*self.deactivate, *self.activate})

    @property
    def experts(self) -> list[int]:
        return sorted({e for d in (self.deactivate, self.activate) for es in d.values() for e in es})

    @property
    def n_expert_slots(self) -> int:
        """Number of (layer, expert) pairs touched."""
        return sum(len(v) for v in self.deactivate.values()) + sum(len(v) for v in self.activate.values())

    def to_interventions(self) -> list[SteerRouter]:
        return [
            SteerRouter(L, self.activate.get(L, ()), self.deactivate.get(L, ()), self.epsilon, self.positions)
            for L in self.layers
        ]

    def check_compatible(self, model: MoEModel) -> None:
        """Raise ``ValueError`` unless the metadata (family, n_layers, n_experts) and every expert fit."""
        spec, meta = model.spec, self.metadata
        problems = []
        if str(spec.family).lower() != meta.family.lower():
            problems.append(f"family: the file is for {meta.family!r}, the model is {spec.family!r}")
        if int(spec.n_layers) != meta.n_layers:
            problems.append(f"n_layers: the file has {meta.n_layers}, the model has {spec.n_layers}")
        if _spec_n_experts(spec) != meta.n_experts:
            problems.append(
                f"n_experts: the file has {meta.n_experts}, the model has {_spec_n_experts(spec)}"
            )
        if problems:
            raise InputError("router steering does not fit the model: " + "; ".join(problems))
        for L in self.layers:
            for e in (*self.activate.get(L, ()), *self.deactivate.get(L, ())):
                model.check_expert(L, e)

    @contextmanager
    def apply(self, model: MoEModel) -> Any:
        self.check_compatible(model)
        with model.intervene(*self.to_interventions()) as handle:
            yield handle

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.json`` (atomically)."""
        p = Path(path).with_suffix(".json")
        doc = {
            "format": ROUTER_FORMAT,
            "deactivate": {str(k): list(v) for k, v in self.deactivate.items()},
            "activate": {str(k): list(v) for k, v in self.activate.items()},
            "epsilon": self.epsilon,
            "positions": self.positions,
            "metadata": self.metadata.to_json_dict(),
        }
        text = json.dumps(doc, indent=2) + "\n"
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:
            tmp.write_text(text)
        return p

    @classmethod
    def load(cls, path: str | Path) -> RouterSteering:
        """Read what :meth:`save` wrote; ``ValueError`` naming the file and field for malformed content."""
        p = Path(path).with_suffix(".json")
        doc = read_json_object(p, f"a {ROUTER_FORMAT} file")
        if doc.get("format") != ROUTER_FORMAT:
            raise InputError(f"{p}: 'format' is {doc.get('format')!r}; expected {ROUTER_FORMAT!r}")
        missing = [k for k in ("deactivate", "activate", "epsilon", "positions", "metadata") if k not in doc]
        if missing:
            raise InputError(f"{p}: missing {missing}")
        try:
            return cls(
                SteeringMetadata.from_json_dict(doc["metadata"]),
                layer_experts(doc["deactivate"], "deactivate"),
                layer_experts(doc["activate"], "activate"),
                doc["epsilon"],
                doc["positions"],
            )
        except ValueError as err:
            raise InputError(f"{p}: {err}") from err


# ------------------------------------------------------------------------------------------ helpers


def _check_prompts(prompts: Any, what: str) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"{what} must be a non-empty list of strings.")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must contain only strings.")
    return list(prompts)


def data_hash(*prompt_sets: Sequence[str]) -> str:
    """Short sha256 of the training prompts (provenance for :class:`SteeringMetadata`)."""
    return hashlib.sha256(json.dumps([list(p) for p in prompt_sets]).encode()).hexdigest()[:16]


def _subsample(prompts: list[str], n_max: int | None) -> list[str]:
    return prompts if n_max is None or len(prompts) <= n_max else prompts[:n_max]


def _require_moe(model: MoEModel, method: str) -> None:
    if not model.spec.is_moe:
        raise ValueError(f"{method} is an expert method and needs an MoE model; {model.name} is dense.")


def _check_moe_layer(model: MoEModel, L: int, method: str) -> None:
    model.check_layer(L)
    if not model.layers[L].is_moe:
        raise ValueError(
            f"{method}: layer {L} is dense, but this expert method needs an MoE layer; "
            f"MoE layers: {list(model.spec.moe_layers)}."
        )


def _last_positions(n: int) -> list[int]:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"last_n must be a positive int, got {n!r}.")
    return list(range(-n, 0))


@torch.no_grad()
def mean_activations(
    model: MoEModel,
    prompts: Sequence[str],
    names: Sequence[str],
    positions: Sequence[int],
    batch_size: int = 32,
    per_prompt: bool = False,
) -> dict[str, Tensor]:
    """Mean over prompts (``[n_pos, ...]``, float64) of hook values at ``positions``, under active edits.

    ``per_prompt=True`` returns the stacked values ``[n_prompts, n_pos, ...]`` (float32) instead.
    """
    prompts = _check_prompts(prompts, "prompts")
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for s in range(0, len(prompts), batch_size):
        _, cache = model.run_with_cache(
            prompts[s : s + batch_size], names=list(names), positions=list(positions)
        )
        for n in names:
            out[n].append(cache[n].float().cpu())
    stacked = {n: torch.cat(v) for n, v in out.items()}
    if per_prompt:
        return stacked
    return {n: v.double().mean(0) for n, v in stacked.items()}


def _meta(model: MoEModel, method: str, prompts: Sequence[Sequence[str]], **extra: Any) -> SteeringMetadata:
    return SteeringMetadata.from_model(model, method=method, data_hash=data_hash(*prompts), extra=extra)


# ------------------------------------------------------------------------- expert-specific directions


@torch.no_grad()
def expert_specific_directions(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    experts: Sequence[tuple[int, int]],
    positions: Sequence[int] = (-5, -4, -3, -2, -1),
    bias: float = 100.0,
    batch_size: int = 32,
) -> dict[tuple[int, int], Float[Tensor, "n_pos d_model"]]:
    """Per (layer, expert): ``mean(harmful) − mean(harmless)`` of ``blocks.L.hook_mlp_out`` at ``positions``
    with the router forced to that expert (``ForceExpert(L, e, "router_bias", bias=±100)``)."""
    harmful = _check_prompts(harmful, "harmful")
    harmless = _check_prompts(harmless, "harmless")
    positions = list(positions)
    out = {}
    for L, e in experts:
        _check_moe_layer(model, L, "expert_specific_directions")
        model.check_expert(L, e)
        name = f"blocks.{L}.hook_mlp_out"
        with model.intervene(ForceExpert(L, e, mode="router_bias", bias=bias)):
            mh = mean_activations(model, harmful, [name], positions, batch_size)[name]
            ml = mean_activations(model, harmless, [name], positions, batch_size)[name]
        out[(L, e)] = (mh - ml).float()
    return out


def select_experts(
    scores: Float[Tensor, "n_layers n_experts"],
    model: MoEModel,
    threshold: float | None = None,
    top_n: int | None = 4,
) -> list[tuple[int, int]]:
    """(layer, expert) pairs of MoE layers with ``score > threshold``, or the ``top_n`` largest scores."""
    moe = list(model.spec.moe_layers)
    s = torch.full_like(scores.float(), -math.inf)
    s[moe] = scores.float()[moe]
    if threshold is not None:
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}.")
        pairs = [(int(L), int(e)) for L, e in (s > threshold).nonzero().tolist()]
        pairs.sort(key=lambda p: -float(s[p]))
    else:
        if not isinstance(top_n, int) or top_n < 1:
            raise ValueError(f"top_n must be a positive int, got {top_n!r}.")
        flat = s.flatten().topk(min(top_n, len(moe) * s.shape[1]))
        pairs = [divmod(int(i), s.shape[1]) for i in flat.indices]
        pairs = [(int(L), int(e)) for L, e in pairs if math.isfinite(float(s[L, e]))]
    if not pairs:
        raise ValueError(
            f"No expert passes the selection (threshold={threshold}); max score {float(s.max()):.3g}."
        )
    return pairs


def _routing_selection(
    model: MoEModel,
    harmful: list[str],
    harmless: list[str],
    threshold: float | None,
    top_n: int | None,
    last_n: int,
    experts: Sequence[tuple[int, int]] | None,
) -> tuple[list[tuple[int, int]], Tensor | None]:
    if experts is not None:
        pairs = [(int(L), int(e)) for L, e in experts]
        for L, e in pairs:
            _check_moe_layer(model, L, "expert selection")
            model.check_expert(L, e)
        return pairs, None
    from moe_interp.patching.routing import top1_percentage_difference

    diff = top1_percentage_difference(model, harmful, harmless, last_n=last_n)
    return select_experts(diff, model, threshold, top_n), diff


def _expert_sv(
    model: MoEModel,
    method: str,
    dirs: Mapping[tuple[int, int], Tensor],
    coeff: float,
    conditioning: str,
    prompts: Sequence[Sequence[str]],
    **extra: Any,
) -> SteeringVectors:
    vectors: dict[SteeringKey, Tensor] = {
        (f"blocks.{L}.mlp.hook_expert_out", e): d.mean(0) for (L, e), d in dirs.items()
    }
    coeffs = {k: check_coeff(coeff) for k in vectors}
    return SteeringVectors(
        vectors,
        _meta(model, method, prompts, **extra),
        coeffs,
        "all",
        conditioning,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------------------------------- methods


def _layer_separation(acts_h: Tensor, acts_l: Tensor) -> Tensor:
    """d' of the projection on the mean difference, per layer (acts ``[n, n_layers, d]``)."""
    diff = acts_h.mean(0) - acts_l.mean(0)
    r = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ph, pl = (acts_h * r).sum(-1), (acts_l * r).sum(-1)
    pooled = ((ph.var(0) + pl.var(0)) / 2).sqrt().clamp_min(1e-12)
    return (ph.mean(0) - pl.mean(0)) / pooled


def _resid_acts(model: MoEModel, prompts: list[str], position: int, batch_size: int) -> Tensor:
    names = [f"blocks.{L}.hook_resid_pre" for L in range(model.spec.n_layers)]
    acts = mean_activations(model, prompts, names, [position], batch_size, per_prompt=True)
    return torch.stack([acts[n][:, 0] for n in names], dim=1)  # [n, n_layers, d]


def fit_dense(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layer: int | None = None,
    position: int = -1,
    coeff: float = -1.0,
    n_max: int | None = 128,
    batch_size: int = 32,
) -> SteeringVectors:
    """Difference of means of ``hook_resid_pre`` at one layer (default: the best-separating layer),
    added at every position with ``coeff`` (−1 moves the harmful mean onto the harmless mean)."""
    return fit_dense_multi(
        model, harmful, harmless, layers=None if layer is None else [layer], n_layers=1,
        position=position, coeff=coeff, n_max=n_max, batch_size=batch_size, _method="dense",
    )  # fmt: skip


def fit_dense_multi(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    n_layers: int = 3,
    position: int = -1,
    coeff: float | None = None,
    n_max: int | None = 128,
    batch_size: int = 32,
    _method: str = "dense_multi",
) -> SteeringVectors:
    """Difference of means at several layers (default: the ``n_layers`` best-separating, d' of the
    projection); each layer's vector gets ``coeff`` (default ``−1/len(layers)``)."""
    harmful = _subsample(_check_prompts(harmful, "harmful"), n_max)
    harmless = _subsample(_check_prompts(harmless, "harmless"), n_max)
    ah = _resid_acts(model, harmful, position, batch_size)
    al = _resid_acts(model, harmless, position, batch_size)
    sep = _layer_separation(ah, al)
    if layers is None:
        order = [int(i) for i in sep.argsort(descending=True) if int(i) > 0] or [0]
        layers = sorted(order[:n_layers])
    layers = [model.check_layer(int(L)) for L in layers]
    c = check_coeff(-1.0 / len(layers) if coeff is None else coeff)
    diff = (ah.double().mean(0) - al.double().mean(0)).float()
    vectors: dict[SteeringKey, Tensor] = {(f"blocks.{L}.hook_resid_pre", None): diff[L] for L in layers}
    meta = _meta(model, _method, [harmful, harmless], separation=[float(x) for x in sep], position=position)
    return SteeringVectors(vectors, meta, dict.fromkeys(vectors, c))


def fit_routing_experts(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    threshold: float | None = None,
    top_n: int | None = 4,
    last_n: int = 5,
    experts: Sequence[tuple[int, int]] | None = None,
    coeff: float = -1.0,
    n_max: int | None = 128,
    batch_size: int = 32,
    _conditioning: str = "none",
    _method: str = "routing_experts",
) -> SteeringVectors:
    """Expert-Aware Refusal Steering: select experts by top-1 % difference (harmful − harmless, last
    ``last_n`` positions; ``threshold`` in percentage points, else ``top_n``), steer their outputs with
    their forced-router directions (mean over the last ``last_n`` positions)."""
    _require_moe(model, _method)
    harmful = _subsample(_check_prompts(harmful, "harmful"), n_max)
    harmless = _subsample(_check_prompts(harmless, "harmless"), n_max)
    pairs, diff = _routing_selection(model, harmful, harmless, threshold, top_n, last_n, experts)
    dirs = expert_specific_directions(
        model, harmful, harmless, pairs, _last_positions(last_n), batch_size=batch_size
    )
    extra: dict[str, Any] = {"experts": [list(p) for p in pairs], "last_n": last_n}
    if diff is not None:
        extra["top1_pct_diff"] = [[round(float(x), 3) for x in row] for row in diff]
    return _expert_sv(model, _method, dirs, coeff, _conditioning, [harmful, harmless], **extra)


def fit_expert_conditioned(
    model: MoEModel, harmful: Sequence[str], harmless: Sequence[str], *, topk: bool = False, **kw: Any
) -> SteeringVectors:
    """Routing-selected experts with forced-router directions, applied as ``h ← h + c·p_e(x)·r_e``."""
    cond = "router_prob_topk" if topk else "router_prob"
    return fit_routing_experts(
        model, harmful, harmless, _conditioning=cond, _method="expert_conditioned", **kw
    )


def fit_expert_conditioned_all(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    n_layers: int = 2,
    topk: bool = False,
    last_n: int = 5,
    coeff: float = -1.0,
    n_max: int | None = 128,
    batch_size: int = 32,
) -> SteeringVectors:
    """``h ← h + c·Σ_e p_e(x)·r_e`` with every expert's forced-router direction at ``layers``
    (default: the ``n_layers`` MoE layers with the largest absolute top-1 % difference)."""
    _require_moe(model, "expert_conditioned_all")
    harmful = _subsample(_check_prompts(harmful, "harmful"), n_max)
    harmless = _subsample(_check_prompts(harmless, "harmless"), n_max)
    if layers is None:
        from moe_interp.patching.routing import top1_percentage_difference

        diff = top1_percentage_difference(model, harmful, harmless, last_n=last_n).abs().amax(-1)
        moe = list(model.spec.moe_layers)
        layers = sorted(sorted(moe, key=lambda L: -float(diff[L]))[:n_layers])
    for L in layers:
        _check_moe_layer(model, L, "expert_conditioned_all")
    pairs = [(L, e) for L in layers for e in range(model.layers[L].n_experts)]
    dirs = expert_specific_directions(
        model, harmful, harmless, pairs, _last_positions(last_n), batch_size=batch_size
    )
    cond = "router_prob_topk" if topk else "router_prob"
    return _expert_sv(
        model, "expert_conditioned_all", dirs, coeff, cond, [harmful, harmless], layers=list(layers)
    )


def fit_single_expert(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layer: int | None = None,
    expert: int | None = None,
    last_n: int = 5,
    coeff: float = -1.0,
    n_max: int | None = 128,
    batch_size: int = 32,
) -> SteeringVectors:
    """Steer one expert's output (where routed) with its forced-router direction; default expert: the
    largest top-1 % difference."""
    if (layer is None) != (expert is None):
        raise ValueError(
            "Pass both layer= and expert=, or neither (then the top routing difference is used)."
        )
    experts = None if layer is None else [(layer, expert)]
    return fit_routing_experts(
        model, harmful, harmless, top_n=1, experts=experts, last_n=last_n, coeff=coeff,
        n_max=n_max, batch_size=batch_size, _method="single_expert",
    )  # fmt: skip


def fit_steer_router(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    n_deactivate: int = 4,
    n_activate: int = 0,
    positions: Sequence[int] | None = None,
    epsilon: float = 1e-2,
    induce: bool = False,
    n_max: int | None = 128,
) -> RouterSteering:
    """SteerMoE: deactivate the ``n_deactivate`` experts most associated with harmful prompts (largest
    routing risk difference) and activate the ``n_activate`` most associated with harmless ones
    (``induce=True`` swaps the roles, to induce refusal)."""
    _require_moe(model, "steer_router")
    from moe_interp.patching.routing import routing_risk_difference

    harmful = _subsample(_check_prompts(harmful, "harmful"), n_max)
    harmless = _subsample(_check_prompts(harmless, "harmless"), n_max)
    rd = routing_risk_difference(model, harmful, harmless, positions=positions)
    if induce:
        rd = -rd
    deact: dict[int, list[int]] = {}
    act: dict[int, list[int]] = {}
    if n_deactivate > 0:
        for L, e in select_experts(rd, model, top_n=n_deactivate):
            deact.setdefault(L, []).append(e)
    if n_activate > 0:
        for L, e in select_experts(-rd, model, top_n=n_activate):
            if e not in deact.get(L, []):
                act.setdefault(L, []).append(e)
    meta = _meta(
        model,
        "steer_router",
        [harmful, harmless],
        risk_difference=[[round(float(x), 4) for x in r] for r in rd],
    )
    return RouterSteering(
        meta, {L: tuple(v) for L, v in deact.items()}, {L: tuple(v) for L, v in act.items()}, epsilon
    )


def fit_ridge(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    confidences: Sequence[float] | None = None,
    weighted: bool = True,
    lam: float = 1.0,
    n_layers: int = 2,
    layers: Sequence[int] | None = None,
    position: int = -1,
    coeff: float | None = None,
    n_max: int | None = 128,
    batch_size: int = 32,
    seed: int = 0,
) -> SteeringVectors:
    """ "Refusal Steering": (confidence-weighted) ridge directions at ``hook_resid_pre``, layers chosen by
    the correlation between the projection and the refusal confidence (fit on one half of the prompts,
    correlation on the other half).

    ``confidences`` (one per harmful then harmless prompt, in [−1, 1]) come from an LLM judge
    (:meth:`moe_interp.refusal.LLMJudge.confidences`); by default the cheap stand-in
    ``tanh(refusal_score / 4)`` of the unsteered model's logit refusal score is used. With
    ``weighted=False`` the labels (+1 harmful, −1 harmless) replace the confidences. Each vector is
    ``r̂ · gap`` (gap: refusal minus compliant mean projection), so ``coeff = −1`` removes the gap.
    """
    from moe_interp.refusal.directions import ridge_direction, weighted_moments

    harmful = _subsample(_check_prompts(harmful, "harmful"), n_max)
    harmless = _subsample(_check_prompts(harmless, "harmless"), n_max)
    prompts = harmful + harmless
    if confidences is None:
        if weighted:
            scores = _logit_scores(model, prompts, batch_size)
            conf = torch.tanh(scores / 4.0)
            source = "tanh(logit refusal score / 4) of the unsteered model"
        else:
            conf = torch.tensor([1.0] * len(harmful) + [-1.0] * len(harmless), dtype=torch.float64)
            source = "labels"
    else:
        conf = torch.as_tensor(list(confidences), dtype=torch.float64)[: len(prompts)]
        source = "given (LLM judge)"
    if conf.shape[0] != len(prompts):
        raise ValueError(f"confidences must have one value per prompt ({len(prompts)}), got {conf.shape[0]}.")
    if confidences is None and not (bool((conf > 0).sum() >= 2) and bool((conf < 0).sum() >= 2)):
        conf = torch.tensor([1.0] * len(harmful) + [-1.0] * len(harmless), dtype=torch.float64)
        source = "labels (the logit refusal scores were one-sided)"
    acts = torch.cat(
        [
            _resid_acts(model, harmful, position, batch_size),
            _resid_acts(model, harmless, position, batch_size),
        ]
    )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(prompts), generator=g)
    fit_idx, val_idx = perm[: len(prompts) // 2], perm[len(prompts) // 2 :]

    def directions(idx: Tensor) -> Tensor:
        ref, comp = weighted_moments(acts[idx].double(), conf[idx], track_cov=True)
        return ridge_direction(ref, comp, lam).float()  # [n_layers, d]

    r_half = directions(fit_idx)
    r_hat = r_half / r_half.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj = (acts[val_idx] * r_hat).sum(-1)  # [n_val, n_layers]
    cv = conf[val_idx].float()
    pc, cc = proj - proj.mean(0), cv - cv.mean()
    corr = (pc * cc[:, None]).sum(0) / (pc.norm(dim=0) * cc.norm()).clamp_min(1e-12)
    if layers is None:
        layers = sorted(int(i) for i in corr.argsort(descending=True)[:n_layers])
    layers = [model.check_layer(int(L)) for L in layers]
    r_all = directions(torch.arange(len(prompts)))
    r_all = r_all / r_all.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w_r, w_c = conf.clamp(min=0).float(), (-conf).clamp(min=0).float()
    vectors: dict[SteeringKey, Tensor] = {}
    for L in layers:
        p = acts[:, L] @ r_all[L]
        gap = (p * w_r).sum() / w_r.sum().clamp_min(1e-12) - (p * w_c).sum() / w_c.sum().clamp_min(1e-12)
        vectors[(f"blocks.{L}.hook_resid_pre", None)] = r_all[L] * gap
    c = check_coeff(-1.0 / len(layers) if coeff is None else coeff)
    meta = _meta(
        model, "ridge" if weighted else "ridge_unweighted", [harmful, harmless],
        layer_correlation=[round(float(x), 4) for x in corr], confidence_source=source, lam=lam,
    )  # fmt: skip
    return SteeringVectors(vectors, meta, dict.fromkeys(vectors, c))


def _topic_direction(
    model: MoEModel,
    topic: list[str],
    harmless: list[str],
    keep: list[str],
    position: int,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """(topic − harmless) ⟂ (keep − harmless) per layer ``[n_layers, d]``, and the topic/harmless d'."""
    at = _resid_acts(model, topic, position, batch_size)
    al = _resid_acts(model, harmless, position, batch_size)
    ak = _resid_acts(model, keep, position, batch_size)
    t = at.double().mean(0) - al.double().mean(0)
    s = ak.double().mean(0) - al.double().mean(0)
    s_hat = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t_perp = t - (t * s_hat).sum(-1, keepdim=True) * s_hat
    r = (t_perp / t_perp.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()
    pt, pl = (at * r).sum(-1), (al * r).sum(-1)
    sep = (pt.mean(0) - pl.mean(0)) / ((pt.var(0) + pl.var(0)) / 2).sqrt().clamp_min(1e-12)
    return t_perp.float(), sep


def fit_topic_remove(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    keep: Sequence[str],
    layer: int | None = None,
    position: int = -1,
    coeff: float = -1.0,
    n_max: int | None = 128,
    batch_size: int = 32,
    _method: str = "topic_remove",
) -> SteeringVectors:
    """Fine-grained removal: ``harmful`` are the topic prompts (e.g. political), ``keep`` the refusals to
    preserve (e.g. harmful). Direction: (topic − harmless) made orthogonal to (keep − harmless), at the
    layer where it separates topic from harmless best; ``coeff = −1`` removes the topic shift."""
    topic = _subsample(_check_prompts(harmful, "topic prompts"), n_max)
    harmless = _subsample(_check_prompts(harmless, "harmless"), n_max)
    keep = _subsample(_check_prompts(keep, "keep"), n_max)
    t_perp, sep = _topic_direction(model, topic, harmless, keep, position, batch_size)
    if layer is None:
        layer = int(sep[1:].argmax()) + 1 if sep.shape[0] > 1 else 0
    L = model.check_layer(int(layer))
    key: SteeringKey = (f"blocks.{L}.hook_resid_pre", None)
    meta = _meta(model, _method, [topic, harmless, keep], separation=[round(float(x), 3) for x in sep])
    return SteeringVectors({key: t_perp[L]}, meta, {key: check_coeff(coeff)})


def fit_topic_induce(
    model: MoEModel, harmful: Sequence[str], harmless: Sequence[str], *, coeff: float = 1.0, **kw: Any
) -> SteeringVectors:
    """The reverse of :func:`fit_topic_remove`: add the topic direction (``coeff > 0``) to induce the
    topic refusal; pair with ``positions``/prompt selection to target it."""
    return fit_topic_remove(model, harmful, harmless, coeff=coeff, _method="topic_induce", **kw)


@dataclass
class TopicGatedSteering:
    """Apply ``steer`` only to prompts whose residual at the last prompt position of ``blocks.G.hook_resid_pre``
    projects on ``gate`` above ``threshold`` (decided on the prompt pass, kept for the generation steps).

    Fine-grained control: remove (or induce) a refusal on one topic and leave other prompts untouched.
    """

    steer: SteeringVectors
    gate_layer: int
    gate: Float[Tensor, " d_model"]
    threshold: float
    metadata: SteeringMetadata | None = None

    @property
    def layers(self) -> list[int]:
        return self.steer.layers

    def to_interventions(self) -> list[Any]:
        return [self]

    @contextmanager
    def apply(self, model: MoEModel) -> Any:
        with model.intervene(self) as handle:
            yield handle

    def scaled(self, factor: float) -> TopicGatedSteering:
        return replace(self, steer=self.steer.scaled(factor))

    def save(self, path: str | Path) -> tuple[Path, Path, Path]:
        """Write ``<path>.safetensors``/``.json`` and ``<path>.gate.safetensors``; nothing lands unless all do
        (see :mod:`moe_interp.steering.files`)."""
        with write_gate(path, self.gate, self.gate_layer, self.threshold) as gate:
            files = self.steer.save(gate_base(path))
        return (*files, gate)

    @classmethod
    def load(cls, path: str | Path) -> TopicGatedSteering:
        """Read what :meth:`save` wrote, or a set with a legacy ``<path>.gate.pt`` (``weights_only=True``)."""
        gate, layer, threshold = read_gate(path)
        sv = SteeringVectors.load(gate_base(path))
        return cls(sv, layer, gate, threshold, sv.metadata)

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        g_hook = f"blocks.{model.check_layer(self.gate_layer)}.hook_resid_pre"
        w = _check_width(self.gate, model.spec.d_model, "gate direction")
        check_coeff(self.threshold)
        inner: dict[str, list[EditFn]] = {}
        for iv in self.steer.to_interventions():
            for name, fn in iv.edits(model).items():
                inner.setdefault(name, []).append(fn)
        first = min(int(n.split(".")[1]) for n in inner)
        if first < self.gate_layer:
            raise ValueError(
                f"The gate (layer {self.gate_layer}) must come before the steered layers ({first})."
            )
        state: dict[str, Tensor] = {}

        def run_inner(name: str, x: Tensor, ctx: HookContext) -> Tensor:
            g = state.get("gate")
            if g is None or not bool(g.any()):
                return x
            y = x
            for fn in inner.get(name, []):
                y = fn(y, ctx)
            m = g.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
            return torch.where(m, y, x)

        def gate_fn(x: Tensor, ctx: HookContext) -> Tensor:
            if ctx.is_prompt:
                state["gate"] = (x[:, -1].float() @ w.to(x.device)) > self.threshold
            return run_inner(g_hook, x, ctx)

        out: dict[str, EditFn] = {n: (lambda x, ctx, n=n: run_inner(n, x, ctx)) for n in inner}
        out[g_hook] = gate_fn
        return out


def fit_topic_gated(
    model: MoEModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    keep: Sequence[str],
    gate_layer: int = 1,
    n_layers: int = 3,
    coeff: float | None = None,
    n_max: int | None = 128,
    batch_size: int = 32,
) -> TopicGatedSteering:
    """Topic-gated refusal removal: ``dense_multi`` (topic prompts vs harmless, at layers ≥ ``gate_layer``)
    applied only where a topic detector fires. The detector is the direction topic − mean(keep, harmless)
    at ``blocks.G.hook_resid_pre`` (last prompt position), thresholded at the best training accuracy.
    (``coeff > 0`` with the topic's refusal direction induces a targeted refusal instead.)"""
    topic = _subsample(_check_prompts(harmful, "topic prompts"), n_max)
    harmless = _subsample(_check_prompts(harmless, "harmless"), n_max)
    keep = _subsample(_check_prompts(keep, "keep"), n_max)
    model.check_layer(gate_layer)
    names = [f"blocks.{gate_layer}.hook_resid_pre"]
    acts = {
        k: mean_activations(model, v, names, [-1], batch_size, per_prompt=True)[names[0]][:, 0]
        for k, v in (("t", topic), ("l", harmless), ("k", keep))
    }
    w = acts["t"].mean(0) - (acts["l"].mean(0) + acts["k"].mean(0)) / 2
    pos, neg = acts["t"] @ w, torch.cat([acts["l"], acts["k"]]) @ w
    cands = torch.cat([pos, neg]).sort().values
    acc = torch.stack([((pos > c).float().mean() + (neg <= c).float().mean()) / 2 for c in cands])
    theta = float(cands[int(acc.argmax())])
    layers = [L for L in range(gate_layer, model.spec.n_layers) if L > 0]
    inner = fit_dense_multi(model, topic, harmless, n_layers=n_layers, coeff=coeff, n_max=n_max,
                            batch_size=batch_size, layers=None if len(layers) > n_layers else layers)  # fmt: skip
    if min(inner.layers) < gate_layer:
        inner = fit_dense_multi(model, topic, harmless, layers=layers[:n_layers], coeff=coeff, n_max=n_max)
    meta = _meta(model, "topic_gated", [topic, harmless, keep], gate_train_accuracy=float(acc.max()),
                 gate_layer=gate_layer)  # fmt: skip
    return TopicGatedSteering(replace(inner, metadata=meta), gate_layer, w.float(), theta, meta)


#: name → fit function ``(model, harmful, harmless, **kw) -> steering object``
METHODS: dict[str, Callable[..., Any]] = {
    "dense": fit_dense,
    "dense_multi": fit_dense_multi,
    "routing_experts": fit_routing_experts,
    "expert_conditioned": fit_expert_conditioned,
    "expert_conditioned_all": fit_expert_conditioned_all,
    "single_expert": fit_single_expert,
    "steer_router": fit_steer_router,
    "ridge": fit_ridge,
    "topic_remove": fit_topic_remove,
    "topic_induce": fit_topic_induce,
    "topic_gated": fit_topic_gated,
}


def fit_method(name: str, model: MoEModel, harmful: Sequence[str], harmless: Sequence[str], **kw: Any) -> Any:
    """Fit the registered method ``name`` (see :data:`METHODS`)."""
    fit = METHODS.get(name)
    if fit is None:
        raise ValueError(f"Unknown steering method {name!r}; expected one of {sorted(METHODS)}.")
    return fit(model, harmful, harmless, **kw)


# ---------------------------------------------------------------------------------------- evaluation


def _refusal_ids(model: MoEModel) -> list[int]:
    from moe_interp.refusal.judges import default_refusal_ids

    return default_refusal_ids(model)


@torch.no_grad()
def _logit_scores(model: MoEModel, prompts: Sequence[str], batch_size: int = 32) -> Tensor:
    from moe_interp.refusal.judges import refusal_score

    ids = _refusal_ids(model)
    out = [
        refusal_score(model.forward(list(prompts[s : s + batch_size]), last_only=True)[:, -1], ids)
        for s in range(0, len(prompts), batch_size)
    ]
    return torch.cat(out)


def _interventions(steer: Any) -> list[Any]:
    if steer is None:
        return []
    if hasattr(steer, "to_interventions"):
        return list(steer.to_interventions())
    return list(steer)


@torch.no_grad()
def refusal_flags(
    model: MoEModel,
    prompts: Sequence[str],
    steer: Any = None,
    *,
    judge: str = "generation",
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> Tensor:
    """Bool ``[n]``: refused or not under ``steer`` (a steering object or a list of interventions).

    ``judge="generation"``: greedy ``max_new_tokens`` tokens judged by :class:`SubstringJudge`;
    ``judge="logit"``: logit refusal score at the last prompt position > 0 (no generation).
    """
    prompts = _check_prompts(prompts, "prompts")
    ivs = _interventions(steer)
    with model.intervene(*ivs):
        if judge == "logit":
            return _logit_scores(model, prompts, batch_size) > 0
        if judge != "generation":
            raise ValueError(f"judge must be 'generation' or 'logit', got {judge!r}.")
        from moe_interp.refusal.evaluate import evaluate

        res = evaluate(
            model, prompts, [], max_new_tokens=max_new_tokens, baseline=False,
            refusal_token_ids=_refusal_ids(model), batch_size=batch_size,
        )  # fmt: skip
    return torch.tensor([bool(d["refused"]) for d in res.details])


#: Statistics of the per-prompt harmless KL that a KL budget can be put on (see :func:`summarise_kl`).
KL_STATISTICS: tuple[str, ...] = ("mean", "median", "trimmed_mean")
#: Share of prompts cut from each end of the sorted per-prompt KLs for ``"trimmed_mean"``.
KL_TRIM: float = 0.05


def check_kl_statistic(statistic: str, name: str = "KL statistic") -> None:
    """ValueError naming ``name`` unless ``statistic`` is one of :data:`KL_STATISTICS`."""
    if statistic not in KL_STATISTICS:
        raise ValueError(f"Unknown {name} {statistic!r}; expected one of {KL_STATISTICS}.")


def summarise_kl(per_prompt: Float[Tensor, " n"], statistic: str = "mean") -> float:
    """One number from per-prompt KLs: ``"mean"``, ``"median"`` (mean of the two middle values for even n)
    or ``"trimmed_mean"`` (:data:`KL_TRIM` cut from each end; nothing is cut below 20 values). NaN if any
    value is NaN.

    The per-prompt KL of a steering vector is heavy-tailed (a few boundary prompts that it flips carry most of
    the sum), so a budget on the mean is decided by those few prompts; median and trimmed mean are steadier.
    """
    check_kl_statistic(statistic)
    x = per_prompt.double().flatten()
    if x.numel() == 0:
        raise ValueError("summarise_kl needs at least one per-prompt KL value.")
    if bool(x.isnan().any()):  # NaN must stay NaN (over any budget), not be sorted away by the trimming
        return math.nan
    if statistic == "mean":
        return float(x.mean())
    if statistic == "median":
        return float(x.quantile(0.5))
    cut = int(KL_TRIM * x.numel())
    return float(x.sort().values[cut : x.numel() - cut].mean())


@torch.no_grad()
def per_prompt_kl(
    model: MoEModel,
    prompts: Sequence[str],
    steer: Any,
    batch_size: int = 32,
    base_logits: Tensor | None = None,
) -> Float[Tensor, " n"]:
    """``KL(base ‖ steered)`` of the next-token distribution at the last prompt position, per prompt."""
    prompts = _check_prompts(prompts, "prompts")
    if base_logits is None:
        base_logits = _last_logits(model, prompts, [], batch_size)
    steered = _last_logits(model, prompts, _interventions(steer), batch_size)
    lp, lq = torch.log_softmax(base_logits.double(), -1), torch.log_softmax(steered.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def harmless_kl(
    model: MoEModel,
    prompts: Sequence[str],
    steer: Any,
    batch_size: int = 32,
    base_logits: Tensor | None = None,
    statistic: str = "mean",
) -> float:
    """:func:`summarise_kl` (default: the mean) of :func:`per_prompt_kl`."""
    check_kl_statistic(statistic)
    return summarise_kl(per_prompt_kl(model, prompts, steer, batch_size, base_logits), statistic)


def _last_logits(model: MoEModel, prompts: list[str], ivs: list[Any], batch_size: int) -> Tensor:
    with model.intervene(*ivs):
        return torch.cat(
            [
                model.forward(prompts[s : s + batch_size], last_only=True)[:, -1].float()
                for s in range(0, len(prompts), batch_size)
            ]
        )


def _rate(flags: Tensor, n_boot: int, seed: int) -> dict[str, float]:
    from moe_interp.patching.metrics import bootstrap_ci

    x = flags.double()
    lo, hi = bootstrap_ci(x, n_boot=n_boot, seed=seed)
    return {"rate": float(x.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(x.numel())}


def touched(steer: Any, model: MoEModel | None = None) -> dict[str, Any]:
    """Layers and (layer, expert) pairs a steering object touches (``layers=None``: all of ``model``'s)."""
    if steer is None:
        return {"layers": [], "n_layers": 0, "n_experts": 0}
    if isinstance(steer, RouterSteering):
        return {"layers": steer.layers, "n_layers": len(steer.layers), "n_experts": steer.n_expert_slots}
    if isinstance(steer, SteeringVectors):
        n_exp = sum(1 for k in steer.keys if k[1] is not None or ".experts." in k[0])
        return {"layers": steer.layers, "n_layers": len(steer.layers), "n_experts": n_exp}
    every = list(range(model.spec.n_layers)) if model is not None else []
    layers = sorted(
        {L for iv in _interventions(steer) for L in (every if getattr(iv, "layers", 0) is None else [])}
        | {L for iv in _interventions(steer) for L in (getattr(iv, "layers", None) or [])}
        | {iv.layer for iv in _interventions(steer) if isinstance(getattr(iv, "layer", None), int)}
    )
    return {"layers": layers, "n_layers": len(layers), "n_experts": 0}


def compare_methods(
    model: MoEModel,
    methods: Mapping[str, Any],
    harmful_test: Sequence[str],
    political_test: Sequence[str],
    harmless_test: Sequence[str],
    *,
    judge: str = "generation",
    max_new_tokens: int = 8,
    n_boot: int = 1000,
    seed: int = 0,
    include_baseline: bool = True,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Per method (name → steering object or list of interventions): harmful / political / harmless refusal
    rates with 95% bootstrap CIs, harmless KL (last prompt position; mean, and median / trimmed mean as
    ``harmless_kl_median`` / ``harmless_kl_trimmed_mean``) and what it touches."""
    items = ([("baseline", None)] if include_baseline else []) + list(methods.items())
    harmless_test = _check_prompts(harmless_test, "harmless_test")
    base = _last_logits(model, harmless_test, [], batch_size)
    rows = []
    for name, steer in items:
        row: dict[str, Any] = {"method": name}
        for split, prompts in (
            ("harmful", harmful_test),
            ("political", political_test),
            ("harmless", harmless_test),
        ):
            flags = refusal_flags(
                model, prompts, steer, judge=judge, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            row[f"{split}_refusal"] = _rate(flags, n_boot, seed)
        kls = None if steer is None else per_prompt_kl(model, harmless_test, steer, batch_size, base)
        row["harmless_kl"] = 0.0 if kls is None else summarise_kl(kls, "mean")
        for stat in KL_STATISTICS[1:]:
            row[f"harmless_kl_{stat}"] = 0.0 if kls is None else summarise_kl(kls, stat)
        row.update(touched(steer, model))
        if isinstance(steer, SteeringVectors):
            row["coeffs"] = sorted({round(c, 4) for c in steer.coeffs.values()})
            row["conditioning"] = steer.conditioning
        rows.append(row)
    return rows


def scaled(steer: Any, factor: float) -> Any:
    """Scale a steering object's coefficients (router steering has none: returned unchanged)."""
    if isinstance(steer, SteeringVectors):
        return steer.scaled(factor)
    return steer


def with_coeff(sv: SteeringVectors, coeff: float) -> SteeringVectors:
    """Copy of ``sv`` with every coefficient set to ``coeff``."""
    return replace(sv, coeffs=dict.fromkeys(sv.vectors, check_coeff(coeff)))
