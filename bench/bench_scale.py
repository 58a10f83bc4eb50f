"""Real-width MoE benchmarks on CPU: OLMoE-1B-7B / Qwen3-30B-A3B per-layer geometry, fp32 and bf16 in one run.

Random-init models with the real d_model, heads, experts, top-k and expert width, ``--layers`` layers (2 by
default; the real models have 16 / 48) and a reduced vocabulary (8192; real 50304 / 151936), so that the
embedding does not dominate. For each dtype, in one process, against the plain HF forward:

- hook overhead: ``run_with_cache`` of resid hooks, router hooks, the sparse ``hook_topk_expert_out``, the
  dense ``hook_expert_out``, and every hook (interleaved rounds, medians; wall and CPU time);
- peak memory of each (resident set above the level before the call) and forward calls;
- the exhaustive single-expert sweep on a subset (8 experts of layer 0, 8 of the last layer): the fast sweep
  vs the per-expert loop, timed for ``drop``, and per-prompt agreement in all four modes;
- attribution patching (``attribution_patching``, experts) and ``expert_ablation_attribution``;
- direction extraction (``collect_resid_stats`` on harmful and harmless prompts, difference of means);
- ``moe-interp plan``'s prediction of memory and forward calls for the same workload, next to the measurement.

    python bench/bench_scale.py --geometry olmoe --out bench/results/bench_scale_olmoe.json
    python bench/bench_scale.py --geometry qwen3 --out bench/results/bench_scale_qwen3.json
    python bench/bench_scale.py --geometry tiny --repeats 1        # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scale_lib import (  # noqa: E402
    GEOMETRIES,
    Meter,
    build,
    fit_prompts,
    harmful_harmless,
    plan_record,
    plan_record_of,
    plan_rows,
    weight_bytes,
)

MODES = ("drop", "renorm", "reroute", "mean")


def hook_configs(model: Any, enc: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The timed calls: plain HF forward and ``run_with_cache`` of growing sets of hooks."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    names = model.hook_names()

    def cache(pred: Any) -> Any:
        sel = [n for n in names if pred(n)]
        return torch.no_grad()(lambda: model.run_with_cache(enc, names=sel))

    return {
        "hf": torch.no_grad()(lambda: model.hf_model(ids, attention_mask=mask, position_ids=pos)),
        "resid": cache(lambda n: "hook_resid_" in n),
        "router": cache(
            lambda n: n.endswith(("hook_router_logits", "hook_expert_indices", "hook_expert_weights"))
        ),
        "topk_expert_out": cache(lambda n: n.endswith("hook_topk_expert_out")),
        "expert_out": cache(lambda n: n.endswith("mlp.hook_expert_out")),
        "all": cache(lambda n: True),
    }


#: plan stage that predicts each hook configuration's cache
PLAN_STAGE = {
    "resid": "resid cache, all positions",
    "topk_expert_out": "expert outputs: sparse top-k form",
    "expert_out": "expert outputs: dense hook_expert_out",
}


def time_interleaved(calls: dict[str, Any], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per configuration, one call of each per round (rotating order)."""
    import resource
    import time

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    keys = list(calls)
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cput: dict[str, list[float]] = {k: [] for k in keys}
    with torch.no_grad():
        for k in keys:
            calls[k]()  # warm-up
        for r in range(repeats):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                t0, c0 = time.perf_counter(), cpu()
                calls[k]()
                wall[k].append(time.perf_counter() - t0)
                cput[k].append(cpu() - c0)
    out = {}
    for k in keys:
        out[k] = {"wall_s": statistics.median(wall[k]), "cpu_s": statistics.median(cput[k])}
    for k in keys:
        out[k]["wall_ratio"] = out[k]["wall_s"] / out["hf"]["wall_s"]
        out[k]["cpu_ratio"] = out[k]["cpu_s"] / out["hf"]["cpu_s"]
    return out


def measure_stage(model: Any, fn: Any, predicted: Any | None, weights: int) -> dict[str, Any]:
    """Run ``fn`` once under a :class:`Meter`; add plan's prediction and the measured / predicted ratios."""
    with Meter(model.hf_model) as m:
        fn()
    out = m.to_dict()
    out["peak_bytes"] = weights + m.peak_extra_bytes
    if predicted is not None:
        out.update(plan_record_of(predicted, weights, m))
    return out


