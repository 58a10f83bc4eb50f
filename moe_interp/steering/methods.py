"""Backwards-compatible names of the steering methods (re-exported; nothing is defined here).

The code lives in modules of one concern each:

* :mod:`moe_interp.steering.registry` — ``METHODS`` (name → :class:`~.registry.MethodSpec`: fit function,
  data it needs, how it is tuned) and :func:`fit_method`;
* :mod:`moe_interp.steering.fit` — shared fitting helpers and the residual-stream methods (dense, ridge,
  topic); :mod:`moe_interp.steering.fit_experts` — the expert and router methods;
* :mod:`moe_interp.steering.vectors` / :mod:`moe_interp.steering.edits` — the steering objects
  (:class:`SteeringVectors`, :class:`ExpertConditionedAdd`, :class:`RouterSteering`,
  :class:`TopicGatedSteering`), all following :class:`~moe_interp.steering.protocol.Steering`;
* :mod:`moe_interp.steering.compare` — harmless KL and the comparison table.
"""

from __future__ import annotations

from moe_interp.refusal.evaluate import refusal_flags
from moe_interp.steering.compare import (
    KL_STATISTICS,
    KL_TRIM,
    check_kl_statistic,
    compare_methods,
    harmless_kl,
    per_prompt_kl,
    scaled,
    summarise_kl,
    touched,
    with_coeff,
)
from moe_interp.steering.edits import RouterSteering, TopicGatedSteering
from moe_interp.steering.fit import (
    data_hash,
    fit_dense,
    fit_dense_multi,
    fit_ridge,
    fit_topic_gated,
    fit_topic_induce,
    fit_topic_remove,
    mean_activations,
)
from moe_interp.steering.fit_experts import (
    expert_specific_directions,
    fit_expert_conditioned,
    fit_expert_conditioned_all,
    fit_routing_experts,
    fit_single_expert,
    fit_steer_router,
    select_experts,
)
from moe_interp.steering.protocol import Steering
from moe_interp.steering.registry import METHODS, MethodSpec, fit_method
from moe_interp.steering.vectors import ExpertConditionedAdd, SteeringVectors

#: Deprecated name of :class:`~moe_interp.steering.protocol.Steering`.
Steerable = Steering


__all__ = [
    "KL_STATISTICS",
    "KL_TRIM",
    "METHODS",
    "ExpertConditionedAdd",
    "MethodSpec",
    "RouterSteering",
    "Steerable",
    "Steering",
    "SteeringVectors",
    "TopicGatedSteering",
    "check_kl_statistic",
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
    "harmless_kl",
    "mean_activations",
    "per_prompt_kl",
    "refusal_flags",
    "scaled",
    "select_experts",
    "summarise_kl",
    "touched",
    "with_coeff",
]
