"""Write the tour notebooks (``python notebooks/make_notebooks.py``); they are committed without outputs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
%matplotlib inline
import os
import warnings

import torch

import moe_interp as mi
from moe_interp.config import load_config
from moe_interp.organisms import checkpoint_dir, load_prompts
from moe_interp.plan import RECIPES_DIR

warnings.filterwarnings("ignore")
torch.manual_seed(0)
N = int(os.environ.get("MOE_INTERP_NB_N", "8"))  # prompts per split: small, so that every notebook runs on a CPU

if (checkpoint_dir() / "model.safetensors").is_file():
    SOURCE = "organism"
else:  # fall back only when the organism checkpoint has not been built
    SOURCE = "tiny:olmoe"
    print(
        "The organism checkpoint is missing (build it with `python -m moe_interp.organisms.train`).\\n"
        "Falling back to tiny:olmoe, a RANDOM-INIT model: the code runs, but it does not refuse anything, "
        "so the numbers and figures below carry no meaning."
    )
model = mi.load(SOURCE)
cfg = load_config(RECIPES_DIR / "organism" / "config.json")  # the organism recipe: positions, layers, ...
harmful, harmless, political = (load_prompts(f"{s}_val")[:N] for s in ("harmful", "harmless", "political"))
print(SOURCE, model)"""


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip())


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text.strip())


