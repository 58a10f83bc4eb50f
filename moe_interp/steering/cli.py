"""``moe-interp steer MODEL --vectors FILE --prompt "..."``: baseline and steered completions side by side."""

from __future__ import annotations

import argparse
import json
import textwrap

from moe_interp.steering.formats import check_steering, load_steering

__all__ = ["check_steering", "load_steering"]  # re-exported: the file-format registry is in formats.py


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
        steer = steer.scaled(args.coeff)  # router steering has no coefficient: ValueError saying so
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
