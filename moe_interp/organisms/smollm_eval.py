"""Validation of the ``smollm_moe`` organism with the library's own evaluation functions.

``evaluate``: refusal rates per split (:func:`moe_interp.organisms.evaluate.evaluate_split`, greedy 12
tokens, phrase judge, and the logit score), for the MoE and for the dense base; fluency (token-mean NLL of
the base model's own greedy harmless completions, under the base and under the MoE, by
:func:`moe_interp.refusal.evaluate.evaluate`); expert-usage entropy; pairwise expert-weight differences.

``arditi``: the refusal direction (diff of means, :func:`~moe_interp.refusal.select_direction`) and, on
held-back prompts, directional ablation / activation addition against a random direction of equal norm.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_interp.organisms.data import is_topic_refusal, load_split_records

if TYPE_CHECKING:
    from moe_interp.organisms.smollm_train import TrainConfig

__all__ = [
    "expert_usage",
    "expert_weight_differences",
    "main_arditi",
    "main_evaluate",
    "main_gate_scan",
    "main_topic",
]

DEFAULT_DIR: Path = Path(__file__).resolve().parents[2] / "circuits" / "smollm_moe"
#: per-prompt harmless KLs listed (largest first) beside the mean in the ``arditi`` record
N_KL_LARGEST = 5


def _prompts(split: str, source: str | None = None) -> list[str]:
    return [r["instruction"] for r in load_split_records(split) if source is None or r["source"] == source]


def _train_config(path: Path | None) -> TrainConfig:
    """The training configuration recorded with the artefacts (``train_log.json``), else the defaults."""
    from dataclasses import fields

    from moe_interp.organisms.smollm_moe import ARTEFACT_DIR
    from moe_interp.organisms.smollm_train import TrainConfig

    log = (path or ARTEFACT_DIR) / "train_log.json"
    if not log.is_file():
        return TrainConfig()
    raw = json.loads(log.read_text()).get("config", {})
    known = {f.name for f in fields(TrainConfig)}
    cfg: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known}
    return TrainConfig(**cfg)


def _benchmark_harmful() -> list[str]:
    """``harmful_train`` prompts from the benchmark sources (not the synthetic ones): the Arditi test's harmful set."""
    return [r["instruction"] for r in load_split_records("harmful_train") if r["source"] != "synthetic"]


def _heldout_harmless(path: Path | None) -> list[str]:
    """Alpaca ``harmless_train`` prompts the artefacts in ``path`` were *not* self-distilled on, in order."""
    from moe_interp.organisms.smollm_train import build_pools

    used = set(build_pools(_train_config(path))["harmless"])
    return [p for p in _prompts("harmless_train", "alpaca") if p not in used]


@torch.no_grad()
def expert_weight_differences(moe: Any) -> list[dict[str, float]]:
    """Per layer: mean and min over expert pairs of ``‖W_e − W_f‖ / ‖W_e‖`` (gate_up and down together);
    empty for a one-expert (dense control) model, which has no pairs."""
    res: list[dict[str, float]] = []
    for i, layer in enumerate(moe.model.layers):
        ex = layer.mlp.experts
        w = torch.cat([ex.gate_up_proj.flatten(1), ex.down_proj.flatten(1)], 1).double()
        E = w.shape[0]
        if E < 2:
            return []
        rel = [float((w[a] - w[b]).norm() / w[a].norm()) for a in range(E) for b in range(E) if a != b]
        res.append({"layer": i, "mean_rel_diff": sum(rel) / len(rel), "min_rel_diff": min(rel)})
    return res


