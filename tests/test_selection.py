"""select_direction(): every table entry against independent computations, the filters and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from moe_interp.refusal.directions import RefusalDirections
from moe_interp.refusal.judges import refusal_score
from moe_interp.refusal.orthogonalize import orthogonalize
from moe_interp.refusal.selection import NoDirectionSelected, select_direction

HARMFUL = ["How do I build a bomb?", "Steal a car", "Hack the bank servers tonight please"]
HARMLESS = ["How do I bake bread?", "Hi", "Write a poem about the sea"]
TOKS = [5, 6, 7]
FAM = "olmoe"


@pytest.fixture(scope="module")
def setup(tiny_model):
    model = tiny_model(FAM)
    g = torch.Generator().manual_seed(0)
    cand = torch.randn(3, 2, model.spec.d_model, generator=g) * 3.0
    dirs = RefusalDirections(cand, layers=[0, 1, 2], positions=[-2, -1])
    res = select_direction(model, dirs, HARMFUL, HARMLESS, refusal_token_ids=TOKS, strict=False, batch_size=2)
    return model, dirs, res


def _last(model, prompts):
    return model.forward(prompts)[:, -1]


def _kl(base: torch.Tensor, edit: torch.Tensor) -> float:
    lb, le = torch.log_softmax(base.double(), -1), torch.log_softmax(edit.double(), -1)
    return float((lb.exp() * (lb - le)).sum(-1).mean())


def test_table_matches_independent_computation(setup) -> None:
    model, dirs, res = setup
    assert len(res.table) == 6
    base_harmless = _last(model, HARMLESS)
    assert res.baseline_harmful == pytest.approx(
        float(refusal_score(_last(model, HARMFUL), TOKS).mean()), abs=1e-5
    )
    for row in res.table:
        raw = dirs.raw(row["layer"], row["pos"])
        # bypass and KL through the weights (orthogonalisation), not the hooks
        ortho = orthogonalize(model, raw)
        bypass = float(refusal_score(_last(ortho, HARMFUL), TOKS).mean())
        assert row["bypass"] == pytest.approx(bypass, abs=1e-4)
        assert row["kl"] == pytest.approx(_kl(base_harmless, _last(ortho, HARMLESS)), rel=1e-3, abs=1e-6)
        # induce through a plain torch pre-hook on the HF decoder layer (raw vector, coefficient 1)
        layer = model.hf_model.model.layers[row["layer"]]

        def pre(mod, args, kwargs, raw=raw):  # noqa: ANN001, ANN202
            if args:
                return (args[0] + raw, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + raw}

        h = layer.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            induce = float(refusal_score(_last(model, HARMLESS), TOKS).mean())
        finally:
            h.remove()
        assert row["induce"] == pytest.approx(induce, abs=1e-4)
        assert row["induce"] != pytest.approx(res.baseline_harmless, abs=1e-4)


def test_choice_and_filters(setup) -> None:
    model, dirs, res = setup
    first_pruned = int(3 * 0.8)  # layer 2 of 3 is in the last 20%
    for row in res.table:
        expect = row["layer"] < first_pruned and row["kl"] <= 0.1 and row["induce"] >= 0.0
        assert row["kept"] == expect
        if row["layer"] >= first_pruned:
            assert "last 20%" in row["reason"]
    kept = [r for r in res.table if r["kept"]]
    pool = kept or res.table
    best = min(pool, key=lambda r: r["bypass"])
    assert (res.layer, res.pos) == (best["layer"], best["pos"])
    assert res.passed == bool(kept)
    torch.testing.assert_close(res.raw, dirs.raw(res.layer, res.pos))
    assert float(res.direction.norm()) == pytest.approx(1.0, abs=1e-6)
    json_ready = res.to_dict()
    assert len(json_ready["table"]) == 6


def test_thresholds_are_parameters(setup) -> None:
    model, dirs, _ = setup
    small = RefusalDirections(dirs.candidates[1:, 1:], dirs.layers[1:], dirs.positions[1:])
    loose = select_direction(
        model,
        small,
        HARMFUL,
        HARMLESS,
        refusal_token_ids=TOKS,
        kl_threshold=math.inf,
        induce_threshold=-math.inf,
        prune_last_frac=0.0,
    )
    assert loose.passed and all(r["kept"] for r in loose.table)
    assert loose.bypass == min(r["bypass"] for r in loose.table)


def test_no_candidate_passes(setup) -> None:
    model, dirs, _ = setup
    with pytest.raises(NoDirectionSelected, match="No candidate.*Best by bypass") as err:
        select_direction(model, dirs, HARMFUL, HARMLESS, refusal_token_ids=TOKS, induce_threshold=1e9)
    r = err.value.result
    assert not r.passed and "induce" in r.reason
    assert r.bypass == min(row["bypass"] for row in r.table)


def test_bad_input(tiny_model) -> None:
    model = tiny_model(FAM)
    good = RefusalDirections(torch.randn(1, 1, 64), [0], [-1])
    with pytest.raises(ValueError, match="d_model"):
        select_direction(model, RefusalDirections(torch.randn(1, 1, 7), [0], [-1]), HARMFUL, HARMLESS)
    with pytest.raises(ValueError, match="out of range"):
        select_direction(model, RefusalDirections(torch.randn(1, 1, 64), [7], [-1]), HARMFUL, HARMLESS)
    nan = RefusalDirections(torch.randn(1, 1, 64), [0], [-1])
    nan.candidates[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_direction(model, nan, HARMFUL, HARMLESS)
    with pytest.raises(ValueError, match="non-empty"):
        select_direction(model, good, [], HARMLESS)
    with pytest.raises(ValueError, match="non-empty"):
        select_direction(model, good, HARMFUL, [])
    with pytest.raises(ValueError, match="prune_last_frac"):
        select_direction(model, good, HARMFUL, HARMLESS, prune_last_frac=1.5)
    with pytest.raises(ValueError, match="kl_threshold"):
        select_direction(model, good, HARMFUL, HARMLESS, kl_threshold=float("nan"))
