"""Router adapters: how a family's router module hands its routing decision to the experts module.

transformers MoE blocks come in two layouts. Most routers return ``(logits, top_k_weights, top_k_index)``
and the experts module sums the selected experts' weighted outputs (:class:`TopKRouter`). Llama 4's router
returns ``(dense_scores, logits)`` and its experts module returns every expert's output on inputs already
scaled by the scores, ``[n_experts * n_tok, d_model]`` (:class:`DenseScoreRouter`). Each
:class:`~moe_interp.families.FamilySpec` holds one adapter; the tracer calls its methods instead of
comparing layout names. Nothing here imports torch: the family table stays light for the command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

from moe_interp.errors import InputError

if TYPE_CHECKING:
    from jaxtyping import Float, Int
    from torch import Tensor

#: MoE sites every layout exposes (``blocks.{L}.mlp.<site>``), in execution order
_MOE_SITES = ("hook_router_logits", "hook_expert_indices", "hook_expert_weights", "hook_expert_out")


class Routing(NamedTuple):
    """One router call's decision for ``n_tok`` tokens, in the router module's own layout.

    ``weights`` is ``[n_tok, k]`` (top-k layout) or ``[n_tok, n_experts]`` (dense-score layout);
    ``indices`` is None where the router returns no indices.
    """

    logits: Float[Tensor, "n_tok n_experts"]
    weights: Float[Tensor, "n_tok _"]
    indices: Int[Tensor, "n_tok k"] | None


class RouterAdapter(Protocol):
    """What the tracer needs to know about one router/experts layout (see the module docstring)."""

    #: the layout's name, for messages and metadata
    layout: ClassVar[str]
    #: MoE hook sites of this layout, relative to ``blocks.{L}.mlp.``, in execution order
    sites: ClassVar[tuple[str, ...]]
    #: sites (``mlp.<site>``) that cannot be written in this layout -> what to edit instead
    read_only_sites: ClassVar[Mapping[str, str]]

    def read(self, output: Any) -> Routing:
        """Split the router module's output into logits, weights and indices."""
        ...

    def write(self, routing: Routing) -> tuple[Tensor, ...]:
        """The router module output carrying ``routing`` (inverse of :meth:`read`)."""
        ...

    def rerouted(
        self, logits: Float[Tensor, "n_tok n_experts"], weights: Tensor, indices: Int[Tensor, "n_tok k"]
    ) -> Routing:
        """The routing after re-running the routing function (:func:`moe_interp.experts.route`) on ``logits``."""
        ...

    def selected(self, routing: Routing, top_k: int) -> Int[Tensor, "n_tok k"]:
        """The selected experts (``hook_expert_indices``)."""
        ...

    def with_indices(self, routing: Routing, indices: Int[Tensor, "n_tok k"]) -> Routing:
        """``routing`` with other selected experts (their weights unchanged)."""
        ...

    def dense(self, routing: Routing, n_experts: int) -> Float[Tensor, "n_tok n_experts"]:
        """Routing weights scattered to ``[n_tok, n_experts]``, zero where not selected."""
        ...

    def with_dense(self, routing: Routing, dense: Float[Tensor, "n_tok n_experts"]) -> Routing:
        """``routing`` with the routing weights of a dense ``[n_tok, n_experts]`` tensor."""
        ...

    def routed_dense(
        self, weights: Tensor, indices: Int[Tensor, "n_tok k"], n_experts: int
    ) -> Float[Tensor, "n_tok n_experts"]:
        """Dense ``[n_tok, n_experts]`` weights from :func:`~moe_interp.experts.route`'s output."""
        ...

    def expert_outputs(self, experts: Any, n_experts: int) -> Float[Tensor, "n_tok n_experts d"] | None:
        """Every expert's output read from the experts module (an nnsight envoy), or None where the module
        returns only their sum: then per-expert outputs are computed from its inputs (and the envoy is not
        touched, so its inputs can still be read)."""
        ...

    def combine(self, per_expert: Float[Tensor, "n_tok n_experts d"]) -> Tensor:
        """The experts module output made of per-expert outputs (inverse of reading them)."""
        ...


