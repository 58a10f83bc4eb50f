"""Input checks and label helpers shared by the figure modules: one-line ``ValueError`` on bad input."""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

__all__ = [
    "as_array",
    "check_same_shape",
    "clean_token",
    "full_hook",
    "is_instance",
    "tick_positions",
    "to_numpy",
]


def is_instance(x: Any, module: str, name: str) -> bool:
    """``isinstance(x, module.name)`` without importing ``module`` (if it is not loaded, ``x`` is not one)."""
    mod = sys.modules.get(module)
    return mod is not None and isinstance(x, getattr(mod, name))


def to_numpy(x: Any, name: str) -> np.ndarray:
    """A tensor / array / nested list as a float64 numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().float().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: could not convert to a numeric array ({err})") from err


def as_array(x: Any, name: str, ndim: int, allow_nan: bool = True) -> np.ndarray:
    """``x`` as a non-empty ``ndim``-D numeric array without infinities that is not all NaN."""
    arr = to_numpy(x, name)
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name}: array is empty (shape {tuple(arr.shape)})")
    if np.isinf(arr).any():
        raise ValueError(f"{name}: contains infinite values")
    nan = np.isnan(arr)
    if nan.all():
        raise ValueError(f"{name}: all values are NaN, nothing to plot")
    if not allow_nan and nan.any():
        raise ValueError(f"{name}: contains NaN values")
    return arr


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """One-line error when two arrays differ in shape."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def tick_positions(n: int, max_ticks: int = 24) -> np.ndarray:
    """At most ``max_ticks`` evenly strided tick positions in ``[0, n)``."""
    return np.arange(0, n, max(1, math.ceil(n / max_ticks)))


def clean_token(tok: str) -> str:
    """A token as a safe, visible tick label (mathtext escaped, whitespace shown)."""
    tok = tok.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    tok = tok.replace("$", r"\$")
    if tok.strip() == "":
        return "␣" * len(tok) if tok else "∅"
    return "␣" + tok[1:] if tok.startswith(" ") else tok


def full_hook(hook: str) -> str:
    """``'attn.hook_z'`` -> ``'blocks.{L}.attn.hook_z'`` (full templates are kept)."""
    return hook if hook.startswith("blocks.") else f"blocks.{{L}}.{hook}"
