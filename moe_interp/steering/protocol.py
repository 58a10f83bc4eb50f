"""The one protocol every steering object follows.

:class:`~moe_interp.steering.vectors.SteeringVectors`, :class:`~moe_interp.steering.vectors.ExpertConditionedAdd`,
:class:`~moe_interp.steering.edits.RouterSteering` and :class:`~moe_interp.steering.edits.TopicGatedSteering`
are :class:`Steering` objects: they turn into interventions for ``model.intervene``, scale, save to and load
from files, and refuse a model they were not made for. Code that handles "any steering" (the pipeline, the
CLI, autotuning, comparisons) uses only these methods; files are read back through one registry of formats
(:func:`moe_interp.steering.formats.load_steering`), and
:func:`moe_interp.refusal.evaluate.as_interventions` accepts a steering object wherever a list of
interventions is expected.

``scaled`` multiplies the coefficients of the additive objects (for a topic gate: of its gated vectors).
:class:`~moe_interp.steering.edits.RouterSteering` has no coefficient — its strength is the set of experts it
(de)activates, and ``epsilon`` is only a margin — so its ``scaled`` raises ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from typing_extensions import Self

    from moe_interp.model import MoEModel

__all__ = ["Steering"]


@runtime_checkable
class Steering(Protocol):
    """A steering object (see the module docstring for the implementations)."""

    def to_interventions(self, model: MoEModel | None = None) -> list[Any]:
        """Interventions (objects with ``edits(model)``) for ``model.intervene``; checked against ``model``
        first when one is given."""
        ...

    def scaled(self, factor: float) -> Self:
        """A copy with its strength multiplied by ``factor`` (``ValueError`` where there is no strength)."""
        ...

    def save(self, path: str | Path) -> list[Path]:
        """Write the object's files (atomically: on error none is replaced); return their paths."""
        ...

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read what :meth:`save` wrote; ``ValueError`` naming the file and the field for bad content."""
        ...

    def check_compatible(self, model: MoEModel) -> None:
        """Raise ``ValueError`` naming the first mismatch with ``model`` (family, shapes, layers, experts)."""
        ...
