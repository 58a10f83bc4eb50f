"""The hook-name vocabulary: one grammar, used by the adapter, the analysis code, the CLI and figure titles.

Names follow TransformerLens: ``hook_embed``, ``blocks.{L}.hook_resid_pre``, ``blocks.{L}.attn.hook_z``,
``blocks.{L}.mlp.hook_expert_indices``, ``blocks.{L}.mlp.experts.{e}.hook_out`` ...
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from moe_interp.errors import InputError

#: Per-block sites and the layout of their tensors (documentation and `inspect` output).
BLOCK_SITES: dict[str, str] = {
    "hook_resid_pre": "[batch, pos, d_model] residual stream entering the block",
    "hook_resid_mid": "[batch, pos, d_model] residual stream after attention",
    "hook_resid_post": "[batch, pos, d_model] residual stream leaving the block",
    "hook_attn_out": "[batch, pos, d_model] attention (or linear-attention) output added to the residual",
    "hook_mlp_out": "[batch, pos, d_model] MLP / MoE block output added to the residual",
    "attn.hook_q": "[batch, pos, n_heads, d_head] query projection (before RoPE / norms)",
    "attn.hook_k": "[batch, pos, n_kv_heads, d_head] key projection (before RoPE / norms)",
    "attn.hook_v": "[batch, pos, n_kv_heads, d_head] value projection",
    "attn.hook_z": "[batch, pos, n_heads, d_head_v] per-head attention output (input of o_proj)",
    "attn.hook_result": "[batch, pos, n_heads, d_model] each head's contribution to attn_out (no bias)",
    "attn.hook_pattern": "[batch, n_heads, query_pos, key_pos] attention probabilities (read-only)",
    "mlp.hook_router_logits": "[batch, pos, n_experts] router logits; edits re-run the routing function",
    "mlp.hook_expert_indices": "[batch, pos, top_k] selected experts (read-only in Llama 4)",
    "mlp.hook_expert_weights": "[batch, pos, n_experts] routing weights, zero where not selected",
    "mlp.hook_expert_out": "[batch, pos, n_experts, d_model] each expert's weighted contribution",
    "mlp.hook_topk_expert_out": "[batch, pos, top_k, d_model] sparse form of hook_expert_out (read-only)",
    "mlp.hook_shared_out": "[batch, pos, d_model] shared-expert contribution (after its gate)",
    "mlp.experts.{e}.hook_out": "[batch, pos, d_model] expert e's weighted contribution",
}

GLOBAL_SITES: dict[str, str] = {
    "hook_embed": "[batch, pos, d_model] token embeddings",
    "ln_final.hook_normalized": "[batch, pos, d_model] final norm output",
}

#: Sites that are exposed for reading only in every family (writing them could not change the forward), with
#: what to edit instead. Families add their own (:attr:`moe_interp.families.FamilySpec.read_only_sites`).
READ_ONLY_SITES: Mapping[str, str] = MappingProxyType(
    {
        "attn.hook_pattern": "attention output is computed before its pattern is exposed: edit attn.hook_z",
        "mlp.hook_topk_expert_out": "a sparse view of hook_expert_out: edit mlp.hook_expert_out",
    }
)

_BLOCK_RE = re.compile(r"blocks\.(0|[1-9][0-9]*)\.(.+)", re.ASCII)
_EXPERT_RE = re.compile(r"mlp\.experts\.(0|[1-9][0-9]*)\.hook_out", re.ASCII)


@dataclass(frozen=True)
class HookName:
    """A parsed hook name: ``layer`` (None for global hooks), ``site`` and, for per-expert hooks, ``expert``."""

    layer: int | None
    site: str
    expert: int | None = None

    def __str__(self) -> str:
        return format_hook(self.layer, self.site, self.expert)


def format_hook(layer: int | None, site: str, expert: int | None = None) -> str:
    """Inverse of :func:`parse_hook`."""
    if layer is None:
        return site
    if expert is not None:
        return f"blocks.{layer}.mlp.experts.{expert}.hook_out"
    return f"blocks.{layer}.{site}"


def parse_hook(name: str) -> HookName:
    """Parse a hook name; raise ``ValueError`` for names outside the grammar."""
    if not isinstance(name, str):
        raise ValueError(f"Hook names are strings like 'blocks.0.hook_resid_pre', got {type(name).__name__}.")
    if name in GLOBAL_SITES:
        return HookName(None, name)
    m = _BLOCK_RE.fullmatch(name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        em = _EXPERT_RE.fullmatch(rest)
        if em:
            return HookName(layer, "mlp.experts.{e}.hook_out", int(em.group(1)))
        if rest in BLOCK_SITES and "{e}" not in rest:
            return HookName(layer, rest)
    raise ValueError(f"{name!r} is not a moe-interp hook name. {_grammar_hint()}")


def _grammar_hint() -> str:
    sites = ", ".join(BLOCK_SITES)
    return f"Valid forms: {', '.join(GLOBAL_SITES)}, or blocks.<layer>.<site> with <site> one of: {sites}."


def closest_names(name: str, valid: list[str], n: int = 5) -> list[str]:
    """The valid names closest to ``name`` (for error messages)."""
    return difflib.get_close_matches(name, valid, n=n, cutoff=0.5)


def validate_names(names: list[str] | tuple[str, ...], valid: set[str], valid_sorted: list[str]) -> list[str]:
    """Check every name is a hook point of this model; raise with the closest valid names if not."""
    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"Hook names must be strings, got {type(name).__name__}: {name!r}.")
        if name not in valid:
            close = closest_names(name, valid_sorted)
            hint = f" Closest valid names: {', '.join(close)}." if close else ""
            raise ValueError(f"Unknown hook name {name!r} for this model.{hint}")
        out.append(name)
    return out


def check_writable(names: Iterable[str], read_only: Mapping[str, str] = READ_ONLY_SITES) -> None:
    """Raise :class:`~moe_interp.errors.InputError` if an edit targets a read-only site (before anything runs)."""
    for name in names:
        for site, instead in read_only.items():
            if name.endswith("." + site):
                ro = ", ".join(f"*.{s}" for s in read_only)
                raise InputError(
                    f"{name} is read-only ({instead}); every other hook is writable (read-only: {ro})."
                )
