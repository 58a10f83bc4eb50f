"""Recipes under circuits/: each validates against the pipeline config schema and its settings apply to a
tiny random model of the same family (built with the recipe's structural settings: top-k, shared experts,
dense first layers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moe_interp as mi
from moe_interp.config import ExpectedGeometry, PipelineConfig, load_config
from moe_interp.refusal import post_instruction_positions, refusal_first_token_ids, refusal_score
from moe_interp.tiny import TINY_CONFIGS

ROOT = Path(__file__).resolve().parent.parent / "circuits"
RECIPES = sorted(p.parent.name for p in ROOT.glob("*/config.json"))
EXPECTED_RECIPES = {
    "organism": "organism",
    "olmoe": "allenai/OLMoE-1B-7B-0924-Instruct",
    "mixtral": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "qwen3_30b_a3b": "Qwen/Qwen3-30B-A3B",
    "gpt_oss_20b": "openai/gpt-oss-20b",
    "deepseek_v2_lite": "deepseek-ai/DeepSeek-V2-Lite-Chat",
    "qwen1_5_moe": "Qwen/Qwen1.5-MoE-A2.7B-Chat",
}
FAMILY_OF = {
    "allenai/OLMoE-1B-7B-0924-Instruct": "olmoe",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mixtral",
    "Qwen/Qwen3-30B-A3B": "qwen3_moe",
    "openai/gpt-oss-20b": "gpt_oss",
    "deepseek-ai/DeepSeek-V2-Lite-Chat": "deepseek_v2",
    "Qwen/Qwen1.5-MoE-A2.7B-Chat": "qwen2_moe",
    "organism": "olmoe",
}
TINY_EXPERTS = 16
PROMPTS = ["How do I bake bread at home?", "Hi", "Tell me how to build a bomb."]


def _tiny_overrides(cfg: PipelineConfig) -> dict:
    """Tiny-config overrides reflecting the recipe's structure (experts capped at 16, same top-k)."""
    g = cfg.expected
    assert g is not None
    base = TINY_CONFIGS[cfg.family]
    n_exp = min(g.n_experts, TINY_EXPERTS)
    over: dict = {"num_experts_per_tok": g.top_k}
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if key in base:
            over[key] = n_exp
    if "n_shared_experts" in base:
        over["n_shared_experts"] = g.n_shared_experts
    if "first_k_dense_replace" in base:
        over["first_k_dense_replace"] = g.n_layers - g.n_moe_layers
        over["num_hidden_layers"] = max(3, g.n_layers - g.n_moe_layers + 2)
    return over


@pytest.fixture(scope="module", params=RECIPES)
def recipe(request: pytest.FixtureRequest):  # noqa: ANN201
    cfg = load_config(ROOT / request.param / "config.json")
    model = mi.load(f"tiny:{cfg.family}", config=_tiny_overrides(cfg))
    return request.param, cfg, model


def test_all_recipes_present() -> None:
    assert set(EXPECTED_RECIPES) <= set(RECIPES)
    for name, model_id in EXPECTED_RECIPES.items():
        cfg = load_config(ROOT / name)
        assert cfg.model == model_id
        assert cfg.family == FAMILY_OF[model_id]
        assert cfg.expected is not None and cfg.memory, name


def _run_artefacts(folder: Path) -> list[str]:
    """Files and folders under ``folder`` that a pipeline run writes (``moe_interp.runs``)."""
    from moe_interp.runs import ARTEFACT_DIRS, ARTEFACT_FILES

    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.name in ARTEFACT_FILES or (p.is_dir() and p.name in ARTEFACT_DIRS)
    )


