"""TransformerLens compatibility: ``model.cfg``, ``names_filter`` and TL's cache methods on ``MoECache``,
each checked against values computed by hand from the hooks and the HF modules."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.ActivationCache import ActivationCache

import moe_interp as mi
from tests.conftest import PROMPTS

ATOL = 1e-5


def _hf_norm(model):  # noqa: ANN001, ANN202
    return model.hf_model.model.norm


def _hand_scale(model, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """The final norm's divisor, from its eps attribute (LayerNorm centres first)."""
    norm = _hf_norm(model)
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


@pytest.fixture(scope="module")
def olmoe(tiny_model):  # noqa: ANN001, ANN201
    model = tiny_model("olmoe")
    logits, cache = model.run_with_cache(PROMPTS, names=lambda n: "pattern" not in n)
    return model, logits, cache


def test_cfg_fields(tiny_model) -> None:  # noqa: ANN001
    for family, norm_type in (("olmoe", "RMS"), ("phimoe", "LN")):
        model = tiny_model(family)
        cfg, hf = model.cfg, model.hf_model.config
        assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == (
            hf.num_hidden_layers,
            hf.hidden_size,
            hf.num_attention_heads,
        )
        assert (
            cfg.d_head
            == model.hf_model.model.layers[0].self_attn.k_proj.out_features // hf.num_key_value_heads
        )
        assert cfg.d_vocab == hf.vocab_size and cfg.n_key_value_heads == hf.num_key_value_heads
        assert cfg.normalization_type == norm_type and cfg.final_rms == (norm_type == "RMS")
        assert cfg.num_experts == 8 and cfg.experts_per_token == 2 and not cfg.attn_only
        assert model.cfg is cfg  # built once


def test_names_filter_alias(olmoe) -> None:  # noqa: ANN001
    model = olmoe[0]
    names = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_router_logits"]
    _, a = model.run_with_cache(PROMPTS[:1], names=names)
    _, b = model.run_with_cache(PROMPTS[:1], names_filter=names)
    _, c = model.run_with_cache(PROMPTS[:1], names_filter=lambda n: n in names)
    _, d = model.run_with_cache(PROMPTS[:1], names_filter=names[0])
    assert list(a.keys()) == list(b.keys()) == list(c.keys()) == names and list(d.keys()) == names[:1]
    for k in names:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="names_filter"):
        model.run_with_cache(PROMPTS[:1], names=names, names_filter=names)


def test_accumulated_resid(olmoe) -> None:  # noqa: ANN001
    model, _, cache = olmoe
    n = model.cfg.n_layers
    acc, labels = cache.accumulated_resid(return_labels=True)
    hand = [cache[f"blocks.{L}.hook_resid_pre"] for L in range(n)] + [
        cache[f"blocks.{n - 1}.hook_resid_post"]
    ]
    torch.testing.assert_close(acc, torch.stack(hand), rtol=0, atol=0)
    assert labels == [f"{L}_pre" for L in range(n)] + ["final_post"]
    normed = cache.accumulated_resid(apply_ln=True)
    with torch.no_grad():
        torch.testing.assert_close(normed, _hf_norm(model)(torch.stack(hand)), rtol=0, atol=ATOL)
    torch.testing.assert_close(normed[-1], cache["ln_final.hook_normalized"], rtol=0, atol=ATOL)
    last = cache.accumulated_resid(pos_slice=-1)  # TL's Slice, unchanged
    torch.testing.assert_close(last, torch.stack(hand)[:, :, -1], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["olmoe", "phimoe", "qwen3_next"])
def test_decompose_resid_and_apply_ln(tiny_model, family: str) -> None:  # noqa: ANN001
    model = tiny_model(family)
    _, cache = model.run_with_cache(PROMPTS, names=lambda n: "pattern" not in n)
    n = model.cfg.n_layers
    stack, labels = cache.decompose_resid(return_labels=True)
    x = cache[f"blocks.{n - 1}.hook_resid_post"]
    assert labels[0] == "embed" and labels[-1] == f"{n - 1}_mlp_out" and len(labels) == 1 + 2 * n
    torch.testing.assert_close(stack.sum(0), x, rtol=0, atol=ATOL)
    normed = cache.decompose_resid(apply_ln=True)  # frozen scale of the full residual, no weight (TL fold_ln)
    hand = x - x.mean(-1, keepdim=True) if model.cfg.normalization_type == "LN" else x
    torch.testing.assert_close(normed.sum(0), hand / _hand_scale(model, x), rtol=0, atol=ATOL)
    with pytest.raises(NotImplementedError, match="final norm"):
        cache.apply_ln_to_stack(stack, layer=1)


def test_stack_head_results() -> None:
    model = mi.load("tiny:gpt_oss")  # o_proj has a bias (zero at init: made non-zero here)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.hf_model.model.layers:
            layer.self_attn.o_proj.bias.copy_(torch.randn(model.cfg.d_model, generator=gen) * 0.1)
    _, cache = model.run_with_cache(PROMPTS, names=lambda n: "pattern" not in n)
    heads, labels = cache.stack_head_results(return_labels=True)
    H = model.cfg.n_heads
    assert labels[: H + 1] == [f"L0H{h}" for h in range(H)] + ["L1H0"]
    for L in range(model.cfg.n_layers):
        b_O = model.hf_model.model.layers[L].self_attn.o_proj.bias.detach()
        torch.testing.assert_close(
            heads[L * H : (L + 1) * H].sum(0) + b_O, cache[f"blocks.{L}.hook_attn_out"], rtol=0, atol=ATOL
        )
    with_rest = cache.stack_head_results(layer=2, incl_remainder=True)
    torch.testing.assert_close(with_rest.sum(0), cache["blocks.1.hook_resid_post"], rtol=0, atol=ATOL)
    # below layer 0 there are no heads: the remainder is the residual block 0 reads, not block 0's output
    only_rest = cache.stack_head_results(layer=0, incl_remainder=True)
    assert only_rest.shape[0] == 1
    torch.testing.assert_close(only_rest[0], cache["blocks.0.hook_resid_pre"], rtol=0, atol=0)