def nb01() -> list:
    return [
        md("""
# 01 · Hook points of an MoE: router, experts, heads

A tour of what `moe-interp` exposes on a mixture-of-experts model, on the refusal **organism** (a small
OLMoE-architecture model trained in this repo to refuse harmful and political requests). Every hook point
has a TransformerLens-style name, every cached tensor is laid out `[batch, pos, ...]`, and edits run inside
`with model.intervene(...)` and are gone when the block exits.

The first cell loads the organism, or `tiny:olmoe` (random weights) if the checkpoint has not been built.
"""),
        code(SETUP),
        md("## The spec: one geometry object for every family"),
        code("model.spec"),
        code("""
names = model.hook_names()
print(len(names), "hook points; layer 0:")
for n in model.hook_names(lambda n: n.startswith("blocks.0.") and ".experts." not in n):
    print("  ", n)
print("  ... plus", len(model.hook_names(lambda n: n.startswith("blocks.0.mlp.experts."))), "per-expert hooks")
"""),
        md("""
## `run_with_cache`

By default every hook except the dense per-expert outputs is cached (`hook_expert_out` is
`[batch, pos, n_experts, d_model]`, large on real checkpoints; ask for it by name, or use its sparse
`hook_topk_expert_out` form). `positions=` keeps only some positions: prompts are left padded, so the
negative post-instruction offsets of the recipe (`cfg.positions`) address the same template tokens in every
prompt.
"""),
        code("""
L = model.spec.moe_layers[-1]
sites = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
         "attn.hook_z", "attn.hook_result", "mlp.hook_router_logits", "mlp.hook_expert_indices",
         "mlp.hook_expert_weights", "mlp.hook_expert_out", "mlp.hook_topk_expert_out"]
prompts = harmful[:2] + harmless[:2]
logits, cache = model.run_with_cache(prompts, names=[f"blocks.{L}.{s}" for s in sites]
                                     + [f"blocks.{L}.mlp.experts.0.hook_out"])
cache
"""),
        code("""
_, small = model.run_with_cache(prompts, names=[f"blocks.{L}.hook_resid_post"], positions=cfg.positions)
print("post-instruction positions", cfg.positions, "->", tuple(small[f"blocks.{L}.hook_resid_post"].shape))
print("template tokens:", [model.tokenizer.decode([t]) for t in model.tokenize(prompts[:1])["input_ids"][0, -4:]])
"""),
        md("""
## Identities that hold exactly

The residual stream is the sum of its parts, the MoE output is the sum of the weighted expert outputs, the
attention output is the sum of per-head results, and each token is routed to exactly `top_k` experts.
"""),
        code("""
c = lambda s: cache[f"blocks.{L}.{s}"]  # noqa: E731
checks = {
    "resid_mid = resid_pre + attn_out": c("hook_resid_mid") - (c("hook_resid_pre") + c("hook_attn_out")),
    "resid_post = resid_mid + mlp_out": c("hook_resid_post") - (c("hook_resid_mid") + c("hook_mlp_out")),
    "attn_out = sum_h result_h": c("hook_attn_out") - c("attn.hook_result").sum(2),
    "mlp_out = sum_e expert_out_e": c("hook_mlp_out") - c("mlp.hook_expert_out").sum(2),
    "mlp_out = sum of top-k form": c("hook_mlp_out") - c("mlp.hook_topk_expert_out").sum(2),
    "experts.0.hook_out = expert_out[:, :, 0]": cache[f"blocks.{L}.mlp.experts.0.hook_out"]
    - c("mlp.hook_expert_out")[:, :, 0],
}
mask = model.tokenize(prompts)["attention_mask"].bool()
for name, diff in checks.items():
    err = diff[mask].abs().max().item()
    print(f"{name:45s} max |error| = {err:.2e}")
    assert err < 1e-4, name
routed = (c("mlp.hook_expert_weights") != 0).sum(-1)[mask]
assert (routed == model.spec.top_k).all()
print("every token routed to exactly top_k =", model.spec.top_k, "experts")
"""),
        md("Per-head contribution sizes at the last prompt position, drawn with the library's plotting:"),
        code("""
from moe_interp.plotting import plot_layer_head_heatmap

_, heads = model.run_with_cache(harmful, names=lambda n: n.endswith("attn.hook_result"), positions=[-1])
norms = torch.stack([heads[f"blocks.{i}.attn.hook_result"][:, 0].norm(dim=-1).mean(0)
                     for i in range(model.spec.n_layers)])
plot_layer_head_heatmap(norms, metric_label="mean ‖head result‖ at the last position",
                        title="Per-head output norm (harmful prompts)")
"""),
        md("""
## An edit, and nothing persists

`AblateExpert` needs an explicit `mode`: `drop` (zero its weight, others unchanged), `renorm` (re-normalise
the rest), `reroute` (give its slot to the next expert) or `mean` (replace its output by a mean output).
"""),
        code("""
from moe_interp.interventions import AblateExpert, AddVector
from moe_interp.refusal import refusal_first_token_ids, refusal_score

ids = refusal_first_token_ids(model.tokenizer, cfg.refusal_phrases)
base = model.forward(harmful)
top = int(c("mlp.hook_expert_weights")[:2].sum((0, 1)).argmax())  # the expert most used on harmful prompts
with model.intervene(AblateExpert(L, top, mode="drop")):
    ablated = model.forward(harmful)
    _, abl_cache = model.run_with_cache(harmful, names=[f"blocks.{L}.mlp.hook_expert_out"])
after = model.forward(harmful)
print(f"ablate blocks.{L}.mlp.experts.{top}: refusal score {refusal_score(base[:, -1], ids).mean():+.3f} -> "
      f"{refusal_score(ablated[:, -1], ids).mean():+.3f}")
contribution = abl_cache[f"blocks.{L}.mlp.hook_expert_out"][:, :, top]
print("its contribution under the ablation is zero everywhere:", bool((contribution == 0).all()))
print("logits identical after the block:", torch.equal(base, after))
"""),
        code("""
vec = torch.randn(model.spec.d_model)
with model.intervene(AddVector(f"blocks.{L}.hook_resid_pre", vec, coeff=4.0, positions="all")):
    print(model.generate(harmful[:2], max_new_tokens=12))
print(model.generate(harmful[:2], max_new_tokens=12))
"""),
    ]


