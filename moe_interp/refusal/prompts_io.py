"""Read prompt files: JSON (strings or objects), plain text (one per line) or CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

__all__ = ["PROMPT_KEYS", "load_prompt_file"]

#: keys / columns that hold the prompt text, tried in order
PROMPT_KEYS: tuple[str, ...] = ("instruction", "goal", "prompt")

_EXPECTED = (
    "a .json list of strings or of objects with an 'instruction', 'goal' or 'prompt' key, a .jsonl file with "
    "one such value per line, a .txt file with one prompt per line, or a .csv file with an 'instruction', "
    "'goal' or 'prompt' column"
)


def _from_record(rec: Any, i: int, path: Path) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        for k in PROMPT_KEYS:
            if isinstance(rec.get(k), str):
                return rec[k]
        raise ValueError(
            f"{path}: item {i} has keys {sorted(rec)}; expected one of {list(PROMPT_KEYS)} with a string value."
        )
    raise ValueError(
        f"{path}: item {i} is a {type(rec).__name__}; expected a string or an object with one of "
        f"{list(PROMPT_KEYS)}."
    )


def _json(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err}); expected {_EXPECTED}.") from err
    if isinstance(data, dict):  # {"prompts": [...]} / {"instructions": [...]} wrappers
        lists = [
            v for k, v in data.items() if k in ("prompts", "instructions", "data") and isinstance(v, list)
        ]
        if len(lists) != 1:
            raise ValueError(f"{path}: a JSON object with keys {sorted(data)}; expected {_EXPECTED}.")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"{path}: JSON {type(data).__name__}; expected {_EXPECTED}.")
    return [_from_record(rec, i, path) for i, rec in enumerate(data)]


def _csv(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fieldnames = list(reader.fieldnames or [])
        cols = [c.strip() for c in fieldnames]
        col = next((c for c in PROMPT_KEYS if c in cols), None)
        if col is None:
            raise ValueError(f"{path}: CSV columns {cols}; expected one of {list(PROMPT_KEYS)}.")
        raw = fieldnames[cols.index(col)]
        return [row[raw] for row in reader if row.get(raw) is not None]


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts from ``path``: JSON list (strings or objects with ``instruction``/``goal``/``prompt``),
    ``.txt`` (one prompt per non-empty line) or ``.csv`` (with one of those columns).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown format, missing key/column, or no prompts.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"Prompt file {p} is a folder; expected {_EXPECTED}.")
    if not p.is_file():
        raise FileNotFoundError(f"Prompt file {p} does not exist.")
    suffix = p.suffix.lower()
    if suffix in (".json", ".jsonl"):
        if suffix == ".jsonl":
            lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            try:
                prompts = [_from_record(json.loads(ln), i, p) for i, ln in enumerate(lines)]
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{p}: invalid JSON line ({err}); expected one JSON value per line."
                ) from err
        else:
            prompts = _json(p)
    elif suffix == ".txt":
        prompts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    elif suffix == ".csv":
        prompts = _csv(p)
    else:
        raise ValueError(
            f"{p}: unknown prompt file format {suffix or '(no extension)'!r}; expected {_EXPECTED}."
        )
    prompts = [x for x in prompts if x.strip()]
    if not prompts:
        raise ValueError(f"{p} contains no prompts; expected {_EXPECTED}.")
    return prompts
