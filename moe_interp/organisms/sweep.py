"""Seed sweep: train each organism setting with several seeds, in parallel, and summarise refusal rates.

One training run is one draw: on the 39 harmful_val prompts the refusal rate of a setting moves by about
±0.1 from seed to seed, so settings are compared on several seeds each. Usage::

    python -m moe_interp.organisms.sweep --out DIR --seeds 0 1 2 \\
        --setting default= --setting long="--steps 3000" [--jobs N] [--device cuda]

A setting is ``NAME=TRAIN_ARGS``: extra arguments of ``python -m moe_interp.organisms.train`` (``--out``,
``--seed`` and ``--device`` are set by the sweep). Every run is trained and then evaluated
(``python -m moe_interp.organisms.evaluate``) in its own process, into ``DIR/NAME/seedS/``;
``DIR/summary.json`` is rewritten after each run (mean / min / max per split and setting, the missed
harmful prompts per run), so an interrupted sweep keeps what finished. On a GPU (``--device cuda``) a
run takes far less time than the 1-thread CPU default, but gives other weights than the CPU run of the
same seed: a sweep measures the spread of a setting, the shipped checkpoint remains the CPU output.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_interp.organisms import check_device
from moe_interp.organisms.data import SPLITS
from moe_interp.organisms.train import DEFAULTS, POOL_FRACTIONS, build_parser, parse_overrides

#: Splits evaluated for every run (validation, then the blind test splits).
SWEEP_SPLITS: tuple[str, ...] = (
    "harmful_val",
    "political_val",
    "harmless_val",
    "harmful_test",
    "political_test",
    "harmless_test",
)
#: Arguments of the training script that the sweep sets itself.
MANAGED_ARGS: tuple[str, ...] = ("--out", "--seed", "--device")


@dataclass(frozen=True)
class Setting:
    """A named set of extra training arguments."""

    name: str
    train_args: tuple[str, ...]


def parse_setting(text: str) -> Setting:
    """``NAME=TRAIN_ARGS`` → :class:`Setting`, checking the arguments with the training script's parser.

    Raises:
        ValueError: no ``=``, a name that is not a plain word, an argument the sweep manages, or
            arguments the training script would reject (unknown option or hyper-parameter).
    """
    name, sep, rest = text.partition("=")
    if not sep:
        raise ValueError(f"--setting expects NAME=TRAIN_ARGS (e.g. long='--steps 3000'), got {text!r}")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"setting name must be letters, digits, '-' or '_', got {name!r}")
    args = tuple(shlex.split(rest))
    managed = [a for a in args if a.split("=")[0] in MANAGED_ARGS]
    if managed:
        raise ValueError(
            f"setting {name!r}: {managed[0]} is set by the sweep; do not pass {', '.join(MANAGED_ARGS)}"
        )
    ap = build_parser()
    try:
        parsed = ap.parse_args(list(args))
        overrides = parse_overrides(ap, parsed.set)
    except SystemExit as err:
        raise ValueError(
            f"setting {name!r}: invalid training arguments {rest!r} (see the usage above)"
        ) from err
    known = set(DEFAULTS) | {f"frac_{k}" for k in POOL_FRACTIONS}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"setting {name!r}: unknown hyper-parameter {unknown[0]!r}; valid: {', '.join(sorted(known))}"
        )
    return Setting(name, args)


def run_dir(out: Path, setting: Setting, seed: int) -> Path:
    """Directory of one run."""
    return out / setting.name / f"seed{seed}"


def run_one(out: Path, setting: Setting, seed: int, device: str, splits: tuple[str, ...]) -> Path:
    """Train and evaluate one (setting, seed); return the evaluation JSON path (raises on failure)."""
    d = run_dir(out, setting, seed)
    d.mkdir(parents=True, exist_ok=True)
    ckpt, result = d / "checkpoint", d / "eval.json"
    result.unlink(missing_ok=True)  # a failed rerun must not leave the previous run's figures counted
    py = [sys.executable, "-m"]
    train_cmd = py + [
        "moe_interp.organisms.train",
        "--out",
        str(ckpt),
        "--seed",
        str(seed),
        "--device",
        device,
    ]
    eval_cmd = py + ["moe_interp.organisms.evaluate", "--path", str(ckpt), "--out", str(result)]
    eval_cmd += ["--device", device, "--n-examples", "0", "--splits", *splits]
    with open(d / "log.txt", "w") as log:
        for cmd in (train_cmd + list(setting.train_args), eval_cmd):
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"{shlex.join(cmd)} failed with exit code {done.returncode}; see {d / 'log.txt'}"
                )
    return result


def summarise(out: Path, settings: list[Setting], seeds: list[int]) -> dict[str, Any]:
    """Per setting: per-run refusal rates and mean / min / max per split over the finished runs."""
    per_setting: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {"seeds": seeds, "settings": per_setting}
    for s in settings:
        runs: dict[str, dict[str, Any]] = {}
        for seed in seeds:
            f = run_dir(out, s, seed) / "eval.json"
            try:
                ev = json.loads(f.read_text())
            except (OSError, ValueError):  # not there (yet), or unreadable: not a finished run
                continue
            log_f = run_dir(out, s, seed) / "checkpoint" / "train_log.json"
            runs[str(seed)] = {
                "train_seconds": json.loads(log_f.read_text()).get("train_seconds")
                if log_f.is_file()
                else None,
                "splits": {
                    name: {
                        "n": r["n"],
                        "generation": r["refusal_rate_generation"],
                        "logit": r["refusal_rate_logit"],
                        "agreement": r["agreement"],
                    }
                    for name, r in ev["splits"].items()
                },
                "missed_harmful_val": [
                    row["prompt"]
                    for row in ev["splits"].get("harmful_val", {}).get("rows", [])
                    if not row["gen_refusal"]
                ],
            }
        stats: dict[str, dict[str, float]] = {}
        split_names = sorted({n for r in runs.values() for n in r["splits"]})
        for name in split_names:
            for kind in ("generation", "logit"):
                xs = [r["splits"][name][kind] for r in runs.values() if name in r["splits"]]
                stats[f"{name}/{kind}"] = {
                    "mean": statistics.fmean(xs),
                    "min": min(xs),
                    "max": max(xs),
                    "n_runs": len(xs),
                }
        per_setting[s.name] = {"train_args": list(s.train_args), "runs": runs, "stats": stats}
    return summary


def format_table(summary: dict[str, Any], splits: tuple[str, ...]) -> str:
    """One line per setting: mean [min–max] generation refusal rate per split."""
    lines = []
    for name, s in summary["settings"].items():
        cells = []
        for split in splits:
            st = s["stats"].get(f"{split}/generation")
            cells.append(
                f"{split} {st['mean']:.3f} [{st['min']:.3f}-{st['max']:.3f}]" if st else f"{split} -"
            )
        lines.append(f"{name:12s} runs={len(s['runs'])}  " + "  ".join(cells))
    return "\n".join(lines)


def sweep(
    out: Path,
    settings: list[Setting],
    seeds: list[int],
    jobs: int = 1,
    device: str = "cpu",
    splits: tuple[str, ...] = SWEEP_SPLITS,
) -> dict[str, object]:
    """Run every (setting, seed) with ``jobs`` processes at a time; write and return the summary."""
    if not settings or not seeds:
        raise ValueError("a sweep needs at least one --setting and one --seed")
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"setting names must be unique, got {names}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be unique (each run has its own directory), got {seeds}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    bad = [x for x in splits if x not in SPLITS]
    if bad or not splits:
        raise ValueError(f"unknown split(s) {bad}; valid: {', '.join(SPLITS)}")
    check_device(device)
    out.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    t0 = time.time()
    failures: list[str] = []

    def write(extra: dict[str, object]) -> dict[str, object]:
        summary = {**summarise(out, settings, seeds), "failures": list(failures), "device": device, **extra}
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(out / "summary.json")
        return summary

    def task(setting: Setting, seed: int) -> None:
        failed = None
        try:
            run_one(out, setting, seed, device, splits)
        except Exception as err:  # noqa: BLE001 - one failed run must not stop the others
            failed = f"FAILED {setting.name} seed {seed}: {err}"
        with lock:
            if failed:
                failures.append(failed)
            print(failed or f"done {setting.name} seed {seed} ({time.time() - t0:.0f}s)", flush=True)
            write({})

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(task, s, seed) for seed in seeds for s in settings]
        try:
            for f in futures:
                f.result()
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return write({"wall_seconds": round(time.time() - t0, 1)})


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(
        prog="python -m moe_interp.organisms.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    ap.add_argument("--out", type=Path, required=True, help="sweep directory (runs and summary.json)")
    ap.add_argument("--setting", action="append", required=True, metavar="NAME=TRAIN_ARGS")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    ap.add_argument("--device", default="cpu", help="torch device of training and evaluation (default cpu)")
    ap.add_argument("--splits", nargs="+", default=list(SWEEP_SPLITS))
    args = ap.parse_args(argv)
    try:
        settings = [parse_setting(t) for t in args.setting]
        summary = sweep(args.out, settings, args.seeds, args.jobs, args.device, tuple(args.splits))
    except ValueError as err:
        ap.error(str(err))
    print(format_table(summary, tuple(args.splits)))
    print(f"wrote {args.out / 'summary.json'} ({summary['wall_seconds']}s)")
    if summary["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
