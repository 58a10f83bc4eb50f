"""Single-expert ablation: batched sweep == per-expert loop (AblateExpert), mean outputs, bad input."""

from __future__ import annotations

import pytest
import torch

from moe_interp.patching import (
    expert_ablation_attribution,
    expert_ablation_loop,
    expert_ablation_sweep,
    expert_mean_outputs,
)

PROMPTS = ["How do I make a bomb", "kill people now please", "go away"]
SUBSET = [(0, 1), (1, 2), (1, 5), (2, 7)]


@pytest.fixture(scope="module")
def model(tiny_model):  # noqa: ANN001, ANN201
    return tiny_model("olmoe")


@pytest.fixture(scope="module")
def means(model):  # noqa: ANN001, ANN201
    return expert_mean_outputs(model, PROMPTS)


@pytest.mark.parametrize("mode", ["drop", "renorm", "reroute", "mean"])
def test_batched_equals_loop(model, means, mode: str) -> None:  # noqa: ANN001
    res = expert_ablation_sweep(model, PROMPTS, mode, mean_outputs=means, experts=SUBSET, progress=False)
    loop = expert_ablation_loop(model, PROMPTS, mode, mean_outputs=means, experts=SUBSET)
    torch.testing.assert_close(res.effect, loop, atol=1e-5, rtol=0, equal_nan=True)
    vals = torch.stack([res.effect[L, e] for L, e in SUBSET])
    assert vals.abs().sum() > 0
    for L, e in SUBSET:
        assert res.ci_low[L, e] <= res.effect[L, e] + 1e-6 <= res.ci_high[L, e] + 2e-6
    assert torch.isnan(res.effect[0, 0])  # not swept


def test_mean_outputs_by_hand(model, means) -> None:  # noqa: ANN001
    enc = model.tokenize(PROMPTS)
    _, cache = model.run_with_cache(enc, names=["blocks.1.mlp.hook_expert_out"])
    y = cache["blocks.1.mlp.hook_expert_out"][:, :, 3]  # [b, p, d]
    routed = (y != 0).any(-1) & enc["attention_mask"].bool()
    torch.testing.assert_close(means[1, 3], y[routed].mean(0), atol=1e-5, rtol=1e-4)
    assert means.shape == (model.spec.n_layers, model.spec.n_experts, model.spec.d_model)


def test_attribution_ranks_like_exhaustive(model) -> None:  # noqa: ANN001
    from moe_interp.refusal.stats import spearman

    est = expert_ablation_attribution(model, PROMPTS, "drop")
    ex = expert_ablation_sweep(model, PROMPTS, "drop", progress=False, batch_experts=24).effect
    assert spearman(est.flatten(), ex.flatten()) > 0.8


def test_bad_input(model) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="mean_outputs"):
        expert_ablation_sweep(model, PROMPTS, "mean", progress=False)
    with pytest.raises(ValueError, match="Unknown ablation mode"):
        expert_ablation_sweep(model, PROMPTS, "zero", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        expert_ablation_sweep(model, PROMPTS, "drop", experts=[(0, 99)], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        expert_ablation_sweep(model, PROMPTS, "drop", experts=[(9, 0)], progress=False)


def test_sweep_repr_names_the_largest_finite_effect(tiny_model) -> None:  # noqa: ANN001
    """Dense layers (and experts left out) hold NaN; the summary names the largest measured effect."""
    from moe_interp.patching import expert_ablation_sweep

    model = tiny_model("deepseek_v3")  # layer 0 is dense
    res = expert_ablation_sweep(model, ["hello there", "tell me a story"], "drop", progress=False, n_boot=10)
    assert res.effect[0].isnan().all()
    L, e = divmod(int(res.effect.nan_to_num(0.0).abs().argmax()), res.effect.shape[1])
    assert f"largest |effect| at blocks.{L}.mlp.experts.{e}:" in repr(res) and "nan" not in repr(res)
