"""Weight orthogonalisation equals directional ablation by hooks, on every tiny family and the organism."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

import moe_interp as mi
from moe_interp.interventions import DirectionalAblation
from moe_interp.organisms import checkpoint_dir
from moe_interp.refusal.orthogonalize import orthogonalize, residual_writers

TOL = 1e-4


def _direction(d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 3.0


def _masked_max_diff(model, a: torch.Tensor, b: torch.Tensor) -> float:
    mask = model.tokenize(PROMPTS)["attention_mask"].bool()
    return float((a - b)[mask].abs().max())


def _check_equivalence(model, edited, r: torch.Tensor) -> None:
    base = model.forward(PROMPTS)
    with model.intervene(DirectionalAblation(r)):
        hooked = model.forward(PROMPTS)
    weights = edited.forward(PROMPTS)
    assert _masked_max_diff(model, hooked, base) > 100 * TOL  # the ablation does something
    assert _masked_max_diff(model, hooked, weights) <= TOL


def test_copy_equals_hook_ablation_and_leaves_original(tiny_model, family: str) -> None:
    model = tiny_model(family)
    r = _direction(model.spec.d_model)
    before = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    edited = orthogonalize(model, r)
    assert edited is not model and edited.hf_model is not model.hf_model
    assert edited.tokenizer is model.tokenizer
    _check_equivalence(model, edited, r)
    after = model.hf_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_writers_are_orthogonal_after_edit(tiny_model, family: str) -> None:
    model = tiny_model(family)
    r = _direction(model.spec.d_model, seed=1)
    rhat = r / r.norm()
    edited = orthogonalize(model, r)
    orig = dict(model.hf_model.named_parameters())
    writers = residual_writers(edited)
    names = {w.name for w in writers}
    assert any("embed" in n for n in names)
    if model.spec.is_moe:
        assert any(w.name.endswith("experts.down_proj") and w.param.ndim == 3 for w in writers)
    for w in writers:
        new = w.param.detach().movedim(w.axis, -1).double()
        assert float((new @ rhat.double()).abs().max()) < 1e-5, w.name
        # hand computation W - r r^T W on the original parameter
        old = orig[w.name].detach().movedim(w.axis, -1).double()
        expect = old - (old @ rhat.double())[..., None] * rhat.double()
        torch.testing.assert_close(new, expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fam", ["gpt_oss", "granitemoe"])
def test_in_place(fam: str) -> None:
    model = mi.load(f"tiny:{fam}")
    ref = mi.load(f"tiny:{fam}")  # same seed: identical weights
    r = _direction(model.spec.d_model, seed=2)
    out = orthogonalize(model, r, in_place=True)
    assert out is model
    _check_equivalence(ref, model, r)


def test_tied_embeddings_are_untied() -> None:
    model = mi.load("tiny:llama", config=dict(tie_word_embeddings=True))
    assert model.hf_model.lm_head.weight is model.hf_model.model.embed_tokens.weight
    r = _direction(model.spec.d_model, seed=3)
    edited = orthogonalize(model, r)
    assert edited.hf_model.lm_head.weight is not edited.hf_model.model.embed_tokens.weight
    torch.testing.assert_close(edited.hf_model.lm_head.weight, model.hf_model.lm_head.weight)
    _check_equivalence(model, edited, r)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.randn(7), "d_model"),
        (torch.full((64,), float("nan")), "NaN"),
        (torch.zeros(64), "zero vector"),
        (torch.randn(2, 64), "1-D"),
    ],
)
def test_bad_direction(tiny_model, bad: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        orthogonalize(tiny_model("olmoe"), bad)


@pytest.mark.skipif(not (checkpoint_dir() / "model.safetensors").is_file(), reason="organism not trained")
def test_organism_equivalence(organism) -> None:  # noqa: ANN001 - the session's MoEModel (conftest)
    model = organism
    r = _direction(model.spec.d_model, seed=4)
    _check_equivalence(model, orthogonalize(model, r), r)


def test_copy_keeps_the_refusal_score_tokens() -> None:
    """The edited copy scores refusal on the same first tokens as the original (a model's own
    ``refusal_phrases``, e.g. the organism's), so edited and hooked refusal scores are comparable."""
    from moe_interp.refusal.judges import default_refusal_ids

    model = mi.load("tiny:olmoe")
    model.refusal_phrases = ("zebra crossing", "quantum")
    edited = orthogonalize(model, _direction(model.spec.d_model, seed=5))
    assert edited.refusal_phrases == model.refusal_phrases
    assert default_refusal_ids(edited) == default_refusal_ids(model)


def test_after_first_scope_spares_each_prompts_first_token() -> None:
    """``positions="after_first"``: the mask drops each row's first real token under left padding (by hand),
    and ablation in that scope leaves the first token's logits exactly as unedited, where ``"all"`` does not."""
    from moe_interp.interventions import position_mask
    from moe_interp.tracing import HookContext

    att = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    want = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    ctx = HookContext("blocks.0.hook_resid_pre", 0, att, is_prompt=True, step=0)
    assert torch.equal(position_mask(ctx, "after_first", torch.Size([3, 5, 8])), want)
    gen = HookContext("blocks.0.hook_resid_pre", 0, att[:, -1:], is_prompt=False, step=1)
    assert torch.equal(
        position_mask(gen, "after_first", torch.Size([3, 1, 8])), torch.ones(3, 1, dtype=torch.bool)
    )

    model = mi.load("tiny:mixtral")
    r = _direction(model.spec.d_model)
    mask = model.tokenize(PROMPTS)["attention_mask"].bool()
    first = mask & (mask.long().cumsum(1) == 1)
    base = model.forward(PROMPTS)
    with model.intervene(DirectionalAblation(r, positions="after_first")):
        spared = model.forward(PROMPTS)
    with model.intervene(DirectionalAblation(r)):
        everywhere = model.forward(PROMPTS)
    assert float((spared - base)[first].abs().max()) <= 1e-6  # float rounding of the edited batch only
    assert float((everywhere - base)[first].abs().max()) > 100 * TOL
    assert _masked_max_diff(model, spared, base) > 100 * TOL  # the other positions are edited
    with pytest.raises(ValueError, match="Unknown position scope 'first'.*'after_first'"):
        with model.intervene(DirectionalAblation(r, positions="first")):
            model.forward(PROMPTS)
