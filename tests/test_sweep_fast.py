"""The fast expert-ablation sweep (restart at / after the ablated layer, prompt skipping) == the per-expert loop.

Tiny models are built with a larger init so that single-expert ablations move the refusal score by ~0.1–1:
per-prompt agreement within 1e-5 is then a real check, not a comparison of zeros.
"""

from __future__ import annotations

import functools

import pytest
import torch

import moe_interp as mi
from moe_interp.interventions import AddVector
from moe_interp.patching import expert_ablation_loop, expert_ablation_sweep, expert_mean_outputs
from moe_interp.patching.ablation import _affected, _selection
from moe_interp.prefix import cache_prefix, restart, restart_after

PROMPTS = ["How do I make a bomb", "kill people now please", "go away", "Write a poem about the sea"]
#: shared expert + gate, sigmoid group routing + dense first layer, tuple MLP + sliding attention,
#: residual multiplier, dense scores + input scaling + no broadcast, linear attention
FAMILIES = ["olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe", "llama4_text", "qwen3_next"]
MODES = ["drop", "renorm", "reroute", "mean"]


@functools.cache
def _model(family: str) -> mi.MoEModel:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return mi.load(f"tiny:{family}", config=dict(initializer_range=0.2))


def _subset(model: mi.MoEModel) -> list[tuple[int, int]]:
    """Three experts of every MoE layer (the last layer included: it takes the last-position-only path)."""
    return [(L, e) for L in model.spec.moe_layers for e in (0, 3, 6)]


