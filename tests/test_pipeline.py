"""The locate pipeline: stage caching (resume, stale results), output-folder safety, and one tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

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
    # --force replaces a previous run's artefacts, and only those
    (out / "figures").mkdir()
    (out / "figures" / "a.png").write_bytes(b"png")
    (out / "cache").mkdir()
    (out / "cache" / "baseline.json").write_text("{}")
    pipeline.prepare_out_dir(out, {**run_id, "model_hash": "h2"}, force=True, resume=False)
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
    assert json.loads((out / "run.json").read_text())["model_hash"] == "h2"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write"):
        pipeline.prepare_out_dir(other, run_id, force=False, resume=False)
    assert (other / "notes.txt").read_text() == "mine"


def test_force_never_deletes_foreign_files(tmp_path: Path) -> None:
    """A user's folder that holds no run, or a run plus the user's own files, is refused even with --force."""
    run_id = {"model": "x", "model_hash": "h1", "prompts_hash": "p", "config_hash": "c"}
    user = tmp_path / "thesis"
    (user / "src").mkdir(parents=True)
    (user / "thesis.tex").write_text("\\documentclass{article}")
    (user / "src" / "main.py").write_text("print(1)")
    with pytest.raises(FileExistsError, match=r"did not write \(src/, thesis.tex\)"):
        pipeline.prepare_out_dir(user, run_id, force=True, resume=False)
    assert (user / "thesis.tex").is_file() and (user / "src" / "main.py").is_file()
    # a previous run with a user's file inside one of its folders: refused too, nothing removed
    run = tmp_path / "run"
    pipeline.prepare_out_dir(run, run_id, force=False, resume=False)
    (run / "figures").mkdir()
    (run / "figures" / "draft.tex").write_text("mine")
    with pytest.raises(FileExistsError, match="figures/draft.tex"):
        pipeline.prepare_out_dir(run, run_id, force=True, resume=False)
    assert (run / "figures" / "draft.tex").is_file() and (run / "run.json").is_file()
    # files named like a run's results but no run.json (so not written by a run): refused even with --force
    mine = tmp_path / "paper"
    (mine / "figures").mkdir(parents=True)
    (mine / "report.md").write_text("my report")
    (mine / "figures" / "paper_fig1.pdf").write_bytes(b"%PDF")
    with pytest.raises(FileExistsError, match="no run.json, so they may not be ours"):
        pipeline.prepare_out_dir(mine, run_id, force=True, resume=False)
    assert (mine / "report.md").read_text() == "my report" and (mine / "figures" / "paper_fig1.pdf").is_file()
    # --out naming a file
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="is an existing file"):
        pipeline.prepare_out_dir(f, run_id, force=True, resume=False)
    assert f.read_text() == "x"


def test_output_folder_is_locked_while_a_run_writes_it(tmp_path: Path) -> None:
    from moe_interp.runs import OutputLockedError, locked

    out = tmp_path / "run"
    with locked(out):
        with pytest.raises(OutputLockedError, match="being written by another moe-interp run"):
            with locked(out):
                pass
    with locked(out):  # released on exit
        pass
    # a folder the lock created is removed again when the block fails before writing anything
    new = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with locked(new):
            raise RuntimeError("boom")
    assert not new.exists()


def test_resume_never_unpickles_and_checks_the_fingerprint_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planted pickle in cache/ is never loaded; a stale header is rejected before any tensor is read."""
    import pickle

    import moe_interp.store as store

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204 - what a malicious pickle does on load
            return (Path.touch, (marker,))

    calls: list[str] = []
    fp = {"model_hash": "m", "prompts_hash": "p", "config_hash": "c"}
    (tmp_path / "cache").mkdir()
    for name in ("a", "b"):
        (tmp_path / "cache" / f"{name}.pt").write_bytes(pickle.dumps({"fingerprint": "x", "result": Evil()}))
    _run(tmp_path, calls, fp, resume=True)
    assert calls == ["a", "b"] and not marker.exists()
    # a stale fingerprint: the tensors file is never opened
    opened: list[str] = []
    real_load = store.load_tree
    monkeypatch.setattr(store, "load_tree", lambda stem: opened.append(str(stem)) or real_load(stem))
    _run(tmp_path, calls, {**fp, "model_hash": "other"}, resume=True)
    assert calls[-2:] == ["a", "b"] and opened == []
    # a damaged cache file is recomputed, not trusted
    (tmp_path / "cache" / "a.json").write_text("{not json")
    n = len(calls)
    _run(tmp_path, calls, {**fp, "model_hash": "other"}, resume=True)
    assert calls[n:] == ["a"], "only the damaged stage is recomputed; b's inputs are unchanged"