def test_only_local_models_hold_run_results() -> None:
    """Checkpoint recipes (hub ids) were not run here: their folders hold no run output and no JSON besides
    the config; the organism's folder holds its recorded run (so the check can see one)."""
    from moe_interp.runs import RUN_FILE

    for name in RECIPES:
        cfg = load_config(ROOT / name)
        if "/" in cfg.model:
            assert not _run_artefacts(ROOT / name), name
            results = [p.name for p in (ROOT / name).rglob("*.json") if p.name != "config.json"]
            assert not results, (name, results)
    assert any(a.endswith(RUN_FILE) for a in _run_artefacts(ROOT / "organism"))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_round_trips_and_is_consistent(name: str, tmp_path: Path) -> None:
    cfg = load_config(ROOT / name / "config.json")
    again = load_config(cfg.save(tmp_path / "c.json"))
    assert again == cfg and again.to_dict() == json.loads((ROOT / name / "config.json").read_text())
    g = cfg.expected
    assert g is not None
    # memory = published params × 2 bytes (bf16) and × 4 (fp32)
    assert cfg.memory["memory_gb_bf16"] == pytest.approx(g.total_params * 2 / 1e9, rel=0.01)
    assert cfg.memory["memory_gb_fp32"] == pytest.approx(g.total_params * 4 / 1e9, rel=0.01)
    # published active params ≈ total − Lm·(E − k)·(one GLU expert = 3·d·d_expert); model cards round and
    # some exclude the embedding, hence the tolerance
    inactive = g.n_moe_layers * (g.n_experts - g.top_k) * 3 * g.d_model * g.d_expert
    assert g.total_params - inactive == pytest.approx(g.active_params, rel=0.2)
    assert cfg.layers is not None and cfg.layers[1] <= g.n_layers
    assert len(cfg.positions) <= (cfg.post_instruction_tokens or 99)
    assert cfg.chat_template_notes, "recipes must say how the chat template ends"


def test_recipe_structure_applies_to_tiny(recipe) -> None:  # noqa: ANN001
    name, cfg, model = recipe
    g, spec = cfg.expected, model.spec
    assert spec.family == cfg.family
    assert spec.top_k == g.top_k
    assert spec.n_experts == min(g.n_experts, TINY_EXPERTS)
    assert bool(spec.shared_expert_layers) == (g.n_shared_experts > 0)
    assert (len(spec.moe_layers) < spec.n_layers) == (g.n_moe_layers < g.n_layers)


def test_recipe_refusal_phrases_tokenize(recipe) -> None:  # noqa: ANN001
    name, cfg, model = recipe
    tok = model.tokenizer
    for phrase in cfg.refusal_phrases:
        ids = tok(phrase, add_special_tokens=False)["input_ids"]
        assert ids and tok.decode(ids) == phrase, (name, phrase)
    ids = refusal_first_token_ids(tok, cfg.refusal_phrases)
    assert ids and all(0 <= i < spec_vocab(model) for i in ids)
    logits = model.forward(PROMPTS)
    score = refusal_score(logits[:, -1], ids)
    assert score.shape == (len(PROMPTS),) and torch.isfinite(score).all()


def spec_vocab(model) -> int:  # noqa: ANN001
    return model.spec.vocab_size


def test_recipe_positions_and_layers_apply(recipe) -> None:  # noqa: ANN001
    name, cfg, model = recipe
    post = post_instruction_positions(model)
    # offsets that exist in the tiny template's post-instruction region
    usable = [p for p in cfg.positions if p >= post[0]]
    assert usable, (name, cfg.positions, post)
    assert set(usable) <= set(post)
    if (
        name == "organism"
    ):  # same template structure as the tiny tokenizer: exactly the post-instruction tokens
        assert cfg.positions == post
    layers = cfg.layer_range(model.spec.n_layers)
    assert layers and all(0 <= L < model.spec.n_layers for L in layers)
    assert layers == sorted(set(layers))
    names = [f"blocks.{L}.hook_resid_pre" for L in layers]
    _, cache = model.run_with_cache(PROMPTS, names=names, positions=usable)
    for n in names:
        assert cache[n].shape == (len(PROMPTS), len(usable), model.spec.d_model)


def test_layer_range_scales_with_depth() -> None:
    cfg = load_config(ROOT / "mixtral")  # layers [4, 32] of 32
    assert cfg.layer_range(32) == list(range(4, 32))
    assert cfg.layer_range(8) == list(range(1, 8))
    assert cfg.layer_range(3) == [0, 1, 2]


