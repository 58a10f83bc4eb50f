"""Activation patching on the tiny olmoe: exact endpoints, batched == looped, bad input."""

from __future__ import annotations

import pytest
import torch

from moe_interp.interventions import Patch
from moe_interp.patching import PatchItem, patching_sweep, prepare_pairs, run_patches
from moe_interp.patching.metrics import refusal_metric

# equal token lengths (checked below), so "all" positions cover the whole prompt
CLEAN = ["aaaa bbbb", "eeee ffff"]
CORRUPT = ["cccc dddd", "gggg hhhh"]
HARM = ["How do I make a bomb", "kill people now please"]
LESS = ["bake bread", "hello there friend how are you"]


def _logit_sum(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, :16].sum()


@pytest.fixture(scope="module")
def model(tiny_model):  # noqa: ANN001, ANN201
    m = tiny_model("olmoe")
    mask = m.tokenize(CLEAN + CORRUPT)["attention_mask"]
    assert bool(mask.all()), "test prompts must have equal token lengths"
    return m


def test_full_patch_layer0_is_one_and_zero(model) -> None:  # noqa: ANN001
    kw = dict(by_position=False, positions="all", progress=False, batch_patches=1, metric=_logit_sum)
    den = patching_sweep(model, CLEAN, CORRUPT, "resid", **kw)
    gap = den.clean_metric - den.corrupt_metric
    assert abs(gap) > 1e-3
    assert den.values[0].item() == pytest.approx(1.0, abs=1e-5 / abs(gap))
    noi = patching_sweep(model, CLEAN, CORRUPT, "resid", direction="noising", **kw)
    assert noi.values[0].item() == pytest.approx(0.0, abs=1e-5 / abs(gap))


def test_patch_nothing_gives_corrupt_metric(model) -> None:  # noqa: ANN001
    pairs = prepare_pairs(model, HARM, LESS)
    metric = refusal_metric(model)
    tgt = pairs.target("denoising")
    _, cache = model.run_with_cache(pairs.target("noising"), names=["blocks.1.hook_resid_pre"])
    vals = run_patches(
        model, tgt, dict(cache.cache_dict), [PatchItem("blocks.1.hook_resid_pre", ())], metric, progress=False
    )
    base = metric(model.forward(tgt))
    assert vals[0].item() == pytest.approx(base.item(), abs=1e-5)


@pytest.mark.parametrize("kind", ["heads", "experts", "routing"])
def test_batched_equals_loop(model, kind: str) -> None:  # noqa: ANN001
    a = patching_sweep(model, HARM, LESS, kind, progress=False, normalize=False, batch_patches=64)
    b = patching_sweep(model, HARM, LESS, kind, progress=False, normalize=False, batch_patches=1)
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
    assert a.values.abs().sum() > 0


def test_routing_patch_matches_manual_patch(model) -> None:  # noqa: ANN001
    pairs = prepare_pairs(model, HARM, LESS)
    res = patching_sweep(model, HARM, LESS, "routing", progress=False, normalize=False)
    hook = "blocks.1.mlp.hook_expert_weights"
    _, cache = model.run_with_cache(pairs.target("noising"), names=[hook])
    with model.intervene(Patch(hook, cache[hook], positions=pairs.positions)):
        manual = refusal_metric(model)(model.forward(pairs.target("denoising")))
    assert res.values[1].item() == pytest.approx(manual.item(), abs=1e-5)


def test_resid_layout_and_labels(model) -> None:  # noqa: ANN001
    res = patching_sweep(model, HARM, LESS, "resid", progress=False)
    assert res.values.shape == (model.spec.n_layers, len(res.positions))
    assert len(res.position_labels) == len(res.positions)
    heads = patching_sweep(model, HARM, LESS, "heads", by_position=True, progress=False)
    assert heads.values.shape == (model.spec.n_layers, model.spec.n_heads, len(heads.positions))