def test_stack_head_results_hybrid(tiny_model) -> None:  # noqa: ANN001
    model = tiny_model("qwen3_next")  # layers 0 and 2 are linear attention: no heads
    _, cache = model.run_with_cache(PROMPTS, names=lambda n: "pattern" not in n)
    heads, labels = cache.stack_head_results(return_labels=True, incl_remainder=True)
    assert labels == [f"L1H{h}" for h in range(model.cfg.n_heads)] + ["remainder"]
    torch.testing.assert_close(heads.sum(0), cache["blocks.2.hook_resid_post"], rtol=0, atol=ATOL)
    torch.testing.assert_close(heads[:-1].sum(0), cache["blocks.1.hook_attn_out"], rtol=0, atol=ATOL)


def test_stack_expert_and_shared_results(tiny_model) -> None:  # noqa: ANN001
    model = tiny_model("qwen2_moe")
    names = lambda n: "pattern" not in n and not n.endswith(".hook_out")  # noqa: E731
    _, cache = model.run_with_cache(PROMPTS, names=names)
    for L in model.spec.moe_layers:
        stack, labels = cache.stack_expert_results(L, return_labels=True, incl_shared=True)
        assert labels == [f"blocks.{L}.mlp.experts.{e}.hook_out" for e in range(8)] + [
            f"blocks.{L}.mlp.hook_shared_out"
        ]
        torch.testing.assert_close(stack.sum(0), cache[f"blocks.{L}.hook_mlp_out"], rtol=0, atol=ATOL)
        routed = stack[:-1].abs().amax(-1) > 0  # [E, b, p]: only the routed experts contribute
        idx = cache[f"blocks.{L}.mlp.hook_expert_indices"]
        hand = torch.zeros_like(routed).scatter_(0, idx.permute(2, 0, 1).long(), True)
        real = model.tokenize(PROMPTS)["attention_mask"].bool()  # padding tokens are zero vectors
        assert torch.equal(routed[:, real], hand[:, real])
    _, per_expert = model.run_with_cache(
        PROMPTS, names=[f"blocks.1.mlp.experts.{e}.hook_out" for e in range(8)]
    )
    torch.testing.assert_close(
        per_expert.stack_expert_results(1), cache.stack_expert_results(1), rtol=0, atol=ATOL
    )
    shared, slabels = cache.stack_shared_results(return_labels=True)
    assert slabels == [f"blocks.{L}.mlp.hook_shared_out" for L in model.spec.shared_expert_layers]
    torch.testing.assert_close(shared[0], cache["blocks.0.mlp.hook_shared_out"], rtol=0, atol=0)
    with pytest.raises(KeyError, match="hook_expert_out"):
        model.run_with_cache(PROMPTS, names=["blocks.0.hook_mlp_out"])[1].stack_expert_results(0)


@pytest.mark.parametrize("family", ["olmoe", "phimoe", "granitemoe"])
def test_logit_attrs_sum_to_logit_difference(family: str) -> None:
    cfg = {"logits_scaling": 4.0} if family == "granitemoe" else None
    model = mi.load(f"tiny:{family}", config=cfg)
    norm = _hf_norm(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial norm weight (and LayerNorm bias): the read-out must use them
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.abs().sum() > 0 else 0.0))
    logits, cache = model.run_with_cache(PROMPTS, names=lambda n: "pattern" not in n)
    a, b = 17, 42
    attrs = cache.logit_attrs(cache.decompose_resid(), a, incorrect_tokens=b)
    W = model.hf_model.lm_head.weight
    bias = norm.bias if getattr(norm, "bias", None) is not None else torch.zeros(W.shape[1])
    scale = 1 / 4.0 if family == "granitemoe" else 1.0
    hand = logits[..., a] - logits[..., b] - scale * (bias @ (W[a] - W[b]))
    torch.testing.assert_close(attrs.sum(0), hand.detach(), rtol=0, atol=1e-4)
    # per-example tokens [batch] broadcast over positions, as in TL
    per = cache.logit_attrs(cache.decompose_resid(), torch.tensor([a, b, a]), torch.tensor([b, a, b]))
    torch.testing.assert_close(per[:, 1], -attrs[:, 1], rtol=0, atol=1e-5)


def test_tl_methods_run_unchanged(olmoe) -> None:  # noqa: ANN001
    model, _, cache = olmoe
    assert isinstance(cache, ActivationCache)
    torch.testing.assert_close(cache["resid_pre", 1], cache["blocks.1.hook_resid_pre"], rtol=0, atol=0)
    torch.testing.assert_close(cache["resid_post", -1], cache["blocks.2.hook_resid_post"], rtol=0, atol=0)
    stacked = cache.stack_activation("resid_post")
    assert stacked.shape == (3, *cache["blocks.0.hook_resid_post"].shape)
    sliced = cache.apply_slice_to_batch_dim(1)
    torch.testing.assert_close(sliced["blocks.0.hook_resid_pre"], cache["blocks.0.hook_resid_pre"][1])
    cache.compute_head_results()  # hook_result is cached: nothing to do
    with pytest.raises(NotImplementedError, match="stack_expert_results"):
        cache.stack_neuron_results(1)