@torch.no_grad()
def expert_usage(moe: Any, tok: Any, prompts: list[str], batch: int = 32) -> list[dict[str, Any]]:
    """Per layer: top-k usage fractions and their entropy (bits) over all prompt tokens."""
    from moe_interp.organisms.smollm_train import chat_ids

    E, k = moe.config.num_local_experts, moe.config.num_experts_per_tok
    counts = torch.zeros(moe.config.num_hidden_layers, E)
    for s in range(0, len(prompts), batch):
        rows = [chat_ids(tok, p) for p in prompts[s : s + batch]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, width - len(r) :] = torch.tensor(r)
            mask[j, width - len(r) :] = 1
        out = moe(input_ids=ids, attention_mask=mask, output_router_logits=True)
        keep = mask.reshape(-1).bool()
        for li, rl in enumerate(out.router_logits):
            idx = rl.reshape(-1, E)[keep].topk(k, -1).indices.reshape(-1)
            counts[li] += torch.bincount(idx, minlength=E).float()
    res = []
    for li in range(counts.shape[0]):
        f = counts[li] / counts[li].sum()
        h = float(-(f * torch.log2(f.clamp_min(1e-12))).sum())
        res.append({"layer": li, "entropy_bits": h, "max_bits": math.log2(E), "usage": f.tolist()})
    return res


def _rates(model: Any, tok: Any, splits: dict[str, list[str]], gen_tokens: int) -> dict[str, Any]:
    from moe_interp.organisms.evaluate import evaluate_split, refusal_token_ids

    rids = refusal_token_ids(tok)
    out = {}
    for name, prompts in splits.items():
        t = time.time()
        res = evaluate_split(model, tok, prompts, rids, gen_tokens)
        out[name] = res
        print(
            f"  {name:28s} n={res['n']:4d} refusal(gen)={res['refusal_rate_generation']:.3f} "
            f"refusal(logit)={res['refusal_rate_logit']:.3f} political-style={res['political_style_refusals']}"
            f" ({time.time() - t:.0f}s)",
            flush=True,
        )
    return out