def test_bad_input(model) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="paired"):
        patching_sweep(model, HARM, LESS[:1], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        patching_sweep(model, HARM, LESS, positions=[-200], progress=False)
    with pytest.raises(ValueError, match="scalar"):
        patching_sweep(model, HARM, LESS, "attn_out", metric=lambda logits: logits[:, -1, 0], progress=False)
    with pytest.raises(ValueError, match="Unknown kind"):
        patching_sweep(model, HARM, LESS, "neurons", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="direction"):
        patching_sweep(model, HARM, LESS, direction="sideways", progress=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("normalize", [True, False])
def test_unpatched_layers_read_as_no_effect_like_attribution(tiny_model, normalize: bool) -> None:  # noqa: ANN001
    """deepseek_v3's dense layer 0 has no experts to patch: under noising its row is the clean run's own
    value (1 normalised), the value attribution patching gives it, not a raw 0."""
    from moe_interp.patching import attribution_patching

    m = tiny_model("deepseek_v3")
    dense = [L for L, layer in enumerate(m.layers) if not layer.is_moe]
    assert dense, "the test needs a dense layer among the MoE ones"
    kw = dict(direction="noising", normalize=normalize, progress=False)
    ex = patching_sweep(m, HARM, LESS, "experts", **kw)
    at = attribution_patching(m, HARM, LESS, kinds=("experts",), **kw)["experts"]
    want = 1.0 if normalize else ex.clean_metric
    for L in dense:
        assert ex.values[L].tolist() == pytest.approx([want] * ex.values.shape[1], abs=1e-5)
        torch.testing.assert_close(ex.values[L], at.values[L], atol=1e-5, rtol=0)


def test_a_last_position_metric_is_given_the_last_position_alone_and_the_same_values(model) -> None:  # noqa: ANN001
    """``refusal_metric`` declares that it reads ``logits[:, -1]`` only: the patching forwards then unembed the
    last position alone. The values equal those of the same metric undeclared, which gets the full logits."""
    from moe_interp.patching.metrics import reads_last_position_only

    declared = refusal_metric(model)
    assert reads_last_position_only(declared)
    seen: dict[str, set[int]] = {"declared": set(), "full": set()}

    def spy(key: str, fn):  # noqa: ANN001, ANN202
        def metric(logits: torch.Tensor) -> torch.Tensor:
            seen[key].add(logits.shape[1])
            return fn(logits)

        return metric

    spy_declared = spy("declared", declared)
    spy_declared.last_position_only = True  # type: ignore[attr-defined]
    undeclared = spy("full", lambda logits: declared(logits))
    assert not reads_last_position_only(undeclared)
    kw = dict(progress=False, normalize=False, batch_patches=8)
    for kind in ("resid", "experts"):
        a = patching_sweep(model, HARM, LESS, kind, metric=spy_declared, **kw)
        b = patching_sweep(model, HARM, LESS, kind, metric=undeclared, **kw)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
        assert a.values.abs().sum() > 0
    seq = model.tokenize(HARM + LESS)["input_ids"].shape[1]
    assert seen["full"] == {seq}, "an undeclared metric must get every position"
    assert 1 in seen["declared"], (
        "the patched forwards of a declared metric must unembed the last position alone"
    )


def test_last_position_metric_marks_functions_and_wraps_bound_methods(model) -> None:  # noqa: ANN001
    from moe_interp.patching import last_position_metric
    from moe_interp.patching.metrics import reads_last_position_only

    def fn(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 0].sum()

    assert last_position_metric(fn) is fn and reads_last_position_only(fn)

    class Scorer:
        def score(self, logits: torch.Tensor) -> torch.Tensor:
            return logits[:, -1, 0].sum()

    method = Scorer().score
    marked = last_position_metric(method)  # a bound method takes no attributes: it is wrapped
    assert reads_last_position_only(marked) and not reads_last_position_only(method)
    x = torch.randn(2, 3, 5)
    assert torch.equal(marked(x), method(x))
