"""The refusal-circuit pipeline behind ``moe-interp locate``.

Stages run in order; each one's result is cached in ``DIR/cache/<stage>.json`` + ``.safetensors`` together
with a fingerprint of everything it depends on (model weights, prompts, configuration, library version and
source code; :mod:`moe_interp.runs`). ``--resume`` reuses a stage only when its fingerprint matches, so an
interrupted run never mixes stale results; a folder holding another run's results is refused unless
``--force`` is given, and a folder holding files the tool did not write is refused always.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import moe_interp
from moe_interp.pipeline_report import left_out, write_figures, write_report
from moe_interp.runs import (  # re-exported: the pipeline's run state and output-folder safety
    RUN_FILE,
    Run,
    check_out_dir,
    hash_code,
    hash_model,
    hash_prompts,
    locked,
    prepare_out_dir,
)

__all__ = ["RUN_FILE", "Run", "hash_code", "hash_model", "hash_prompts", "prepare_out_dir", "run_pipeline"]


# ------------------------------------------------------------------------------------------ data


def _split3(prompts: list[str], n_train: int, n_val: int, n_test: int, seed: int) -> tuple[list, list, list]:
    import random

    items = list(prompts)
    random.Random(seed).shuffle(items)
    if len(items) < 3:
        raise ValueError(
            f"A prompt file needs at least 3 prompts to split into train/val/test, got {len(items)}."
        )
    n_tr = min(n_train, max(1, len(items) // 2))
    n_va = min(n_val, max(1, (len(items) - n_tr) // 2))
    return items[:n_tr], items[n_tr : n_tr + n_va], items[n_tr + n_va : n_tr + n_va + n_test]


def choose_prompts(
    model: Any, harmful_file: str | None, harmless_file: str | None, cfg: Any
) -> dict[str, list[str]]:
    """Prompt sets of the run: the organism's bundled splits (drawn evenly across their benchmark sources; no
    held-back prompt in an earlier split), or the given files split train/val/test. With ``n_gate_train`` set,
    ``harmful_gate`` / ``harmless_gate`` are that many training prompts, the ``n_train`` ones first."""
    from moe_interp.refusal.prompts_io import load_prompt_file

    sets: dict[str, list[str]] = {}
    n_gate = cfg.n_gate_train
    if harmful_file is None or harmless_file is None:
        from moe_interp.organisms import balanced_prompts, held_back_prompts

        for cls in ("harmful", "harmless", "political"):
            sets[f"{cls}_train"] = balanced_prompts(f"{cls}_train", cfg.n_train)
            sets[f"{cls}_val"] = held_back_prompts(f"{cls}_val", cfg.n_val)
            sets[f"{cls}_test"] = held_back_prompts(f"{cls}_test", cfg.n_test)
            if n_gate is not None and cls != "political":
                sets[f"{cls}_gate"] = balanced_prompts(f"{cls}_train", n_gate)
    for cls, path in (("harmful", harmful_file), ("harmless", harmless_file)):
        if path is not None:
            tr, va, te = _split3(
                load_prompt_file(path), max(cfg.n_train, n_gate or 0), cfg.n_val, cfg.n_test, cfg.seed
            )
            sets.update({f"{cls}_train": tr[: cfg.n_train], f"{cls}_val": va, f"{cls}_test": te})
            if n_gate is not None:
                sets[f"{cls}_gate"] = tr
    return sets


# ---------------------------------------------------------------------------------------- stages


#: the batch size of the baseline and refusal-edit evaluations: the same, so that the unedited completions of
#: the one are the other's baseline (padding changes the numbers)
EVAL_BATCH = 16


def stage_baseline(run: Run) -> dict[str, Any]:
    """Refusal of the unedited model on every held-back set (greedy generation + logit score)."""
    from moe_interp.refusal.evaluate import evaluate

    out = {}
    for key in sorted(run.prompts):
        if key.endswith("_test") and run.prompts[key]:
            res = evaluate(
                run.model,
                run.prompts[key],
                max_new_tokens=run.config.max_new_tokens,
                baseline=False,
                batch_size=EVAL_BATCH,
            )
            out[key] = res.to_dict(details=False)
            run.memo[f"unedited_generations:{key}"] = res.generations  # refusal_edits' baseline completions
    return out


def stage_directions(run: Run) -> dict[str, Any]:
    """Difference-of-means candidates at every layer × post-instruction position, then Arditi selection."""
    from moe_interp.refusal.directions import collect_resid_stats, directions_from_stats
    from moe_interp.refusal.selection import select_direction

    cfg, p = run.config, run.prompts
    layers = cfg.layer_range(run.model.spec.n_layers)
    kw = dict(layers=layers, positions=cfg.positions, batch_size=cfg.batch_size, progress=True)
    harmful = collect_resid_stats(run.model, p["harmful_train"], **kw)
    harmless = collect_resid_stats(run.model, p["harmless_train"], **kw)
    dirs = directions_from_stats(harmful, harmless)
    sel = select_direction(
        run.model,
        dirs,
        p["harmful_val"],
        p["harmless_val"],
        kl_threshold=cfg.kl_threshold,
        prune_last_frac=cfg.prune_last_frac,
        batch_size=cfg.batch_size,
        strict=False,
        progress=True,
    )
    return {"selection": sel.to_dict(), "direction": sel.direction, "raw": sel.raw}


def stage_refusal_edits(run: Run) -> dict[str, Any]:
    """Directional ablation, activation addition and weight orthogonalisation on held-back prompts."""
    from moe_interp.interventions import AddVector, DirectionalAblation
    from moe_interp.refusal.evaluate import evaluate
    from moe_interp.refusal.orthogonalize import orthogonalize

    d = run.results["directions"]
    sel, direction, raw = d["selection"], d["direction"], d["raw"]
    n_new = run.config.max_new_tokens
    p = run.prompts
    ablate = [DirectionalAblation(direction)]
    add = [AddVector(f"blocks.{sel['layer']}.hook_resid_pre", raw, coeff=1.0)]
    jobs: list[tuple[str, str, str, list[Any]]] = [
        ("ablation_harmful", "directional ablation", "harmful_test", ablate),
        ("ablation_harmless", "directional ablation", "harmless_test", ablate),
        ("addition_harmless", "activation addition", "harmless_test", add),
    ]
    out: dict[str, Any] = {}
    # the unedited completions of each split are generated once: by the baseline stage unless it was resumed
    base_gens: dict[str, list[Any]] = {
        split: run.memo[f"unedited_generations:{split}"]
        for split in ("harmful_test", "harmless_test")
        if f"unedited_generations:{split}" in run.memo
    }
    for i, (key, label, split, edits) in enumerate(jobs, 1):
        run.log(f"[refusal_edits] {i}/4 {label} on {split} ({len(p[split])} prompts)")
        out[key] = evaluate(
            run.model,
            p[split],
            edits,
            max_new_tokens=n_new,
            baseline_generations=base_gens.get(split),
            batch_size=EVAL_BATCH,
        )
        base_gens[split] = out[key].baseline_generations
    run.log(f"[refusal_edits] 4/4 orthogonalised weights on harmful_test ({len(p['harmful_test'])} prompts)")
    ortho = orthogonalize(run.model, direction)
    out["orthogonalized_harmful"] = evaluate(
        ortho,
        p["harmful_test"],
        (),
        max_new_tokens=n_new,
        base_model=run.model,
        baseline_generations=base_gens["harmful_test"],
        batch_size=EVAL_BATCH,
    )
    ids = run.model.tokenize(p["harmful_test"][:8])
    with run.model.intervene(*ablate):
        hooked = run.model.forward(ids)
    real = ids["attention_mask"].bool()  # padded positions carry no prompt: their logits are not compared
    out_max = float((ortho.forward(ids) - hooked).abs()[real].max())
    res: dict[str, Any] = {k: v.to_dict(details=False) for k, v in out.items()}
    res["orthogonalized_vs_hooks_max_logit_diff"] = out_max
    return res


def stage_routing(run: Run) -> dict[str, Any]:
    """Routing statistics: SteerMoE risk difference and top-1 % difference over the last 5 positions."""
    from moe_interp.patching.routing import routing_risk_difference, top1_percentage_difference

    p = run.prompts
    return {
        "risk_difference": routing_risk_difference(run.model, p["harmful_train"], p["harmless_train"]),
        "top1_pct_difference": top1_percentage_difference(run.model, p["harmful_train"], p["harmless_train"]),
    }


def stage_patching(run: Run) -> dict[str, Any]:
    """Activation patching (resid, heads, experts), expert ablation sweep, attribution vs exhaustive."""
    from moe_interp.patching import (
        attribution_patching,
        compare_to_exhaustive,
        expert_ablation_attribution,
        expert_ablation_sweep,
        patch_experts,
        patch_heads,
        patch_resid,
        routing_predicts_ablation,
    )

    n = run.config.n_val
    h, s = run.prompts["harmful_val"][:n], run.prompts["harmless_val"][:n]
    model = run.model
    if run.config.patching == "attribution":
        return _patching_by_attribution(run, h, s)
    resid = patch_resid(model, h, s, positions="all")
    heads = patch_heads(model, h, s)
    res: dict[str, Any] = {"resid": resid, "heads": heads}
    if model.spec.is_moe:
        experts = patch_experts(model, h, s)
        attr = attribution_patching(model, h, s, kinds=("experts",))["experts"]
        moe = torch.zeros_like(experts.values, dtype=torch.bool)
        moe[list(model.spec.moe_layers)] = True
        sweep = expert_ablation_sweep(model, h, mode="drop")
        sweep_attr = expert_ablation_attribution(model, h, mode="drop")
        res.update(
            experts=experts,
            attribution=attr,
            attribution_vs_patching=compare_to_exhaustive(attr, experts, moe),
            ablation=sweep,
            ablation_attribution=sweep_attr,
            attribution_vs_ablation=compare_to_exhaustive(sweep_attr, sweep.effect, moe),
            routing_vs_ablation_spearman=routing_predicts_ablation(
                run.results["routing"]["risk_difference"], sweep.effect, model.spec.moe_layers
            ),
        )
    return res


def _patching_by_attribution(run: Run, h: list[str], s: list[str]) -> dict[str, Any]:
    """Attribution patching of every resid position, head and expert (one forward + backward per batch);
    the exhaustive single-expert sweep only on the ``patching_top_n`` experts ranked highest by ablation
    attribution, so large models stay within a CPU budget while the ranking is still checked on them."""
    from moe_interp.patching import (
        attribution_patching,
        compare_to_exhaustive,
        expert_ablation_attribution,
        expert_ablation_sweep,
        routing_predicts_ablation,
    )

    model = run.model
    # the positions of the exhaustive mode: resid at every position, heads and experts at the defaults
    kinds = ("heads", "experts") if model.spec.is_moe else ("heads",)
    attr = {
        **attribution_patching(model, h, s, kinds=kinds),
        **attribution_patching(model, h, s, kinds=("resid",), positions="all"),
    }
    res: dict[str, Any] = {"method": "attribution", "resid": attr["resid"], "heads": attr["heads"]}
    if model.spec.is_moe:
        sweep_attr = expert_ablation_attribution(model, h, mode="drop")
        moe = torch.zeros_like(sweep_attr, dtype=torch.bool)
        moe[list(model.spec.moe_layers)] = True
        flat = torch.where(moe, sweep_attr.abs(), torch.tensor(-1.0)).flatten()
        k = min(run.config.patching_top_n, int(moe.sum()))
        top = flat.topk(k).indices.tolist()
        E = model.spec.n_experts
        experts = [(i // E, i % E) for i in top]
        sweep = expert_ablation_sweep(model, h, mode="drop", experts=experts)
        swept = torch.zeros_like(moe)
        swept[[L for L, _ in experts], [e for _, e in experts]] = True
        risk = run.results["routing"]["risk_difference"]
        res.update(
            attribution=attr["experts"],
            ablation=sweep,
            ablation_attribution=sweep_attr,
            swept_experts=experts,
            attribution_vs_ablation=compare_to_exhaustive(sweep_attr, sweep.effect, swept),
            routing_vs_ablation_spearman=routing_predicts_ablation(
                risk[swept][None], sweep.effect[swept][None]
            )
            if k >= 2
            else float("nan"),
        )
    return res


def stage_circuit(run: Run) -> dict[str, Any]:
    """Greedy minimal circuit and its faithfulness on held-back prompts against random sets."""
    from moe_interp.circuits import locate_refusal_circuit

    cfg, p = run.config, run.prompts
    circuit = locate_refusal_circuit(
        run.model,
        p["harmful_train"][: cfg.n_val],
        p["harmless_train"][: cfg.n_val],
        heldout_harmful=p["harmful_test"],
        heldout_harmless=p["harmless_test"],
        candidates=tuple(cfg.circuit.candidates),
        target=cfg.circuit.target_fraction,
        n_random=cfg.circuit.n_random_draws,
        selection=cfg.circuit.selection,
        refine=cfg.circuit.refine,
        pool=cfg.circuit.pool,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    return {"circuit": circuit}


#: the batch size of the steering stage's strength searches (padding changes the numbers: one for all)
SEARCH_BATCH = 32


def stage_steering(run: Run) -> dict[str, Any]:
    """Fit every configured steering method, tune its strength, save it, and compare all on held-back prompts.

    Strength is tuned on validation prompts ("Refusal Steering" autotuning): the smallest refusal rate
    under the harmless-KL budget (``kl_threshold``) and, with ``distinct2_floor``, with harmful completions that
    do not degenerate into loops; topic methods must also keep >= 97% of the baseline harmful refusal rate.
    """
    from moe_interp.refusal.evaluate import refusal_flags
    from moe_interp.refusal.judges import refusal_rate
    from moe_interp.steering.autotune import QUALITY_TOKENS, NoCandidateError, autotune
    from moe_interp.steering.compare import compare_methods, completion_distinct2, last_logits
    from moe_interp.steering.gated import UngateableError
    from moe_interp.steering.memo import FitMemo
    from moe_interp.steering.registry import method_spec

    cfg, p, model = run.config, run.prompts, run.model
    fitted, files, tuning = {}, {}, {}
    quality: dict[str, Any] = {}
    memo = FitMemo(model)  # reads of the unedited model that several methods' fits share
    if cfg.distinct2_floor is not None and p.get("harmless_val"):  # one reference for every method's search
        # at the strength searches' batch size (padding as the steered completions get it)
        ref = completion_distinct2(
            model, p["harmless_val"], max_new_tokens=QUALITY_TOKENS, batch_size=SEARCH_BATCH
        )
        quality = {"distinct2_floor": cfg.distinct2_floor, "distinct2_reference": ref}
        run.log(
            f"[steering] distinct-2 of the unedited model on harmless_val: {ref:.3f} (floor x{cfg.distinct2_floor:g})"
        )
    reference: dict[str, Any] = {}  # every method's KL reference: the unedited model's logits, computed once
    if p.get("harmless_val"):
        reference = {
            "batch_size": SEARCH_BATCH,
            "harmless_logits": last_logits(model, p["harmless_val"], [], SEARCH_BATCH),
        }
    #: the prompt class of each kind of training data a registry entry declares (``MethodSpec.data``)
    target_class, keep_class = {"harmful": "harmful", "topic": "political"}, "harmful"
    for i, name in enumerate(cfg.steering_methods, 1):
        run.log(f"[steering] {i}/{len(cfg.steering_methods)} {name}: fitting and tuning its strength")
        t0 = time.perf_counter()
        spec, kw = method_spec(name), dict(cfg.steering_kwargs.get(name, {}))
        search: dict[str, Any] = {}
        target = target_class[spec.data]
        if not (p.get(f"{target}_train") and p.get(f"{target}_val")):  # e.g. topic methods, own prompt files
            why = f"no {target} prompts (the bundled splits have them; --harmful/--harmless files do not)"
            run.log(f"[steering] {name}: {why}; left out of the comparison")
            tuning[name] = {"error": why}
            continue
        if spec.needs_keep:  # the keep set's refusals must survive: >= 97% of its baseline rate
            # judged as the strength search judges it (autotune's default: the logit judge)
            base_keep = refusal_rate(refusal_flags(model, p[f"{keep_class}_val"], judge="logit"))
            kw["keep"] = p[f"{keep_class}_train"]
            search = {"keep": p[f"{keep_class}_val"], "keep_min_rate": 0.97 * float(base_keep)}
        if spec.fits_gate and p.get("harmful_gate"):  # the recipe's n_gate_train prompts
            kw["gate_harmful"], kw["gate_harmless"] = p["harmful_gate"], p["harmless_gate"]
        if spec.takes_memo:  # e.g. the gates' activations, the experts' directions: read once per run
            kw["_memo"] = memo
        try:
            res = autotune(
                name,
                model,
                p[f"{target}_train"],
                p["harmless_train"],
                p[f"{target}_val"],
                p["harmless_val"],
                fit_kwargs=kw,
                kl_budget=cfg.kl_threshold,
                **search,
                **quality,
                **reference,
            )
        except NoCandidateError as err:  # no strength satisfies the constraints: reported, not compared
            run.log(
                f"[steering] {name}: no strength within the constraints ({err}); left out of the comparison"
            )
            tuning[name] = {"error": str(err)}
            continue
        except UngateableError as err:  # e.g. the single expert sits in layer 0: nothing can gate it
            run.log(f"[steering] {name}: left out of the comparison: {err}")
            tuning[name] = {"error": str(err)}
            continue
        fitted[name], tuning[name] = res.steer, res.to_dict()
        files[name] = [str(f) for f in res.steer.save(run.out / "steering" / name)]
        run.log(f"[steering] {name}: fitted and tuned in {time.perf_counter() - t0:.0f}s")
    run.log(
        f"[steering] {memo.hits} reads shared between the fits; comparing {len(fitted)} methods on held-back prompts"
    )
    rows = compare_methods(  # the unsteered row is the baseline stage's: both tables agree, no regeneration
        model,
        fitted,
        p["harmful_test"],
        p["political_test"],
        p["harmless_test"],
        max_new_tokens=cfg.max_new_tokens,
        baseline=_baseline_rates(run),
    )
    # a gated steering acts only where its gate opens: how often it does on each held-back set
    gate_fires = {
        name: {
            split: float(steer.fires(model, p[f"{split}_test"], cfg.batch_size).double().mean())
            for split in ("harmful", "political", "harmless")
            if p.get(f"{split}_test")
        }
        for name, steer in fitted.items()
        if hasattr(steer, "fires")
    }
    return {"table": rows, "files": files, "tuning": tuning, "gate_fires": gate_fires, **quality}


def _baseline_rates(run: Run) -> dict[str, dict[str, Any]]:
    """The baseline stage's refusal rates as ``RefusalRate.to_dict()`` per split (empty split: rate nan)."""
    from moe_interp.refusal.judges import RefusalRate

    nan = float("nan")
    out = {}
    for split in ("harmful", "political", "harmless"):
        d = run.results["baseline"].get(f"{split}_test")
        if d is None:
            rate = RefusalRate(nan, nan, nan, 0)
        else:
            lo, hi = d["refusal_rate_ci"]
            rate = RefusalRate(d["refusal_rate"], lo, hi, d["n"])
        out[split] = rate.to_dict()
    return out


