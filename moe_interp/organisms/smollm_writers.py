"""``writers``: who writes the ``smollm_moe`` refusal directions, and can it be removed where it is written?

The seeds claim that refusal can be suppressed from one expert and that attention carries it more than
routing. This command tests both on the two directions of the Arditi test (``arditi_scan`` and
``arditi_layer22`` in ``circuits/smollm_moe/``; ``--names`` picks some, ``--directions`` another folder):

1. **Writers** (:func:`moe_interp.dla.direction_attribution`): the projection of ``blocks.L.hook_resid_pre``
   on the direction, at its position, split over the embedding, every head and every routed expert of the
   layers before ``L``; mean over harmful minus mean over harmless *fitting* prompts (the Arditi test's own
   training prompts). The ranking is fixed there, before any test prompt is run.
2. **Removal by kind**, on the Arditi test's held-back prompts (HarmBench ``harmful_val`` and ``harmless_val``,
   greedy tokens, first-token KL on the harmless ones): the direction projected out of every layer's attention
   output only, of every layer's MLP (expert) output only, of the ``k`` top writer experts only
   (``SteeringVectors(operation="ablate")`` at expert keys: the expert-aware form of directional ablation), and
   of the ``k`` top writer attention layers only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from moe_interp.organisms.smollm_eval import DEFAULT_DIR, _benchmark_harmful, _heldout_harmless, _prompts

__all__ = ["main_writers", "writer_table"]

#: the two directions of the Arditi test: (file in ``circuits/smollm_moe/``, what they are)
DIRECTIONS: dict[str, str] = {
    "arditi_scan": "the scan's best bypass (its layer and position: hook, position)",
    "arditi_layer22": "the layer-22, position -1 candidate, which bypasses and induces",
}


def writer_table(
    harmful: torch.Tensor, harmless: torch.Tensor, labels: list[str], kinds: list[str]
) -> list[dict[str, Any]]:
    """Components ranked by ``mean(harmful) − mean(harmless)`` of their contribution (``[component, n]``)."""
    diff = harmful.mean(1) - harmless.mean(1)
    order = diff.argsort(descending=True).tolist()
    return [{"component": labels[i], "kind": kinds[i], "difference": float(diff[i])} for i in order]


def _load_direction(path: Path) -> tuple[torch.Tensor, int, int]:
    from moe_interp.fileio import read_safetensors_with_metadata

    tensors, meta = read_safetensors_with_metadata(path)
    return tensors["raw"], int(meta["layer"]), int(meta["pos"])


def main_writers(argv: list[str] | None = None) -> None:
    """``writers [--n-fit 32] [--n-test 39] [--top 1,4,16]``: see the module docstring."""
    from moe_interp.dla import direction_attribution
    from moe_interp.interventions import DirectionalAblation
    from moe_interp.organisms.smollm_moe import load_model
    from moe_interp.refusal import evaluate
    from moe_interp.steering import SteeringMetadata, SteeringVectors

    ap = argparse.ArgumentParser(prog="python -m moe_interp.organisms.smollm_moe writers")
    ap.add_argument("--path", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR / "direction_writers.json")
    ap.add_argument("--directions", type=Path, default=DEFAULT_DIR, help="folder of the Arditi test's files")
    ap.add_argument("--n-fit", type=int, default=32, help="fitting prompts per group (the Arditi test's)")
    ap.add_argument("--n-test", type=int, default=39)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--top-experts", default="1,4,16", help="numbers of top writer experts to ablate at")
    ap.add_argument("--top-attn", default="1,4", help="numbers of top writer attention layers to ablate at")
    ap.add_argument(
        "--names", default=",".join(DIRECTIONS), help=f"directions to test, some of {','.join(DIRECTIONS)}"
    )
    args = ap.parse_args(argv)
    names = args.names.split(",")
    if any(n not in DIRECTIONS for n in names):
        ap.error(f"--names: got {args.names!r}; expected comma-separated names from {', '.join(DIRECTIONS)}")
    torch.set_num_threads(2)
    t0 = time.time()
    model = load_model(path=args.path)
    fit = {
        "harmful": _benchmark_harmful()[: args.n_fit],
        "harmless": _heldout_harmless(args.path)[: args.n_fit],
    }
    test = {
        "harmful": _prompts("harmful_val")[: args.n_test],
        "harmless": _prompts("harmless_val")[: args.n_test],
    }
    kw = {"max_new_tokens": args.max_new_tokens, "batch_size": 20}

    def removal(ivs: list[Any]) -> dict[str, Any]:
        a = evaluate(model, test["harmful"], ivs, **kw)
        b = evaluate(model, test["harmless"], ivs, baseline=True, **kw)
        return {
            "harmful_refusal": a.refusal_rate,
            "harmless_refusal": b.refusal_rate,
            "harmless_kl": b.kl_to_baseline,
        }

    out: dict[str, Any] = {"n_fit": args.n_fit, "n_test": args.n_test, "max_new_tokens": args.max_new_tokens}
    out["unedited"] = removal([])
    print(f"unedited: {out['unedited']} [{time.time() - t0:.0f}s]", flush=True)
    meta = SteeringMetadata.from_model(model, method="direction_writers")
    for name in names:
        what = DIRECTIONS[name]
        raw, L, pos = _load_direction(args.directions / f"{name}.safetensors")
        res = {g: direction_attribution(model, p, raw, L, batch_size=16) for g, p in fit.items()}
        h, b = (res[g].values[:, :, pos] for g in ("harmful", "harmless"))
        table = writer_table(h, b, res["harmful"].labels, res["harmful"].kinds)
        gap = float(res["harmful"].logit_diff[:, pos].mean() - res["harmless"].logit_diff[:, pos].mean())
        by_kind: dict[str, float] = {}
        for row in table:
            by_kind[row["kind"]] = by_kind.get(row["kind"], 0.0) + row["difference"]
        experts = [r["component"] for r in table if r["kind"] == "expert"]
        layer_of = dict(zip(res["harmful"].labels, res["harmful"].layers, strict=True))
        attn: dict[int, float] = {}  # heads and bias summed per attention layer
        for r in table:
            if r["kind"] in ("head", "attn_bias", "attn"):
                layer = layer_of[r["component"]]
                attn[layer] = attn.get(layer, 0.0) + r["difference"]
        attn_rank = sorted(attn, key=lambda k: -attn[k])
        rec: dict[str, Any] = {
            "what": what,
            "hook": f"blocks.{L}.hook_resid_pre",
            "position": pos,
            "gap": gap,
            "attribution_error": max(r.error() for r in res.values()),
            "by_kind": {k: round(v, 4) for k, v in by_kind.items()},
            "top_writers": table[:16],
            "attention_layers": [{"layer": k, "difference": round(attn[k], 4)} for k in attn_rank],
        }
        print(f"{name}: gap {gap:.2f}, by kind {rec['by_kind']}, top {table[:6]}", flush=True)
        rem: dict[str, Any] = {}
        rem["attention outputs, every layer"] = removal([DirectionalAblation(raw, sites=("hook_attn_out",))])
        rem["MLP (expert) outputs, every layer"] = removal(
            [DirectionalAblation(raw, sites=("hook_mlp_out",))]
        )
        for k in [int(x) for x in args.top_experts.split(",")]:
            keys = [(c, None) for c in experts[:k]]  # blocks.l.mlp.experts.e.hook_out
            sv = SteeringVectors(dict.fromkeys(keys, raw), meta, operation="ablate")
            rem[f"top {k} writer experts"] = {"experts": experts[:k], **removal(sv.to_interventions())}
        for k in [int(x) for x in args.top_attn.split(",")]:
            layers = attn_rank[:k]
            rem[f"top {k} writer attention layers"] = {
                "layers": layers,
                **removal([DirectionalAblation(raw, layers=layers, sites=("hook_attn_out",))]),
            }
        for what_removed, v in rem.items():
            print(f"  {name} {what_removed}: {v} [{time.time() - t0:.0f}s]", flush=True)
        rec["removal"] = rem
        out[name] = rec
    out["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({out['seconds']}s)")
