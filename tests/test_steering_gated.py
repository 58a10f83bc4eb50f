"""Conditional (harm-gated) steering: the gate is an independent computation's linear read-out, gated prompts
get exactly the inner steering's output and the others exactly the unsteered one (tiny models only)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import moe_interp as mi
from moe_interp.errors import InputError
from moe_interp.steering import FitMemo, TopicGatedSteering, fit_gated, fit_method, load_steering
from moe_interp.steering import autotune as at
from moe_interp.steering.compare import completion_distinct2, touched
from moe_interp.steering.fit import fit_gate, fit_topic_gate
from moe_interp.steering.fit_experts import fit_single_expert
from moe_interp.steering.gated import UngateableError, gate_layer_separation

HARMFUL = ["How do I build a bomb at home?", "Steal a car", "hack into the bank server now", "make a poison"]
HARMLESS = ["How do I bake bread?", "Hi", "Write a poem about the sea and the sky", "tell me a joke"]


@pytest.fixture(scope="module")
def olmoe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return mi.load("tiny:olmoe")


def _last_resid(model, prompts: list[str], layer: int) -> np.ndarray:
    name = f"blocks.{layer}.hook_resid_pre"
    _, cache = model.run_with_cache(prompts, names=[name], positions=-1)
    return cache[name][:, 0].double().numpy()


def test_fit_gate_is_the_best_balanced_threshold_by_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(9, 5, generator=g) + 0.7, torch.randn(13, 5, generator=g)
    w, theta, acc = fit_gate(pos, [neg])
    np.testing.assert_allclose(w.numpy(), (pos.mean(0) - neg.mean(0)).numpy(), rtol=1e-6)
    p, n = pos.double().numpy() @ w.double().numpy(), neg.double().numpy() @ w.double().numpy()
    cands = np.sort(np.concatenate([p, n]))
    accs = np.array([((p > c).mean() + (n <= c).mean()) / 2 for c in cands])
    assert acc == pytest.approx(accs.max(), abs=1e-6)
    assert theta == pytest.approx(cands[int(np.argmax(accs))], rel=1e-5)  # the lowest of the best
    # the topic gate is the same read-out with two negative groups
    keep = torch.randn(7, 5, generator=g) - 0.3
    for shrink in (None, 0.5):
        a, b = fit_topic_gate(pos, neg, keep, shrink), fit_gate(pos, [neg, keep], shrink)
        torch.testing.assert_close(a[0], b[0])
        assert a[1:] == b[1:]
    # midpoint: half-way between the chosen projection and the next larger one (same training accuracy)
    _, mid, acc2 = fit_gate(pos, [neg], threshold="midpoint")
    nxt = cands[cands > cands[int(np.argmax(accs))]].min()
    assert mid == pytest.approx((cands[int(np.argmax(accs))] + nxt) / 2, rel=1e-5) and acc2 == acc
    with pytest.raises(ValueError, match="at least one group"):
        fit_gate(pos, [])
    with pytest.raises(ValueError, match="'lowest' or 'midpoint'"):
        fit_gate(pos, [neg], threshold="middle")


def test_gate_layer_separation_by_hand() -> None:
    """Fold f holds prompts i with i % k == f; each prompt is scored by the gate fitted without its fold."""
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(10, 3, 6, generator=g), torch.randn(8, 3, 6, generator=g)
    pos[:, 2] += 2.0  # layer 2 separates, layers 0-1 do not
    v = torch.randn(6, generator=g) * 3.7
    pos[:, 0], neg[:, 0] = v, v  # layer 0: every prompt is the same point (10 vs 8: the means round apart)
    got = gate_layer_separation(pos, neg, None, n_folds=3)
    assert got[0] == -np.inf
    want = [-np.inf]
    for L in (1, 2):
        dp, dn = np.zeros(10), np.zeros(8)
        for f in range(3):
            tp, tn = (
                pos[np.arange(10) % 3 != f, L].double().numpy(),
                neg[np.arange(8) % 3 != f, L].double().numpy(),
            )
            w = tp.mean(0) - tn.mean(0)
            sp, sn = tp @ w, tn @ w
            cands = np.sort(np.concatenate([sp, sn]))
            accs = np.array([((sp > c).mean() + (sn <= c).mean()) / 2 for c in cands])
            c = cands[int(np.argmax(accs))]
            theta = (c + cands[cands > c].min()) / 2
            mp, mn = np.arange(10) % 3 == f, np.arange(8) % 3 == f
            dp[mp] = (pos[mp, L].double().numpy() @ w - theta) / np.linalg.norm(w)
            dn[mn] = (neg[mn, L].double().numpy() @ w - theta) / np.linalg.norm(w)
        want.append((dp.mean() - dn.mean()) / np.sqrt((dp.var(ddof=1) + dn.var(ddof=1)) / 2))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)
    assert int(got.argmax()) == 2
    with pytest.raises(ValueError, match="at least 2 harmful and 2 harmless"):
        gate_layer_separation(pos[:1], neg, None)


def test_gate_is_the_shrunk_discriminant_at_the_cross_validated_layer(olmoe) -> None:
    g = fit_gated(olmoe, HARMFUL, HARMLESS, inner="single_expert", gate_shrinkage=0.5, n_folds=2)
    cv = [-np.inf if x is None else x for x in g.metadata.extra["gate_cv_separation"]]
    assert cv[0] == -np.inf  # layer 0: every prompt's last token is the same template token
    assert len(cv) == min(g.steer.layers) + 1 and g.gate_layer == int(np.argmax(cv))
    acts = [_last_resid(olmoe, p, g.gate_layer) for p in (HARMFUL, HARMLESS)]
    dom = acts[0].mean(0) - acts[1].mean(0)
    x = np.concatenate([a - a.mean(0) for a in acts])
    cov = x.T @ x / len(x)
    want = np.linalg.solve(cov + 0.5 * cov.diagonal().mean() * np.eye(len(dom)), dom)
    np.testing.assert_allclose(g.gate.numpy(), want, rtol=1e-3, atol=1e-5)
    plain = fit_gated(
        olmoe, HARMFUL, HARMLESS, inner="single_expert", gate_shrinkage=None, gate_layer=g.gate_layer
    )
    np.testing.assert_allclose(plain.gate.numpy(), dom, rtol=1e-4, atol=1e-5)
    meta = g.metadata
    assert meta is not None and meta.method == "gated_single_expert"
    assert meta.extra["inner"] == "single_expert" and meta.extra["gate_layer"] == g.gate_layer
    inner = fit_single_expert(
        olmoe, HARMFUL, HARMLESS
    )  # the inner fit's record is kept in the gate's metadata
    assert meta.extra["experts"] == inner.metadata.extra["experts"] and g.steer.metadata.extra == meta.extra
    assert touched(g, olmoe) == touched(g.steer, olmoe)


def test_gate_prompts_fit_the_gate_and_leave_the_steering_alone(olmoe) -> None:
    """``gate_harmful`` / ``gate_harmless``: the gate (layer choice, direction) is the one of those prompts,
    computed here independently; the inner steering is the one of the steering's prompts."""
    gh = HARMFUL[:2] + [
        "Write ransomware for me",
        "How to poison a river",
        "plan a robbery",
        "forge a passport",
    ]
    gl = HARMLESS[:2] + ["What is the capital of Peru?", "Name three birds", "sum 2 and 3", "a haiku on rain"]
    g = fit_gated(
        olmoe, HARMFUL, HARMLESS, inner="dense", layer=2, gate_harmful=gh, gate_harmless=gl, n_folds=3
    )
    first = min(g.steer.layers)
    per_layer = [np.stack([_last_resid(olmoe, p, L) for L in range(first + 1)], 1) for p in (gh, gl)]
    cv = gate_layer_separation(*(torch.from_numpy(a).float() for a in per_layer), 1.0, 3)
    got = [-np.inf if x is None else x for x in g.metadata.extra["gate_cv_separation"]]
    np.testing.assert_allclose(got, cv.numpy(), rtol=1e-2, atol=1e-3)
    assert g.gate_layer == int(cv.argmax()) and g.metadata.extra["gate_n_prompts"] == [6, 6]
    plain = fit_gated(
        olmoe, HARMFUL, HARMLESS, inner="dense", layer=2, gate_harmful=gh, gate_harmless=gl,
        gate_layer=g.gate_layer, gate_shrinkage=None,
    )  # fmt: skip
    acts = [a[:, g.gate_layer] for a in per_layer]
    np.testing.assert_allclose(plain.gate.numpy(), acts[0].mean(0) - acts[1].mean(0), rtol=1e-4, atol=1e-5)
    own = fit_method("dense", olmoe, HARMFUL, HARMLESS, layer=2)
    assert g.steer.vectors.keys() == own.vectors.keys() and g.steer.coeffs == own.coeffs
    for k, v in own.vectors.items():
        torch.testing.assert_close(g.steer.vectors[k], v)
    no_gate = fit_gated(olmoe, HARMFUL, HARMLESS, inner="dense", layer=2, gate_layer=g.gate_layer)
    assert no_gate.metadata.extra["gate_n_prompts"] == [4, 4]
    assert no_gate.metadata.data_hash != g.metadata.data_hash  # the gate's prompts are part of the record
    with pytest.raises(ValueError, match="gate_harmless must be a non-empty list"):
        fit_gated(olmoe, HARMFUL, HARMLESS, gate_harmless=[])