def nb02() -> list:
    return [
        md("""
# 02 · Activation and attribution patching

**Clean** = harmful prompts (the model refuses), **corrupt** = harmless prompts, paired one-to-one.
*Denoising* runs the corrupt prompts and patches in clean activations; the metric is the logit refusal
score at the last position, normalised to `(patched − corrupt) / (clean − corrupt)` (1 = patching this
component alone restores refusal). Only the aligned post-instruction positions are patched position-wise.
"""),
        code(SETUP),
        code("""
from moe_interp.patching import (attribution_patching, compare_to_exhaustive, patch_experts, patch_heads,
                                 patch_resid)
from moe_interp.plotting import plot_attribution_vs_exhaustive

clean, corrupt = harmful[:N], harmless[:N]
resid = patch_resid(model, clean, corrupt, positions=cfg.positions, progress=False)
resid
"""),
        code('resid.plot(title="Residual stream (resid_pre), layer × position")'),
        code("""
heads = patch_heads(model, clean, corrupt, positions=cfg.positions, progress=False)
heads.plot(title="Attention heads (hook_z over the post-instruction tokens)")
"""),
        code("""
experts = patch_experts(model, clean, corrupt, positions=cfg.positions, progress=False)
experts.plot(title="Experts (slice e of hook_expert_out)")
"""),
        md("""
## Attribution patching: every patch from 2 forwards + 1 backward

A first-order estimate `Σ (clean − corrupt) · ∂metric/∂h` of every patch at once. Compare it with the
exhaustive sweeps above: where it agrees, use it to rank components on a real checkpoint, where the
exhaustive sweep costs `L × E` forward passes (see `moe-interp plan`).
"""),
        code("""
attr = attribution_patching(model, clean, corrupt, kinds=("resid", "heads", "experts"),
                            positions=cfg.positions, progress=False)
for kind, exhaustive in (("resid", resid), ("heads", heads), ("experts", experts)):
    print(kind, compare_to_exhaustive(attr[kind], exhaustive))
"""),
        code("""
a, e = attr["experts"].values, experts.values
moe = list(model.spec.moe_layers)
labels = [f"L{L}.E{x}" for L in moe for x in range(a.shape[1])]
plot_attribution_vs_exhaustive(a[moe].flatten(), e[moe].flatten(), labels=labels,
                               title="Experts: attribution vs exhaustive patching")
"""),
    ]


def nb03() -> list:
    return [
        md("""
# 03 · Single-expert ablation and routing statistics

Routing statistics ask *which experts are selected more on harmful than on harmless prompts*; ablation asks
*which experts the refusal depends on*. They need not agree, and `routing_predicts_ablation` measures how
well the first predicts the second.
"""),
        code(SETUP),
        md("## Routing statistics"),
        code("""
from moe_interp.patching import (expert_selection_frequency, routing_predicts_ablation, routing_risk_difference,
                                 top1_percentage_difference)
from moe_interp.plotting import plot_routing_difference

freq = expert_selection_frequency(model, harmful, positions=cfg.positions)
print("P(selected) per layer sums to top_k:", freq.sum(-1))
rd = routing_risk_difference(model, harmful, harmless, positions=cfg.positions)
plot_routing_difference(rd, metric_label="routing risk difference P(sel | harmful) − P(sel | harmless)",
                        title="SteerMoE risk difference (post-instruction tokens)")
"""),
        code("""
top1 = top1_percentage_difference(model, harmful, harmless, last_n=len(cfg.positions))
plot_routing_difference(top1, title="Top-1 routing difference, harmful − harmless (pp)")
"""),
        md("""
## Exhaustive single-expert ablation

Each `(layer, expert)` is ablated in turn (several per forward pass: the prompts are repeated and each copy
ablates a different expert); the effect is the change of the logit refusal score with a bootstrap CI.
"""),
        code("""
from moe_interp.patching import expert_ablation_loop, expert_ablation_sweep, expert_mean_outputs

drop = expert_ablation_sweep(model, harmful, mode="drop", n_boot=200, progress=False)
drop
"""),
        code(
            'drop.plot(routing_risk_diff=rd, title="Drop one expert: Δ refusal score vs routing risk difference")'
        ),
        code("""
means = expert_mean_outputs(model, harmless)
mean_abl = expert_ablation_sweep(model, harmful, mode="mean", mean_outputs=means, n_boot=200, progress=False)
mean_abl.plot(title="Replace one expert's output by its harmless mean")
"""),
        code("""
# cross-check the batched sweep against the one-forward-per-expert reference on a few experts
few = [(L, e) for L in model.spec.moe_layers[:1] for e in range(3)]
loop = expert_ablation_loop(model, harmful, mode="drop", experts=few)
for L, e in few:
    print(f"L{L} E{e}: sweep {drop.effect[L, e]:+.4f}  loop {loop[L, e]:+.4f}")
    assert abs(float(drop.effect[L, e] - loop[L, e])) < 1e-3
"""),
        code("""
rho = routing_predicts_ablation(rd, drop.effect, moe_layers=model.spec.moe_layers)
print(f"Spearman(|risk difference|, |ablation effect|) = {rho:+.3f}")
"""),
    ]


