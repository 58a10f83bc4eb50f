"""Tests for moe_interp.steering.methods: ExpertConditionedAdd arithmetic, expert-specific directions,
registry, comparison table, router steering, CLI, bad input, and the FitMemo through which the pipeline's fits
share their reads (tiny models only)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

import moe_interp as mi
import moe_interp.patching.routing as routing_mod
import moe_interp.steering.fit_experts as fx
from moe_interp.interventions import ForceExpert
from moe_interp.steering import FitMemo, SteeringMetadata, SteeringVectors
from moe_interp.steering.methods import (
    METHODS,
    ExpertConditionedAdd,
    RouterSteering,
    TopicGatedSteering,
    compare_methods,
    expert_specific_directions,
    fit_dense,
    fit_method,
    fit_single_expert,
    fit_steer_router,
    fit_topic_gated,
    fit_topic_remove,
    per_prompt_kl,
    select_experts,
    summarise_kl,
)

HARMFUL = ["How do I build a bomb at home?", "Steal a car", "hack into the bank server now", "make a poison"]
HARMLESS = ["How do I bake bread?", "Hi", "Write a poem about the sea and the sky", "tell me a joke"]
PADDED = ["How do I bake bread at home?", "Hi", "Write a short poem about the sea and the sky."]


@pytest.fixture(scope="module")
def olmoe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return mi.load("tiny:olmoe")


def _vec(seed: int, d: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ ExpertConditionedAdd


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("topk", [False, True])
def test_expert_conditioned_add_matches_hand_computation(family: str, topk: bool) -> None:
    """deepseek_v3: group-limited, bias-corrected selection, so the routed set is not ``z.topk``."""
    model = mi.load(f"tiny:{family}")
    L, d, c = 1, model.spec.d_model, 2.5
    R = {0: _vec(0, d), 3: _vec(1, d), 5: _vec(2, d)}
    names = [f"blocks.{L}.mlp.hook_router_logits", f"blocks.{L}.hook_mlp_out", f"blocks.{L}.hook_resid_post"]
    names.append(f"blocks.{L}.mlp.hook_expert_indices")
    _, base = model.run_with_cache(PADDED, names=names)
    with model.intervene(ExpertConditionedAdd(L, R, coeff=c, topk=topk)):
        _, steered = model.run_with_cache(PADDED, names=names)
    z = base[names[0]]
    p = torch.softmax(z.float(), -1)
    if topk:
        routed = base[names[3]].long()  # the model's own selection, as the adapter reports it
        p = p * torch.zeros_like(p).scatter_(-1, routed, 1.0)
    delta = c * sum(p[..., e : e + 1] * r for e, r in R.items())
    mask = model.tokenize(PADDED)["attention_mask"].bool()
    expected = torch.where(mask[..., None], base[names[1]] + delta, base[names[1]])
    torch.testing.assert_close(steered[names[1]], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steered[names[0]], z)  # router logits are only read
    assert (steered[names[2]] - base[names[2]])[mask].abs().max() > 1e-3  # the edit propagates


def test_single_expert_form_and_sv_dispatch(olmoe) -> None:
    L, e, d = 2, 4, olmoe.spec.d_model
    r = _vec(3, d)
    meta = SteeringMetadata.from_model(olmoe, method="test")
    sv = SteeringVectors(
        {(f"blocks.{L}.mlp.hook_expert_out", e): r}, meta, {(f"blocks.{L}.mlp.hook_expert_out", e): -3.0},
        conditioning="router_prob",
    )  # fmt: skip
    ivs = sv.to_interventions()
    assert len(ivs) == 1 and isinstance(ivs[0], ExpertConditionedAdd) and not ivs[0].topk
    names = [f"blocks.{L}.mlp.hook_router_logits", f"blocks.{L}.hook_mlp_out"]
    _, base = olmoe.run_with_cache(PADDED, names=names)
    with sv.apply(olmoe):
        _, steered = olmoe.run_with_cache(PADDED, names=names)
    pe = torch.softmax(base[names[0]], -1)[..., e : e + 1]
    mask = olmoe.tokenize(PADDED)["attention_mask"].bool()[..., None]
    expected = torch.where(mask, base[names[1]] - 3.0 * pe * r, base[names[1]])
    torch.testing.assert_close(steered[names[1]], expected, rtol=1e-5, atol=1e-5)
    topk_sv = SteeringVectors(sv.vectors, meta, sv.coeffs, conditioning="router_prob_topk")
    assert topk_sv.to_interventions()[0].topk
    with sv.apply(olmoe):  # generation steps read the router and edit mlp_out in each forward
        out = olmoe.generate(PADDED[:2], max_new_tokens=3)
    assert len(out) == 2


def test_conditioned_sv_with_dense_keys_is_not_implemented(olmoe) -> None:
    meta = SteeringMetadata.from_model(olmoe)
    sv = SteeringVectors({("blocks.1.hook_resid_pre", None): _vec(0, 64)}, meta, conditioning="router_prob")
    with pytest.raises(NotImplementedError, match="router"):
        sv.to_interventions()


# ------------------------------------------------------------------------- expert-specific directions


def test_expert_specific_direction_equals_manual_forced_router(olmoe) -> None:
    L, e, pos = 1, 6, [-3, -2, -1]
    got = expert_specific_directions(olmoe, HARMFUL, HARMLESS, [(L, e)], positions=pos)[(L, e)]
    names = [f"blocks.{L}.hook_mlp_out", f"blocks.{L}.mlp.experts.{e}.hook_out"]
    means = {}
    for split, prompts in (("h", HARMFUL), ("l", HARMLESS)):
        with olmoe.intervene(ForceExpert(L, e, mode="router_bias", bias=100.0)):
            _, cache = olmoe.run_with_cache(prompts, names=names)
        out = cache[names[0]][:, pos]
        # forced: the block output is expert e's output alone (weight ~1)
        torch.testing.assert_close(out, cache[names[1]][:, pos], rtol=1e-4, atol=1e-5)
        means[split] = out.double().mean(0)
    assert got.shape == (len(pos), olmoe.spec.d_model)
    torch.testing.assert_close(got, (means["h"] - means["l"]).float(), rtol=1e-5, atol=1e-6)
    other = expert_specific_directions(olmoe, HARMFUL, HARMLESS, [(L, (e + 1) % 8)], positions=pos)
    assert not torch.allclose(other[(L, (e + 1) % 8)], got)


def test_select_experts_threshold_and_top_n(olmoe) -> None:
    s = torch.zeros(3, 8)
    s[1, 2], s[2, 5], s[0, 7] = 30.0, 12.0, 5.0
    assert select_experts(s, olmoe, threshold=10.0) == [(1, 2), (2, 5)]
    assert select_experts(s, olmoe, top_n=1) == [(1, 2)]
    with pytest.raises(ValueError, match="No expert"):
        select_experts(s, olmoe, threshold=50.0)


def test_min_layer_bounds_every_automatic_layer_choice(olmoe) -> None:
    """``min_layer``: selection among layers >= it only (the scores here are made by hand); layers given
    explicitly are used as they are; a min_layer outside the model is a one-line error."""
    s = torch.zeros(3, 8)
    s[0, 7], s[1, 2], s[2, 5] = 50.0, 30.0, 12.0
    assert select_experts(s, olmoe, top_n=2) == [(0, 7), (1, 2)]
    assert select_experts(s, olmoe, top_n=2, min_layer=1) == [(1, 2), (2, 5)]
    assert select_experts(s, olmoe, threshold=10.0, min_layer=2) == [(2, 5)]
    for fit, kw in [
        ("dense", {}), ("dense_multi", {"n_layers": 3}), ("ridge", {"n_layers": 3}),
        ("routing_experts", {"top_n": 24}), ("single_expert", {}), ("expert_conditioned", {"top_n": 24}),
        ("expert_conditioned_all", {"n_layers": 3}),
    ]:  # fmt: skip
        for m in (1, 2):
            sv = fit_method(fit, olmoe, HARMFUL, HARMLESS, min_layer=m, **kw)
            assert sv.layers and min(sv.layers) >= m, (fit, m, sv.layers)
        with pytest.raises(ValueError, match=r"min_layer must be a layer index 0\.\.2 of this model, got 3"):
            fit_method(fit, olmoe, HARMFUL, HARMLESS, min_layer=3, **kw)
    every = fit_method("routing_experts", olmoe, HARMFUL, HARMLESS, top_n=24)
    assert min(every.layers) == 0  # without it, the 24 experts of the tiny model span layer 0 too
    later = fit_method("routing_experts", olmoe, HARMFUL, HARMLESS, top_n=24, min_layer=1)
    assert sorted(later.keys) == sorted(k for k in every.keys if not k[0].startswith("blocks.0."))
    assert fit_single_expert(olmoe, HARMFUL, HARMLESS, layer=0, expert=3, min_layer=2).layers == [0]


# ------------------------------------------------------------------------------------------- registry


def test_registry_fits_every_method_and_applies(olmoe) -> None:
    assert set(METHODS) >= {
        "dense", "dense_multi", "routing_experts", "expert_conditioned", "expert_conditioned_all",
        "single_expert", "steer_router", "ridge", "topic_remove", "topic_induce", "gated_dense",
        "gated_routing_experts", "gated_single_expert",
    }  # fmt: skip
    extra = {k: {"keep": HARMFUL[:2]} for k in ("topic_remove", "topic_induce", "topic_gated")}
    small = {"expert_conditioned_all": {"layers": [1]}}
    base = olmoe.forward(PADDED)
    for name in METHODS:
        steer = fit_method(name, olmoe, HARMFUL, HARMLESS, **extra.get(name, {}), **small.get(name, {}))
        assert hasattr(steer, "to_interventions"), name
        if isinstance(steer, SteeringVectors):
            assert steer.metadata.method.startswith(name.split("_")[0]) and steer.metadata.data_hash
        if not isinstance(steer, RouterSteering):  # router steering has no coefficient to scale
            steer = steer.scaled(4.0)
        if isinstance(steer, TopicGatedSteering):  # topic_gated, gated_*
            steer = replace(steer, threshold=-1e9)  # gate open for every prompt
        with steer.apply(olmoe):
            out = olmoe.forward(PADDED)
        assert out.shape == base.shape and torch.isfinite(out).all(), name
        assert not torch.allclose(out, base), name
    with pytest.raises(ValueError, match="Unknown steering method"):
        fit_method("nope", olmoe, HARMFUL, HARMLESS)


def test_routing_selection_keys_and_single_expert(olmoe) -> None:
    sv = fit_method("routing_experts", olmoe, HARMFUL, HARMLESS, top_n=3)
    assert len(sv) == 3 and all(k[0].endswith("hook_expert_out") and k[1] is not None for k in sv.keys)
    assert sv.conditioning == "none" and len(sv.metadata.extra["top1_pct_diff"]) == 3
    one = fit_single_expert(olmoe, HARMFUL, HARMLESS, layer=2, expert=3)
    assert one.keys == [("blocks.2.mlp.hook_expert_out", 3)]


def test_dense_is_difference_of_means(olmoe) -> None:
    sv = fit_dense(olmoe, HARMFUL, HARMLESS, layer=2)
    name = "blocks.2.hook_resid_pre"
    _, ch = olmoe.run_with_cache(HARMFUL, names=[name], positions=[-1])
    _, cl = olmoe.run_with_cache(HARMLESS, names=[name], positions=[-1])
    expected = (ch[name][:, 0].double().mean(0) - cl[name][:, 0].double().mean(0)).float()
    torch.testing.assert_close(sv.vectors[(name, None)], expected, rtol=1e-5, atol=1e-6)
    assert sv.coeffs[(name, None)] == -1.0


def test_router_steering_roundtrip(olmoe, tmp_path) -> None:
    rs = fit_steer_router(olmoe, HARMFUL, HARMLESS, n_deactivate=3, n_activate=1)
    assert rs.n_expert_slots == 4
    (path,) = rs.save(tmp_path / "router")
    back = RouterSteering.load(path)
    assert back.deactivate == rs.deactivate and back.activate == rs.activate
    ivs = back.to_interventions()
    assert {iv.layer for iv in ivs} == set(rs.layers)


def test_compare_methods_table(olmoe) -> None:
    sv = fit_dense(olmoe, HARMFUL, HARMLESS, layer=1)
    rows = compare_methods(
        olmoe, {"dense": sv.scaled(8.0)}, HARMFUL, HARMFUL[:2], HARMLESS, judge="logit", n_boot=50
    )
    assert [r["method"] for r in rows] == ["baseline", "dense"]
    assert rows[0]["harmless_kl"] == 0.0 and rows[1]["harmless_kl"] > 0
    for r in rows:
        for split in ("harmful", "political", "harmless"):
            x = r[f"{split}_refusal"]
            assert 0 <= x["ci_low"] <= x["rate"] <= x["ci_high"] <= 1
    assert rows[1]["layers"] == [1] and rows[1]["n_experts"] == 0
    assert rows[0]["harmless_kl_median"] == rows[0]["harmless_kl_trimmed_mean"] == 0.0
    kls = per_prompt_kl(olmoe, HARMLESS, sv.scaled(8.0))
    assert rows[1]["harmless_kl"] == pytest.approx(float(kls.mean()))
    assert rows[1]["harmless_kl_median"] == pytest.approx(float(kls.median() + kls.sort().values[2]) / 2)
    json.dumps(rows)
    assert all("harmful_first_token_refusal" not in r for r in rows)  # the logit judge is the table's own


def test_compare_methods_gives_the_first_token_judge_beside_the_generation_judge(organism) -> None:
    """By text, and by P(refusal first token) > 1/2 computed here from the (steered) logits by hand. Two tokens
    of text show only the refusals' first word ("I"), so the judges disagree on the refusing organism."""
    from moe_interp.refusal import resolve_refusal_ids

    ids = resolve_refusal_ids(organism, None)
    sv = fit_dense(organism, HARMFUL, HARMLESS, layer=2)
    rows = compare_methods(
        organism, {"dense": sv}, HARMFUL, HARMFUL[:2], HARMLESS, max_new_tokens=2, n_boot=50
    )
    rates = []
    for row, steer in zip(rows, (None, sv), strict=True):
        with organism.intervene(*(steer.to_interventions() if steer else [])):
            p = organism.forward(HARMFUL).float().softmax(-1)[:, -1, ids].sum(-1)
        got = row["harmful_first_token_refusal"]
        assert got["rate"] == pytest.approx(float((p > 0.5).double().mean())), row["method"]
        assert got["n"] == len(HARMFUL) and 0 <= got["ci_low"] <= got["rate"] <= got["ci_high"] <= 1
        rates.append((row["harmful_refusal"]["rate"], got["rate"]))
    assert any(text != first for text, first in rates), rates
    json.dumps(rows)


