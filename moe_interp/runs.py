"""The output folder of a ``locate`` run: fingerprints, stage cache, folder safety and the writer's lock.

* Every stage's result is cached in ``DIR/cache/<stage>.json`` + ``.safetensors`` (:mod:`moe_interp.store`:
  nothing in the folder is unpickled or executed) with a fingerprint of what it depends on: model weights,
  prompts, configuration, library version, the library's source code and the stages it reads.
  ``--resume`` reads a stage's header first and reuses it only when the fingerprint matches.
* A folder is only written when it is new, empty, or holds this tool's artefacts alone (:data:`ARTEFACTS`);
  ``--force`` removes those artefacts and nothing else, and a folder with files the tool did not write is
  refused whatever the flags.
* One writer at a time: the folder is locked (``DIR/.lock``) while a run writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
LOCK_FILE = ".lock"

#: what a run writes: top-level files, and folders with the file endings allowed inside them
ARTEFACT_FILES: frozenset[str] = frozenset(
    {
        RUN_FILE,
        LOCK_FILE,
        "report.md",
        "summary.json",
        "circuit.json",
        "direction.json",
        "direction.safetensors",
        "direction.pt",  # written by moe-interp <= 0.1.0
    }
)
ARTEFACT_DIRS: dict[str, tuple[str, ...]] = {
    "figures": (".pdf", ".png"),
    "steering": (".safetensors", ".json", ".pt"),
    "cache": (".json", ".safetensors", ".pt"),
}


def hash_prompts(prompts: dict[str, list[str]]) -> str:
    """Stable hash of named prompt lists."""
    h = hashlib.sha256()
    for k in sorted(prompts):
        h.update(k.encode())
        for p in prompts[k]:
            h.update(b"\x00" + p.encode())
    return h.hexdigest()[:16]


def hash_model(model: Any) -> str:
    """Hash of the model's weights, config and tokenizer (chat template, vocabulary size): per tensor its shape,
    a strided sample, its float64 sum and norm, so an edit of a few rows changes it without
    reading every weight off the device."""
    import torch

    h = hashlib.sha256(model.hf_model.config.to_json_string().encode())
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        h.update(f"{getattr(tok, 'chat_template', None)!r}|{len(tok)}".encode())
    with torch.no_grad():
        for name, p in sorted(model.hf_model.state_dict().items()):
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)].float().cpu().numpy().tobytes()
            sums = torch.stack(
                [flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, dtype=torch.float64)]
            )
            h.update(name.encode() + str(tuple(p.shape)).encode() + sample + sums.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def hash_code(root: Path | None = None) -> str:
    """Hash of the library's Python source: a cached stage is stale once the code that made it changed."""
    root = Path(__file__).resolve().parent if root is None else root
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\x00" + path.read_bytes() + b"\x00")
    return h.hexdigest()[:16]


def foreign_entries(out: Path) -> list[str]:
    """Paths in ``out`` (relative) that a run does not write: such a folder is never written or cleared."""
    found: list[str] = []
    for child in sorted(out.iterdir()):
        if child.is_symlink():
            found.append(child.name)
        elif child.is_dir() and child.name in ARTEFACT_DIRS:
            endings = ARTEFACT_DIRS[child.name]
            for sub in sorted(child.rglob("*")):
                tmp = ".tmp" in sub.name  # an interrupted atomic write
                if sub.is_symlink() or sub.is_dir() or not (sub.name.endswith(endings) or tmp):
                    found.append(sub.relative_to(out).as_posix())
        elif not (child.is_file() and child.name in ARTEFACT_FILES):
            found.append(child.name + ("/" if child.is_dir() else ""))
    return found


def _clear_artefacts(out: Path) -> None:
    for child in out.iterdir():
        if child.name == LOCK_FILE:
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def check_out_path(out: Path, accepted: str = "new or existing") -> None:
    """Raise unless ``out`` is a folder or one can be made there (no file in the way)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is an existing file; expected a folder ({accepted}).")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise NotADirectoryError(f"--out {out}: {parent} is a file, so no folder can be made under it.")


def check_out_dir(out: Path) -> None:
    """Raise unless ``out`` is a folder (or can be made) that holds nothing but this tool's artefacts."""
    check_out_path(out, "new, empty, or holding a moe-interp run")
    foreign = foreign_entries(out) if out.exists() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{out} holds files moe-interp did not write ({shown}); choose a new or empty folder "
            "(--force only replaces a previous run's results)."
        )