# ------------------------------------------------------------------------------------- schema errors
def _base() -> dict:
    return json.loads((ROOT / "olmoe" / "config.json").read_text())


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"n_val": 0}, "n_val"),
        ({"n_train": 32, "n_gate_train": 31}, "n_gate_train"),  # fewer than the steering's own prompts
        ({"n_gate_train": "all"}, "n_gate_train"),
        ({"distinct2_floor": 0}, "distinct2_floor"),
        ({"distinct2_floor": 1.2}, "distinct2_floor"),
        ({"distinct2_floor": "0.8"}, "distinct2_floor"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"layers": [5, 3]}, "layers"),
        ({"layers": [0, 99]}, "layers"),
        ({"positions": [-1, 0]}, "positions"),
        ({"positions": [-9, -1]}, "positions"),  # beyond post_instruction_tokens
        ({"prune_last_frac": 1.0}, "prune_last_frac"),
        ({"kl_threshold": -1}, "kl_threshold"),
        ({"dtype": "float8"}, "dtype"),
        ({"refusal_phrases": []}, "refusal_phrases"),
        ({"steering_methods": ["magic"]}, "steering_methods"),
        ({"family": "gpt2"}, "family"),
        ({"model": "tiny:mixtral"}, "family"),
        ({"circuit": {"target_fraction": 1.5}}, "circuit.target_fraction"),
        ({"circuit": {"candidates": ["neurons"]}}, "circuit.candidates"),
        ({"circuit": {"refine": "yes"}}, "circuit.refine"),
        ({"circuit": {"pool": 0}}, "circuit.pool"),
        ({"memory": {"memory_gb_bf16": "lots"}}, "memory.memory_gb_bf16"),
        ({"seed": True}, "seed"),
        ({"patching": "gradient"}, "patching"),
        ({"patching_top_n": 0}, "patching_top_n"),
        ({"steering_methods": ["dense"], "steering_kwargs": {"dense": {"top_n": 4}}}, "steering_kwargs"),
        # the keyword autotuning sweeps, and topic methods' keep= prompts, are the pipeline's to set
        (
            {"steering_methods": ["steer_router"], "steering_kwargs": {"steer_router": {"n_deactivate": 2}}},
            "steering_kwargs",
        ),
        (
            {"steering_methods": ["topic_gated"], "steering_kwargs": {"topic_gated": {"keep": ["x"]}}},
            "steering_kwargs",
        ),
        (  # a gate's prompts too: a recipe gives their number, n_gate_train
            {
                "steering_methods": ["gated_dense"],
                "steering_kwargs": {"gated_dense": {"gate_harmless": ["x"]}},
            },
            "steering_kwargs",
        ),
    ],
)
def test_bad_values_name_the_field(patch: dict, field: str, tmp_path: Path) -> None:
    data = {**_base(), **patch}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"'{field}'|{field}:"):
        load_config(path)


def test_bad_expected_geometry() -> None:
    data = _base()
    data["expected"] = {**data["expected"], "top_k": 100}
    with pytest.raises(ValueError, match="expected.top_k"):
        PipelineConfig.from_dict(data)
    data["expected"] = {k: v for k, v in _base()["expected"].items() if k != "d_model"}
    with pytest.raises(ValueError, match="d_model"):
        PipelineConfig.from_dict(data)


def test_unknown_keys_list_valid_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**_base(), "n_trian": 5}))
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['n_trian'\].*Valid keys: .*n_train"):
        load_config(path)
    data = _base()
    data["circuit"] = {"target_frac": 0.5}
    with pytest.raises(ValueError, match="target_fraction"):
        PipelineConfig.from_dict(data)
    with pytest.raises(ValueError, match="Missing key"):
        PipelineConfig.from_dict({"family": "olmoe"})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(path)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.json")


def test_family_may_be_inferred_and_candidates_match_circuits() -> None:
    from moe_interp.circuits import CANDIDATES

    assert PipelineConfig(model="org/name", family="").family is None
    assert PipelineConfig(model="org/name").family is None
    assert set(PipelineConfig(model="organism").circuit.candidates) <= set(CANDIDATES)
    for name in RECIPES:
        assert set(load_config(ROOT / name).circuit.candidates) <= set(CANDIDATES)


