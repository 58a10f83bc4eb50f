"""Metrics for patching: callables of logits ``[batch, pos, vocab]`` → scalar tensor.

The default metric is the mean logit refusal score (log-odds of a refusal first token) at the last
position; sweeps normalise it to ``(patched − corrupt) / (clean − corrupt)``. Per-prompt scores are
:func:`moe_interp.refusal.evaluate.refusal_scores`, re-exported here for the patching code.

A metric that reads only the last position says so with ``metric.last_position_only = True``
(:func:`last_position_metric`): the patching code then unembeds the last position alone (``[batch, 1, vocab]``
logits), which saves the unembedding of every other position, in time and in memory (on the OLMoE-1B-7B
geometry, 50k-token vocabulary, the full logits were a third of a patching forward's memory: bench/README.md).
A metric without the attribute gets the full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moe_interp.refusal.evaluate import refusal_scores
from moe_interp.refusal.judges import refusal_logodds, resolve_refusal_ids
from moe_interp.refusal.stats import bootstrap_ci

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

Metric = Callable[[Tensor], Tensor]

__all__ = [
    "Metric",
    "bootstrap_ci",
    "call_metric",
    "last_position_metric",
    "reads_last_position_only",
    "refusal_logodds",
    "refusal_metric",
    "refusal_scores",
]


def refusal_metric(model: MoEModel, refusal_ids: Sequence[int] | None = None) -> Metric:
    """Metric: mean refusal log-odds at the last position over the batch (differentiable)."""
    ids = resolve_refusal_ids(model, refusal_ids)

    def metric(logits: Tensor) -> Tensor:
        return refusal_logodds(logits[:, -1], ids).mean()

    metric.__name__ = "refusal_metric"
    return last_position_metric(metric)


def last_position_metric(metric: Metric) -> Metric:
    """Mark ``metric`` as reading ``logits[:, -1]`` only: patching then passes it ``[batch, 1, vocab]`` logits,
    the unembedding of the last position alone. Returns ``metric`` itself, or a wrapper where it takes no
    attributes (a bound method)."""
    try:
        metric.last_position_only = True  # type: ignore[attr-defined]
        return metric
    except AttributeError:

        def wrapped(logits: Tensor) -> Tensor:
            return metric(logits)

        wrapped.last_position_only = True  # type: ignore[attr-defined]
        return wrapped


def reads_last_position_only(metric: Metric) -> bool:
    """Whether ``metric`` declared that it reads only the last position (see :func:`last_position_metric`)."""
    return getattr(metric, "last_position_only", False) is True


def call_metric(metric: Metric, logits: Tensor) -> Tensor:
    """Apply ``metric`` and check it returned a scalar (0-d tensor or a number)."""
    val = metric(logits)
    if isinstance(val, int | float):
        return torch.tensor(float(val))
    if not isinstance(val, Tensor) or val.numel() != 1:
        got = tuple(val.shape) if isinstance(val, Tensor) else type(val).__name__
        raise ValueError(
            f"The metric must return a scalar (a 0-d tensor or a float) from logits [batch, pos, vocab], got {got}."
        )
    return val.reshape(())
