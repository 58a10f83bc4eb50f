"""File formats of the non-vector steering objects: router steering (``.json``) and the topic gate.

The topic gate is stored as ``<path>.gate.safetensors`` (the ``gate`` vector; ``gate_layer`` and ``threshold``
in its header). Sets saved before that used ``<path>.gate.pt``, which is still read, with
``torch.load(weights_only=True)``. Every reader raises an error naming the file and the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from moe_interp.errors import InputError
from moe_interp.fileio import atomic_path, read_safetensors_with_metadata, read_torch_file

__all__ = [
    "GATE_FORMAT",
    "ROUTER_FORMAT",
    "gate_base",
    "gate_file",
    "check_gate",
    "layer_experts",
    "read_gate",
    "remove_stale_gate",
    "router_json",
    "write_gate",
]

ROUTER_FORMAT = "moe_interp.router_steering"
GATE_FORMAT = "moe_interp.topic_gate"
GATE_SUFFIX, LEGACY_GATE_SUFFIX = ".gate.safetensors", ".gate.pt"


def layer_experts(d: Any, what: str) -> dict[int, tuple[int, ...]]:
    """``{"L": [e, ...]}`` from a router-steering file as ``{L: (e, ...)}``."""
    ok = isinstance(d, dict) and all(
        k.isdigit() and isinstance(v, list) and all(type(e) is int for e in v) for k, v in d.items()
    )
    if not ok:
        raise InputError(f"'{what}' must be an object {{\"layer\": [expert ids]}}, got {d!r:.80}")
    return {int(k): tuple(v) for k, v in d.items()}


def router_json(path: str | Path) -> Path:
    """``<path>.json`` (``path`` itself when it already ends in ``.json``): ``a.v1`` → ``a.v1.json``."""
    p = Path(path)
    return p if p.suffix == ".json" else p.with_name(p.name + ".json")


def check_gate(gate: Any, layer: Any, threshold: Any, where: str = "topic gate") -> None:
    """A 1-D finite floating-point ``gate``, an int ``layer`` ≥ 0 and a finite ``threshold``, or
    :class:`InputError` naming ``where``."""
    ok_gate = (
        isinstance(gate, Tensor)
        and gate.ndim == 1
        and gate.is_floating_point()
        and bool(gate.isfinite().all())
    )
    ok_layer = type(layer) is int and layer >= 0
    ok_threshold = (
        isinstance(threshold, int | float) and not isinstance(threshold, bool) and math.isfinite(threshold)
    )
    if not (ok_gate and ok_layer and ok_threshold):
        got = tuple(gate.shape) if isinstance(gate, Tensor) else type(gate).__name__
        raise InputError(
            f"{where}: 'gate' must be a finite 1-D float tensor (got {got}), 'gate_layer' an int >= 0 (got "
            f"{layer!r}) and 'threshold' a finite number (got {threshold!r})"
        )


def remove_stale_gate(path: str | Path) -> None:
    """Remove a topic gate left at ``path`` by an earlier save, once a plain pair has been saved there."""
    p = gate_base(path)
    for suffix in (GATE_SUFFIX, LEGACY_GATE_SUFFIX):
        p.with_name(p.name + suffix).unlink(missing_ok=True)


def gate_base(path: str | Path) -> Path:
    """``<path>`` without a ``.json`` / ``.safetensors`` suffix: the stem of a topic-gated file set."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def gate_file(path: str | Path) -> Path | None:
    """The gate file of a topic-gated set at ``path`` (``.gate.safetensors``, else legacy ``.gate.pt``)."""
    p = gate_base(path)
    for suffix in (GATE_SUFFIX, LEGACY_GATE_SUFFIX):
        if (f := p.with_name(p.name + suffix)).is_file():
            return f
    return None


@contextmanager
def write_gate(path: str | Path, gate: Tensor, layer: int, threshold: float) -> Iterator[Path]:
    """Write the gate to a temporary file, moved to ``<path>.gate.safetensors`` only when the ``with`` block
    (which saves the steering pair) succeeds; a legacy ``.gate.pt`` beside it is then removed."""
    from safetensors.torch import save_file

    p = gate_base(path)
    meta = {"format": GATE_FORMAT, "gate_layer": str(int(layer)), "threshold": repr(float(threshold))}
    target = p.with_name(p.name + GATE_SUFFIX)
    with atomic_path(target) as tmp:
        save_file({"gate": gate.detach().cpu().contiguous()}, str(tmp), metadata=meta)
        yield target
    p.with_name(p.name + LEGACY_GATE_SUFFIX).unlink(missing_ok=True)


def read_gate(path: str | Path) -> tuple[Tensor, int, float]:
    """``(gate, gate_layer, threshold)`` of the topic-gated set at ``path``."""
    p = gate_base(path)
    new, old = p.with_name(p.name + GATE_SUFFIX), p.with_name(p.name + LEGACY_GATE_SUFFIX)
    g: Any
    if new.is_file():
        tensors, header = read_safetensors_with_metadata(new)
        g, src = {**header, **tensors}, new
    else:
        g, src = read_torch_file(old), old
    if not isinstance(g, dict) or not {"gate", "gate_layer", "threshold"} <= set(g):
        found = sorted(g) if isinstance(g, dict) else type(g).__name__
        raise InputError(f"{src}: expected 'gate', 'gate_layer' and 'threshold', found {found}")
    layer, threshold = g["gate_layer"], g["threshold"]
    if isinstance(layer, str):  # the safetensors header holds strings; a legacy .gate.pt holds numbers
        layer = int(layer) if layer.isdigit() else layer
        try:
            threshold = float(threshold)
        except ValueError:
            pass
    check_gate(g["gate"], layer, threshold, str(src))
    return g["gate"], layer, float(threshold)
