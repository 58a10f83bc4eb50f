"""TransformerLens' TransformerBridge as an oracle: every hook both define must hold the same values.

The bridge wraps its own copy of the tiny model (``mi.load`` is seeded, so both copies are identical).
Names and layouts differ in places; :data:`NAME_MAP` converts.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import moe_interp as mi
from tests.conftest import FAMILIES, PROMPTS

ATOL = 1e-5


Pair = tuple[Tensor, Tensor]
Convert = Callable[[Tensor, Tensor, Any], Pair]


def _same(ours: Tensor, theirs: Tensor, model: Any) -> Pair:
    return ours, theirs


def _reshape(ours: Tensor, theirs: Tensor, model: Any) -> Pair:
    """Same memory layout, different head split (the bridge splits Qwen3-Next's gated q_proj output as
    2 * n_heads heads and MLA's hook_z by qk head size); a transposition would still fail."""
    return ours, theirs.reshape(ours.shape)


def _flat_to_bp(ours: Tensor, theirs: Tensor, model: Any) -> Pair:
    """The bridge's router hooks are ``[batch * pos, ...]``; ours are ``[batch, pos, ...]``."""
    return ours, theirs.reshape(ours.shape[0], ours.shape[1], *theirs.shape[1:])


def _indices(ours: Tensor, theirs: Tensor, model: Any) -> Pair:
    """Same set of experts per token (top-k order is not part of the contract)."""
    ours, theirs = _flat_to_bp(ours, theirs, model)
    return ours.sort(-1).values, theirs.sort(-1).values


def _mla_q(ours: Tensor, theirs: Tensor, model: Any) -> Pair:
    """MLA: the bridge's hook_q is ``[batch, head, pos, d]`` with RoPE applied to the rope part; ours is
    before RoPE, so only the non-rotary part is comparable."""
    nope = model.hf_model.config.qk_nope_head_dim
    return ours[..., :nope], theirs.transpose(1, 2)[..., :nope]


#: our site -> (bridge site candidates, conversion). Sites are relative to ``blocks.{L}.``.
NAME_MAP: dict[str, tuple[tuple[str, ...], Convert]] = {
    "hook_resid_pre": (("hook_resid_pre",), _same),
    "hook_resid_mid": (("hook_resid_mid",), _same),
    "hook_resid_post": (("hook_resid_post",), _same),
    "hook_attn_out": (("hook_attn_out",), _same),
    "hook_mlp_out": (("hook_mlp_out",), _same),
    "attn.hook_q": (("attn.hook_q",), _reshape),
    "attn.hook_k": (("attn.hook_k",), _same),
    "attn.hook_v": (("attn.hook_v",), _same),
    "attn.hook_z": (("attn.hook_z",), _reshape),
    "attn.hook_pattern": (("attn.hook_pattern",), _same),
    "mlp.hook_router_logits": (("mlp.gate.hook_out", "mlp.router.hook_out"), _flat_to_bp),
    "mlp.hook_expert_weights": (("mlp.hook_expert_weights",), _flat_to_bp),
    "mlp.hook_expert_indices": (("mlp.hook_expert_indices",), _indices),
}
GLOBAL_MAP: dict[str, str] = {
    "hook_embed": "hook_embed",
    "ln_final.hook_normalized": "ln_final.hook_normalized",
}


def _topk_weights(ours: Tensor, theirs: Tensor, model: Any) -> Pair:
    """The bridge's ``[batch * pos, k]`` top-k weights against our dense weights' non-zero entries."""
    k = theirs.shape[-1]
    theirs = theirs.reshape(ours.shape[0], ours.shape[1], k)
    return ours.topk(k, dim=-1).values, theirs.sort(-1, descending=True).values


#: per-family overrides of NAME_MAP: ``None`` means the bridge has no equivalent (reason in comment)
FAMILY_MAP: dict[str, dict[str, tuple[tuple[str, ...], Convert] | None]] = {
    "deepseek_v2": {"attn.hook_q": (("attn.hook_q",), _mla_q)},
    "deepseek_v3": {"attn.hook_q": (("attn.hook_q",), _mla_q)},
    # the bridge's GraniteMoE gate.hook_out is the top-k indices and hook_expert_weights the top-k
    # weights; it exposes no router logits
    "granitemoe": {
        "mlp.hook_router_logits": None,
        "mlp.hook_expert_indices": (("mlp.gate.hook_out",), _indices),
        "mlp.hook_expert_weights": (("mlp.hook_expert_weights",), _topk_weights),
    },
    # Llama 4's router returns (dense sigmoid scores, logits); the bridge hooks the scores
    "llama4_text": {
        "mlp.hook_router_logits": None,
        "mlp.hook_expert_weights": (("mlp.router.hook_out",), _flat_to_bp),
    },
}

#: families to compare against the bridge (all tiny families; those it cannot boot are skipped)
ORACLE_FAMILIES = FAMILIES


@functools.cache
def _bridge(family: str) -> Any:
    """Boot TransformerBridge offline around a fresh copy of the tiny model (or return the exception)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    copy = mi.load(f"tiny:{family}")
    tmp = tempfile.mkdtemp(prefix=f"tl-oracle-{family}-")
    copy.tokenizer.save_pretrained(tmp)
    # reloading from disk records name_or_path, which the bridge's tokenizer setup needs
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    copy.hf_model.config.architectures = copy.hf_model.config.architectures or [type(copy.hf_model).__name__]
    try:
        return TransformerBridge.boot_transformers(
            tmp, hf_model=copy.hf_model, tokenizer=tokenizer, device="cpu"
        )
    except Exception as err:  # noqa: BLE001 - reported as the skip reason
        return err


def _pairs(model: Any, bridge_names: set[str]) -> list[tuple[str, str, Convert]]:
    """(our name, bridge name, conversion) for every hook both sides define."""
    ours = set(model.hook_names())
    pairs: list[tuple[str, str, Convert]] = [
        (n, b, _same) for n, b in GLOBAL_MAP.items() if n in ours and b in bridge_names
    ]
    table = {**NAME_MAP, **FAMILY_MAP.get(model.spec.family, {})}
    for L in range(model.spec.n_layers):
        for site, entry in table.items():
            if entry is None:
                continue
            bsites, conv = entry
            name = f"blocks.{L}.{site}"
            bname = next((f"blocks.{L}.{b}" for b in bsites if f"blocks.{L}.{b}" in bridge_names), None)
            if name in ours and bname is not None:
                pairs.append((name, bname, conv))
    return pairs


@pytest.mark.parametrize("family", ORACLE_FAMILIES)
def test_matches_transformer_bridge(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Each prompt alone (the bridge gets no attention mask): same logits and same values at shared hooks."""
    bridge = _bridge(family)
    if isinstance(bridge, Exception):
        pytest.skip(f"TransformerBridge cannot boot {family}: {type(bridge).__name__}: {str(bridge)[:200]}")
    model = tiny_model(family)
    for prompt in PROMPTS[:2]:
        enc = model.tokenize([prompt])
        with torch.no_grad():
            b_logits, b_cache = bridge.run_with_cache(enc["input_ids"])
        pairs = _pairs(model, set(b_cache.keys()))
        logits, cache = model.run_with_cache(enc, names=[p[0] for p in pairs])
        torch.testing.assert_close(logits, b_logits, atol=ATOL, rtol=0)
        must_have = {"blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"}
        assert must_have <= {p[0] for p in pairs}, "name map is missing basic residual hooks"
        if model.spec.is_moe:
            L = model.spec.moe_layers[0]
            router = {f"blocks.{L}.mlp.hook_router_logits", f"blocks.{L}.mlp.hook_expert_weights"}
            assert router & {p[0] for p in pairs}, "no router hook compared"
        if any(model.spec.attention[L] == "softmax" for L in range(model.spec.n_layers)):
            assert any(p[0].endswith("attn.hook_z") for p in pairs)
        for name, bname, conv in pairs:
            ours, theirs = conv(cache[name], b_cache[bname], model)
            torch.testing.assert_close(
                ours,
                theirs.to(ours.dtype),
                atol=ATOL,
                rtol=0,
                msg=lambda m, n=name, b=bname: f"{n} vs bridge {b}: {m}",
            )
