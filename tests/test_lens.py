"""Logit lens and the probed read-out (final norm, unembedding), against HF modules applied by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moe_interp as mi
from moe_interp.figures_dla import plot_logit_lens
from moe_interp.lens import final_norm, logit_lens, token_ids, unembedding
from tests.conftest import PROMPTS

TOKENS = [17, 42, 5]


def test_final_norm_probe_recovers_the_module() -> None:
    model = mi.load("tiny:phimoe")  # LayerNorm with bias
    gen = torch.Generator().manual_seed(0)
    ln = model.hf_model.model.norm
    with torch.no_grad():
        ln.weight.copy_(torch.randn(ln.weight.shape, generator=gen))
        ln.bias.copy_(torch.randn(ln.bias.shape, generator=gen))
    norm = final_norm(model)
    assert norm.centered and norm.eps == ln.eps
    torch.testing.assert_close(norm.weight.float(), ln.weight.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(norm.bias.float(), ln.bias.detach(), rtol=0, atol=1e-6)
    zc = mi.load("tiny:qwen3_next")  # zero-centred RMSNorm: output uses (1 + weight)
    with torch.no_grad():
        zc.hf_model.model.norm.weight.copy_(torch.randn(64, generator=gen))
    torch.testing.assert_close(
        final_norm(zc).weight.float(), 1 + zc.hf_model.model.norm.weight.detach(), rtol=0, atol=1e-5
    )


def test_unembedding_scale_is_measured() -> None:
    model = mi.load("tiny:granitemoe", config={"logits_scaling": 4.0})  # logits = lm_head(y) / 4
    U = unembedding(model)
    assert abs(U.scale - 0.25) < 1e-6
    torch.testing.assert_close(U.W_U, model.hf_model.lm_head.weight.T, rtol=0, atol=0)


def test_logit_lens_matches_hand(tiny_model) -> None:  # noqa: ANN001
    model = tiny_model("olmoe")
    res = logit_lens(model, PROMPTS, TOKENS, experts=True)
    n = model.spec.n_layers
    assert res.labels == ["blocks.0.hook_resid_pre"] + [f"blocks.{L}.hook_resid_post" for L in range(n)]
    logits = model.forward(PROMPTS).detach()
    torch.testing.assert_close(res.logits[-1], logits[..., TOKENS], rtol=0, atol=1e-5)  # last row: the model
    torch.testing.assert_close(
        res.logprobs[-1], torch.log_softmax(logits, -1)[..., TOKENS], rtol=0, atol=1e-5
    )
    names = [f"blocks.{L}.hook_resid_post" for L in range(n)] + [
        f"blocks.{L}.mlp.hook_expert_out" for L in range(n)
    ]
    _, cache = model.run_with_cache(PROMPTS, names=names)
    hf = model.hf_model
    with torch.no_grad():
        mid = hf.lm_head(hf.model.norm(cache["blocks.1.hook_resid_post"]))  # HF modules by hand
    torch.testing.assert_close(res.logits[2], mid[..., TOKENS], rtol=0, atol=1e-5)
    ranks = (mid > mid[..., TOKENS[:1]]).sum(-1)
    assert torch.equal(res.ranks[2, ..., 0], ranks)
    # expert lens: each expert's output through the frozen final-norm scale of the full residual
    x = cache[f"blocks.{n - 1}.hook_resid_post"]
    s = (x.pow(2).mean(-1, keepdim=True) + hf.model.norm.variance_epsilon).sqrt()
    W = hf.lm_head.weight.detach()[TOKENS]
    eo = cache["blocks.1.mlp.hook_expert_out"][:, :, 4]
    hand = (eo / s * hf.model.norm.weight.detach()) @ W.T
    torch.testing.assert_close(res.expert_logits[1, 4], hand, rtol=0, atol=1e-6)
    assert res.expert_labels[1][4] == "blocks.1.mlp.experts.4.hook_out"


def test_cache_logit_lens_and_token_strings(tiny_model) -> None:  # noqa: ANN001
    model = tiny_model("llama")  # dense: no expert lens
    _, cache = model.run_with_cache(PROMPTS[:1])
    res = cache.logit_lens(TOKENS)
    assert res.expert_logits is None and res.logits.shape == (4, 1, cache["hook_embed"].shape[1], 3)
    assert token_ids(model, ["How", " the", 7]) == [
        model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("How", " the")
    ] + [7]
    with pytest.raises(ValueError, match="not one"):
        token_ids(model, "How do I bake bread")
    with pytest.raises(ValueError, match="Token ids"):
        token_ids(model, [10**6])


def test_logit_lens_figure(tiny_model, tmp_path: Path) -> None:  # noqa: ANN001
    res = logit_lens(tiny_model("olmoe"), PROMPTS[1:2], TOKENS[:2])
    assert res.final_layer(0) in range(-1, len(res.labels))
    plot_logit_lens(res, save_to=tmp_path / "lens")
    assert (tmp_path / "lens.pdf").read_bytes()[:4] == b"%PDF" and (tmp_path / "lens.png").stat().st_size > 0