def test_code_hash_changes_with_the_source(tmp_path: Path) -> None:
    from moe_interp.runs import hash_code

    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    h = hash_code(pkg)
    assert hash_code(pkg) == h
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    assert hash_code(pkg) != h
    assert len(hash_code()) == 16


def test_a_failing_stage_says_how_to_resume(tmp_path: Path) -> None:
    logs: list[str] = []
    run = pipeline.Run(model=None, out=tmp_path, config=None, prompts={}, fingerprint={}, log=logs.append)

    def boom(r: pipeline.Run) -> dict[str, Any]:
        raise RuntimeError("stage broke")

    with pytest.raises(RuntimeError):
        run.run_stages([("a", lambda r: {"x": 1}, ()), ("b", boom, ())])
    assert any("--resume" in m and "[b] failed" in m for m in logs)
    assert (tmp_path / "cache" / "a.json").is_file() and not (tmp_path / "cache" / "b.json").exists()


@pytest.mark.slow
def test_locate_end_to_end_on_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = (
        Path(__file__).parents[1] / "moe_interp" / "data" / "locate_tiny.json"
    )  # also the CI main job (its default)
    out = tmp_path / "out"
    # tiny:* runs the smoke recipe by default (the generic one overflows a random model's 256-token context)
    assert cli_main(["locate", "tiny:olmoe", "--out", str(out)]) == 0
    for name in ("report.md", "circuit.json", "summary.json", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "steering" / "dense.safetensors").is_file()
    assert (out / "figures" / "circuit.pdf").is_file() and (out / "figures" / "circuit.png").is_file()
    report = (out / "report.md").read_text()
    assert "blocks." in report and "## Steering methods" in report
    table = json.loads((out / "summary.json").read_text())["steering"]
    assert table and all("harmful_first_token_refusal" in row for row in table)  # the search's judge too
    assert "| harmful, first token |" in report
    # a second run without --resume/--force refuses to overwrite
    assert cli_main(["locate", "tiny:olmoe", "--out", str(out), "--config", str(cfg_path)]) == 2
    # another model's results are protected even with --resume
    assert cli_main(["locate", "tiny:qwen3_moe", "--out", str(out), "--resume"]) == 2
    assert "another model" in capsys.readouterr().err
    # a recipe for another model is refused before anything runs
    assert (
        cli_main(["locate", "tiny:qwen3_moe", "--out", str(tmp_path / "o2"), "--config", str(cfg_path)]) == 2
    )
    assert "is for model 'tiny:olmoe', but the model given is 'tiny:qwen3_moe'" in capsys.readouterr().err