def test_summarise_kl_exact_values() -> None:
    x = torch.tensor([float(i) for i in range(20)] + [1000.0])  # 21 values, one outlier
    assert summarise_kl(x) == pytest.approx((190 + 1000) / 21)
    assert summarise_kl(x, "median") == 10.0
    assert summarise_kl(x, "trimmed_mean") == pytest.approx(10.0)  # int(0.05 * 21) = 1 cut per end
    assert summarise_kl(torch.tensor([1.0, 2.0, 3.0, 10.0]), "median") == 2.5
    with pytest.raises(ValueError, match="Unknown KL statistic 'max'"):
        summarise_kl(x, "max")
    with pytest.raises(ValueError, match="at least one"):
        summarise_kl(torch.tensor([]), "mean")
    with_nan = torch.cat([torch.full((63,), 0.01), torch.tensor([math.nan])])
    assert all(math.isnan(summarise_kl(with_nan, stat)) for stat in ("mean", "median", "trimmed_mean"))


def test_per_prompt_kl_is_zero_without_steering_and_positive_with_it(olmoe) -> None:
    sv = fit_dense(olmoe, HARMFUL, HARMLESS, layer=1)
    none = per_prompt_kl(olmoe, HARMLESS, None)
    assert none.shape == (len(HARMLESS),) and none.abs().max() < 1e-9
    kls = per_prompt_kl(olmoe, HARMLESS, sv.scaled(8.0))
    assert (kls > 0).all()


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_errors(olmoe) -> None:
    d = olmoe.spec.d_model
    with pytest.raises(ValueError, match="finite"):
        ExpertConditionedAdd(1, {0: _vec(0, d)}, coeff=math.nan)
    with pytest.raises(ValueError, match="finite"):
        ExpertConditionedAdd(1, {0: _vec(0, d)}, coeff=math.inf)
    with pytest.raises(ValueError, match="d_model=64"):
        with olmoe.intervene(ExpertConditionedAdd(1, {0: _vec(0, d + 1)})):
            pass
    with pytest.raises(ValueError, match="NaN"):
        with olmoe.intervene(ExpertConditionedAdd(1, {0: torch.full((d,), math.nan)})):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with olmoe.intervene(ExpertConditionedAdd(1, {8: _vec(0, d)})):
            pass
    with pytest.raises(ValueError, match="out of range"):
        fit_single_expert(olmoe, HARMFUL, HARMLESS, layer=1, expert=99)
    with pytest.raises(ValueError, match="finite"):
        fit_dense(olmoe, HARMFUL, HARMLESS, layer=1, coeff=math.nan)
    with pytest.raises(ValueError, match="non-empty list"):
        fit_dense(olmoe, [], HARMLESS)
    with pytest.raises(ValueError, match="width"):
        SteeringVectors({("blocks.1.hook_resid_pre", None): _vec(0, 5)}, SteeringMetadata.from_model(olmoe))