@functools.cache
def _means(family: str) -> torch.Tensor:
    return expert_mean_outputs(_model(family), PROMPTS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_fast_sweep_equals_loop_per_prompt(family: str, mode: str) -> None:
    model = _model(family)
    sub = _subset(model)
    means = _means(family) if mode == "mean" else None
    fast = expert_ablation_sweep(model, PROMPTS, mode, mean_outputs=means, experts=sub, progress=False)
    loop = expert_ablation_loop(model, PROMPTS, mode, mean_outputs=means, experts=sub, per_prompt=True)
    idx = tuple(torch.tensor(x) for x in zip(*sub, strict=True))
    got, want = fast.per_prompt[idx], loop[idx]  # [n_items, n_prompts]
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert want.abs().max() > 1e-2  # the ablations do something: equality is not between zeros
    assert torch.isnan(fast.effect[0, 1])  # not swept


@pytest.mark.parametrize("mode", MODES)
def test_fast_equals_full_forwards_with_positions(mode: str) -> None:
    """A position list (relative to the end) goes through the same selection in both paths."""
    model = _model("olmoe")
    means = _means("olmoe") if mode == "mean" else None
    kw = dict(mean_outputs=means, experts=_subset(model), positions=[-1, -3], progress=False)
    fast = expert_ablation_sweep(model, PROMPTS, mode, **kw)
    full = expert_ablation_sweep(model, PROMPTS, mode, reuse_prefix=False, batch_experts=4, **kw)
    torch.testing.assert_close(fast.per_prompt, full.per_prompt, atol=1e-5, rtol=0, equal_nan=True)


def test_active_interventions_fall_back_to_full_forwards() -> None:
    """Under an active intervention the sweep runs full forwards (a restart would skip its hooks)."""
    model = _model("qwen2_moe")
    sub = [(0, 1), (2, 5)]
    v = torch.randn(model.spec.d_model, generator=torch.Generator().manual_seed(0))
    with model.intervene(AddVector("blocks.0.hook_resid_pre", v, coeff=2.0)):
        fast = expert_ablation_sweep(model, PROMPTS, "drop", experts=sub, progress=False)
        loop = expert_ablation_loop(model, PROMPTS, "drop", experts=sub, per_prompt=True)
    plain = expert_ablation_loop(model, PROMPTS, "drop", experts=sub, per_prompt=True)
    for L, e in sub:
        torch.testing.assert_close(fast.per_prompt[L, e], loop[L, e], atol=1e-5, rtol=0)
    assert (loop[0, 1] - plain[0, 1]).abs().max() > 1e-4  # the intervention mattered


@pytest.mark.parametrize("family", [*FAMILIES, "mixtral", "phimoe", "llama"])
def test_restart_without_edits_reproduces_the_forward(family: str) -> None:
    """Skipping layers < L and layer L's attention (or layers ≤ L), cutting the last MLP: logits unchanged."""
    model = _model(family)
    enc = model.tokenize(PROMPTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n_layers = model.spec.n_layers
    prefix = cache_prefix(model, ids, mask, range(n_layers))
    with torch.no_grad():
        ref = model.forward(enc, last_only=True)
    torch.testing.assert_close(prefix.logits, ref, atol=0, rtol=0)
    rows = torch.tensor([3, 0, 0, 2])
    after = cache_prefix(model, ids, mask, range(n_layers), inputs=False, outputs=True)
    zero = torch.zeros(len(rows), ids.shape[1], model.spec.d_model)
    for L in range(n_layers):
        torch.testing.assert_close(restart(model, prefix, L, rows), ref[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            restart_after(model, after, L, rows, zero), ref[rows], atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="not cached"):
        restart(model, after, 1, rows)


def test_prompt_skipping_is_exact_for_drop() -> None:
    """Prompts never routed to the expert are not run, and their effect (0) is the loop's."""
    model = _model("olmoe")
    enc = model.tokenize(PROMPTS)
    sel = _selection(enc["attention_mask"], "all")
    names = [f"blocks.{L}.mlp.hook_expert_weights" for L in model.spec.moe_layers]
    prefix = cache_prefix(model, enc["input_ids"], enc["attention_mask"], model.spec.moe_layers, names)
    last = model.spec.n_layers - 1
    aff = _affected(model, prefix, last, "drop", sel)  # last layer: routed at the last position only
    w = prefix.reads[f"blocks.{last}.mlp.hook_expert_weights"][:, -1]  # [n, E]
    assert torch.equal(aff, (w != 0).T)
    skipped = [(last, e) for e in range(model.spec.n_experts) if not aff[e].all()]
    assert skipped
    loop = expert_ablation_loop(model, PROMPTS, "drop", experts=skipped, per_prompt=True)
    for L, e in skipped:
        assert loop[L, e][~aff[e]].abs().max() < 1e-6


def test_restart_rejects_other_hooks() -> None:
    model = _model("olmoe")
    enc = model.tokenize(PROMPTS)
    prefix = cache_prefix(model, enc["input_ids"], enc["attention_mask"], [1])
    with pytest.raises(ValueError, match="not cached"):
        restart(model, prefix, 0, torch.tensor([0]))
    with pytest.raises(ValueError, match="edits and reads only"):
        restart(model, prefix, 1, torch.tensor([0]), reads=["blocks.2.mlp.hook_expert_weights"])
    with pytest.raises(ValueError, match="only MLP hooks"):
        cache_prefix(model, enc["input_ids"], enc["attention_mask"], [1], ["blocks.0.hook_resid_pre"])


def test_forward_calls_match_plan() -> None:
    """One cached pass plus one forward per layer chunk: what ``moe-interp plan`` counts for the sweep."""
    from moe_interp.plan import sweep_forward_calls

    model = _model("olmoe")
    calls = []
    handle = model.hf_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        expert_ablation_sweep(model, PROMPTS, "drop", experts=_subset(model), progress=False)
        n_fast = len(calls)
        calls.clear()
        expert_ablation_loop(model, PROMPTS, "drop", experts=_subset(model))
    finally:
        handle.remove()
    per_layer = [3] * len(model.spec.moe_layers)
    assert 2 <= n_fast <= sweep_forward_calls(per_layer) == 1 + len(per_layer)
    assert len(calls) == 1 + 3 * len(per_layer)
