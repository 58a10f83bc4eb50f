"""Serializable, expert-aware steering vectors.

A :class:`SteeringVectors` object maps steering keys ``(hook_name, expert)`` to ``d_model`` vectors plus
per-key coefficients, a position scope and provenance metadata. It can be saved to / loaded from a
``.safetensors`` + ``.json`` pair, checked against a model, turned into intervention objects following the
``edits(model) -> dict[str, EditFn]`` protocol of ``docs/API_CONTRACT.md``, and applied as a context manager::

    sv = SteeringVectors({("blocks.2.hook_resid_pre", None): v}, metadata=SteeringMetadata.from_model(model))
    with sv.scaled(4.0).apply(model):
        model.generate(prompts)

Supported hook names (``L`` = block index, ``e`` = expert id):

* ``blocks.L.hook_resid_pre``, ``blocks.L.hook_resid_post``, ``blocks.L.hook_attn_out``,
  ``blocks.L.hook_mlp_out`` - key expert must be ``None``; value ``[batch, pos, d_model]``.
* ``blocks.L.mlp.hook_expert_out`` - key expert must be an expert id; value
  ``[batch, pos, n_experts, d_model]``; only expert ``e``'s slice is edited.
* ``blocks.L.mlp.experts.e.hook_out`` - key expert must be ``None`` (the id is in the name); value
  ``[batch, pos, d_model]``.

Expert edits only touch positions where the expert was routed (its output is not all zeros), so steering an
expert never makes it fire where the router did not pick it. Padding positions (``attention_mask == 0``) are
never edited.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor

from moe_interp.errors import InputError, MissingFileError
from moe_interp.fileio import atomic_path, read_json_object, read_safetensors

SteeringKey = tuple[str, int | None]
"""``(hook_name, expert)``; ``expert`` is only set for ``blocks.L.mlp.hook_expert_out``."""

PositionScope = Literal["prompt", "generated", "all"]
Conditioning = Literal["none", "router_prob", "router_prob_topk"]

POSITION_SCOPES: tuple[str, ...] = get_args(PositionScope)
CONDITIONINGS: tuple[str, ...] = get_args(Conditioning)

FORMAT_NAME = "moe_interp.steering_vectors"
FORMAT_VERSION = 1
EXPERT_SEP = "@e"

_RESID_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
_EXPERT_OUT_RE = re.compile(r"^blocks\.(\d+)\.mlp\.hook_expert_out$")
_SINGLE_EXPERT_RE = re.compile(r"^blocks\.(\d+)\.mlp\.experts\.(\d+)\.hook_out$")


class HookContextLike(Protocol):
    """The fields of the core's ``HookContext`` that steering edits read."""

    name: str
    layer: int | None
    attention_mask: Tensor | None
    is_prompt: bool
    step: int


EditFn = Callable[[Tensor, HookContextLike], Tensor]


# --------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class ParsedHook:
    """A parsed steering hook name."""

    layer: int
    kind: Literal["resid_pre", "resid_post", "attn_out", "mlp_out", "expert_out", "single_expert_out"]
    expert_in_name: int | None = None

    @property
    def is_residual(self) -> bool:
        """True for ``hook_resid_pre`` / ``hook_resid_post``."""
        return self.kind in ("resid_pre", "resid_post")


def parse_hook_name(hook_name: str) -> ParsedHook:
    """Parse a supported TransformerLens-style hook name; raise ``ValueError`` for anything else."""
    if not isinstance(hook_name, str):
        raise ValueError(f"hook name must be a str, got {type(hook_name).__name__}: {hook_name!r}")
    if m := _RESID_RE.match(hook_name):
        return ParsedHook(int(m.group(1)), m.group(2))  # type: ignore[arg-type]
    if m := _EXPERT_OUT_RE.match(hook_name):
        return ParsedHook(int(m.group(1)), "expert_out")
    if m := _SINGLE_EXPERT_RE.match(hook_name):
        return ParsedHook(int(m.group(1)), "single_expert_out", int(m.group(2)))
    raise ValueError(
        f"unsupported hook name {hook_name!r}; expected one of blocks.L.hook_resid_pre, "
        "blocks.L.hook_resid_post, blocks.L.hook_attn_out, blocks.L.hook_mlp_out, "
        "blocks.L.mlp.hook_expert_out (with an expert id), blocks.L.mlp.experts.E.hook_out"
    )