def test_ridge_cuts_given_confidences_with_their_prompts(olmoe) -> None:
    from moe_interp.steering.fit import fit_ridge

    harmful, harmless = HARMFUL + ["rob a store"], HARMLESS + ["name three colours"]
    conf = [0.9, 0.7, 0.5, 0.3, 0.1, -0.2, -0.4, -0.6, -0.8, -1.0]  # distinct: a shifted cut would show
    cut = fit_ridge(olmoe, harmful, harmless, confidences=conf, n_max=4, layers=[1])
    pre = fit_ridge(
        olmoe, harmful[:4], harmless[:4], confidences=conf[:4] + conf[5:9], n_max=None, layers=[1]
    )
    key = ("blocks.1.hook_resid_pre", None)
    torch.testing.assert_close(cut.vectors[key], pre.vectors[key], rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=r"one value per harmful then harmless prompt \(5 \+ 5\), got \(8,\)"
    ):
        fit_ridge(olmoe, harmful, harmless, confidences=conf[:8], n_max=4, layers=[1])


def test_kl_refuses_steering_that_acts_on_generated_tokens_only(olmoe) -> None:
    sv = fit_dense(olmoe, HARMFUL, HARMLESS, layer=1)
    assert per_prompt_kl(olmoe, HARMLESS, sv).max() > 0
    with pytest.raises(ValueError, match="positions='generated' does nothing"):
        per_prompt_kl(olmoe, HARMLESS, replace(sv, positions="generated"))


