"""The one figure style: colour-blind-safe palette and colour maps, rc parameters, saving as PDF + PNG.

Every figure of :mod:`moe_interp.figures` is a bare :class:`~matplotlib.figure.Figure` (no pyplot state)
with constrained layout, built inside :func:`style`. Signed values use ``RdBu_r`` centred at 0 with
symmetric limits; unsigned values ``viridis``; categories the Okabe–Ito palette, and a sampled ``viridis``
beyond its eight colours (:func:`categorical_colours`); NaN cells are light grey.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import numpy as np
from cycler import cycler
from matplotlib.colors import Colormap, TwoSlopeNorm, to_hex, to_rgb
from matplotlib.figure import Figure

from moe_interp.errors import InputError
from moe_interp.fileio import atomic_path

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

__all__ = [
    "CB_SAFE_CMAPS",
    "DIVERGING_CMAP",
    "GREY",
    "NAN_COLOUR",
    "OKABE_ITO",
    "SEQUENTIAL_CMAP",
    "STYLE",
    "categorical_colours",
    "cmap",
    "diverging_norm",
    "finish",
    "new_figure",
    "save_figure",
    "style",
    "text_colour_on",
]

#: Okabe-Ito colour-blind-safe categorical palette (black last: reserve it for references).
OKABE_ITO: list[str] = [
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#D55E00",  # vermillion
    "#F0E442",  # yellow
    "#000000",  # black
]

DIVERGING_CMAP = "RdBu_r"
SEQUENTIAL_CMAP = "viridis"
#: Colour maps that stay readable under the common colour-vision deficiencies (ColorBrewer RdBu / PuOr,
#: the perceptually uniform viridis / cividis), with their reversed versions.
CB_SAFE_CMAPS: frozenset[str] = frozenset(
    name + rev for name in ("RdBu", "PuOr", "viridis", "cividis") for rev in ("", "_r")
)
NAN_COLOUR = "#d9d9d9"
GREY = "#9e9e9e"

#: rc parameters applied (via :func:`style`) while every figure is built and saved.
STYLE: dict[RcKeyType, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.titlesize": 12,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.8,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "axes.prop_cycle": cycler(color=OKABE_ITO),
    "image.cmap": SEQUENTIAL_CMAP,
    "pdf.fonttype": 42,  # embed TrueType (editable text in Illustrator / journals)
    "ps.fonttype": 42,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.05,
}


@contextmanager
def style() -> Iterator[None]:
    """Apply :data:`STYLE` for the duration of the block (restores the caller's rc parameters)."""
    with mpl.rc_context(STYLE):
        yield


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A bare constrained-layout figure (call inside :func:`style`)."""
    return Figure(figsize=figsize, layout="constrained")


def categorical_colours(n: int) -> list[str]:
    """``n`` distinct colour-blind-safe colours: Okabe–Ito for ``n <= 8``, else ``viridis`` sampled evenly.

    Beyond eight categories no qualitative palette stays distinguishable; the sampled map keeps every
    colour distinct (label the categories directly as well).
    """
    if n < 0:
        raise ValueError(f"categorical_colours: n must be >= 0, got {n}")
    if n <= len(OKABE_ITO):
        return OKABE_ITO[:n]
    cm = mpl.colormaps[SEQUENTIAL_CMAP]
    return [to_hex(cm(i / (n - 1))) for i in range(n)]


def text_colour_on(colour: Any) -> str:
    """Black or white, whichever reads better on ``colour`` (WCAG relative luminance)."""
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
    lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "black" if lum > 0.179 else "white"


def cmap(name: str) -> Colormap:
    """Colour map ``name`` with NaN (masked) cells drawn in :data:`NAN_COLOUR`."""
    if name not in CB_SAFE_CMAPS:
        raise ValueError(f"colour map {name!r} is not colour-blind safe; use one of {sorted(CB_SAFE_CMAPS)}")
    return mpl.colormaps[name].with_extremes(bad=NAN_COLOUR)


def diverging_norm(data: np.ndarray, vmax: float | None = None) -> TwoSlopeNorm:
    """Symmetric norm centred at 0 (an honest colour scale for signed effects). A ``vmax`` given must be a
    finite number > 0; one taken from the data falls back to 1 where the data are all zero or NaN."""
    if vmax is not None:
        if isinstance(vmax, bool) or not isinstance(vmax, numbers.Real) or not (0 < vmax < math.inf):
            raise ValueError(f"vmax must be a finite number > 0 (or None: from the data), got {vmax!r}")
        return TwoSlopeNorm(vcenter=0.0, vmin=-float(vmax), vmax=float(vmax))
    vmax = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
    if not (vmax > 0 and math.isfinite(vmax)):
        vmax = 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)


def save_figure(fig: Figure, path_stem: str | Path) -> list[Path]:
    """Save ``fig`` as ``<path_stem>.pdf`` and ``<path_stem>.png`` (dpi 200); return both paths.

    Parent directories are created; a ``.pdf`` / ``.png`` suffix on ``path_stem`` is stripped.
    """
    stem = Path(path_stem)
    if stem.suffix.lower() in {".pdf", ".png"}:
        stem = stem.with_suffix("")
    if not stem.name:
        raise ValueError(f"save_figure: invalid path stem {str(path_stem)!r}")
    pdf, png = stem.parent / f"{stem.name}.pdf", stem.parent / f"{stem.name}.png"
    created = [d for d in (stem.parent, *stem.parent.parents) if not d.exists()]
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        # both files land together, or neither: a failure leaves the user's earlier pair as it was
        with style(), atomic_path(pdf) as t_pdf, atomic_path(png) as t_png:
            fig.savefig(t_pdf, format="pdf", dpi=200, bbox_inches="tight", pad_inches=0.05)
            fig.savefig(t_png, format="png", dpi=200, bbox_inches="tight", pad_inches=0.05)
    except BaseException as err:
        for d in created:  # deepest first: only the folders this call made, and only if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        if not isinstance(err, OSError):
            raise
        raise InputError(
            f"cannot save the figure as {stem}.pdf / .png ({err.strerror or err}); pass a writable folder and a "
            "file-name stem"
        ) from None
    return [pdf, png]


def finish(fig: Figure, title: str | None, save_to: str | Path | None) -> Figure:
    """Add the suptitle and save (when ``save_to`` is given)."""
    if title:
        fig.suptitle(title)
    if save_to is not None:
        save_figure(fig, save_to)
    return fig
