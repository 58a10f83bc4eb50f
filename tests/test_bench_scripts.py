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
