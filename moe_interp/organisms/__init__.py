"""Model organisms: small MoE LMs trained here, shipped in the package, that load offline.

The refusal organism is an ``OlmoeForCausalLM`` (every layer MoE, 8 experts, top-2) trained from
scratch by :mod:`moe_interp.organisms.train` to refuse harmful requests and political topics and
to comply with everything else. See ``circuits/organism/MODEL_CARD.md``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import zip_longest
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from moe_interp.organisms.data import SPLITS, load_split_records

__all__ = [
    "REQUIRED_FILES",
    "RETRAIN_COMMAND",
    "balanced_prompts",
    "check_device",
    "checkpoint_dir",
    "held_back_prompts",
    "load_organism",
    "load_prompts",
]

RETRAIN_COMMAND: str = "python -m moe_interp.organisms.train"

#: Files that a checkpoint directory must contain.
REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def check_device(device: str) -> torch.device:
    """``device`` as a torch device, or a ValueError that says why it cannot be used here."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"invalid device {device!r} ({err}); e.g. 'cpu' or 'cuda'") from err
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(
                f"device {device!r} requested but CUDA is not available here (0 CUDA devices); use 'cpu'"
            )
        if dev.index is not None and dev.index >= n:
            raise ValueError(
                f"device {device!r} requested but this machine has {n} CUDA device(s): 'cuda:0'..'cuda:{n - 1}'"
            )
    return dev


def checkpoint_dir() -> Path:
    """Directory of the shipped organism checkpoint."""
    return Path(__file__).resolve().parent / "checkpoint"


def _broken(path: Path, why: str) -> RuntimeError:
    return RuntimeError(
        f"organism checkpoint file {path} is {why}; regenerate the checkpoint with `{RETRAIN_COMMAND}`"
    )


def load_organism(
    dtype: torch.dtype = torch.float32, path: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load the organism (model in eval mode, ``dtype``) and its chat tokenizer.

    Raises:
        FileNotFoundError: a required checkpoint file is missing.
        RuntimeError: a checkpoint file is damaged (unreadable, truncated, missing tensors).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = Path(path) if path is not None else checkpoint_dir()
    for name in REQUIRED_FILES:
        f = ckpt / name
        if not f.is_file():
            raise FileNotFoundError(
                f"organism checkpoint file {f} is missing; regenerate the checkpoint with `{RETRAIN_COMMAND}`"
            )
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        try:
            json.loads((ckpt / name).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise _broken(ckpt / name, f"damaged (invalid JSON: {e})") from e
    weights = ckpt / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as sf:
            for key in sf.keys():
                sf.get_slice(key)
    except Exception as e:  # noqa: BLE001 - any safetensors failure means a damaged file
        raise _broken(weights, f"damaged ({type(e).__name__}: {e})") from e
    try:
        config = AutoConfig.from_pretrained(ckpt)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt)
        # typed as returning the model; with output_loading_info it is (model, info)
        loaded: tuple[PreTrainedModel, dict[str, list[str]]] = AutoModelForCausalLM.from_pretrained(  # type: ignore[assignment]
            ckpt, config=config, dtype=dtype, output_loading_info=True
        )
        model, info = loaded
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(
            f"could not load the organism checkpoint in {ckpt} ({type(e).__name__}: {e}); "
            f"regenerate it with `{RETRAIN_COMMAND}`"
        ) from e
    missing = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    if missing:
        raise _broken(weights, f"damaged (missing or mismatched tensors: {missing[:5]})")
    if tokenizer.chat_template is None:
        raise _broken(ckpt / "chat_template.jinja", "missing (tokenizer has no chat template)")
    # Router logits are requested per call; with this on, padded batched generate() fails in the aux loss.
    model.config.output_router_logits = False
    model.eval()
    return model, tokenizer


def load_prompts(split: str) -> list[str]:
    """Instructions of a saved prompt split (see :data:`moe_interp.organisms.data.SPLITS`).

    Raises:
        ValueError: unknown split (the message lists the valid ones).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return [r["instruction"] for r in load_split_records(split)]


def balanced_prompts(
    split: str, n: int | None = None, *, synthetic: bool = False, exclude: Iterable[str] = ()
) -> list[str]:
    """Up to ``n`` instructions of a split drawn evenly across its benchmark sources.

    The split files list sources in blocks, AdvBench first, so a plain ``[:n]`` slice fits and tests on one
    benchmark. This takes the sources in turn (round-robin, file order within a source, no randomness) until
    ``n`` are taken or all are used; a prompt listed under two sources is taken once, prompts in ``exclude``
    never. Templated ``synthetic`` records (long runs of one template) are left out unless ``synthetic=True``.

    Raises:
        ValueError: unknown split, or ``n`` negative.
    """
    records = load_split_records(split)
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    by_source: dict[str, list[str]] = {}
    for r in records:
        if synthetic or r["source"] != "synthetic":
            by_source.setdefault(r["source"], []).append(r["instruction"])
    out: list[str] = []
    seen: set[str] = set(exclude)
    for turn in zip_longest(*by_source.values()):  # one prompt of each source in turn
        for p in turn:
            if p is None or p in seen:
                continue
            if len(out) == n:
                return out
            out.append(p)
            seen.add(p)
    return out


def held_back_prompts(split: str, n: int | None = None) -> list[str]:
    """:func:`balanced_prompts` of a ``<class>_val`` or ``<class>_test`` split without any prompt of the class's
    earlier splits (train; train and val for test). The split files are not disjoint everywhere: seven TDC2023
    prompts of ``harmful_test`` are HarmBench validation prompts too (``harmful_val``).

    Raises:
        ValueError: a split that is not a ``_val`` or ``_test`` split, or as :func:`balanced_prompts`.
    """
    cls, _, part = split.rpartition("_")
    if part not in ("val", "test"):
        raise ValueError(f"held_back_prompts takes a '<class>_val' or '<class>_test' split, got {split!r}")
    earlier = ["train"] if part == "val" else ["train", "val"]
    return balanced_prompts(split, n, exclude=[p for e in earlier for p in load_prompts(f"{cls}_{e}")])