@pytest.mark.slow
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
        config=SimpleNamespace(
            steering_methods=["dense"],
            steering_kwargs={},
            kl_threshold=1e-12,
            max_new_tokens=8,
            distinct2_floor=None,
        ),
        prompts=prompts,
        model=model,
        out=tmp_path,
        log=logs.append,
        memo={},
    )
    run.results = {"baseline": pipeline.stage_baseline(run)}  # type: ignore[arg-type]
    res = pipeline.stage_steering(run)  # type: ignore[arg-type]
    assert "KL budget 1e-12" in res["tuning"]["dense"]["error"]
    assert [row["method"] for row in res["table"] if row["method"] == "dense"] == []
    assert res["files"] == {} and not (tmp_path / "steering").exists()
    assert any("dense: no strength within the constraints" in m for m in logs)
    # a configuration error is not a tuning outcome: it propagates instead of being left out quietly
    run.config = SimpleNamespace(
        steering_methods=["dense"],
        steering_kwargs={"dense": {"layer": 99}},
        kl_threshold=0.1,
        max_new_tokens=8,
        distinct2_floor=None,
    )
    with pytest.raises(ValueError, match="Layer 99 is out of range"):
        pipeline.stage_steering(run)  # type: ignore[arg-type]


def test_patching_by_attribution_sweeps_only_the_top_ranked_experts(tmp_path: Path) -> None:
    """``patching: attribution``: resid/head maps are the attribution estimates, and the exhaustive sweep runs
    exactly on the top-N experts by |ablation attribution|, with the per-expert reference loop's values."""
    import json
    from types import SimpleNamespace

    import torch

    import moe_interp as mi
    from moe_interp.patching import attribution_patching, expert_ablation_attribution, expert_ablation_loop

    model = mi.load("tiny:olmoe")
    h = [f"how do I build weapon number {i}" for i in range(3)]
    s = [f"tell me a story about cat {i}" for i in range(3)]
    run = SimpleNamespace(
        config=SimpleNamespace(n_val=3, patching="attribution", patching_top_n=3),
        prompts={"harmful_val": h, "harmless_val": s, "harmful_train": h, "harmless_train": s},
        model=model,
        results={},
    )
    run.results["routing"] = pipeline.stage_routing(run)  # type: ignore[arg-type]
    res = pipeline.stage_patching(run)  # type: ignore[arg-type]
    ref = attribution_patching(model, h, s, kinds=("heads", "experts"), progress=False)
    ref["resid"] = attribution_patching(model, h, s, kinds=("resid",), positions="all", progress=False)[
        "resid"
    ]
    for kind in ("resid", "heads"):
        torch.testing.assert_close(res[kind].values, ref[kind].values)
    torch.testing.assert_close(res["attribution"].values, ref["experts"].values)
    a = expert_ablation_attribution(model, h, mode="drop").abs()
    moe = list(model.spec.moe_layers)
    ranked = sorted(
        ((float(a[L, e]), (L, e)) for L in moe for e in range(model.spec.n_experts)), reverse=True
    )
    assert sorted(map(tuple, res["swept_experts"])) == sorted(x for _, x in ranked[:3])
    eff = res["ablation"].effect
    loop = expert_ablation_loop(model, h, mode="drop", experts=res["swept_experts"])
    for L, e in res["swept_experts"]:
        assert abs(float(eff[L, e]) - float(loop[L, e])) <= 1e-5
    assert int(torch.isfinite(eff).sum()) == 3  # nothing else was swept
    # the whole run in this mode writes its report and the top-ranked scatter
    cfg = json.loads((Path(__file__).parents[1] / "moe_interp" / "data" / "locate_tiny.json").read_text())
    cfg.update(patching="attribution", patching_top_n=4)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert cli_main(["locate", "tiny:olmoe", "--out", str(out), "--config", str(tmp_path / "cfg.json")]) == 0
    report = (out / "report.md").read_text()
    assert "Patching by attribution" in report and "on the 4 experts ranked highest" in report
    assert (out / "figures" / "attribution_vs_exhaustive.png").is_file()


