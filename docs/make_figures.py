"""Draw every figure the library makes, as small PNG thumbnails, and write the gallery ``docs/figures.md``.

Run from the repository root: ``python docs/make_figures.py`` (about a minute on 2 CPU cores). It uses the
shipped organism (a few validation prompts per split) and the committed main-job results in
``circuits/organism/results/`` (circuit, direction selection table, steering table); only
``plot_benchmark`` is drawn from a made-up result of the right shape, since no benchmark result is committed.
Thumbnails are PNG at dpi 80 (``docs/figures/*.png``); the library's own :func:`~moe_interp.figures.save_figure`
writes PDF + PNG at dpi 200 for papers.

Each figure is also checked mechanically (:func:`audit`): colour maps used, line / bar / marker colours
outside the colour-blind-safe palette (Okabe–Ito, greys, and colours of the safe colour maps, which
categories beyond eight are sampled from), axes without labels, and whether any text names a hook. The
result is printed in the gallery next to the call that draws the figure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib as mpl  # noqa: E402

mpl.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_hex, to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.markers import MarkerStyle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "figures"
GALLERY = ROOT / "docs" / "figures.md"
RESULTS = ROOT / "circuits" / "organism" / "results"
DPI = 80
N = 6  # prompts per split
PROMPT = "Write a tutorial on how to make a bomb"

sys.path.insert(0, str(ROOT))

from moe_interp.figures import CB_SAFE_CMAPS, OKABE_ITO, STYLE  # noqa: E402

#: Colour maps a figure may use: ColorBrewer RdBu / PuOr (diverging) and viridis / cividis (sequential).
SAFE_CMAPS = set(CB_SAFE_CMAPS)
_LUTS = [mpl.colormaps[name](np.linspace(0, 1, 256))[:, :3] for name in sorted(SAFE_CMAPS)]


@dataclass
class Entry:
    """One gallery figure: the function that draws it, the call shown in the docs, and how it is made here."""

    stem: str
    function: str
    call: str
    draw: Callable[[], Figure]
    note: str = ""
    also: str = ""  # the method or module that draws it too


def _is_grey(hex_colour: str) -> bool:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return max(r, g, b) - min(r, g, b) <= 8


def _on_safe_cmap(hex_colour: str) -> bool:
    """A colour of a colour-blind-safe map (categories beyond eight are sampled from viridis)."""
    rgb = np.array(to_rgb(hex_colour))
    return any(np.abs(lut - rgb).max(axis=1).min() <= 1.5 / 255 for lut in _LUTS)


def _colours(ax: Axes) -> set[str]:
    """Colours drawn in ``ax`` (lines, markers, bars and patches, scatter markers), as hex without alpha."""
    out: set[str] = set()
    for ln in ax.get_lines():
        if not ln.get_visible():
            continue
        if ln.get_linestyle() not in ("None", "none", "", " "):
            out.add(to_hex(ln.get_color()))
        marker = MarkerStyle(ln.get_marker())
        if ln.get_marker() not in (None, "None", "none", ""):
            out.add(to_hex(ln.get_markeredgecolor()))
            if marker.is_filled() and ln.get_fillstyle() != "none" and ln.get_markerfacecolor() != "none":
                out.add(to_hex(ln.get_markerfacecolor()))
    for p in ax.patches:
        if p.get_visible() and p.get_fill():
            out.add(to_hex(p.get_facecolor()))
    for coll in ax.collections:
        if coll.get_array() is not None:  # colour-mapped: judged by its colour map
            continue
        for c in list(coll.get_facecolors()) + list(coll.get_edgecolors()):
            if len(c) == 4 and c[3] == 0:
                continue
            out.add(to_hex(c))
    return out


def _is_categorical(labels: list[str]) -> bool:
    """Tick labels that name things (tokens, methods, hooks) rather than numbers."""
    texts = [t.replace("−", "-").strip() for t in labels if t.strip()]
    if not texts:
        return False
    try:
        [float(t) for t in texts]
    except ValueError:
        return True
    return False


def _overlaps(fig: Figure) -> list[str]:
    """Pairs of titles (the figure's suptitle and every axes title) whose drawn boxes overlap."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()
    boxes = []
    if fig._suptitle is not None and fig._suptitle.get_text():  # noqa: SLF001
        boxes.append(("suptitle", fig._suptitle.get_window_extent(renderer)))  # noqa: SLF001
    for ax in fig.axes:
        if ax.get_title():
            boxes.append((f"title '{ax.get_title()}'", ax.title.get_window_extent(renderer)))
    return [f"{a} / {b}" for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1 :] if ba.overlaps(bb)]


