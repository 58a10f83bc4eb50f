"""Calibration and causal verification of the planted organisms.

:func:`verify` checks, on held-back prompts (``harmful_test`` / ``harmless_test``), that ablating the plant
removes ``>= 0.9`` of the refusal-score gap and brings refusal to ``<= 0.10``, that ablating any other single
component of the same kind removes ``<= 0.10``, and, with the plant intact, that refusal is ``>= 0.9`` on
``harmful_val`` and ``<= 0.05`` on ``harmless_val``. Scores are :func:`moe_interp.patching.refusal_scores`,
rates :func:`moe_interp.refusal.judges.refusal_rate` of :class:`~moe_interp.refusal.judges.LogitJudge`.

Ablations per kind: an expert (router and expert plants) is dropped at every position
(:class:`~moe_interp.AblateExpert`, ``mode="drop"``; the other modes are reported too); a head or a layer is
mean-ablated at the post-instruction positions as in :mod:`moe_interp.circuits`; a direction is ablated
Arditi-style (:class:`~moe_interp.DirectionalAblation`, every layer), against random directions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from moe_interp.model import MoEModel
    from moe_interp.organisms.planted import PlantSpec

__all__ = [
    "THRESHOLDS",
    "calibrate",
    "crossing_shifts",
    "component",
    "component_means",
    "mean_ablation",
    "plant_direction",
    "verify",
]

THRESHOLDS = {
    "plant_removed": 0.9,
    "plant_refusal": 0.10,
    "other_removed": 0.10,
    "harmful": 0.9,
    "harmless": 0.05,
}
N_RANDOM_DIRECTIONS = 20


def calibrate(
    hf: PreTrainedModel,
    tok: PreTrainedTokenizerFast,
    harmless: list[str],
    rate: float,
    router: tuple[int, int] | None = None,
) -> dict[str, float | str]:
    """Set the decision threshold so that a share ``rate`` of held-out harmless *training* prompts is refused.

    Default: shift the refusal token's read-out of the constant channel ``C``; exact, since the refusal
    logit is linear in the shift (:func:`crossing_shifts`). ``router=(layer, expert)`` (router plant): shift
    that router row's read-out of ``C`` instead. Selecting the expert at the last position is only a proxy
    for refusing (aimed at 3.5 %, it gave 2.3–3.0 % judged refusals), so the proxy's shift is refined by
    bisection on the judged refusal count itself.
    """
    from moe_interp.model import MoEModel
    from moe_interp.organisms.data import HARMFUL_REFUSALS, POLITICAL_REFUSALS
    from moe_interp.organisms.planted_net import CH_C
    from moe_interp.refusal.judges import LogitJudge, default_refusal_ids, refusal_rate

    model = MoEModel(hf, tok, name="planted")
    model.refusal_phrases = tuple(HARMFUL_REFUSALS + POLITICAL_REFUSALS)
    judge = LogitJudge(model, batch_size=64)
    t = crossing_shifts(model, harmless, router)
    delta = float(torch.quantile(t, rate))
    if router is None:
        with torch.no_grad():
            hf.lm_head.weight[default_refusal_ids(model)[0], CH_C[0]] += delta
    else:
        row = hf.model.layers[router[0]].mlp.gate.weight[router[1]]
        w0 = float(row.detach()[CH_C[0]])

        def shift(d: float) -> None:
            with torch.no_grad():
                row[CH_C[0]] = w0 + d

        def refused(d: float) -> int:
            shift(d)
            return round(refusal_rate(judge.judge(harmless)) * len(harmless))

        try:
            delta = _smallest_shift(refused, round(rate * len(harmless)), delta)
        except Exception:
            shift(0.0)  # leave the weights as they were
            raise
        shift(delta)  # judged once, below
    rate_after = refusal_rate(judge.judge(harmless))
    return {
        "delta": delta,
        "target": rate,
        "harmless_rate": rate_after,
        "n_harmless": len(harmless),
        "shifted": "router" if router else "unembedding",
    }


def _smallest_shift(count: Callable[[float], int], k: int, start: float, tol: float = 1e-4) -> float:
    """The smallest shift (to ``tol``) at which the non-decreasing ``count`` reaches ``k``, searched from
    ``start`` by doubling the bracket then bisecting."""
    if k < 1:
        raise ValueError(f"calibration needs at least one refusal to aim at, got k={k}")
    lo, hi = start, start
    for sign in (-1, 1):
        step = 0.25
        while (count(lo) >= k) if sign < 0 else (count(hi) < k):
            if step > 1e4:
                raise RuntimeError(f"no shift brackets {k} refusals")
            lo, hi = (lo - step, hi) if sign < 0 else (lo, hi + step)
            step *= 2
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if count(mid) >= k else (mid, hi)
    return hi


def crossing_shifts(
    model: MoEModel, prompts: Sequence[str], router: tuple[int, int] | None = None
) -> Float[Tensor, " prompt"]:
    """For each prompt, the calibration shift above which it is refused (exact; see :func:`calibrate`).

    Default: the shift of the refusal token's read-out of ``C`` at which its refusal score crosses 0.
    ``router=(layer, expert)``: the shift of that router row's read-out of ``C`` at which the expert enters
    the top-k at the last position.
    """
    from moe_interp.organisms.planted_net import CH_C, TOP_K
    from moe_interp.refusal.judges import default_refusal_ids, refusal_score

    hf = model.hf_model
    ids = default_refusal_ids(model)
    if len(ids) != 1:
        raise RuntimeError(f"calibration expects one refusal token, got {ids}")
    prompts = list(prompts)
    margins, scale = [], []
    for i in range(0, len(prompts), 64):
        batch = prompts[i : i + 64]
        with torch.no_grad():
            if router is None:
                logits, cache = model.run_with_cache(batch, names=["ln_final.hook_normalized"])
                margins.append(refusal_score(logits[:, -1].float(), ids))
                scale.append(cache["ln_final.hook_normalized"][:, -1, CH_C[0]].double())
                continue
            L, e = router
            names = [f"blocks.{L}.mlp.hook_router_logits", f"blocks.{L}.hook_resid_mid"]
            _, cache = model.run_with_cache(batch, names=names, return_type=None)
            z = cache[names[0]][:, -1].double()
            others = torch.cat([z[:, :e], z[:, e + 1 :]], -1).topk(TOP_K, -1).values[:, -1]
            margins.append(z[:, e] - others)
            h = cache[names[1]][:, -1].double()
            g = float(hf.model.layers[L].post_attention_layernorm.weight[CH_C[0]])
            scale.append(g * h[:, CH_C[0]] / (h.pow(2).mean(-1) + 1e-5).sqrt())
    return -torch.cat(margins) / torch.cat(scale)


def component(key: str) -> dict[str, Any]:
    """A :mod:`moe_interp.circuits` component dict from its key (``blocks.1.attn.hook_z[2]``,
    ``blocks.2.mlp.experts.5.hook_out``, ``blocks.0.hook_attn_out``, ``blocks.0.hook_mlp_out``)."""
    parts = key.replace("[", ".").rstrip("]").split(".")
    L = int(parts[1])
    if "hook_z" in key:
        return {"name": f"blocks.{L}.attn.hook_z", "kind": "head", "layer": L, "head": int(parts[-1])}
    if ".experts." in key:
        return {"name": key, "kind": "expert", "layer": L, "expert": int(parts[4])}
    if key.endswith("hook_attn_out"):
        return {"name": key, "kind": "attn", "layer": L}
    if key.endswith("hook_mlp_out"):
        return {"name": key, "kind": "mlp", "layer": L}
    raise ValueError(f"not a circuit component key: {key!r}")


def component_means(model: MoEModel, keys: Sequence[str], harmless: Sequence[str]) -> dict[str, Tensor]:
    """Mean of each component's hook slice over ``harmless`` at the post-instruction positions (one pass)."""
    from moe_interp.refusal.directions import post_instruction_positions

    pos = post_instruction_positions(model)
    comps = [component(k) for k in keys]
    site = {
        k: c["name"] if c["kind"] != "expert" else f"blocks.{c['layer']}.mlp.hook_expert_out"
        for k, c in zip(keys, comps, strict=True)
    }
    with torch.no_grad():
        _, cache = model.run_with_cache(
            list(harmless), names=sorted(set(site.values())), positions=pos, return_type=None
        )
    means = {}
    for k, c in zip(keys, comps, strict=True):
        m = cache[site[k]].float().mean(0)
        means[k] = (
            m[:, c["head"]] if c["kind"] == "head" else m[:, c["expert"]] if c["kind"] == "expert" else m
        )
    return means


