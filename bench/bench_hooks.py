"""Overhead of moe-interp's hook points against a plain HF forward (and TransformerBridge's run_with_cache).

Random-init OLMoE at a bench geometry (d_model 512, 8 layers, 32 experts top-4), batch 8 x seq 128, fp32, CPU,
``torch.no_grad``, ``--threads`` threads (2 by default). Every configuration is timed in the same process,
interleaved (one call of each per round, rotating the order), median over rounds after warm-up; ratios are
against the plain HF forward.

    python bench/bench_hooks.py --out bench/results/bench_hooks.json
    python bench/bench_hooks.py --threads 1 --unpooled   # also `all` with the adapter's buffer pool off
    python bench/bench_hooks.py --quick            # smoke run, small geometry
    python bench/bench_hooks.py --profile all      # cProfile one configuration
    python bench/bench_hooks.py --malloc-tuned --out bench/results/bench_hooks_malloc_tuned.json

The dense ``hook_expert_out`` buffers come from a pool (:mod:`moe_interp.buffers`) that reuses them once the
previous call's cache is dropped; ``--unpooled`` times ``all`` without it, in the same run.

``--malloc-tuned`` re-runs the script with glibc's ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
raised (:data:`TUNED_MALLOC_ENV`), so that freed cache tensors are reused instead of returned to the OS and
faulted in again on the next call; both variables are needed (either alone changed nothing here).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore")

TARGETS = {"resid": 1.05, "all": 1.3}
#: glibc allocator settings of ``--malloc-tuned`` (read by glibc at process start, hence the re-exec).
TUNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def build(quick: bool, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A seeded random-init OLMoE at the bench (or quick) geometry, wrapped as an MoEModel."""
    from transformers import AutoModelForCausalLM

    import moe_interp as mi
    from moe_interp.tiny import tiny_config
    from moe_interp.tokenizer import build_tiny_tokenizer

    geo = dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_experts=32,
        num_experts_per_tok=4,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=512,
        max_position_embeddings=256,
    )
    if quick:
        geo.update(
            hidden_size=128, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, intermediate_size=64
        )
    cfg = tiny_config("olmoe", **geo)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg).float().to(dtype).eval()
    return mi.load(hf, tokenizer=build_tiny_tokenizer(cfg.vocab_size), name="bench:olmoe")


def boot_bridge(model: Any) -> Any:
    """TransformerBridge around its own copy of the bench model (booting may wrap the HF model)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    tmp = tempfile.mkdtemp(prefix="bench-bridge-")
    model.tokenizer.save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(tmp)
    return TransformerBridge.boot_transformers(tmp, hf_model=model.hf_model, tokenizer=tok, device="cpu")


def configs(
    model: Any, bridge: Any, enc: dict[str, torch.Tensor], unpooled: bool = False
) -> dict[str, Callable[[], Any]]:
    """The timed calls, by name."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    names = model.hook_names()
    resid = [n for n in names if "hook_resid_" in n]
    router = [
        n for n in names if n.endswith(("hook_router_logits", "hook_expert_indices", "hook_expert_weights"))
    ]
    no_pattern = [n for n in names if not n.endswith("hook_pattern")]
    out: dict[str, Callable[[], Any]] = {
        "hf": lambda: model.hf_model(ids, attention_mask=mask, position_ids=pos),
        "resid": lambda: model.run_with_cache(enc, names=resid),
        "router": lambda: model.run_with_cache(enc, names=router),
        "expert_out": lambda: model.run_with_cache(
            enc, names=[n for n in names if n.endswith("mlp.hook_expert_out")]
        ),
        "all_but_pattern": lambda: model.run_with_cache(enc, names=no_pattern),
        "all": lambda: model.run_with_cache(enc, names=names),
    }
    if unpooled:
        from moe_interp.buffers import BUFFERS

        def all_unpooled() -> Any:
            BUFFERS.enabled = False  # every dense hook_expert_out freshly allocated, as before the pool
            try:
                return model.run_with_cache(enc, names=names)
            finally:
                BUFFERS.enabled = True

        out["all_unpooled"] = all_unpooled
    if bridge is not None:
        out["bridge"] = lambda: bridge.run_with_cache(ids)
    return out


def measure(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved timings: each round calls every configuration once, in a rotating order."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    with torch.no_grad():
        for _ in range(warmup):
            for k in keys:
                calls[k]()
        for r in range(repeats):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                t0 = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small geometry, few repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16: reading hooks keeps the logits bit-identical (docs/API_CONTRACT.md)",
    )
    ap.add_argument("--no-bridge", action="store_true", help="skip TransformerBridge")
    ap.add_argument("--profile", default=None, help="cProfile this configuration once and print the top")
    ap.add_argument(
        "--unpooled", action="store_true", help="also time `all` with the adapter's buffer pool switched off"
    )
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    ap.add_argument(
        "--malloc-tuned",
        action="store_true",
        help="re-run with glibc MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ raised (see the docstring)",
    )
    args = ap.parse_args()
    if args.malloc_tuned and any(os.environ.get(k) != v for k, v in TUNED_MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC_ENV})

    torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.quick else 8)
    seq = args.seq or (32 if args.quick else 128)
    repeats = args.repeats or (3 if args.quick else 7)

    dtype = getattr(torch, args.dtype)
    model = build(args.quick, dtype=dtype)
    bridge = None if args.no_bridge else boot_bridge(build(args.quick, dtype=dtype))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.spec.vocab_size, (batch, seq), generator=gen)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calls = configs(model, bridge, enc, unpooled=args.unpooled)

    if args.profile:
        with torch.no_grad():
            calls[args.profile]()
            prof = cProfile.Profile()
            prof.enable()
            calls[args.profile]()
            prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return

    times = measure(calls, repeats=repeats, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med[k] / med["hf"] for k in med}
    result = {
        "geometry": {
            "family": "olmoe",
            "d_model": model.spec.d_model,
            "n_layers": model.spec.n_layers,
            "n_experts": model.spec.n_experts,
            "top_k": model.spec.top_k,
            "batch": batch,
            "seq": seq,
            "dtype": args.dtype,
        },
        "threads": args.threads,
        "repeats": repeats,
        "quick": args.quick,
        "median_s": med,
        "ratio_vs_hf": ratios,
        "targets": TARGETS,
        "meets_targets": {k: ratios[k] <= v for k, v in TARGETS.items()},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        # glibc allocator settings: they decide whether each large cache tensor costs fresh page faults.
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "load_average": list(os.getloadavg()),
    }
    width = max(map(len, med))
    for k in med:
        target = f"  (target <= {TARGETS[k]}x)" if k in TARGETS else ""
        print(f"{k:<{width}}  {med[k] * 1e3:9.1f} ms  {ratios[k]:6.2f}x{target}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
