"""Reading and writing user files with errors that name the file, and saves that never leave half a file.

Readers raise :class:`~moe_interp.errors.MissingFileError` for a missing file and
:class:`~moe_interp.errors.InputError` (a ``ValueError``) for unreadable content, so the command line can
report them in one line. Heavy libraries (safetensors, torch) are imported only by the readers that need them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moe_interp.errors import InputError, MissingFileError

__all__ = [
    "atomic_path",
    "read_json_object",
    "read_safetensors",
    "read_safetensors_with_metadata",
    "read_torch_file",
]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    On an exception the file the user had at ``path`` (if any) is left as it was.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; errors name ``path`` and ``what`` was expected."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found; expected {what}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise InputError(f"{path} is not valid JSON ({err!s:.120}); expected {what}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path} holds a JSON {type(doc).__name__}; expected {what} (a JSON object)")
    return doc


def read_safetensors(path: Path) -> dict[str, Any]:
    """All tensors of a ``.safetensors`` file; ``InputError`` naming it if truncated or not safetensors."""
    return read_safetensors_with_metadata(path)[0]


def read_safetensors_with_metadata(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors of a ``.safetensors`` file and the string metadata of its header."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MissingFileError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as err:
        raise InputError(
            f"{path} is not a readable .safetensors file (truncated or corrupt?): {err}"
        ) from err


def read_torch_file(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``; ``InputError`` naming it if truncated or not a torch file."""
    import pickle

    import torch

    if not path.is_file():
        raise MissingFileError(f"{path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        # not the message itself: torch's advice to retry with weights_only=False would run arbitrary code
        raise InputError(
            f"{path} is not a readable torch file holding only tensors and numbers (truncated or corrupt?): "
            f"{type(err).__name__}"
        ) from err
