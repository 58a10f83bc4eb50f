"""Serializable, expert-aware steering vectors, and their router-conditioned form.

A :class:`SteeringVectors` object maps steering keys ``(hook_name, expert)`` (:mod:`moe_interp.steering.keys`)
to ``d_model`` vectors plus per-key coefficients, a position scope and provenance metadata. It can be saved to /
loaded from a ``.safetensors`` + ``.json`` pair, checked against a model, turned into interventions
(:class:`~moe_interp.steering.addition.AddSteering` per key, or :class:`ExpertConditionedAdd` per layer for
router-conditioned sets) and applied as a context manager::

    sv = SteeringVectors({("blocks.2.hook_resid_pre", None): v}, metadata=SteeringMetadata.from_model(model))
    with sv.scaled(4.0).apply(model):
        model.generate(prompts)

Both classes follow the :class:`~moe_interp.steering.protocol.Steering` protocol. Padding positions
(``attention_mask == 0``) are never edited.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, get_args

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor

from moe_interp.errors import InputError, MissingFileError
from moe_interp.fileio import atomic_path, read_json_object, read_safetensors
from moe_interp.interventions import (
    DirectionalAblation,
    ExpertDirectionalAblation,
    check_coeff,
    check_positions,
    position_mask,
)
from moe_interp.steering.addition import AddSteering, check_steering_vector
from moe_interp.steering.files import remove_stale_gate
from moe_interp.steering.keys import (
    EXPERT_SEP,
    ParsedHook,
    SteeringKey,
    check_key,
    decode_key,
    encode_key,
    hook_sort_key,
    key_layer_expert,
    key_sort_key,
    parse_hook_name,
)
from moe_interp.steering.metadata import SteeringMetadata, model_mismatches, utc_now
from moe_interp.tracing import EditFn, HookContext

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = [
    "CONDITIONINGS",
    "EXPERT_SEP",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "POSITION_SCOPES",
    "AddSteering",
    "Conditioning",
    "Operation",
    "ExpertConditionedAdd",
    "ParsedHook",
    "PositionScope",
    "SteeringKey",
    "SteeringMetadata",
    "SteeringVectors",
    "decode_key",
    "encode_key",
    "parse_hook_name",
]

PositionScope = Literal["prompt", "generated", "all"]
Conditioning = Literal["none", "router_prob", "router_prob_topk"]
#: "add": ``h <- h + c * r``; "ablate": ``h <- h - c * (h · r̂) r̂`` (directional ablation at that hook)
Operation = Literal["add", "ablate"]

POSITION_SCOPES: tuple[str, ...] = get_args(PositionScope)
CONDITIONINGS: tuple[str, ...] = get_args(Conditioning)
OPERATIONS: tuple[str, ...] = get_args(Operation)


def _is_scope(positions: object) -> TypeGuard[PositionScope]:
    return isinstance(positions, str) and positions in POSITION_SCOPES


FORMAT_NAME = "moe_interp.steering_vectors"
#: 2: may carry ``operation`` (older readers refuse such a file rather than add an ablation direction)
FORMAT_VERSION = 2
#: versions :meth:`SteeringVectors.load` reads (1: additive vectors only)
READ_VERSIONS = (1, 2)


def _coeff(where: str, c: Any) -> float:
    """:func:`~moe_interp.interventions.check_coeff`, naming the key in the error."""
    try:
        return check_coeff(c)
    except ValueError as err:
        raise ValueError(f"coefficient for {where}: {err}") from None


# -------------------------------------------------------------------------------- SteeringVectors


@dataclass(frozen=True, eq=False)
class SteeringVectors:
    """A validated, serializable set of steering vectors keyed by ``(hook_name, expert)``.

    Treat as immutable: the constructor copies (detaches, moves to CPU) the vectors and normalizes
    ``coeffs`` to hold one float per key (default 1.0). ``conditioning`` selects router-conditioned
    application (``h <- h + c * p_e(x) * r_e``, see :class:`ExpertConditionedAdd`). ``operation="ablate"``
    removes ``c`` times each vector's component instead of adding it (at residual-stream keys; at an
    expert key, from that expert's output only).
    """

    vectors: dict[SteeringKey, Float[Tensor, " d_model"]]
    metadata: SteeringMetadata
    coeffs: dict[SteeringKey, float] = field(default_factory=dict)
    positions: PositionScope = "all"
    conditioning: Conditioning = "none"
    operation: Operation = "add"

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
        if self.operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}, got {self.operation!r}")
        vectors: dict[SteeringKey, Tensor] = {}
        for key, v in self.vectors.items():
            k = check_key(key, meta.n_layers, meta.n_experts)
            check_steering_vector(encode_key(k), v, meta.d_model)
            vectors[k] = v.detach().to("cpu").clone()
        if not isinstance(self.coeffs, Mapping):
            raise ValueError("coeffs must be a dict {(hook_name, expert): float}")
        unknown = [k for k in self.coeffs if k not in vectors]
        if unknown:
            raise ValueError(f"coeffs given for keys without a vector: {unknown}")
        coeffs = {k: _coeff(encode_key(k), self.coeffs.get(k, 1.0)) for k in vectors}
        if self.operation == "ablate":
            _check_ablatable(vectors, self.conditioning)
        hook_names = tuple(sorted({k[0] for k in vectors}, key=hook_sort_key))
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
        return sorted(self.vectors, key=key_sort_key)

    @property
    def layers(self) -> list[int]:
        """Sorted block indices touched."""
        return sorted({key_layer_expert(k)[0] for k in self.vectors})

    @property
    def experts(self) -> list[int]:
        """Sorted expert ids touched (by expert keys)."""
        return sorted({e for k in self.vectors if (e := key_layer_expert(k)[1]) is not None})

    def effective(self, key: SteeringKey) -> Float[Tensor, " d_model"]:
        """``coeff * vector`` for one key."""
        return self.coeffs[key] * self.vectors[key]

    # ---------------------------------------------------------------- algebra

    def scaled(self, factor: float) -> SteeringVectors:
        """Copy with every coefficient multiplied by ``factor``."""
        f = _coeff("scaled()", factor)
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
        for f in ("positions", "conditioning", "operation"):
            if getattr(self, f) != getattr(other, f):
                raise ValueError(
                    f"cannot merge steering vectors with different {f}: {getattr(self, f)!r} vs {getattr(other, f)!r}"
                )
        shared = sorted(set(self.vectors) & set(other.vectors), key=str)
        if self.operation == "ablate" and shared:
            raise ValueError(
                f"cannot merge ablations that share keys {shared}: two ablations do not add up to one"
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
        meta = replace(a, method=method, data_hash=data_hash, created=utc_now(), extra=extra)
        return SteeringVectors(vectors, meta, coeffs, self.positions, self.conditioning, self.operation)

    # ---------------------------------------------------------------- model

    def check_compatible(self, model: Any) -> None:
        """Raise ``ValueError`` naming the first mismatch between these vectors and ``model``."""
        problems = model_mismatches(self.metadata, model, ("vectors are", "vectors have"))
        if hasattr(model, "hook_names"):
            known = set(model.hook_names())
            missing = [h for h in self.metadata.hook_names if h not in known]
            if missing:
                problems.append(f"unknown hook names for this model: {missing}")
        if problems:
            raise ValueError("steering vectors do not fit the model: " + "; ".join(problems))

    def to_interventions(self, model: Any = None, *, ignore_conditioning: bool = False) -> list[Any]:
        """One :class:`AddSteering` per key (sorted by layer); checked against ``model`` first if given.

        Router-conditioned vectors (all keys ``(blocks.L.mlp.hook_expert_out, e)``) become one
        :class:`ExpertConditionedAdd` per layer (``h += c * p_e(x) * r_e`` at the MoE output); other keys
        raise ``NotImplementedError`` unless ``ignore_conditioning``, in which case the plain
        (unconditioned) addition is used.
        """
        if model is not None:
            self.check_compatible(model)
        if self.operation == "ablate":
            return [self._ablation(k) for k in self.keys]
        if self.conditioning != "none" and not ignore_conditioning:
            return self._conditioned()
        return [AddSteering(k[0], self.vectors[k], self.coeffs[k], k[1], self.positions) for k in self.keys]

    def _ablation(self, key: SteeringKey) -> DirectionalAblation | ExpertDirectionalAblation:
        """The directional ablation of one key: at a residual site, or of one expert's output."""
        layer, expert = key_layer_expert(key)  # check_key guarantees an expert id on expert keys
        v, c = self.vectors[key], self.coeffs[key]
        if expert is not None:
            return ExpertDirectionalAblation(layer, expert, v, self.positions, c)
        return DirectionalAblation(v, [layer], (key[0].split(".")[-1],), self.positions, c)

    def _conditioned(self) -> list[ExpertConditionedAdd]:
        by_layer: dict[int, dict[int, Tensor]] = {}
        for key in self.keys:
            parsed = parse_hook_name(key[0])
            if parsed.kind != "expert_out" or key[1] is None:
                raise NotImplementedError(
                    f"conditioning={self.conditioning!r}: the router-conditioned edit applies to "
                    f"(blocks.L.mlp.hook_expert_out, e) keys only, got {key!r}"
                )
            by_layer.setdefault(parsed.layer, {})[key[1]] = self.effective(key)
        topk = self.conditioning == "router_prob_topk"
        return [
            ExpertConditionedAdd(L, vecs, 1.0, topk, self.positions, self.metadata)
            for L, vecs in sorted(by_layer.items())
        ]

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
            "format_version": FORMAT_VERSION if self.operation != "add" else 1,
            "keys": [encode_key(k) for k in self.keys],
            "coeffs": {encode_key(k): self.coeffs[k] for k in self.keys},
            "positions": self.positions,
            "conditioning": self.conditioning,
            "operation": self.operation,
            "metadata": self.metadata.to_json_dict(),
        }

    def save(self, path: str | Path) -> list[Path]:
        """Write ``<path>.safetensors`` and ``<path>.json`` (each atomically: on error neither is touched). A
        topic gate an earlier save left at ``path`` is removed, so the path loads back as what was saved."""
        st_path, js_path = _paths(path)
        st_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {encode_key(k): self.vectors[k].contiguous() for k in self.keys}
        text = json.dumps(self.to_json_dict(), indent=2, allow_nan=False) + "\n"
        with atomic_path(st_path) as st_tmp, atomic_path(js_path) as js_tmp:
            save_file(tensors, str(st_tmp), metadata={"format": FORMAT_NAME})
            js_tmp.write_text(text)
        remove_stale_gate(js_path)  # TopicGatedSteering.save moves its new gate in after this
        return [st_path, js_path]

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
        if doc.get("format_version") not in READ_VERSIONS:
            raise InputError(
                f"{js_path}: unsupported format_version {doc.get('format_version')!r}; expected one of {READ_VERSIONS}"
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
                operation=doc.get("operation", "add"),
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
        if self.operation != "add":
            parts.append(f"operation={self.operation!r}")
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
            f"positions={self.positions}, conditioning={self.conditioning}, operation={self.operation}"
        )
        return (
            f"<div><b>{head}</b><table><thead><tr><th>hook</th><th>expert</th><th>coeff</th>"
            f"<th>|v|</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )


def _check_ablatable(vectors: Mapping[SteeringKey, Tensor], conditioning: str) -> None:
    """``operation="ablate"`` needs unconditioned, non-zero vectors; its keys are residual-stream hooks
    (``blocks.L.hook_resid_pre`` …) or one expert's output (``(blocks.L.mlp.hook_expert_out, e)``,
    ``blocks.L.mlp.experts.e.hook_out``), like every steering key."""
    if conditioning != "none":
        raise ValueError(f"operation='ablate' cannot be router-conditioned (conditioning={conditioning!r})")
    for key, v in vectors.items():  # every steerable key is one of the two (check_key)
        if float(v.norm()) == 0.0:
            raise ValueError(
                f"operation='ablate': the vector at {key!r} is zero; there is no direction to ablate"
            )


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


# --------------------------------------------------------------------------- ExpertConditionedAdd


@dataclass
class ExpertConditionedAdd:
    """Router-conditioned addition at one MoE layer: ``h ← h + coeff · Σ_e p_e(x) · r_e``.

    ``p = softmax(router_logits)`` is read at ``blocks.L.mlp.hook_router_logits`` (returned unchanged) and
    used at ``blocks.L.hook_mlp_out`` in the same forward pass. ``vectors`` maps expert id → ``r_e``
    (experts not listed contribute nothing; one entry is the single-expert form ``h + c·p_e·r_e``).
    ``topk=True`` zeroes ``p_e`` for experts the model did not route the token to (read at
    ``hook_expert_indices``: the family's own selection, group limits and correction bias included; no
    renormalisation). ``p`` is the softmax of the logits on every family, sigmoid routers included.
    It is its own intervention and a :class:`~moe_interp.steering.protocol.Steering` object; saving it
    needs ``metadata`` (it is stored as a router-conditioned :class:`SteeringVectors` pair).
    """

    layer: int
    vectors: Mapping[int, Float[Tensor, " d_model"]]
    coeff: float = 1.0
    topk: bool = False
    positions: Any = "all"
    metadata: SteeringMetadata | None = field(default=None, repr=False, compare=False)

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
        R = torch.zeros(model.layers[L].n_experts, d)
        for e, v in self.vectors.items():
            model.check_expert(L, e)
            t = torch.as_tensor(v)
            check_steering_vector(f"expert {e} at layer {L}", t, d)
            R[e] = t.float()
        return R

    def edits(self, model: MoEModel) -> dict[str, EditFn]:
        R = self.stacked(model)
        c, pos = float(self.coeff), self.positions
        state: dict[str, Tensor] = {}

        def read_router(z: Tensor, ctx: HookContext) -> Tensor:
            state["p"] = torch.softmax(z.float(), dim=-1)
            return z

        def read_routed(idx: Tensor, ctx: HookContext) -> Tensor:
            # the model's own selection (group-limited / bias-corrected routers differ from z.topk)
            p = state["p"]
            keep = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, idx.long().to(p.device), True)
            state["p"] = p * keep
            return idx

        def add(h: Tensor, ctx: HookContext) -> Tensor:
            p = state.pop("p", None)
            if p is None:
                raise RuntimeError(f"ExpertConditionedAdd: no router probabilities for layer {self.layer}.")
            m = position_mask(ctx, pos, h)
            if m is None:
                return h
            delta = c * (p @ R.to(p.device))  # [batch, pos, d_model]
            return torch.where(m[..., None], h + delta.to(h.dtype), h)

        L = self.layer
        edits: dict[str, EditFn] = {
            f"blocks.{L}.mlp.hook_router_logits": read_router,
            f"blocks.{L}.hook_mlp_out": add,
        }
        if self.topk:
            edits[f"blocks.{L}.mlp.hook_expert_indices"] = read_routed
        return edits

    # ------------------------------------------------------------ the Steering protocol

    def to_interventions(self, model: MoEModel | None = None) -> list[ExpertConditionedAdd]:
        """``[self]`` (checked against ``model`` first if given)."""
        if model is not None:
            self.check_compatible(model)
        return [self]

    def scaled(self, factor: float) -> ExpertConditionedAdd:
        """Copy with ``coeff`` multiplied by ``factor``."""
        return replace(self, coeff=self.coeff * _coeff("scaled()", factor))

    def check_compatible(self, model: MoEModel) -> None:
        """Raise ``ValueError`` unless the metadata (when set), the layer, the experts and the widths fit."""
        problems = [] if self.metadata is None else model_mismatches(self.metadata, model)
        if problems:
            raise ValueError("expert-conditioned steering does not fit the model: " + "; ".join(problems))
        self.stacked(model)

    def as_vectors(self) -> SteeringVectors:
        """The same edit as a router-conditioned :class:`SteeringVectors` (needs ``metadata``)."""
        if self.metadata is None:
            raise ValueError(
                "ExpertConditionedAdd has no metadata to save with it; "
                "pass metadata=SteeringMetadata.from_model(model)."
            )
        if not _is_scope(self.positions):  # (a scope is a string: positions were checked in __post_init__)
            raise ValueError(f"Only a position scope {POSITION_SCOPES} can be saved, not {self.positions!r}.")
        hook = f"blocks.{self.layer}.mlp.hook_expert_out"
        vectors: dict[SteeringKey, Tensor] = {
            (hook, int(e)): torch.as_tensor(v) for e, v in self.vectors.items()
        }
        conditioning: Conditioning = "router_prob_topk" if self.topk else "router_prob"
        return SteeringVectors(
            vectors, self.metadata, dict.fromkeys(vectors, self.coeff), self.positions, conditioning
        )

    def save(self, path: str | Path) -> list[Path]:
        """Write :meth:`as_vectors` as a ``.safetensors`` + ``.json`` pair."""
        return self.as_vectors().save(path)

    @classmethod
    def load(cls, path: str | Path) -> ExpertConditionedAdd:
        """Read a router-conditioned, single-layer pair (as written by :meth:`save`)."""
        sv = SteeringVectors.load(path)
        if sv.conditioning == "none" or len(sv.layers) != 1:
            raise InputError(
                f"{path}: expected router-conditioned vectors at one layer, got conditioning="
                f"{sv.conditioning!r} at layers {sv.layers}; load it with SteeringVectors.load"
            )
        try:
            (edit,) = sv.to_interventions()
        except NotImplementedError as err:
            raise InputError(f"{path}: {err}") from err
        coeffs = set(sv.coeffs.values())
        if len(coeffs) == 1:  # one shared coefficient: keep vectors and coefficient apart
            edit = replace(edit, vectors={k[1]: sv.vectors[k] for k in sv.keys}, coeff=coeffs.pop())
        return edit