def sweep_block(model: Any, prompts: list[str], modes: tuple[str, ...], items: list[tuple[int, int]]) -> dict:
    """Fast sweep vs per-expert loop on ``items`` for each mode: both timed, compared per prompt."""
    from moe_interp.patching import expert_ablation_loop, expert_ablation_sweep, expert_mean_outputs
    from moe_interp.patching.ablation import ROWS_CPU
    from moe_interp.plan import (
        activation_bytes,
        geometry_from_hf_config,
        sweep_extra_bytes,
        sweep_forward_calls,
    )

    geo = geometry_from_hf_config(model.hf_model.config)
    b = next(model.hf_model.parameters()).element_size()
    S = int(model.tokenize(prompts)["input_ids"].shape[1])
    per_layer = [sum(1 for L_, _ in items if L_ == L) for L in sorted({L for L, _ in items})]
    batch = max(1, ROWS_CPU // len(prompts))  # the sweep's default ablations per forward on the CPU
    means = expert_mean_outputs(model, prompts) if "mean" in modes else None
    out: dict[str, Any] = {"experts": items, "modes": {}}
    idx = tuple(torch.tensor(x) for x in zip(*items, strict=True))
    for mode in modes:
        kw = dict(mean_outputs=means if mode == "mean" else None, experts=items)
        with Meter(model.hf_model) as mf:
            fast = expert_ablation_sweep(model, prompts, mode, progress=False, **kw)
        with Meter(model.hf_model) as ml:
            loop = expert_ablation_loop(model, prompts, mode, per_prompt=True, **kw)
        diff = (fast.per_prompt[idx] - loop[idx]).abs()
        out["modes"][mode] = {
            "fast": mf.to_dict(),
            "loop": ml.to_dict(),
            "speedup_wall": ml.wall_s / mf.wall_s,
            "speedup_cpu": ml.cpu_s / mf.cpu_s,
            "max_abs_diff_per_prompt": float(diff.max()),
            "max_abs_effect": float(loop[idx].abs().max()),
        }
        rows = min(max(per_layer), batch) * len(prompts)
        out["modes"][mode]["fast"].update(
            plan_record(
                sweep_forward_calls(per_layer, batch),
                sweep_extra_bytes(geo, len(prompts), S, b, len(per_layer), min(max(per_layer), batch)),
                activation_bytes(geo, rows * S, b),
                weight_bytes(model),
                mf,
                "expert ablation sweep (subset)",
            )
        )
    return out


def score_noise_floor(model: Any, prompts: list[str]) -> float:
    """Largest change of a prompt's refusal score between running it in the batch and alone: the rounding
    noise of this dtype, against which sweep-vs-loop differences are read."""
    from moe_interp.refusal.judges import refusal_logodds, resolve_refusal_ids

    ids = resolve_refusal_ids(model)
    with torch.no_grad():
        batch = refusal_logodds(model.forward(prompts, last_only=True)[:, -1], ids)
        alone = torch.cat([refusal_logodds(model.forward([p], last_only=True)[:, -1], ids) for p in prompts])
    return float((batch - alone).abs().max())


def run_dtype(model: Any, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement for one dtype."""
    from moe_interp.patching import attribution_patching, expert_ablation_attribution
    from moe_interp.refusal.directions import collect_resid_stats, diff_of_means, post_instruction_positions

    B, S = args.batch, args.seq
    texts_h, texts_s = harmful_harmless(B)
    harmful, harmless = fit_prompts(model, texts_h, B, S), fit_prompts(model, texts_s, B, S)
    enc = model.tokenize(harmful)
    weights = weight_bytes(model)
    n_pos = len(post_instruction_positions(model))
    rows = plan_rows(model, dtype, B, S, B, n_pos)
    res: dict[str, Any] = {"weights_bytes": weights, "hooks": {}, "memory": {}}
    print(f"[{dtype}] hook overhead ({args.repeats} interleaved rounds)", flush=True)
    calls = hook_configs(model, enc)
    res["hooks"] = time_interleaved(calls, args.repeats)
    for k, v in res["hooks"].items():
        print(
            f"  {k:16s} {v['wall_s'] * 1e3:9.1f} ms  {v['wall_ratio']:5.2f}x wall  {v['cpu_ratio']:5.2f}x cpu"
        )
    for k, fn in calls.items():
        res["memory"][k] = measure_stage(model, fn, rows.get(PLAN_STAGE.get(k, "")), weights)
    res["score_noise_floor"] = score_noise_floor(model, harmful)
    print(
        f"[{dtype}] refusal score, batch of {B} vs one prompt at a time: max diff {res['score_noise_floor']:.2e}"
    )
    print(f"[{dtype}] sweep: fast vs per-expert loop", flush=True)
    last, E = model.spec.n_layers - 1, model.spec.n_experts
    res["sweep"] = {}
    blocks = {
        "drop_layer0": (("drop",), [(0, e) for e in range(min(8, E))]),
        "drop_last_layer": (("drop",), [(last, e) for e in range(min(8, E))]),
        "other_modes": (MODES[1:], [(L, e) for L in (0, last) for e in range(min(4, E))]),
    }
    for label, (modes, items) in blocks.items():
        blk = sweep_block(model, harmful, modes, items)
        for mode, v in blk["modes"].items():
            print(
                f"  {label:15s} {mode:8s} fast {v['fast']['wall_s']:7.2f} s  loop {v['loop']['wall_s']:7.2f} s  "
                f"{v['speedup_wall']:5.2f}x wall  {v['speedup_cpu']:5.2f}x cpu  max diff "
                f"{v['max_abs_diff_per_prompt']:.2e} (|effect| up to {v['max_abs_effect']:.3g})",
                flush=True,
            )
        res["sweep"][label] = blk
    print(f"[{dtype}] attribution and directions", flush=True)
    res["attribution_patching"] = measure_stage(
        model,
        lambda: attribution_patching(model, harmful, harmless, kinds=("experts",), progress=False),
        rows["attribution patching"],
        weights,
    )
    res["expert_ablation_attribution"] = measure_stage(
        model, lambda: expert_ablation_attribution(model, harmful, "drop"), None, weights
    )

    def directions() -> Any:
        kw = dict(batch_size=B, progress=False)
        return diff_of_means(
            collect_resid_stats(model, harmful, **kw), collect_resid_stats(model, harmless, **kw)
        )

    res["direction_extraction"] = measure_stage(model, directions, rows["resid_pre cache"], weights)
    for k in ("attribution_patching", "expert_ablation_attribution", "direction_extraction"):
        v = res[k]
        cmp = v.get("measured_over_plan", {})
        print(
            f"  {k:28s} {v['wall_s']:6.2f} s  calls {v['forward_calls']}  peak {v['peak_bytes'] / 1e9:.2f} GB"
            + (
                f"  (measured/plan: calls {cmp['forward_calls']:.2f}, peak {cmp['peak_bytes']:.2f})"
                if cmp
                else ""
            )
        )
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="olmoe")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument(
        "--init-std", type=float, default=0.05, help="weight init std (HF default 0.02 makes ablations ~1e-3)"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args.geometry, args.layers, torch.float32, "cpu", args.vocab, init_std=args.init_std)
    s = model.spec
    result: dict[str, Any] = {
        "geometry": args.geometry,
        "config": {k: v for k, v in GEOMETRIES[args.geometry].items()},
        "spec": {"n_layers": s.n_layers, "d_model": s.d_model, "n_experts": s.n_experts, "top_k": s.top_k},
        "vocab": args.vocab,
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "threads": args.threads,
        "init_std": args.init_std,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_average_start": list(__import__("os").getloadavg()),
        "dtypes": {},
    }
    for dt in args.dtypes:
        model.hf_model.to(getattr(torch, dt))  # in place: one copy of the weights at a time
        result["dtypes"][dt] = run_dtype(model, dt, args)
    result["load_average_end"] = list(__import__("os").getloadavg())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
