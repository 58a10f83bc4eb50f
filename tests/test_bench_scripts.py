"""The GPU benchmark script runs end to end (``--tiny``: tiny geometry on the CPU), so it is not dead code."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):  # noqa: ANN202 - a module
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_gpu_olmoe_tiny_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_olmoe.json"
    res = _load("gpu_olmoe").main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["geometry"] == "tiny"
    assert set(res["hooks"]) == {"hf", "resid", "router", "topk_expert_out", "expert_out", "all"}
    stages = saved["stages"]
    failed = {k: v["error"] for k, v in stages.items() if "error" in v}
    assert not failed, failed
    for key in (
        "sweep_fast_layer0",
        "direction_extraction",
        "attribution_patching",
        "expert_ablation_sweep_full",
    ):
        assert stages[key]["forward_calls"] >= 1 and stages[key]["wall_s"] > 0
    assert stages["sweep_fast_layer0"]["max_abs_diff_per_prompt"] <= 1e-5
    assert stages["expert_ablation_sweep_full"]["plan"]["forward_calls"] >= 1
    assert saved["complete"] is True


def test_gpu_olmoe_in_half_precision_measures_both_sweeps_against_an_fp32_copy(tmp_path: Path) -> None:
    """In bf16 the fast sweep and the per-expert loop differ by rounding: each is compared with the loop on an
    fp32 copy of the same weights, so the JSON says which is nearer the exact value."""
    out = tmp_path / "gpu_olmoe_bf16.json"
    _load("gpu_olmoe").main(["--tiny", "--dtype", "bfloat16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["dtype"] == "torch.bfloat16" and saved["complete"] is True
    fast, loop = saved["stages"]["sweep_fast_layer0"], saved["stages"]["sweep_loop_layer0"]
    assert "fp32_reference_error" not in fast
    # rounding errors of the same order as the difference between the two (none of them is zero in bf16)
    assert (
        fast["max_abs_diff_per_prompt"] > 0
        and fast["max_abs_err_vs_fp32"] > 0
        and loop["max_abs_err_vs_fp32"] > 0
    )
    assert fast["max_abs_diff_per_prompt"] <= fast["max_abs_err_vs_fp32"] + loop["max_abs_err_vs_fp32"] + 1e-6


def test_compare_runs_finds_every_kind_of_difference(tmp_path: Path) -> None:
    compare_runs = _load("compare_runs")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    summary = {"timings_s": {"x": 1.0}, "rates": [0.5, 0.25], "chosen": "blocks.1.attn.hook_z", "ok": True}
    (a / "summary.json").write_text(json.dumps(summary))
    same = compare_runs.main([str(a), str(a)])["files"]["summary.json"]
    assert same["numbers"] == 2 and same["max_abs_diff"] == 0.0
    assert same["non_numeric_differing"] == [] and same["in_one_only"] == []
    other = dict(summary, timings_s={"x": 9.0}, rates=[0.5, 0.375], chosen="blocks.0.attn.hook_z", extra=1)
    (b / "summary.json").write_text(json.dumps(other))
    res = compare_runs.main([str(a), str(b), "--out", str(tmp_path / "cmp.json")])
    r = res["files"]["summary.json"]
    assert r["max_abs_diff"] == 0.125 and r["max_abs_diff_at"] == "/rates[1]"  # timings are not compared
    assert r["non_numeric_differing"] == [{"path": "/chosen", "a": summary["chosen"], "b": other["chosen"]}]
    assert r["in_one_only"] == ["/extra"]
    assert res["files"]["circuit.json"] == {"missing": [str(a / "circuit.json"), str(b / "circuit.json")]}
    assert json.loads((tmp_path / "cmp.json").read_text()) == res
    (b / "summary.json").write_text(json.dumps(dict(summary, rates=[float("nan"), 0.25])))
    nan = compare_runs.main([str(a), str(b)])["files"]["summary.json"]
    assert nan["max_abs_diff_at"] == "/rates[0]"  # a NaN on one side is a difference, not a match


def test_compare_runs_edge_values() -> None:
    """Equal infinities match; one infinite side is an infinite difference; a bool is not the number 1; an empty
    container against a missing key is a difference."""
    compare = _load("compare_runs").compare
    inf = float("inf")
    same = compare({"x": inf, "y": [1.0]}, {"x": inf, "y": [1.0]})
    assert same["max_abs_diff"] == 0.0 and same["non_numeric_differing"] == []
    assert compare({"x": inf}, {"x": 1.0})["max_abs_diff"] == inf
    assert compare({"ok": True}, {"ok": 1})["non_numeric_differing"] == [{"path": "/ok", "a": True, "b": 1}]
    assert compare({"x": [], "y": 1}, {"y": 1})["in_one_only"] == ["/x"]