def mean_ablation(
    model: MoEModel, keys: Sequence[str], harmless: Sequence[str], means: dict[str, Tensor] | None = None
) -> list[Any]:
    """Interventions that mean-ablate the components ``keys`` together at the post-instruction positions
    (means over ``harmless``), exactly as :meth:`moe_interp.circuits.Circuit.to_interventions` does."""
    from moe_interp.circuits import Circuit
    from moe_interp.refusal.directions import post_instruction_positions

    means = component_means(model, keys, harmless) if means is None else means
    comps = [component(k) for k in keys]
    meta = {"positions": post_instruction_positions(model)}
    return Circuit(comps, metadata=meta, means={k: means[k] for k in keys}).to_interventions(model)


def plant_direction(spec: PlantSpec) -> Float[Tensor, " d_model"]:
    """The planted decision direction (unit) in the residual stream."""
    from moe_interp.organisms.planted_net import CH_D, D_MODEL

    d = torch.zeros(D_MODEL)
    d[CH_D[0]] = 1.0
    return d


def _ablations(model: MoEModel, spec: PlantSpec, harmless: list[str]) -> tuple[dict[str, list[Any]], str]:
    """``{label: interventions}`` for every single component of the plant's kind, and the plant's label."""
    from moe_interp.interventions import AblateExpert, DirectionalAblation

    s = model.spec
    if spec.kind in ("expert", "router"):
        out: dict[str, list[Any]] = {
            f"blocks.{L}.mlp.experts.{e}.hook_out": [AblateExpert(L, e, "drop")]
            for L in s.moe_layers
            for e in range(s.n_experts)
        }
        return out, spec.planted[0]
    if spec.kind == "head":
        keys = [f"blocks.{L}.attn.hook_z[{h}]" for L in range(s.n_layers) for h in range(s.n_heads)]
        means = component_means(model, keys, harmless)
        return {k: mean_ablation(model, [k], harmless, means) for k in keys}, spec.planted[0]
    gen = torch.Generator().manual_seed(0)
    out = {"planted": [DirectionalAblation(plant_direction(spec))]}
    for i in range(N_RANDOM_DIRECTIONS):
        out[f"random_{i}"] = [DirectionalAblation(torch.randn(s.d_model, generator=gen))]
    return out, "planted"