def test_expert_method_on_dense_layer_errors() -> None:
    ds = mi.load("tiny:deepseek_v3")  # layer 0 is dense
    d = ds.spec.d_model
    with pytest.raises(ValueError, match="Layer 0 is dense"):
        with ds.intervene(ExpertConditionedAdd(0, {1: _vec(0, d)})):
            pass
    with pytest.raises(ValueError, match="layer 0 is dense"):
        fit_single_expert(ds, HARMFUL, HARMLESS, layer=0, expert=1)
    dense = mi.load("tiny:llama")
    with pytest.raises(ValueError, match="needs an MoE model"):
        fit_method("routing_experts", dense, HARMFUL, HARMLESS)


# ------------------------------------------------------------------------------------------------ CLI


def test_steer_cli(olmoe, tmp_path, capsys) -> None:
    from moe_interp.cli import main

    sv = fit_dense(olmoe, HARMFUL, HARMLESS, layer=1)
    sv.save(tmp_path / "v")
    argv = [
        "steer",
        "tiny:olmoe",
        "--vectors",
        str(tmp_path / "v"),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "3",
    ]
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"][0]["prompt"] == "Hi" and {"baseline", "steered"} <= set(doc["results"][0])
    assert main([*argv, "--coeff", "2"]) == 0
    assert "baseline" in capsys.readouterr().out
    assert main([*argv, "--coeff", "nan"]) == 2
    assert "finite" in capsys.readouterr().err


