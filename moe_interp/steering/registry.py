"""The registry of steering methods: each entry names its fit function, the data it is fit on, and how its
strength is tuned, so callers (the pipeline, autotuning, the demo) need no per-method branches.

* ``data="harmful"`` — fit on harmful vs harmless prompts;
* ``data="topic"`` — fit on one topic's prompts (e.g. political) vs harmless, with ``keep=`` prompts whose
  refusals must survive (tuning then also keeps their refusal rate above a floor).
* ``gated_<method>`` — ``<method>`` applied only to prompts a harm gate opens on
  (:mod:`moe_interp.steering.gated`).
* ``tuning="coefficient"`` — strength = a scale on the coefficients (:func:`~moe_interp.steering.autotune.coefficient_search`);
  any other value names the fit keyword that autotuning sweeps instead (``steer_router``: ``n_deactivate``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from moe_interp.steering.fit import (
    fit_dense,
    fit_dense_multi,
    fit_ridge,
    fit_topic_gated,
    fit_topic_induce,
    fit_topic_remove,
)
from moe_interp.steering.fit_experts import (
    fit_expert_conditioned,
    fit_expert_conditioned_all,
    fit_routing_experts,
    fit_single_expert,
    fit_steer_router,
)
from moe_interp.steering.gated import gated
from moe_interp.steering.protocol import Steering

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = ["METHODS", "MethodSpec", "fit_method", "method_spec"]

Data = Literal["harmful", "topic"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered steering method (module docstring). Calling it fits the method."""

    name: str
    fit: Callable[..., Steering]
    data: Data = "harmful"
    tuning: str = "coefficient"
    #: the fit function that ``fit`` passes its other keywords (``**kw``) on to, if any
    forwards_to: Callable[..., Steering] | None = None

    @property
    def needs_keep(self) -> bool:
        """Whether the fit takes ``keep=`` prompts (topic methods)."""
        return self.data == "topic"

    @property
    def fits_gate(self) -> bool:
        """Whether the fit takes ``gate_harmful=`` / ``gate_harmless=`` prompts for a harm gate (``gated_*``)."""
        return "gate_harmful" in inspect.signature(self.fit).parameters

    @property
    def takes_memo(self) -> bool:
        """Whether the fit shares reads through a :class:`~moe_interp.steering.memo.FitMemo` (``_memo=``)."""
        return any(
            fn is not None and "_memo" in inspect.signature(fn).parameters
            for fn in (self.fit, self.forwards_to)
        )

    @property
    def keywords(self) -> list[str]:
        """The public keyword-only fit arguments: of ``fit`` and of the function it forwards to."""
        accepted: list[str] = []
        for fn in (self.fit, self.forwards_to):
            if fn is not None:
                params = inspect.signature(fn).parameters.items()
                accepted += [n for n, p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and n[0] != "_"]
        return list(dict.fromkeys(accepted))

    def check_kwargs(self, kw: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` for fit keywords this method does not take, or that the caller sets itself
        (``keep=`` of topic methods, a gate's prompts — the recipe's ``n_gate_train`` —, the keyword that
        autotuning sweeps) — so a recipe fails when it is read, not at its steering stage."""
        reserved = {"keep"} if self.needs_keep else set()
        if self.fits_gate:
            reserved |= {"gate_harmful", "gate_harmless"}
        if self.tuning != "coefficient":
            reserved.add(self.tuning)
        allowed = [n for n in self.keywords if n not in reserved]
        bad = sorted(k for k in kw if k not in allowed)
        if bad:
            raise ValueError(
                f"steering method {self.name!r} does not take {bad} here; it takes {allowed}"
                + (f" ({sorted(reserved)} set by the pipeline)" if reserved else "")
                + "."
            )

    def __call__(
        self, model: MoEModel, harmful: Sequence[str], harmless: Sequence[str], **kw: Any
    ) -> Steering:
        return self.fit(model, harmful, harmless, **kw)


#: name → :class:`MethodSpec`
METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("dense", fit_dense),
        MethodSpec("dense_multi", fit_dense_multi),
        MethodSpec("routing_experts", fit_routing_experts),
        MethodSpec("expert_conditioned", fit_expert_conditioned, forwards_to=fit_routing_experts),
        MethodSpec("expert_conditioned_all", fit_expert_conditioned_all),
        MethodSpec("single_expert", fit_single_expert),
        MethodSpec("steer_router", fit_steer_router, tuning="n_deactivate"),
        MethodSpec("ridge", fit_ridge),
        MethodSpec("topic_remove", fit_topic_remove, data="topic"),
        MethodSpec("topic_induce", fit_topic_induce, data="topic", forwards_to=fit_topic_remove),
        MethodSpec("topic_gated", fit_topic_gated, data="topic"),
        MethodSpec("gated_dense", gated("dense"), forwards_to=fit_dense),
        MethodSpec("gated_routing_experts", gated("routing_experts"), forwards_to=fit_routing_experts),
        MethodSpec("gated_single_expert", gated("single_expert"), forwards_to=fit_single_expert),
    )
}


def method_spec(name: str) -> MethodSpec:
    """The registry entry ``name``; ``ValueError`` listing the methods for an unknown one."""
    spec = METHODS.get(name)
    if spec is None:
        raise ValueError(f"Unknown steering method {name!r}; expected one of {sorted(METHODS)}.")
    return spec


def fit_method(
    name: str, model: MoEModel, harmful: Sequence[str], harmless: Sequence[str], **kw: Any
) -> Steering:
    """Fit the registered method ``name`` (see :data:`METHODS`); topic methods take ``keep=``."""
    return method_spec(name)(model, harmful, harmless, **kw)
