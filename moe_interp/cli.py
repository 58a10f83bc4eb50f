"""``moe-interp`` command line: locate | steer | evaluate | inspect | plan.

Every argument is defined here, in a module that imports nothing heavy, so ``--help`` answers at once; each
command's handler is named as ``"module:function"`` and imported only when the command runs. Bad input
(a truncated file, a missing field, a model folder without a tokenizer, a missing package) ends in one line,
``moe-interp <command>: error: …``, and exit status 2; ``--debug`` (or ``MOE_INTERP_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moe_interp.config import NAMED_MODELS
from moe_interp.errors import InputError, MissingDependencyError, MissingFileError, MoEInterpError

__all__ = ["HANDLERS", "build_parser", "check_model_source", "load_model", "main"]

MODEL_HELP = "HF id (org/name) or model folder, 'tiny:<family>', 'organism' or 'smollm_moe'"

PROMPT_FORMATS = """\
prompt files (--harmful, --harmless, --prompts), by extension:
  .json   a list of strings, or of objects with an 'instruction', 'goal' or 'prompt' key
          (the list may also sit under a "prompts", "instructions" or "data" key)
  .jsonl  one such string or object per line
  .txt    one prompt per line (blank lines skipped)
  .csv    a column named 'instruction', 'goal' or 'prompt'"""

EPILOG = f"""\
'locate' is the main job: the refusal-circuit pipeline, on the built-in organism by default.

{PROMPT_FORMATS}

