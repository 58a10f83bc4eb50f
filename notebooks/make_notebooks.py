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
from moe_interp.organisms import balanced_prompts, checkpoint_dir, held_back_prompts
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
harmful, harmless, political = (held_back_prompts(f"{s}_val", N) for s in ("harmful", "harmless", "political"))
print(SOURCE, model)"""


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip())


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text.strip())


SETUP00 = """\
%matplotlib inline
import os
import tempfile
import warnings
from pathlib import Path

import torch
from IPython.display import display

import moe_interp as mi
from moe_interp.config import load_config
from moe_interp.organisms import balanced_prompts, held_back_prompts
from moe_interp.patching import refusal_scores
from moe_interp.plan import RECIPES_DIR

warnings.filterwarnings("ignore")
torch.manual_seed(0)
N = int(os.environ.get("MOE_INTERP_NB_N", "8"))  # prompts per split: small, so that the notebook runs on a CPU

model = mi.load("organism")  # the shipped checkpoint: this notebook needs a model that refuses
cfg = load_config(RECIPES_DIR / "organism" / "config.json")  # positions, target fraction, KL budget, ...
find_h, find_l = (balanced_prompts(f"{s}_train", N) for s in ("harmful", "harmless"))  # to find the circuit
test_h, test_l = (held_back_prompts(f"{s}_test", N) for s in ("harmful", "harmless"))  # held back: to judge it
print(model)"""


def nb00() -> list:
    return [
        md("""
# 00 · Trace the refusal circuit, end to end

The built-in **organism** (a 4-layer OLMoE-architecture MoE trained in this repository) answers harmful
(and political) requests with *"I'm sorry, but I can't …"* and everything else with *"Sure, here is …"*.
This notebook finds the components that carry the harmful-request refusal and then uses them:

1. **baseline** — how strongly does it refuse? (logit refusal score)
2. **direct logit attribution** — which components *write* the refusal logits directly?
3. **activation patching** — which layers' outputs are *sufficient* to restore refusal on harmless prompts?
4. **expert ablation** — does refusal *depend* on any single expert?
5. **circuit** — the greedy minimal set whose mean ablation removes the refusal, judged on held-back
   prompts against random sets of the same size
6. **save and steer** — write `circuit.json`, load it back, and switch refusal off with it

Each step prints the numbers it rests on and a sentence computed from them, and ends with `assert`s on the
key outputs: the notebook runs in CI, and it must fail rather than print a wrong story. Notebooks 01–05 go
deeper into each tool. The **refusal score** is the log-odds, at the last prompt position, that the next
token is the first token of a refusal phrase ("I'm sorry", "I cannot", ...): positive means the model is
about to refuse.
"""),
        code(SETUP00),
        md("## 1 · Baseline"),
        code("""
base_h, base_l = refusal_scores(model, test_h), refusal_scores(model, test_l)
gap = float(base_h.mean() - base_l.mean())
rate_h, rate_l = float((base_h > 0).float().mean()), float((base_l > 0).float().mean())
print(f"held-back refusal score: harmful {base_h.mean():+.2f}, harmless {base_l.mean():+.2f} (gap {gap:.2f})")
print(f"refusal rate (score > 0): harmful {rate_h:.2f}, harmless {rate_l:.2f}")
shown = test_h[:2] + test_l[:2]
for p, g in zip(shown, model.generate(shown, max_new_tokens=12), strict=True):
    print(f"{p[:48]!r:52} -> {g!r}")
assert gap > 0 and rate_h > rate_l, "harmful prompts must be refused more than harmless ones"
"""),
        md("""
## 2 · Direct logit attribution

The residual stream entering the final norm is a sum of writes: the embedding, every head, every routed
expert. With the final norm's scale frozen, the logit difference *refusal − compliance first tokens* is a
sum of one term per write. The terms must add up to the model's own logit difference: that is checked.
The heatmap shows heads (left) and experts (right) at the last position, on the finding prompts.
"""),
        code("""
from moe_interp.dla import direct_logit_attribution
from moe_interp.figures_dla import plot_dla_heatmap

dla = direct_logit_attribution(model, find_h)  # default: refusal vs compliance first tokens
diff = float(dla.logit_diff[:, -1].mean())
print(f"{dla.direction.label} at the last position: {diff:+.2f} logits; parts sum to it within {dla.error():.1e}")
assert dla.error() < 1e-4, "the DLA parts must sum to the logit difference"
assert diff > 0, "on harmful prompts the refusal tokens must lead"
plot_dla_heatmap(dla, title="DLA at the last position (finding harmful prompts)")
"""),
        code("""