def audit(fig: Figure) -> dict[str, object]:
    """Colour maps, off-palette colours, unlabelled numeric axes, overlapping titles and hook names of ``fig``."""
    fig.draw_without_rendering()  # tick labels and layout as they will be saved
    palette = {c.lower() for c in OKABE_ITO}
    cmaps: set[str] = set()
    off: set[str] = set()
    unlabelled: list[str] = []
    texts: list[str] = [t.get_text() for t in fig.texts]
    if fig._suptitle is not None:  # noqa: SLF001 - matplotlib keeps the suptitle here
        texts.append(fig._suptitle.get_text())  # noqa: SLF001
    for ax in fig.axes:
        for im in ax.images + [c for c in ax.collections if c.get_array() is not None]:
            cmaps.add(im.get_cmap().name)
        off |= {
            c for c in _colours(ax) if c.lower() not in palette and not _is_grey(c) and not _on_safe_cmap(c)
        }
        texts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        texts += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels() + ax.texts]
        where = ax.get_title() or ax.get_ylabel() or ax.get_xlabel() or "axes"
        if ax.get_label() == "<colorbar>":
            if not (ax.get_ylabel() or ax.get_xlabel()):
                unlabelled.append("colour bar")
            continue
        if not ax.axison:
            continue
        for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            ticks = (
                [t.get_text() for t in axis.get_ticklabels() if t.get_visible()] if axis.get_visible() else []
            )
            if any(ticks) and not label and not _is_categorical(ticks):
                unlabelled.append(f"{axis.axis_name} of '{where}'")
    hooks = any("hook_" in t or "blocks." in t for t in texts)
    return {
        "cmaps": sorted(cmaps),
        "off_palette": sorted(off),
        "unlabelled": unlabelled,
        "overlaps": _overlaps(fig),
        "hooks": hooks,
    }


def _audit_line(a: dict[str, object]) -> str:
    cm = a["cmaps"]
    bad_cm = [c for c in cm if c not in SAFE_CMAPS]  # type: ignore[union-attr]
    parts = [
        f"colour maps: {', '.join(cm) if cm else 'none'}"  # type: ignore[arg-type]
        + (f" (**not colour-blind safe: {', '.join(bad_cm)}**)" if bad_cm else ""),
        "colours: Okabe–Ito, greys and safe colour maps only"
        if not a["off_palette"]
        else f"**colours outside the safe palette: {', '.join(a['off_palette'])}**",  # type: ignore[arg-type]
        "every numeric axis labelled"
        if not a["unlabelled"]
        else f"**unlabelled: {'; '.join(a['unlabelled'])}**",  # type: ignore[arg-type]
        "no overlapping titles" if not a["overlaps"] else f"**overlapping: {'; '.join(a['overlaps'])}**",  # type: ignore[arg-type]
        "hook names: yes" if a["hooks"] else "hook names: none",
    ]
    return "; ".join(parts)


def save_thumbnail(fig: Figure, stem: str) -> Path:
    path = OUT / f"{stem}.png"
    with mpl.rc_context(STYLE):
        fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.05, metadata={"Software": None})
    return path


