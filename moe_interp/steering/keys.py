"""Steering keys ``(hook_name, expert)``: which hook points can be steered, and how keys are written and sorted.

Hook names are those of :mod:`moe_interp.hooks` (the one grammar); this module only says which of its sites
take a steering vector (``L`` = block index, ``e`` = expert id):

* ``blocks.L.hook_resid_pre``, ``blocks.L.hook_resid_post``, ``blocks.L.hook_attn_out``,
  ``blocks.L.hook_mlp_out`` - key expert must be ``None``; value ``[batch, pos, d_model]``.
* ``blocks.L.mlp.hook_expert_out`` - key expert must be an expert id; value
  ``[batch, pos, n_experts, d_model]``; only expert ``e``'s slice is edited.
* ``blocks.L.mlp.experts.e.hook_out`` - key expert must be ``None`` (the id is in the name); value
  ``[batch, pos, d_model]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from moe_interp.hooks import parse_hook

__all__ = [
    "EXPERT_SEP",
    "STEERABLE_SITES",
    "ParsedHook",
    "SteeringKey",
    "check_key",
    "decode_key",
    "encode_key",
    "hook_sort_key",
    "key_layer_expert",
    "key_sort_key",
    "parse_hook_name",
]

SteeringKey = tuple[str, int | None]
"""``(hook_name, expert)``; ``expert`` is only set for ``blocks.L.mlp.hook_expert_out``."""

HookKind = Literal["resid_pre", "resid_post", "attn_out", "mlp_out", "expert_out", "single_expert_out"]

#: Sites of the :mod:`moe_interp.hooks` grammar that take a steering vector, and their kind.
STEERABLE_SITES: dict[str, HookKind] = {
    "hook_resid_pre": "resid_pre",
    "hook_attn_out": "attn_out",
    "mlp.hook_expert_out": "expert_out",
    "mlp.experts.{e}.hook_out": "single_expert_out",
    "hook_mlp_out": "mlp_out",
    "hook_resid_post": "resid_post",
}
_KIND_ORDER = {kind: i for i, kind in enumerate(STEERABLE_SITES.values())}

EXPERT_SEP = "@e"


@dataclass(frozen=True)
class ParsedHook:
    """A steerable hook name: its block, kind and (for ``mlp.experts.e.hook_out``) the expert in the name."""

    layer: int
    kind: HookKind
    expert_in_name: int | None = None

    @property
    def is_residual(self) -> bool:
        """True for ``hook_resid_pre`` / ``hook_resid_post``."""
        return self.kind in ("resid_pre", "resid_post")


def parse_hook_name(hook_name: str) -> ParsedHook:
    """Parse a steerable hook name with :func:`moe_interp.hooks.parse_hook`; ``ValueError`` for anything else."""
    if not isinstance(hook_name, str):
        raise ValueError(f"hook name must be a str, got {type(hook_name).__name__}: {hook_name!r}")
    try:
        parsed = parse_hook(hook_name)
    except ValueError:
        parsed = None
    kind = None if parsed is None or parsed.layer is None else STEERABLE_SITES.get(parsed.site)
    if parsed is None or parsed.layer is None or kind is None:
        raise ValueError(
            f"unsupported hook name {hook_name!r}; expected one of blocks.L.hook_resid_pre, "
            "blocks.L.hook_resid_post, blocks.L.hook_attn_out, blocks.L.hook_mlp_out, "
            "blocks.L.mlp.hook_expert_out (with an expert id), blocks.L.mlp.experts.E.hook_out"
        )
    return ParsedHook(parsed.layer, kind, parsed.expert)


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


def key_layer_expert(key: SteeringKey) -> tuple[int, int | None]:
    """``(layer, expert)`` of a key (the expert from the key or from the hook name, else None)."""
    parsed = parse_hook_name(key[0])
    return parsed.layer, key[1] if key[1] is not None else parsed.expert_in_name


def check_key(key: Any, n_layers: int, n_experts: int | None) -> SteeringKey:
    """A valid key for a model with ``n_layers`` blocks and ``n_experts`` experts (None: dense), or ValueError."""
    if not (isinstance(key, tuple) and len(key) == 2):
        raise ValueError(f"steering key must be a (hook_name, expert) tuple, got {key!r}")
    hook_name, expert = key
    parsed = parse_hook_name(hook_name)
    if expert is not None and (isinstance(expert, bool) or not isinstance(expert, int)):
        raise ValueError(f"expert id in {key!r} must be an int or None")
    if not 0 <= parsed.layer < n_layers:
        raise ValueError(f"{hook_name}: layer {parsed.layer} out of range for n_layers={n_layers}")
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
        if n_experts is None:
            raise ValueError(f"{key!r} names expert {e} but metadata.n_experts is None (dense model)")
        if not 0 <= e < n_experts:
            raise ValueError(f"{key!r}: expert {e} out of range, expected 0 <= e < n_experts={n_experts}")
    return (hook_name, expert)


def hook_sort_key(hook_name: str) -> tuple[int, int, int]:
    """Sort hook names by layer, then execution order within the block, then expert."""
    p = parse_hook_name(hook_name)
    return (p.layer, _KIND_ORDER[p.kind], -1 if p.expert_in_name is None else p.expert_in_name)


def key_sort_key(key: SteeringKey) -> tuple[int, int, int, int]:
    """Sort keys like :func:`hook_sort_key`, then by the key's expert."""
    return (*hook_sort_key(key[0]), -1 if key[1] is None else key[1])