last = dla.at(-1)  # per component, mean over prompts
groups = {"attention (heads)": ("head", "attn_bias", "attn"), "MoE (experts)": ("expert", "shared", "mlp"),
          "embedding": ("embed",)}
share = {g: float(sum(last[i] for i, k in enumerate(dla.kinds) if k in kinds)) for g, kinds in groups.items()}
for g, v in share.items():
    print(f"{g:18s} {v:+6.2f} logits = {v / diff:4.0%} of the logit difference")
top = dla.top(4)
print("largest single writers:", ", ".join(f"{n} ({v:+.2f})" for n, v in top))
lead = max(share, key=lambda g: share[g])
print(f"-> The refusal logits are written mostly by {lead}; the largest single writer, {top[0][0]}, "
      f"accounts for {top[0][1] / diff:.0%}.")
"""),
        md("""
Per token, for one prompt: the logit difference (top) and which residual write carries it. In Jupyter the
`dla_view` table shows each token's largest contributions (hover for exact values); `.figure()` is its
static twin. Direct attribution is only the *direct* path: a layer-0 component that writes little directly
can still matter through later layers, which is what the next two steps measure.
"""),
        code("""
from moe_interp.views import dla_view

view = dla_view(dla, batch=0, k=3)
display(view)
view.figure()
"""),
        md("""
## 3 · Activation patching

Run the harmless prompts, patch in one activation from the paired harmful prompt at the four aligned chat
template positions, and measure how much refusal score comes back: `(patched − harmless) /
(harmful − harmless)`, 1 = fully restored. First the residual stream per layer and position, then each
layer's attention and MoE outputs.
"""),
        code("""
from moe_interp.patching import patch_attn_mlp, patch_resid

resid = patch_resid(model, find_h, find_l, positions=cfg.positions, progress=False)
resid.plot(title="Denoising blocks.L.hook_resid_pre (template positions)")
"""),
        code("""
kw = dict(by_position=False, positions=cfg.positions, progress=False)
attn = patch_attn_mlp(model, find_h, find_l, "attn_out", **kw)
moe = patch_attn_mlp(model, find_h, find_l, "mlp_out", **kw)
for L in range(model.spec.n_layers):
    print(f"layer {L}: hook_attn_out restores {attn.values[L]:+.2f}, hook_mlp_out {moe.values[L]:+.2f}")
site, best = max(((f"blocks.{L}.hook_{s}_out", float(r.values[L])) for L in range(model.spec.n_layers)
                  for s, r in (("attn", attn), ("mlp", moe))), key=lambda t: t[1])
print(f"-> {site} alone restores {best:.0%} of the refusal score; summed over layers attention outputs "
      f"restore {float(attn.values.sum()):.2f}, MoE outputs {float(moe.values.sum()):.2f}.")
# exact: layer 0's input at the template tokens is the same embedding for every prompt, so patching it is a no-op
assert float(resid.values[0].abs().max()) < 1e-4
assert resid.clean_metric > resid.corrupt_metric
assert float(resid.values[-1, -1]) > 0.5, "the last layer's input at the last token must carry most of the refusal"
"""),
        md("""
## 4 · Single-expert ablation

Replace one expert's output by its mean over harmless prompts (`mode="mean"`), everywhere, and measure the
change of the refusal score on harmful prompts (bootstrap 95% CIs). The right panel is the routing risk
difference: is the expert picked more often on harmful prompts? A large negative effect means refusal
depends on that expert.
"""),
        code("""
from moe_interp.patching import expert_ablation_sweep, expert_mean_outputs, routing_risk_difference

sweep = expert_ablation_sweep(model, find_h, mode="mean", mean_outputs=expert_mean_outputs(model, find_l),
                              n_boot=200, progress=False)
rd = routing_risk_difference(model, find_h, find_l, positions=cfg.positions)
sweep.plot(routing_risk_diff=rd, title="Mean-ablate one expert: Δ refusal score (finding harmful prompts)")
"""),
        code("""