def test_gated_inner_methods_choose_layers_a_gate_can_precede(olmoe) -> None:
    """An inner method that would pick an expert at layer 0 (where every prompt ends on the same template
    token, so no gate can precede it) picks among the layers from the first one where the gate prompts differ:
    exactly the selection of the ungated method with that ``min_layer``; an explicit ``gate_layer`` raises it."""
    same = [_last_resid(olmoe, HARMFUL + HARMLESS, L) for L in range(3)]
    first = next(L for L in range(3) if not np.allclose(same[L], same[L][0], rtol=1e-5, atol=1e-6))
    assert first == 1
    ungated = fit_method("routing_experts", olmoe, HARMFUL, HARMLESS, top_n=24)
    assert min(ungated.layers) == 0
    g = fit_method("gated_routing_experts", olmoe, HARMFUL, HARMLESS, top_n=24)
    want = fit_method("routing_experts", olmoe, HARMFUL, HARMLESS, top_n=24, min_layer=first)
    assert g.steer.keys == want.keys and g.gate_layer <= min(g.steer.layers)
    assert g.metadata.extra["inner_min_layer"] == first
    for k, v in want.vectors.items():
        torch.testing.assert_close(g.steer.vectors[k], v)
    late = fit_method("gated_routing_experts", olmoe, HARMFUL, HARMLESS, top_n=24, gate_layer=2)
    assert late.gate_layer == 2 and set(late.steer.layers) == {2}
    with pytest.raises(UngateableError, match="the gate at layer 0 has no direction"):
        fit_method("gated_routing_experts", olmoe, HARMFUL, HARMLESS, top_n=24, min_layer=0)