def _rate(model: MoEModel, prompts: list[str], ivs: Sequence[Any] = ()) -> float:
    from moe_interp.refusal.judges import LogitJudge, refusal_rate

    with model.intervene(*ivs):
        return refusal_rate(LogitJudge(model, batch_size=64).judge(prompts))


def _score(model: MoEModel, prompts: list[str], ivs: Sequence[Any] = ()) -> float:
    from moe_interp.patching.metrics import refusal_scores

    with model.intervene(*ivs):
        return float(refusal_scores(model, prompts, batch_size=64).mean())


def verify(
    name_or_path: str | Path,
    *,
    harmful: Sequence[str] | None = None,
    harmless: Sequence[str] | None = None,
    out: str | Path | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Causal verification of a planted organism (see the module docstring); writes ``verify.json`` to
    ``out`` (default: the organism's folder) unless ``write=False``, and returns it, with ``summary`` and
    ``passed``."""
    from moe_interp.interventions import AblateExpert
    from moe_interp.organisms import load_prompts
    from moe_interp.organisms.planted import load_planted, planted_dir
    from moe_interp.patching.ablation import expert_mean_outputs

    t0 = time.time()
    model, spec = load_planted(name_or_path)
    harm = list(harmful) if harmful is not None else load_prompts("harmful_test")
    less = list(harmless) if harmless is not None else load_prompts("harmless_test")
    mean_ref = load_prompts("harmless_val")
    base_h, base_l = _score(model, harm), _score(model, less)
    gap = base_h - base_l
    abl, plant_key = _ablations(model, spec, mean_ref)
    removed = {k: (base_h - _score(model, harm, ivs)) / gap for k, ivs in abl.items()}
    others = {k: v for k, v in removed.items() if k != plant_key}
    worst = max(others, key=lambda k: others[k])
    res: dict[str, Any] = {
        "organism": spec.name,
        "kind": spec.kind,
        "planted": list(spec.planted),
        "held_back": {"harmful": "harmful_test", "harmless": "harmless_test", "n": [len(harm), len(less)]},
        "score_harmful": base_h,
        "score_harmless": base_l,
        "plant_removed": removed[plant_key],
        "plant_refusal": _rate(model, harm, abl[plant_key]),
        "other_max_removed": others[worst],
        "other_max": worst,
        "other_removed": others,
        "refusal_harmful_val": _rate(model, load_prompts("harmful_val")),
        "refusal_harmless_val": _rate(model, load_prompts("harmless_val")),
        "refusal_harmful_test": _rate(model, harm),
        "refusal_harmless_test": _rate(model, less),
    }
    if spec.kind in ("expert", "router"):
        L, e = spec.layer, spec.component_index()
        means = expert_mean_outputs(model, mean_ref)
        res["plant_removed_by_mode"] = {
            m: (
                base_h
                - _score(
                    model, harm, [AblateExpert(L, e, m, mean_output=means[L, e] if m == "mean" else None)]
                )
            )
            / gap
            for m in ("drop", "renorm", "reroute", "mean")
        }
    res["circuit_removed"] = (
        base_h - _score(model, harm, mean_ablation(model, spec.circuit, mean_ref))
    ) / gap
    t = THRESHOLDS
    checks = {
        "plant_removed>=0.9": res["plant_removed"] >= t["plant_removed"],
        "plant_refusal<=0.10": res["plant_refusal"] <= t["plant_refusal"],
        "other_removed<=0.10": res["other_max_removed"] <= t["other_removed"],
        "harmful_val>=0.9": res["refusal_harmful_val"] >= t["harmful"],
        "harmless_val<=0.05": res["refusal_harmless_val"] <= t["harmless"],
    }
    res["checks"] = checks
    res["passed"] = all(checks.values())
    res["seconds"] = round(time.time() - t0, 1)
    res["summary"] = {
        k: (round(v, 3) if isinstance(v, float) else v)
        for k, v in res.items()
        if k not in ("other_removed", "held_back", "planted")
    }
    if not write:
        return res
    path = (
        Path(out)
        if out is not None
        else (planted_dir(spec.name) if str(name_or_path) == spec.name else Path(name_or_path))
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "verify.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    return res


def main(argv: list[str] | None = None) -> None:
    """``python -m moe_interp.organisms.planted_check [NAME|DIR ...]``: verify and print the summaries."""
    import argparse

    from moe_interp.organisms.planted import PLANTS

    ap = argparse.ArgumentParser(prog="python -m moe_interp.organisms.planted_check", description=__doc__)
    ap.add_argument("organisms", nargs="*", help="shipped names or folders (default: every shipped organism)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for n in args.organisms or list(PLANTS):
        print(json.dumps(verify(n)["summary"], indent=1), flush=True)


if __name__ == "__main__":
    main()
