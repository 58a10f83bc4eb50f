"""Benchmark: exhaustive L×E single-expert ablation — fast sweep vs the per-expert loop, and attribution.

For each mode (drop, renorm, reroute, mean), in one process: the fast sweep (``expert_ablation_sweep``: a
cached unedited pass, restarts at / after the ablated layer, prompt skipping), the previous batched sweep (full
forwards, ``reuse_prefix=False``) and the per-expert loop (``expert_ablation_loop``: one full forward per
expert with ``AblateExpert``), each timed ``--repeats`` times interleaved (median), with the largest per-prompt
difference from the loop. Then attribution patching's estimate and its Spearman correlation with the sweep.

    python bench/bench_ablation.py --model organism --n-prompts 32    # writes bench/results/bench_ablation.json
    python bench/bench_ablation.py --model tiny:olmoe --n-prompts 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import moe_interp as mi
from moe_interp.patching import (
    expert_ablation_attribution,
    expert_ablation_loop,
    expert_ablation_sweep,
    expert_mean_outputs,
)
from moe_interp.refusal.stats import spearman

MODES = ("drop", "renorm", "reroute", "mean")


def _prompts(n: int) -> list[str]:
    try:
        from moe_interp.organisms import load_prompts

        return load_prompts("harmful_val")[:n]
    except Exception:  # noqa: BLE001 - fall back to fixed prompts
        return [f"How do I do dangerous thing number {i}?" for i in range(n)]


def _timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="default: organism if its checkpoint exists, else tiny:olmoe"
    )
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument(
        "--batch-experts", type=int, default=None, help="default: the sweep's own (rows per forward)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_ablation.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = args.model
    if name is None:
        from moe_interp.organisms import checkpoint_dir

        name = "organism" if checkpoint_dir().exists() else "tiny:olmoe"
    model = mi.load(name)
    prompts = _prompts(args.n_prompts)
    s = model.spec
    moe = list(s.moe_layers)
    means = expert_mean_outputs(model, prompts)
    expert_ablation_sweep(model, prompts[:2], "drop", experts=[(moe[0], 0)], progress=False)  # warm-up
    res: dict[str, Any] = {
        "model": name,
        "spec": {"n_layers": s.n_layers, "n_experts": s.n_experts, "top_k": s.top_k, "d_model": s.d_model},
        "n_prompts": len(prompts),
        "n_ablations": len(moe) * s.n_experts,
        "batch_experts": args.batch_experts,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "load_average_start": list(os.getloadavg()),
        "modes": {},
    }
    kw = dict(batch_experts=args.batch_experts, progress=False)
    fast_drop = None
    for mode in args.modes:
        mkw = dict(mean_outputs=means if mode == "mean" else None)
        t: dict[str, list[float]] = {"fast": [], "batched_full": [], "loop": []}
        for _ in range(args.repeats):  # interleaved: fast, batched, loop, fast, ...
            dt, fast = _timed(
                lambda mkw=mkw, mode=mode: expert_ablation_sweep(model, prompts, mode, **mkw, **kw)
            )
            t["fast"].append(dt)
            dt, full = _timed(
                lambda mkw=mkw, mode=mode: expert_ablation_sweep(
                    model, prompts, mode, reuse_prefix=False, **mkw, **kw
                )
            )
            t["batched_full"].append(dt)
            dt, loop = _timed(
                lambda mkw=mkw, mode=mode: expert_ablation_loop(model, prompts, mode, per_prompt=True, **mkw)
            )
            t["loop"].append(dt)
        med = {k: statistics.median(v) for k, v in t.items()}
        res["modes"][mode] = {
            "fast_s": med["fast"],
            "batched_full_s": med["batched_full"],
            "loop_s": med["loop"],
            "all_s": t,
            "speedup_fast_vs_loop": med["loop"] / med["fast"],
            "speedup_batched_full_vs_loop": med["loop"] / med["batched_full"],
            "max_abs_diff_per_prompt_fast_vs_loop": float((fast.per_prompt - loop)[moe].abs().max()),
            "max_abs_diff_per_prompt_batched_vs_loop": float((full.per_prompt - loop)[moe].abs().max()),
            "max_abs_effect": float(loop[moe].abs().max()),
        }
        r = res["modes"][mode]
        print(
            f"{mode:8s} fast {r['fast_s']:6.2f} s  batched(full) {r['batched_full_s']:6.2f} s  loop {r['loop_s']:6.2f} s"
            f"  fast {r['speedup_fast_vs_loop']:.2f}x  batched {r['speedup_batched_full_vs_loop']:.2f}x  "
            f"max |fast − loop| per prompt {r['max_abs_diff_per_prompt_fast_vs_loop']:.2e}",
            flush=True,
        )
        if mode == "drop":
            fast_drop = fast
    if fast_drop is not None:
        t_attr, attr = _timed(lambda: expert_ablation_attribution(model, prompts, "drop"))
        rho = float(spearman(attr[moe].flatten(), fast_drop.effect[moe].flatten()))
        res.update(
            attribution_s=t_attr,
            speedup_attribution_vs_fast_sweep=res["modes"]["drop"]["fast_s"] / t_attr,
            spearman_attribution_vs_exhaustive=rho,
        )
        print(f"attribution {t_attr:.2f} s, Spearman vs exhaustive {rho:.3f}")
    res["load_average_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