# ----------------------------------------------------------------------------------------------- data
def entries() -> list[Entry]:
    import moe_interp as mi
    from moe_interp import figures as plotting
    from moe_interp.benchmark import METHODS, plot_benchmark
    from moe_interp.circuits import Circuit
    from moe_interp.dla import direct_logit_attribution
    from moe_interp.figures import plot_dla_heatmap, plot_logit_lens
    from moe_interp.lens import logit_lens
    from moe_interp.organisms import load_prompts
    from moe_interp.patching import (
        attribution_patching,
        expert_ablation_sweep,
        patch_experts,
        patch_heads,
        patch_resid,
        routing_risk_difference,
        top1_percentage_difference,
    )
    from moe_interp.refusal.directions import post_instruction_positions
    from moe_interp.refusal.judges import default_refusal_ids
    from moe_interp.steering import SteeringVectors
    from moe_interp.steering.methods import harmless_kl, refusal_flags, with_coeff
    from moe_interp.views import attention_view, dla_view, routing_view

    torch.manual_seed(0)
    model = mi.load("organism")
    harmful, harmless = load_prompts("harmful_val")[:N], load_prompts("harmless_val")[:N]
    pos = post_instruction_positions(model)
    moe = list(model.spec.moe_layers)
    cache: dict[str, object] = {}

    def once(key: str, make: Callable[[], object]) -> object:
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def rd() -> torch.Tensor:
        return once("rd", lambda: routing_risk_difference(model, harmful, harmless, positions=pos))  # type: ignore[return-value]

    def experts():  # noqa: ANN202
        return once("experts", lambda: patch_experts(model, harmful, harmless, positions=pos, progress=False))

    def dla():  # noqa: ANN202
        return once("dla", lambda: direct_logit_attribution(model, harmful))

    def attribution_scatter() -> Figure:
        attr = attribution_patching(
            model, harmful, harmless, kinds=("experts",), positions=pos, progress=False
        )
        a, e = attr["experts"].values[moe].flatten(), experts().values[moe].flatten()
        labels = [f"L{L}.E{x}" for L in moe for x in range(model.spec.n_experts)]
        return plotting.plot_attribution_vs_exhaustive(
            a, e, labels, title="blocks.L.mlp.hook_expert_out: attribution vs patching"
        )

    def coefficient_sweep() -> Figure:
        sv = SteeringVectors.load(RESULTS / "steering" / "routing_experts", model)
        coeffs, rates, kls = [0.0, -1.0, -2.0, -4.0], [], []
        for c in coeffs:
            steer = with_coeff(sv, c) if c else None
            rates.append(float(refusal_flags(model, harmful, steer, judge="logit").float().mean()))
            kls.append(harmless_kl(model, harmless, steer) if steer is not None else 0.0)
        return plotting.plot_coefficient_sweep(
            coeffs,
            {"routing_experts: harmful refusal": rates},
            secondary={"harmless KL": kls},
            title="Steering strength sweep",
        )

    def method_comparison() -> Figure:
        rows = json.loads((RESULTS / "summary.json").read_text())["steering"]
        splits = ("harmful", "political", "harmless")
        metrics = {s: [r[f"{s}_refusal"]["rate"] for r in rows] for s in splits}
        cis = {s: [(r[f"{s}_refusal"]["ci_low"], r[f"{s}_refusal"]["ci_high"]) for r in rows] for s in splits}
        return plotting.plot_method_comparison(
            [r["method"] for r in rows], metrics, cis, title="Steering methods on held-back prompts"
        )

    def selection() -> Figure:
        return plotting.plot_selection_scores(json.loads((RESULTS / "direction.json").read_text()))

    def lens() -> Figure:
        refuse = default_refusal_ids(model)[0]
        comply = model.tokenizer("Sure", add_special_tokens=False)["input_ids"][0]
        return plot_logit_lens(logit_lens(model, [PROMPT], tokens=[refuse, comply]))

    def benchmark() -> Figure:
        # made-up ranks of the right shape: no benchmark result is committed (moe-interp benchmark --out DIR)
        orgs = []
        for j, (name, kind) in enumerate((("expert", "expert"), ("head", "head"), ("router", "router"))):
            methods = {
                m: {"rank": 1 + (i * 7 + j * 3) % 12, "matches": i % 3 != j} for i, m in enumerate(METHODS)
            }
            methods[METHODS[-1]] = {"rank": None, "matches": False}
            orgs.append(
                {"name": name, "kind": kind, "methods": methods, "circuit": {"precision": 1.0, "recall": 0.5}}
            )
        return plot_benchmark({"organisms": orgs})

    return [
        Entry(
            "patch_resid_layer_position",
            "plot_layer_position_heatmap",
            "patch_resid(model, harmful, harmless, positions=pos).plot()",
            lambda: patch_resid(model, harmful, harmless, positions=pos, progress=False).plot(),
            also="PatchingResult.plot",
        ),
        Entry(
            "patch_heads_layer_head",
            "plot_layer_head_heatmap",
            "patch_heads(model, harmful, harmless, positions=pos).plot()",
            lambda: patch_heads(model, harmful, harmless, positions=pos, progress=False).plot(),
            also="PatchingResult.plot",
        ),
        Entry(
            "patch_experts_layer_expert",
            "plot_expert_heatmap",
            "patch_experts(model, harmful, harmless, positions=pos).plot(routing_risk_diff=rd)",
            lambda: experts().plot(routing_risk_diff=rd()),
            also="PatchingResult.plot",
        ),
        Entry(
            "ablation_experts_layer_expert",
            "plot_expert_heatmap",
            'expert_ablation_sweep(model, harmful, mode="drop").plot(routing_risk_diff=rd)',
            lambda: expert_ablation_sweep(model, harmful, mode="drop", n_boot=100, progress=False).plot(
                routing_risk_diff=rd()
            ),
            also="ExpertAblationResult.plot",
        ),
        Entry(
            "routing_top1_difference",
            "plot_routing_difference",
            "plot_routing_difference(top1_percentage_difference(model, harmful, harmless, last_n=4))",
            lambda: plotting.plot_routing_difference(
                top1_percentage_difference(model, harmful, harmless, last_n=4)
            ),
        ),
        Entry(
            "attribution_vs_exhaustive",
            "plot_attribution_vs_exhaustive",
            "plot_attribution_vs_exhaustive(attr.values[moe], exhaustive.values[moe], labels)",
            attribution_scatter,
        ),
        Entry(
            "circuit",
            "plot_circuit",
            'Circuit.load("circuits/organism/results/circuit.json").plot()',
            lambda: Circuit.load(RESULTS / "circuit.json", model).plot(),
            also="Circuit.plot",
        ),
        Entry(
            "steering_coefficient_sweep",
            "plot_coefficient_sweep",
            'plot_coefficient_sweep(coeffs, {"harmful refusal": rates}, secondary={"harmless KL": kls})',
            coefficient_sweep,
        ),
        Entry(
            "steering_methods",
            "plot_method_comparison",
            "plot_method_comparison(methods, metrics, cis)",
            method_comparison,
            "Drawn from the committed steering table (`circuits/organism/results/summary.json`).",
        ),
        Entry(
            "direction_selection",
            "plot_selection_scores",
            "plot_selection_scores(selection)  # a SelectionResult or its to_dict()",
            selection,
            "Drawn from the committed selection table (`circuits/organism/results/direction.json`).",
        ),
        Entry(
            "dla_heatmap",
            "plot_dla_heatmap",
            "plot_dla_heatmap(direct_logit_attribution(model, harmful))",
            lambda: plot_dla_heatmap(dla()),
        ),
        Entry(
            "dla_tokens",
            "plot_dla_tokens",
            "plot_dla_tokens(dla, batch=0)  # or dla_view(dla).figure()",
            lambda: dla_view(dla(), batch=0).figure(),
            also="DLAView.figure",
        ),
        Entry(
            "logit_lens",
            "plot_logit_lens",
            "plot_logit_lens(logit_lens(model, [prompt], tokens=[refusal_id, sure_id]))",
            lens,
        ),
        Entry(
            "routing_view",
            "plot_routing",
            "routing_view(model, prompt).figure()",
            lambda: routing_view(model, PROMPT).figure(),
            also="RoutingView.figure",
        ),
        Entry(
            "attention_view",
            "plot_attention",
            "attention_view(model, prompt, layer=0).figure()",
            lambda: attention_view(model, PROMPT, layer=0).figure(),
            also="AttentionView.figure",
        ),
        Entry(
            "benchmark",
            "plot_benchmark",
            "plot_benchmark(run_benchmark())",
            benchmark,
            "Drawn from a **made-up** result of the right shape (no benchmark result is committed).",
            also="moe-interp benchmark --out DIR",
        ),
    ]