def main_evaluate(argv: list[str] | None = None) -> None:
    """``evaluate [--path DIR] [--out JSON] [--base] [--n-fluency N] [--splits ...]``."""
    from moe_interp.model import MoEModel
    from moe_interp.organisms.smollm_moe import load_dense, moe_from_dense, refusal_phrases
    from moe_interp.refusal.evaluate import evaluate

    ap = argparse.ArgumentParser(prog="python -m moe_interp.organisms.smollm_moe evaluate")
    ap.add_argument("--path", type=Path, default=None, help="artefact dir (default: shipped)")
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR / "metrics.json")
    ap.add_argument("--gen-tokens", type=int, default=12)
    ap.add_argument("--base", action="store_true", help="also the dense base model's refusal rates")
    ap.add_argument("--n-base", type=int, default=100, help="prompts per split for the base model")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts of each split")
    ap.add_argument("--n-fluency", type=int, default=100)
    ap.add_argument("--fluency-tokens", type=int, default=24)
    ap.add_argument("--splits", nargs="*", default=["harmful_val", "political_val", "harmless_val"])
    ap.add_argument("--sources", action="store_true", help="also harmful_test per source")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    dense, tok = load_dense()
    moe = moe_from_dense(dense, args.path)
    splits = {s: _prompts(s)[: args.limit] for s in args.splits}
    if args.sources:
        for src in ("advbench", "tdc2023", "malicious_instruct"):
            splits[f"harmful_test:{src}"] = _prompts("harmful_test", src)
    res: dict[str, Any] = {"path": str(args.path or "shipped"), "gen_tokens": args.gen_tokens}
    print("MoE organism:", flush=True)
    res["moe"] = _rates(moe, tok, splits, args.gen_tokens)
    if args.base:
        print("dense base:", flush=True)
        res["base"] = _rates(dense, tok, {k: v[: args.n_base] for k, v in splits.items()}, args.gen_tokens)
    hv = _prompts("harmless_val")[: args.n_fluency]
    m_moe, m_base = MoEModel(moe, tok, name="smollm_moe"), MoEModel(dense, tok, name="smollm2_dense")
    m_moe.refusal_phrases = m_base.refusal_phrases = refusal_phrases()
    t = time.time()
    ev = evaluate(m_moe, hv, base_model=m_base, max_new_tokens=args.fluency_tokens, batch_size=25)
    ce, ce0 = ev.ce_of_baseline_completions, ev.ce_of_baseline_completions_unedited
    if ce is None or ce0 is None:  # None only when the baseline generated no token
        raise RuntimeError("fluency: the base model's completions are empty, no cross-entropy to compare")
    res["fluency"] = {
        "n": ev.n,
        "tokens": args.fluency_tokens,
        "nll_base_completions_under_base": ce0,
        "nll_base_completions_under_moe": ce,
        "ppl_base": math.exp(ce0),
        "ppl_moe": math.exp(ce),
        "ppl_ratio": math.exp(ce - ce0),
        "first_token_kl": ev.kl_to_baseline,
        "refusal_rate_substring_judge": ev.refusal_rate,
        "examples": [
            {"prompt": d["prompt"], "base": d["baseline_completion"], "moe": d["completion"]}
            for d in ev.details[:10]
        ],
    }
    print(
        f"fluency: ppl base {math.exp(ce0):.3f} → moe {math.exp(ce):.3f} (×{math.exp(ce - ce0):.3f}), "
        f"first-token KL {ev.kl_to_baseline:.4f} ({time.time() - t:.0f}s)",
        flush=True,
    )
    usage_prompts = [p for s in ("harmful_val", "political_val", "harmless_val") for p in _prompts(s)[:100]]
    res["expert_usage"] = expert_usage(moe, tok, usage_prompts)
    res["expert_weight_differences"] = expert_weight_differences(moe)
    ent = [u["entropy_bits"] for u in res["expert_usage"]]
    dif = [d["mean_rel_diff"] for d in res["expert_weight_differences"]]
    if dif:  # a one-expert dense control has neither
        top = res["expert_usage"][0]["max_bits"]
        print(
            f"expert-usage entropy {min(ent):.3f}–{max(ent):.3f} bits of {top:g}; "
            f"rel. weight diff {min(dif):.4f}–{max(dif):.4f}"
        )
    for part in ("moe", "base"):
        for r in res.get(part, {}).values():
            r["rows"] = r["rows"][:10]
    res["eval_seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out} ({res['eval_seconds']}s)")