The organism is trained with `python -m moe_interp.organisms.train` (not a sub-command).
Errors are one line; --debug or MOE_INTERP_DEBUG=1 shows the traceback."""

#: command -> "module:function" run with the parsed arguments (imported only when the command runs)
HANDLERS: dict[str, str] = {
    "locate": "moe_interp.pipeline:_locate",
    "steer": "moe_interp.steering.cli:_steer",
    "evaluate": "moe_interp.refusal.cli:_evaluate",
    "inspect": "moe_interp.cli:_inspect",
    "plan": "moe_interp.plan:_run",
    "benchmark": "moe_interp.benchmark:_benchmark",
}

#: errors that mean "bad input" and get one line; anything else is a bug and keeps its traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    MoEInterpError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

#: import name -> pip name, where they differ
PIP_NAMES: dict[str, str] = {"sklearn": "scikit-learn", "yaml": "pyyaml"}

#: files of which a model folder needs one to have a tokenizer
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


# ----------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (no heavy import)."""
    parser = argparse.ArgumentParser(
        prog="moe-interp",
        description="Mechanistic interpretability of Mixture-of-Experts models: locate the refusal circuit, "
        "steer, evaluate and inspect.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the command name
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "locate",
        parents=[common],
        help="run the refusal-circuit pipeline (the main job; default model: the built-in organism)",
        description="Refusal baseline → directions → ablation/addition/orthogonalisation → routing → "
        "patching → circuit → steering → evaluation; writes circuit.json, steering/, figures/, report.md.",
        epilog=PROMPT_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default="organism", help=f"{MODEL_HELP} (default: organism)")
    p.add_argument(
        "--harmful", help="harmful prompt file (.json/.jsonl/.txt/.csv, below); default: bundled splits"
    )
    p.add_argument("--harmless", help="harmless prompt file (same formats); default: bundled splits")
    p.add_argument("--out", required=True, help="output folder (new, empty, or holding a moe-interp run)")
    p.add_argument("--config", help="pipeline config JSON (see circuits/*/config.json)")
    p.add_argument("--force", action="store_true", help="overwrite an output folder holding other results")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in the same folder")

    p = sub.add_parser("steer", parents=[common], help="generate with and without steering, side by side")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument(
        "--vectors",
        required=True,
        help="steering file: a .safetensors/.json pair (SteeringVectors.save), a router-steering .json, or "
        "a topic-gated pair with its .gate.safetensors (or legacy .gate.pt)",
    )
    p.add_argument("--prompt", action="append", required=True, help="instruction (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--coeff", type=float, default=None, help="multiply every stored coefficient by X")
    p.add_argument("--width", type=int, default=48, help="column width")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="refusal rate, refusal score and side effects on a prompt file",
        epilog=PROMPT_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--prompts", required=True, help="prompt file (.json/.jsonl/.txt/.csv, below)")
    p.add_argument("--steer", help="steering file to apply (any file `steer --vectors` accepts)")
    p.add_argument("--ablate", help="direction file (.safetensors/.pt with 'direction') or circuit .json")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--details", action="store_true", help="include per-prompt rows in the JSON")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--no-baseline", action="store_true", help="skip KL / CE against the unedited model")

    p = sub.add_parser("inspect", parents=[common], help="print a model's spec and hook names")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser(
        "plan", parents=[common], help="memory and forward passes per pipeline stage, from a config alone"
    )
    p.add_argument("model", help=f"{MODEL_HELP}, or circuits/<name>/config.json")
    p.add_argument("--config", help="pipeline config whose workload sizes to use (default: the recipe's)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default: recipe's)"
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=64, help="padded prompt length (default 64)")
    p.add_argument("--n-coeffs", type=int, default=5, help="steering coefficients per method (default 5)")
    p.add_argument("--tflops", type=float, default=100.0, help="assumed sustained TFLOP/s (default 100)")
    p.add_argument("--from-hub", action="store_true", help="read the hub config even if a recipe matches")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser(
        "benchmark",
        parents=[common],
        help="rank of the planted component per discovery method, blind, on the planted-mechanism organisms",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", help="folder for benchmark.json, benchmark.md and benchmark.pdf/png")
    p.add_argument("--organisms", nargs="*", help="planted organisms (default: expert router head direction)")
    p.add_argument("--n-pairs", type=int, default=32, help="harmful/harmless finding pairs (default 32)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    return parser


def _handler(command: str) -> Callable[[argparse.Namespace], Any]:
    module, _, name = HANDLERS[command].partition(":")
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------------------- checks


def _is_path_like(source: str) -> bool:
    """Whether ``source`` can only be a local path (an HF id is ``name`` or ``org/name``)."""
    return (
        source in (".", "..")
        or source.startswith(("/", "./", "../", "~"))
        or source.endswith("/")
        or source.count("/") > 1
        or "\\" in source
    )


def check_model_source(source: str) -> None:
    """Refuse a model source that cannot load: a missing folder, a file, a folder without config.json or
    tokenizer (transformers would silently build an empty tokenizer), an HF id that is neither cached nor
    reachable."""
    if source in NAMED_MODELS or source.startswith("tiny:"):
        return
    expected = f"expected {MODEL_HELP}"
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(
                f"model {source!r} is a file; {expected} (a folder with config.json, weights, tokenizer)."
            )
        if not (path / "config.json").is_file():
            raise InputError(f"model folder {source} has no config.json; is it a saved Hugging Face model?")
        if not any((path / n).is_file() for n in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
            raise InputError(
                f"model folder {source} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it there "
                "with tokenizer.save_pretrained(folder)."
            )
        return
    if _is_path_like(source):
        raise MissingFileError(f"model folder {source} does not exist; {expected}.")
    close = difflib.get_close_matches(source, NAMED_MODELS, n=1, cutoff=0.75) if "/" not in source else []
    if close:  # a typo of a bundled name: say so now rather than after the hub's retries
        raise InputError(f"unknown model {source!r}; did you mean {close[0]!r}? ({expected}).")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"cannot load model {source!r}: no such folder here, and the Hugging Face hub says: {first} "
            f"({expected})."
        ) from err


def load_model(source: str, **kwargs: Any) -> Any:
    """:func:`moe_interp.model.load` after :func:`check_model_source`, for the command handlers."""
    check_model_source(source)
    from moe_interp.model import load

    try:
        return load(source, **kwargs)
    except OSError as err:  # transformers' "cannot find / read the checkpoint"
        if isinstance(err, USER_ERRORS):
            raise
        raise InputError(f"cannot load model {source!r}: {err}") from err


# ---------------------------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    from moe_interp.hooks import BLOCK_SITES, GLOBAL_SITES

    model = load_model(args.model)
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


# ------------------------------------------------------------------------------------------- main


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _missing_package(err: ModuleNotFoundError) -> str | None:
    """The top-level package of a failed third-party import (None for moe_interp's own modules: a bug)."""
    top = (err.name or "").split(".")[0]
    return None if not top or top == "moe_interp" else top


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``moe-interp``; return the exit status (2 with a one-line message for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("MOE_INTERP_DEBUG", "") not in ("", "0")
    try:
        return int(_handler(args.command)(args) or 0)
    except ModuleNotFoundError as err:
        pkg = _missing_package(err)
        if debug or pkg is None:
            raise
        dep = MissingDependencyError(
            f"this command needs the Python package {pkg!r}, which is not installed; "
            f"install it with `pip install {PIP_NAMES.get(pkg, pkg)}`."
        )
        print(f"moe-interp {args.command}: error: {dep}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"moe-interp {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