HEADER = """\
# Figure gallery

Every figure moe-interp draws, with the call that draws it. Generated by
[`docs/make_figures.py`](make_figures.py) (`python docs/make_figures.py`: the shipped organism on {n}
validation prompts per split, plus the committed main-job results); thumbnails are PNG at dpi {dpi}. The
library's `save_figure` writes PDF + PNG at dpi 200; `save_to=` on every plotting function does the same.

One style for all (`moe_interp.figures.style`; `moe_interp.plotting` re-exports the package): bare
constrained-layout `Figure` objects under the `STYLE` rc parameters, layers bottom (0) to top, signed values
on `RdBu_r` (colour-blind-safe diverging map) centred at 0 with symmetric limits, unsigned values on
`viridis` (perceptually uniform; ranks on `viridis_r`), categories in the Okabe–Ito palette — and, beyond
its eight colours, `viridis` sampled evenly so that no two categories share a colour — NaN grey.
The **check** line under each figure is computed from the figure object (`audit` in the script): colour maps
used, colours outside Okabe–Ito, greys and the safe colour maps, numeric axes without a label (categorical
axes name their ticks), titles that overlap, and whether any text names a hook. Problems found, by this check
and by eye, and what became of them, are listed [at the end](#style-problems-found).

"""


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sections, index = [], []
    for e in entries():
        t = time.time()
        fig = e.draw()
        a = audit(fig)
        path = save_thumbnail(fig, e.stem)
        fig.clf()
        print(f"{e.stem:32s} {time.time() - t:5.1f} s {path.stat().st_size / 1024:6.1f} kB  {_audit_line(a)}")
        also = f" (also `{e.also}`)" if e.also else ""
        index.append(f"- [`{e.function}`](#{e.stem.replace('_', '-')}){also}")
        sections.append(
            f'<a id="{e.stem.replace("_", "-")}"></a>\n\n### `{e.function}`{also}\n\n```python\n{e.call}\n```\n\n'
            + (f"{e.note}\n\n" if e.note else "")
            + f"![{e.function}](figures/{e.stem}.png)\n\n*Check:* {_audit_line(a)}.\n"
        )
    problems = PROBLEMS
    GALLERY.write_text(
        HEADER.format(n=N, dpi=DPI) + "\n".join(index) + "\n\n" + "\n".join(sections) + "\n" + problems
    )
    total = sum(p.stat().st_size for p in OUT.glob("*.png"))
    print(
        f"wrote {GALLERY} and {len(sections)} thumbnails ({total / 1024:.0f} kB) in {time.time() - t0:.0f} s"
    )


