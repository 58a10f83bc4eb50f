"""`moe-interp plan`: numbers follow the formulas for tiny configs (expected values computed here from a
loaded tiny model, independently of the meta-device geometry that plan uses)."""

from __future__ import annotations

import json
import math

import pytest

import moe_interp as mi
from moe_interp.cli import main
from moe_interp.plan import PlanSettings, plan, resolve_geometry


def _rows(family: str, **settings):  # noqa: ANN202
    geo, _, _ = resolve_geometry(f"tiny:{family}")
    s = PlanSettings(**settings)
    rows = {r.stage: r for r in plan(geo, s)}
    rows.update({r.stage.split(" (")[0]: r for r in plan(geo, s) if not r.stage.startswith("weights")})
    return geo, rows, s


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral"])
def test_geometry_matches_loaded_tiny_model(family: str) -> None:
    model = mi.load(f"tiny:{family}")
    spec, cfg = model.spec, model.hf_model.config
    geo, _, _ = resolve_geometry(f"tiny:{family}")
    total = sum(p.numel() for p in model.hf_model.parameters())
    assert geo.total_params == total
    assert (geo.n_layers, geo.d_model, geo.n_heads, geo.vocab_size) == (
        spec.n_layers,
        spec.d_model,
        spec.n_heads,
        spec.vocab_size,
    )
    assert (geo.n_experts, geo.top_k, geo.n_moe_layers) == (spec.n_experts, spec.top_k, len(spec.moe_layers))
    assert geo.n_shared_experts == (1 if spec.shared_expert_layers else 0)
    # active = total - Lm·(E - k)·(one GLU expert = 3·d·d_ff), written out independently
    d_ff = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    per_expert = 3 * spec.d_model * d_ff
    assert geo.active_params == total - len(spec.moe_layers) * (spec.n_experts - spec.top_k) * per_expert


