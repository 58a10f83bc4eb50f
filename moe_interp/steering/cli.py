"""``moe-interp steer MODEL --vectors FILE --prompt "..."``: baseline and steered completions side by side."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any


def load_steering(path: str | Path, model: Any = None) -> Any:
    """Load a :class:`SteeringVectors` pair (``.safetensors`` + ``.json``) or a ``RouterSteering`` ``.json``."""
    from moe_interp.steering.methods import RouterSteering
    from moe_interp.steering.vectors import SteeringVectors

    p = Path(path)
    js = p if p.suffix == ".json" else p.with_name(p.name.removesuffix(".safetensors") + ".json")
    if not js.is_file():
        raise FileNotFoundError(f"steering file not found: {js}")
    try:
        fmt = json.loads(js.read_text()).get("format")
    except json.JSONDecodeError as err:
        raise ValueError(f"{js} is not valid JSON: {err}") from err
    gate = js.with_name(js.name.removesuffix(".json") + ".gate.pt")
    if gate.is_file():
        from moe_interp.steering.methods import TopicGatedSteering

        steer = TopicGatedSteering.load(js)
        if model is not None:
            steer.steer.check_compatible(model)
        return steer
    if fmt == "moe_interp.router_steering":
        steer = RouterSteering.load(js)
        if model is not None:
            steer.check_compatible(model)
        return steer
    return SteeringVectors.load(js, model=model)


def _side_by_side(left: str, right: str, width: int) -> str:
    a = textwrap.wrap(left.replace("\n", " ⏎ "), width) or [""]
    b = textwrap.wrap(right.replace("\n", " ⏎ "), width) or [""]
    n = max(len(a), len(b))
    a, b = a + [""] * (n - len(a)), b + [""] * (n - len(b))
    return "\n".join(f"{x:<{width}} │ {y}" for x, y in zip(a, b, strict=True))


def _steer(args: argparse.Namespace) -> int:
    from moe_interp.model import load

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    model = load(args.model)
    steer = load_steering(args.vectors, model)
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``steer`` sub-command."""
    p = sub.add_parser("steer", help="generate with and without steering vectors, side by side")
    p.add_argument("model", help="HF id or directory, 'tiny:<family>' or 'organism'")
    p.add_argument(
        "--vectors", required=True, help="steering file (.safetensors/.json pair, or router .json)"
    )
    p.add_argument("--prompt", action="append", required=True, help="instruction (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--coeff", type=float, default=None, help="multiply every stored coefficient by X")
    p.add_argument("--width", type=int, default=48, help="column width")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_steer)
