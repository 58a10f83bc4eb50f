"""Provenance and shape metadata of a steering object, and the check that it fits a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from moe_interp.errors import InputError

__all__ = ["SteeringMetadata", "model_mismatches", "spec_n_experts", "utc_now"]


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _lib_version() -> str:
    import moe_interp

    return str(moe_interp.__version__)


def spec_n_experts(spec: Any) -> int | None:
    """``spec.n_experts`` as a positive int, or None for a dense model."""
    n = getattr(spec, "n_experts", None)
    if n is None or isinstance(n, bool):
        return None
    n = int(n)
    return n if n > 0 else None


@dataclass(frozen=True)
class SteeringMetadata:
    """Provenance and shape information for a set of steering vectors.

    ``n_experts`` is ``None`` for dense models. ``hook_names`` is filled in by
    :class:`~moe_interp.steering.vectors.SteeringVectors` with the sorted hook names its vectors use.
    """

    family: str
    d_model: int
    n_layers: int
    n_experts: int | None = None
    hook_names: tuple[str, ...] = ()
    method: str = "unknown"
    data_hash: str | None = None
    version: str = field(default_factory=_lib_version)
    created: str = field(default_factory=utc_now)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"metadata.{name} must be a positive int, got {v!r}")
        if self.n_experts is not None and (
            isinstance(self.n_experts, bool) or not isinstance(self.n_experts, int) or self.n_experts <= 0
        ):
            raise ValueError(f"metadata.n_experts must be a positive int or None, got {self.n_experts!r}")
        if not isinstance(self.family, str) or not self.family:
            raise ValueError(f"metadata.family must be a non-empty str, got {self.family!r}")
        object.__setattr__(self, "hook_names", tuple(self.hook_names))

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> SteeringMetadata:
        """Fill ``family``, ``d_model``, ``n_layers``, ``n_experts`` from ``model.spec``."""
        spec = model.spec
        return cls(
            family=str(spec.family),
            d_model=int(spec.d_model),
            n_layers=int(spec.n_layers),
            n_experts=spec_n_experts(spec),
            **kwargs,
        )

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-serializable dict."""
        d = asdict(self)
        d["hook_names"] = list(self.hook_names)
        return d

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> SteeringMetadata:
        """Inverse of :meth:`to_json_dict`; ``ValueError`` naming the field for anything malformed."""
        if not isinstance(d, Mapping):
            raise InputError(f"'metadata' must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"'metadata' has unknown fields {unknown}; expected fields {sorted(known)}")
        missing = [k for k in ("family", "d_model", "n_layers") if k not in d]
        if missing:
            raise InputError(f"'metadata' lacks {missing} (family, d_model and n_layers are required)")
        d = dict(d)
        names = d.get("hook_names", ())
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise InputError(f"'metadata.hook_names' must be a list of hook names, got {names!r}")
        if not isinstance(d.get("extra") or {}, Mapping):
            raise InputError(f"'metadata.extra' must be an object, got {type(d['extra']).__name__}")
        d["hook_names"] = tuple(names)
        d["extra"] = dict(d.get("extra") or {})
        return cls(**d)


def model_mismatches(
    meta: SteeringMetadata,
    model: Any,
    subject: tuple[str, str] = ("the file is", "the file has"),
    checked: Sequence[str] = ("family", "d_model", "n_layers", "n_experts"),
) -> list[str]:
    """The ``checked`` fields where ``meta`` and ``model.spec`` disagree, one message each (empty: it fits).

    ``subject`` words the messages, e.g. ``("vectors are", "vectors have")``.
    """
    spec, (is_for, has) = model.spec, subject
    model_n_experts = spec_n_experts(spec)
    problems = []
    if "family" in checked and str(spec.family).lower() != meta.family.lower():
        problems.append(f"family: {is_for} for {meta.family!r}, the model is {spec.family!r}")
    for name, theirs in (
        ("d_model", int(spec.d_model)),
        ("n_layers", int(spec.n_layers)),
        ("n_experts", model_n_experts),
    ):
        if name in checked and getattr(meta, name) != theirs:
            problems.append(f"{name}: {has} {getattr(meta, name)}, the model has {theirs}")
    return problems
