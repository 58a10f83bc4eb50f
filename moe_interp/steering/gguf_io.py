"""llama.cpp control-vector GGUF export / import.

Format (as written by repeng and read by llama.cpp's ``common_control_vector_load``): GGUF with
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (str), ``controlvector.layer_count``
(uint32, number of direction tensors) and one float32 ``[d_model]`` tensor ``direction.<N>`` per layer.

Layer convention: llama.cpp adds ``direction.N`` to the output of its (0-indexed) layer ``N``
(``build_cvec(cur, il)`` right after the layer's residual add); ``direction.0`` is rejected by the loader.
So, with ``L`` the 0-indexed block:

* ``blocks.L.hook_resid_post`` <-> ``direction.L``   (requires ``L >= 1``)
* ``blocks.L.hook_resid_pre``  <-> ``direction.{L-1}`` (requires ``L >= 2``; it is block ``L-1``'s output)

Both map to the same residual stream point, so they are summed when both are present (as llama.cpp does for
repeated directions). Vectors are multiplied by their coefficient. llama.cpp applies the vector at every
position, so the position scope cannot be exported; a non-``"all"`` scope raises unless
``allow_position_scope=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.errors import InputError, MissingFileError
from moe_interp.fileio import atomic_path
from moe_interp.steering.keys import encode_key, parse_hook_name
from moe_interp.steering.vectors import SteeringVectors

ARCH = "controlvector"


def residual_key_to_gguf_layer(hook_name: str) -> int:
    """llama.cpp ``direction.N`` index for a residual-stream hook; ``ValueError`` if it has none."""
    p = parse_hook_name(hook_name)
    if not p.is_residual:
        raise ValueError(f"{hook_name} is not a residual-stream hook")
    n = p.layer if p.kind == "resid_post" else p.layer - 1
    if n < 1:
        raise ValueError(
            f"{hook_name} maps to llama.cpp direction.{n}, which llama.cpp cannot load "
            "(control vectors start at direction.1 = output of block 1)"
        )
    return n


def export_control_vector_gguf(
    sv: SteeringVectors, path: str | Path, *, allow_position_scope: bool = False
) -> Path:
    """Write the residual-stream vectors of ``sv`` (times their coefficients) as a llama.cpp control vector.

    Raises ``ValueError`` listing any non-residual keys (attn/mlp/expert hooks have no GGUF equivalent) or
    residual keys that map below ``direction.1``.
    """
    if sv.operation != "add":
        raise ValueError(
            f"operation={sv.operation!r} cannot be expressed as a llama.cpp control vector (additive)"
        )
    if sv.conditioning != "none":
        raise ValueError(
            f"conditioning={sv.conditioning!r} cannot be expressed as a llama.cpp control vector"
        )
    if sv.positions != "all" and not allow_position_scope:
        raise ValueError(
            f"positions={sv.positions!r}: llama.cpp applies control vectors at every position; "
            "pass allow_position_scope=True to export anyway"
        )
    non_resid = [encode_key(k) for k in sv.keys if k[1] is not None or not parse_hook_name(k[0]).is_residual]
    if non_resid:
        raise ValueError(
            "only residual-stream keys (blocks.L.hook_resid_pre / hook_resid_post) can be exported to a "
            f"llama.cpp control vector; non-residual keys: {non_resid}"
        )
    directions: dict[int, Tensor] = {}
    bad: list[str] = []
    for k in sv.keys:
        try:
            n = residual_key_to_gguf_layer(k[0])
        except ValueError:
            bad.append(k[0])
            continue
        v = sv.effective(k).to(torch.float32)
        directions[n] = directions[n] + v if n in directions else v
    if bad:
        raise ValueError(
            f"keys {bad} map below llama.cpp direction.1 (output of block 1), which llama.cpp cannot load"
        )

    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a failed write leaves the user's file at ``path`` as it was
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", sv.metadata.family)
        writer.add_uint32(f"{ARCH}.layer_count", len(directions))
        for n in sorted(directions):
            writer.add_tensor(f"direction.{n}", directions[n].numpy().astype(np.float32, copy=True))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


_EXPECTED = "expected a llama.cpp control-vector GGUF (direction.<layer> float32 tensors)"


def _reader(path: str | Path) -> Any:
    """A ``GGUFReader`` of ``path``; a missing or unreadable file is a one-line error naming it."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"control vector file not found: {path}; {_EXPECTED}")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as err:
        raise InputError(f"{path} is not a readable GGUF ({err}); {_EXPECTED}") from None


def read_control_vector_gguf(path: str | Path) -> dict[int, Float[Tensor, " d_model"]]:
    """Read a llama.cpp control vector: ``{N: direction.N}`` as float32 tensors."""
    path = Path(path)
    reader = _reader(path)
    arch_field = reader.get_field("general.architecture")
    if arch_field is not None and arch_field.contents() != ARCH:
        raise ValueError(f"{path}: general.architecture is {arch_field.contents()!r}, expected {ARCH!r}")
    out: dict[int, Tensor] = {}
    for t in reader.tensors:
        prefix, _, idx = t.name.partition(".")
        if prefix != "direction" or not idx.isdigit():
            raise ValueError(f"{path}: unexpected tensor {t.name!r}, expected direction.<layer>")
        try:
            data = np.asarray(t.data)
        except (ValueError, IndexError) as err:  # a truncated file: the tensor data does not fit
            raise InputError(f"{path}: tensor {t.name} cannot be read ({err}); {_EXPECTED}") from None
        if data.dtype != np.float32:
            raise ValueError(f"{path}: {t.name} has dtype {data.dtype}, expected float32")
        out[int(idx)] = torch.from_numpy(data.reshape(-1).copy())
    return out


def read_control_vector_model_hint(path: str | Path) -> str | None:
    """``controlvector.model_hint`` of a control-vector GGUF, or ``None``."""
    f = _reader(path).get_field(f"{ARCH}.model_hint")
    return None if f is None else str(f.contents())