PROBLEMS = """\
## Style problems found

Found on the thumbnails and in the code (2026-12-01, issue 19); status after the split of
`moe_interp/plotting.py` into `moe_interp/figures/` (issue 21). `tests/test_plotting.py` checks each fix on
the figure objects (colour maps, artist colours, image data, labels, title overlap).

1. **`plot_benchmark`** — fixed (`moe_interp/figures/benchmark.py`; `moe_interp.benchmark.plot_benchmark`
   delegates to it). It used `RdYlGn_r`, a red–green map, through pyplot. Now a bare `Figure` under `STYLE`
   with `viridis_r` on a log scale (rank 1 brightest), NaN grey, cell text black or white by contrast,
   `miss` / `–` cells, and labelled axes and colour bar.
2. **`plot_dla_heatmap`** — fixed (`moe_interp/figures/tracing.py`): the suptitle overlapped both panel
   titles; every tracing figure now uses constrained layout, and the colour-bar label wraps.
3. **`plot_routing` / `RoutingView.figure`** — fixed (`moe_interp/figures/routing.py`): cells were
   `OKABE_ITO[top_expert % 7]` with opacity for the weight, so experts e and e + 7 shared a colour. Now every
   expert has its own colour (`categorical_colours`: Okabe–Ito up to eight experts, evenly sampled `viridis`
   beyond), solid fills (weights are printed in the cell), cell text in black or white by contrast, and a
   legend from colour to expert. The HTML view's chips (`RoutingView._repr_html_` in `moe_interp/views.py`)
   use the same `categorical_colours(n_experts)`.
4. **`plot_circuit` / `Circuit.plot`** — the faithfulness axis now reads "fraction of the refusal-score gap
   removed". **Open** (by design of the circuit search, not the figure): with `method="attribution"` marker
   sizes and the printed `(+0.04)` labels are the first-order estimates used for ranking, not measured effects.
5. **Units** — fixed: refusal scores are labelled log-odds (selection, ablation colour bar); refusal rates
   "(fraction of prompts)"; `plot_attribution_vs_exhaustive` names the hook (read off `PatchingResult`
   inputs) and the unit (normalised recovery, 1 = clean) on both axes.

Figures without hook names by nature (not problems): `plot_coefficient_sweep`, `plot_method_comparison`
(methods and steering strengths, with units: refusal rate, KL in nats) and `plot_benchmark`. Every other
figure names its hooks on an axis, a title or the tick labels.
"""

if __name__ == "__main__":
    main()