def encode_key(key: SteeringKey) -> str:
    """Reversible string form of a key: ``blocks.3.hook_resid_pre`` or ``blocks.3.mlp.hook_expert_out@e5``."""
    hook_name, expert = key
    return hook_name if expert is None else f"{hook_name}{EXPERT_SEP}{expert}"


def decode_key(s: str) -> SteeringKey:
    """Inverse of :func:`encode_key`."""
    if EXPERT_SEP in s:
        name, _, e = s.rpartition(EXPERT_SEP)
        if not e.isdigit():
            raise ValueError(f"malformed steering key {s!r}: expected '<hook>{EXPERT_SEP}<int>'")
        return (name, int(e))
    return (s, None)


def _key_layer_expert(key: SteeringKey) -> tuple[int, int | None]:
    parsed = parse_hook_name(key[0])
    return parsed.layer, key[1] if key[1] is not None else parsed.expert_in_name


# ----------------------------------------------------------------------------------------- metadata


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _lib_version() -> str:
    import moe_interp

    return str(moe_interp.__version__)


@dataclass(frozen=True)
class SteeringMetadata:
    """Provenance and shape information for a set of steering vectors.

    ``n_experts`` is ``None`` for dense models. ``hook_names`` is filled in by :class:`SteeringVectors`
    with the sorted hook names its vectors use.
    """

    family: str
    d_model: int
    n_layers: int
    n_experts: int | None = None
    hook_names: tuple[str, ...] = ()
    method: str = "unknown"
    data_hash: str | None = None
    version: str = field(default_factory=_lib_version)
    created: str = field(default_factory=_now)
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
            n_experts=_spec_n_experts(spec),
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


def _spec_n_experts(spec: Any) -> int | None:
    n = getattr(spec, "n_experts", None)
    if n is None or isinstance(n, bool):
        return None
    n = int(n)
    return n if n > 0 else None


# ---------------------------------------------------------------------------------------- the edit


def _position_mask(x: Tensor, ctx: HookContextLike) -> Tensor:
    """``[batch, pos]`` bool mask of non-padding positions of ``x``."""
    batch, pos = x.shape[0], x.shape[1]
    am = getattr(ctx, "attention_mask", None)
    if am is None:
        return torch.ones(batch, pos, dtype=torch.bool, device=x.device)
    am = am.to(x.device)
    if am.ndim != 2 or am.shape[0] != batch or am.shape[1] < pos:
        raise ValueError(
            f"attention_mask of shape {tuple(am.shape)} does not fit hook value of shape {tuple(x.shape)} "
            f"at {getattr(ctx, 'name', '?')}"
        )
    # During cached generation the mask covers the whole sequence; the hook value only the new positions.
    return am[:, am.shape[1] - pos :] != 0


@dataclass(frozen=True, eq=False)
class AddSteering:
    """Intervention adding ``coeff * vector`` at one hook (optionally one expert's slice).

    Follows the contract's intervention protocol: ``edits(model)`` returns ``{hook_name: self}`` and the
    object itself is the ``EditFn``. Padding positions are never edited; expert keys only edit positions
    where the expert's output is nonzero (i.e. where it was routed).
    """

    hook_name: str
    vector: Float[Tensor, " d_model"]
    coeff: float = 1.0
    expert: int | None = None
    positions: PositionScope = "all"

    def __post_init__(self) -> None:
        parsed = parse_hook_name(self.hook_name)
        if parsed.kind == "expert_out" and self.expert is None:
            raise ValueError(f"{self.hook_name} needs an expert id")
        if parsed.kind != "expert_out" and self.expert is not None:
            raise ValueError(f"expert id {self.expert} given for non-expert hook {self.hook_name}")
        if self.positions not in POSITION_SCOPES:
            raise ValueError(f"positions must be one of {POSITION_SCOPES}, got {self.positions!r}")
        _check_vector(self.hook_name, self.vector, None)
        _check_coeff(self.hook_name, self.coeff)

    @property
    def routed_only(self) -> bool:
        """Whether the edit is limited to positions where an expert was routed."""
        return parse_hook_name(self.hook_name).kind in ("expert_out", "single_expert_out")

    def edits(self, model: Any = None) -> dict[str, EditFn]:
        """``{hook_name: edit}`` per the intervention protocol."""
        return {self.hook_name: self}

    def __call__(self, x: Tensor, ctx: HookContextLike) -> Tensor:
        """Return ``x`` with ``coeff * vector`` added at the selected positions."""
        if self.positions == "prompt" and not ctx.is_prompt:
            return x
        if self.positions == "generated" and ctx.is_prompt:
            return x
        delta = (self.coeff * self.vector.to(device=x.device, dtype=torch.float32)).to(x.dtype)
        mask = _position_mask(x, ctx)
        if self.expert is not None:
            if x.ndim != 4:
                raise ValueError(
                    f"{self.hook_name} expects [batch, pos, n_experts, d_model], got shape {tuple(x.shape)}"
                )
            if not 0 <= self.expert < x.shape[2]:
                raise ValueError(f"expert {self.expert} out of range for {x.shape[2]} experts")
            xe = x[:, :, self.expert, :]
            sel = mask & (xe != 0).any(dim=-1)
            out = x.clone()
            out[:, :, self.expert, :] = torch.where(sel[..., None], xe + delta, xe)
            return out
        if x.shape[-1] != delta.shape[0]:
            raise ValueError(f"{self.hook_name}: hook width {x.shape[-1]} != vector width {delta.shape[0]}")
        if self.routed_only:
            mask = mask & (x != 0).any(dim=-1)
        return torch.where(mask[..., None], x + delta, x)


