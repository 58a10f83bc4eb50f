"""Circuit-discovery benchmark on the planted-mechanism organisms (``moe-interp benchmark``).

Every discovery method runs **blind** (it gets the model and the prompts, never the plant) on each planted
organism of :mod:`moe_interp.organisms.planted`; the planted component is then looked up in the method's
ranking of candidates of its kind. A method *matches* a plant when the plant is a candidate of the method's
kind and the method's premise holds for it (:data:`MATCHES`); ranks are reported wherever the plant is a
candidate, and ``null`` where it is not (e.g. direction selection on an expert plant).

Methods (finding prompts: ``n_pairs`` harmful / harmless validation prompts; held-out: test prompts):

- ``activation_patching``: denoising patch of each expert's output (``patch_experts``) or head's ``z``
  (``patch_heads``) at the post-instruction positions; score = restored fraction;
- ``attribution_linear`` / ``attribution_ig``: the same patches estimated by attribution patching (plain
  gradient; integrated gradients);
- ``ablation_<mode>``: exhaustive single-expert ablation (drop / renorm / reroute / mean); score = drop of
  the refusal score;
- ``router_steering``: SteerMoE router steering, one expert deactivated at a time; score = drop;
- ``routing_risk_difference``: P(selected | harmful) − P(selected | harmless) over all positions;
- ``routing_patching``: patch one MoE layer's routing decision (candidates: layers);
- ``direction_selection``: difference-of-means candidates at every layer × post-instruction position,
  Arditi selection (kept candidates by bypass score, then the filtered ones); a candidate is the plant when
  its cosine with the planted direction is ``>= 0.9``;
- ``circuit``: :func:`moe_interp.circuits.locate_refusal_circuit` with the pipeline's defaults (attribution
  ranking, greedy selection, target 0.8); precision and recall against the plant's ground-truth circuit,
  faithfulness on the held-out prompts.

``rank`` is pessimistic under ties (the number of candidates scoring at least as high as the plant); ``top1``
is ``rank == 1``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moe_interp.model import MoEModel
    from moe_interp.organisms.planted import PlantSpec

__all__ = ["MATCHES", "METHODS", "format_table", "plot_benchmark", "rank_of", "run_benchmark"]

METHODS: tuple[str, ...] = (
    "activation_patching",
    "attribution_linear",
    "attribution_ig",
    "ablation_drop",
    "ablation_renorm",
    "ablation_reroute",
    "ablation_mean",
    "router_steering",
    "routing_risk_difference",
    "routing_patching",
    "direction_selection",
)
#: plant kind -> methods whose premise holds for it (the "matching family")
MATCHES: dict[str, tuple[str, ...]] = {
    "expert": (
        "activation_patching",
        "attribution_linear",
        "attribution_ig",
        "ablation_drop",
        "ablation_renorm",
        "ablation_reroute",
        "ablation_mean",
        "router_steering",
    ),
    "router": (
        "activation_patching",
        "attribution_linear",
        "attribution_ig",
        "ablation_drop",
        "ablation_renorm",
        "ablation_reroute",
        "router_steering",
        "routing_risk_difference",
        "routing_patching",
    ),
    "head": ("activation_patching", "attribution_linear", "attribution_ig"),
    "direction": ("direction_selection",),
}
COSINE_MATCH = 0.9


def rank_of(scores: dict[str, float], plant: str) -> int:
    """Pessimistic 1-based rank of ``plant`` (candidates scoring at least as high, itself included). NaN is the
    worst score: a NaN plant ranks last, a NaN rival ranks below it."""
    s = scores[plant]
    if s != s:
        return len(scores)
    return sum(1 for v in scores.values() if v >= s)


def _grid(values: Float[Tensor, "n_layers width"], fmt: str, layers: Sequence[int]) -> dict[str, float]:
    return {fmt.format(L=L, i=i): float(values[L, i]) for L in layers for i in range(values.shape[1])}


def _expert_key() -> str:
    return "blocks.{L}.mlp.experts.{i}.hook_out"


def _scores(
    model: MoEModel, harmful: list[str], harmless: list[str], progress: bool
) -> dict[str, Callable[[], dict[str, float]]]:
    """Lazy score functions ``{method: () -> {candidate: score}}``; higher = more important. Each method's
    candidates are fixed by the method, never by the plant (blind): patching and attribution rank every head
    and every routed expert together, the expert methods every routed expert, routing patching every MoE
    layer's router."""
    from moe_interp.interventions import SteerRouter
    from moe_interp.patching import (
        attribution_patching,
        expert_ablation_sweep,
        expert_mean_outputs,
        patch_experts,
        patch_heads,
        patch_routing,
        refusal_scores,
        routing_risk_difference,
    )

    s = model.spec
    moe = list(s.moe_layers)
    hfmt, all_layers = "blocks.{L}.attn.hook_z[{i}]", list(range(s.n_layers))
    fmt = _expert_key()

    def attribution(method: str) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            res = attribution_patching(
                model, harmful, harmless, ("heads", "experts"), method=method, progress=progress
            )
            return {**_grid(res["heads"].values, hfmt, all_layers), **_grid(res["experts"].values, fmt, moe)}

        return run

    out: dict[str, Callable[[], dict[str, float]]] = {
        "activation_patching": lambda: {
            **_grid(patch_heads(model, harmful, harmless, progress=progress).values, hfmt, all_layers),
            **_grid(patch_experts(model, harmful, harmless, progress=progress).values, fmt, moe),
        },
        "attribution_linear": attribution("linear"),
        "attribution_ig": attribution("ig"),
        "routing_risk_difference": lambda: _grid(routing_risk_difference(model, harmful, harmless), fmt, moe),
        "routing_patching": lambda: {
            f"blocks.{L}.mlp.hook_router_logits": float(v)
            for L, v in enumerate(patch_routing(model, harmful, harmless, progress=progress).values)
            if L in moe
        },
    }
    means = expert_mean_outputs(model, harmless)

    def ablation(mode: str) -> Callable[[], dict[str, float]]:
        return lambda: _grid(
            -expert_ablation_sweep(
                model, harmful, mode, mean_outputs=means if mode == "mean" else None, progress=progress
            ).effect,
            fmt,
            moe,
        )

    for mode in ("drop", "renorm", "reroute", "mean"):
        out[f"ablation_{mode}"] = ablation(mode)

    def steer() -> dict[str, float]:
        base = float(refusal_scores(model, harmful).mean())
        res = {}
        for L in moe:
            for e in range(s.n_experts):
                with model.intervene(SteerRouter(L, deactivate=[e])):
                    res[fmt.format(L=L, i=e)] = base - float(refusal_scores(model, harmful).mean())
        return res

    out["router_steering"] = steer
    return out


