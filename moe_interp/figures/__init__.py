"""Publication figures for MoE interpretability results, one module per figure family.

Every function returns a bare :class:`matplotlib.figure.Figure` (no pyplot state, safe headless and inline
in Jupyter) built in the one style of :mod:`moe_interp.figures.style`, and saves it as PDF + PNG with
``save_to=``. Functions take the library's result types (:class:`~moe_interp.circuits.Circuit`,
:class:`~moe_interp.patching.activation.PatchingResult`, :class:`~moe_interp.refusal.selection.SelectionResult`,
:class:`~moe_interp.dla.DLAResult`, ...) or plain arrays, and raise a one-line ``ValueError`` on bad input.
"""

from moe_interp.figures.benchmark import plot_benchmark
from moe_interp.figures.circuit import plot_circuit
from moe_interp.figures.patching import (
    DEFAULT_RECOVERY_LABEL,
    RISK_DIFF_LABEL,
    plot_attribution_vs_exhaustive,
    plot_expert_heatmap,
    plot_layer_head_heatmap,
    plot_layer_position_heatmap,
)
from moe_interp.figures.routing import plot_routing, plot_routing_difference
from moe_interp.figures.selection import plot_selection_scores
from moe_interp.figures.steering import plot_coefficient_sweep, plot_method_comparison
from moe_interp.figures.style import (
    CB_SAFE_CMAPS,
    DIVERGING_CMAP,
    GREY,
    NAN_COLOUR,
    OKABE_ITO,
    SEQUENTIAL_CMAP,
    STYLE,
    categorical_colours,
    save_figure,
    style,
)
from moe_interp.figures.tracing import plot_attention, plot_dla_heatmap, plot_dla_tokens, plot_logit_lens

__all__ = [
    "CB_SAFE_CMAPS",
    "DEFAULT_RECOVERY_LABEL",
    "DIVERGING_CMAP",
    "GREY",
    "NAN_COLOUR",
    "OKABE_ITO",
    "RISK_DIFF_LABEL",
    "SEQUENTIAL_CMAP",
    "STYLE",
    "categorical_colours",
    "plot_attention",
    "plot_attribution_vs_exhaustive",
    "plot_benchmark",
    "plot_circuit",
    "plot_coefficient_sweep",
    "plot_dla_heatmap",
    "plot_dla_tokens",
    "plot_expert_heatmap",
    "plot_layer_head_heatmap",
    "plot_layer_position_heatmap",
    "plot_logit_lens",
    "plot_method_comparison",
    "plot_routing",
    "plot_routing_difference",
    "plot_selection_scores",
    "save_figure",
    "style",
]
