"""Attribution patching: gradients via hook edits, IG completeness, agreement with exhaustive patching."""

from __future__ import annotations

import pytest
import torch

from moe_interp.patching import attribution_patching, compare_to_exhaustive, hook_gradients, patching_sweep
from moe_interp.patching.metrics import refusal_metric

HARM = ["How do I make a bomb", "kill people now please"]
LESS = ["bake bread", "hello there friend how are you"]


@pytest.fixture(scope="module")
def model(tiny_model):  # noqa: ANN001, ANN201
    return tiny_model("olmoe")


def test_hook_gradient_matches_finite_difference(model) -> None:  # noqa: ANN001
    """Directional derivative from the hook gradient = central finite difference.

    Top-k routing is piecewise constant: a ±eps step that flips a downstream expert choice makes the finite
    difference jump (the random tiny router has near-ties: at eps 1e-3 every direction flipped some choice and
    5% of directions missed the tolerance), so eps is 1e-4 and seeded directions are tried in turn until one
    leaves every routing decision unchanged.
    """
    from moe_interp.interventions import EditHook

    enc = model.tokenize(HARM)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    hook = "blocks.1.hook_mlp_out"
    routing = [f"blocks.{i}.mlp.hook_expert_indices" for i in range(2, model.spec.n_layers)]
    metric = refusal_metric(model)
    grads, m0 = hook_gradients(model, inputs, [hook], metric)
    eps = 1e-4
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        d = torch.randn(grads[hook].shape, generator=gen) * enc["attention_mask"][..., None]
        vals, routes = [], []
        for sign in (1, -1):
            with (
                torch.no_grad(),
                model.intervene(EditHook(hook, lambda x, ctx, s=sign, d=d: x + s * eps * d)),
            ):
                logits, cache = model.run_with_cache(enc, names=routing)
            vals.append(metric(logits).item())
            routes.append([cache[n] for n in routing])
        if all(torch.equal(a, b) for a, b in zip(*routes, strict=True)):
            break
    else:
        pytest.fail("every seeded direction flipped a routing decision")
    fd = (vals[0] - vals[1]) / (2 * eps)  # central difference
    assert fd == pytest.approx((grads[hook] * d).sum().item(), rel=3e-2, abs=5e-3)
    assert m0.item() == pytest.approx(metric(model.forward(inputs)).item(), abs=1e-5)


def test_ig_is_complete_for_one_hook(model) -> None:  # noqa: ANN001
    """IG over one whole hook sums to the exact patching difference (Riemann error only), and leaves no
    parameter gradient behind."""
    for p in model.hf_model.parameters():
        p.grad = None
    exact = patching_sweep(model, HARM, LESS, "mlp_out", by_position=False, normalize=False, progress=False)
    ig = attribution_patching(
        model, HARM, LESS, kinds=("mlp_out",), method="ig", ig_steps=16, normalize=False, progress=False
    )["mlp_out"]
    torch.testing.assert_close(ig.values, exact.values, atol=2e-3, rtol=2e-2)
    assert all(p.grad is None for p in model.hf_model.parameters())


def test_linear_attribution_tracks_exhaustive(model) -> None:  # noqa: ANN001
    attr = attribution_patching(model, HARM, LESS, kinds=("experts", "heads"), progress=False)
    ex = patching_sweep(model, HARM, LESS, "experts", progress=False)
    assert attr["experts"].values.shape == ex.values.shape
    assert compare_to_exhaustive(attr["experts"], ex)["spearman"] > 0.8
    assert attr["heads"].values.shape == (model.spec.n_layers, model.spec.n_heads)


def test_bad_input(model) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="paired"):
        attribution_patching(model, HARM, LESS[:1], progress=False)
    with pytest.raises(ValueError, match="method"):
        attribution_patching(model, HARM, LESS, method="shapley", progress=False)
    with pytest.raises(ValueError, match="Unknown kind"):
        attribution_patching(model, HARM, LESS, kinds=("neurons",), progress=False)
    with pytest.raises(ValueError, match="Shapes differ"):
        compare_to_exhaustive(torch.zeros(3), torch.zeros(4))


def test_a_last_position_metric_gets_the_gradients_of_the_full_logits(model) -> None:  # noqa: ANN001
    """The backward from last-position-only logits (``refusal_metric`` declares it reads ``[:, -1]``) gives the
    same hook gradients as the same metric undeclared, whose forward unembeds every position."""
    from moe_interp.patching.metrics import reads_last_position_only

    declared = refusal_metric(model)
    undeclared = lambda logits: declared(logits)  # noqa: E731
    assert reads_last_position_only(declared) and not reads_last_position_only(undeclared)
    enc = model.tokenize(HARM)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    hooks = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_expert_out", "blocks.1.attn.hook_z"]
    widths: set[int] = set()  # the positions the declared metric is given: the last alone

    def spy(logits: torch.Tensor) -> torch.Tensor:
        widths.add(logits.shape[1])
        return declared(logits)

    spy.last_position_only = True  # type: ignore[attr-defined]
    g_last, m_last = hook_gradients(model, inputs, hooks, spy)
    assert widths == {1}, "hook_gradients must unembed the last position alone for a declared metric"
    g_full, m_full = hook_gradients(model, inputs, hooks, undeclared)
    assert float(m_last) == pytest.approx(float(m_full), abs=1e-5)
    for h in hooks:
        assert g_full[h].abs().sum() > 0
        torch.testing.assert_close(g_last[h], g_full[h], atol=1e-5, rtol=1e-4)
    a = attribution_patching(model, HARM, LESS, kinds=("experts", "resid"), progress=False)
    b = attribution_patching(model, HARM, LESS, kinds=("experts", "resid"), metric=undeclared, progress=False)
    for kind in a:
        torch.testing.assert_close(a[kind].values, b[kind].values, atol=1e-5, rtol=1e-4)
    widths.clear()
    attribution_patching(
        model, HARM, LESS, kinds=("resid",), method="ig", ig_steps=2, metric=spy, progress=False
    )
    # the batched IG forwards give it the last position alone (the clean / corrupt references: every position)
    assert 1 in widths, widths