@dataclass(frozen=True)
class TopKRouter:
    """``(logits, top_k_weights, top_k_index)`` routers; the experts module returns the weighted sum."""

    layout: ClassVar[str] = "logits_weights_indices"
    sites: ClassVar[tuple[str, ...]] = (*_MOE_SITES, "hook_topk_expert_out")
    read_only_sites: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def read(self, output: Any) -> Routing:
        return Routing(output[0], output[1], output[2])

    def write(self, routing: Routing) -> tuple[Tensor, ...]:
        assert routing.indices is not None
        return (routing.logits, routing.weights, routing.indices)

    def rerouted(self, logits: Tensor, weights: Tensor, indices: Tensor) -> Routing:
        return Routing(logits, weights, indices)

    def selected(self, routing: Routing, top_k: int) -> Tensor:
        assert routing.indices is not None
        return routing.indices

    def with_indices(self, routing: Routing, indices: Tensor) -> Routing:
        return routing._replace(indices=indices)

    def dense(self, routing: Routing, n_experts: int) -> Tensor:
        assert routing.indices is not None
        return self.routed_dense(routing.weights, routing.indices, n_experts)

    def with_dense(self, routing: Routing, dense: Tensor) -> Routing:
        from moe_interp.experts import dense_to_topk  # experts imports the family table: import on use

        weights, indices = dense_to_topk(dense.to(routing.weights.dtype), min_k=routing.weights.shape[-1])
        return Routing(routing.logits, weights, indices)

    def routed_dense(self, weights: Tensor, indices: Tensor, n_experts: int) -> Tensor:
        from moe_interp.experts import topk_to_dense

        return topk_to_dense(weights, indices, n_experts)

    def expert_outputs(self, experts: Any, n_experts: int) -> Tensor | None:
        return None

    def combine(self, per_expert: Tensor) -> Tensor:
        return per_expert.sum(dim=1)


@dataclass(frozen=True)
class DenseScoreRouter:
    """``(dense_scores, logits)`` routers (Llama 4): experts see inputs scaled by their score and return
    every expert's output, ``[n_experts * n_tok, d]``; the selection is the top-k of the logits."""

    layout: ClassVar[str] = "scores_logits"
    sites: ClassVar[tuple[str, ...]] = _MOE_SITES
    read_only_sites: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"mlp.hook_expert_indices": "the experts see dense scores, not indices: edit mlp.hook_expert_weights"}
    )

    def read(self, output: Any) -> Routing:
        return Routing(output[1], output[0], None)

    def write(self, routing: Routing) -> tuple[Tensor, ...]:
        return (routing.weights, routing.logits)

    def rerouted(self, logits: Tensor, weights: Tensor, indices: Tensor) -> Routing:
        return Routing(logits, weights, None)  # the selection is re-read from the logits (selected())

    def selected(self, routing: Routing, top_k: int) -> Tensor:
        return routing.logits.topk(top_k, dim=-1).indices

    def with_indices(self, routing: Routing, indices: Tensor) -> Routing:
        raise InputError(
            f"hook_expert_indices is read-only here ({self.read_only_sites['mlp.hook_expert_indices']})."
        )

    def dense(self, routing: Routing, n_experts: int) -> Tensor:
        return routing.weights

    def with_dense(self, routing: Routing, dense: Tensor) -> Routing:
        return routing._replace(weights=dense)

    def routed_dense(self, weights: Tensor, indices: Tensor, n_experts: int) -> Tensor:
        return weights

    def expert_outputs(self, experts: Any, n_experts: int) -> Tensor | None:
        out = experts.output  # [(e n), d]: every expert already computed on its scaled inputs
        return out.unflatten(0, (n_experts, -1)).transpose(0, 1)

    def combine(self, per_expert: Tensor) -> Tensor:
        return per_expert.transpose(0, 1).reshape(-1, per_expert.shape[-1])


TOPK_ROUTER = TopKRouter()
DENSE_SCORE_ROUTER = DenseScoreRouter()
