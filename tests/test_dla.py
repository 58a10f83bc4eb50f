"""Direct logit attribution: the attributions sum to the model's logit difference on every family, and
single components match a hand computation from the hooks and the HF weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moe_interp as mi
from moe_interp.dla import (
    COMPLIANCE_START_PHRASES,
    direct_logit_attribution,
    direction_attribution,
    logit_direction,
)
from moe_interp.figures_dla import plot_dla_heatmap, plot_dla_tokens
from moe_interp.refusal.judges import default_refusal_ids, refusal_first_token_ids
from moe_interp.tiny import tiny_families
from tests.conftest import PROMPTS

A, B = 17, 42  # an arbitrary token pair


def _perturbed(family: str) -> mi.MoEModel:
    """A private tiny model whose read-out is non-trivial: random final-norm weight (and bias), random
    attention output biases where the family has them, and an unembedding bias."""
    model = mi.load(f"tiny:{family}")
    gen = torch.Generator().manual_seed(1)
    hf = model.hf_model
    with torch.no_grad():
        for p in hf.model.norm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.abs().sum() > 0 else 0.0))
        for layer in hf.model.layers:
            o = getattr(getattr(layer, "self_attn", None), "o_proj", None)
            if o is not None and o.bias is not None:
                o.bias.copy_(torch.randn(o.bias.shape, generator=gen) * 0.1)
        V = hf.lm_head.weight.shape[0]
        hf.lm_head.bias = torch.nn.Parameter(torch.randn(V, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("family", tiny_families())
def test_attributions_sum_to_logit_difference(family: str) -> None:
    model = _perturbed(family)
    res = direct_logit_attribution(model, PROMPTS, tokens=A, against=B)
    logits = model.forward(PROMPTS).detach()
    hand = logits[..., A] - logits[..., B]  # the model's own logit difference, all positions
    mask = model.tokenize(PROMPTS)["attention_mask"].bool()
    torch.testing.assert_close(res.logit_diff, hand, rtol=0, atol=1e-6)
    assert (res.total() - hand)[mask].abs().max() < 1e-4
    assert res.error() < 1e-4
    assert float(res.constant.abs().max()) > 0  # the unembedding bias is accounted for, not attributed
    kinds = set(res.kinds)
    assert "embed" in kinds and ("head" in kinds or "attn" in kinds)
    assert ("expert" in kinds) == bool(model.spec.moe_layers)
    assert ("shared" in kinds) == bool(model.spec.shared_expert_layers)


def test_components_match_hand_computation() -> None:
    model = _perturbed("qwen2_moe")  # RMSNorm, shared experts
    res = direct_logit_attribution(model, PROMPTS, tokens=A, against=B)
    names = ["blocks.2.hook_resid_post", "blocks.1.attn.hook_result", "blocks.1.mlp.hook_expert_out"]
    _, cache = model.run_with_cache(PROMPTS, names=names + ["blocks.1.mlp.hook_shared_out", "hook_embed"])
    hf = model.hf_model
    x = cache["blocks.2.hook_resid_post"]
    s = (x.pow(2).mean(-1) + hf.model.norm.variance_epsilon).sqrt()  # [b, p]
    W = hf.lm_head.weight.detach()
    u = hf.model.norm.weight.detach() * (W[A] - W[B])

    def hand(v: torch.Tensor) -> torch.Tensor:
        return (v @ u) / s

    def ours(label: str) -> torch.Tensor:
        return res.values[res.labels.index(label)]

    torch.testing.assert_close(
        ours("blocks.1.attn.hook_result[2]"), hand(cache["blocks.1.attn.hook_result"][:, :, 2])
    )
    eo = cache["blocks.1.mlp.hook_expert_out"]  # dense form: zero where the expert was not routed
    for e in (0, 3, 7):
        torch.testing.assert_close(
            ours(f"blocks.1.mlp.experts.{e}.hook_out"), hand(eo[:, :, e]), atol=1e-6, rtol=0
        )
    torch.testing.assert_close(
        ours("blocks.1.mlp.hook_shared_out"), hand(cache["blocks.1.mlp.hook_shared_out"])
    )
    torch.testing.assert_close(ours("hook_embed"), hand(cache["hook_embed"]))
    b_U = hf.lm_head.bias.detach()
    torch.testing.assert_close(res.constant, torch.full_like(res.constant, float(b_U[A] - b_U[B])))
    # the grids are the same numbers laid out layer x unit
    g = res.grid("expert", pos=-1, batch=0)
    torch.testing.assert_close(g[1, 3], hand(eo[:, :, 3])[0, -1])
    torch.testing.assert_close(
        res.grid("head", pos=-1, batch=None)[1, 2], ours("blocks.1.attn.hook_result[2]")[:, -1].mean()
    )


def test_default_direction_is_refusal_vs_compliance(tiny_model) -> None:  # noqa: ANN001
    model = tiny_model("olmoe")
    direction = logit_direction(model)
    refusal = default_refusal_ids(model)
    compliance = [
        i for i in refusal_first_token_ids(model.tokenizer, COMPLIANCE_START_PHRASES) if i not in refusal
    ]
    weights = dict(zip(direction.ids, direction.weights, strict=True))
    assert all(weights[i] > 0 for i in refusal) and all(weights[i] < 0 for i in compliance)
    res = direct_logit_attribution(model, PROMPTS)
    logits = model.forward(PROMPTS).detach()
    hand = logits[..., refusal].mean(-1) - logits[..., compliance].mean(-1)
    torch.testing.assert_close(res.logit_diff, hand, rtol=0, atol=1e-6)
    assert res.error() < 1e-4
    with pytest.raises(ValueError, match="against alone"):
        logit_direction(model, against=3)


def test_dense_layers_and_batching(tiny_model) -> None:  # noqa: ANN001
    model = tiny_model("deepseek_v3")  # layer 0 is dense
    res = direct_logit_attribution(model, PROMPTS, tokens=[A, 5], against=B)
    grid = res.grid("expert", pos=-1, batch=1)
    assert grid[0].isnan().all() and not grid[1:].isnan().any()
    assert "blocks.0.hook_mlp_out" in res.labels and "blocks.0.mlp.experts.0.hook_out" not in res.labels
    one_by_one = direct_logit_attribution(model, PROMPTS, tokens=[A, 5], against=B, batch_size=1)
    torch.testing.assert_close(one_by_one.values, res.values, rtol=0, atol=1e-5)
    sites, labels = res.by_site(batch=2)
    assert labels[0] == "hook_embed" and labels[-1] == "blocks.2.hook_mlp_out"
    torch.testing.assert_close(sites.sum(0), res.values[:, 2].sum(0))
    assert res.top(3)[0][0] in res.labels and "<table>" in res._repr_html_()


def test_figures_are_written(tiny_model, tmp_path: Path) -> None:  # noqa: ANN001
    model = tiny_model("qwen3_next")  # hybrid: heads only on layer 1
    res = direct_logit_attribution(model, PROMPTS[1:2])
    fig = plot_dla_heatmap(res, save_to=tmp_path / "dla_heatmap")
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in axes] == [
        "blocks.L.attn.hook_result[h]",
        "blocks.L.mlp.experts.e.hook_out",
    ]
    plot_dla_tokens(res, save_to=tmp_path / "dla_tokens")
    for stem in ("dla_heatmap", "dla_tokens"):
        assert (tmp_path / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
        assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("family", tiny_families())
def test_direction_attribution_sums_to_the_projection(family: str) -> None:
    """The writers of a residual direction: their shares sum to ``blocks.L.hook_resid_pre · r̂`` on every family."""
    model = mi.load(f"tiny:{family}")
    L = model.spec.n_layers - 1
    r = torch.randn(model.spec.d_model, generator=torch.Generator().manual_seed(3))
    res = direction_attribution(model, PROMPTS, 5.0 * r, L)  # the norm of the direction does not matter
    _, cache = model.run_with_cache(PROMPTS, names=[f"blocks.{L}.hook_resid_pre"])
    hand = cache[f"blocks.{L}.hook_resid_pre"].float() @ (r / r.norm())
    mask = model.tokenize(PROMPTS)["attention_mask"].bool()
    torch.testing.assert_close(res.logit_diff, hand, rtol=0, atol=1e-5)
    assert (res.total() - hand)[mask].abs().max() < 1e-4 and res.error() < 1e-4
    assert max(res.layers) == L - 1 and float(res.constant.abs().max()) == 0.0  # only writers before L
    assert "projection" in res._repr_html_()


def test_direction_attribution_components_by_hand() -> None:
    model = mi.load("tiny:qwen2_moe")  # shared experts
    r = torch.randn(model.spec.d_model, generator=torch.Generator().manual_seed(4))
    rh = r / r.norm()
    res = direction_attribution(model, PROMPTS, r, 2, batch_size=2)
    names = ["blocks.1.attn.hook_result", "blocks.1.mlp.hook_expert_out", "blocks.1.mlp.hook_shared_out"]
    _, cache = model.run_with_cache(PROMPTS, names=[*names, "hook_embed"])

    def ours(label: str) -> torch.Tensor:
        return res.values[res.labels.index(label)]

    torch.testing.assert_close(ours("blocks.1.attn.hook_result[2]"), cache[names[0]][:, :, 2] @ rh)
    for e in (0, 3, 7):
        torch.testing.assert_close(
            ours(f"blocks.1.mlp.experts.{e}.hook_out"), cache[names[1]][:, :, e] @ rh, atol=1e-6, rtol=0
        )
    torch.testing.assert_close(ours("blocks.1.mlp.hook_shared_out"), cache[names[2]] @ rh)
    torch.testing.assert_close(ours("hook_embed"), cache["hook_embed"] @ rh)
    only_embed = direction_attribution(model, PROMPTS, r, 0)
    assert only_embed.labels == ["hook_embed"]
    with pytest.raises(ValueError, match="out of range"):
        direction_attribution(model, PROMPTS, r, model.spec.n_layers)
    with pytest.raises(ValueError, match="zero vector"):
        direction_attribution(model, PROMPTS, torch.zeros(model.spec.d_model), 1)
    with pytest.raises(ValueError, match="direction"):
        direction_attribution(model, PROMPTS, torch.ones(3), 1)