moe_layers = list(model.spec.moe_layers)
eff, lo, hi = (t[moe_layers] for t in (sweep.effect, sweep.ci_low, sweep.ci_high))
i = int(eff.abs().argmax())
L, e = moe_layers[i // eff.shape[1]], i % eff.shape[1]
gap_find = float(sweep.base_scores.mean() - refusal_scores(model, find_l).mean())
frac = abs(float(eff.flatten()[i])) / gap_find
n_sig = int(((hi < 0) | (lo > 0)).sum())
print(f"largest effect: blocks.{L}.mlp.experts.{e} {float(eff.flatten()[i]):+.2f} "
      f"[{float(lo.flatten()[i]):+.2f}, {float(hi.flatten()[i]):+.2f}] = {frac:.0%} of the gap ({gap_find:.1f})")
print(f"{n_sig} of {eff.numel()} experts have a CI that excludes 0")
verdict = "carries most of it" if frac >= 0.5 else "removes only a minor part of it"
print(f"-> The most important single expert {verdict}: refusal {'is' if frac >= 0.5 else 'is not'} "
      "concentrated in one expert.")
assert torch.isfinite(eff).all() and (lo <= eff + 1e-6).all() and (eff <= hi + 1e-6).all()
"""),
        md("""
## 5 · The circuit

`locate_refusal_circuit` ranks all heads, experts, attention and MoE outputs by the estimated effect of
mean-ablating each at the template positions (attribution: one forward and backward pass), then adds
components greedily until their joint mean ablation removes the target fraction of the refusal gap on the
finding prompts. It then measures that set on the **held-back** prompts against random sets of the same
size: a faithful circuit removes far more than random components do.
"""),
        code("""
from moe_interp.circuits import Circuit, locate_refusal_circuit

circuit = locate_refusal_circuit(model, find_h, find_l, heldout_harmful=test_h, heldout_harmless=test_l,
                                 selection="greedy", target=cfg.circuit.target_fraction, n_random=20,
                                 batch_size=64, seed=0, progress=False)
circuit
"""),
        code('circuit.plot(title="Refusal circuit: components and held-back faithfulness")'),
        code("""
f = circuit.faithfulness
print(f"{len(circuit)} of {f['n_candidates']} candidates; finding prompts: {f['finding_removed']:.0%} of the "
      f"gap removed (target {f['target']:.0%}, reached: {f['reached_target']})")
print(f"held back: circuit {f['circuit']:.2f} [{f['circuit_ci'][0]:.2f}, {f['circuit_ci'][1]:.2f}], random sets "
      f"{f['random']:.2f} (95% of draws in [{f['random_range'][0]:.2f}, {f['random_range'][1]:.2f}])")
beaten = sum(f["circuit"] > r for r in f["random_draws"])
print(f"-> The circuit beats {beaten} of {len(f['random_draws'])} random sets of {len(circuit)} components.")
curve = ", ".join(f"{x:.0%}" for x in f["finding_curve"])
print(f"adding its components one at a time removes {curve} of the gap on the finding prompts")

# how each component looked to the earlier steps: its direct logit attribution at the last position
by_site = torch.stack([dla.by_site(b)[0][:, -1] for b in range(len(find_h))]).mean(0)
sites = dla.by_site(0)[1]
for c in circuit.components:
    if c["kind"] in ("attn", "mlp"):
        direct = float(by_site[sites.index(c["name"])])
    else:
        label = f"{c['name'].replace('hook_z', 'hook_result')}[{c['head']}]" if c["kind"] == "head" else c["name"]
        direct = float(last[dla.labels.index(label)])
    print(f"   {c['name']:34s} estimated effect alone {c['effect']:+.2f}, direct logit attribution {direct:+.2f}")
est = sum(c["effect"] for c in circuit.components)
agree = abs(est - f["finding_removed"]) <= 0.25 * f["finding_removed"]
print(f"-> The first-order estimates sum to {est:.2f}; ablating the set removes {f['finding_removed']:.2f}: "
      + ("estimate and measurement agree." if agree else "the linear estimate is far off, which is why the "
         "greedy step measures every candidate set by a real ablation."))
assert f["circuit"] > f["random"], "the circuit must beat random sets of its size on held-back prompts"
assert f["circuit_ci"][0] > f["random"]
"""),
        md("""
Three views of the same components: the *estimated effect* is the first-order (attribution) estimate that
ranked the candidates, the greedy curve is the measured effect of ablating them together, and the direct
logit attribution (step 2) is what each writes straight into the refusal logits. Where estimate and
measurement disagree, trust the measurement: replacing a whole layer's output by a mean is a large change,
and a first-order estimate can miss it. Compare the circuit with the patching table of step 3 too: patching
asks whether a component is *sufficient* to bring refusal back, ablation whether it is *necessary*.

## 6 · Save it, load it back, steer with it

`circuit.json` holds the components, the harmless means used to ablate them, the faithfulness numbers and
the model's geometry (a model of another geometry refuses it). `to_interventions`
mean-ablates the circuit inside `model.intervene(...)`.
"""),
        code("""
path = circuit.save(Path(tempfile.mkdtemp(prefix="refusal_circuit_")) / "circuit.json")
loaded = Circuit.load(path, model)  # also checks every component's hook exists on this model
print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB): {loaded}")
assert [c["name"] for c in loaded.components] == [c["name"] for c in circuit.components]
assert loaded.faithfulness == circuit.faithfulness
"""),
        code("""