def _direction_method(
    model: MoEModel, spec: PlantSpec, harmful: list[str], harmless: list[str]
) -> dict[str, Any]:
    """Difference-of-means candidates + Arditi selection; rank of the first candidate matching the plant."""
    from moe_interp.organisms.planted_check import plant_direction
    from moe_interp.refusal.directions import collect_resid_stats, directions_from_stats
    from moe_interp.refusal.selection import select_direction

    dirs = directions_from_stats(
        collect_resid_stats(model, harmful, progress=False),
        collect_resid_stats(model, harmless, progress=False),
    )
    sel = select_direction(model, dirs, harmful, harmless, strict=False)
    d = plant_direction(spec)
    order = sorted(
        sel.table, key=lambda r: (not r["kept"], r["bypass"] if r["bypass"] == r["bypass"] else 1e9)
    )
    cos = {
        (r["layer"], r["pos"]): float(
            torch.nn.functional.cosine_similarity(dirs.raw(r["layer"], r["pos"]), d, 0)
        )
        for r in order
    }
    hits = [i for i, r in enumerate(order) if abs(cos[(r["layer"], r["pos"])]) >= COSINE_MATCH]
    chosen = cos[(sel.layer, sel.pos)]
    return {
        "rank": hits[0] + 1 if hits else None,
        "top1": abs(chosen) >= COSINE_MATCH,
        "top": f"blocks.{sel.layer}.hook_resid_pre@{sel.pos}",
        "cosine_top": chosen,
        "n_candidates": len(order),
        "passed_filters": sel.passed,
    }