def nb04() -> list:
    return [
        md("""
# 04 · Expert-aware steering

Dense residual steering (difference of means, Arditi et al.) against expert-aware methods: steering the
outputs of the experts whose routing differs most between harmful and harmless prompts
(`routing_experts`), the same directions weighted by the router probability (`expert_conditioned`), and
SteerMoE router edits (`steer_router`). Fit on train prompts, evaluate on test prompts.
"""),
        code(SETUP),
        code("""
from moe_interp.steering.methods import compare_methods, fit_method, harmless_kl, refusal_flags, with_coeff

train_h, train_l = load_prompts("harmful_train")[: 4 * N], load_prompts("harmless_train")[: 4 * N]
test_h, test_p, test_l = (load_prompts(f"{s}_test")[:N] for s in ("harmful", "political", "harmless"))
methods = {name: fit_method(name, model, train_h, train_l) for name in cfg.steering_methods if not name.startswith("topic_")}
methods
"""),
        md("## Compare methods (logit judge: refusal score at the last prompt position > 0)"),
        code("""
from moe_interp.plotting import plot_method_comparison

rows = compare_methods(model, methods, test_h, test_p, test_l, judge="logit", n_boot=200)
names = [r["method"] for r in rows]
metrics = {s: [r[f"{s}_refusal"]["rate"] for r in rows] for s in ("harmful", "political", "harmless")}
cis = {s: [(r[f"{s}_refusal"]["ci_low"], r[f"{s}_refusal"]["ci_high"]) for r in rows] for s in metrics}
for r in rows:
    print(f"{r['method']:20s} KL={r['harmless_kl']:.3f} layers={r['layers']} experts={r['n_experts']}")
plot_method_comparison(names, metrics, cis, ylabel="refusal rate (test)", title="Steering methods")
"""),
        md("## Coefficient sweep for one method"),
        code("""
from moe_interp.plotting import plot_coefficient_sweep

name = "expert_conditioned" if "expert_conditioned" in methods else next(iter(methods))
sv = methods[name]
coeffs = [0.0, -0.5, -1.0, -2.0]
rates, kls = [], []
for c in coeffs:
    steer = with_coeff(sv, c) if c != 0 else None
    rates.append(float(refusal_flags(model, test_h, steer, judge="logit").float().mean()))
    kls.append(0.0 if steer is None else harmless_kl(model, test_l, steer))
plot_coefficient_sweep(coeffs, {f"{name}: harmful refusal": rates}, secondary={"harmless KL": kls},
                       title=f"{name}: refusal vs coefficient")
"""),
        md("Steered generations (the steering object is a context manager over `model.intervene`):"),
        code("""
with methods[name].apply(model):
    for p, g in zip(test_h[:3], model.generate(test_h[:3], max_new_tokens=16), strict=True):
        print(repr(p[:60]), "->", repr(g))
"""),
        code("""
import tempfile
from pathlib import Path

from moe_interp.steering import SteeringVectors

with tempfile.TemporaryDirectory() as tmp:
    dense = methods.get("dense")
    if dense is not None:
        dense.save(Path(tmp) / "dense")
        again = SteeringVectors.load(Path(tmp) / "dense", model)
        print("saved and reloaded:", again)
"""),
    ]


