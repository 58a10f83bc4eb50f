"""Circuit-tracing figures (kept for existing imports): a re-export of :mod:`moe_interp.figures.tracing`
and :func:`~moe_interp.figures.routing.plot_routing`."""

from moe_interp.figures.routing import plot_routing
from moe_interp.figures.tracing import plot_attention, plot_dla_heatmap, plot_dla_tokens, plot_logit_lens

__all__ = ["plot_attention", "plot_dla_heatmap", "plot_dla_tokens", "plot_logit_lens", "plot_routing"]