def _circuit(
    model: MoEModel,
    spec: PlantSpec,
    prompts: dict[str, list[str]],
    n_random: int,
    refine: bool,
    progress: bool,
) -> dict[str, Any]:
    from moe_interp.circuits import locate_refusal_circuit

    c = locate_refusal_circuit(
        model,
        prompts["harmful"],
        prompts["harmless"],
        heldout_harmful=prompts["heldout_harmful"],
        heldout_harmless=prompts["heldout_harmless"],
        selection="greedy",
        refine=refine,
        n_random=n_random,
        progress=progress,
    )
    keys = [_ckey(x) for x in c.components]
    truth = set(spec.circuit)
    hit = len(truth & set(keys))
    ranking = [_ckey(x) for x in c.ranking]
    f = c.faithfulness
    return {
        "components": keys,
        "precision": hit / len(keys) if keys else 0.0,
        "recall": hit / len(truth),
        "faithfulness": f["circuit"],
        "faithfulness_ci": f["circuit_ci"],
        "random": f["random"],
        "random_same_kinds": f["random_same_kinds"],
        "finding_curve": f["finding_curve"],
        "refined": f.get("refined", []),
        "truth": sorted(truth),
        "truth_rank_in_ranking": {t: ranking.index(t) + 1 for t in truth if t in ranking},
        "ranking_top5": [
            [k, round(float(x["effect"]), 3)] for k, x in zip(ranking[:5], c.ranking[:5], strict=False)
        ],
    }


def _ckey(c: dict[str, Any]) -> str:
    return f"{c['name']}[{c['head']}]" if c["kind"] == "head" else c["name"]


