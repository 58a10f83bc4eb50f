"""Tests for moe_interp.steering (SteeringVectors, AddSteering, GGUF control vectors)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moe_interp.steering import (
    AddSteering,
    SteeringMetadata,
    SteeringVectors,
    decode_key,
    encode_key,
    export_control_vector_gguf,
    read_control_vector_gguf,
    read_control_vector_model_hint,
)

D, L, E = 8, 4, 6
RESID = ("blocks.1.hook_resid_pre", None)
POST = ("blocks.2.hook_resid_post", None)
EXP = ("blocks.1.mlp.hook_expert_out", 3)
ONE_EXP = ("blocks.2.mlp.experts.5.hook_out", None)


@dataclass
class Ctx:
    """Fake HookContext."""

    name: str = "blocks.1.hook_resid_pre"
    layer: int | None = 1
    attention_mask: Tensor | None = None
    is_prompt: bool = True
    step: int = 0


def meta(**kw: Any) -> SteeringMetadata:
    base: dict[str, Any] = dict(family="olmoe", d_model=D, n_layers=L, n_experts=E, method="diff_in_means")
    base.update(kw)
    return SteeringMetadata(**base)


def vec(seed: int, d: int = D) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g)


def make_sv(**kw: Any) -> SteeringVectors:
    vectors = {RESID: vec(0), POST: vec(1), EXP: vec(2), ONE_EXP: vec(3)}
    args: dict[str, Any] = dict(vectors=vectors, metadata=meta(), coeffs={RESID: 2.5, EXP: -0.5})
    args.update(kw)
    return SteeringVectors(**args)


# ------------------------------------------------------------------------------ keys


@pytest.mark.parametrize("key", [RESID, POST, EXP, ONE_EXP, ("blocks.10.mlp.hook_expert_out", 12)])
def test_key_encoding_roundtrip(key: tuple[str, int | None]) -> None:
    assert decode_key(encode_key(key)) == key


def test_key_encoding_format() -> None:
    assert encode_key(EXP) == "blocks.1.mlp.hook_expert_out@e3"
    assert encode_key(RESID) == "blocks.1.hook_resid_pre"


# ------------------------------------------------------------------------------ edit arithmetic


def test_add_residual_exact_all_positions() -> None:
    v = vec(0)
    x = torch.randn(2, 5, D)
    out = AddSteering("blocks.1.hook_resid_pre", v, coeff=2.5)(x, Ctx())
    assert torch.equal(out, x + 2.5 * v)
    assert not torch.equal(out, x)


def test_padding_untouched() -> None:
    v = vec(0)
    x = torch.randn(2, 4, D)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = AddSteering("blocks.1.hook_resid_pre", v, coeff=3.0)(x, Ctx(attention_mask=mask))
    assert torch.equal(out[0, :2], x[0, :2])
    assert torch.equal(out[0, 2:], x[0, 2:] + 3.0 * v)
    assert torch.equal(out[1], x[1] + 3.0 * v)


def test_generation_step_uses_last_mask_columns() -> None:
    v = vec(0)
    x = torch.randn(2, 1, D)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # full-length mask, single new position
    out = AddSteering("blocks.1.hook_resid_pre", v)(x, Ctx(attention_mask=mask, is_prompt=False, step=1))
    assert torch.equal(out, x + v)


@pytest.mark.parametrize(
    ("scope", "is_prompt", "edited"),
    [
        ("all", True, True),
        ("all", False, True),
        ("prompt", True, True),
        ("prompt", False, False),
        ("generated", True, False),
        ("generated", False, True),
    ],
)
def test_position_scope(scope: str, is_prompt: bool, edited: bool) -> None:
    v = vec(0)
    x = torch.randn(1, 3, D)
    out = AddSteering("blocks.1.hook_resid_pre", v, positions=scope)(  # type: ignore[arg-type]
        x, Ctx(is_prompt=is_prompt, step=0 if is_prompt else 2)
    )
    assert torch.equal(out, x + v if edited else x)


def test_expert_out_only_target_expert_and_only_routed() -> None:
    v = vec(0)
    x = torch.randn(2, 3, E, D)
    x[0, 1, 3] = 0.0  # expert 3 not routed at (0, 1)
    x[1, 2, 3] = 0.0  # nor at (1, 2)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # (1, 0) is padding
    out = AddSteering("blocks.1.mlp.hook_expert_out", v, coeff=-0.5, expert=3)(x, Ctx(attention_mask=mask))
    expected = x.clone()
    for b, p in [(0, 0), (0, 2), (1, 1)]:
        expected[b, p, 3] = x[b, p, 3] + (-0.5) * v
    assert torch.equal(out, expected)
    # other experts untouched, input not mutated
    keep = [e for e in range(E) if e != 3]
    assert torch.equal(out[:, :, keep], x[:, :, keep])
    assert torch.equal(x[0, 1, 3], torch.zeros(D))


def test_single_expert_hook_only_routed_positions() -> None:
    v = vec(0)
    x = torch.randn(1, 4, D)
    x[0, 2] = 0.0
    out = AddSteering("blocks.2.mlp.experts.5.hook_out", v)(x, Ctx())
    assert torch.equal(out[0, 2], torch.zeros(D))
    assert torch.equal(out[0, [0, 1, 3]], x[0, [0, 1, 3]] + v)


def test_edit_keeps_dtype() -> None:
    v = vec(0)
    x = torch.randn(1, 2, D, dtype=torch.bfloat16)
    out = AddSteering("blocks.1.hook_resid_pre", v, coeff=2.0)(x, Ctx())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, x + (2.0 * v).to(torch.bfloat16))


def test_intervention_protocol() -> None:
    sv = make_sv()
    ivs = sv.to_interventions()
    assert len(ivs) == 4
    names = [next(iter(iv.edits(None))) for iv in ivs]
    assert names == [
        "blocks.1.hook_resid_pre",
        "blocks.1.mlp.hook_expert_out",
        "blocks.2.mlp.experts.5.hook_out",
        "blocks.2.hook_resid_post",
    ]
    by_name = {iv.hook_name: iv for iv in ivs}
    assert by_name["blocks.1.hook_resid_pre"].coeff == 2.5
    assert by_name["blocks.1.mlp.hook_expert_out"].expert == 3
    assert by_name["blocks.2.hook_resid_post"].coeff == 1.0
    x = torch.randn(1, 2, D)
    fn = ivs[0].edits(None)["blocks.1.hook_resid_pre"]
    assert torch.equal(fn(x, Ctx()), x + 2.5 * sv.vectors[RESID])


def test_conditioning_requires_opt_in() -> None:
    sv = make_sv(conditioning="router_prob")
    with pytest.raises(NotImplementedError, match="router"):
        sv.to_interventions()
    assert len(sv.to_interventions(ignore_conditioning=True)) == 4


# ------------------------------------------------------------------------------ object behaviour


def test_defaults_and_metadata() -> None:
    sv = make_sv()
    assert sv.coeffs[POST] == 1.0 and sv.coeffs[ONE_EXP] == 1.0
    assert sv.layers == [1, 2]
    assert sv.experts == [3, 5]
    assert sv.metadata.hook_names == (
        "blocks.1.hook_resid_pre",
        "blocks.1.mlp.hook_expert_out",
        "blocks.2.mlp.experts.5.hook_out",
        "blocks.2.hook_resid_post",
    )
    import moe_interp

    assert sv.metadata.version == moe_interp.__version__
    assert sv.metadata.created


def test_vectors_are_copied() -> None:
    v = vec(0)
    sv = SteeringVectors({RESID: v}, meta())
    v.add_(1.0)
    assert torch.equal(sv.vectors[RESID], vec(0))


def test_scaled() -> None:
    sv = make_sv()
    s = sv.scaled(2.0)
    assert s.coeffs == {k: 2.0 * c for k, c in sv.coeffs.items()}
    assert all(torch.equal(s.vectors[k], sv.vectors[k]) for k in sv)
    assert sv.coeffs[RESID] == 2.5  # original untouched


def test_add_merges() -> None:
    a = SteeringVectors({RESID: vec(0), POST: vec(1)}, meta(method="a"), coeffs={RESID: 2.0})
    b = SteeringVectors({RESID: vec(2), EXP: vec(3)}, meta(method="b"), coeffs={RESID: 3.0, EXP: 0.5})
    c = a + b
    assert set(c) == {RESID, POST, EXP}
    assert torch.equal(c.vectors[RESID], 2.0 * vec(0) + 3.0 * vec(2))
    assert c.coeffs[RESID] == 1.0
    assert torch.equal(c.vectors[POST], vec(1)) and c.coeffs[POST] == 1.0
    assert torch.equal(c.vectors[EXP], vec(3)) and c.coeffs[EXP] == 0.5
    assert c.metadata.method == "a+b"


@pytest.mark.parametrize(
    ("other_kw", "sv_kw", "what"),
    [
        ({"metadata": meta(family="qwen3_moe")}, {}, "family"),
        ({"metadata": meta(n_layers=L + 1)}, {}, "n_layers"),
        ({}, {"positions": "prompt"}, "positions"),
    ],
)
def test_add_incompatible(other_kw: dict[str, Any], sv_kw: dict[str, Any], what: str) -> None:
    a = SteeringVectors({RESID: vec(0)}, meta())
    b = SteeringVectors(**{"vectors": {RESID: vec(1)}, "metadata": meta(), **other_kw, **sv_kw})
    with pytest.raises(ValueError, match=what):
        a + b


def test_repr_and_html() -> None:
    sv = make_sv()
    r = repr(sv)
    assert r.startswith("SteeringVectors(") and "diff_in_means" in r and "n=4" in r
    assert "layers=[1, 2]" in r and "experts=[3, 5]" in r
    h = sv._repr_html_()
    assert "<table>" in h and h.count("<tr>") == 5 and "blocks.1.mlp.hook_expert_out" in h


# ------------------------------------------------------------------------------ io


@pytest.mark.parametrize("suffix", ["", ".safetensors", ".json"])
def test_save_load_roundtrip_exact(tmp_path: Path, suffix: str) -> None:
    sv = make_sv(positions="generated", conditioning="router_prob_topk")
    sv = replace_meta(sv, data_hash="abc123", extra={"alpha": [1, 2], "note": "x"})
    st, js = sv.save(tmp_path / f"vecs{suffix}")
    assert st == tmp_path / "vecs.safetensors" and js == tmp_path / "vecs.json"
    assert set(load_file(str(st))) == {encode_key(k) for k in sv}
    back = SteeringVectors.load(tmp_path / f"vecs{suffix}")
    assert set(back) == set(sv)
    for k in sv:
        assert torch.equal(back.vectors[k], sv.vectors[k])
        assert back.vectors[k].dtype == sv.vectors[k].dtype
    assert back.coeffs == sv.coeffs
    assert back.positions == "generated" and back.conditioning == "router_prob_topk"
    assert back.metadata == sv.metadata


def replace_meta(sv: SteeringVectors, **kw: Any) -> SteeringVectors:
    from dataclasses import replace

    return replace(sv, metadata=replace(sv.metadata, **kw))


def test_load_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        SteeringVectors.load(tmp_path / "nope")
    sv = make_sv()
    st, js = sv.save(tmp_path / "v")
    st.unlink()
    with pytest.raises(FileNotFoundError, match="v.safetensors"):
        SteeringVectors.load(tmp_path / "v")


def test_load_json_safetensors_disagree(tmp_path: Path) -> None:
    sv = make_sv()
    st, js = sv.save(tmp_path / "v")
    tensors = load_file(str(st))
    del tensors[encode_key(EXP)]
    tensors["blocks.3.hook_resid_post"] = vec(9)
    save_file(tensors, str(st))
    with pytest.raises(ValueError, match="disagree"):
        SteeringVectors.load(tmp_path / "v")


def test_load_bad_json_coeff(tmp_path: Path) -> None:
    _, js = make_sv().save(tmp_path / "v")
    doc = json.loads(js.read_text())
    doc["coeffs"][encode_key(RESID)] = float("inf")
    js.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="finite"):
        SteeringVectors.load(tmp_path / "v")


def test_load_width_mismatch_vs_metadata(tmp_path: Path) -> None:
    _, js = make_sv().save(tmp_path / "v")
    doc = json.loads(js.read_text())
    doc["metadata"]["d_model"] = D + 1
    js.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="d_model"):
        SteeringVectors.load(tmp_path / "v")


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("vectors", "coeffs", "kw", "match"),
    [
        ({RESID: torch.tensor([float("nan")] + [0.0] * (D - 1))}, {}, {}, "NaN or inf"),
        ({RESID: torch.full((D,), float("inf"))}, {}, {}, "NaN or inf"),
        ({RESID: vec(0)}, {RESID: float("nan")}, {}, "finite"),
        ({RESID: vec(0)}, {RESID: float("-inf")}, {}, "finite"),
        ({RESID: vec(0, D + 1)}, {}, {}, "width 9, expected d_model=8"),
        ({RESID: torch.zeros(2, D)}, {}, {}, "1-D"),
        ({RESID: torch.tensor(1.0)}, {}, {}, "1-D"),
        ({RESID: torch.zeros(D, dtype=torch.int64)}, {}, {}, "floating"),
        ({("blocks.1.mlp.hook_expert_out", E): vec(0)}, {}, {}, "out of range"),
        ({("blocks.1.mlp.hook_expert_out", -1): vec(0)}, {}, {}, "out of range"),
        ({("blocks.1.mlp.experts.6.hook_out", None): vec(0)}, {}, {}, "out of range"),
        ({("blocks.1.hook_resid_pre", 2): vec(0)}, {}, {}, "non-expert hook"),
        ({("blocks.1.mlp.hook_expert_out", None): vec(0)}, {}, {}, "needs an expert id"),
        ({("blocks.1.hook_resid_mid", None): vec(0)}, {}, {}, "unsupported hook name"),
        ({("blocks.4.hook_resid_pre", None): vec(0)}, {}, {}, "layer 4 out of range"),
        ({RESID: vec(0)}, {POST: 1.0}, {}, "without a vector"),
        ({RESID: vec(0)}, {}, {"positions": "later"}, "positions must be one of"),
        ({RESID: vec(0)}, {}, {"conditioning": "gate"}, "conditioning must be one of"),
        ({}, {}, {}, "non-empty"),
        ({"blocks.1.hook_resid_pre": vec(0)}, {}, {}, "tuple"),
    ],
)
def test_bad_input(vectors: Any, coeffs: Any, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SteeringVectors(vectors, meta(), coeffs, **kw)


def test_expert_on_dense_metadata() -> None:
    with pytest.raises(ValueError, match="dense"):
        SteeringVectors({EXP: vec(0)}, meta(n_experts=None))


def test_bad_metadata() -> None:
    with pytest.raises(ValueError, match="d_model"):
        meta(d_model=0)
    with pytest.raises(ValueError, match="n_experts"):
        meta(n_experts=0)


def test_scaled_bad_factor() -> None:
    with pytest.raises(ValueError, match="finite"):
        make_sv().scaled(float("nan"))


def test_add_steering_bad_input() -> None:
    with pytest.raises(ValueError, match="positions"):
        AddSteering("blocks.1.hook_resid_pre", vec(0), positions="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        AddSteering("blocks.1.hook_resid_pre", torch.full((D,), float("nan")))
    with pytest.raises(ValueError, match="width"):
        AddSteering("blocks.1.hook_resid_pre", vec(0))(torch.zeros(1, 2, D + 1), Ctx())


# ------------------------------------------------------------------------------ compatibility


@dataclass
class FakeModel:
    spec: Any
    names: list[str] = field(default_factory=list)
    entered: list[Any] = field(default_factory=list)

    def hook_names(self) -> list[str]:
        return self.names

    def intervene(self, *interventions: Any) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def cm() -> Any:
            self.entered.extend(interventions)
            yield "handle"
            self.entered.clear()

        return cm()


def fake_model(**kw: Any) -> FakeModel:
    spec = dict(family="olmoe", d_model=D, n_layers=L, n_experts=E)
    spec.update(kw)
    names = [
        f"blocks.{i}.{h}"
        for i in range(L)
        for h in ("hook_resid_pre", "hook_resid_post", "mlp.hook_expert_out")
    ]
    names += [f"blocks.{i}.mlp.experts.{e}.hook_out" for i in range(L) for e in range(E)]
    return FakeModel(SimpleNamespace(**spec), names)


def test_compatible_ok_and_apply() -> None:
    sv = make_sv()
    model = fake_model()
    sv.check_compatible(model)
    with sv.apply(model) as handle:
        assert handle == "handle"
        assert [iv.hook_name for iv in model.entered] == [iv.hook_name for iv in sv.to_interventions()]
    assert model.entered == []


@pytest.mark.parametrize(
    ("spec_kw", "what"),
    [
        ({"family": "qwen3_moe"}, "family"),
        ({"d_model": D * 2}, "d_model"),
        ({"n_layers": L + 2}, "n_layers"),
        ({"n_experts": E + 2}, "n_experts"),
    ],
)
def test_incompatible(spec_kw: dict[str, Any], what: str) -> None:
    sv = make_sv()
    model = fake_model(**spec_kw)
    with pytest.raises(ValueError, match=what):
        sv.check_compatible(model)
    with pytest.raises(ValueError, match=what):
        with sv.apply(model):
            pass


def test_unknown_hook_name() -> None:
    sv = make_sv()
    model = fake_model()
    model.names = [n for n in model.names if "experts.5" not in n]
    with pytest.raises(ValueError, match=r"unknown hook names.*experts\.5"):
        sv.check_compatible(model)


def test_load_with_model_checks(tmp_path: Path) -> None:
    make_sv().save(tmp_path / "v")
    assert len(SteeringVectors.load(tmp_path / "v", model=fake_model())) == 4
    with pytest.raises(ValueError, match="d_model"):
        SteeringVectors.load(tmp_path / "v", model=fake_model(d_model=D + 1))


# ------------------------------------------------------------------------------ gguf


def test_gguf_roundtrip_exact(tmp_path: Path) -> None:
    v1, v2, v3 = vec(0), vec(1), vec(2)
    sv = SteeringVectors(
        {
            ("blocks.1.hook_resid_post", None): v1,
            ("blocks.3.hook_resid_post", None): v2,
            ("blocks.3.hook_resid_pre", None): v3,  # == output of block 2 -> direction.2
        },
        meta(),
        coeffs={("blocks.1.hook_resid_post", None): 1.5},
    )
    p = export_control_vector_gguf(sv, tmp_path / "cv.gguf")
    back = read_control_vector_gguf(p)
    assert sorted(back) == [1, 2, 3]
    assert torch.equal(back[1], 1.5 * v1)
    assert torch.equal(back[2], v3)
    assert torch.equal(back[3], v2)
    assert all(t.dtype == torch.float32 and t.shape == (D,) for t in back.values())
    assert read_control_vector_model_hint(p) == "olmoe"

    import gguf

    r = gguf.GGUFReader(str(p))
    assert r.get_field("general.architecture").contents() == "controlvector"
    assert r.get_field("controlvector.layer_count").contents() == 3


def test_gguf_sums_same_residual_point(tmp_path: Path) -> None:
    sv = SteeringVectors(
        {("blocks.1.hook_resid_post", None): vec(0), ("blocks.2.hook_resid_pre", None): vec(1)}, meta()
    )
    back = read_control_vector_gguf(export_control_vector_gguf(sv, tmp_path / "cv.gguf"))
    assert list(back) == [1] and torch.equal(back[1], vec(0) + vec(1))


def test_gguf_rejects_non_residual(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"non-residual keys.*hook_expert_out@e3.*experts\.5\.hook_out"):
        export_control_vector_gguf(make_sv(), tmp_path / "cv.gguf")


@pytest.mark.parametrize(
    "hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre"]
)
def test_gguf_rejects_below_direction_1(tmp_path: Path, hook: str) -> None:
    sv = SteeringVectors({(hook, None): vec(0)}, meta())
    with pytest.raises(ValueError, match="direction.1"):
        export_control_vector_gguf(sv, tmp_path / "cv.gguf")


def test_gguf_position_scope(tmp_path: Path) -> None:
    sv = SteeringVectors({POST: vec(0)}, meta(), positions="generated")
    with pytest.raises(ValueError, match="every position"):
        export_control_vector_gguf(sv, tmp_path / "cv.gguf")
    p = export_control_vector_gguf(sv, tmp_path / "cv.gguf", allow_position_scope=True)
    assert torch.equal(read_control_vector_gguf(p)[2], vec(0))


def test_gguf_read_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        read_control_vector_gguf(tmp_path / "missing.gguf")


# ------------------------------------------------------------------------------ integration (real tiny model)


@pytest.fixture(scope="module")
def olmoe(tiny_model: Any) -> Any:
    """The session's tiny olmoe (conftest); steering goes through ``apply`` contexts only."""
    return tiny_model("olmoe")


