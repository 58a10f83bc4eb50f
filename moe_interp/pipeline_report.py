"""Figures and ``report.md`` of a ``moe-interp locate`` run, from the stages' cached results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import moe_interp
from moe_interp.runs import Run

__all__ = ["left_out", "write_figures", "write_report"]


def write_figures(run: Run) -> list[str]:
    """All figures of the run (PDF + PNG), from the library's plotting functions."""
    from moe_interp import plotting

    fig_dir = run.out / "figures"
    made: list[str] = []
    r = run.results

    def save(fig: Any, stem: str) -> None:
        made.extend(str(p) for p in plotting.save_figure(fig, fig_dir / stem))

    sel = r["directions"]["selection"]
    save(
        plotting.plot_selection_scores(sel["table"], chosen=(sel["layer"], sel["pos"])), "direction_selection"
    )
    pat = r["patching"]
    save(pat["resid"].plot(), "patch_resid_layer_position")
    save(pat["heads"].plot(), "patch_heads_layer_head")
    if "experts" in pat:
        save(
            pat["experts"].plot(routing_risk_diff=r["routing"]["risk_difference"]),
            "patch_experts_layer_expert",
        )
        save(
            pat["ablation"].plot(routing_risk_diff=r["routing"]["risk_difference"]),
            "ablation_experts_layer_expert",
        )
        save(plotting.plot_routing_difference(r["routing"]["top1_pct_difference"]), "routing_top1_difference")
        moe = torch.zeros_like(pat["experts"].values, dtype=torch.bool)
        moe[list(run.model.spec.moe_layers)] = True
        labels = [f"L{L}.E{e}" for L in run.model.spec.moe_layers for e in range(run.model.spec.n_experts)]
        save(
            plotting.plot_attribution_vs_exhaustive(
                pat["attribution"].values[moe],
                pat["experts"].values[moe],
                labels,
                pat["attribution_vs_patching"]["spearman"],
                title="blocks.L.mlp.hook_expert_out: attribution vs activation patching",
            ),
            "attribution_vs_exhaustive",
        )
    elif "ablation" in pat:  # patching by attribution: the exhaustive sweep covers the top-ranked experts
        risk = r["routing"]["risk_difference"]
        save(pat["attribution"].plot(routing_risk_diff=risk), "attribution_experts_layer_expert")
        save(pat["ablation"].plot(routing_risk_diff=risk), "ablation_experts_layer_expert")
        save(plotting.plot_routing_difference(r["routing"]["top1_pct_difference"]), "routing_top1_difference")
        swept = pat["swept_experts"]
        rows, cols = [L for L, _ in swept], [e for _, e in swept]
        save(
            plotting.plot_attribution_vs_exhaustive(
                pat["ablation_attribution"][rows, cols],
                pat["ablation"].effect[rows, cols],
                [f"L{L}.E{e}" for L, e in swept],
                pat["attribution_vs_ablation"]["spearman"],
                title="blocks.L.mlp.hook_expert_out: ablation attribution vs exhaustive ablation (top-ranked)",
            ),
            "attribution_vs_exhaustive",
        )
    save(r["circuit"]["circuit"].plot(), "circuit")
    for name, tune in r["steering"]["tuning"].items():
        hist = [h for h in tune.get("history", []) if "refusal_rate" in h]
        if len(hist) >= 2:
            label = "experts deactivated" if name == "steer_router" else "coefficient scale"
            fig = plotting.plot_coefficient_sweep(
                [float(h["label"]) for h in hist],
                {"harmful refusal (val)": [h["refusal_rate"] for h in hist]},
                xlabel=label,
                secondary={"harmless KL": [h["kl"] for h in hist]},
                title=f"Steering strength sweep: {name}",
            )
            save(fig, f"steering_sweep_{name}")
    rows = r["steering"]["table"]
    methods = [row["method"] for row in rows]
    metrics = {k: [row[f"{k}_refusal"]["rate"] for row in rows] for k in ("harmful", "political", "harmless")}
    cis = {
        k: [(row[f"{k}_refusal"]["ci_low"], row[f"{k}_refusal"]["ci_high"]) for row in rows] for k in metrics
    }
    save(
        plotting.plot_method_comparison(methods, metrics, cis, title="Steering methods on held-back prompts"),
        "steering_methods",
    )
    return made


def _fmt_rate(d: dict[str, Any]) -> str:
    lo, hi = d["refusal_rate_ci"]
    return f"{d['refusal_rate']:.2f} [{lo:.2f}, {hi:.2f}]"


def _fmt_row_rate(d: dict[str, Any]) -> str:
    return f"{d['rate']:.2f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}]"


