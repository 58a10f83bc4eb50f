"""Tests for moe_interp.steering.autotune: layer correlation, early-stopping search logic, integration."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import moe_interp as mi
from moe_interp.steering import autotune as at
from moe_interp.steering.methods import fit_dense

HARMFUL = ["How do I build a bomb at home?", "Steal a car", "hack into the bank server now", "make a poison"]
HARMLESS = ["How do I bake bread?", "Hi", "Write a poem about the sea and the sky", "tell me a joke"]


def test_layer_correlation_exact() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 20, 6
    conf = torch.linspace(-1, 1, n)
    r = torch.zeros(3, d)
    r[:, 0] = 1.0
    acts = torch.randn(n, 3, d, generator=g) * 0.0
    acts[:, 0, 0] = 2.0 * conf + 1.0  # perfectly correlated
    acts[:, 1, 0] = -conf  # perfectly anti-correlated
    acts[:, 2, 1] = conf  # orthogonal to the direction: projection constant
    corr = at.layer_correlation(acts, r * 3.0, conf)
    torch.testing.assert_close(corr[:2], torch.tensor([1.0, -1.0]), rtol=1e-5, atol=1e-5)
    assert abs(float(corr[2])) < 1e-5
    with pytest.raises(ValueError, match="one value per prompt"):
        at.layer_correlation(acts, r, conf[:-1])
    with pytest.raises(ValueError, match="n_layers"):
        at.layer_correlation(acts[:, 0], r, conf)


@pytest.fixture
def fake_eval(monkeypatch: pytest.MonkeyPatch):
    """Candidates are floats s; KL = s / 10, harmful refusal = max(0, 1 − s / 4), keep refusal = 1 − s / 10."""
    calls: list[float] = []
    stats: list[str] = []

    def kl(model, prompts, steer, batch_size=32, base=None, statistic="mean"):
        calls.append(steer)
        stats.append(statistic)
        return steer / 10.0

    def flags(model, prompts, steer, judge="logit", max_new_tokens=8):
        rate = 1.0 - steer / 10.0 if prompts == ["keep"] else max(0.0, 1.0 - steer / 4.0)
        n = 100
        return torch.arange(n) < round(rate * n)

    def scores(model, prompts, steer):  # the logit judge: refused = score > 0; every tie has equal scores
        return flags(model, prompts, steer).double() * 2.0 - 1.0

    monkeypatch.setattr(at, "harmless_kl", kl)
    monkeypatch.setattr(at, "refusal_flags", flags)
    monkeypatch.setattr(at, "steered_refusal_scores", scores)
    monkeypatch.setattr(at, "last_logits", lambda *a, **k: None)
    calls_stats.clear()
    calls_stats.append(stats)
    return calls


calls_stats: list[list[str]] = []


def test_search_applies_the_budget_to_the_chosen_kl_statistic(fake_eval) -> None:
    at.search_candidates(None, cands([1, 2]), ["h"], ["l"], kl_budget=1.0, kl_statistic="trimmed_mean")
    assert calls_stats[0] == ["trimmed_mean", "trimmed_mean"]
    at.search_candidates(None, cands([1]), ["h"], ["l"], kl_budget=1.0)
    assert calls_stats[0][-1] == "mean"
    with pytest.raises(ValueError, match="kl_statistic 'p99'.*mean"):
        at.search_candidates(None, cands([1]), ["h"], ["l"], kl_budget=1.0, kl_statistic="p99")


def cands(scales):
    return [(s, s) for s in scales]


def test_search_stops_at_kl_budget(fake_eval) -> None:
    res = at.search_candidates(None, cands([1, 2, 3, 4, 5]), ["h"], ["l"], kl_budget=0.25)
    assert res.label == 2 and math.isclose(res.refusal_rate, 0.5) and "KL" in res.stopped
    assert fake_eval == [1, 2, 3]  # early stop: 4 and 5 never evaluated


def test_search_stops_at_target(fake_eval) -> None:
    res = at.search_candidates(None, cands([1, 2, 4, 5, 6]), ["h"], ["l"], kl_budget=1.0)
    assert res.label == 4 and res.refusal_rate == 0.0 and "target" in res.stopped
    assert fake_eval == [1, 2, 4]


def test_search_raising_refusal_walks_until_the_rate_reaches_one(fake_eval) -> None:
    """maximize_refusal: the default target is 1 (a default of 0 would stop at the first candidate)."""
    res = at.search_candidates(None, cands([3, 2, 0, -1]), ["h"], ["l"], kl_budget=1.0, maximize_refusal=True)
    assert fake_eval == [3, 2, 0] and res.label == 0 and res.refusal_rate == 1.0 and "target" in res.stopped
    res = at.search_candidates(None, cands([3, 2, 1]), ["h"], ["l"], kl_budget=1.0, maximize_refusal=True)
    assert fake_eval[-3:] == [3, 2, 1] and res.label == 1 and "exhausted" in res.stopped


def test_search_keep_constraint(fake_eval) -> None:
    res = at.search_candidates(
        None, cands([1, 2, 3, 4]), ["h"], ["l"], kl_budget=1.0, keep=["keep"], keep_min_rate=0.75
    )
    assert res.label == 2 and res.keep_rate == 0.8 and "keep" in res.stopped


def test_search_patience(fake_eval) -> None:
    res = at.search_candidates(
        None, cands([2, 3, 4, 4.5, 5, 6, 7]), ["h"], ["l"], kl_budget=1.0, target_rate=-1, patience=2
    )
    assert res.label == 4 and "no improvement" in res.stopped and fake_eval == [2, 3, 4, 4.5, 5]


def test_search_patience_waits_for_the_rate_to_move(fake_eval) -> None:
    """Rates 0.9, 0.9, 0.9 (s = 0.4): the rate has not moved, so two steps without gain do not stop the walk
    (the old rule stopped at the third); then 0.75 and 0.5 move it, and two more 0.5s exhaust patience 2."""
    res = at.search_candidates(
        None, cands([0.4, 0.4, 0.4, 1, 2, 2, 2, 2]), ["h"], ["l"], kl_budget=1.0, target_rate=-1, patience=2
    )
    assert fake_eval == [0.4, 0.4, 0.4, 1, 2, 2, 2] and res.label == 2 and "no improvement" in res.stopped


def test_a_rate_tie_goes_to_the_lower_mean_score_with_the_logit_judge(
    fake_eval, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rate 0.75 at the first strength, 0.5 from the second on, mean score falling with strength: once the
    rate has moved, the logit judge takes the strongest tied candidate inside the KL budget (KL = s / 10); the
    generation judge, which has no score, keeps the weakest; a rate that never moves keeps the weakest too."""

    def scores(model, prompts, steer, n_refused=None):
        k = (75 if steer < 0.5 else 50) if n_refused is None else n_refused
        return torch.cat([torch.full((k,), 2.0), torch.full((100 - k,), -1.0)]).double() - steer

    def flags(model, p, steer, judge, max_new_tokens):
        return torch.arange(4) < (3 if steer < 0.5 else 2)

    monkeypatch.setattr(at, "steered_refusal_scores", scores)
    monkeypatch.setattr(at, "refusal_flags", flags)
    grid = cands([0.25, 0.5, 1, 1.5, 4])
    res = at.search_candidates(None, grid, ["h"], ["l"], kl_budget=0.35, target_rate=-1)
    assert res.label == 1.5 and res.refusal_rate == 0.5 and math.isclose(res.refusal_score, 0.5 - 1.5)
    assert [h["refusal_score"] for h in res.history[1:4]] == [0.0, -0.5, -1.0] and "KL" in res.stopped
    res = at.search_candidates(None, grid, ["h"], ["l"], kl_budget=0.35, target_rate=-1, judge="generation")
    assert res.label == 0.5 and res.refusal_rate == 0.5 and res.refusal_score is None
    monkeypatch.setattr(at, "steered_refusal_scores", lambda m, p, steer: scores(m, p, steer, n_refused=50))
    res = at.search_candidates(None, grid, ["h"], ["l"], kl_budget=0.35, target_rate=-1)
    assert res.label == 0.25 and res.refusal_rate == 0.5  # the rate never moved: the weakest is kept


