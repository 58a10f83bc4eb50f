"""Jupyter views for circuit tracing: attention patterns, token × layer routing, DLA per token.

Each view is a small dataclass with ``_repr_html_`` (self-contained HTML and CSS: no JavaScript, no
network, every token escaped) and a static matplotlib twin (``figure()``, ``save(path_stem)`` → PDF + PNG
in the :mod:`moe_interp.plotting` style). Hover a cell for its exact value.

circuitsvis (``pip install circuitsvis``; needs numpy, torch, importlib-metadata) renders richer attention
views; :meth:`AttentionView.to_circuitsvis` returns one when it is installed. It is not a dependency: its
HTML pings google.com to choose between a 1.3 MB inline bundle and a CDN script, and it places token
text inside a ``<script>`` unescaped.
"""

from __future__ import annotations

import html
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from matplotlib.figure import Figure
from torch import Tensor

from moe_interp.figures_dla import plot_attention, plot_dla_tokens, plot_routing
from moe_interp.lens import decode_tokens
from moe_interp.plotting import OKABE_ITO, categorical_colours, save_figure

if TYPE_CHECKING:
    from moe_interp.dla import DLAResult
    from moe_interp.model import MoEModel

__all__ = ["AttentionView", "DLAView", "RoutingView", "attention_view", "dla_view", "routing_view"]

_CSS = (
    "<style>.mi-view table{border-collapse:collapse;font:11px monospace}"
    ".mi-view td,.mi-view th{border:1px solid #ddd;padding:2px 4px;text-align:center;white-space:pre}"
    ".mi-view .chip{display:inline-block;border-radius:3px;padding:0 3px;margin:1px;color:#000}</style>"
)


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _tok(t: str) -> str:
    """A token for display: escaped, with newlines and tabs shown."""
    return _esc(t.replace("\n", "\\n").replace("\t", "\\t"))


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{min(max(alpha, 0.0), 1.0):.3f})"


def _signed(value: float, vmax: float) -> str:
    """Background for a signed value: vermillion positive, blue negative (Okabe–Ito), alpha by |value|."""
    colour = OKABE_ITO[5] if value >= 0 else OKABE_ITO[0]
    return _rgba(colour, abs(value) / vmax if vmax > 0 else 0.0)


class _View:
    def figure(self) -> Figure:
        raise NotImplementedError

    def save(self, path_stem: str | Path) -> list[Path]:
        """Write the static twin as ``<path_stem>.pdf`` and ``.png``."""
        return save_figure(self.figure(), path_stem)


@dataclass
class AttentionView(_View):
    """Attention patterns of chosen heads of one layer for one prompt (``blocks.L.attn.hook_pattern``)."""

    tokens: list[str]
    pattern: Float[Tensor, "head q k"]
    layer: int
    heads: list[int]

    def _repr_html_(self) -> str:
        n = len(self.tokens)
        blocks = []
        for i, h in enumerate(self.heads):
            head = ["<tr><th></th>" + "".join(f"<th>{_tok(t)}</th>" for t in self.tokens) + "</tr>"]
            for q in range(n):
                cells = "".join(
                    f'<td style="background:{_rgba(OKABE_ITO[0], float(self.pattern[i, q, k]))}" '
                    f'title="{_esc(f"{self.tokens[q]!r} → {self.tokens[k]!r}: {float(self.pattern[i, q, k]):.3f}")}">'
                    "</td>"
                    for k in range(n)
                )
                head.append(f"<tr><th>{_tok(self.tokens[q])}</th>{cells}</tr>")
            blocks.append(
                f"<details{' open' if i == 0 else ''}><summary>head {h}</summary><table>{''.join(head)}"
                "</table></details>"
            )
        title = f"<p><code>blocks.{self.layer}.attn.hook_pattern</code>: query (rows) × key (columns)</p>"
        return f'<div class="mi-view">{_CSS}{title}{"".join(blocks)}</div>'

    def figure(self) -> Figure:
        return plot_attention(self.tokens, self.pattern, self.layer, self.heads)

    def to_circuitsvis(self) -> Any:
        """A circuitsvis ``attention_patterns`` view (needs ``pip install circuitsvis``)."""
        if importlib.util.find_spec("circuitsvis") is None:
            raise ImportError(
                "circuitsvis is not installed: pip install circuitsvis (or use this view's HTML)."
            )
        import circuitsvis as cv

        return cv.attention.attention_patterns(tokens=list(self.tokens), attention=self.pattern)


def attention_view(
    model: MoEModel, prompt: str, layer: int, heads: Sequence[int] | None = None, *, chat: bool = True
) -> AttentionView:
    """Run one prompt and view the attention patterns of ``heads`` (default all) of ``layer``."""
    info = model.layers[model.check_layer(layer)]
    name = f"blocks.{layer}.attn.hook_pattern"
    if name not in model.hook_names():
        raise ValueError(f"Layer {layer} has no attention heads ({name} is not a hook of this model).")
    hs = list(range(info.n_heads)) if heads is None else [int(h) for h in heads]
    bad = [h for h in hs if not 0 <= h < info.n_heads]
    if bad or not hs:
        raise ValueError(f"heads {bad or '[]'} out of range: layer {layer} has heads 0..{info.n_heads - 1}.")
    enc = model.tokenize([prompt], chat=chat)
    with torch.no_grad():
        _, cache = model.run_with_cache(enc, names=[name], return_type=None)
    return AttentionView(
        decode_tokens(model, enc["input_ids"])[0], cache[name][0, hs].float().cpu(), layer, hs
    )


