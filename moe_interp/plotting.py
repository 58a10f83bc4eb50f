"""Publication figures (kept for existing imports): a re-export of :mod:`moe_interp.figures`.

New code can import from :mod:`moe_interp.figures` or its family modules (``figures.patching``,
``figures.circuit``, ``figures.steering``, ``figures.selection``, ``figures.routing``, ``figures.tracing``,
``figures.benchmark``; the style in ``figures.style``).
"""

from moe_interp import figures as _figures
from moe_interp.figures import *  # noqa: F403  (the same names, for existing imports)

__all__ = list(_figures.__all__)
