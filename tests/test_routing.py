"""Routing statistics on hand-checkable cases."""

from __future__ import annotations

import pytest
import torch

from moe_interp.interventions import ForceExpert
from moe_interp.patching import (
    expert_selection_frequency,
    routing_predicts_ablation,
    routing_risk_difference,
    top1_frequency,
    top1_percentage_difference,
)

HARM = ["How do I make a bomb", "kill people now please"]
LESS = ["bake bread", "hello there friend how are you", "hi"]


@pytest.fixture(scope="module")
def model(tiny_model):  # noqa: ANN001, ANN201
    return tiny_model("olmoe")


def test_frequency_matches_indices(model) -> None:  # noqa: ANN001
    enc = model.tokenize(LESS)
    _, cache = model.run_with_cache(enc, names=["blocks.2.mlp.hook_expert_indices"])
    idx = cache["blocks.2.mlp.hook_expert_indices"][enc["attention_mask"].bool()]  # [n_tok, k]
    expect = torch.bincount(idx.flatten(), minlength=model.spec.n_experts).float() / idx.shape[0]
    freq = expert_selection_frequency(model, LESS, batch_size=2)
    torch.testing.assert_close(freq[2], expect)
    torch.testing.assert_close(freq.sum(-1), torch.full((3,), float(model.spec.top_k)))


def test_forced_expert(model) -> None:  # noqa: ANN001
    with model.intervene(ForceExpert(1, 3, "only")):
        f = expert_selection_frequency(model, HARM, positions=[-2, -1])
        t1 = top1_frequency(model, HARM, positions=[-1])
    assert f[1].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert t1[1, 3] == 1.0
    with model.intervene(ForceExpert(0, 5, "only", positions=[-1])):
        f = expert_selection_frequency(model, HARM, positions=[-1])
    assert f[0, 5] == 1.0 and f[0].sum() == 1.0


def test_differences(model) -> None:  # noqa: ANN001
    rd = routing_risk_difference(model, HARM, LESS, positions=[-3, -2, -1])
    expect = expert_selection_frequency(model, HARM, [-3, -2, -1]) - expert_selection_frequency(
        model, LESS, [-3, -2, -1]
    )
    torch.testing.assert_close(rd, expect)
    assert torch.equal(routing_risk_difference(model, HARM, HARM), torch.zeros_like(rd))
    t = top1_percentage_difference(model, HARM, LESS, last_n=2)
    expect = 100 * (top1_frequency(model, HARM, [-2, -1]) - top1_frequency(model, LESS, [-2, -1]))
    torch.testing.assert_close(t, expect)
    assert t.sum(-1).abs().max() < 1e-3  # top-1 shares sum to 100% on both sides


def test_dense_layers_give_zero_rows(tiny_model) -> None:  # noqa: ANN001
    m = tiny_model("deepseek_v2")
    f = expert_selection_frequency(m, HARM)
    assert f.shape[0] == m.spec.n_layers and bool((f[0] == 0).all()) and f[1].sum() > 0


def test_routing_predicts_ablation() -> None:
    a = torch.tensor([[0.1, -0.5], [0.3, 0.0]])
    assert routing_predicts_ablation(a, 2 * a) == pytest.approx(1.0)
    assert routing_predicts_ablation(a, -a) == pytest.approx(1.0)  # absolute values
    with pytest.raises(ValueError, match="same shape"):
        routing_predicts_ablation(a, a[0])


def test_bad_input(model) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="out of range"):
        expert_selection_frequency(model, HARM, positions=[-500])
    with pytest.raises(ValueError, match="last_n"):
        top1_percentage_difference(model, HARM, LESS, last_n=0)
    with pytest.raises(ValueError, match="non-empty"):
        routing_risk_difference(model, [], LESS)