def prepare_out_dir(out: Path, run_id: dict[str, str], *, force: bool, resume: bool) -> None:
    """Check ``out`` can take this run's results (see the module docstring), then write ``run.json``.

    Raises before anything is changed: FileExistsError for a folder with foreign files, another model's
    results, or this model's results without ``--resume``/``--force``; NotADirectoryError for a file.
    """
    import moe_interp

    check_out_dir(out)
    run_file = out / RUN_FILE
    if out.exists() and any(c.name != LOCK_FILE for c in out.iterdir()):
        if not run_file.exists():  # every run writes run.json first: these files may be the user's own
            raise FileExistsError(
                f"{out} holds files named like moe-interp results but no {RUN_FILE}, so they may not be ours; "
                "choose another --out (--force replaces only a previous run's results)."
            )
        if force:
            _clear_artefacts(out)
        else:
            try:
                old = json.loads(run_file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise FileExistsError(
                    f"{run_file} is unreadable ({err}); pass --force to replace it."
                ) from err
            if not isinstance(old, dict) or old.get("model_hash") != run_id["model_hash"]:
                old = old if isinstance(old, dict) else {}
                raise FileExistsError(
                    f"{out} holds results of another model ({old.get('model')!r}, hash {old.get('model_hash')}); "
                    "pass --force to overwrite, or choose another --out."
                )
            if not resume:
                raise FileExistsError(
                    f"{out} already holds results of this model; pass --resume to continue or --force."
                )
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({**run_id, "version": moe_interp.__version__}, indent=2))


class OutputLockedError(FileExistsError):
    """Another process is writing the same output folder."""


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` exclusively for the block; a second writer gets :class:`OutputLockedError`.

    A folder the lock had to create is removed again if the block fails while it is still empty.
    """
    check_out_dir(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if sys.platform == "win32":  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        holder = path.read_text().strip() or "?"
        raise OutputLockedError(
            f"{out} is being written by another moe-interp run (pid {holder}); wait for it or choose another --out."
        ) from err
    ok = False
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
        ok = True
    finally:
        os.close(fd)  # closing releases the lock
        if not ok and created and [c.name for c in out.iterdir()] == [LOCK_FILE]:
            path.unlink(missing_ok=True)
            out.rmdir()


@dataclass
class Run:
    """State shared by the pipeline stages, and the stage cache."""

    model: Any
    out: Path
    config: Any
    prompts: dict[str, list[str]]
    fingerprint: dict[str, str]
    resume: bool = False
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = print
    #: what one stage computed that a later one may reuse in this process instead of computing it again (not
    #: cached on disk: after ``--resume`` the later stage computes it itself, with the same result)
    memo: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._fps: dict[str, str] = {}

    @property
    def cache_dir(self) -> Path:
        return self.out / "cache"

    def run_stages(self, stages: list[tuple[str, Callable[[Run], dict[str, Any]], tuple[str, ...]]]) -> None:
        """Run ``(name, fn, depends)`` stages in order; a failure says how to continue from it."""
        for name, fn, deps in stages:
            try:
                self.stage(name, fn, deps)
            except Exception:
                self.log(
                    f"[{name}] failed; the stages before it are cached in {self.cache_dir}: fix the cause and "
                    "rerun the same command with --resume to continue from here."
                )
                raise

    def stage(
        self, name: str, fn: Callable[[Run], dict[str, Any]], depends: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Run a stage, or load it from the cache when its fingerprint matches (checked before any tensor is read)."""
        from moe_interp.store import StoreError, load_tree, read_header, save_tree

        key = json.dumps(
            {"fp": self.fingerprint, "stage": name, "deps": [self._fps.get(d, "") for d in depends]},
            sort_keys=True,
        )
        fp = hashlib.sha256(key.encode()).hexdigest()[:16]
        stem = self.cache_dir / name
        if self.resume and stem.with_name(name + ".json").exists():
            try:
                fresh = read_header(stem).get("fingerprint") == fp
                result: dict[str, Any] | None = load_tree(stem) if fresh else None
            except StoreError as err:
                fresh = False
                self.log(f"[{name}] cached result unreadable ({err}); recomputing")
            else:
                if not fresh:
                    self.log(f"[{name}] cached result is stale (inputs or code changed); recomputing")
            if fresh and result is not None:  # (None only when not fresh)
                self.log(f"[{name}] resumed from {stem}.json")
                self.results[name] = result
                self._fps[name] = fp
                return result
        self.log(f"[{name}] running …")
        t0 = time.perf_counter()
        result = fn(self)
        self.timings[name] = time.perf_counter() - t0
        save_tree(stem, result, {"fingerprint": fp, "stage": name})
        self.results[name] = result
        self._fps[name] = fp
        self.log(f"[{name}] done in {self.timings[name]:.1f}s")
        return result