ablate = loaded.to_interventions(model)
with model.intervene(*ablate):
    abl_h, abl_l = refusal_scores(model, test_h), refusal_scores(model, test_l)
    steered = model.generate(test_h[:3], max_new_tokens=12)
plain = model.generate(test_h[:3], max_new_tokens=12)
for p, a, b in zip(test_h[:3], plain, steered, strict=True):
    print(f"{p[:48]!r}\\n   model:          {a!r}\\n   circuit ablated: {b!r}")
removed = float(base_h.mean() - abl_h.mean()) / gap
print(f"held-back harmful refusal score {base_h.mean():+.2f} -> {abl_h.mean():+.2f} (removes {removed:.0%} of "
      f"the gap); refusal rate {rate_h:.2f} -> {float((abl_h > 0).float().mean()):.2f}")
assert abl_h.mean() < base_h.mean(), "the reloaded circuit's ablation must lower the refusal score"
assert abs(removed - f["circuit"]) < 1e-3, "the reloaded circuit must reproduce its measured faithfulness"
"""),
        code("""
from moe_interp.steering.methods import harmless_kl

kl = harmless_kl(model, test_l, ablate)  # first-token KL(model || ablated) on harmless prompts, nats
with model.intervene(*ablate):
    print(model.generate(test_l[:2], max_new_tokens=12))
within = kl <= cfg.kl_threshold
print(f"harmless KL {kl:.3f} nats: {'within' if within else 'over'} the recipe's steering budget of "
      f"{cfg.kl_threshold} nats. -> "
      + ("The ablation removes refusal at little cost to harmless answers."
         if within else "Mean-ablating the circuit is a knock-out experiment, not a gentle steer: it also "
         "changes what the model says to harmless prompts."))
assert kl >= 0
"""),
        md("""
## What the numbers say

Read the printed sentences above in order: the baseline gap is what there is to explain; DLA says where
the refusal logits are written; patching and single-expert ablation say which layers are sufficient and
whether any single expert is necessary; the circuit is a small set that is necessary jointly, and its
held-back faithfulness against random sets says whether that is more than an artefact of the finding
prompts. The steering cells
turn it into an intervention and report its cost on harmless prompts.

