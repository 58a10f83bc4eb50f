"""Errors that mean "the input was wrong", which ``moe-interp`` reports in one line instead of a traceback.

Each class also derives from the built-in exception callers already catch (``ValueError``,
``FileNotFoundError``, ``ImportError``), so ``except ValueError`` keeps working. This module imports nothing
heavy: the command line reads it before deciding whether torch is needed.
"""

from __future__ import annotations

__all__ = [
    "InputError",
    "MissingDependencyError",
    "MissingFileError",
    "MoEInterpError",
    "NonFiniteOutputError",
]


class MoEInterpError(Exception):
    """Base class: a problem with what the user gave (a file, an argument, the installation), not a bug."""


class InputError(MoEInterpError, ValueError):
    """A file or argument has the wrong content; the message names the file/field and what is accepted."""


class MissingFileError(MoEInterpError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class MissingDependencyError(MoEInterpError, ImportError):
    """An optional Python package needed by the command is not installed."""


class NonFiniteOutputError(MoEInterpError, FloatingPointError):
    """Interventions turned the model's finite logits into NaN/inf (e.g. a huge steering coefficient)."""
