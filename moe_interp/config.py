"""Pipeline configuration: the settings of the refusal-circuit pipeline, as a validated dataclass.

A recipe (``circuits/<model>/config.json``) is one JSON object whose keys are the fields of
:class:`PipelineConfig`; :func:`load_config` reads it and rejects unknown keys and out-of-range values
with an error naming the field and what it expects. Nested sections (``circuit``, ``expected``) are
dataclasses too, validated the same way.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPES",
    "NAMED_MODELS",
    "CircuitSettings",
    "ExpectedGeometry",
    "PipelineConfig",
    "circuit_candidates",
    "load_config",
    "steering_methods",
]

#: dtype names accepted by ``dtype`` (``torch.<name>``).
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def circuit_candidates() -> tuple[str, ...]:
    """Component kinds :func:`moe_interp.circuits.locate_refusal_circuit` accepts (its registry)."""
    from moe_interp.circuits import CANDIDATES

    return tuple(CANDIDATES)


def steering_methods() -> tuple[str, ...]:
    """Steering method names a recipe may list (the keys of the steering registry)."""
    from moe_interp.steering.methods import METHODS

    return tuple(METHODS)


#: model names :func:`moe_interp.load` builds itself (bundled organisms); each runs with ``circuits/<name>/``
NAMED_MODELS: tuple[str, ...] = ("organism", "smollm_moe")
_SOURCE_RE = re.compile(rf"^({'|'.join(NAMED_MODELS)}|tiny:[a-z0-9_]+|[\w.\-]+/[\w.\-]+|[./~].*)$")


def _fail(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"config field {name!r} must be {expected}, got {value!r}.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(float(v))


def _check_int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> None:
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise _fail(name, f"an integer{rng}", v)


def _check_str_list(
    name: str, v: Any, *, allowed: tuple[str, ...] | None = None, nonempty: bool = True
) -> None:
    if not isinstance(v, list | tuple) or not all(isinstance(x, str) and x.strip() for x in v):
        raise _fail(name, "a list of non-empty strings", v)
    if nonempty and not v:
        raise _fail(name, "a non-empty list of strings", v)
    if len(set(v)) != len(v):
        raise _fail(name, "a list without duplicates", v)
    if allowed is not None:
        bad = [x for x in v if x not in allowed]
        if bad:
            raise _fail(name, f"a list drawn from {list(allowed)} (unknown: {bad})", v)


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the list of valid ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}.")
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {where}. Valid keys: {', '.join(valid)}.")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"Missing key(s) {missing} in {where}. Required keys: {', '.join(required)}.")
    return cls(**data)


@dataclass
class CircuitSettings:
    """How the circuit is grown and tested.

    ``target_fraction``: fraction of the clean-vs-ablated refusal-score gap the circuit must recover;
    ``n_random_draws``: random same-size component sets drawn for the faithfulness baseline;
    ``candidates``: component kinds considered (see :func:`circuit_candidates`).
    """

    target_fraction: float = 0.8
    n_random_draws: int = 20
    #: "greedy" forward selection or "prefix" of the effect ranking (see locate_refusal_circuit)
    selection: str = "greedy"
    candidates: list[str] = field(default_factory=lambda: list(circuit_candidates()))
    #: replace each whole-layer component by the single head / expert of that layer that keeps the target
    #: (planted-organism benchmark: whole layers otherwise tie with the plant they contain; docs/circuit.md)
    refine: bool = True
    #: greedy selection considers only the ``pool`` best-ranked components (``null``: all of them); on a
    #: 30-layer model each greedy step over all ~180 candidates costs minutes, over the top 16 one batch
    pool: int | None = None

    def __post_init__(self) -> None:
        if not _is_num(self.target_fraction) or not 0 < self.target_fraction <= 1:
            raise _fail("circuit.target_fraction", "a number in (0, 1]", self.target_fraction)
        _check_int("circuit.n_random_draws", self.n_random_draws, lo=1)
        if self.selection not in ("greedy", "prefix"):
            raise _fail("circuit.selection", "'greedy' or 'prefix'", self.selection)
        _check_str_list("circuit.candidates", self.candidates, allowed=circuit_candidates())
        if not isinstance(self.refine, bool):
            raise _fail("circuit.refine", "true or false", self.refine)
        if self.pool is not None:
            _check_int("circuit.pool", self.pool, lo=1)
        self.candidates = list(self.candidates)


@dataclass
class ExpectedGeometry:
    """Published geometry of a checkpoint (informational; used by ``moe-interp plan`` without the hub).

    Parameter counts are absolute numbers (``6.9e9``); ``n_moe_layers`` counts layers with routed experts;
    ``d_expert`` is one routed expert's intermediate size; ``d_shared`` the total intermediate size of the
    shared expert(s) (0 if none); ``d_dense`` the intermediate size of dense (non-MoE) layers (0 if none).
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    vocab_size: int
    n_experts: int
    top_k: int
    n_moe_layers: int
    d_expert: int
    total_params: float
    active_params: float
    n_shared_experts: int = 0
    d_shared: int = 0
    d_dense: int = 0
    attention: str = "gqa"
    max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "vocab_size", "d_expert"):
            _check_int(f"expected.{name}", getattr(self, name), lo=1)
        for name in ("n_experts", "top_k", "n_moe_layers", "n_shared_experts", "d_shared", "d_dense"):
            _check_int(f"expected.{name}", getattr(self, name), lo=0)
        if self.top_k > self.n_experts:
            raise _fail("expected.top_k", f"<= expected.n_experts ({self.n_experts})", self.top_k)
        if self.n_moe_layers > self.n_layers:
            raise _fail("expected.n_moe_layers", f"<= expected.n_layers ({self.n_layers})", self.n_moe_layers)
        if self.n_heads % self.n_kv_heads:
            raise _fail("expected.n_kv_heads", f"a divisor of n_heads ({self.n_heads})", self.n_kv_heads)
        for name in ("total_params", "active_params"):
            v = getattr(self, name)
            if not _is_num(v) or v <= 0:
                raise _fail(f"expected.{name}", "a positive number of parameters", v)
        if self.active_params > self.total_params:
            raise _fail(
                "expected.active_params", f"<= total_params ({self.total_params:g})", self.active_params
            )
        if self.attention not in ("mha", "gqa", "mla"):
            raise _fail("expected.attention", "one of 'mha', 'gqa', 'mla'", self.attention)
        if self.max_position_embeddings is not None:
            _check_int("expected.max_position_embeddings", self.max_position_embeddings, lo=1)

    @property
    def n_shared(self) -> int:
        return self.n_shared_experts