def nb05() -> list:
    return [
        md("""
# 05 · Fine-grained (topic) refusal control

The organism refuses two things: harmful requests and political topics. A dense refusal direction removes
both. A **topic direction** — political minus harmless, made orthogonal to the harmful-minus-harmless
(safety) direction — is meant to remove the political refusal while keeping the harmful one. Whether it
does is an empirical question: this notebook measures it (on the shipped organism the answer depends on
the layer and the coefficient; read the figures rather than the intent).
"""),
        code(SETUP),
        code("""
from moe_interp.steering.methods import compare_methods, fit_method, refusal_flags, with_coeff

tr_h, tr_p, tr_l = (load_prompts(f"{s}_train")[: 4 * N] for s in ("harmful", "political", "harmless"))
te_h, te_p, te_l = (load_prompts(f"{s}_test")[:N] for s in ("harmful", "political", "harmless"))
base = {s: float(refusal_flags(model, p, None, judge="logit").float().mean())
        for s, p in (("harmful", te_h), ("political", te_p), ("harmless", te_l))}
print("baseline refusal rates (logit judge):", base)
"""),
        md("## Which experts route political prompts differently?"),
        code("""
from moe_interp.patching import top1_percentage_difference
from moe_interp.plotting import plot_routing_difference

plot_routing_difference(top1_percentage_difference(model, te_p, te_h, last_n=len(cfg.positions)),
                        title="Top-1 routing difference, political − harmful (pp)")
"""),
        md("""
## Remove the topic refusal, keep the safety refusal

Three ways: a dense direction (removes every refusal), the orthogonalised topic direction
(`topic_remove`), and `topic_gated` — a dense removal applied only where a linear topic detector on the
residual stream fires.
"""),
        code("""
topic = fit_method("topic_remove", model, tr_p, tr_l, keep=tr_h)
dense = fit_method("dense", model, tr_h + tr_p, tr_l + tr_l)  # removes refusal in general
topic
"""),
        code("""
from moe_interp.plotting import plot_method_comparison

gated = fit_method("topic_gated", model, tr_p, tr_l, keep=tr_h)  # steer only where a topic detector fires
steers = {"dense (all refusal)": dense, "topic_remove (political)": topic, "topic_gated (political)": gated}
rows = compare_methods(model, steers,
                       te_h, te_p, te_l, judge="logit", n_boot=200)
names = [r["method"] for r in rows]
metrics = {s: [r[f"{s}_refusal"]["rate"] for r in rows] for s in ("harmful", "political", "harmless")}
cis = {s: [(r[f"{s}_refusal"]["ci_low"], r[f"{s}_refusal"]["ci_high"]) for r in rows] for s in metrics}
print({n: {k: round(v[i], 2) for k, v in metrics.items()} for i, n in enumerate(names)})
plot_method_comparison(names, metrics, cis, ylabel="refusal rate (test)",
                       title="Dense vs topic steering: what is removed")
"""),
        code("""
from moe_interp.plotting import plot_coefficient_sweep

coeffs = [0.0, -0.5, -1.0, -1.5, -2.0]
series = {"harmful": [], "political": []}
for c in coeffs:
    steer = with_coeff(topic, c) if c != 0 else None
    series["harmful"].append(float(refusal_flags(model, te_h, steer, judge="logit").float().mean()))
    series["political"].append(float(refusal_flags(model, te_p, steer, judge="logit").float().mean()))
plot_coefficient_sweep(coeffs, series, title="topic_remove: political vs harmful refusal")
"""),
        md("""
Which layer, if any, separates the two refusals? Fit the topic direction at each layer (coefficient −2)
and measure both refusal rates: a layer where political refusal drops while harmful refusal stays is where
the topic is represented apart from the safety signal.
"""),
        code("""
layers = list(range(1, model.spec.n_layers))
scan = {"harmful": [], "political": []}
for layer in layers:
    sv = fit_method("topic_remove", model, tr_p, tr_l, keep=tr_h, layer=layer, coeff=-2.0)
    for split, prompts in (("harmful", te_h), ("political", te_p)):
        scan[split].append(float(refusal_flags(model, prompts, sv, judge="logit").float().mean()))
print({k: [round(v, 2) for v in vals] for k, vals in scan.items()})
plot_coefficient_sweep(layers, scan, xlabel="layer of the topic direction (coefficient −2)",
                       title="topic_remove by layer: political vs harmful refusal")
"""),
        md(
            "Adding the topic direction instead (`topic_induce`) pushes harmless prompts towards the political refusal:"
        ),
        code("""
induce = fit_method("topic_induce", model, tr_p, tr_l, keep=tr_h, coeff=1.0)
with induce.apply(model):
    for p, g in zip(te_l[:3], model.generate(te_l[:3], max_new_tokens=16), strict=True):
        print(repr(p[:60]), "->", repr(g))
"""),
    ]


NOTEBOOKS = {
    "01_hook_points.ipynb": nb01,
    "02_patching.ipynb": nb02,
    "03_expert_ablation_and_routing.ipynb": nb03,
    "04_expert_aware_steering.ipynb": nb04,
    "05_topic_refusal_control.ipynb": nb05,
}


def main() -> None:
    for name, build in NOTEBOOKS.items():
        nb = new_notebook(cells=build())
        for i, cell in enumerate(nb.cells):
            cell.id = f"cell-{i:02d}"  # stable ids: regenerating gives clean diffs
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)
    try:  # keep the committed notebooks ruff-formatted
        subprocess.run(
            ["ruff", "format", *(str(HERE / n) for n in NOTEBOOKS)], check=False, capture_output=True
        )
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    main()