def test_organism_recipe_geometry_is_the_checkpoints(organism) -> None:  # noqa: ANN001 - MoEModel (conftest)
    g, spec = load_config(ROOT / "organism").expected, organism.spec
    assert isinstance(g, ExpectedGeometry)
    assert g.total_params == sum(p.numel() for p in organism.hf_model.parameters())
    assert (g.n_layers, g.d_model, g.n_heads, g.vocab_size) == (
        spec.n_layers,
        spec.d_model,
        spec.n_heads,
        spec.vocab_size,
    )
    assert (g.n_experts, g.top_k, g.n_moe_layers) == (spec.n_experts, spec.top_k, len(spec.moe_layers))


def test_defaults_are_valid_and_load_kwargs() -> None:
    cfg = PipelineConfig(model="Qwen/Qwen3-30B-A3B", family="qwen3_moe", device_map="auto")
    assert cfg.load_kwargs() == {"dtype": torch.bfloat16, "device_map": "auto"}
    # a bundled model moves whole to one device: a strategy means the first GPU if there is one
    first = "cuda" if torch.cuda.is_available() else "cpu"
    for model in ("tiny:olmoe", "organism"):
        cfg = PipelineConfig(model=model, family="olmoe", device_map="auto")
        assert cfg.load_kwargs() == {"dtype": torch.bfloat16, "device": first}
        cfg = PipelineConfig(model=model, family="olmoe", device_map="cpu")
        assert cfg.load_kwargs() == {"dtype": torch.bfloat16, "device": "cpu"}
    assert PipelineConfig(model="tiny:olmoe", family="olmoe").load_kwargs() == {"dtype": torch.bfloat16}


def test_a_bundled_model_device_map_fails_before_the_model_loads() -> None:
    with pytest.raises(ValueError, match="device_map.*'auto'.*'cuda:0'"):
        PipelineConfig.from_dict({"model": "tiny:olmoe", "device_map": "gpu-please"})
    # a config written for a GPU reads (and plans) anywhere; loading it needs the GPU
    cfg = PipelineConfig.from_dict({"model": "organism", "device_map": "cuda:7"})
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="CUDA device"):
            cfg.load_kwargs()


def test_every_field_has_one_validator_and_validate_changes_nothing() -> None:
    from dataclasses import fields as dc_fields

    from moe_interp.config import _FIELD_VALIDATORS

    names = [n for n, _ in _FIELD_VALIDATORS]
    assert len(names) == len(set(names))
    # circuit/expected are dataclasses validating themselves; every other field has exactly one validator
    assert set(names) == {f.name for f in dc_fields(PipelineConfig)} - {"circuit", "expected"}
    cfg = PipelineConfig.from_dict(_base())
    before = cfg.to_dict()
    cfg.validate()
    assert cfg.to_dict() == before
    cfg.positions = (-2, -1)  # a tuple is accepted and not rewritten by validate()
    cfg.validate()
    assert cfg.positions == (-2, -1)
    cfg.n_val = 0  # a field changed after construction is caught by validate()
    with pytest.raises(ValueError, match="'n_val'"):
        cfg.validate()


def test_steering_kwargs_are_checked_against_the_fit_function_and_the_one_it_forwards_to() -> None:
    """expert_conditioned passes its other keywords on to fit_routing_experts: top_n is accepted there."""
    data = {**_base(), "steering_methods": ["expert_conditioned", "topic_induce"]}
    ok = {"expert_conditioned": {"top_n": 8, "topk": True}, "topic_induce": {"layer": 1, "coeff": 2.0}}
    assert PipelineConfig.from_dict({**data, "steering_kwargs": ok}).steering_kwargs == ok
    with pytest.raises(
        ValueError, match=r"'expert_conditioned' does not take \['top_m'\].*takes \[.*'top_n'"
    ):
        PipelineConfig.from_dict({**data, "steering_kwargs": {"expert_conditioned": {"top_m": 8}}})
