"""Reads of one unedited model that several steering fits share.

The pipeline fits several methods on the same prompts of one model: every gated method reads the same gate
activations, every expert method the same routing difference and, often, the same experts' forced-router
directions (``routing_experts`` and ``gated_routing_experts`` on the shipped organism share three of four).
A :class:`FitMemo` passed to the fits as ``_memo=`` keeps each read under a key that names what was read, from
which prompts and how (batch size: padding changes the numbers), so a second fit reuses it exactly.

A memo belongs to one model and holds only reads of that model with no intervention active; it is meant for one
pass of fits (the pipeline's steering stage), not across edits of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = ["FitMemo", "memo_read"]

T = TypeVar("T")


@dataclass(eq=False)
class FitMemo:
    """Reads of ``model`` keyed by what was read; ``hits`` counts the reads served from the memo."""

    model: MoEModel
    values: dict[tuple[Hashable, ...], Any] = field(default_factory=dict, repr=False)
    hits: int = 0

    def read(self, model: MoEModel, key: tuple[Hashable, ...], compute: Callable[[], T]) -> T:
        """``compute()`` the first time ``key`` is read, its stored value after; computed afresh (and not
        stored) while an intervention is active, since that read is not the unedited model's."""
        if model is not self.model:
            raise ValueError(
                f"This FitMemo holds reads of {self.model.name!r}, not of {model.name!r}: make one per model."
            )
        if model.has_interventions:
            return compute()
        if key in self.values:
            self.hits += 1
            return self.values[key]
        value = compute()
        self.values[key] = value
        return value


def memo_read(
    memo: FitMemo | None, model: MoEModel, key: tuple[Hashable, ...], compute: Callable[[], T]
) -> T:
    """``memo.read(model, key, compute)``, or ``compute()`` without a memo."""
    return compute() if memo is None else memo.read(model, key, compute)
