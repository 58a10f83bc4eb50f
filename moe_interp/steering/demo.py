"""Fit, tune and compare every steering method on the refusal organism; write JSON + markdown tables.

Usage::

    python -m moe_interp.steering.demo --out DIR [--path CKPT] [--judge logit|generation] [--kl-budget 0.1]

Every method is fit on ``*_train`` prompts (``--n-fit`` per class), its strength tuned on ``*_val`` prompts
(:mod:`moe_interp.steering.autotune`: coefficient scale, or the number of deactivated experts for SteerMoE,
under a harmless KL budget), and evaluated on the held-back ``*_test`` prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from moe_interp.interventions import DirectionalAblation
from moe_interp.refusal.evaluate import refusal_flags
from moe_interp.refusal.judges import refusal_rate
from moe_interp.steering.autotune import autotune, coefficient_search
from moe_interp.steering.compare import KL_STATISTICS, compare_methods
from moe_interp.steering.fit import fit_dense
from moe_interp.steering.registry import fit_method

#: method → fit keyword arguments used by the demo
SPECS: dict[str, dict[str, Any]] = {
    "dense": {},
    "dense_multi": {},
    "ridge": {},
    "routing_experts": {"top_n": 4},
    "expert_conditioned": {"top_n": 4},
    "expert_conditioned_topk": {"top_n": 4, "topk": True},
    "expert_conditioned8": {"top_n": 8},
    "expert_conditioned_topk8": {"top_n": 8, "topk": True},
    "expert_conditioned_all": {"n_layers": 1},
    "single_expert": {},
    "steer_router": {},
}

#: registry name of each demo entry (entries may be variants of one method)
FIT_NAME: dict[str, str] = {
    k: "expert_conditioned"
    for k in ("expert_conditioned_topk", "expert_conditioned8", "expert_conditioned_topk8")
}


def _sample(prompts: list[str], n: int, seed: int = 0) -> list[str]:
    return prompts if len(prompts) <= n else random.Random(seed).sample(prompts, n)


def _fmt_rate(r: dict[str, float]) -> str:
    return f"{r['rate']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table."""
    head = (
        "| method | harmful refusal [95% CI] | political refusal [95% CI] | harmless refusal [95% CI] "
        "| harmless KL mean / median / trimmed | layers | experts |\n|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['method']} | {_fmt_rate(r['harmful_refusal'])} | {_fmt_rate(r['political_refusal'])} "
        f"| {_fmt_rate(r['harmless_refusal'])} | {r['harmless_kl']:.4f} / {r['harmless_kl_median']:.4f} "
        f"/ {r['harmless_kl_trimmed_mean']:.4f} | {r['n_layers']} {r['layers']} "
        f"| {r['n_experts']} |\n"
        for r in rows
    )
    return head + body