# ------------------------------------------------------------------------------------ validation


def _check_coeff(where: str, c: Any) -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        raise ValueError(f"coefficient for {where} must be a float, got {type(c).__name__}: {c!r}")
    c = float(c)
    if not math.isfinite(c):
        raise ValueError(f"coefficient for {where} must be finite, got {c!r}")
    return c


def _check_vector(where: str, v: Any, d_model: int | None) -> None:
    if not isinstance(v, Tensor):
        raise ValueError(f"vector for {where} must be a torch.Tensor, got {type(v).__name__}")
    if v.ndim != 1:
        raise ValueError(f"vector for {where} must be 1-D [d_model], got shape {tuple(v.shape)}")
    if d_model is not None and v.shape[0] != d_model:
        raise ValueError(f"vector for {where} has width {v.shape[0]}, expected d_model={d_model}")
    if not v.is_floating_point():
        raise ValueError(f"vector for {where} must be floating point, got {v.dtype}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"vector for {where} contains NaN or inf")


def _check_key(key: Any, meta: SteeringMetadata) -> SteeringKey:
    if not (isinstance(key, tuple) and len(key) == 2):
        raise ValueError(f"steering key must be a (hook_name, expert) tuple, got {key!r}")
    hook_name, expert = key
    parsed = parse_hook_name(hook_name)
    if expert is not None and (isinstance(expert, bool) or not isinstance(expert, int)):
        raise ValueError(f"expert id in {key!r} must be an int or None")
    if not 0 <= parsed.layer < meta.n_layers:
        raise ValueError(f"{hook_name}: layer {parsed.layer} out of range for n_layers={meta.n_layers}")
    if parsed.kind == "expert_out":
        if expert is None:
            raise ValueError(f"{hook_name} needs an expert id: use ({hook_name!r}, e)")
    elif expert is not None:
        raise ValueError(
            f"expert id {expert} given for non-expert hook {hook_name}; expert ids go only with "
            "blocks.L.mlp.hook_expert_out"
        )
    e = expert if expert is not None else parsed.expert_in_name
    if e is not None:
        if meta.n_experts is None:
            raise ValueError(f"{key!r} names expert {e} but metadata.n_experts is None (dense model)")
        if not 0 <= e < meta.n_experts:
            raise ValueError(
                f"{key!r}: expert {e} out of range, expected 0 <= e < n_experts={meta.n_experts}"
            )
    return (hook_name, expert)


# -------------------------------------------------------------------------------- SteeringVectors


@dataclass(frozen=True, eq=False)
class SteeringVectors:
    """A validated, serializable set of steering vectors keyed by ``(hook_name, expert)``.

    Treat as immutable: the constructor copies (detaches, moves to CPU) the vectors and normalizes
    ``coeffs`` to hold one float per key (default 1.0). ``conditioning`` is metadata for router-conditioned
    methods (``h <- h + c * p_e(x) * r_e``); :meth:`to_interventions` only implements ``"none"``.
    """

    vectors: dict[SteeringKey, Float[Tensor, " d_model"]]
    metadata: SteeringMetadata
    coeffs: dict[SteeringKey, float] = field(default_factory=dict)
    positions: PositionScope = "all"
    conditioning: Conditioning = "none"

    def __post_init__(self) -> None:
        meta = self.metadata
        if not isinstance(meta, SteeringMetadata):
            raise ValueError(f"metadata must be a SteeringMetadata, got {type(meta).__name__}")
        if not isinstance(self.vectors, Mapping) or not self.vectors:
            raise ValueError("vectors must be a non-empty dict {(hook_name, expert): Tensor[d_model]}")
        if self.positions not in POSITION_SCOPES:
            raise ValueError(f"positions must be one of {POSITION_SCOPES}, got {self.positions!r}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        vectors: dict[SteeringKey, Tensor] = {}
        for key, v in self.vectors.items():
            k = _check_key(key, meta)
            _check_vector(encode_key(k), v, meta.d_model)
            vectors[k] = v.detach().to("cpu").clone()
        if not isinstance(self.coeffs, Mapping):
            raise ValueError("coeffs must be a dict {(hook_name, expert): float}")
        unknown = [k for k in self.coeffs if k not in vectors]
        if unknown:
            raise ValueError(f"coeffs given for keys without a vector: {unknown}")
        coeffs = {k: _check_coeff(encode_key(k), self.coeffs.get(k, 1.0)) for k in vectors}
        hook_names = tuple(sorted({k[0] for k in vectors}, key=_hook_sort_key))
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "coeffs", coeffs)
        if meta.hook_names != hook_names:
            object.__setattr__(self, "metadata", replace(meta, hook_names=hook_names))

    # ---------------------------------------------------------------- views

    def __len__(self) -> int:
        return len(self.vectors)

    def __iter__(self) -> Iterator[SteeringKey]:
        return iter(self.vectors)

    def __contains__(self, key: object) -> bool:
        return key in self.vectors

    @property
    def keys(self) -> list[SteeringKey]:
        """Keys in sorted order (layer, hook, expert)."""
        return sorted(self.vectors, key=_key_sort_key)

    @property
    def layers(self) -> list[int]:
        """Sorted block indices touched."""
        return sorted({_key_layer_expert(k)[0] for k in self.vectors})

    @property
    def experts(self) -> list[int]:
        """Sorted expert ids touched (by expert keys)."""
        return sorted({e for k in self.vectors if (e := _key_layer_expert(k)[1]) is not None})

    def effective(self, key: SteeringKey) -> Float[Tensor, " d_model"]:
        """``coeff * vector`` for one key."""
        return self.coeffs[key] * self.vectors[key]

    # ---------------------------------------------------------------- algebra

    def scaled(self, factor: float) -> SteeringVectors:
        """Copy with every coefficient multiplied by ``factor``."""
        f = _check_coeff("scaled()", factor)
        return replace(self, coeffs={k: c * f for k, c in self.coeffs.items()})

    def with_positions(self, positions: PositionScope) -> SteeringVectors:
        """Copy with another position scope."""
        return replace(self, positions=positions)

    def __add__(self, other: SteeringVectors) -> SteeringVectors:
        """Merge: keys in both get vector ``c1*v1 + c2*v2`` with coeff 1; others keep vector and coeff."""
        if not isinstance(other, SteeringVectors):
            return NotImplemented
        a, b = self.metadata, other.metadata
        for f in ("family", "d_model", "n_layers", "n_experts"):
            if getattr(a, f) != getattr(b, f):
                raise ValueError(
                    f"cannot merge steering vectors with different {f}: {getattr(a, f)!r} vs {getattr(b, f)!r}"
                )
        for f in ("positions", "conditioning"):
            if getattr(self, f) != getattr(other, f):
                raise ValueError(
                    f"cannot merge steering vectors with different {f}: {getattr(self, f)!r} vs {getattr(other, f)!r}"
                )
        vectors = dict(self.vectors)
        coeffs = dict(self.coeffs)
        for k, v in other.vectors.items():
            if k in vectors:
                vectors[k] = self.coeffs[k] * vectors[k] + other.coeffs[k] * v
                coeffs[k] = 1.0
            else:
                vectors[k] = v
                coeffs[k] = other.coeffs[k]
        method = a.method if a.method == b.method else f"{a.method}+{b.method}"
        extra = {**a.extra, **b.extra, "merged_from": [a.to_json_dict(), b.to_json_dict()]}
        data_hash = a.data_hash if a.data_hash == b.data_hash else None
        meta = replace(a, method=method, data_hash=data_hash, created=_now(), extra=extra)
        return SteeringVectors(vectors, meta, coeffs, self.positions, self.conditioning)

    # ---------------------------------------------------------------- model

    def check_compatible(self, model: Any) -> None:
        """Raise ``ValueError`` naming the first mismatch between these vectors and ``model``."""
        spec = model.spec
        meta = self.metadata
        problems: list[str] = []
        if str(spec.family).lower() != meta.family.lower():
            problems.append(f"family: vectors are for {meta.family!r}, model is {spec.family!r}")
        if int(spec.d_model) != meta.d_model:
            problems.append(f"d_model: vectors have {meta.d_model}, model has {spec.d_model}")
        if int(spec.n_layers) != meta.n_layers:
            problems.append(f"n_layers: vectors have {meta.n_layers}, model has {spec.n_layers}")
        if _spec_n_experts(spec) != meta.n_experts:
            problems.append(f"n_experts: vectors have {meta.n_experts}, model has {_spec_n_experts(spec)}")
        if hasattr(model, "hook_names"):
            known = set(model.hook_names())
            missing = [h for h in meta.hook_names if h not in known]
            if missing:
                problems.append(f"unknown hook names for this model: {missing}")
        if problems:
            raise ValueError("steering vectors do not fit the model: " + "; ".join(problems))

    def to_interventions(self, *, ignore_conditioning: bool = False) -> list[Any]:
        """One :class:`AddSteering` per key (sorted by layer).

        Router-conditioned vectors (all keys ``(blocks.L.mlp.hook_expert_out, e)``) become one
        :class:`moe_interp.steering.methods.ExpertConditionedAdd` per layer (``h += c * p_e(x) * r_e`` at the
        MoE output); other keys raise ``NotImplementedError`` unless ``ignore_conditioning``, in which case
        the plain (unconditioned) addition is used.
        """
        if self.conditioning != "none" and not ignore_conditioning:
            from moe_interp.steering.methods import conditioned_interventions

            return conditioned_interventions(self)
        return [AddSteering(k[0], self.vectors[k], self.coeffs[k], k[1], self.positions) for k in self.keys]

    @contextmanager
    def apply(self, model: Any, *, check: bool = True) -> Iterator[Any]:
        """Context manager: ``model.intervene(*self.to_interventions())`` (after :meth:`check_compatible`)."""
        if check:
            self.check_compatible(model)
        with model.intervene(*self.to_interventions()) as handle:
            yield handle

    # ---------------------------------------------------------------- io

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON sidecar content (everything but the tensors)."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "keys": [encode_key(k) for k in self.keys],
            "coeffs": {encode_key(k): self.coeffs[k] for k in self.keys},
            "positions": self.positions,
            "conditioning": self.conditioning,
            "metadata": self.metadata.to_json_dict(),
        }

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``<path>.safetensors`` and ``<path>.json`` (each atomically: on error neither is touched)."""
        st_path, js_path = _paths(path)
        st_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {encode_key(k): self.vectors[k].contiguous() for k in self.keys}
        text = json.dumps(self.to_json_dict(), indent=2, allow_nan=False) + "\n"
        with atomic_path(st_path) as st_tmp, atomic_path(js_path) as js_tmp:
            save_file(tensors, str(st_tmp), metadata={"format": FORMAT_NAME})
            js_tmp.write_text(text)
        return st_path, js_path

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> SteeringVectors:
        """Read a pair written by :meth:`save`; if ``model`` is given, :meth:`check_compatible` with it.

        Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and field for
        anything malformed: unreadable safetensors, a JSON that is not an object, a missing ``metadata``,
        ``keys`` or ``coeffs`` (a coefficient per key: a missing one would silently become +1.0).
        """
        st_path, js_path = _paths(path)
        if not st_path.is_file() and js_path.is_file():
            raise MissingFileError(f"steering vectors file not found: {st_path} (the pair of {js_path})")
        doc = read_json_object(js_path, f"a {FORMAT_NAME} file")
        if doc.get("format") != FORMAT_NAME:
            raise InputError(f"{js_path}: 'format' is {doc.get('format')!r}; expected {FORMAT_NAME!r}")
        if doc.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"{js_path}: unsupported format_version {doc.get('format_version')!r}; expected {FORMAT_VERSION}"
            )
        missing = [k for k in ("keys", "coeffs", "metadata") if k not in doc]
        if missing:
            raise InputError(
                f"{js_path}: missing {missing}; a {FORMAT_NAME} file needs keys, coeffs and metadata"
            )
        json_keys, coeffs_raw = doc["keys"], doc["coeffs"]
        if not isinstance(json_keys, list) or not all(isinstance(k, str) for k in json_keys):
            raise InputError(f"{js_path}: 'keys' must be a list of strings, got {json_keys!r:.80}")
        if not isinstance(coeffs_raw, dict):
            raise InputError(f"{js_path}: 'coeffs' must be an object {{key: float}}, got {coeffs_raw!r:.80}")
        if set(coeffs_raw) - set(json_keys):
            raise InputError(
                f"{js_path}: 'coeffs' for unknown keys {sorted(set(coeffs_raw) - set(json_keys))}"
            )
        if set(json_keys) - set(coeffs_raw):
            raise InputError(
                f"{js_path}: 'coeffs' has no coefficient for {sorted(set(json_keys) - set(coeffs_raw))}; "
                "every key needs one (refusing to guess a sign and strength)"
            )
        tensors = read_safetensors(st_path)
        if set(json_keys) != set(tensors):
            raise InputError(
                f"{js_path} and {st_path} disagree: only in JSON {sorted(set(json_keys) - set(tensors))}, "
                f"only in safetensors {sorted(set(tensors) - set(json_keys))}"
            )
        try:
            sv = cls(
                vectors={decode_key(k): tensors[k] for k in json_keys},
                metadata=SteeringMetadata.from_json_dict(doc["metadata"]),
                coeffs={decode_key(k): c for k, c in coeffs_raw.items()},
                positions=doc.get("positions", "all"),
                conditioning=doc.get("conditioning", "none"),
            )
        except ValueError as err:
            raise InputError(f"{js_path}: {err}") from err
        if model is not None:
            sv.check_compatible(model)
        return sv

    # ---------------------------------------------------------------- display

    def __repr__(self) -> str:
        m = self.metadata
        parts = [
            f"method={m.method!r}",
            f"n={len(self)}",
            f"layers={self.layers}",
        ]
        if self.experts:
            parts.append(f"experts={self.experts}")
        parts += [f"positions={self.positions!r}", f"family={m.family!r}"]
        if self.conditioning != "none":
            parts.append(f"conditioning={self.conditioning!r}")
        return f"SteeringVectors({', '.join(parts)})"

    def _repr_html_(self) -> str:
        m = self.metadata
        rows = "".join(
            f"<tr><td>{html.escape(k[0])}</td><td>{'' if k[1] is None else k[1]}</td>"
            f"<td>{self.coeffs[k]:.4g}</td><td>{float(self.vectors[k].float().norm()):.4g}</td></tr>"
            for k in self.keys
        )
        head = html.escape(
            f"SteeringVectors: method={m.method}, family={m.family}, d_model={m.d_model}, "
            f"positions={self.positions}, conditioning={self.conditioning}"
        )
        return (
            f"<div><b>{head}</b><table><thead><tr><th>hook</th><th>expert</th><th>coeff</th>"
            f"<th>|v|</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


_KIND_ORDER = {
    "resid_pre": 0,
    "attn_out": 1,
    "expert_out": 2,
    "single_expert_out": 3,
    "mlp_out": 4,
    "resid_post": 5,
}


def _hook_sort_key(hook_name: str) -> tuple[int, int, int]:
    p = parse_hook_name(hook_name)
    return (p.layer, _KIND_ORDER[p.kind], -1 if p.expert_in_name is None else p.expert_in_name)


def _key_sort_key(key: SteeringKey) -> tuple[int, int, int, int]:
    return (*_hook_sort_key(key[0]), -1 if key[1] is None else key[1])