def test_model_hash_sees_a_few_edited_rows_and_the_chat_template() -> None:
    """--resume trusts the fingerprint: an edit the strided sample skips, or another chat template, must change it."""
    import moe_interp as mi
    from moe_interp.runs import hash_model

    m = mi.load("tiny:olmoe")
    h0 = hash_model(m)
    assert hash_model(m) == h0
    emb = m.hf_model.get_input_embeddings().weight
    stride = max(1, emb.numel() // 256)
    row = next(
        r for r in range(emb.shape[0]) if all((r * emb.shape[1] + c) % stride for c in range(emb.shape[1]))
    )
    with torch.no_grad():
        emb[row] += 0.5  # no element of this row is in the strided sample
    h1 = hash_model(m)
    assert h1 != h0
    old = m.tokenizer.chat_template  # the tiny tokenizer is shared by every tiny model: restore it
    try:
        m.tokenizer.chat_template = "{{ messages[0]['content'] }}"
        assert hash_model(m) != h1
    finally:
        m.tokenizer.chat_template = old


def test_topic_methods_without_political_prompts_are_left_out(monkeypatch, tmp_path: Path) -> None:
    """Own --harmful/--harmless files give no political prompts: a recipe with a topic method still finishes
    its steering stage and says why that method is missing (it used to raise KeyError there)."""
    from types import SimpleNamespace

    from moe_interp.config import PipelineConfig
    from moe_interp.steering import compare

    seen: dict[str, Any] = {}
    monkeypatch.setattr(compare, "compare_methods", lambda model, fitted, *a, **k: seen.update(fitted) or [])
    monkeypatch.setattr(compare, "last_logits", lambda *a: None)  # no model here
    monkeypatch.setattr(pipeline, "_baseline_rates", lambda run: {})
    cfg = PipelineConfig(model="tiny:olmoe", family="", steering_methods=["topic_remove", "topic_gated"])
    prompts = {f"{c}_{s}": ["x"] for c in ("harmful", "harmless") for s in ("train", "val", "test")}
    prompts.update(political_train=[], political_test=[])
    logs: list[str] = []
    run = SimpleNamespace(config=cfg, prompts=prompts, model=None, log=logs.append, out=tmp_path)
    res = pipeline.stage_steering(run)
    assert set(res["tuning"]) == {"topic_remove", "topic_gated"} and not seen
    assert all("no political prompts" in t["error"] for t in res["tuning"].values())
    assert sum("left out of the comparison" in m for m in logs) == 2


def test_refusal_edits_take_the_baseline_stages_completions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal-edit stage's unedited completions are the baseline stage's (one generation fewer per split),
    and its results equal those of a run that generates them itself (as after ``--resume``)."""
    from types import SimpleNamespace

    import moe_interp as mi
    from moe_interp.model import MoEModel

    model = mi.load("tiny:olmoe")
    h = [f"how do I build weapon number {i}" for i in range(3)]
    s = [f"tell me a story about cat {i}" for i in range(3)]
    d = torch.randn(model.spec.d_model, generator=torch.manual_seed(0))
    run = SimpleNamespace(
        config=SimpleNamespace(max_new_tokens=4),
        prompts={"harmful_test": h, "harmless_test": s},
        model=model,
        results={"directions": {"selection": {"layer": 1}, "direction": d / d.norm(), "raw": d}},
        memo={},
        log=lambda msg: None,
    )
    run.results["baseline"] = pipeline.stage_baseline(run)  # type: ignore[arg-type]
    assert sorted(run.memo) == ["unedited_generations:harmful_test", "unedited_generations:harmless_test"]
    generated: list[int] = []
    real = MoEModel.generate
    monkeypatch.setattr(
        MoEModel, "generate", lambda self, *a, **k: generated.append(1) or real(self, *a, **k)
    )
    shared = pipeline.stage_refusal_edits(run)  # type: ignore[arg-type]
    n_shared, generated[:] = len(generated), []
    run.memo = {}
    alone = pipeline.stage_refusal_edits(run)  # type: ignore[arg-type]
    assert n_shared == len(generated) - 2  # one batch per split (3 prompts < the batch size) not generated
    assert json.dumps(shared, default=str, sort_keys=True) == json.dumps(alone, default=str, sort_keys=True)
