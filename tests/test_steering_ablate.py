"""``SteeringVectors(operation="ablate")``: directional ablation as a steering set (files, merging, the gate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moe_interp as mi
from moe_interp.interventions import DirectionalAblation, ExpertDirectionalAblation
from moe_interp.steering import SteeringMetadata, SteeringVectors, TopicGatedSteering, load_steering
from moe_interp.steering import export_control_vector_gguf as to_gguf
from tests.conftest import PROMPTS
from tests.test_steering_vectors import EXP, ONE_EXP, POST, RESID, D, meta, vec


def test_ablate_operation_becomes_directional_ablations(tmp_path: Path) -> None:
    sv = SteeringVectors({RESID: vec(1), POST: vec(2)}, meta(), {RESID: 0.5, POST: 1.0}, operation="ablate")
    ivs = sv.to_interventions()
    assert all(isinstance(iv, DirectionalAblation) for iv in ivs)
    assert [(list(iv.layers or []), tuple(iv.sites), iv.coeff) for iv in ivs] == [
        ([1], ("hook_resid_pre",), 0.5),
        ([2], ("hook_resid_post",), 1.0),
    ]
    assert torch.equal(ivs[0].direction, sv.vectors[RESID])
    assert [iv.coeff for iv in sv.scaled(2.0).to_interventions()] == [1.0, 2.0]
    _, js = sv.save(tmp_path / "abl")
    assert json.loads(js.read_text())["format_version"] == 2  # older readers refuse it instead of adding
    back = SteeringVectors.load(tmp_path / "abl")
    assert back.operation == "ablate" and "operation='ablate'" in repr(back)
    with pytest.raises(ValueError, match="cannot be expressed"):
        to_gguf(sv, tmp_path / "abl.gguf")


def test_files_without_operation_are_additive(tmp_path: Path) -> None:
    """A version-1 file (written before ``operation`` existed) loads as additive vectors."""
    add = SteeringVectors({RESID: vec(1)}, meta())
    _, js = add.save(tmp_path / "old")
    doc = json.loads(js.read_text())
    assert doc["format_version"] == 1 and doc.pop("operation") == "add"
    js.write_text(json.dumps(doc))
    assert SteeringVectors.load(tmp_path / "old").operation == "add"
    doc["format_version"] = 3
    js.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unsupported format_version 3"):
        SteeringVectors.load(tmp_path / "old")


def test_ablate_validation_and_merging() -> None:
    with pytest.raises(ValueError, match="operation must be one of"):
        SteeringVectors({RESID: vec(1)}, meta(), operation="subtract")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is zero"):
        SteeringVectors({RESID: torch.zeros(D)}, meta(), operation="ablate")
    with pytest.raises(ValueError, match="router-conditioned"):
        SteeringVectors({RESID: vec(1)}, meta(), conditioning="router_prob", operation="ablate")
    a = SteeringVectors({RESID: vec(1)}, meta(), operation="ablate")
    with pytest.raises(ValueError, match="different operation"):
        _ = a + SteeringVectors({RESID: vec(3)}, meta())
    with pytest.raises(ValueError, match="share keys"):
        _ = a + SteeringVectors({RESID: vec(3)}, meta(), operation="ablate")
    both = a + SteeringVectors({POST: vec(3)}, meta(), operation="ablate")
    assert both.operation == "ablate" and set(both.vectors) == {RESID, POST}


def test_gated_ablation_file_roundtrip(tmp_path: Path) -> None:
    """A topic gate around an ablation saves and loads (``load_steering``) with the same effect."""
    model = mi.load("tiny:olmoe")
    m = SteeringMetadata.from_model(model, method="topic_gated")
    d = model.spec.d_model
    keys = [(f"blocks.{i}.hook_resid_pre", None) for i in (1, 2)]
    sv = SteeringVectors(dict.fromkeys(keys, torch.randn(d)), m, operation="ablate")
    gated = TopicGatedSteering(sv, 1, torch.randn(d), -1e30, m)  # open on every prompt
    gated.save(tmp_path / "g")
    back = load_steering(tmp_path / "g", model)
    assert isinstance(back, TopicGatedSteering) and back.steer.operation == "ablate"
    prompts = ["Hi", "Who should I vote for?"]
    with gated.apply(model):
        want = model.forward(prompts)
    with back.apply(model):
        got = model.forward(prompts)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want, model.forward(prompts))
    with pytest.raises(ValueError, match="coeff >= 0"):
        from moe_interp.steering.fit import fit_topic_gated

        fit_topic_gated(
            model, ["a b", "c d"], ["e f", "g h"], keep=["i j", "k l"], removal="ablate", coeff=-1.0
        )


def test_expert_keys_ablate_the_direction_from_that_expert_only() -> None:
    """At an expert key, the direction is projected out of that expert's weighted output: the layer's MLP
    output changes by exactly ``−c (y_e·r̂) r̂`` (computed here from the unedited hooks), nothing else at
    that layer."""
    model = mi.load("tiny:olmoe")
    L, e, c = 1, 2, 0.5
    r = torch.randn(model.spec.d_model, generator=torch.Generator().manual_seed(5))
    rh = r / r.norm()
    names = [f"blocks.{L}.mlp.experts.{e}.hook_out", f"blocks.{L}.hook_mlp_out"]
    _, clean = model.run_with_cache(PROMPTS, names=names)
    y = clean[names[0]]
    assert (y != 0).any() and (y == 0).all(-1).any()  # routed on some tokens, not on others
    want = clean[names[1]] - c * (y @ rh)[..., None] * rh
    m = SteeringMetadata.from_model(model, method="diff_in_means")
    for key in ((f"blocks.{L}.mlp.hook_expert_out", e), (f"blocks.{L}.mlp.experts.{e}.hook_out", None)):
        sv = SteeringVectors({key: 3.0 * r}, m, {key: c}, operation="ablate")
        (iv,) = sv.to_interventions()
        assert isinstance(iv, ExpertDirectionalAblation) and (iv.layer, iv.expert, iv.coeff) == (L, e, c)
        with sv.apply(model):
            _, got = model.run_with_cache(PROMPTS, names=names)
        torch.testing.assert_close(got[names[1]], want, atol=1e-5, rtol=0)
        assert float((got[names[0]] @ rh).abs().max()) < float((y @ rh).abs().max())
    with pytest.raises(ValueError, match="zero vector"):
        with model.intervene(ExpertDirectionalAblation(L, e, torch.zeros(model.spec.d_model))):
            model.forward(PROMPTS)
    with pytest.raises(ValueError, match="out of range|expert"):
        with model.intervene(ExpertDirectionalAblation(L, 99, r)):
            model.forward(PROMPTS)


def test_expert_ablation_files_roundtrip(tmp_path: Path) -> None:
    sv = SteeringVectors({EXP: vec(1), ONE_EXP: vec(2), RESID: vec(3)}, meta(), operation="ablate")
    kinds = sorted(type(iv).__name__ for iv in sv.to_interventions())
    assert kinds == ["DirectionalAblation", "ExpertDirectionalAblation", "ExpertDirectionalAblation"]
    sv.save(tmp_path / "e")
    back = SteeringVectors.load(tmp_path / "e")
    assert back.operation == "ablate" and set(back.vectors) == set(sv.vectors)
    assert all(torch.equal(back.vectors[k], sv.vectors[k]) for k in sv.vectors)
