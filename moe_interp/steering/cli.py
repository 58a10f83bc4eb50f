"""``moe-interp steer MODEL --vectors FILE --prompt "..."``: baseline and steered completions side by side."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from moe_interp.errors import InputError, MissingFileError


def load_steering(path: str | Path, model: Any = None) -> Any:
    """Load any steering file: a :class:`SteeringVectors` pair (``.safetensors`` + ``.json``), a
    ``RouterSteering`` ``.json``, or a topic-gated set (the pair + ``.gate.safetensors`` / legacy ``.gate.pt``).

    With ``model``, the file is checked against it. Raises ``FileNotFoundError`` / ``ValueError`` naming the
    file and what was wrong.
    """
    from moe_interp.fileio import read_json_object
    from moe_interp.steering.files import ROUTER_FORMAT, gate_file
    from moe_interp.steering.methods import RouterSteering, TopicGatedSteering
    from moe_interp.steering.vectors import FORMAT_NAME, SteeringVectors

    p = Path(path)
    js = p if p.suffix == ".json" else p.with_name(p.name.removesuffix(".safetensors") + ".json")
    expected = f"a steering file ({FORMAT_NAME} .json + .safetensors pair, or {ROUTER_FORMAT} .json)"
    if not js.is_file():
        raise MissingFileError(f"steering file not found: {js}; expected {expected}")
    fmt = read_json_object(js, expected).get("format")
    if fmt == ROUTER_FORMAT:
        steer: Any = RouterSteering.load(js)
    elif fmt != FORMAT_NAME:
        raise InputError(f"{js}: 'format' is {fmt!r}; expected {FORMAT_NAME!r} or {ROUTER_FORMAT!r}")
    elif gate_file(js) is not None:
        steer = TopicGatedSteering.load(js)
    else:
        steer = SteeringVectors.load(js)
    if model is not None:
        check_steering(steer, model, js)
    return steer


def check_steering(steer: Any, model: Any, path: str | Path = "steering file") -> None:
    """Raise ``ValueError`` naming ``path`` unless ``steer`` (any :func:`load_steering` result) fits ``model``."""
    from moe_interp.steering.methods import TopicGatedSteering

    try:
        if isinstance(steer, TopicGatedSteering):
            steer.steer.check_compatible(model)
            model.check_layer(steer.gate_layer)
            if steer.gate.shape[0] != model.spec.d_model:
                raise InputError(
                    f"gate width {steer.gate.shape[0]} != the model's d_model {model.spec.d_model}"
                )
        else:
            steer.check_compatible(model)
    except ValueError as err:
        raise InputError(f"{path}: {err}") from err


def _side_by_side(left: str, right: str, width: int) -> str:
    a = textwrap.wrap(left.replace("\n", " ⏎ "), width) or [""]
    b = textwrap.wrap(right.replace("\n", " ⏎ "), width) or [""]
    n = max(len(a), len(b))
    a, b = a + [""] * (n - len(a)), b + [""] * (n - len(b))
    return "\n".join(f"{x:<{width}} │ {y}" for x, y in zip(a, b, strict=True))


def _steer(args: argparse.Namespace) -> int:
    """``moe-interp steer`` (arguments defined in :mod:`moe_interp.cli`)."""
    from moe_interp.cli import load_model

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    steer = load_steering(args.vectors)  # a bad file is reported before a large model loads
    model = load_model(args.model)
    check_steering(steer, model, args.vectors)
    if args.coeff is not None:
        if not hasattr(steer, "scaled"):
            raise ValueError("--coeff scales vector coefficients; router steering files have none.")
        steer = steer.scaled(args.coeff)
    prompts = args.prompt
    base = model.generate(prompts, max_new_tokens=args.max_new_tokens)
    with model.intervene(*steer.to_interventions()):
        steered = model.generate(prompts, max_new_tokens=args.max_new_tokens)
    if args.json:
        rows = [
            {"prompt": p, "baseline": b, "steered": s} for p, b, s in zip(prompts, base, steered, strict=True)
        ]
        print(json.dumps({"model": args.model, "vectors": str(args.vectors), "results": rows}, indent=2))
        return 0
    w = args.width
    print(f"{'baseline':<{w}} │ steered ({steer!r})"[: 2 * w + 3])
    for p, b, s in zip(prompts, base, steered, strict=True):
        print("─" * (2 * w + 3))
        print(f"prompt: {p}")
        print(_side_by_side(str(b), str(s), w))
    return 0