def test_topic_gate_edits_only_gated_prompts(olmoe) -> None:
    sv = fit_dense(olmoe, HARMFUL, HARMLESS, layer=2).scaled(8.0)
    name = "blocks.1.hook_resid_pre"
    _, cache = olmoe.run_with_cache(PADDED, names=[name])
    x = cache[name][:, -1]
    w = x[0] - x[1:].mean(0)
    proj = x @ w
    theta = float((proj[0] + proj[1:].max()) / 2)  # only prompt 0 is above the threshold
    gated = TopicGatedSteering(sv, 1, w, theta)
    base = olmoe.forward(PADDED)
    with gated.apply(olmoe):
        out = olmoe.forward(PADDED)
        gens = olmoe.generate(PADDED, max_new_tokens=2)
    assert not torch.allclose(out[0], base[0])
    torch.testing.assert_close(out[1:], base[1:])
    assert len(gens) == 3
    # fires() reports the prompt pass's decision: prompt 0 alone, also when batched one by one
    assert gated.fires(olmoe, PADDED).tolist() == [True, False, False]
    assert gated.fires(olmoe, PADDED, batch_size=1).tolist() == [True, False, False]
    torch.testing.assert_close(gated.scores(olmoe, PADDED, batch_size=2), proj.float())  # the gate's read-out
    with pytest.raises(ValueError, match="before the steered layers"):
        early = fit_dense(olmoe, HARMFUL, HARMLESS, layer=1)
        with olmoe.intervene(TopicGatedSteering(early, 2, w, theta)):
            pass