def test_tiny_model_apply(olmoe: Any, tmp_path: Path) -> None:
    model = olmoe
    spec = model.spec
    layer = min(1, spec.n_layers - 1)
    key = (f"blocks.{layer}.hook_resid_pre", None)
    v = torch.randn(spec.d_model, generator=torch.Generator().manual_seed(0))
    sv = SteeringVectors({key: v}, SteeringMetadata.from_model(model, method="test"), coeffs={key: 8.0})
    sv.check_compatible(model)
    prompts = ["Hello there", "How do I bake bread?"]
    base = model.forward(prompts, chat=False)
    with sv.apply(model):
        steered = model.forward(prompts, chat=False)
    after = model.forward(prompts, chat=False)
    assert torch.equal(after, base)
    assert not torch.allclose(steered, base)
    # a zero vector is an exact no-op
    zero = SteeringVectors({key: torch.zeros(spec.d_model)}, sv.metadata)
    with zero.apply(model):
        assert torch.equal(model.forward(prompts, chat=False), base)
    # save / load against the model
    sv.save(tmp_path / "sv")
    assert len(SteeringVectors.load(tmp_path / "sv", model=model)) == 1


def test_tiny_model_expert_key_and_incompatible(olmoe: Any) -> None:
    model = olmoe
    spec = model.spec
    assert spec.moe_layers and spec.n_experts  # olmoe: every layer is MoE
    key = (f"blocks.{spec.moe_layers[0]}.mlp.hook_expert_out", 0)
    assert key[0] in model.hook_names()
    meta_ = SteeringMetadata.from_model(model)
    sv = SteeringVectors({key: torch.ones(spec.d_model)}, meta_)
    sv.check_compatible(model)  # an expert key of the model is accepted
    bad = SteeringVectors(
        {("blocks.0.hook_resid_pre", None): torch.ones(spec.d_model + 1)}, replace_d(meta_, spec)
    )
    with pytest.raises(ValueError, match="d_model"):
        bad.check_compatible(model)


def replace_d(m: SteeringMetadata, spec: Any) -> SteeringMetadata:
    from dataclasses import replace

    return replace(m, d_model=int(spec.d_model) + 1)