def left_out(steering: dict[str, Any]) -> dict[str, str]:
    """Steering methods the steering stage left out of the comparison, with the reason it recorded."""
    return {k: v["error"] for k, v in steering["tuning"].items() if "error" in v}


def write_report(run: Run, figures: list[str]) -> Path:
    """``report.md``: what was run, tables, figures, hashes and version."""
    r, spec = run.results, run.model.spec
    lines = [
        f"# Refusal circuit of `{run.model.name}`",
        "",
        f"moe-interp {moe_interp.__version__}; model hash `{run.fingerprint['model_hash']}`, prompts hash "
        f"`{run.fingerprint['prompts_hash']}`, config hash `{run.fingerprint['config_hash']}`.",
        f"Family `{spec.family}`: {spec.n_layers} layers, d_model {spec.d_model}, {spec.n_heads} heads, "
        f"{len(spec.moe_layers)} MoE layers × {spec.n_experts} experts (top-{spec.top_k}).",
        "",
        "Prompt sets: " + ", ".join(f"{k} ({len(v)})" for k, v in sorted(run.prompts.items())) + ".",
        "Stage times: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in run.timings.items())
        + " (resumed stages omitted).",
        "",
        "## Baseline refusal (greedy generation, substring judge; 95% bootstrap CI)",
        "",
        "| prompts | n | refusal rate | mean logit refusal score |",
        "|---|---|---|---|",
    ]
    for k, d in r["baseline"].items():
        lines.append(f"| {k} | {d['n']} | {_fmt_rate(d)} | {d['mean_refusal_score']:.2f} |")
    sel = r["directions"]["selection"]
    lines += [
        "",
        "## Refusal direction (difference of means, Arditi et al. selection)",
        "",
        f"Chosen: `blocks.{sel['layer']}.hook_resid_pre` at position {sel['pos']} (passed filters: "
        f"{sel['passed']}; {sel['reason']}); bypass {sel['bypass']:.2f}, induce {sel['induce']:.2f}, "
        f"KL {sel['kl']:.3f}. ![selection](figures/direction_selection.png)",
        "",
        "| edit | prompts | refusal rate | KL to baseline |",
        "|---|---|---|---|",
    ]
    edits = r["refusal_edits"]
    for key, label in (
        ("ablation_harmful", "directional ablation / harmful_test"),
        ("ablation_harmless", "directional ablation / harmless_test"),
        ("addition_harmless", "activation addition / harmless_test"),
        ("orthogonalized_harmful", "orthogonalised weights / harmful_test"),
    ):
        d = edits[key]
        lines.append(
            f"| {label.split(' / ')[0]} | {label.split(' / ')[1]} | {_fmt_rate(d)} | {d['kl_to_baseline']:.3f} |"
        )
    lines += [
        "",
        f"Orthogonalised weights vs ablation hooks: max logit difference "
        f"{edits['orthogonalized_vs_hooks_max_logit_diff']:.2e}.",
        "",
        "## Patching and expert ablation",
        "",
        "![resid](figures/patch_resid_layer_position.png) ![heads](figures/patch_heads_layer_head.png)",
    ]
    pat = r["patching"]
    if "experts" in pat:
        lines += [
            "![experts](figures/patch_experts_layer_expert.png) ![ablation](figures/ablation_experts_layer_expert.png)",
            "",
            f"Attribution vs activation patching of `hook_expert_out`: Spearman "
            f"{pat['attribution_vs_patching']['spearman']:.2f}; attribution vs exhaustive single-expert ablation "
            f"(drop): Spearman {pat['attribution_vs_ablation']['spearman']:.2f}; routing risk difference vs "
            f"ablation effect: Spearman {pat['routing_vs_ablation_spearman']:.2f}.",
        ]
    elif "ablation" in pat:
        lines += [
            "![attribution](figures/attribution_experts_layer_expert.png) "
            "![ablation](figures/ablation_experts_layer_expert.png)",
            "",
            f"Patching by attribution (config `patching: attribution`): the resid and head maps above are "
            f"attribution estimates; the exhaustive single-expert ablation (drop) ran on the "
            f"{len(pat['swept_experts'])} experts ranked highest by ablation attribution. On those: attribution vs "
            f"exhaustive ablation Spearman {pat['attribution_vs_ablation']['spearman']:.2f}; routing risk "
            f"difference vs ablation effect Spearman {pat['routing_vs_ablation_spearman']:.2f}.",
        ]
    circuit = r["circuit"]["circuit"]
    f = circuit.faithfulness
    lines += [
        "",
        "## Circuit",
        "",
        f"{len(circuit.components)} components ({circuit.metadata.get('selection', 'prefix')} selection over "
        f"{f.get('n_candidates')} candidates: {', '.join(circuit.metadata.get('candidates', []))}); ablating them "
        f"(mean ablation at the post-instruction positions) removes {f['finding_removed']:.2f} of the refusal-score "
        f"gap on the finding prompts and **{f['circuit']:.2f}** [{f['circuit_ci'][0]:.2f}, {f['circuit_ci'][1]:.2f}] "
        f"on held-back prompts; random sets of the same size remove **{f['random']:.2f}** "
        f"[{f['random_ci'][0]:.2f}, {f['random_ci'][1]:.2f}] (mean and 95% CI over {len(f['random_draws'])} draws)"
        + _same_kinds(f),
        "",
        "Effect = fraction of the gap removed by ablating the component alone (ranking estimate).",
        "",
        "| component | kind | layer | effect |",
        "|---|---|---|---|",
    ]
    for c in circuit.components:
        idx = c.get("head", c.get("expert"))
        lines.append(
            f"| `{c['name']}`{'' if idx is None else f' [{idx}]'} | {c['kind']} | {c['layer']} | {c['effect']:.3f} |"
        )
    lines += ["", "![circuit](figures/circuit.png)", "", "## Steering methods (held-back prompts)", ""]
    table = r["steering"]["table"]
    first = all("harmful_first_token_refusal" in row for row in table)  # results of older runs lack it
    lines += [
        "| method | harmful refusal | "
        + ("harmful, first token | " if first else "")
        + "political refusal | harmless refusal | harmless KL | layers | experts |",
        "|---|---|---|---|---|---|---|" + ("---|" if first else ""),
    ]
    for row in table:
        lines.append(
            f"| {row['method']} | {_fmt_row_rate(row['harmful_refusal'])} | "
            + (f"{_fmt_row_rate(row['harmful_first_token_refusal'])} | " if first else "")
            + f"{_fmt_row_rate(row['political_refusal'])} | {_fmt_row_rate(row['harmless_refusal'])} "
            f"| {row['harmless_kl']:.3f} | {row.get('n_layers', '')} | {row.get('n_experts', '')} |"
        )
    if first:
        lines += [
            "",
            "Refusal rates judge the generated text (a refusal phrase in the first "
            f"{run.config.max_new_tokens} tokens); *first token* judges the next-token distribution "
            "(P(a refusal phrase's first token) > 1/2), as the strength search does. A method with a low rate by "
            "text and a high one by first token starts its answers like a refusal and then does not refuse.",
        ]
    fires = r["steering"].get("gate_fires", {})
    if fires:
        lines += [
            "",
            "Gated methods act only where their gate opens; share of held-back prompts it opens on:",
            "",
        ]
        lines += [
            f"- {k}: " + ", ".join(f"{split} {rate:.2f}" for split, rate in v.items())
            for k, v in fires.items()
        ]
    floor = r["steering"].get("distinct2_floor")
    if floor is not None:
        ref = r["steering"]["distinct2_reference"]
        lines += [
            "",
            f"Fluency floor of the strength search: the steered harmful validation prompts' greedy completions "
            f"keep a mean distinct-2 >= {floor:g} x {ref:.3f} (the unedited model's on harmless validation "
            "prompts); distinct-2 at the strength chosen:",
            "",
        ]
        lines += [
            f"- {k}: strength {t['label']}, distinct-2 {t['distinct2']:.3f}"
            for k, t in r["steering"]["tuning"].items()
            if t.get("distinct2") is not None
        ]
    untuned = left_out(r["steering"])
    if untuned:
        lines += [
            "",
            "Left out of the comparison (no strength within the harmless-KL budget, keep constraint or fluency "
            "floor on the validation prompts, no prompts of the class, or no gate possible):",
            "",
        ]
        lines += [f"- {k}: {err}" for k, err in untuned.items()]
    lines += ["", "![methods](figures/steering_methods.png)", "", "## Files", ""]
    lines += [f"- `{Path(p).relative_to(run.out)}`" for p in figures if p.endswith(".pdf")]
    path = run.out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _same_kinds(f: dict[str, Any]) -> str:
    """The stricter baseline's sentence: random sets with the circuit's kinds in the circuit's numbers."""
    if "random_same_kinds" not in f:  # a circuit saved before this baseline existed
        return "."
    n, distinct = len(f["random_same_kinds_draws"]), f["random_same_kinds_distinct"]
    ci = f["random_same_kinds_ci"]
    return (
        f"; random sets with the circuit's kinds in its numbers remove **{f['random_same_kinds']:.2f}** "
        f"[{ci[0]:.2f}, {ci[1]:.2f}] ({distinct} of {n} draws differ from the circuit)."
    )
