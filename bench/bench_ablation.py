"""Benchmark: batched exhaustive L×E single-expert ablation vs a per-expert loop, and attribution vs exhaustive.

Usage: ``python bench/bench_ablation.py [--model organism|tiny:olmoe] [--n-prompts 16]``; writes
``bench/results/bench_ablation.json`` and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

import moe_interp as mi
from moe_interp.patching import expert_ablation_attribution, expert_ablation_loop, expert_ablation_sweep


def _prompts(model_name: str, n: int) -> list[str]:
    try:
        from moe_interp.organisms import load_prompts

        return load_prompts("harmful_val")[:n]
    except Exception:  # noqa: BLE001 - fall back to fixed prompts
        return [f"How do I do dangerous thing number {i}?" for i in range(n)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--model", default=None, help="default: organism if its checkpoint exists, else tiny:olmoe"
    )
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--batch-experts", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_ablation.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    name = args.model
    if name is None:
        from moe_interp.organisms import checkpoint_dir

        name = "organism" if checkpoint_dir().exists() else "tiny:olmoe"
    model = mi.load(name)
    prompts = _prompts(name, args.n_prompts)
    s = model.spec
    n_items = len(s.moe_layers) * s.n_experts
    expert_ablation_sweep(
        model, prompts[:2], "drop", experts=[(s.moe_layers[0], 0)], progress=False
    )  # warm-up

    t = time.perf_counter()
    batched = expert_ablation_sweep(model, prompts, "drop", batch_experts=args.batch_experts, progress=False)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    loop = expert_ablation_loop(model, prompts, "drop")
    t_loop = time.perf_counter() - t
    t = time.perf_counter()
    attr = expert_ablation_attribution(model, prompts, "drop")
    t_attr = time.perf_counter() - t
    moe = list(s.moe_layers)
    rho = float(spearmanr(attr[moe].flatten(), batched.effect[moe].flatten()).statistic)
    res = {
        "model": name,
        "spec": {"n_layers": s.n_layers, "n_experts": s.n_experts, "top_k": s.top_k, "d_model": s.d_model},
        "n_prompts": len(prompts),
        "n_ablations": n_items,
        "batch_experts": args.batch_experts,
        "torch_threads": torch.get_num_threads(),
        "batched_sweep_s": t_batched,
        "per_expert_loop_s": t_loop,
        "speedup_batched_vs_loop": t_loop / t_batched,
        "max_abs_diff_batched_vs_loop": float((batched.effect - loop)[moe].abs().max()),
        "attribution_s": t_attr,
        "speedup_attribution_vs_exhaustive": t_batched / t_attr,
        "spearman_attribution_vs_exhaustive": rho,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    for k, v in res.items():
        print(f"{k:38s} {v:.4g}" if isinstance(v, float) else f"{k:38s} {v}")
    return res


if __name__ == "__main__":
    main()
