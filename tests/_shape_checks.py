"""Run-time checks of the package's jaxtyping annotations (``Float[Tensor, "batch pos d_model"]``) in the tests.

:func:`install` (called by ``conftest.py`` before ``moe_interp`` is imported) puts jaxtyping's import hook on
:data:`SHAPE_CHECKED`: every function and dataclass of those modules is wrapped in ``jaxtyped`` with the
checker :func:`shapes_only`, so array arguments and return values must match their dtype and shape, with
dimension names consistent across the arguments and the return value of one call.

Scope, measured on tests/test_{adapter,dla,steering_vectors,ablation}.py (shared 2-core machine, one torch
thread, pytest time; run-to-run noise about ±15 %):

* the whole package: +60–95 %, as every helper on the forward path is wrapped (``tracing``, ``hooks``,
  ``guards``, edit closures). With plain ``beartype.beartype`` it fails already at import
  (``families.FamilySpec.router_adapter`` is a ``Protocol`` that is not runtime-checkable), and tests that
  pass invalid values (a ``Literal`` position scope, a 2-D vector) get a ``TypeCheckError`` instead of the
  library's own ``ValueError`` (20 of tests/test_steering_vectors.py);
* adding ``model``, ``interventions`` and ``adapters`` (few annotations, on the per-hook path): +40 %, so
  they are left out;
* :data:`SHAPE_CHECKED` (the other modules with jaxtyping annotations): +0–25 %, and every test passes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar, get_args

#: modules whose jaxtyping annotations are checked (see the module docstring for what is left out and why)
SHAPE_CHECKED: tuple[str, ...] = (
    "moe_interp.benchmark",
    "moe_interp.dla",
    "moe_interp.experts",
    "moe_interp.lens",
    "moe_interp.organisms.planted",
    "moe_interp.organisms.planted_check",
    "moe_interp.organisms.planted_net",
    "moe_interp.patching.ablation",
    "moe_interp.patching.activation",
    "moe_interp.patching.routing",
    "moe_interp.path_patching",
    "moe_interp.prefix",
    "moe_interp.refusal",
    "moe_interp.remote",
    "moe_interp.steering",
    "moe_interp.tl_compat",
    "moe_interp.views",
)

#: entry points that check the shapes of their inputs themselves: their tests expect that ``ValueError``
NOT_CHECKED: frozenset[str] = frozenset(
    {
        "moe_interp.patching.routing.routing_predicts_ablation",  # test_routing.py
        "moe_interp.refusal.directions.pca_direction",  # test_directions.py
        "moe_interp.refusal.judges.refusal_score",  # test_judges.py
        "moe_interp.refusal.orthogonalize.orthogonalize",  # test_orthogonalize.py
        "moe_interp.refusal.stats.StreamingMoments.update",  # test_directions.py
        "moe_interp.steering.autotune.layer_correlation",  # test_autotune.py
    }
)

F = TypeVar("F", bound=Callable[..., Any])


def _has_array(hint: Any) -> bool:
    from jaxtyping import AbstractArray

    if isinstance(hint, type) and issubclass(hint, AbstractArray):
        return True
    return any(_has_array(arg) for arg in get_args(hint))


def shapes_only(fn: F) -> F:
    """``beartype`` on the annotations that contain a jaxtyping array type; the others are not checked.

    The library validates its other inputs itself (``ValueError`` with a message the tests match), so a
    full check would only replace those errors; so do the functions in :data:`NOT_CHECKED`. Constructors (``__init__``, dataclass ones included) are
    not checked either: a dataclass normalises its fields in ``__post_init__`` (``torch.as_tensor``,
    validation), after the generated ``__init__`` whose arguments the hook would check.
    """
    from beartype import beartype

    name = getattr(fn, "__name__", "")
    if (
        name == "__init__"
        or f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', name)}" in NOT_CHECKED
    ):
        return fn
    hints = getattr(fn, "__annotations__", None) or {}
    fn.__annotations__ = {k: (v if _has_array(v) else Any) for k, v in hints.items()}
    return beartype(fn)


_installed = False


def install() -> None:
    """Put the import hook on :data:`SHAPE_CHECKED`; must run before any of them is imported. Once: test
    modules that import ``tests.conftest`` run conftest.py a second time."""
    global _installed
    from jaxtyping import install_import_hook

    if _installed:
        return
    _installed = True
    early = sorted(m for m in sys.modules for p in SHAPE_CHECKED if m == p or m.startswith(p + "."))
    if early:
        raise RuntimeError(f"imported before the jaxtyping import hook, so not checked: {early}")
    install_import_hook(list(SHAPE_CHECKED), f"{__name__}.shapes_only")
