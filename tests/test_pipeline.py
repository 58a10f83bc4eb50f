"""The locate pipeline: stage caching (resume, stale results), output-folder safety, and one tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moe_interp import pipeline
from moe_interp.cli import main as cli_main


def _run(tmp_path: Path, calls: list[str], fingerprint: dict[str, str], resume: bool) -> pipeline.Run:
    run = pipeline.Run(
        model=None,
        out=tmp_path,
        config=None,
        prompts={},
        fingerprint=fingerprint,
        resume=resume,
        log=lambda s: None,
    )

    def stage_a(r: pipeline.Run) -> dict[str, Any]:
        calls.append("a")
        return {"x": 1}

    def stage_b(r: pipeline.Run) -> dict[str, Any]:
        calls.append("b")
        return {"y": r.results["a"]["x"] + 1}

    run.stage("a", stage_a)
    run.stage("b", stage_b, ("a",))
    return run


def test_resume_reuses_matching_stages_and_recomputes_stale(tmp_path: Path) -> None:
    calls: list[str] = []
    fp = {"model_hash": "m", "prompts_hash": "p", "config_hash": "c"}
    first = _run(tmp_path, calls, fp, resume=False)
    assert calls == ["a", "b"] and first.results["b"] == {"y": 2}
    _run(tmp_path, calls, fp, resume=True)
    assert calls == ["a", "b"], "resume must load both stages from the cache"
    _run(tmp_path, calls, {**fp, "config_hash": "other"}, resume=True)
    assert calls == ["a", "b", "a", "b"], "a changed fingerprint must invalidate the cached stages"
    _run(tmp_path, calls, fp, resume=False)
    assert calls[-2:] == ["a", "b"], "without --resume every stage runs"


def test_out_dir_safety(tmp_path: Path) -> None:
    run_id = {"model": "x", "model_hash": "h1", "prompts_hash": "p", "config_hash": "c"}
    out = tmp_path / "run"
    pipeline.prepare_out_dir(out, run_id, force=False, resume=False)
    assert json.loads((out / "run.json").read_text())["model_hash"] == "h1"
    with pytest.raises(FileExistsError, match="--resume"):
        pipeline.prepare_out_dir(out, run_id, force=False, resume=False)
    pipeline.prepare_out_dir(out, run_id, force=False, resume=True)
    with pytest.raises(FileExistsError, match="another model"):
        pipeline.prepare_out_dir(out, {**run_id, "model_hash": "h2"}, force=False, resume=True)
    (out / "keep.txt").write_text("x")
    pipeline.prepare_out_dir(out, {**run_id, "model_hash": "h2"}, force=True, resume=False)
    assert not (out / "keep.txt").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no moe-interp run"):
        pipeline.prepare_out_dir(other, run_id, force=False, resume=False)
    assert (other / "notes.txt").read_text() == "mine"


def test_locate_end_to_end_on_tiny_model(tmp_path: Path) -> None:
    cfg = json.loads((Path(__file__).parents[1] / "circuits" / "organism" / "config.json").read_text())
    cfg.update(
        model="tiny:olmoe",
        family=None,
        n_train=6,
        n_val=4,
        n_test=4,
        layers=None,
        max_new_tokens=4,
        steering_methods=["dense", "single_expert"],
        steering_kwargs={},
        expected=None,
    )
    cfg["circuit"].update(n_random_draws=2, candidates=["heads", "attn"], selection="prefix")
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert cli_main(["locate", "tiny:olmoe", "--out", str(out), "--config", str(cfg_path)]) == 0
    for name in ("report.md", "circuit.json", "summary.json", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "steering" / "dense.safetensors").is_file()
    assert (out / "figures" / "circuit.pdf").is_file() and (out / "figures" / "circuit.png").is_file()
    report = (out / "report.md").read_text()
    assert "blocks." in report and "## Steering methods" in report
    # a second run without --resume/--force refuses to overwrite
    assert cli_main(["locate", "tiny:olmoe", "--out", str(out), "--config", str(cfg_path)]) == 2
    # another model's results are protected even with --resume
    assert (
        cli_main(["locate", "tiny:qwen3_moe", "--out", str(out), "--config", str(cfg_path), "--resume"]) == 2
    )


def test_steering_stage_leaves_out_methods_without_a_strength_in_budget(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import moe_interp as mi

    model = mi.load("tiny:olmoe")
    prompts = {
        f"{c}_{s}": [f"{c} prompt {i} for {s}" for i in range(4)]
        for c in ("harmful", "harmless", "political")
        for s in ("train", "val", "test")
    }
    logs: list[str] = []
    run = SimpleNamespace(
        config=SimpleNamespace(steering_methods=["dense"], steering_kwargs={}, kl_threshold=1e-12),
        prompts=prompts,
        model=model,
        out=tmp_path,
        log=logs.append,
    )
    res = pipeline.stage_steering(run)  # type: ignore[arg-type]
    assert "KL budget 1e-12" in res["tuning"]["dense"]["error"]
    assert [row["method"] for row in res["table"] if row["method"] == "dense"] == []
    assert res["files"] == {} and not (tmp_path / "steering").exists()
    assert any("dense: no strength within the constraints" in m for m in logs)
    # a configuration error is not a tuning outcome: it propagates instead of being left out quietly
    run.config = SimpleNamespace(
        steering_methods=["dense"], steering_kwargs={"dense": {"layer": 99}}, kl_threshold=0.1
    )
    with pytest.raises(ValueError, match="Layer 99 is out of range"):
        pipeline.stage_steering(run)  # type: ignore[arg-type]
