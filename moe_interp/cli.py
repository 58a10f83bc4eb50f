"""``moe-interp`` command line: inspect | evaluate | locate | steer | plan | train-organism.

Each sub-command lives next to the code it drives and registers itself through a ``register(subparsers)``
function listed in :data:`COMMAND_MODULES` (a registry, not a branch per command).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

#: modules that define ``register(subparsers)``; each adds one or more sub-commands
COMMAND_MODULES: list[str] = [
    "moe_interp.cli",
    "moe_interp.steering.cli",
    "moe_interp.plan",
    "moe_interp.refusal.cli",
    "moe_interp.pipeline",
]


def _inspect(args: argparse.Namespace) -> int:
    from moe_interp.hooks import BLOCK_SITES, GLOBAL_SITES
    from moe_interp.model import load

    model = load(args.model)
    names = model.hook_names()
    if args.json:
        print(json.dumps({"model": args.model, "spec": model.spec.to_dict(), "hook_names": names}, indent=2))
        return 0
    print(repr(model))
    for k, v in model.spec.to_dict().items():
        print(f"  {k:22s} {v}")
    print("\nHook sites (per block):")
    for k, v in {**GLOBAL_SITES, **BLOCK_SITES}.items():
        print(f"  {k:28s} {v}")
    print(f"\n{len(names)} hook points:")
    for n in names:
        print(f"  {n}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print a model's spec and hook names")
    p.add_argument("model", help="HF id or directory, 'tiny:<family>' or 'organism'")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-interp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as err:
        print(f"moe-interp {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