@dataclass
class PipelineConfig:
    """Settings of the refusal-circuit pipeline (one recipe per model under ``circuits/``).

    ``layers`` is a half-open ``[start, stop)`` range of candidate layers for refusal directions;
    ``positions`` are negative post-instruction offsets (``[-5, ..., -1]``: the chat template's tokens after
    the instruction; prompts are left padded so they align across prompts). ``refusal_phrases`` give the
    first tokens of the logit refusal score. ``memory`` and ``expected`` are informational.
    """

    model: str
    family: str | None = None
    name: str = ""
    dtype: str = "bfloat16"
    device_map: str | None = None
    chat_template: str | None = None
    chat_template_notes: str = ""
    post_instruction_tokens: int | None = None
    refusal_phrases: list[str] = field(default_factory=lambda: ["I'm sorry", "I cannot", "I can't"])
    layers: list[int] | None = None
    positions: list[int] = field(default_factory=lambda: [-5, -4, -3, -2, -1])
    n_train: int = 128
    n_val: int = 32
    n_test: int = 100
    #: training prompts per class that gated steering methods fit their harm gate on (``None``: ``n_train``);
    #: the first ``n_train`` are the steering's own. A gate is a read-out in ``d_model`` dimensions: it needs
    #: more prompts than a difference of means to stay closed on harmless prompts.
    n_gate_train: int | None = None
    batch_size: int = 16
    kl_threshold: float = 0.1
    #: each steering strength search keeps the steered harmful completions' mean distinct-2 at least this
    #: share of the unedited model's on harmless prompts (``None``: no check); see
    #: :func:`~moe_interp.steering.autotune.search_candidates`. A gated edit's harmless KL is ~0 whatever its
    #: strength, so without it the search grows the strength until refusal is gone, even into loops.
    distinct2_floor: float | None = None
    prune_last_frac: float = 0.2
    #: "exhaustive": activation-patch every resid position, head and expert, sweep every expert;
    #: "attribution": attribution patching ranks them all (one forward + backward) and only the
    #: ``patching_top_n`` experts ranked highest by ablation attribution are swept exhaustively
    patching: str = "exhaustive"
    patching_top_n: int = 16
    circuit: CircuitSettings = field(default_factory=CircuitSettings)
    steering_methods: list[str] = field(
        default_factory=lambda: ["dense", "routing_experts", "expert_conditioned", "steer_router"]
    )
    #: per-method keyword arguments for the fit function (e.g. {"expert_conditioned": {"top_n": 8}})
    steering_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_new_tokens: int = 64
    seed: int = 0
    memory: dict[str, Any] = field(default_factory=dict)
    expected: ExpectedGeometry | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.circuit, dict):
            self.circuit = _from_dict(CircuitSettings, self.circuit, "config section 'circuit'")
        if isinstance(self.expected, dict):
            self.expected = _from_dict(ExpectedGeometry, self.expected, "config section 'expected'")
        # each field's validator returns its normal form (lists for tuples, None for an empty family)
        for name, check in _FIELD_VALIDATORS:
            setattr(self, name, check(getattr(self, name), self))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value is out of range (changes nothing)."""
        for name, check in _FIELD_VALIDATORS:
            check(getattr(self, name), self)

    # ------------------------------------------------------------------------------------------ helpers
    def layer_range(self, n_layers: int) -> list[int]:
        """Candidate layers for a model of ``n_layers`` layers (``layers`` scaled if the depth differs)."""
        if self.layers is None:
            return list(range(n_layers))
        start, stop = self.layers
        depth = self.expected.n_layers if self.expected is not None else None
        if depth is not None and depth != n_layers:
            start = min(int(start * n_layers / depth), n_layers - 1)
            stop = max(min(math.ceil(stop * n_layers / depth), n_layers), start + 1)
        if stop > n_layers:
            raise ValueError(f"config layers {self.layers} exceed the model's {n_layers} layers.")
        return list(range(start, stop))

    def torch_dtype(self) -> Any:
        """``torch.<dtype>``."""
        import torch

        return getattr(torch, self.dtype)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`moe_interp.load`: dtype, and where the model goes when
        ``device_map`` is set. A hub or local model gets ``device_map`` (accelerate may split it); a bundled
        one (``tiny:*``, a named organism) is small and moves whole to one ``device``: ``"auto"`` and the other
        accelerate strategies mean the first GPU when there is one, else the CPU."""
        kw: dict[str, Any] = {"dtype": self.torch_dtype()}
        if self.device_map is None:
            return kw
        if self.model.startswith("tiny:") or self.model in NAMED_MODELS:
            kw["device"] = one_device(self.device_map)
        else:
            kw["device_map"] = self.device_map
        return kw

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (round-trips through :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> PipelineConfig:
        """Build and validate from a mapping; unknown keys are an error listing the valid ones."""
        return _from_dict(cls, data, "pipeline config")

    def save(self, path: str | Path) -> Path:
        """Write the config as indented JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


# ---------------------------------------------------------------------------------- field validators
# One function per field of PipelineConfig: ``check(value, config) -> normalised value`` raising
# ``ValueError`` naming the field and what it accepts. Fields whose range depends on another field read it
# from ``config`` (validated earlier in the table's order).


def _v_model(v: Any, c: PipelineConfig) -> str:
    if not isinstance(v, str) or not _SOURCE_RE.match(v):
        raise _fail(
            "model", "'organism', 'smollm_moe', 'tiny:<family>', an HF id 'org/name' or a local path", v
        )
    return v


def _v_family(v: Any, c: PipelineConfig) -> str | None:
    from moe_interp.families import get_family

    if v is None or v == "":
        return None  # inferred from the loaded model
    if not isinstance(v, str):
        raise _fail("family", "null (inferred) or an HF model_type string", v)
    try:
        get_family(v)
    except ValueError as e:
        raise ValueError(f"config field 'family': {e}") from None
    if c.model.startswith("tiny:") and c.model.split(":", 1)[1] != v:
        raise _fail("family", f"{c.model.split(':', 1)[1]!r} (the family of model {c.model!r})", v)
    return v


def _v_text(name: str) -> Callable[[Any, PipelineConfig], str]:
    def check(v: Any, c: PipelineConfig) -> str:
        if not isinstance(v, str):
            raise _fail(name, "a string", v)
        return v

    return check


def _v_dtype(v: Any, c: PipelineConfig) -> str:
    if v not in DTYPES:
        raise _fail("dtype", f"one of {list(DTYPES)}", v)
    return str(v)


#: accelerate's placement strategies: a bundled model, moved whole, takes them as "the first GPU, else the CPU"
DEVICE_STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")


def _parse_device(device_map: str) -> Any:
    """``device_map`` as a torch device (``None`` for a strategy); a ValueError naming what is accepted."""
    import torch

    if device_map in DEVICE_STRATEGIES:
        return None
    try:
        return torch.device(device_map)
    except RuntimeError as err:
        raise _fail(
            "device_map", f"one of {list(DEVICE_STRATEGIES)} or a device such as 'cpu', 'cuda:0'", device_map
        ) from err


def one_device(device_map: str) -> str:
    """The single device a bundled model moves to for ``device_map`` (a strategy, or a device such as
    ``"cuda:0"``) on this machine; a ValueError when it is neither, or is a GPU this machine lacks. (Reading a
    config checks only the form, so a config written for a GPU can be planned on a CPU machine.)"""
    import torch

    from moe_interp.organisms import check_device

    if _parse_device(device_map) is None:  # a strategy
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device_map)  # present on this machine
    return device_map


def _v_device_map(v: Any, c: PipelineConfig) -> str | None:
    if v is not None and not isinstance(v, str):
        raise _fail("device_map", "null or a string such as 'auto', 'cpu', 'cuda'", v)
    if v is not None and (c.model.startswith("tiny:") or c.model in NAMED_MODELS):
        _parse_device(v)  # a bundled model moves whole to one device; whether this machine has it: at load
    return v


def _v_chat_template(v: Any, c: PipelineConfig) -> str | None:
    if v is not None and (not isinstance(v, str) or not v):
        raise _fail("chat_template", "null (the tokenizer's template) or a non-empty Jinja string", v)
    return v


def _v_n_gate_train(v: Any, c: PipelineConfig) -> int | None:
    if v is not None and (not _is_int(v) or v < c.n_train):
        raise _fail("n_gate_train", f"an integer >= n_train ({c.n_train}), or null (the n_train prompts)", v)
    return v


def _v_post_instruction_tokens(v: Any, c: PipelineConfig) -> int | None:
    if v is not None:
        _check_int("post_instruction_tokens", v, lo=1)
    return v


def _v_str_list(name: str, allowed: Callable[[], tuple[str, ...]] | None = None) -> Callable[..., list[str]]:
    def check(v: Any, c: PipelineConfig) -> list[str]:
        _check_str_list(name, v, allowed=allowed() if allowed is not None else None)
        return list(v)

    return check


def _v_layers(v: Any, c: PipelineConfig) -> list[int] | None:
    if v is None:
        return None
    ok = isinstance(v, list | tuple) and len(v) == 2 and all(_is_int(x) for x in v) and 0 <= v[0] < v[1]
    if not ok:
        raise _fail("layers", "null (all layers) or [start, stop] with 0 <= start < stop", v)
    if c.expected is not None and v[1] > c.expected.n_layers:
        raise _fail("layers", f"a range within the model's {c.expected.n_layers} layers", v)
    return list(v)


def _v_positions(v: Any, c: PipelineConfig) -> list[int]:
    if (
        not isinstance(v, list | tuple)
        or not v
        or not all(_is_int(p) and p < 0 for p in v)
        or len(set(v)) != len(v)
    ):
        raise _fail(
            "positions", "a non-empty list of distinct negative offsets such as [-5, -4, -3, -2, -1]", v
        )
    n = c.post_instruction_tokens
    if n is not None and min(v) < -n:
        raise _fail("positions", f"offsets within the {n} post-instruction tokens (>= {-n})", v)
    return list(v)


def _v_int(name: str, lo: int) -> Callable[[Any, PipelineConfig], int]:
    def check(v: Any, c: PipelineConfig) -> int:
        _check_int(name, v, lo=lo)
        return int(v)

    return check


def _v_kl_threshold(v: Any, c: PipelineConfig) -> float:
    if not _is_num(v) or v <= 0:
        raise _fail("kl_threshold", "a positive number (nats)", v)
    return v


def _v_distinct2_floor(v: Any, c: PipelineConfig) -> float | None:
    if v is not None and (not _is_num(v) or not 0 < v <= 1):
        raise _fail(
            "distinct2_floor", "a share in (0, 1] of the unedited model's distinct-2, or null (no check)", v
        )
    return v


def _v_prune_last_frac(v: Any, c: PipelineConfig) -> float:
    if not _is_num(v) or not 0 <= v < 1:
        raise _fail("prune_last_frac", "a number in [0, 1)", v)
    return v


def _v_patching(v: Any, c: PipelineConfig) -> str:
    if v not in ("exhaustive", "attribution"):
        raise _fail("patching", "'exhaustive' or 'attribution'", v)
    return str(v)


def _v_steering_kwargs(v: Any, c: PipelineConfig) -> dict[str, dict[str, Any]]:
    if not isinstance(v, dict) or not all(isinstance(x, dict) for x in v.values()):
        raise _fail("steering_kwargs", "a mapping of method name -> keyword arguments", v)
    unknown = sorted(set(v) - set(c.steering_methods))
    if unknown:
        raise _fail("steering_kwargs", f"keys among steering_methods {list(c.steering_methods)}", unknown)
    from moe_interp.steering.registry import method_spec

    for name, kw in v.items():
        try:
            method_spec(name).check_kwargs(kw)
        except ValueError as err:
            raise ValueError(f"config field 'steering_kwargs': {err}") from None
    return v


def _v_memory(v: Any, c: PipelineConfig) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _fail("memory", "an object of informational notes (string keys)", v)
    for k, x in v.items():
        if (k.endswith("_gb") or "_gb_" in k) and (not _is_num(x) or x < 0):
            raise _fail(f"memory.{k}", "a non-negative number of GB", x)
    return v


#: (field, validator) in checking order; ``circuit`` and ``expected`` validate themselves on construction.
_FIELD_VALIDATORS: tuple[tuple[str, Callable[[Any, PipelineConfig], Any]], ...] = (
    ("model", _v_model),
    ("family", _v_family),
    ("name", _v_text("name")),
    ("chat_template_notes", _v_text("chat_template_notes")),
    ("notes", _v_text("notes")),
    ("dtype", _v_dtype),
    ("device_map", _v_device_map),
    ("chat_template", _v_chat_template),
    ("post_instruction_tokens", _v_post_instruction_tokens),
    ("refusal_phrases", _v_str_list("refusal_phrases")),
    ("layers", _v_layers),
    ("positions", _v_positions),
    ("n_train", _v_int("n_train", 1)),
    ("n_val", _v_int("n_val", 1)),
    ("n_test", _v_int("n_test", 1)),
    ("n_gate_train", _v_n_gate_train),
    ("batch_size", _v_int("batch_size", 1)),
    ("max_new_tokens", _v_int("max_new_tokens", 1)),
    ("seed", _v_int("seed", 0)),
    ("kl_threshold", _v_kl_threshold),
    ("distinct2_floor", _v_distinct2_floor),
    ("prune_last_frac", _v_prune_last_frac),
    ("patching", _v_patching),
    ("patching_top_n", _v_int("patching_top_n", 1)),
    ("steering_methods", _v_str_list("steering_methods", steering_methods)),
    ("steering_kwargs", _v_steering_kwargs),
    ("memory", _v_memory),
)


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline config JSON file (a recipe folder means its ``config.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"No pipeline config at {path}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        return PipelineConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