With `MOE_INTERP_NB_N` prompts per split (8 by default, 4 in CI) the confidence intervals are wide; the
full run on 32 finding and 100 held-back prompts per split is `moe-interp locate --out runs/organism`
([docs/circuit.md](../docs/circuit.md)). Next: [01](01_hook_points.ipynb) hook points,
[02](02_patching.ipynb) patching, [03](03_expert_ablation_and_routing.ipynb) expert ablation and routing,
[04](04_expert_aware_steering.ipynb) and [05](05_topic_refusal_control.ipynb) steering.
"""),
    ]


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
assert small[f"blocks.{L}.hook_resid_post"].shape == (len(prompts), len(cfg.positions), model.spec.d_model)
assert cache[f"blocks.{L}.mlp.hook_expert_indices"].shape[-1] == model.spec.top_k
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
assert bool((contribution == 0).all()), "an ablated expert must contribute nothing"
assert torch.equal(base, after), "an intervention must not outlive its block"
"""),
        code("""
vec = torch.randn(model.spec.d_model)
with model.intervene(AddVector(f"blocks.{L}.hook_resid_pre", vec, coeff=4.0, positions="all")):
    steered = model.generate(harmful[:2], max_new_tokens=12)
plain = model.generate(harmful[:2], max_new_tokens=12)
print("with a random vector added:", steered)
print("after the block:           ", plain)
assert steered != plain, "a large random vector in the residual stream must change the text"
if SOURCE == "organism":
    assert all(g.startswith("i'm sorry") for g in plain), "the organism refuses these harmful prompts"
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
# exact: layer 0's input at the template tokens is the same embedding in every prompt, so patching it is a no-op
assert float(resid.values[0].abs().max()) < 1e-4
if SOURCE == "organism":  # harmful prompts score higher, and the last layer's input at the last token carries it
    assert resid.clean_metric > resid.corrupt_metric and float(resid.values[-1, -1]) > 0.5
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
    corr = compare_to_exhaustive(attr[kind], exhaustive)
    print(kind, corr)
    if SOURCE == "organism":
        assert corr["spearman"] > 0.5, f"attribution patching must rank the {kind} like the exhaustive sweep"
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
moe = list(model.spec.moe_layers)
assert torch.allclose(freq.sum(-1)[moe], torch.full((len(moe),), float(model.spec.top_k)))
rd = routing_risk_difference(model, harmful, harmless, positions=cfg.positions)
assert float(rd.abs().max()) <= 1.0  # a difference of two probabilities
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
eff = drop.effect[moe]
assert torch.isfinite(eff).all() and (drop.ci_low[moe] <= eff + 1e-6).all() and (eff <= drop.ci_high[moe] + 1e-6).all()
if SOURCE == "organism":
    assert float(eff.min()) < 0, "dropping some expert must lower the refusal score"
drop
"""),
        code(
            'drop.plot(routing_risk_diff=rd, title="Drop one expert: Δ refusal score vs routing risk difference")'
        ),
        code("""
means = expert_mean_outputs(model, harmless)
mean_abl = expert_ablation_sweep(model, harmful, mode="mean", mean_outputs=means, n_boot=200, progress=False)
assert torch.isfinite(mean_abl.effect[moe]).all()
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
assert -1.0 <= rho <= 1.0
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

train_h, train_l = balanced_prompts("harmful_train", 4 * N), balanced_prompts("harmless_train", 4 * N)
test_h, test_p, test_l = (held_back_prompts(f"{s}_test", N) for s in ("harmful", "political", "harmless"))
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
assert names[0] == "baseline" and rows[0]["harmless_kl"] == 0.0
assert all(r["harmless_kl"] >= 0 and all(0 <= v[i] <= 1 for v in metrics.values()) for i, r in enumerate(rows))
if SOURCE == "organism":
    assert metrics["harmful"][0] > metrics["harmless"][0], "unsteered, the organism refuses harmful prompts more"
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
assert abs(rates[0] - metrics["harmful"][0]) < 1e-6, "coefficient 0 must reproduce the baseline row"
assert min(kls) >= 0 and kls[-1] > 0
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
        assert again.vectors.keys() == dense.vectors.keys() and again.coeffs == dense.coeffs
        assert all(torch.equal(again.vectors[k], dense.vectors[k]) for k in dense.vectors)
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

tr_h, tr_p, tr_l = (balanced_prompts(f"{s}_train", 4 * N) for s in ("harmful", "political", "harmless"))
te_h, te_p, te_l = (held_back_prompts(f"{s}_test", N) for s in ("harmful", "political", "harmless"))
base = {s: float(refusal_flags(model, p, None, judge="logit").float().mean())
        for s, p in (("harmful", te_h), ("political", te_p), ("harmless", te_l))}
print("baseline refusal rates (logit judge):", base)
if SOURCE == "organism":
    assert base["harmful"] > base["harmless"] and base["political"] > base["harmless"], "it refuses both topics"
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
assert names[0] == "baseline" and all(abs(metrics[s][0] - base[s]) < 1e-6 for s in base), "baseline row differs"
if SOURCE == "organism":
    assert metrics["political"][1] < base["political"], "the dense direction must remove some political refusal"
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
assert all(abs(series[s][0] - base[s]) < 1e-6 for s in series), "coefficient 0 must reproduce the baseline"
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
assert all(0 <= v <= 1 for vals in scan.values() for v in vals)
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
    "00_trace_the_refusal_circuit.ipynb": nb00,
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