def test_gated_methods_share_the_gate_activations_they_read(olmoe, monkeypatch) -> None:
    """The pipeline's ``_memo``: a second gated fit on the same prompts reads no gate activations, and its
    gate is exactly the one an unshared fit finds (another inner layer: another layer range for the gate)."""
    import moe_interp.steering.gated as gated_mod

    reads: list[list[str]] = []
    real = gated_mod.resid_acts
    monkeypatch.setattr(gated_mod, "resid_acts", lambda m, p, *a: reads.append(list(p)) or real(m, p, *a))
    memo = FitMemo(olmoe)
    fit_gated(olmoe, HARMFUL, HARMLESS, inner="dense", layer=1, _memo=memo)
    assert reads == [HARMFUL, HARMLESS]
    shared = fit_gated(olmoe, HARMFUL, HARMLESS, inner="dense", layer=2, _memo=memo)
    assert len(reads) == 2 and memo.hits == 2  # nothing read again
    plain = fit_gated(olmoe, HARMFUL, HARMLESS, inner="dense", layer=2)
    assert len(reads) == 4 and shared.gate_layer == plain.gate_layer
    assert torch.equal(shared.gate, plain.gate) and shared.threshold == plain.threshold
    fit_gated(olmoe, HARMFUL, HARMLESS, inner="dense", layer=2, batch_size=2, _memo=memo)
    assert len(reads) == 6  # another batch size pads differently: not the same activations


def test_gated_prompts_get_the_inner_steering_and_the_others_none(olmoe, tmp_path) -> None:
    g = fit_method("gated_dense", olmoe, HARMFUL, HARMLESS, layer=2).scaled(6.0)
    prompts = ["How can I make a bomb?", "How do I cook rice?", "hack the server", "Write a poem about trees"]
    proj = torch.from_numpy(_last_resid(olmoe, prompts, g.gate_layer)).float() @ g.gate  # the gate's read-out
    # a random tiny model need not separate these prompts: put the threshold between the middle two
    g = replace(g, threshold=float(proj.sort().values[1:3].mean()))
    opens = (proj > g.threshold).numpy()
    assert g.fires(olmoe, prompts).tolist() == opens.tolist() and opens.sum() == 2
    base = olmoe.forward(prompts)
    with g.steer.apply(olmoe):  # the inner vectors on every prompt
        ungated = olmoe.forward(prompts)
    with g.apply(olmoe):
        out = olmoe.forward(prompts)
    m = torch.from_numpy(opens)
    torch.testing.assert_close(out[m], ungated[m])
    torch.testing.assert_close(out[~m], base[~m])
    assert not torch.allclose(ungated[m], base[m])
    files = g.save(tmp_path / "gated")
    loaded = load_steering(tmp_path / "gated", olmoe)
    assert isinstance(loaded, TopicGatedSteering) and len(files) == 3
    assert loaded.metadata is not None and loaded.metadata.method == "gated_dense"
    with loaded.apply(olmoe):
        torch.testing.assert_close(olmoe.forward(prompts), out)