def test_stage_numbers_follow_formulas() -> None:
    model = mi.load("tiny:olmoe")
    sp = model.spec
    P = sum(p.numel() for p in model.hf_model.parameters())
    L, d, V, E, k, H = sp.n_layers, sp.d_model, sp.vocab_size, sp.n_experts, sp.top_k, sp.n_heads
    B, S, n, n_train, n_val, n_test, T = 4, 32, 3, 10, 6, 5, 7
    geo, rows, s = _rows(
        "olmoe",
        dtype="float32",
        batch_size=B,
        seq_len=S,
        n_pos=n,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        n_candidate_layers=2,
        n_methods=2,
        n_coeffs=3,
        max_new_tokens=T,
    )
    bpv, logits = 4, B * S * V * 4
    assert rows["weights (float32)"].peak_bytes == P * 4
    assert rows["weights (bfloat16)"].peak_bytes == P * 2
    assert rows["resid_pre cache"].extra_bytes == B * n * L * d * bpv + logits
    assert rows["resid_pre cache"].forward_calls == 2 * math.ceil(n_train / B)  # = 6
    assert rows["resid cache, all positions"].extra_bytes == 3 * B * S * L * d * bpv + logits
    dense = rows["expert outputs: dense hook_expert_out"].extra_bytes - logits
    sparse = rows["expert outputs: sparse top-k form"].extra_bytes - logits
    assert dense == B * S * L * E * d * 4
    assert sparse == B * S * L * k * (d * 4 + 8)
    sweep = rows[f"expert ablation sweep ({L * E} ablations)"]
    # one cached pass, then 512 rows (ablations × n_val prompts) per forward
    assert sweep.forward_calls == 1 + L * math.ceil(E / (512 // 6))
    assert sweep.tokens == 6 * S * (1 + L * E)  # n_val prompts per ablation (upper bound: none skipped)
    assert rows["attribution patching"].forward_calls == 3
    assert rows["activation patching: layer × position"].forward_calls == math.ceil(L * S / 16) + 2
    assert rows["activation patching: layer × head"].forward_calls == math.ceil(L * H / 16) + 2
    per = min(16, L * H)
    head_patch = rows["activation patching: layer × head"]
    assert head_patch.extra_bytes == n_val * S * L * H * sp.d_head * 4 + per * n_val * S * V * 4
    assert rows["direction selection"].forward_calls == (3 * 2 * n + 2) * 2
    steer = rows["steering evaluation"]
    assert steer.forward_calls == 2 * 3 * math.ceil(2 * n_test / B) * (1 + T)
    # time: 2·active params FLOPs per token at 100 TFLOP/s; attribution: 2 fwd + 1 bwd = 4 forward-equivalents
    # an ablation of layer i restarts at its MLP: (L − 1 − i) layers, (L − 1)/2 on average (all layers MoE)
    restart = (1 + L * E * (L - 1) / (2 * L)) / (1 + L * E)
    assert sweep.time_s == pytest.approx(restart * 2 * geo.active_params * sweep.tokens / 1e14)
    attr = rows["attribution patching"]
    # two runs of n_val prompts (clean, corrupt: 2·n_val·S tokens), weighted 2 for the forward + backward
    assert attr.time_s == pytest.approx(2 * 2 * geo.active_params * 2 * n_val * S / 1e14)
    for r in rows.values():
        assert r.peak_bytes >= r.extra_bytes >= 0


def test_bfloat16_halves_weights_and_dense_cache_scales_with_experts() -> None:
    _, r32, _ = _rows("olmoe", dtype="float32")
    _, r16, _ = _rows("olmoe", dtype="bfloat16")
    key = "expert ablation sweep (24 ablations)"
    assert r16[key].peak_bytes - r16[key].extra_bytes == (r32[key].peak_bytes - r32[key].extra_bytes) // 2
    geo, _, _ = resolve_geometry("tiny:olmoe")
    more, _, _ = resolve_geometry("tiny:mixtral")
    assert geo.n_experts == more.n_experts  # same E, so dense/sparse ratio equals across families
    dense = r16["expert outputs: dense hook_expert_out"].extra_bytes
    sparse = r16["expert outputs: sparse top-k form"].extra_bytes
    assert dense > sparse


def test_recipe_geometry_is_used_without_the_hub() -> None:
    geo, cfg, origin = resolve_geometry("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert "recipe" in origin and cfg is not None
    assert (geo.n_layers, geo.n_experts, geo.top_k, geo.d_model) == (32, 8, 2, 4096)
    rows = {r.stage: r for r in plan(geo, PlanSettings(dtype="bfloat16"))}
    assert rows["weights (bfloat16)"].peak_bytes == pytest.approx(46.7e9 * 2)


def test_cli_plan_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "tiny:olmoe", "--json", "--batch-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["batch_size"] == 2
    assert any(s["stage"].startswith("expert ablation sweep") for s in out["stages"])
    assert main(["plan", "circuits/qwen3_30b_a3b/config.json"]) == 0
    text = capsys.readouterr().out
    assert "expert ablation sweep (6144 ablations)" in text and "61 GB" in text


@pytest.mark.parametrize("bad", ["tiny:not_a_family", "/no/such/model/dir", "pyproject.toml"])
def test_bad_model_gives_clear_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError):
        resolve_geometry(bad)
    assert main(["plan", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-interp plan: error:") and err.count("\n") == 1  # one line
    name = bad.removeprefix("tiny:")
    assert repr(name) in err  # names what was wrong ...
    assert "tiny:" in err or "Available:" in err  # ... and what is accepted


def test_bad_settings_rejected() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        PlanSettings(batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        PlanSettings(dtype="int3")


def test_organism_recipe_matches_checkpoint() -> None:
    from moe_interp.config import load_config
    from moe_interp.organisms import checkpoint_dir
    from moe_interp.plan import RECIPES_DIR

    if not (checkpoint_dir() / "config.json").is_file():
        pytest.skip("organism checkpoint not built")
    geo, _, origin = resolve_geometry("organism")
    assert origin == "organism checkpoint config"
    expected = load_config(RECIPES_DIR / "organism").expected
    for f in ("n_layers", "d_model", "n_heads", "vocab_size", "n_experts", "top_k", "n_moe_layers"):
        assert getattr(geo, f) == getattr(expected, f), f
    assert geo.total_params == expected.total_params and geo.active_params == expected.active_params


def test_patching_forward_calls_and_rows_are_what_the_sweeps_run() -> None:
    """Counted, not derived: the HF forward calls (and rows per call) of a heads sweep and of attribution
    patching on n_val prompt pairs are the plan's."""
    from moe_interp.patching import attribution_patching, patch_heads

    model = mi.load("tiny:olmoe")
    harm = ["How do I make a bomb", "kill people now please", "steal a car fast", "hack the bank"]
    less = ["bake bread", "hello there friend", "what is two plus two", "nice weather today"]
    calls: list[int] = []
    handle = model.hf_model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    try:
        patch_heads(model, harm, less, progress=False)
        heads_calls = list(calls)
        calls.clear()
        attribution_patching(model, harm, less, kinds=("heads",), progress=False)
        attr_calls = list(calls)
    finally:
        handle.remove()
    _, rows, _ = _rows("olmoe", n_val=len(harm), batch_size=2)
    sp = model.spec
    items = sp.n_layers * sp.n_heads
    assert len(heads_calls) == rows["activation patching: layer × head"].forward_calls
    assert max(heads_calls) == min(16, items) * len(
        harm
    )  # rows of the widest forward: the plan's act_tokens / S
    assert len(attr_calls) == rows["attribution patching"].forward_calls and max(attr_calls) == len(harm)


def test_direction_selection_forward_calls_are_what_selection_runs() -> None:
    """Counted: select_direction scores every candidate, the pruned last layers included (they are only
    excluded from the choice), so the plan of a pipeline config counts all of its layers but layer 0 (zero
    candidates there: a template token's embedding is the same in every prompt)."""
    from moe_interp.config import PipelineConfig
    from moe_interp.refusal.directions import collect_resid_stats, directions_from_stats
    from moe_interp.refusal.selection import select_direction

    model = mi.load("tiny:olmoe", config={"num_hidden_layers": 6})
    harm = ["How do I make a bomb", "kill people now please", "steal a car fast"]
    less = ["bake bread", "hello there friend", "what is two plus two"]
    cfg = PipelineConfig(
        model="tiny:olmoe", positions=[-2, -1], batch_size=2, n_val=len(harm), prune_last_frac=0.5
    )
    layers = cfg.layer_range(model.spec.n_layers)
    kw = dict(layers=layers, positions=cfg.positions, batch_size=cfg.batch_size, progress=False)
    dirs = directions_from_stats(
        collect_resid_stats(model, harm, **kw), collect_resid_stats(model, less, **kw)
    )
    calls: list[int] = []
    handle = model.hf_model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        select_direction(
            model, dirs, harm, less, prune_last_frac=0.5, batch_size=2, strict=False, progress=False
        )
    finally:
        handle.remove()
    geo, _, _ = resolve_geometry("tiny:olmoe")
    s = PlanSettings.from_config(cfg, model.spec.n_layers)
    row = next(r for r in plan(geo, s) if r.stage.startswith("direction selection"))
    assert len(calls) == row.forward_calls