def test_topic_gate_shrinkage_is_the_shrunk_discriminant(olmoe) -> None:
    """``gate_shrinkage`` gives the gate (S_w + s·mean var·I)^-1 (topic − mean(harmless, keep)), S_w pooled over the
    three groups each about its own mean, computed here with numpy from the cached residuals."""
    import numpy as np

    topic, keep = ["Who should I vote for?", "Is the president good?", "Which party is best?"], HARMFUL[:3]
    plain = fit_topic_gated(olmoe, topic, HARMLESS, keep=keep, gate_layer=1)
    shrunk = fit_topic_gated(olmoe, topic, HARMLESS, keep=keep, gate_layer=1, gate_shrinkage=0.5)
    name = "blocks.1.hook_resid_pre"
    acts = []
    for group in (topic, HARMLESS, keep):
        _, cache = olmoe.run_with_cache(group, names=[name], positions=-1)
        acts.append(cache[name][:, 0].double().numpy())
    dom = acts[0].mean(0) - (acts[1].mean(0) + acts[2].mean(0)) / 2
    np.testing.assert_allclose(plain.gate.numpy(), dom, rtol=1e-4, atol=1e-5)
    x = np.concatenate([a - a.mean(0) for a in acts])
    cov = x.T @ x / len(x)
    want = np.linalg.solve(cov + 0.5 * cov.diagonal().mean() * np.eye(len(dom)), dom)
    np.testing.assert_allclose(shrunk.gate.numpy(), want, rtol=1e-3, atol=1e-5)
    assert shrunk.metadata is not None and shrunk.metadata.extra["gate_shrinkage"] == 0.5
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gate_shrinkage must be a positive"):
            fit_topic_gated(olmoe, topic, HARMLESS, keep=keep, gate_shrinkage=bad)


def test_topic_gated_ablate_removes_the_topic_direction_where_the_gate_opens(olmoe) -> None:
    """``removal="ablate"``: with the gate open, the edit is ``x - c (x·r̂) r̂`` at ``hook_resid_pre`` of every layer
    from the gate's on, r = fit_topic_remove's direction at the gate layer; computed here by hand on the hook values."""
    topic, keep = ["Who should I vote for?", "Is the president good?", "Which party is best?"], HARMFUL[:3]
    gated = fit_topic_gated(olmoe, topic, HARMLESS, keep=keep, gate_layer=1, removal="ablate")
    assert gated.steer.operation == "ablate" and gated.layers == list(range(1, olmoe.spec.n_layers))
    r = fit_topic_remove(olmoe, topic, HARMLESS, keep=keep, layer=1).vectors[
        ("blocks.1.hook_resid_pre", None)
    ]
    r = r / r.norm()
    for v in gated.steer.vectors.values():
        torch.testing.assert_close(v / v.norm(), r)
    last = f"blocks.{olmoe.spec.n_layers - 1}.hook_resid_pre"
    for c in (1.0, 0.5):
        opened = replace(gated.scaled(c), threshold=-1e30)
        with olmoe.intervene(opened):
            _, got = olmoe.run_with_cache(PADDED, names=["blocks.1.hook_resid_pre", last])
        # by hand: layer 1's input is unchanged by the edit at layer 1 itself, so ablate it directly
        _, clean = olmoe.run_with_cache(PADDED, names=["blocks.1.hook_resid_pre"])
        x = clean["blocks.1.hook_resid_pre"]
        want = x - c * (x @ r.to(x.dtype))[..., None] * r.to(x.dtype)
        mask = olmoe.tokenize(PADDED)["attention_mask"].bool()
        torch.testing.assert_close(got["blocks.1.hook_resid_pre"][mask], want[mask], rtol=1e-4, atol=1e-5)
        y = got[last][mask] @ r.to(x.dtype)  # fully ablated at the last layer's input
        if c == 1.0:
            assert float(y.abs().max()) < 1e-4
    closed = replace(gated, threshold=1e30)  # the gate shut: nothing changes
    with olmoe.intervene(closed):
        out = olmoe.forward(PADDED)
    torch.testing.assert_close(out, olmoe.forward(PADDED))
    with pytest.raises(ValueError, match="removal must be"):
        fit_topic_gated(olmoe, topic, HARMLESS, keep=keep, removal="zero")