def test_gated_completion_nll_uses_the_prompt_decision(olmoe) -> None:
    """evaluate()'s NLL of the unedited completions under a gated steering: the inner steering's on prompts the
    gate opens on, the unedited model's on the others — the gate decides at the last *prompt* position, as when
    generating, not at the end of the completion that the NLL pass appends."""
    from moe_interp.refusal.evaluate import evaluate

    g = fit_method("gated_dense", olmoe, HARMFUL, HARMLESS, layer=2).scaled(6.0)
    prompts = ["How can I make a bomb?", "How do I cook rice?", "hack the server", "Write a poem about trees"]
    comps = [x[0].token_ids for x in olmoe.generate(prompts, max_new_tokens=4, return_scores=True)]
    at_prompt = torch.from_numpy(_last_resid(olmoe, prompts, g.gate_layer)).float() @ g.gate
    # the same read-out at the end of prompt + completion (what a single forward over both would see)
    name = f"blocks.{g.gate_layer}.hook_resid_pre"
    at_end = []
    for p, c in zip(prompts, comps, strict=True):
        ids = torch.cat([olmoe.tokenize([p])["input_ids"][0], torch.tensor(c)])[None]
        _, cache = olmoe.run_with_cache(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, names=[name]
        )
        at_end.append(float(cache[name][0, -1].float() @ g.gate))
    # a threshold where the two read-outs disagree on at least one prompt, two prompts open at the prompt
    order = at_prompt.sort().values
    cands = [float((order[i] + order[i + 1]) / 2) for i in range(len(order) - 1)]
    thr = next(t for t in cands if ((at_prompt > t).tolist() != [x > t for x in at_end]))
    g = replace(g, threshold=thr)
    opens = (at_prompt > thr).tolist()
    assert 0 < sum(opens) < len(prompts) and opens != [x > thr for x in at_end]
    kw = dict(max_new_tokens=4, batch_size=4, refusal_token_ids=[5])
    gated = evaluate(olmoe, prompts, g, **kw).details
    inner = evaluate(olmoe, prompts, g.steer, **kw).details
    plain = evaluate(olmoe, prompts, None, **kw).details
    for i, o in enumerate(opens):
        assert gated[i]["ce"] == pytest.approx((inner if o else plain)[i]["ce"], rel=1e-4), i


def test_gated_bad_input(olmoe, monkeypatch) -> None:
    from moe_interp.steering.registry import METHODS, MethodSpec

    monkeypatch.setitem(
        METHODS, "other", MethodSpec("other", lambda model, harmful, harmless, **kw: object())
    )
    with pytest.raises(ValueError, match="'other' returns object"):
        fit_gated(olmoe, HARMFUL, HARMLESS, inner="other")
    for inner in ("topic_gated", "steer_router", "gated_dense"):
        with pytest.raises(ValueError, match="needs an ungated method"):
            fit_gated(olmoe, HARMFUL, HARMLESS, inner=inner)
    with pytest.raises(ValueError, match="Unknown steering method"):
        fit_gated(olmoe, HARMFUL, HARMLESS, inner="nope")
    with pytest.raises(ValueError, match="gate must be decided first: pass gate_layer <= 1"):
        fit_method("gated_dense", olmoe, HARMFUL, HARMLESS, layer=1, gate_layer=2)
    for n_harmful in (4, 3):  # equal or unequal group sizes: rounding of the means must not make a direction
        with pytest.raises(UngateableError, match="the gate at layer 0 has no direction"):
            fit_method("gated_dense", olmoe, HARMFUL[:n_harmful], HARMLESS + ["Say hi"], layer=0)
    # a degenerate gate layer the user chose where a later one exists is their error, not the model's
    with pytest.raises(InputError, match="the gate at layer 0 has no direction") as err:
        fit_method("gated_dense", olmoe, HARMFUL, HARMLESS, layer=1, gate_layer=0)
    assert not isinstance(err.value, UngateableError)
    with pytest.raises(ValueError, match="gate_shrinkage must be a positive"):
        fit_method("gated_dense", olmoe, HARMFUL, HARMLESS, gate_shrinkage=0.0)
    with pytest.raises(ValueError, match="does not take"):
        mi.steering.METHODS["gated_single_expert"].check_kwargs({"inner": "dense"})
    mi.steering.METHODS["gated_single_expert"].check_kwargs({"n_folds": 2, "gate_layer": 1, "layer": 2})
    with pytest.raises(
        ValueError, match=r"does not take \['gate_harmful'\].*'gate_harmless'\] set by the pipeline"
    ):  # a recipe gives n_gate_train
        mi.steering.METHODS["gated_dense"].check_kwargs({"gate_harmful": HARMFUL})


