"""Full OLMoE-1B-7B geometry (16 layers, 64 experts top-8, d 2048, vocab 50304), random init, bf16, on one GPU.

One script, sized for ≤ 10 minutes on one H200 (about 14 GB of weights). It records, into one JSON file:

1. hook overhead: ``run_with_cache`` of resid / router / sparse top-k / dense expert outputs / every hook vs the
   plain HF forward (batch 16 × seq 128, interleaved rounds, CUDA-synchronised medians);
2. the batched sweep: fast sweep vs per-expert loop on 16 experts of layers 0 and 8 (64 prompts), timed,
   with the per-prompt difference;
3. ``locate``-stage times on 64 prompts (seq 64): direction extraction, routing statistics, activation
   patching (resid at the post-instruction positions, heads, experts of three layers), attribution patching,
   the exhaustive expert sweep over all 16 × 64 experts, its attribution estimate;
4. peak GPU memory (``max_memory_allocated`` above the level before the stage) and forward calls of every
   stage, next to ``moe-interp plan``'s prediction for the same workload.

    python bench/gpu_olmoe.py --out bench/results/gpu_olmoe.json     # on the GPU machine
    python bench/gpu_olmoe.py --tiny --out /tmp/gpu_olmoe_tiny.json   # CPU smoke run (tests/test_bench_scripts.py)

Stages that fail (e.g. out of memory) are recorded with their error and the script goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scale_lib import (  # noqa: E402
    Meter,
    build,
    fit_prompts,
    harmful_harmless,
    plan_record_of,
    plan_rows,
    weight_bytes,
)


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def hook_overhead(model: Any, enc: dict[str, torch.Tensor], repeats: int, device: str) -> dict[str, Any]:
    """Median seconds per configuration over interleaved rounds, and the ratio to the plain forward."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    names = model.hook_names()

    def cache(pred: Any) -> Any:
        sel = [n for n in names if pred(n)]
        return lambda: model.run_with_cache(enc, names=sel)

    calls = {
        "hf": lambda: model.hf_model(ids, attention_mask=mask, position_ids=pos),
        "resid": cache(lambda n: "hook_resid_" in n),
        "router": cache(
            lambda n: n.endswith(("hook_router_logits", "hook_expert_indices", "hook_expert_weights"))
        ),
        "topk_expert_out": cache(lambda n: n.endswith("hook_topk_expert_out")),
        "expert_out": cache(lambda n: n.endswith("mlp.hook_expert_out")),
        "all": cache(lambda n: True),
    }
    keys = list(calls)
    times: dict[str, list[float]] = {k: [] for k in keys}
    with torch.no_grad():
        for k in keys:
            calls[k]()
        for r in range(repeats):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                _sync(device)
                t0 = time.perf_counter()
                out = calls[k]()
                _sync(device)
                times[k].append(time.perf_counter() - t0)
                del out
    med = {k: statistics.median(v) for k, v in times.items()}
    return {k: {"s": med[k], "ratio": med[k] / med["hf"]} for k in keys}


def fp32_loop(model: Any, prompts: list[str], items: list[tuple[int, int]]) -> torch.Tensor:
    """:func:`expert_ablation_loop` (per prompt) of ``items`` on an fp32 copy of the weights (freed on return)."""
    import copy

    import moe_interp as mi
    from moe_interp.patching import expert_ablation_loop

    m32 = mi.load(copy.deepcopy(model.hf_model).float(), tokenizer=model.tokenizer, name="fp32 copy")
    return expert_ablation_loop(m32, prompts, "drop", experts=items, per_prompt=True)


