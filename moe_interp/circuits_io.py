"""Validation of saved circuits (``circuit.json``): every field :meth:`Circuit.load` and ``--ablate`` use.

A hand-edited or truncated file is refused with an error naming the file and the field, and a circuit whose
components name hooks (layers, heads, experts) the model lacks is refused before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from moe_interp.errors import InputError

if TYPE_CHECKING:
    from moe_interp.circuits import Circuit
    from moe_interp.model import MoEModel

__all__ = ["check_circuit_dict", "check_circuit_fits", "component_hook_name"]

#: component kind -> (hook name pattern, index field)
KINDS: dict[str, tuple[str, str | None]] = {
    "head": ("blocks.{layer}.attn.hook_z", "head"),
    "expert": ("blocks.{layer}.mlp.experts.{idx}.hook_out", "expert"),
    "attn": ("blocks.{layer}.hook_attn_out", None),
    "mlp": ("blocks.{layer}.hook_mlp_out", None),
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def component_hook_name(c: dict[str, Any]) -> str:
    """The ``name`` a component of this kind, layer and index has in a saved circuit."""
    pattern, field = KINDS[c["kind"]]
    return pattern.format(layer=c["layer"], idx=c.get(field) if field else None)


def _check_component(c: Any, i: int, p: Path) -> None:
    where = f"{p}: components[{i}]"
    if not isinstance(c, dict):
        raise InputError(f"{where} is a {type(c).__name__}; expected an object with kind, layer and name.")
    if c.get("kind") not in KINDS:
        raise InputError(f"{where}: 'kind' is {c.get('kind')!r}; expected one of {sorted(KINDS)}.")
    field = KINDS[c["kind"]][1]
    for k in ("layer", *([field] if field else [])):
        if not _is_int(c.get(k)) or c[k] < 0:
            raise InputError(f"{where}: {k!r} must be a non-negative int, got {c.get(k)!r}.")
    if c.get("name") != component_hook_name(c):
        raise InputError(
            f"{where}: 'name' is {c.get('name')!r}; a {c['kind']} there is {component_hook_name(c)!r}."
        )


def check_circuit_dict(d: dict[str, Any], p: Path) -> None:
    """Raise ``InputError`` naming ``p`` and the field unless ``d`` has the shape :meth:`Circuit.save` writes."""
    missing = {"components", "faithfulness", "metadata"} - set(d)
    if missing:
        raise InputError(f"{p} is not a saved Circuit (missing {sorted(missing)}).")
    if not isinstance(d["components"], list):
        raise InputError(f"{p}: 'components' must be a list, got {type(d['components']).__name__}.")
    for i, c in enumerate(d["components"]):
        _check_component(c, i, p)
    for k in ("faithfulness", "metadata"):
        if not isinstance(d[k], dict):
            raise InputError(f"{p}: {k!r} must be an object, got {type(d[k]).__name__}.")
    pos = d["metadata"].get("positions")
    if (
        not isinstance(pos, list)
        or not pos
        or not all(_is_int(x) and x < 0 for x in pos)
        or len(set(pos)) < len(pos)
    ):
        raise InputError(
            f"{p}: 'metadata.positions' must be a non-empty list of distinct negative token offsets "
            f"(e.g. [-4, -3, -2, -1]), got {pos!r}."
        )
    means = d.get("means", {})
    if not isinstance(means, dict):
        raise InputError(
            f"{p}: 'means' must be an object {{component: [[...]]}}, got {type(means).__name__}."
        )
    for k, v in means.items():
        try:
            t = torch.tensor(v, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"{p}: 'means[{k!r}]' is not a rectangular list of numbers ({err}).") from err
        if t.ndim < 2 or t.shape[0] != len(pos) or not bool(torch.isfinite(t).all()):
            raise InputError(
                f"{p}: 'means[{k!r}]' must be finite with one row per position ({len(pos)}), "
                f"got shape {tuple(t.shape)}."
            )


def check_circuit_fits(circuit: Circuit, model: MoEModel, p: Path) -> None:
    """Raise ``InputError`` naming ``p`` unless every component's hook, index and mean fit ``model``."""
    from moe_interp.circuits import _key, _site

    names = set(model.hook_names())
    problems: list[str] = []
    for c in circuit.components:
        hook, idx = _site(c)
        L = c["layer"]
        if hook not in names:
            problems.append(f"{_key(c)} (no hook {hook})")
        elif c["kind"] == "head" and idx >= model.layers[L].n_heads:
            problems.append(f"{_key(c)} (layer {L} has {model.layers[L].n_heads} heads)")
        elif c["kind"] == "expert" and idx >= model.layers[L].n_experts:
            problems.append(f"{_key(c)} (layer {L} has {model.layers[L].n_experts} experts)")
        else:
            mean: Tensor | None = circuit.means.get(_key(c))
            if mean is not None and c["kind"] != "head" and mean.shape[-1] != model.spec.d_model:
                problems.append(f"{_key(c)} (mean width {mean.shape[-1]}, d_model {model.spec.d_model})")
    if problems:
        raise InputError(
            f"{p}: the circuit names components this model ({model.spec.family}, {model.spec.n_layers} layers) "
            f"lacks: {', '.join(problems[:5])}{' …' if len(problems) > 5 else ''}."
        )
