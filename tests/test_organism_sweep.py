"""Seed sweep of organism settings: argument checks, summary arithmetic, one real tiny sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_interp.organisms.sweep import Setting, format_table, parse_setting, summarise, sweep


def test_parse_setting_splits_name_and_training_arguments() -> None:
    s = parse_setting("long=--steps 3000 --set prompt_lm=0.3")
    assert s == Setting("long", ("--steps", "3000", "--set", "prompt_lm=0.3"))
    assert parse_setting("default=") == Setting("default", ())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("--steps 3000", "NAME=TRAIN_ARGS"),
        ("a b=--steps 3", "setting name"),
        ("x=--seed 3", "set by the sweep"),
        ("x=--out=/tmp/y", "set by the sweep"),
        ("x=--set bogus=1", "unknown hyper-parameter 'bogus'"),
        ("x=--frobnicate", "invalid training arguments"),
        ("x=--set lr=fast", "invalid training arguments"),
        ("x=--see 5", "invalid training arguments"),  # no abbreviation of the managed --seed
        ("x=--dev cuda", "invalid training arguments"),
    ],
)
def test_parse_setting_rejects_bad_input(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_setting(text)


def test_sweep_rejects_bad_arguments_before_running(tmp_path: Path) -> None:
    a = Setting("a", ())
    with pytest.raises(ValueError, match="setting names must be unique"):
        sweep(tmp_path, [a, a], [0])
    with pytest.raises(ValueError, match="at least one"):
        sweep(tmp_path, [a], [])
    with pytest.raises(ValueError, match="seeds must be unique"):
        sweep(tmp_path, [a], [0, 0])
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        sweep(tmp_path, [a], [0], jobs=0)
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['harmful_vall'\]"):
        sweep(tmp_path, [a], [0], splits=("harmful_vall",))
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        sweep(tmp_path, [a], [0], device="gpu0")
    assert not any(tmp_path.iterdir())


def test_a_failed_run_is_reported_and_the_others_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moe_interp.organisms.sweep as sw

    def fake_run_one(out: Path, setting: Setting, seed: int, device: str, splits: tuple[str, ...]) -> Path:
        if seed == 1:
            raise RuntimeError("training crashed")
        _fake_run(out, setting.name, seed, [True, False], 0.0)
        return out / setting.name / f"seed{seed}" / "eval.json"

    monkeypatch.setattr(sw, "run_one", fake_run_one)
    s = sweep(tmp_path, [Setting("a", ())], [0, 1], jobs=2)
    assert s["failures"] == ["FAILED a seed 1: training crashed"]
    assert list(s["settings"]["a"]["runs"]) == ["0"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["failures"] == s["failures"] and "wall_seconds" in on_disk
    with pytest.raises(SystemExit) as exc:
        sw.main(["--out", str(tmp_path / "again"), "--setting", "a=", "--seeds", "0", "1"])
    assert exc.value.code == 1


def _fake_run(out: Path, name: str, seed: int, harmful: list[bool], harmless_logit: float) -> None:
    d = out / name / f"seed{seed}"
    d.mkdir(parents=True)
    rows = [{"prompt": f"p{i}", "gen_refusal": r} for i, r in enumerate(harmful)]
    rate = sum(harmful) / len(harmful)
    ev = {
        "splits": {
            "harmful_val": {
                "n": len(harmful),
                "refusal_rate_generation": rate,
                "refusal_rate_logit": rate,
                "agreement": 1.0,
                "rows": rows,
            },
            "harmless_val": {
                "n": 10,
                "refusal_rate_generation": 0.0,
                "refusal_rate_logit": harmless_logit,
                "agreement": 1.0 - harmless_logit,
                "rows": [],
            },
        }
    }
    (d / "eval.json").write_text(json.dumps(ev))


def test_summarise_mean_min_max_and_missed_prompts(tmp_path: Path) -> None:
    a, b = Setting("a", ()), Setting("b", ("--steps", "5"))
    _fake_run(tmp_path, "a", 0, [True, True, False, True], 0.1)
    _fake_run(tmp_path, "a", 1, [True, True, True, True], 0.3)
    _fake_run(tmp_path, "b", 0, [False, False, True, True], 0.0)  # seed 1 of b never finished
    s = summarise(tmp_path, [a, b], [0, 1])
    sa = s["settings"]["a"]
    assert sa["stats"]["harmful_val/generation"] == {"mean": 0.875, "min": 0.75, "max": 1.0, "n_runs": 2}
    assert sa["stats"]["harmless_val/logit"]["mean"] == pytest.approx(0.2)
    assert sa["runs"]["0"]["missed_harmful_val"] == ["p2"]
    assert sa["runs"]["1"]["missed_harmful_val"] == []
    sb = s["settings"]["b"]
    assert list(sb["runs"]) == ["0"] and sb["train_args"] == ["--steps", "5"]
    assert sb["stats"]["harmful_val/generation"]["n_runs"] == 1
    table = format_table(s, ("harmful_val", "political_val"))
    assert "a            runs=2  harmful_val 0.875 [0.750-1.000]  political_val -" in table


@pytest.mark.slow
def test_sweep_trains_and_evaluates_each_setting_and_seed(tmp_path: Path) -> None:
    s = sweep(
        tmp_path,
        [Setting("tiny", ("--steps", "2")), Setting("lm", ("--steps", "2", "--set", "prompt_lm=0.5"))],
        [3],
        jobs=2,
        splits=("political_val",),
    )
    assert s["failures"] == []
    for name in ("tiny", "lm"):
        runs = s["settings"][name]["runs"]
        assert set(runs) == {"3"}
        assert runs["3"]["splits"]["political_val"]["n"] == 36
    log = json.loads((tmp_path / "lm" / "seed3" / "checkpoint" / "train_log.json").read_text())
    assert log["seed"] == 3 and log["hyperparameters"]["prompt_lm"] == 0.5
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["tiny"]["runs"]
