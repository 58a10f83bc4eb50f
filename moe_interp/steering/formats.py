"""One registry of steering file formats: :func:`load_steering` reads any steering file through it.

Every file set has a JSON file whose ``format`` field names its kind; formats that share a tag are told apart
by the files beside it (a topic gate is a vector pair plus ``<path>.gate.safetensors``). The first entry of
:data:`FORMATS` whose tag and files match is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moe_interp.errors import InputError, MissingFileError
from moe_interp.fileio import read_json_object
from moe_interp.steering.edits import RouterSteering, TopicGatedSteering
from moe_interp.steering.files import ROUTER_FORMAT, gate_file
from moe_interp.steering.protocol import Steering
from moe_interp.steering.vectors import FORMAT_NAME, SteeringVectors

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = ["FORMATS", "FileFormat", "check_steering", "load_steering"]


def _always(js: Path) -> bool:
    return True


@dataclass(frozen=True)
class FileFormat:
    """A steering file format: the JSON ``format`` tag, the loader, and a test of the files beside the JSON."""

    tag: str
    load: Callable[[Path], Steering]
    description: str
    applies: Callable[[Path], bool] = _always


#: Every steering file format, most specific first.
FORMATS: tuple[FileFormat, ...] = (
    FileFormat(
        FORMAT_NAME,
        TopicGatedSteering.load,
        "topic-gated set (.json + .safetensors + .gate.safetensors)",
        lambda js: gate_file(js) is not None,
    ),
    FileFormat(FORMAT_NAME, SteeringVectors.load, ".json + .safetensors pair"),
    FileFormat(ROUTER_FORMAT, RouterSteering.load, ".json"),
)


def _expected() -> str:
    kinds = dict.fromkeys(f"{f.tag} {f.description}" for f in FORMATS)
    return "a steering file (" + ", or ".join(kinds) + ")"


def load_steering(path: str | Path, model: MoEModel | None = None) -> Steering:
    """Load any steering file through :data:`FORMATS`: a :class:`SteeringVectors` pair, a ``RouterSteering``
    ``.json`` or a topic-gated set (the pair + ``.gate.safetensors`` / legacy ``.gate.pt``).

    With ``model``, the file is checked against it. Raises ``FileNotFoundError`` / ``ValueError`` naming the
    file and what was wrong.
    """
    p = Path(path)
    js = p if p.suffix == ".json" else p.with_name(p.name.removesuffix(".safetensors") + ".json")
    if not js.is_file():
        raise MissingFileError(f"steering file not found: {js}; expected {_expected()}")
    tag = read_json_object(js, _expected()).get("format")
    fmt = next((f for f in FORMATS if f.tag == tag and f.applies(js)), None)
    if fmt is None:
        tags = " or ".join(repr(t) for t in dict.fromkeys(f.tag for f in FORMATS))
        raise InputError(f"{js}: 'format' is {tag!r}; expected {tags}")
    steer = fmt.load(js)
    if model is not None:
        check_steering(steer, model, js)
    return steer


def check_steering(steer: Steering, model: MoEModel, path: str | Path = "steering file") -> None:
    """Raise ``ValueError`` naming ``path`` unless ``steer`` fits ``model`` (its ``check_compatible``)."""
    try:
        steer.check_compatible(model)
    except ValueError as err:
        raise InputError(f"{path}: {err}") from err