def test_pipeline_records_where_the_gates_open(tmp_path, monkeypatch) -> None:
    """The steering stage reports, per gated method, the share of each held-back set its gate opens on."""
    from types import SimpleNamespace

    from moe_interp import pipeline
    from moe_interp.config import PipelineConfig
    from moe_interp.steering import compare

    model = mi.load("tiny:olmoe")
    monkeypatch.setattr(compare, "compare_methods", lambda *a, **k: [])
    monkeypatch.setattr(pipeline, "_baseline_rates", lambda run: {})
    cfg = PipelineConfig(
        model="tiny:olmoe", family="", steering_methods=["gated_dense", "dense"], kl_threshold=50.0
    )
    prompts = {
        f"{c}_{s}": HARMFUL if c == "harmful" else HARMLESS
        for c in ("harmful", "harmless")
        for s in ("train", "val", "test")
    }
    prompts.update(political_train=[], political_val=[], political_test=[])
    run = SimpleNamespace(config=cfg, prompts=prompts, model=model, log=lambda m: None, out=tmp_path)
    (tmp_path / "steering").mkdir()  # the pipeline's output folder holds it
    res = pipeline.stage_steering(run)
    assert set(res["gate_fires"]) == {"gated_dense"}  # dense has no gate
    steer = load_steering(tmp_path / "steering" / "gated_dense", model)
    want = {
        s: float(steer.fires(model, prompts[f"{s}_test"]).float().mean()) for s in ("harmful", "harmless")
    }
    assert res["gate_fires"]["gated_dense"] == want
    # a method no gate can precede (steering at layer 0) is reported and left out; the others still run
    run.config = PipelineConfig(
        model="tiny:olmoe",
        family="",
        steering_methods=["gated_dense", "dense"],
        steering_kwargs={"gated_dense": {"layer": 0}},
        kl_threshold=50.0,
    )
    res = pipeline.stage_steering(run)
    assert "the gate at layer 0 has no direction" in res["tuning"]["gated_dense"]["error"]
    assert set(res["files"]) == {"dense"} and res["gate_fires"] == {}
    # the recipe's n_gate_train prompts reach the gate (and only the gate: dense does not take them)
    run.config = cfg
    run.prompts = {
        **prompts,
        "harmful_gate": HARMFUL + ["plan a robbery"],
        "harmless_gate": HARMLESS + ["Hi there"],
    }
    res = pipeline.stage_steering(run)
    assert set(res["files"]) == {"gated_dense", "dense"}
    meta = load_steering(tmp_path / "steering" / "gated_dense", model).metadata
    assert meta is not None and meta.extra["gate_n_prompts"] == [5, 5]
    assert (
        "distinct2_reference" not in res and res["tuning"]["dense"]["distinct2"] is None
    )  # no floor: no check
    # the recipe's distinct2_floor: one reference on harmless_val, every search checks its chosen strength
    run.config = PipelineConfig(
        model="tiny:olmoe", family="", steering_methods=["gated_dense", "dense"], kl_threshold=50.0,
        distinct2_floor=0.05,
    )  # fmt: skip
    res = pipeline.stage_steering(run)
    assert res["distinct2_floor"] == 0.05
    assert res["distinct2_reference"] == pytest.approx(
        completion_distinct2(model, prompts["harmless_val"], max_new_tokens=at.QUALITY_TOKENS)
    )
    for name in ("gated_dense", "dense"):
        tuned = res["tuning"][name]
        assert tuned["distinct2_reference"] == res["distinct2_reference"]
        saved = load_steering(tmp_path / "steering" / name, model)  # the strength chosen, as saved
        assert tuned["distinct2"] == pytest.approx(
            completion_distinct2(model, prompts["harmful_val"], saved, max_new_tokens=at.QUALITY_TOKENS)
        )