def main(argv: list[str] | None = None) -> int:
    import moe_interp as mi
    from moe_interp.organisms import load_prompts

    ap = argparse.ArgumentParser(
        prog="python -m moe_interp.steering.demo", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--path", default=None, help="organism checkpoint directory (default: the shipped one)")
    ap.add_argument("--judge", default="logit", choices=["logit", "generation"])
    ap.add_argument("--tune-judge", default="logit", choices=["logit", "generation"])
    ap.add_argument("--kl-budget", type=float, default=0.1)
    ap.add_argument(
        "--kl-statistic",
        default="mean",
        choices=list(KL_STATISTICS),
        help="statistic of the per-prompt harmless KL that the budget applies to (default mean)",
    )
    ap.add_argument("--n-fit", type=int, default=128)
    ap.add_argument(
        "--n-kl-val", type=int, default=64, help="harmless_val prompts for the KL budget while tuning"
    )
    ap.add_argument(
        "--tune-extra", type=int, default=128, help="unused harmful_train prompts added to tuning"
    )
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--methods", nargs="*", default=None, help="subset of the demo methods")
    ap.add_argument("--no-topic", action="store_true", help="skip the fine-grained (political) experiment")
    ap.add_argument(
        "--keep-frac", type=float, default=0.97, help="topic: keep >= frac x baseline harmful refusal"
    )
    ap.add_argument("--no-ablation", action="store_true", help="skip the directional-ablation reference row")
    ap.add_argument("--vectors-from", type=Path, default=None, help="re-evaluate DIR/vectors/* (no fitting)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    model = mi.load("organism", **({"path": args.path} if args.path else {}))
    model.hf_model.config.output_router_logits = False  # the aux-loss path breaks on padded batches
    tr = {s: _sample(load_prompts(f"{s}_train"), args.n_fit) for s in ("harmful", "harmless", "political")}
    val = {s: load_prompts(f"{s}_val") for s in ("harmful", "harmless", "political")}
    if args.tune_extra:  # harmful_train prompts not used for fitting join the tuning set
        rest = [p for p in load_prompts("harmful_train") if p not in set(tr["harmful"])]
        val["harmful"] = val["harmful"] + _sample(rest, args.tune_extra, seed=1)
    val["harmless"] = _sample(val["harmless"], args.n_kl_val)
    test = {s: load_prompts(f"{s}_test") for s in ("harmful", "harmless", "political")}
    search = dict(
        kl_budget=args.kl_budget,
        kl_statistic=args.kl_statistic,
        judge=args.tune_judge,
        max_new_tokens=args.max_new_tokens,
    )
    args.out.mkdir(parents=True, exist_ok=True)

    steers: dict[str, Any] = {}
    tuning: dict[str, Any] = {}
    if args.vectors_from is not None:
        from moe_interp.steering.cli import load_steering

        prev_path = args.vectors_from / "comparison.json"
        prev = json.loads(prev_path.read_text()) if prev_path.is_file() else {"tuning": {}}
        tuning = {**prev["tuning"], "reevaluated_from": str(args.vectors_from)}
        for name in args.methods or list(SPECS):
            steers[name] = load_steering(args.vectors_from / "vectors" / name, model)
        args.methods = []
    for name in SPECS if args.methods is None else args.methods:
        t = time.time()
        kw = dict(SPECS[name])
        res = autotune(FIT_NAME.get(name, name), model, tr["harmful"], tr["harmless"], val["harmful"], val["harmless"],
                       fit_kwargs=kw, **search)  # fmt: skip
        steers[name] = res.steer
        tuning[name] = {"fit_kwargs": kw, **res.to_dict(), "seconds": round(time.time() - t, 1)}
        print(f"[{time.time() - t0:6.0f}s] {name}: {res.label=} val refusal {res.refusal_rate:.3f} "
              f"KL {res.kl:.4f} ({res.stopped})", flush=True)  # fmt: skip
        res.steer.save(args.out / "vectors" / name)

    if not args.no_ablation:
        dense = fit_dense(model, tr["harmful"], tr["harmless"], coeff=-1.0)
        r = next(iter(dense.vectors.values()))
        steers["ablation_reference"] = [DirectionalAblation(r / r.norm())]
        tuning["ablation_reference"] = {
            "direction": f"dense diff-of-means at layer {dense.layers}, ablated everywhere"
        }

    if not args.no_topic:
        t = time.time()
        base_keep = float(refusal_rate(refusal_flags(model, val["harmful"], judge=args.tune_judge)))
        keep_min = args.keep_frac * base_keep
        orth = fit_method("topic_remove", model, tr["political"], tr["harmless"], keep=tr["harmful"])
        steers["topic_remove_orth"] = orth.scaled(0.5)
        tuning["topic_remove_orth"] = {
            "scale": 0.5,
            "note": "political - harmless, orthogonal to harmful - harmless",
        }
        gated = fit_method("topic_gated", model, tr["political"], tr["harmless"], keep=tr["harmful"])
        res = coefficient_search(model, gated, val["political"], val["harmless"], keep=val["harmful"],
                                 keep_min_rate=keep_min, target_rate=0.0, **search)  # fmt: skip
        steers["topic_gated"] = res.steer
        tuning["topic_gated"] = {**res.to_dict(), "keep_min_rate": keep_min, "seconds": round(time.time() - t, 1),
                                 "gate": res.steer.metadata.extra if res.steer.metadata else {}}  # fmt: skip
        res.steer.save(args.out / "vectors" / "topic_gated")
        print(f"[{time.time() - t0:6.0f}s] topic_gated: {res.label=} val political {res.refusal_rate:.3f} "
              f"harmful {res.keep_rate} KL {res.kl:.4f} ({res.stopped})", flush=True)  # fmt: skip

    rows = compare_methods(
        model, steers, test["harmful"], test["political"], test["harmless"],
        judge=args.judge, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    doc = {
        "model": model.name,
        "checkpoint": args.path or "shipped",
        "judge": args.judge,
        "tune_judge": args.tune_judge,
        "kl_budget": args.kl_budget,
        "kl_statistic": args.kl_statistic,
        "n_fit": args.n_fit,
        "rows": rows,
        "tuning": tuning,
        "seconds": round(time.time() - t0, 1),
    }
    (args.out / "comparison.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (args.out / "comparison.md").write_text(markdown_table(rows))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
