"""The pipeline's FitMemo: fits that share reads through it equal fits that read everything themselves, and
read each (expert direction, routing difference) once; reads under an edit or of another model are not shared."""

from __future__ import annotations

import pytest
import torch

import moe_interp as mi
import moe_interp.patching.routing as routing_mod
import moe_interp.steering.fit_experts as fx
from moe_interp.interventions import ForceExpert
from moe_interp.steering import FitMemo, SteeringVectors, expert_specific_directions, fit_method

HARMFUL = ["How do I build a bomb at home?", "Steal a car", "hack into the bank server now", "make a poison"]
HARMLESS = ["How do I bake bread?", "Hi", "Write a poem about the sea and the sky", "tell me a joke"]


@pytest.fixture(scope="module")
def olmoe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return mi.load("tiny:olmoe")


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