@dataclass
class RoutingView(_View):
    """Which experts each token went to, with their weights, in every MoE layer (one prompt)."""

    tokens: list[str]
    layers: list[int]
    indices: Int[Tensor, "layer pos k"]
    weights: Float[Tensor, "layer pos k"]

    def _repr_html_(self) -> str:
        head = "<tr><th>token</th>" + "".join(f"<th>blocks.{L}.mlp</th>" for L in self.layers) + "</tr>"
        rows = []
        palette = categorical_colours(int(self.indices.max()) + 1 if self.indices.numel() else 0)
        for p, t in enumerate(self.tokens):
            cells = []
            for i in range(len(self.layers)):
                order = torch.argsort(self.weights[i, p], descending=True).tolist()
                chips = "".join(
                    f'<span class="chip" style="background:{_rgba(palette[int(self.indices[i, p, o])], 0.25 + 0.75 * float(self.weights[i, p, o]))}" '
                    f'title="expert {int(self.indices[i, p, o])}: weight {float(self.weights[i, p, o]):.4f}">'
                    f"e{int(self.indices[i, p, o])} {float(self.weights[i, p, o]):.2f}</span>"
                    for o in order
                )
                cells.append(f"<td>{chips}</td>")
            rows.append(f"<tr><th>{_tok(t)}</th>{''.join(cells)}</tr>")
        title = "<p>Routing (<code>hook_expert_indices</code>, <code>hook_expert_weights</code>)</p>"
        return f'<div class="mi-view">{_CSS}{title}<table>{head}{"".join(rows)}</table></div>'

    def figure(self) -> Figure:
        return plot_routing(self.tokens, self.layers, self.indices, self.weights)


def routing_view(model: MoEModel, prompt: str, *, chat: bool = True) -> RoutingView:
    """Run one prompt and view its routing in every MoE layer."""
    layers = list(model.spec.moe_layers)
    if not layers:
        raise ValueError("This model has no MoE layers.")
    names = [f"blocks.{L}.mlp.hook_expert_{s}" for L in layers for s in ("indices", "weights")]
    enc = model.tokenize([prompt], chat=chat)
    with torch.no_grad():
        _, cache = model.run_with_cache(enc, names=names, return_type=None)
    idx = torch.stack([cache[f"blocks.{L}.mlp.hook_expert_indices"][0].long() for L in layers])
    w = torch.stack([cache[f"blocks.{L}.mlp.hook_expert_weights"][0] for L in layers])
    return RoutingView(
        decode_tokens(model, enc["input_ids"])[0], layers, idx.cpu(), w.gather(-1, idx).float().cpu()
    )


@dataclass
class DLAView(_View):
    """Per token of one prompt: the logit difference and its ``k`` largest direct contributions."""

    result: DLAResult
    batch: int = 0
    k: int = 3

    def _repr_html_(self) -> str:
        r, b = self.result, self.batch
        keep = r.attention_mask[b].bool()
        vmax = float(r.values[:, b][:, keep].abs().max()) if keep.any() else 1.0
        dmax = float(r.logit_diff[b][keep].abs().max()) if keep.any() else 1.0
        rows = []
        for p, t in enumerate(r.str_tokens[b]):
            if not keep[p]:
                continue
            v = r.values[:, b, p]
            top = v.abs().argsort(descending=True)[: self.k].tolist()
            chips = "".join(
                f'<span class="chip" style="background:{_signed(float(v[c]), vmax)}" '
                f'title="{_esc(r.labels[c])}: {float(v[c]):+.5f}">{_esc(r.labels[c])} {float(v[c]):+.3f}</span>'
                for c in top
            )
            d = float(r.logit_diff[b, p])
            rows.append(
                f"<tr><td>{p}</td><th>{_tok(t)}</th>"
                f'<td style="background:{_signed(d, dmax)}">{d:+.3f}</td><td style="text-align:left">{chips}</td></tr>'
            )
        title = f"<p>Direct logit attribution of <b>{_esc(r.direction.label)}</b> per token (logits)</p>"
        head = "<tr><th>pos</th><th>token</th><th>logit diff</th><th>largest contributions</th></tr>"
        return f'<div class="mi-view">{_CSS}{title}<table>{head}{"".join(rows)}</table></div>'

    def figure(self) -> Figure:
        return plot_dla_tokens(self.result, batch=self.batch)


def dla_view(result: DLAResult, batch: int = 0, k: int = 3) -> DLAView:
    """View one prompt of a :class:`~moe_interp.dla.DLAResult` per token."""
    if not 0 <= batch < result.values.shape[1]:
        raise ValueError(f"batch {batch} is out of range: the result has {result.values.shape[1]} prompt(s).")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (contributions shown per token), got {k!r}.")
    return DLAView(result, batch, k)
