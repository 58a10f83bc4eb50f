"""Half precision: observing a hook, or an edit that leaves a value alone, must not change the forward.

In bf16 a re-computation differs from the module's own by roundings (a per-head sum is not ``o_proj``, a
sum over experts in bf16 is not the module's fp32 accumulation, ``x · m / m`` is not ``x``), so the adapter
keeps the module's result and writes edits back as deltas. These tests compare bits, not tolerances.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import moe_interp as mi
from moe_interp.tiny import tiny_config, tiny_families
from moe_interp.tracing import HookContext

PROMPTS = ["How do I bake bread at home?", "Tell me a joke"]


def _bf16(family: str) -> Any:
    if family != "granitemoe_0.22":
        return mi.load(f"tiny:{family}", dtype=torch.bfloat16)
    # Granite with a multiplier that is not a power of two (the tiny config's 0.5 and 2.0 round-trip exactly)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("granitemoe", residual_multiplier=0.22, embedding_multiplier=12.0)
    hf = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    return mi.load(hf, tokenizer=mi.load("tiny:granitemoe").tokenizer)


def _names(model: Any) -> list[str]:
    """Every hook of the first MoE layer (or layer 0 of a dense model) and the global hooks; no attention
    pattern (reading it switches attention to eager, another kernel)."""
    L = next((i for i, info in enumerate(model.layers) if info.is_moe), 0)
    return [
        n
        for n in model.hook_names()
        if (n.startswith(f"blocks.{L}.") or not n.startswith("blocks.")) and not n.endswith("hook_pattern")
    ]


def _writable(model: Any) -> Any:
    return lambda name: not any(name.endswith("." + s) for s in model.family.read_only_sites)


FAMILIES = [*tiny_families(), "granitemoe_0.22"]


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_reads_and_identity_edits_leave_the_logits_bit_identical(family: str) -> None:
    model = _bf16(family)
    enc = model.tokenize(PROMPTS)
    plain, _ = model.run_with_cache(enc, names=[])
    names = _names(model)
    observed, cache = model.run_with_cache(enc, names=names)
    assert set(cache.keys()) == set(names)
    assert torch.equal(plain, observed), f"reading {names} changed the bf16 logits"
    changed = []
    for name in filter(_writable(model), names):
        with model.intervene(mi.EditHook(name, lambda x, ctx: x)):
            edited, _ = model.run_with_cache(enc, names=[])
        if not torch.equal(plain, edited):
            changed.append((name, float((edited.float() - plain.float()).abs().max())))
    assert not changed, f"identity edits changed the bf16 logits: {changed}"


def _bump_last(x: Tensor, ctx: HookContext) -> Tensor:
    """In place: add 1 at the last position (float hooks only)."""
    if x.is_floating_point():
        x[:, -1] += 1.0
    return x


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "olmoe", "granitemoe_0.22"])
def test_bf16_edit_at_the_last_position_leaves_earlier_positions_bit_identical(family: str) -> None:
    """An edit made in place at the last position changes that position and nothing before it."""
    model = _bf16(family)
    model.tokenizer.padding_side = "left"
    enc = model.tokenize(PROMPTS)
    plain, _ = model.run_with_cache(enc, names=[])
    moved = []
    for name in filter(_writable(model), _names(model)):
        if name.endswith(("hook_expert_indices", "hook_router_logits", "hook_expert_weights")):
            continue  # not float-valued, or +1 everywhere leaves a softmax routing as it is
        with model.intervene(mi.EditHook(name, _bump_last)):
            edited, _ = model.run_with_cache(enc, names=[])
        if not torch.equal(plain[:, :-1], edited[:, :-1]):
            moved.append(name)
        assert not torch.equal(plain[:, -1], edited[:, -1]), f"the edit of {name} did nothing"
    assert not moved, f"edits at the last position changed earlier positions: {moved}"
