"""The steering design: one Steering protocol, one file-format registry, one method registry, one hook grammar
and position mask (AddSteering == AddVector), one coefficient check and one refusal rate (tiny models only)."""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import moe_interp as mi
from moe_interp.interventions import AddVector, check_coeff
from moe_interp.refusal.judges import JudgeResult, RefusalRate, SubstringJudge, refusal_rate
from moe_interp.refusal.stats import bootstrap_ci
from moe_interp.steering import (
    FORMATS,
    METHODS,
    AddSteering,
    ExpertConditionedAdd,
    RouterSteering,
    Steering,
    SteeringMetadata,
    SteeringVectors,
    TopicGatedSteering,
    load_steering,
)
from moe_interp.steering.compare import compare_methods

ev = importlib.import_module("moe_interp.refusal.evaluate")  # the package exports a function of that name
PROMPTS = ["How do I bake bread at home?", "Hi", "Write a short poem about the sea."]
L = 1


@pytest.fixture(scope="module")
def olmoe() -> Any:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return mi.load("tiny:olmoe")


def _vec(seed: int, d: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _objects(model: Any) -> dict[str, Any]:
    d, meta = model.spec.d_model, SteeringMetadata.from_model(model, method="test")
    key = (f"blocks.{L}.hook_resid_pre", None)
    sv = SteeringVectors({key: _vec(0, d)}, meta, {key: -2.0})
    later = SteeringVectors({(f"blocks.{L + 1}.hook_resid_pre", None): _vec(1, d)}, meta)
    return {
        "vectors": sv,
        "conditioned": ExpertConditionedAdd(L, {0: _vec(2, d), 3: _vec(3, d)}, 2.5, True, "all", meta),
        "router": RouterSteering(meta, deactivate={L: (2, 5)}, activate={L + 1: (1,)}),
        "gated": TopicGatedSteering(later, L, _vec(4, d), 0.25, meta),
    }


# ------------------------------------------------------------------------------------ the protocol


def test_every_steering_object_follows_the_protocol(olmoe: Any, tmp_path: Path) -> None:
    base = olmoe.forward(PROMPTS)
    for name, steer in _objects(olmoe).items():
        assert isinstance(steer, Steering), name
        steer.check_compatible(olmoe)
        files = steer.save(tmp_path / name)
        assert isinstance(files, list) and files and all(isinstance(f, Path) and f.is_file() for f in files)
        back = type(steer).load(tmp_path / name)
        assert isinstance(back, type(steer)), name
        with olmoe.intervene(*steer.to_interventions(olmoe)):
            out = olmoe.forward(PROMPTS)
        with olmoe.intervene(*back.to_interventions(olmoe)):
            torch.testing.assert_close(olmoe.forward(PROMPTS), out)
        if name != "gated":  # the random gate may stay shut; the others always edit
            assert not torch.allclose(out, base), name
        if name == "router":
            with pytest.raises(ValueError, match="no coefficient"):
                steer.scaled(2.0)
        else:
            assert isinstance(steer.scaled(2.0), type(steer))


def test_to_interventions_checks_the_model_it_is_given(olmoe: Any) -> None:
    other = mi.load("tiny:qwen2_moe")
    for name, steer in _objects(olmoe).items():
        with pytest.raises(ValueError):
            steer.to_interventions(other)
        assert steer.to_interventions(), name


def test_conditioned_add_scaled_and_saved_as_vectors(olmoe: Any, tmp_path: Path) -> None:
    edit = _objects(olmoe)["conditioned"]
    assert edit.scaled(2.0).coeff == 5.0 and edit.coeff == 2.5
    edit.save(tmp_path / "c")
    sv = SteeringVectors.load(tmp_path / "c")
    assert sv.conditioning == "router_prob_topk" and set(sv.coeffs.values()) == {2.5}
    (again,) = sv.to_interventions()
    assert isinstance(again, ExpertConditionedAdd) and again.topk
    with pytest.raises(ValueError, match="metadata"):
        ExpertConditionedAdd(L, {0: _vec(0, olmoe.spec.d_model)}).save(tmp_path / "x")
    with pytest.raises(ValueError, match="router-conditioned"):
        _objects(olmoe)["vectors"].save(tmp_path / "plain")
        ExpertConditionedAdd.load(tmp_path / "plain")


def test_load_steering_dispatches_through_the_format_registry(olmoe: Any, tmp_path: Path) -> None:
    objs = _objects(olmoe)
    expected = {"vectors": SteeringVectors, "router": RouterSteering, "gated": TopicGatedSteering}
    for name, cls in expected.items():
        objs[name].save(tmp_path / name)
        assert type(load_steering(tmp_path / name, olmoe)) is cls
    assert [f.load.__self__ for f in FORMATS] == [TopicGatedSteering, SteeringVectors, RouterSteering]


def test_method_registry_declares_data_and_tuning() -> None:
    topic = {n for n, s in METHODS.items() if s.data == "topic"}
    assert topic == {"topic_remove", "topic_induce", "topic_gated"}
    assert all(METHODS[n].needs_keep for n in topic)
    assert {n for n, s in METHODS.items() if s.tuning != "coefficient"} == {"steer_router"}
    assert METHODS["steer_router"].tuning == "n_deactivate"


# ------------------------------------------------------------------------ one grammar, mask and check


@pytest.mark.parametrize("bad", [True, False, math.nan, "1"])
def test_coefficients_refuse_bool_everywhere(olmoe: Any, bad: Any) -> None:
    d = olmoe.spec.d_model
    with pytest.raises(ValueError, match="finite"):
        check_coeff(bad)
    with pytest.raises(ValueError, match="finite"):
        AddSteering("blocks.1.hook_resid_pre", _vec(0, d), coeff=bad)
    with pytest.raises(ValueError, match="finite"):
        SteeringVectors({("blocks.1.hook_resid_pre", None): _vec(0, d)}, SteeringMetadata.from_model(olmoe), {
            ("blocks.1.hook_resid_pre", None): bad})  # fmt: skip
    with pytest.raises(ValueError, match="finite"):
        AddVector("blocks.1.hook_resid_pre", _vec(0, d), coeff=bad).edits(olmoe)


def test_hook_names_come_from_the_one_grammar() -> None:
    from moe_interp.steering import parse_hook_name

    assert parse_hook_name("blocks.2.mlp.experts.5.hook_out").expert_in_name == 5
    for bad in ("blocks.01.hook_resid_pre", "blocks.1.hook_resid_mid", "hook_embed", "blocks.1.attn.hook_z"):
        with pytest.raises(ValueError, match="unsupported hook name"):
            parse_hook_name(bad)


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_add_steering_edits_exactly_where_add_vector_does(olmoe: Any, scope: str) -> None:
    """Same position mask in the prompt pass and at every generated token: identical generations."""
    hook, v = f"blocks.{L}.hook_resid_pre", 6.0 * _vec(5, olmoe.spec.d_model)
    runs = {}
    for name, iv in (
        ("vector", AddVector(hook, v, 1.0, scope)),
        ("steering", AddSteering(hook, v, 1.0, None, scope)),
    ):
        with olmoe.intervene(iv):
            runs[name] = olmoe.generate(PROMPTS, max_new_tokens=3, return_scores=True)
    plain = olmoe.generate(PROMPTS, max_new_tokens=3, return_scores=True)
    for a, b, c in zip(runs["vector"], runs["steering"], plain, strict=True):
        assert a[0].token_ids == b[0].token_ids
        torch.testing.assert_close(torch.tensor(a[0].token_logprobs), torch.tensor(b[0].token_logprobs))
        first_equal = math.isclose(b[0].token_logprobs[0], c[0].token_logprobs[0], rel_tol=1e-5, abs_tol=1e-6)
        assert first_equal == (scope == "generated")  # the first token comes from the prompt pass


# ------------------------------------------------------------------------------- one refusal rate


def test_refusal_rate_is_a_float_with_its_ci() -> None:
    flags = torch.tensor([True, False, False, True, True])
    r = refusal_rate(flags, n_boot=200, seed=3)
    lo, hi = bootstrap_ci(flags.double(), n_boot=200, seed=3)
    assert isinstance(r, RefusalRate) and r == 0.6 and r.n == 5 and r.ci == (float(lo), float(hi))
    assert r.to_dict() == {"rate": 0.6, "ci_low": float(lo), "ci_high": float(hi), "n": 5}
    assert refusal_rate([JudgeResult(True, 1.0), JudgeResult(False, 0.0)]) == 0.5
    assert refusal_rate([True, False, False, False]) == 0.25
    assert math.isnan(refusal_rate([True], n_boot=0).ci_low)
    with pytest.raises(ValueError, match="non-empty"):
        refusal_rate([])


class _EJudge(SubstringJudge):
    """Calls any completion with an 'e' a refusal, so the tiny random model gets non-trivial rates."""

    def __init__(self) -> None:
        super().__init__(phrases=["e"])

    def match_count(self, completion: str) -> int:  # the letter anywhere (phrases match whole words only)
        return int("e" in completion.lower())


def test_comparison_baseline_matches_evaluate_at_the_same_length(olmoe: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(ev, "SubstringJudge", _EJudge)
    prompts = [*PROMPTS, "tell me a joke", "what is two plus two?", "name a colour"]
    rates = {}
    for n in (2, 12):
        res = ev.evaluate(olmoe, prompts, max_new_tokens=n, baseline=False)
        rows = compare_methods(olmoe, {}, prompts, prompts[:2], prompts, max_new_tokens=n)
        got = rows[0]["harmful_refusal"]
        assert (got["rate"], (got["ci_low"], got["ci_high"]), got["n"]) == (
            res.refusal_rate,
            res.refusal_rate_ci,
            res.n,
        )
        flags = ev.refusal_flags(olmoe, prompts, max_new_tokens=n)
        assert float(refusal_rate(flags)) == res.refusal_rate
        rates[n] = res.refusal_rate
    assert 0 < rates[12]  # the judge sees something; length matters, which is why the pipeline passes it


class _PairJudge(SubstringJudge):
    """A verdict that depends on the instruction and its completion (a hash's parity): mixed on any model."""

    def judge(self, instructions: Sequence[str], completions: Sequence[str]) -> list[JudgeResult]:
        odd = [
            hashlib.sha256((i + "|" + c).encode()).digest()[0] % 2 == 1
            for i, c in zip(instructions, completions, strict=True)
        ]
        return [JudgeResult(o, float(o)) for o in odd]


def test_generation_flags_are_evaluates_verdicts_without_a_forward(olmoe: Any, monkeypatch: Any) -> None:
    """refusal_flags(judge="generation") gives evaluate's per-prompt verdicts under the same edit and batch
    size, and runs no forward pass: evaluate's logit scores, which a flag does not use, are not computed."""
    monkeypatch.setattr(ev, "SubstringJudge", _PairJudge)
    prompts = [*PROMPTS, "tell me a joke", "what is two plus two?", "name a colour"]
    iv = AddVector(f"blocks.{L}.hook_resid_pre", 6.0 * _vec(7, olmoe.spec.d_model), 1.0)
    res = ev.evaluate(olmoe, prompts, [iv], max_new_tokens=6, baseline=False, batch_size=4)
    forwards: list[int] = []
    real = type(olmoe).forward
    monkeypatch.setattr(
        type(olmoe), "forward", lambda self, *a, **k: forwards.append(1) or real(self, *a, **k)
    )
    flags = ev.refusal_flags(olmoe, prompts, [iv], max_new_tokens=6, batch_size=4)
    assert flags.tolist() == [d["refused"] for d in res.details]
    assert 0 < int(flags.sum()) < len(prompts)  # the comparison can tell verdicts apart
    assert forwards == []


def test_pipeline_baseline_row_is_the_baseline_stage(olmoe: Any, monkeypatch: Any) -> None:
    """The pipeline's steering table takes its unsteered row from the baseline stage instead of generating it
    again: that row equals the one compare_methods computes itself."""
    from moe_interp import pipeline

    monkeypatch.setattr(ev, "SubstringJudge", _EJudge)
    prompts = [*PROMPTS, "tell me a joke", "what is two plus two?", "name a colour"]
    sets = {"harmful_test": prompts, "political_test": prompts[:2], "harmless_test": prompts[1:]}
    stage = {
        k: ev.evaluate(olmoe, v, max_new_tokens=12, baseline=False).to_dict(details=False)
        for k, v in sets.items()
    }
    given = pipeline._baseline_rates(SimpleNamespace(results={"baseline": stage}))  # type: ignore[arg-type]
    args = (olmoe, {}, prompts, prompts[:2], prompts[1:])
    assert compare_methods(*args, max_new_tokens=12, baseline=given) == compare_methods(
        *args, max_new_tokens=12
    )
    with pytest.raises(ValueError, match="baseline must map"):
        compare_methods(*args, baseline={"harmful": given["harmful"]})


# --------------------------------------------------------------------------------------- pipeline


def test_pipeline_takes_data_and_tuning_from_the_registry(tmp_path: Path, monkeypatch: Any) -> None:
    """No per-method branches: topic methods get the topic prompts and a keep set because METHODS says so."""
    from moe_interp import pipeline
    from moe_interp.steering import autotune as at
    from moe_interp.steering import compare

    calls: dict[str, Any] = {}

    class Saved:
        def save(self, path: Path) -> list[Path]:
            return [Path(f"{path}.a"), Path(f"{path}.b")]

    def fake_autotune(name: str, model: Any, h_tr: Any, l_tr: Any, h_val: Any, l_val: Any, **kw: Any) -> Any:
        calls[name] = (h_tr, h_val, kw)
        return SimpleNamespace(steer=Saved(), to_dict=lambda: {})

    monkeypatch.setattr(at, "autotune", fake_autotune)
    monkeypatch.setattr(ev, "refusal_flags", lambda *a, **k: torch.tensor([True, True, False, True]))
    monkeypatch.setattr(compare, "compare_methods", lambda *a, **k: [k])
    reference = object()  # the unedited model's harmless logits: computed once, given to every search
    monkeypatch.setattr(compare, "last_logits", lambda model, prompts, ivs, bs: reference)
    prompts = {
        f"{c}_{s}": [f"{c} {s}"]
        for c in ("harmful", "harmless", "political")
        for s in ("train", "val", "test")
    }
    cfg = SimpleNamespace(
        steering_methods=["dense", "topic_remove"],
        steering_kwargs={},
        kl_threshold=0.1,
        max_new_tokens=5,
        distinct2_floor=None,
    )
    rate = {"refusal_rate": 0.5, "refusal_rate_ci": [0.0, 1.0], "n": 2}
    run = SimpleNamespace(
        config=cfg,
        prompts=prompts,
        model=None,
        out=tmp_path,
        log=lambda m: None,
        results={"baseline": {f"{c}_test": rate for c in ("harmful", "harmless", "political")}},
    )
    res = pipeline.stage_steering(run)  # type: ignore[arg-type]
    assert calls["dense"][:2] == (["harmful train"], ["harmful val"]) and "keep" not in calls["dense"][2]
    h_tr, h_val, kw = calls["topic_remove"]
    assert (h_tr, h_val) == (["political train"], ["political val"])
    assert kw["fit_kwargs"]["keep"] == ["harmful train"] and kw["keep"] == ["harmful val"]
    assert kw["keep_min_rate"] == pytest.approx(0.97 * 0.75)
    assert all(c[2]["harmless_logits"] is reference and c[2]["batch_size"] == 32 for c in calls.values())
    assert res["files"]["dense"] == [
        str(tmp_path / "steering" / "dense.a"),
        str(tmp_path / "steering" / "dense.b"),
    ]
    given = {
        "rate": 0.5,
        "ci_low": 0.0,
        "ci_high": 1.0,
        "n": 2,
    }  # the baseline stage's rates, not regenerated
    assert res["table"] == [
        {"max_new_tokens": 5, "baseline": dict.fromkeys(("harmful", "political", "harmless"), given)}
    ]


# ------------------------------------------------------------------------------------ fluency of steered text


def test_distinct2_counts_distinct_bigrams() -> None:
    from moe_interp.steering.compare import distinct2

    assert distinct2([1, 2, 1, 2, 1]) == 0.5 and distinct2([7]) == 1.0 and distinct2([]) == 1.0
    assert distinct2([3, 3, 3, 3]) == pytest.approx(1 / 3) and distinct2([1, 2, 3, 1, 2]) == 0.75


def test_completion_distinct2_is_the_mean_over_greedy_completions_under_the_steering(olmoe: Any) -> None:
    """Against an independent count (torch.unique over stacked bigrams of each generated sequence, EOS cut) on
    the model's own greedy generations, unedited and under a steering that changes them."""
    from moe_interp.steering.compare import completion_distinct2

    def by_hand(steer: Any) -> float:
        with olmoe.intervene(*ev.as_interventions(steer, olmoe)):
            gens = olmoe.generate(PROMPTS, max_new_tokens=10, return_scores=True)
        vals = []
        for g in gens:
            ids = torch.tensor(g[0].token_ids)
            ids = ids[ids != olmoe.tokenizer.eos_token_id] if len(ids) else ids
            if len(ids) < 2:
                vals.append(1.0)
                continue
            pairs = torch.stack([ids[:-1], ids[1:]], 1)
            vals.append(torch.unique(pairs, dim=0).shape[0] / pairs.shape[0])
        return sum(vals) / len(vals)

    sv = _objects(olmoe)["vectors"].scaled(20.0)
    got = [completion_distinct2(olmoe, PROMPTS, s, max_new_tokens=10, batch_size=2) for s in ((), sv)]
    assert got == [pytest.approx(by_hand(())), pytest.approx(by_hand(sv))]
    with olmoe.intervene(*ev.as_interventions(sv, olmoe)):
        steered = olmoe.generate(PROMPTS, max_new_tokens=10)
    assert steered != olmoe.generate(PROMPTS, max_new_tokens=10)  # the steering did change the text
    with pytest.raises(ValueError, match="max_new_tokens must be >= 2"):
        completion_distinct2(olmoe, PROMPTS, max_new_tokens=1)


def test_completion_distinct2_drops_trailing_end_and_pad_tokens() -> None:
    """A finished sequence padded to the batch's length (pad id 0), or ended on another end token (7, e.g. the
    generation config's), is scored on its text tokens: no (pad, pad) bigrams counted as a loop."""
    from contextlib import nullcontext

    from moe_interp.model import Generation
    from moe_interp.steering.compare import completion_distinct2

    comps = [[1, 2, 3, 9, 0, 0, 0], [4, 5, 7, 0, 0], [1, 1, 1, 9]]
    fake = SimpleNamespace(
        tokenizer=SimpleNamespace(eos_token_id=9, pad_token_id=0),
        end_token_ids=frozenset({9, 7}),
        intervene=lambda *ivs: nullcontext(),
        generate=lambda prompts, **kw: [[Generation("", c)] for c in comps[: len(prompts)]],
    )
    got = completion_distinct2(fake, ["a", "b", "c"], max_new_tokens=8)  # type: ignore[arg-type]
    assert got == pytest.approx((1.0 + 1.0 + 0.5) / 3)