def benchmark_organism(
    name: str | Path,
    n_pairs: int = 32,
    n_heldout: int = 64,
    methods: Sequence[str] = METHODS,
    n_random: int = 20,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``methods`` (default: all) and the circuit on one planted organism (a shipped name or a folder)."""
    from moe_interp.organisms import held_back_prompts
    from moe_interp.organisms.planted import load_planted

    t0 = time.time()
    model, spec = load_planted(name)
    prompts = {
        "harmful": held_back_prompts("harmful_val", n_pairs),
        "harmless": held_back_prompts("harmless_val", n_pairs),
        "heldout_harmful": held_back_prompts("harmful_test", n_heldout),
        "heldout_harmless": held_back_prompts("harmless_test", n_heldout),
    }
    h, s = prompts["harmful"], prompts["harmless"]
    out: dict[str, Any] = {}
    plant = spec.planted[0]
    # every method runs on every organism, with its own candidates (direction selection too; only its score
    # needs the plant's direction, so it is scored on the direction plant alone)
    fns = _scores(model, h, s, progress)
    for m in methods:
        t1 = time.time()
        row: dict[str, Any] = {"matches": m in MATCHES[spec.kind], "rank": None, "top1": None}
        if m == "direction_selection" and spec.kind == "direction":
            row.update(_direction_method(model, spec, h, s))
        elif m in fns:
            sc = fns[m]()
            target = spec.planted[1] if m == "routing_patching" and len(spec.planted) > 1 else plant
            if target in sc:
                row["rank"] = rank_of(sc, target)
                row["top1"] = row["rank"] == 1
                row["n_candidates"] = len(sc)
                # the top is the plant only when it ranks first; under a tie it is the rival that ties it
                rivals = [k for k in sc if k != target and sc[k] == sc[k]]
                best = target if row["rank"] == 1 or not rivals else max(rivals, key=lambda k: sc[k])
                row["top"], row["top_score"], row["plant_score"] = best, sc[best], sc[target]
        row["seconds"] = round(time.time() - t1, 1)
        out[m] = row
    t1 = time.time()
    circuit = _circuit(model, spec, prompts, n_random, True, progress)
    circuit["seconds"] = round(time.time() - t1, 1)
    # the greedy set before refinement (locate's current default): undo the swaps
    back = {sw["to"]: sw["from"] for sw in circuit["refined"]}
    plain = [back.get(k, k) for k in circuit["components"]]
    hit = len(set(spec.circuit) & set(plain))
    unrefined = {"components": plain, "precision": hit / len(plain), "recall": hit / len(spec.circuit)}
    return {
        "name": spec.name,
        "kind": spec.kind,
        "planted": list(spec.planted),
        "methods": out,
        "circuit": circuit,
        "circuit_unrefined": unrefined,
        "seconds": round(time.time() - t0, 1),
    }


def run_benchmark(
    names: Sequence[str] | None = None, n_pairs: int = 32, n_heldout: int = 64, progress: bool = False
) -> dict[str, Any]:
    """The benchmark over the planted organisms (all shipped ones by default)."""
    from moe_interp.organisms.planted import PLANTS

    t0, c0 = time.time(), time.process_time()
    orgs = [benchmark_organism(n, n_pairs, n_heldout, progress=progress) for n in (names or list(PLANTS))]
    return {
        "organisms": orgs,
        "matches": {k: list(v) for k, v in MATCHES.items()},
        "settings": {"n_pairs": n_pairs, "n_heldout": n_heldout, "threads": torch.get_num_threads()},
        "seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),  # summed over threads
    }


# ------------------------------------------------------------------------------------------ report
def _cell(row: dict[str, Any]) -> str:
    if row.get("rank") is None:
        return "–" if not row.get("matches") else "miss"
    mark = "**1**" if row["rank"] == 1 else str(row["rank"])
    return mark + ("" if row["matches"] else " ·")


def format_table(result: dict[str, Any]) -> str:
    """Markdown: rank of the plant per method (rows) and organism (columns), then the circuit rows."""
    orgs = result["organisms"]
    head = "| method | " + " | ".join(f"{o['name']} ({o['kind']})" for o in orgs) + " |"
    lines = [head, "|---" * (len(orgs) + 1) + "|"]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(_cell(o["methods"][m]) for o in orgs) + " |")
    for label, key, fmt in (
        ("circuit precision", "precision", "{:.2f}"),
        ("circuit recall", "recall", "{:.2f}"),
        ("circuit faithfulness (held-out)", "faithfulness", "{:.2f}"),
        ("circuit random sets", "random", "{:.2f}"),
        ("circuit random sets of the circuit's kinds", "random_same_kinds", "{:.2f}"),
    ):
        lines.append(f"| {label} | " + " | ".join(fmt.format(o["circuit"][key]) for o in orgs) + " |")
    cis = " | ".join("[{:.2f}, {:.2f}]".format(*o["circuit"]["faithfulness_ci"]) for o in orgs)
    lines.append(f"| circuit faithfulness, 95% CI | {cis} |")
    lines.append("| circuit | " + " | ".join("<br>".join(o["circuit"]["components"]) for o in orgs) + " |")
    for label, key in (("precision", "precision"), ("recall", "recall")):
        cells = " | ".join(f"{o['circuit_unrefined'][key]:.2f}" for o in orgs)
        lines.append(f"| circuit without refinement: {label} | {cells} |")
    cells = " | ".join("<br>".join(o["circuit_unrefined"]["components"]) for o in orgs)
    lines.append(f"| circuit without refinement | {cells} |")
    lines.append("")
    lines.append(
        "Rank of the planted component among the method's candidates (1 = top, bold; ties count against the "
        "plant); every method runs blind, with candidates of its own kinds (patching and attribution: every head "
        "and routed expert together); `·` = the method does not "
        "match this plant (reported anyway); `–` = the plant is not a candidate of the method's kind; `miss` = "
        "a matching method whose candidates do not contain the plant (direction: no candidate with cosine >= 0.9). "
        "Circuit: `locate_refusal_circuit` (attribution ranking, greedy selection, target 0.8) with `refine=True`; "
        "the rows without refinement are the same greedy set before whole layers are replaced by single heads / "
        "experts."
    )
    return "\n".join(lines)


def plot_benchmark(result: dict[str, Any]) -> Figure:
    """Heat map of ranks (methods × organisms; 1 is best), circuit precision / recall in the column labels.

    Drawn by :func:`moe_interp.figures.benchmark.plot_benchmark` (colour-blind-safe, the library's style).
    """
    from moe_interp.figures.benchmark import plot_benchmark as draw

    return draw(result)


def _benchmark(args: argparse.Namespace) -> int:
    """``moe-interp benchmark`` handler."""
    from moe_interp.organisms.planted import PLANTS
    from moe_interp.runs import check_out_path

    for name in args.organisms or []:  # checked before the run, not after it
        if name not in PLANTS and not Path(name).is_dir():
            raise InputError(
                f"unknown planted organism {name!r}; expected one of {', '.join(PLANTS)} or a folder written "
                "by `python -m moe_interp.organisms.planted --out DIR`."
            )
    if args.out:
        check_out_path(Path(args.out))
    torch.set_num_threads(args.threads)
    res = run_benchmark(args.organisms or None, args.n_pairs, progress=False)
    if args.out:
        from moe_interp.plotting import save_figure

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "benchmark.md").write_text(format_table(res) + "\n")
        save_figure(plot_benchmark(res), out / "benchmark")
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(format_table(res))
        print(f"\n{res['seconds']:.0f} s")
    return 0