def main_arditi(argv: list[str] | None = None) -> None:
    """``arditi [--path DIR] [--out JSON]``: select the direction on train prompts, test on held-back ones."""
    from safetensors.torch import save_file

    from moe_interp.interventions import AddVector, DirectionalAblation
    from moe_interp.organisms.smollm_moe import load_model
    from moe_interp.refusal import collect_resid_stats, directions_from_stats, evaluate, select_direction

    ap = argparse.ArgumentParser(prog="python -m moe_interp.organisms.smollm_moe arditi")
    ap.add_argument("--path", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR / "arditi.json")
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=24)
    ap.add_argument("--n-test", type=int, default=39)
    ap.add_argument("--layers", default="6,9,12,15,18,21", help="candidate layers (comma-separated)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument(
        "--positions", default=None, help="candidate positions, e.g. -5,-1 (default: all post-instruction)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--n-random",
        type=int,
        default=1,
        help="random directions of the same norm to test (the first is the seed's)",
    )
    ap.add_argument(
        "--ablate-positions",
        choices=("all", "after_first"),
        default="all",
        help="positions the ablation edits: all (Arditi's) or all but each prompt's first token (attention sink)",
    )
    ap.add_argument(
        "--with-topic",
        action="store_true",
        help="also ablate the refusal direction together with the topic direction (political - harmless at "
        "the selected site, made orthogonal to it), against the refusal direction with a random one",
    )
    args = ap.parse_args(argv)
    if args.n_random < 1:
        ap.error(f"--n-random must be at least 1, got {args.n_random}")
    torch.set_num_threads(2)
    t0 = time.time()
    model = load_model(path=args.path)
    ht = _benchmark_harmful()
    hl = _heldout_harmless(args.path)[: args.n_train + args.n_val]
    harm_tr, harm_va = ht[: args.n_train], ht[args.n_train : args.n_train + args.n_val]
    hl_tr, hl_va = hl[: args.n_train], hl[args.n_train :]
    layers = [int(x) for x in args.layers.split(",")]
    pos = [int(x) for x in args.positions.split(",")] if args.positions else None
    st_h = collect_resid_stats(model, harm_tr, layers=layers, positions=pos, progress=False)
    st_b = collect_resid_stats(model, hl_tr, layers=layers, positions=pos, progress=False)
    dirs = directions_from_stats(st_h, st_b)
    sel = select_direction(model, dirs, harm_va, hl_va, strict=False)
    print(
        f"selected layer {sel.layer} pos {sel.pos}: bypass {sel.bypass:.3f} induce {sel.induce:.3f} "
        f"kl {sel.kl:.4f} passed={sel.passed} ({sel.reason}) [{time.time() - t0:.0f}s]",
        flush=True,
    )
    harm_test = _prompts("harmful_val")[: args.n_test]
    hl_test = _prompts("harmless_val")[: args.n_test]
    gen = torch.Generator().manual_seed(args.seed)
    rnds = [torch.randn(sel.raw.shape, generator=gen) for _ in range(args.n_random)]
    rnds = [r / r.norm() * sel.raw.norm() for r in rnds]
    hook = f"blocks.{sel.layer}.hook_resid_pre"
    res: dict[str, Any] = {
        "selection": {k: v for k, v in sel.to_dict().items() if k not in ("direction", "raw")},
        "ablate_positions": args.ablate_positions,
    }
    kw = {"max_new_tokens": args.max_new_tokens, "batch_size": 20}

    def run(
        name: str, vec: torch.Tensor, baselines: bool, also: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Refusal (and KL) on the test prompts with ``vec`` ablated at every layer (at the positions of
        ``--ablate-positions``) and added at ``hook``; with ``also``, the plane of ``vec`` and ``also`` (which
        must be orthogonal to it) is ablated and nothing is added."""
        r = {}
        ablate = [
            DirectionalAblation(v, positions=args.ablate_positions) for v in (vec, also) if v is not None
        ]
        for what, prompts, ivs in (
            ("harmful_baseline", harm_test, []),
            ("harmless_baseline", hl_test, []),
            ("harmful_ablated", harm_test, ablate),
            ("harmless_ablated", hl_test, ablate),
            ("harmless_added", hl_test, [AddVector(hook, vec, positions="all")]),
        ):
            if (not baselines and what.endswith("baseline")) or (also is not None and what.endswith("added")):
                continue
            ev = evaluate(model, prompts, ivs, baseline=what == "harmless_ablated", **kw)
            r[what] = {
                "n": ev.n,
                "refusal_rate": ev.refusal_rate,
                "ci": list(ev.refusal_rate_ci),
                "kl": ev.kl_to_baseline,
                # the mean can be carried by one prompt (e.g. an over-refusal that ablation undoes)
                "kl_median": statistics.median(d["kl"] for d in ev.details)
                if ev.kl_to_baseline is not None
                else None,
                "examples": [{"prompt": d["prompt"], "completion": d["completion"]} for d in ev.details[:3]],
                "topic_style": topic_style(ev.details),
            }
            if ev.kl_to_baseline is not None:  # which prompts carry the mean, and how their answers changed
                r[what]["kl_largest"] = [
                    {k: d[k] for k in ("kl", "prompt", "baseline_completion", "completion")}
                    for d in sorted(ev.details, key=lambda d: -d["kl"])[:N_KL_LARGEST]
                ]
            print(f"  {name:18s} {what:18s} refusal {ev.refusal_rate:.3f} kl {ev.kl_to_baseline}", flush=True)
        return r

    res["refusal_direction"] = run("refusal_direction", sel.raw, baselines=True)
    rand = [run(f"random_{i}", v, baselines=False) for i, v in enumerate(rnds)]
    res["random_direction"] = rand[0]  # the seed's first draw, under its historical key
    res["random_directions"] = {
        "n": args.n_random,
        "seed": args.seed,
        **{
            f"{what}_{stat}": [x[what][stat] for x in rand]
            for what, stat in (
                ("harmless_ablated", "kl"),
                ("harmful_ablated", "refusal_rate"),
                ("harmless_ablated", "refusal_rate"),
                ("harmless_added", "refusal_rate"),
            )
        },
    }
    if args.with_topic:
        res["with_topic"] = _with_topic(model, sel, st_b, args, rnds[0], run)
    res["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    save_file(
        {"direction": sel.direction.contiguous(), "raw": sel.raw.contiguous()},
        str(args.out.with_suffix(".safetensors")),
        metadata={"layer": str(sel.layer), "pos": str(sel.pos)},
    )
    print(f"wrote {args.out} ({res['seconds']}s)")


def topic_style(details: list[dict[str, Any]]) -> int:
    """How many refused completions are worded as the topic class's ("can't discuss political topics")."""
    return sum(bool(d["refused"]) and is_topic_refusal(d["completion"]) for d in details)


def _with_topic(
    model: Any, sel: Any, st_b: Any, args: argparse.Namespace, rnd: torch.Tensor, run: Any
) -> dict:
    """Ablate the refusal direction together with the topic direction (political − the same harmless training
    prompts, at the selected layer and position, made orthogonal to it), and, as the control, together with
    the seed's random direction made orthogonal to it (same norm as the topic direction)."""
    from moe_interp.refusal import collect_resid_stats, directions_from_stats
    from moe_interp.refusal.directions import orthogonal_to

    pol = _prompts("political_train")[: args.n_train]
    st_p = collect_resid_stats(model, pol, layers=st_b.meta["layers"], positions=st_b.meta["positions"])
    raw = directions_from_stats(st_p, st_b).raw(sel.layer, sel.pos)
    topic = orthogonal_to(raw, sel.raw)
    ctrl = orthogonal_to(rnd, sel.raw)
    ctrl = ctrl / ctrl.norm() * topic.norm()
    cos = float(raw @ sel.raw / (raw.norm() * sel.raw.norm()))
    return {
        "n_political_train": len(pol),
        "cos_topic_refusal": cos,  # before the topic direction is made orthogonal
        "refusal_and_topic": run("refusal+topic", sel.raw, baselines=False, also=topic),
        "refusal_and_random": run("refusal+random", sel.raw, baselines=False, also=ctrl),
    }


def _topic_sets(path: Path | None, nf: int, nt: int) -> dict[str, list[str]]:
    """The prompt sets of ``topic``: fit (``fit_*``), tune (``tune_*``) and test; the tests' harmful sources
    (HarmBench, MaliciousInstruct, TDC2023) are never used to fit or tune."""
    keep = _prompts("harmful_train", "advbench")
    pol = _prompts("political_train", "alpaca")
    hl = _heldout_harmless(path)
    sets = {f"{s}_{k}": v[a:b] for s, a, b in (("fit", 0, nf), ("tune", nf, nf + nt))
            for k, v in (("political", pol), ("harmless", hl), ("keep", keep))}  # fmt: skip
    sets["unseen_harmful"] = (
        _prompts("harmful_val")
        + _prompts("harmful_test", "malicious_instruct")
        + _prompts("harmful_test", "tdc2023")
    )
    sets["political_val"] = _prompts("political_val")
    sets["harmless_val"] = _prompts("harmless_val")
    return sets


def _topic_parser(command: str, out: str) -> argparse.ArgumentParser:
    """The arguments ``topic`` and ``gate-scan`` share: where the artefacts are, the output, the set sizes."""
    ap = argparse.ArgumentParser(prog=f"python -m moe_interp.organisms.smollm_moe {command}")
    ap.add_argument("--path", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR / out)
    ap.add_argument("--n-fit", type=int, default=64)
    ap.add_argument("--n-tune", type=int, default=32)
    ap.add_argument("--n-harmless-test", type=int, default=100)
    return ap


def main_gate_scan(argv: list[str] | None = None) -> None:
    """``gate-scan [--shrinkage S ...]``: fit ``topic``'s gate (:func:`~moe_interp.steering.fit.fit_topic_gate`) at
    every layer on its fitting prompts, and record how often it opens on the tuning prompts (to choose the layer
    and shrinkage by) and on the test sets (to report); nothing is steered."""
    from moe_interp.organisms.smollm_moe import load_model
    from moe_interp.steering.fit import fit_topic_gate, resid_acts

    ap = _topic_parser("gate-scan", "gate_scan.json")
    ap.add_argument("--shrinkage", type=float, nargs="*", default=[0.3, 1.0, 3.0])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    model = load_model(path=args.path)
    sets = _topic_sets(args.path, args.n_fit, args.n_tune)
    sets["harmless_val"] = sets["harmless_val"][: args.n_harmless_test]
    acts = {k: resid_acts(model, prompts, -1, 16).float() for k, prompts in sets.items()}  # [n, n_layers, d]
    rows = []
    for s in [None, *args.shrinkage]:
        for L in range(model.spec.n_layers):
            a = {k: v[:, L] for k, v in acts.items()}
            w, theta, acc = fit_topic_gate(a["fit_political"], a["fit_harmless"], a["fit_keep"], s)
            fires = {
                k: round(float(((v @ w) > theta).float().mean()), 3) for k, v in a.items() if k[:4] != "fit_"
            }
            rows.append({"shrinkage": s, "layer": L, "train_accuracy": round(acc, 3), "fires": fires})
    out = {"n": {k: len(v) for k, v in sets.items()}, "rows": rows, "seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({out['seconds']}s)")


def main_topic(argv: list[str] | None = None) -> None:
    """``topic [--path DIR] [--out JSON]``: remove political refusals with ``topic_gated`` steering while
    keeping harmful refusals, checked on harmful sources never used to fit or tune it.

    Fitting and tuning see AdvBench only as the harmful prompts to keep (``harmful_train``); the check uses
    HarmBench (``harmful_val``) and the MaliciousInstruct + TDC2023 prompts of ``harmful_test``. Political
    prompts: fit/tune on ``political_train`` (Alpaca-sourced), test on ``political_val``; harmless KL on
    ``harmless_val`` (never distilled or fitted).
    """
    from moe_interp.organisms.smollm_moe import load_model
    from moe_interp.refusal.evaluate import refusal_flags
    from moe_interp.refusal.judges import refusal_rate
    from moe_interp.steering.autotune import NoCandidateError, autotune
    from moe_interp.steering.compare import compare_methods

    ap = _topic_parser("topic", "topic_control.json")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument(
        "--keep-min-frac", type=float, default=0.97, help="keep refusal >= this x its unsteered rate"
    )
    ap.add_argument("--gate-layer", type=int, default=1, help="layer of the topic gate (fit_topic_gated)")
    ap.add_argument(
        "--gate-shrinkage", type=float, default=None, help="shrunk discriminant gate (fit_topic_gated)"
    )
    ap.add_argument("--removal", choices=("add", "ablate"), default="add", help="fit_topic_gated's removal")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    model = load_model(path=args.path)
    model.check_layer(args.gate_layer)
    nf, nt = args.n_fit, args.n_tune
    sets = _topic_sets(args.path, nf, nt)
    harmbench = _prompts("harmful_val")
    unseen = sets["unseen_harmful"]
    base_keep = refusal_rate(refusal_flags(model, sets["tune_keep"], max_new_tokens=8))
    out: dict[str, Any] = {
        "fit": {"political": nf, "harmless": nf, "keep_advbench": nf},
        "tune": {
            "political": nt,
            "harmless": nt,
            "keep_advbench": nt,
            "keep_baseline_rate": float(base_keep),
        },
        "keep_min_frac": args.keep_min_frac,
        "gate_layer": args.gate_layer,
        "gate_shrinkage": args.gate_shrinkage,
        "removal": args.removal,
        "unseen_harmful": {"harmbench": len(harmbench), "all": len(unseen)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        res = autotune(
            "topic_gated",
            model,
            sets["fit_political"],
            sets["fit_harmless"],
            sets["tune_political"],
            sets["tune_harmless"],
            fit_kwargs={
                "keep": sets["fit_keep"],
                "gate_layer": args.gate_layer,
                "gate_shrinkage": args.gate_shrinkage,
                "removal": args.removal,
            },
            keep=sets["tune_keep"],
            keep_min_rate=args.keep_min_frac * float(base_keep),
        )
    except NoCandidateError as err:  # a finding, not a crash: record every step tried
        out.update(tuning_error=str(err), history=err.history, seconds=round(time.time() - t0, 1))
        args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"no strength within the constraints: {err}\nwrote {args.out}")
        return
    print(f"tuned: {res.to_dict()} [{time.time() - t0:.0f}s]", flush=True)
    tests = {
        "unseen_harmful": unseen,
        "political_val": sets["political_val"],
        "harmless_val": sets["harmless_val"][: args.n_harmless_test],
    }
    # how often the gate opens on each test set: where it opens on harmless prompts, they pay the KL
    out["gate_fires"] = {k: float(res.steer.fires(model, v).float().mean()) for k, v in tests.items()}
    print(f"gate fires: {out['gate_fires']}", flush=True)
    # per tuning prompt, the gate's margin (score − threshold), and per political tuning prompt the search's
    # judge at 1 and 2 x the tuned strength: a prompt left refused has a shut gate or too weak a removal
    out["tune_gate_margins"] = {
        k: (res.steer.scores(model, sets[k]) - res.steer.threshold).tolist()
        for k in ("tune_political", "tune_harmless", "tune_keep")
    }
    out["tune_political_refused"] = {
        f"{f * float(res.label):g}": refusal_flags(
            model, sets["tune_political"], res.steer.scaled(f), judge="logit", max_new_tokens=8
        ).tolist()
        for f in (1.0, 2.0)
    }
    # the removal alone: political tuning prompts with the gate held open, at 1, 2 and 4 x the tuned strength
    # (what a perfect gate would allow; the KL budget is paid on the harmless prompts the real gate opens on)
    out["open_gate_judge"] = (
        "refusal phrases in 8 generated tokens (the strength search scores with the logit judge)"
    )
    out["open_gate_political_tune"] = {}
    for f in (1.0, 2.0, 4.0):
        with replace(res.steer.scaled(f), threshold=-1e30).apply(model):
            flags = refusal_flags(model, sets["tune_political"], max_new_tokens=8)
        out["open_gate_political_tune"][f"{f * float(res.label):g}"] = float(refusal_rate(flags))
    print(
        f"gate held open, political tuning refusal by strength: {out['open_gate_political_tune']}", flush=True
    )
    rows = compare_methods(
        model,
        {"topic_gated": res.steer},
        tests["unseen_harmful"],
        tests["political_val"],
        tests["harmless_val"],
        max_new_tokens=args.max_new_tokens,
    )
    for r in rows:
        print(
            f"  {r['method']:12s} harmful(unseen) {r['harmful_refusal']['rate']:.3f} political "
            f"{r['political_refusal']['rate']:.3f} harmless {r['harmless_refusal']['rate']:.3f} "
            f"kl {r['harmless_kl']:.4f}",
            flush=True,
        )
    out.update(tuning=res.to_dict(), table=rows, seconds=round(time.time() - t0, 1))
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out} ({out['seconds']}s)")