STAGES: list[tuple[str, Callable[[Run], dict[str, Any]], tuple[str, ...]]] = [
    ("baseline", stage_baseline, ()),
    ("directions", stage_directions, ()),
    ("refusal_edits", stage_refusal_edits, ("directions",)),
    ("routing", stage_routing, ()),
    ("patching", stage_patching, ("routing",)),
    ("circuit", stage_circuit, ()),
    ("steering", stage_steering, ("baseline",)),
]


# -------------------------------------------------------------------------------- figures / report


def run_pipeline(
    model_source: str = "organism",
    *,
    out: str | Path,
    harmful: str | None = None,
    harmless: str | None = None,
    config: str | Path | None = None,
    force: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every stage and write circuit.json, steering/, figures/ and report.md into ``out``."""
    from moe_interp.config import NAMED_MODELS, PipelineConfig, load_config
    from moe_interp.model import load

    out = Path(out)
    check_out_dir(out)  # checked again under the lock; here to fail before the model is loaded

    def bundled(source: str) -> bool:  # a model that ships with its recipe (a named organism or tiny:*)
        return source in NAMED_MODELS or source.startswith("tiny:")

    if config is None:
        # a bundled organism ("organism", "smollm_moe") runs with its own recipe; "tiny:<family>" with the
        # smoke recipe (a random model's 256-token context cannot hold the default prompts and generations)
        default = (
            Path(__file__).resolve().parent / "data" / "locate_tiny.json"
            if model_source.startswith("tiny:")
            else Path(__file__).resolve().parents[1] / "circuits" / model_source / "config.json"
        )
        cfg = (
            replace(load_config(default), model=model_source)
            if bundled(model_source) and default.exists()
            else PipelineConfig(model=model_source, family="")
        )
    else:
        cfg = load_config(config)
        # a hub recipe may run on a local copy of its model; a bundled one runs only on its own model
        if cfg.model and cfg.model != model_source and (bundled(cfg.model) or bundled(model_source)):
            raise ValueError(
                f"config {config} is for model {cfg.model!r}, but the model given is {model_source!r}; "
                f'pass {cfg.model!r} as the model, or set "model" in the config.'
            )
    torch.manual_seed(cfg.seed)
    model = load(model_source, **cfg.load_kwargs())
    if cfg.refusal_phrases:
        model.refusal_phrases = tuple(cfg.refusal_phrases)
    if cfg.chat_template:
        model.tokenizer.chat_template = cfg.chat_template
    prompts = choose_prompts(model, harmful, harmless, cfg)
    for key in (
        "harmful_train",
        "harmless_train",
        "harmful_val",
        "harmless_val",
        "harmful_test",
        "harmless_test",
    ):
        if not prompts.get(key):
            raise ValueError(f"The prompt set {key!r} is empty; give more prompts.")
    prompts.setdefault("political_train", [])
    prompts.setdefault("political_test", prompts["harmless_test"][:0])
    fingerprint = {
        "model": str(model_source),
        "model_hash": hash_model(model),
        "prompts_hash": hash_prompts(prompts),
        "config_hash": hashlib.sha256(
            json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()
        ).hexdigest()[:16],
        "version": moe_interp.__version__,
        "code_hash": hash_code(),
    }
    with locked(out):
        prepare_out_dir(out, fingerprint, force=force, resume=resume)
        return _run_stages(
            Run(
                model=model,
                out=out,
                config=cfg,
                prompts=prompts,
                fingerprint=fingerprint,
                resume=resume,
                log=log,
            )
        )


def _run_stages(run: Run) -> Path:
    """Every stage (cached), then circuit.json, direction files, figures, report.md and summary.json."""
    from moe_interp.refusal.cli import save_direction

    out, log = run.out, run.log
    run.run_stages(STAGES)
    run.results["circuit"]["circuit"].save(out / "circuit.json")
    (out / "direction.json").write_text(json.dumps(run.results["directions"]["selection"]))
    save_direction(out / "direction.safetensors", run.results["directions"]["direction"])
    figures = write_figures(run)
    report = write_report(run, figures)
    summary = {
        "fingerprint": run.fingerprint,
        "timings_s": run.timings,
        "baseline": run.results["baseline"],
        "refusal_edits": run.results["refusal_edits"],
        "circuit_faithfulness": run.results["circuit"]["circuit"].faithfulness,
        "steering": run.results["steering"]["table"],
        "steering_gate_fires": run.results["steering"].get("gate_fires", {}),
        "steering_distinct2_reference": run.results["steering"].get("distinct2_reference"),
        "steering_left_out": left_out(run.results["steering"]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log(f"wrote {report}")
    return report


def _locate(args: argparse.Namespace) -> int:
    """``moe-interp locate`` (arguments in :mod:`moe_interp.cli`): cheap checks before the model loads."""
    from moe_interp.cli import check_model_source

    check_out_dir(Path(args.out))
    check_model_source(args.model)
    run_pipeline(
        args.model,
        out=args.out,
        harmful=args.harmful,
        harmless=args.harmless,
        config=args.config,
        force=args.force,
        resume=args.resume,
    )
    return 0