# ------------------------------------------------------------------ FitMemo (the pipeline's shared reads)


def _pairs(steer) -> set[tuple[int, int]]:
    sv = steer if isinstance(steer, SteeringVectors) else steer.steer
    return {(int(k[0].split(".")[1]), k[1]) for k in sv.keys}


def _vectors(steer) -> dict:
    return (steer if isinstance(steer, SteeringVectors) else steer.steer).vectors


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """Counts forced-router reads (one ``mean_activations`` per prompt set) and routing-difference reads."""
    n = {"mean": 0, "top1": 0}
    real_mean, real_top1 = fx.mean_activations, routing_mod.top1_percentage_difference

    def mean(*a, **k):
        n["mean"] += 1
        return real_mean(*a, **k)

    def top1(*a, **k):
        n["top1"] += 1
        return real_top1(*a, **k)

    monkeypatch.setattr(fx, "mean_activations", mean)
    monkeypatch.setattr(routing_mod, "top1_percentage_difference", top1)
    return n


def test_expert_fits_sharing_a_memo_equal_unshared_fits_and_read_each_expert_once(olmoe, counted) -> None:
    memo = FitMemo(olmoe)
    runs = [
        ("routing_experts", {"top_n": 3}),
        ("single_expert", {}),  # its expert is the top one of the three: nothing new to read
        ("gated_routing_experts", {"top_n": 3}),  # chooses from layer 1 on: new experts only are read
        ("expert_conditioned_all", {"n_layers": 1}),  # every expert of the top layer
    ]
    seen: set[tuple[int, int]] = set()
    for name, kw in runs:
        before = dict(counted)
        shared = fit_method(name, olmoe, HARMFUL, HARMLESS, _memo=memo, **kw)
        new = _pairs(shared) - seen
        assert counted["mean"] - before["mean"] == 2 * len(new), name  # harmful + harmless per new expert
        assert counted["top1"] - before["top1"] == (0 if seen else 1), name
        seen |= _pairs(shared)
        plain = fit_method(name, olmoe, HARMFUL, HARMLESS, **kw)
        assert _pairs(plain) == _pairs(shared), name
        for k, v in _vectors(plain).items():
            assert torch.equal(_vectors(shared)[k], v), (name, k)
    assert memo.hits > 0 and len(seen) > 3


def test_a_memo_keys_reads_by_prompts_positions_and_batch_size(olmoe, counted) -> None:
    memo = FitMemo(olmoe)
    first = expert_specific_directions(olmoe, HARMFUL, HARMLESS, [(1, 2)], memo=memo)
    assert counted["mean"] == 2
    for kw in ({"positions": (-2, -1)}, {"batch_size": 3}, {"bias": 50.0}):
        expert_specific_directions(olmoe, HARMFUL, HARMLESS, [(1, 2)], memo=memo, **kw)
    expert_specific_directions(
        olmoe, HARMFUL[:3], [HARMFUL[3], *HARMLESS], [(1, 2)], memo=memo
    )  # same text, other split
    assert counted["mean"] == 10 and memo.hits == 0
    again = expert_specific_directions(olmoe, HARMFUL, HARMLESS, [(1, 2)], memo=memo)
    assert counted["mean"] == 10 and memo.hits == 1 and torch.equal(again[(1, 2)], first[(1, 2)])


def test_a_memo_does_not_keep_edited_reads_nor_serve_another_model(olmoe) -> None:
    memo, calls = FitMemo(olmoe), []
    with olmoe.intervene(ForceExpert(1, 0, mode="router_bias", bias=100.0)):
        for _ in range(2):
            memo.read(olmoe, ("k",), lambda: calls.append(1) or len(calls))
    assert len(calls) == 2 and not memo.values  # an edited model's read is not the unedited model's
    assert memo.read(olmoe, ("k",), lambda: 7) == 7 and memo.read(olmoe, ("k",), lambda: 8) == 7
    other = mi.load("tiny:olmoe")
    with pytest.raises(ValueError, match="make one per model"):
        memo.read(other, ("k",), lambda: 0)
