"""Steering objects that are not a plain set of vectors: SteerMoE router edits and a topic-gated steering.

Both follow the :class:`~moe_interp.steering.protocol.Steering` protocol; their file formats are in
:mod:`moe_interp.steering.files`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from moe_interp.errors import InputError
from moe_interp.fileio import atomic_path, read_json_object
from moe_interp.hooks import parse_hook
from moe_interp.interventions import Positions, SteerRouter, check_coeff, check_epsilon, check_positions
from moe_interp.steering.addition import check_steering_vector
from moe_interp.steering.files import (
    ROUTER_FORMAT,
    check_gate,
    gate_base,
    layer_experts,
    read_gate,
    router_json,
    write_gate,
)
from moe_interp.steering.metadata import SteeringMetadata, model_mismatches
from moe_interp.steering.vectors import SteeringVectors
from moe_interp.tracing import EditFn, HookContext

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = ["RouterSteering", "TopicGatedSteering"]


# ------------------------------------------------------------------------------------ router steering


@dataclass(frozen=True)
class RouterSteering:
    """SteerMoE router edits per layer (not additive, so not a :class:`SteeringVectors`).

    ``deactivate[L]`` / ``activate[L]``: expert ids whose log-softmax router score is set to the row's
    min − ``epsilon`` / max + ``epsilon`` before top-k.

    It has no coefficient: its strength is *which and how many* experts it (de)activates (autotuning sweeps
    ``n_deactivate``), and ``epsilon`` is only the margin that makes the edit decisive. :meth:`scaled`
    therefore raises ``ValueError`` instead of returning an edit that only looks stronger.
    """

    metadata: SteeringMetadata
    deactivate: dict[int, tuple[int, ...]] = field(default_factory=dict)
    activate: dict[int, tuple[int, ...]] = field(default_factory=dict)
    epsilon: float = 1e-2
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if not self.deactivate and not self.activate:
            raise ValueError("RouterSteering needs at least one expert to activate or deactivate.")
        check_epsilon(self.epsilon)
        # normalised as load() reads them back, so a save/load round trip compares equal
        object.__setattr__(self, "positions", check_positions(self.positions))
        for name in ("deactivate", "activate"):
            object.__setattr__(self, name, {int(k): tuple(v) for k, v in getattr(self, name).items()})

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

    def to_interventions(self, model: MoEModel | None = None) -> list[SteerRouter]:
        """One :class:`~moe_interp.interventions.SteerRouter` per layer (checked against ``model`` if given)."""
        if model is not None:
            self.check_compatible(model)
        return [
            SteerRouter(L, self.activate.get(L, ()), self.deactivate.get(L, ()), self.epsilon, self.positions)
            for L in self.layers
        ]

    def scaled(self, factor: float) -> RouterSteering:
        """Always ``ValueError``: router steering has no coefficient to scale (class docstring)."""
        raise ValueError(
            f"Router steering has no coefficient to scale by {factor!r}: its strength is the set of "
            "(de)activated experts (refit with another n_deactivate), and epsilon is only a margin."
        )

    def check_compatible(self, model: MoEModel) -> None:
        """Raise ``ValueError`` unless the metadata (family, n_layers, n_experts) and every expert fit."""
        problems = model_mismatches(self.metadata, model, checked=("family", "n_layers", "n_experts"))
        if problems:
            raise InputError("router steering does not fit the model: " + "; ".join(problems))
        for L in self.layers:
            for e in (*self.activate.get(L, ()), *self.deactivate.get(L, ())):
                model.check_expert(L, e)

    @contextmanager
    def apply(self, model: MoEModel) -> Iterator[Any]:
        """Context manager: ``model.intervene(*self.to_interventions(model))``."""
        with model.intervene(*self.to_interventions(model)) as handle:
            yield handle

    def save(self, path: str | Path) -> list[Path]:
        """Write ``<path>.json`` (atomically; a ``.json`` already on ``path`` is not doubled)."""
        p = router_json(path)
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
        return [p]

    @classmethod
    def load(cls, path: str | Path) -> RouterSteering:
        """Read what :meth:`save` wrote; ``ValueError`` naming the file and field for malformed content."""
        p = router_json(path)
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


# ------------------------------------------------------------------------------------- topic gate


@dataclass
class TopicGatedSteering:
    """Apply ``steer`` only to prompts whose residual at the last prompt position of ``blocks.G.hook_resid_pre``
    projects on ``gate`` above ``threshold`` (decided on the prompt pass, kept for the generation steps).

    Fine-grained control: remove (or induce) a refusal on one topic and leave other prompts untouched
    (``topic_gated``); conditional steering: a harm gate around another method (``gated_*``,
    :mod:`moe_interp.steering.gated`).
    """

    steer: SteeringVectors
    gate_layer: int
    gate: Float[Tensor, " d_model"]
    threshold: float
    metadata: SteeringMetadata | None = None

    def __post_init__(self) -> None:
        """Checked when built, so :meth:`save` never writes a set that :meth:`load` would refuse."""
        check_gate(self.gate, self.gate_layer, self.threshold)

    @property
    def layers(self) -> list[int]:
        return self.steer.layers

    def to_interventions(self, model: MoEModel | None = None) -> list[TopicGatedSteering]:
        """``[self]``: the gate is its own intervention (checked against ``model`` first if given)."""
        if model is not None:
            self.check_compatible(model)
        return [self]

    def check_compatible(self, model: MoEModel) -> None:
        """Raise ``ValueError`` unless the steering vectors, the gate layer and the gate width fit ``model``."""
        self.steer.check_compatible(model)
        model.check_layer(self.gate_layer)
        if self.gate.shape[0] != model.spec.d_model:
            raise InputError(f"gate width {self.gate.shape[0]} != the model's d_model {model.spec.d_model}")

    @contextmanager
    def apply(self, model: MoEModel) -> Iterator[Any]:
        with model.intervene(self) as handle:
            yield handle

    def scaled(self, factor: float) -> TopicGatedSteering:
        """Copy with the gated vectors' coefficients multiplied by ``factor`` (the gate is unchanged)."""
        return replace(self, steer=self.steer.scaled(factor))

    def save(self, path: str | Path) -> list[Path]:
        """Write ``<path>.safetensors``/``.json`` and ``<path>.gate.safetensors``; nothing lands unless all do
        (see :mod:`moe_interp.steering.files`)."""
        with write_gate(path, self.gate, self.gate_layer, self.threshold) as gate:
            files = self.steer.save(gate_base(path))
        return [*files, gate]

    @classmethod
    def load(cls, path: str | Path) -> TopicGatedSteering:
        """Read what :meth:`save` wrote, or a set with a legacy ``<path>.gate.pt`` (``weights_only=True``)."""
        gate, layer, threshold = read_gate(path)
        sv = SteeringVectors.load(gate_base(path))
        return cls(sv, layer, gate, threshold, sv.metadata)

    @torch.no_grad()
    def scores(self, model: MoEModel, prompts: Sequence[str], batch_size: int = 32) -> Float[Tensor, " n"]:
        """Each prompt's gate score: the last position of ``blocks.G.hook_resid_pre`` projected on the gate
        (the gate opens where it exceeds ``threshold``)."""
        name = f"blocks.{model.check_layer(self.gate_layer)}.hook_resid_pre"
        out = []
        for i in range(0, len(prompts), batch_size):
            _, cache = model.run_with_cache(list(prompts[i : i + batch_size]), names=[name], return_type=None)
            out.append(self._score(cache[name]))
        return torch.cat(out).cpu()

    def fires(self, model: MoEModel, prompts: Sequence[str], batch_size: int = 32) -> Bool[Tensor, " n"]:
        """Whether the gate opens on each prompt: what the prompt pass of :meth:`edits` decides (how often the
        gate fires on harmless or kept prompts is where its side effects come from)."""
        return self.scores(model, prompts, batch_size) > self.threshold

    def _score(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, " batch"]:
        return resid[:, -1].float() @ self.gate.float().to(resid.device)

    def _opens(self, resid: Float[Tensor, "batch pos d_model"]) -> Bool[Tensor, " batch"]:
        """The gate's decision from ``blocks.G.hook_resid_pre``: last position projected on the gate > threshold."""
        return self._score(resid) > self.threshold

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        g_hook = f"blocks.{model.check_layer(self.gate_layer)}.hook_resid_pre"
        check_steering_vector("the gate direction", self.gate, model.spec.d_model)
        check_coeff(self.threshold)
        inner: dict[str, list[EditFn]] = {}
        for iv in self.steer.to_interventions():
            for name, fn in iv.edits(model).items():
                inner.setdefault(name, []).append(fn)
        first = min(int(parse_hook(n).layer or 0) for n in inner)
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
                state["gate"] = self._opens(x)
            return run_inner(g_hook, x, ctx)

        def run_one(name: str) -> EditFn:
            return lambda x, ctx: run_inner(name, x, ctx)

        out: dict[str, EditFn] = {n: run_one(n) for n in inner}
        out[g_hook] = gate_fn
        return out