def stage(
    name: str,
    model: Any,
    fn: Any,
    device: str,
    results: dict,
    predicted: Any = None,
    on_record: Any = None,
    **extra: Any,
) -> Any:
    """Run one stage under a :class:`Meter`; record time, calls, memory (and plan) or the error."""
    weights = weight_bytes(model)
    print(f"  {name} ...", end=" ", flush=True)
    try:
        with Meter(model.hf_model, device=device) as m:
            value = fn()
        rec = {**m.to_dict(), "peak_bytes": weights + m.peak_extra_bytes, **extra}
        if predicted is not None:
            rec.update(plan_record_of(predicted, weights, m))
        print(f"{m.wall_s:.2f} s, {m.forward_calls} fwd, +{m.peak_extra_bytes / 1e9:.2f} GB", flush=True)
    except Exception as e:  # noqa: BLE001 - record and go on (e.g. out of memory)
        value = None
        rec = {
            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
            "trace": traceback.format_exc()[-2000:],
        }
        print(rec["error"], flush=True)
        if device != "cpu":
            torch.cuda.empty_cache()
    results[name] = rec
    if on_record is not None:
        on_record()
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny geometry on the CPU (smoke run of this script)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT/gpu_olmoe.json or ./gpu_olmoe.json")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="default: bfloat16 (float32 with --tiny)",
    )
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if args.tiny:
        geometry, n_layers, vocab, dtype = "tiny", 2, 512, torch.float32
        hb, hs, n, seq, repeats, sweep_k, sweep_layers = 2, 16, 4, 16, args.repeats or 1, 2, [0, 1]
        patch_layers = [0, 1]
    else:
        geometry, n_layers, vocab, dtype = "olmoe", 16, 50304, torch.bfloat16
        hb, hs, n, seq, repeats, sweep_k, sweep_layers = 16, 128, 64, 64, args.repeats or 5, 16, [0, 8]
        patch_layers = [0, 8, 15]
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype)
    out_path = args.out or Path(os.environ.get("OUT", ".")) / "gpu_olmoe.json"
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "geometry": geometry,
        "n_layers": n_layers,
        "vocab": vocab,
        "dtype": str(dtype),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device != "cpu" else platform.processor(),
        "torch": torch.__version__,
        "hooks_batch_seq": [hb, hs],
        "n_prompts": n,
        "seq": seq,
        "stages": {},
    }

    def save() -> None:  # after every section: a run cut short by its time limit keeps what finished
        res["total_s"] = time.perf_counter() - t_start
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=2, default=str))

    def staged(*a: Any, **k: Any) -> Any:
        return stage(*a, on_record=save, **k)

    print(f"building {geometry} ({n_layers} layers, {dtype}) on {device}", flush=True)
    t0 = time.perf_counter()
    model = build(geometry, n_layers, dtype, device, vocab, init_std=0.05)
    _sync(device)
    res["build_s"] = time.perf_counter() - t0
    res["weights_bytes"] = weight_bytes(model)
    texts_h, texts_s = harmful_harmless(n)
    harmful, harmless = fit_prompts(model, texts_h, n, seq), fit_prompts(model, texts_s, n, seq)
    from moe_interp.patching import (
        attribution_patching,
        expert_ablation_attribution,
        expert_ablation_loop,
        expert_ablation_sweep,
        patch_experts,
        patch_heads,
        patch_resid,
    )
    from moe_interp.patching.routing import routing_risk_difference
    from moe_interp.refusal.directions import collect_resid_stats, diff_of_means, post_instruction_positions

    n_pos = len(post_instruction_positions(model))
    dt = "bfloat16" if dtype == torch.bfloat16 else "float32"
    rows = plan_rows(model, dt, n, seq, n, n_pos)
    hook_prompts = fit_prompts(model, texts_h, hb, hs)
    print("hook overhead", flush=True)
    res["hooks"] = hook_overhead(model, model.tokenize(hook_prompts), repeats, device)
    for k, v in res["hooks"].items():
        print(f"  {k:16s} {v['s'] * 1e3:8.1f} ms  {v['ratio']:5.2f}x", flush=True)
    save()
    hook_rows = plan_rows(model, dt, hb, hs, hb, n_pos)
    enc_h = model.tokenize(hook_prompts)
    names = model.hook_names()
    for key, stage_name, suffix in (
        ("resid", "resid cache, all positions", "hook_resid_"),
        ("topk_expert_out", "expert outputs: sparse top-k form", "hook_topk_expert_out"),
        ("expert_out", "expert outputs: dense hook_expert_out", "mlp.hook_expert_out"),
    ):
        sel = [nm for nm in names if suffix in nm]
        staged(
            f"hooks_{key}_memory",
            model,
            lambda sel=sel: model.run_with_cache(enc_h, names=sel),
            device,
            res.setdefault("hook_memory", {}),
            hook_rows[stage_name],
        )

    print("sweep: fast vs per-expert loop", flush=True)
    st = res["stages"]
    # warm-up (untimed): the sweep's first call pays for kernels and allocations the forwards above did not
    try:
        expert_ablation_sweep(model, harmful[:2], "drop", experts=[(sweep_layers[0], 0)], progress=False)
    except Exception as e:  # noqa: BLE001 - the sweep stages below record the error; the script goes on
        res["sweep_warmup_error"] = f"{type(e).__name__}: {e}"[:300]
    for L in sweep_layers:
        items = [(L, e) for e in range(sweep_k)]
        fast = staged(
            f"sweep_fast_layer{L}",
            model,
            lambda items=items: expert_ablation_sweep(model, harmful, "drop", experts=items, progress=False),
            device,
            st,
        )
        loop = staged(
            f"sweep_loop_layer{L}",
            model,
            lambda items=items: expert_ablation_loop(model, harmful, "drop", experts=items, per_prompt=True),
            device,
            st,
        )
        if fast is not None and loop is not None:
            idx = tuple(torch.tensor(x) for x in zip(*items, strict=True))
            st[f"sweep_fast_layer{L}"]["speedup_vs_loop"] = (
                st[f"sweep_loop_layer{L}"]["wall_s"] / st[f"sweep_fast_layer{L}"]["wall_s"]
            )
            st[f"sweep_fast_layer{L}"]["max_abs_diff_per_prompt"] = float(
                (fast.per_prompt[idx] - loop[idx]).abs().max()
            )
            # the scale the difference is read against: the largest per-prompt effect of the loop
            st[f"sweep_fast_layer{L}"]["max_abs_effect_per_prompt"] = float(loop[idx].abs().max())
            if dtype != torch.float32:
                # which of the two is nearer the exact value: both against the loop on an fp32 copy of the
                # same weights (rounding makes the fast sweep and the loop differ in half precision)
                try:
                    ref = fp32_loop(model, harmful, items)[idx]
                    st[f"sweep_fast_layer{L}"]["max_abs_err_vs_fp32"] = float(
                        (fast.per_prompt[idx] - ref).abs().max()
                    )
                    st[f"sweep_loop_layer{L}"]["max_abs_err_vs_fp32"] = float((loop[idx] - ref).abs().max())
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, the script goes on
                    st[f"sweep_fast_layer{L}"]["fp32_reference_error"] = f"{type(e).__name__}: {e}"[:300]
                if device != "cpu":
                    torch.cuda.empty_cache()

    save()
    print(f"locate stages on {n} prompts × {seq} tokens", flush=True)

    def directions() -> Any:
        kw = dict(batch_size=n, progress=False)
        return diff_of_means(
            collect_resid_stats(model, harmful, **kw), collect_resid_stats(model, harmless, **kw)
        )

    staged("direction_extraction", model, directions, device, st, rows["resid_pre cache"])
    staged(
        "routing_risk_difference",
        model,
        lambda: routing_risk_difference(model, harmful, harmless),
        device,
        st,
    )
    staged("patch_resid", model, lambda: patch_resid(model, harmful, harmless, progress=False), device, st)
    staged("patch_heads", model, lambda: patch_heads(model, harmful, harmless, progress=False), device, st)
    staged(
        "patch_experts",
        model,
        lambda: patch_experts(model, harmful, harmless, layers=patch_layers, batch_patches=4, progress=False),
        device,
        st,
        layers=patch_layers,
    )
    staged(
        "attribution_patching",
        model,
        lambda: attribution_patching(model, harmful, harmless, progress=False),
        device,
        st,
        rows["attribution patching"],
    )
    staged(
        "expert_ablation_sweep_full",
        model,
        lambda: expert_ablation_sweep(model, harmful, "drop", progress=False),
        device,
        st,
        rows[next(k for k in rows if k.startswith("expert ablation sweep"))],
    )
    staged(
        "expert_ablation_attribution", model, lambda: expert_ablation_attribution(model, harmful), device, st
    )
    res["complete"] = True
    save()
    print(f"wrote {out_path} ({res['total_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
