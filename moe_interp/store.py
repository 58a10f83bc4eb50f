"""A result store that cannot execute code: JSON for structure, safetensors for tensors.

``save_tree(stem, obj, header)`` writes ``<stem>.json`` and ``<stem>.safetensors``; ``load_tree`` reads
them back. Plain values (None, bool, int, float — NaN and ±inf included — str), lists, tuples, dicts and
tensors are stored as such; dataclass instances only when their class is named in :data:`STORABLE` (an
allow-list: a file can name a class, but only these can be built, with their own fields). Nothing is
unpickled, so a planted file can at worst make loading fail. ``read_header`` reads the JSON header alone,
so a caller can check a fingerprint before touching the tensors.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from moe_interp.errors import InputError
from moe_interp.fileio import atomic_path

__all__ = ["STORABLE", "StoreError", "load_tree", "read_header", "save_tree"]

#: dataclasses a stored tree may contain: name in the file -> "module:qualname"
STORABLE: dict[str, str] = {
    "PatchingResult": "moe_interp.patching.activation:PatchingResult",
    "ExpertAblationResult": "moe_interp.patching.ablation:ExpertAblationResult",
    "Circuit": "moe_interp.circuits:Circuit",
}

_FORMAT = "moe_interp.store/1"


class StoreError(InputError):
    """A stored result that cannot be read back (damaged, foreign, or naming an unknown class)."""


def _class_name(obj: Any) -> str:
    name = type(obj).__name__
    if STORABLE.get(name) != f"{type(obj).__module__}:{type(obj).__qualname__}":
        raise TypeError(f"Cannot store a {type(obj).__qualname__}; storable dataclasses: {sorted(STORABLE)}.")
    return name


def _encode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()  # clone: no shared storage
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _encode(getattr(obj, f.name), tensors) for f in dataclasses.fields(obj) if f.init}
        return {"__dataclass__": _class_name(obj), "fields": fields}
    raise TypeError(f"Cannot store a value of type {type(obj).__qualname__}.")


def _storable_class(name: Any) -> type:
    target = STORABLE.get(name) if isinstance(name, str) else None
    if target is None:
        raise StoreError(f"stored class {name!r} is not storable; storable dataclasses: {sorted(STORABLE)}")
    module, qualname = target.split(":")
    return getattr(importlib.import_module(module), qualname)


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors:
            raise StoreError(f"stored tensor {key!r} is missing from the .safetensors file")
        return tensors[key]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_freeze(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__dataclass__" in obj:
        cls = _storable_class(obj["__dataclass__"])
        fields = obj.get("fields")
        if not isinstance(fields, dict):
            raise StoreError(f"stored {obj['__dataclass__']} has no fields object")
        allowed = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(fields) - allowed
        if unknown:
            raise StoreError(f"stored {obj['__dataclass__']} has unknown fields {sorted(unknown)}")
        return cls(**{k: _decode(v, tensors) for k, v in fields.items()})
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _freeze(key: Any) -> Any:
    """Dict keys read back from JSON lists become tuples (hashable), as they were written."""
    return tuple(_freeze(k) for k in key) if isinstance(key, list) else key


def save_tree(stem: str | Path, obj: Any, header: dict[str, Any] | None = None) -> list[Path]:
    """Write ``obj`` to ``<stem>.json`` (+ ``<stem>.safetensors`` when it holds tensors); returns the paths.

    The tensors file is written first and the JSON last, so a JSON file that exists names a complete result;
    the previous result is removed only once the new tensors are written.
    """
    from safetensors.torch import save_file

    stem = Path(stem)
    tensors: dict[str, Tensor] = {}
    doc = {"format": _FORMAT, "header": header or {}, "tree": _encode(obj, tensors)}
    text = json.dumps(doc, allow_nan=True)
    stem.parent.mkdir(parents=True, exist_ok=True)
    js, st = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")
    written = []
    if tensors:
        with atomic_path(st) as tmp:
            try:
                save_file(tensors, str(tmp))  # a failure here leaves the previous result whole
            except (KeyError, TypeError, ValueError) as err:
                dtypes = sorted({str(t.dtype) for t in tensors.values()})
                raise StoreError(f"cannot store tensors of dtypes {dtypes} in {st} ({err!r})") from None
            js.unlink(missing_ok=True)  # an old header must never name the new tensors (interrupted next)
        written.append(st)
    else:
        js.unlink(missing_ok=True)
        st.unlink(missing_ok=True)
    with atomic_path(js) as tmp:
        tmp.write_text(text)
    return [js, *written]


def _read_doc(stem: Path) -> dict[str, Any]:
    js = stem.with_name(stem.name + ".json")
    try:
        doc = json.loads(js.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{js} is not a readable stored result ({type(err).__name__}: {err})") from err
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or not isinstance(doc.get("header"), dict):
        raise StoreError(f"{js} is not a moe-interp stored result (expected format {_FORMAT!r})")
    return doc


def read_header(stem: str | Path) -> dict[str, Any]:
    """The header stored with a result, without reading its tensors."""
    return _read_doc(Path(stem))["header"]


def load_tree(stem: str | Path) -> Any:
    """Read what :func:`save_tree` wrote; :class:`StoreError` for a damaged or foreign file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    stem = Path(stem)
    doc = _read_doc(stem)
    st = stem.with_name(stem.name + ".safetensors")
    tensors: dict[str, Tensor] = {}
    if st.exists():
        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError, ValueError) as err:
            raise StoreError(f"{st} is not a readable .safetensors file ({err})") from err
    try:
        return _decode(doc["tree"], tensors)
    except (TypeError, ValueError) as err:
        if isinstance(err, StoreError):
            raise
        raise StoreError(f"{stem}.json does not match the stored result's shape ({err})") from err