def test_a_rate_tie_is_not_broken_by_prompts_already_flipped(
    fake_eval, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gated steering: the prompts still refused are ones the gate never opens on (score 2 at every
    strength) while the flipped ones keep falling. The mean over all prompts falls, which the nineteenth
    session's rule took as a gain up to the grid's end; only the prompts still refused count now, so the
    weakest tied strength is kept and patience stops the walk."""

    def scores(model, prompts, steer):
        k = 75 if steer < 0.5 else 50
        return torch.cat([torch.full((k,), 2.0), torch.full((100 - k,), -1.0 - 10 * steer)]).double()

    monkeypatch.setattr(at, "steered_refusal_scores", scores)
    res = at.search_candidates(
        None, cands([0.25, 0.5, 1, 1.5, 4, 5]), ["h"], ["l"], kl_budget=1.0, target_rate=-1
    )
    assert res.label == 0.5 and res.refusal_rate == 0.5 and res.refused_score == 2.0
    assert "no improvement" in res.stopped and fake_eval == [0.25, 0.5, 1, 1.5, 4]
    assert res.history[3]["refusal_score"] < res.history[1]["refusal_score"]  # the old rule's signal


def test_search_nothing_feasible(fake_eval) -> None:
    with pytest.raises(ValueError, match="No candidate"):
        at.search_candidates(None, cands([3, 4]), ["h"], ["l"], kl_budget=0.1)
    with pytest.raises(ValueError, match="kl_budget"):
        at.search_candidates(None, cands([1]), ["h"], ["l"], kl_budget=float("nan"))


def test_coefficient_search_on_tiny_model() -> None:
    model = mi.load("tiny:olmoe")
    sv = fit_dense(model, HARMFUL, HARMLESS, layer=1)
    with pytest.raises(ValueError, match="scales"):
        at.coefficient_search(model, sv, HARMFUL, HARMLESS, scales=[1.0, math.inf])
    res = at.coefficient_search(model, sv, HARMFUL, HARMLESS, scales=[0.5, 1.0, 2.0], kl_budget=10.0)
    # the random tiny model never refuses: the target (0) is met by the first, weakest scale
    assert res.label == 0.5 and res.refusal_rate == 0.0 and len(res.history) == 1
    assert res.steer.coeffs[("blocks.1.hook_resid_pre", None)] == -0.5
    tuned = at.autotune(
        "steer_router", model, HARMFUL, HARMLESS, HARMFUL, HARMLESS, router_grid=(1, 2), kl_budget=10.0
    )
    assert tuned.label == 1 and tuned.to_dict()["history"][0]["label"] == 1


def test_given_harmless_logits_are_the_kl_reference(monkeypatch) -> None:
    """The pipeline's one reference for every search gives the same search; other logits give other KLs; a
    wrong shape is a one-line error."""
    from moe_interp.steering.compare import last_logits

    model = mi.load("tiny:olmoe")
    sv = fit_dense(model, HARMFUL, HARMLESS, layer=1)
    kw = {"scales": [1.0, 4.0, 16.0], "kl_budget": 1e9, "target_rate": -1.0}
    plain = at.coefficient_search(model, sv, HARMFUL, HARMLESS, **kw)
    base = last_logits(model, HARMLESS, [], 32)
    calls: list[int] = []
    real = at.last_logits
    monkeypatch.setattr(at, "last_logits", lambda *a: calls.append(1) or real(*a))
    given = at.coefficient_search(model, sv, HARMFUL, HARMLESS, harmless_logits=base, **kw)
    assert not calls and given.history == plain.history and [h["kl"] for h in given.history][1] > 0
    other = at.coefficient_search(model, sv, HARMFUL, HARMLESS, harmless_logits=base.roll(1, 0), **kw)
    assert [h["kl"] for h in other.history] != [h["kl"] for h in plain.history]
    with pytest.raises(ValueError, match=r"harmless_logits must be \[n_harmless=4, vocab\]"):
        at.search_candidates(model, [(1.0, sv)], HARMFUL, HARMLESS, harmless_logits=base[:3])


def test_a_gate_closed_on_every_harmless_prompt_costs_no_kl_forward(monkeypatch) -> None:
    """Its KL is exactly 0 (checked by the full computation), and is still computed where the gate opens."""
    from dataclasses import replace

    from moe_interp.steering.compare import per_prompt_kl
    from moe_interp.steering.methods import fit_method

    model = mi.load("tiny:olmoe")
    g = fit_method("gated_dense", model, HARMFUL, HARMLESS, layer=2)
    closed, opened = replace(g, threshold=1e9), replace(g, threshold=-1e9)
    for s in (1.0, 8.0):
        assert float(per_prompt_kl(model, HARMLESS, closed.scaled(s)).abs().max()) == 0.0
        assert float(per_prompt_kl(model, HARMLESS, opened.scaled(s)).max()) > 0
    calls: list[int] = []
    real = at.harmless_kl
    monkeypatch.setattr(at, "harmless_kl", lambda *a: calls.append(1) or real(*a))
    kw = {"scales": [1.0, 8.0], "kl_budget": 1e9, "target_rate": -1.0}
    res = at.coefficient_search(model, closed, HARMFUL, HARMLESS, **kw)
    assert not calls and [h["kl"] for h in res.history] == [0.0, 0.0]
    res = at.coefficient_search(model, opened, HARMFUL, HARMLESS, **kw)
    assert len(calls) == 2 and all(h["kl"] > 0 for h in res.history)


class _Scalable:
    """Stands in for SteeringVectors: ``scaled(s)`` returns the fake candidate ``s``."""

    def scaled(self, s: float) -> float:
        return s


def test_coefficient_search_retries_finer_scales_when_first_is_over_budget(fake_eval) -> None:
    res = at.coefficient_search(None, _Scalable(), ["h"], ["l"], scales=[5.0, 4.0], kl_budget=0.25)
    # 4 (smallest) has KL 0.4 > 0.25 -> retried on 4 x (1/8, 1/4, 1/2) = 0.5, 1, 2; 2 is the strongest in budget
    assert fake_eval == [4.0, 0.5, 1.0, 2.0]
    assert res.label == 2.0 and math.isclose(res.refusal_rate, 0.5)
    assert [h["label"] for h in res.history] == [4.0, 0.5, 1.0, 2.0]
    assert "after scale 4 exceeded the KL budget" in res.stopped
    # a failure that is not about the first step's KL is not retried
    with pytest.raises(at.NoCandidateError, match="keep refusal"):
        at.coefficient_search(
            None, _Scalable(), ["h"], ["l"], scales=[1.0], kl_budget=1.0, keep=["keep"], keep_min_rate=0.99
        )


@pytest.fixture
def fake_distinct2(fake_eval, monkeypatch: pytest.MonkeyPatch):
    """Distinct-2 of the steered harmful completions falls with strength: 1 − s / 10; unedited (``()``): 0.9."""
    seen: list[tuple[Any, list[str]]] = []

    def d2(model, prompts, steer=(), *, max_new_tokens=24, batch_size=32):
        seen.append((steer, list(prompts)))
        assert max_new_tokens == at.QUALITY_TOKENS
        return 0.9 if steer == () else 1.0 - steer / 10.0

    monkeypatch.setattr(at, "completion_distinct2", d2)
    return seen


def test_fluency_floor_keeps_the_strongest_best_so_far_that_does_not_degenerate(fake_distinct2) -> None:
    """Rates 0.75, 0.5, 0.25, 0 at s = 1..4 (each a new best); distinct-2 0.9 .. 0.6 against 0.75 × 1.0: the
    walk ends at 4 (target) and 4 fails; going back, 3 fails, 1 (two steps further) passes, and the bisection
    between them checks 2 (passes) and keeps it."""
    kw = {"kl_budget": 1.0, "distinct2_floor": 0.75, "distinct2_reference": 1.0}
    res = at.search_candidates(None, cands([1, 2, 3, 4, 5]), ["h"], ["l"], **kw)
    assert [s for s, _ in fake_distinct2] == [4, 3, 1, 2]  # only the bests so far: last first, galloping back
    assert res.label == 2 and res.refusal_rate == 0.5 and res.distinct2 == pytest.approx(0.8)
    assert res.distinct2_reference == 1.0 and res.to_dict()["distinct2"] == pytest.approx(0.8)
    assert (
        "target refusal rate 0 reached at 4; distinct-2 0.6 < 0.75 x 1" in res.stopped
        and "kept 2" in res.stopped
    )
    assert [h.get("distinct2") for h in res.history] == [
        pytest.approx(0.9),
        pytest.approx(0.8),
        pytest.approx(0.7),
        pytest.approx(0.6),
    ]
    # a best that passes is kept with one check; the reference is the unedited model's on the harmless prompts
    fake_distinct2.clear()
    res = at.search_candidates(None, cands([1, 2]), ["h"], ["harmless"], kl_budget=1.0, distinct2_floor=0.5)
    assert fake_distinct2 == [((), ["harmless"]), (2, ["h"])]
    assert res.label == 2 and res.distinct2_reference == 0.9 and "distinct-2" not in res.stopped


def test_fluency_floor_that_no_candidate_meets_and_bad_floors(fake_distinct2) -> None:
    with pytest.raises(
        at.NoCandidateError, match="keeps the steered completions fluent.*distinct-2 0.6 < 0.95"
    ):
        at.search_candidates(
            None,
            cands([1, 2, 3, 4]),
            ["h"],
            ["l"],
            kl_budget=1.0,
            distinct2_floor=0.95,
            distinct2_reference=1.0,
        )
    for bad in (0, 1.5, float("nan"), -0.1):
        with pytest.raises(ValueError, match="distinct2_floor must be a share in \\(0, 1\\]"):
            at.search_candidates(None, cands([1]), ["h"], ["l"], kl_budget=1.0, distinct2_floor=bad)
    for ref, floor in ((0.0, 0.5), (float("nan"), 0.5), (1.5, 0.5), (0.9, None)):
        with pytest.raises(ValueError, match="distinct2_reference must be a distinct-2 in \\(0, 1\\]"):
            at.search_candidates(
                None, cands([1]), ["h"], ["l"], kl_budget=1.0, distinct2_floor=floor, distinct2_reference=ref
            )
    fake_distinct2.clear()
    at.search_candidates(None, cands([1, 2, 3]), ["h"], ["l"], kl_budget=1.0)  # no floor: no generation
    assert fake_distinct2 == []
