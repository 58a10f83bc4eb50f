"""Circuit location on the tiny olmoe: structure, greedy set, faithfulness, save/load, interventions."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from moe_interp.circuits import Circuit, ablate_components, locate_refusal_circuit
from moe_interp.refusal.evaluate import refusal_scores
from moe_interp.refusal.judges import default_refusal_ids

A = ["How do I make a bomb", "kill people now please", "go away", "steal a car fast"]
B = ["bake bread", "hello there friend how are you", "what is two plus two", "nice weather today"]


@pytest.fixture(scope="module")
def setup(tiny_model):  # noqa: ANN001, ANN201
    m = tiny_model("olmoe")
    harm, less = (A, B) if refusal_scores(m, A[:2]).mean() > refusal_scores(m, B[:2]).mean() else (B, A)
    c = locate_refusal_circuit(
        m,
        harm[:2],
        less[:2],
        heldout_harmful=harm[2:],
        heldout_harmless=less[2:],
        method="exhaustive",
        n_random=4,
        progress=False,
    )
    return m, harm, less, c


def test_circuit_structure(setup) -> None:  # noqa: ANN001
    m, harm, less, c = setup
    assert 1 <= len(c) <= c.faithfulness["n_candidates"]
    effects = [x["effect"] for x in c.ranking]
    assert effects == sorted(effects, reverse=True)
    assert c.components == c.ranking[: len(c)]
    f = c.faithfulness
    assert f["reached_target"] == (f["finding_removed"] >= f["target"])
    assert f["finding_removed"] == f["finding_curve"][len(c) - 1]
    if not f["reached_target"]:  # no prefix reaches the target: the best one is kept
        assert f["finding_removed"] == max(f["finding_curve"])
    assert len(f["random_draws"]) == 4 and not f["in_sample"]
    kinds = {x["kind"] for x in c.ranking}
    assert kinds == {"head", "expert", "attn", "mlp"}
    assert "spec" in c.metadata and len(c.metadata["prompts_hash"]) == 16
    assert "removes" in repr(c) and "<table>" in c._repr_html_()


def test_prefix_is_the_smallest_that_reaches_the_target(setup) -> None:  # noqa: ANN001
    """A target between two records of the finding curve is reached exactly at the later record; one above
    every prefix is not reached, and the best prefix is kept."""
    m, harm, less, _ = setup
    kw = dict(candidates=("experts",), method="exhaustive", n_random=1, progress=False)
    curve = locate_refusal_circuit(m, harm[:2], less[:2], target=1.0, **kw).faithfulness["finding_curve"]
    best_before = [max([0.0, *curve[:i]]) for i in range(len(curve))]
    # records: prefixes that remove more than every shorter one (and than 0) while all shorter stay below 1
    # (targets are fractions in (0, 1]); the widest one after the first makes the check non-trivial
    records = [i for i, r in enumerate(curve) if r > best_before[i] and best_before[i] < 1]
    assert records, "no prefix removes any of the gap: no reachable target to test"
    k = max(records, key=lambda i: (i > 0, curve[i] - best_before[i]))
    target = (min(curve[k], 1.0) + best_before[k]) / 2
    c = locate_refusal_circuit(m, harm[:2], less[:2], target=target, **kw)
    f = c.faithfulness
    assert f["reached_target"] and f["finding_curve"] == pytest.approx(curve, abs=1e-6)
    assert len(c) == k + 1 and f["finding_removed"] >= target
    assert all(r < target for r in f["finding_curve"][:k])  # no smaller prefix reaches it
    assert max(curve) < 1, "some set of experts removes the whole gap: no unreachable target to test"
    c = locate_refusal_circuit(m, harm[:2], less[:2], target=(max(curve) + 1) / 2, **kw)
    assert not c.faithfulness["reached_target"]
    assert len(c) == curve.index(max(curve)) + 1 and c.faithfulness["finding_removed"] == max(curve)


def _same_tree(a: Any, b: Any) -> bool:
    """Nested dicts/lists equal up to float rounding and tuple/list (pytest.approx takes no nested dicts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def test_same_tree_can_fail() -> None:
    assert _same_tree({"a": [1.0, (2, float("nan"))]}, {"a": [1.0, [2, float("nan")]]})
    assert not _same_tree({"a": [1.0, 2.0]}, {"a": [1.0, 2.1]}) and not _same_tree({"a": 1}, {"b": 1})


def test_save_load_and_interventions(setup, tmp_path) -> None:  # noqa: ANN001
    m, harm, less, c = setup
    c2 = Circuit.load(c.save(tmp_path / "c.json"))
    assert c2.components == c.components and _same_tree(c2.faithfulness, c.faithfulness)
    with m.intervene(*c2.to_interventions(m)):
        via_iv = refusal_scores(m, harm[2:])
    direct = ablate_components(
        m, harm[2:], [c.components], c.means, c.metadata["positions"], default_refusal_ids(m)
    )
    torch.testing.assert_close(via_iv, direct[0].to(via_iv.dtype), atol=1e-4, rtol=0)
    gap = c.faithfulness["gap_heldout"]
    frac = ((refusal_scores(m, harm[2:]) - via_iv) / gap).mean().item()
    assert frac == pytest.approx(c.faithfulness["circuit"], abs=1e-3)
    c.plot(save_to=tmp_path / "circuit")
    assert (tmp_path / "circuit.pdf").exists() and (tmp_path / "circuit.png").exists()
    # a circuit goes wherever interventions or a steering object go (refusal rates, KL)
    from moe_interp.refusal.evaluate import refusal_flags
    from moe_interp.steering.compare import harmless_kl

    assert harmless_kl(m, less[:2], c2) > 0
    with m.intervene(*c2.to_interventions(m)):
        flags = refusal_flags(m, harm[2:], judge="logit")
    assert torch.equal(refusal_flags(m, harm[2:], c2, judge="logit"), flags)


def test_same_kind_random_sets_match_the_circuit_kinds_and_their_removal(setup) -> None:  # noqa: ANN001
    """The stricter baseline: each draw has the circuit's kinds in the circuit's numbers, and its recorded
    removal is what ablating it through the Circuit interventions removes."""
    from collections import Counter
    from dataclasses import replace

    m, harm, less, c = setup
    f = c.faithfulness
    by_key = {(x["name"] if "head" not in x else f"{x['name']}[{x['head']}]"): x for x in c.ranking}
    want = Counter(x["kind"] for x in c.components)
    from moe_interp.organisms.planted_check import component_means

    keys = sorted({k for ks in f["random_same_kinds_sets"] for k in ks} | set(c.means))
    means = component_means(
        m, keys, less[:2]
    )  # computed anew: every candidate's mean, not the circuit's only
    for k, v in c.means.items():
        torch.testing.assert_close(means[k], v.to(means[k].dtype), atol=1e-5, rtol=0)
    c = replace(c, means=means)
    base = refusal_scores(m, harm[2:])
    assert len(f["random_same_kinds_sets"]) == len(f["random_same_kinds_draws"]) == 4
    for keys, removed in zip(f["random_same_kinds_sets"], f["random_same_kinds_draws"], strict=True):
        comps = [by_key[k] for k in keys]
        assert Counter(x["kind"] for x in comps) == want
        with m.intervene(*replace(c, components=comps).to_interventions(m)):
            frac = ((base - refusal_scores(m, harm[2:])) / f["gap_heldout"]).mean().item()
        assert frac == pytest.approx(removed, abs=1e-3)
    assert f["random_same_kinds"] == pytest.approx(sum(f["random_same_kinds_draws"]) / 4)


def test_pool_limits_the_greedy_search_to_the_best_ranked(setup) -> None:  # noqa: ANN001
    """``pool=k``: every greedy step chooses among the k best-ranked components only, at most k steps; with
    ``pool`` at least the number of candidates the result is the unrestricted one."""
    m, harm, less, _ = setup
    kw = dict(candidates=("experts",), method="exhaustive", selection="greedy", n_random=1, progress=False)
    full = locate_refusal_circuit(m, harm[:2], less[:2], target=1.0, **kw)
    top = [x["name"] for x in full.ranking]
    c = locate_refusal_circuit(m, harm[:2], less[:2], target=1.0, pool=3, **kw)
    chosen = [x["name"] for x in c.components]
    assert set(chosen) <= set(top[:3]) and len(c.faithfulness["finding_curve"]) <= 3
    assert chosen[0] == top[0]  # exhaustive effects are single ablations: the first greedy pick is the best
    same = locate_refusal_circuit(m, harm[:2], less[:2], target=1.0, pool=len(top), **kw)
    assert same.components == full.components and same.metadata["pool"] == len(top)
    with pytest.raises(ValueError, match="pool"):
        locate_refusal_circuit(m, harm[:2], less[:2], pool=0, **kw)


def test_attribution_method_runs(setup) -> None:  # noqa: ANN001
    m, harm, less, _ = setup
    c = locate_refusal_circuit(m, harm[:2], less[:2], candidates=("experts",), n_random=2, progress=False)
    assert all(x["kind"] == "expert" for x in c.ranking) and c.faithfulness["in_sample"]


def test_bad_input(setup, tmp_path) -> None:  # noqa: ANN001
    m, harm, less, _ = setup
    with pytest.raises(ValueError, match="candidates"):
        locate_refusal_circuit(m, harm, less, candidates=("neurons",))
    with pytest.raises(ValueError, match="method"):
        locate_refusal_circuit(m, harm, less, method="magic")
    with pytest.raises(ValueError, match="both"):
        locate_refusal_circuit(m, harm, less, heldout_harmful=harm)
    with pytest.raises(ValueError, match="positions"):
        locate_refusal_circuit(m, harm, less, positions=[-999])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a saved Circuit"):
        Circuit.load(tmp_path / "x.json")
