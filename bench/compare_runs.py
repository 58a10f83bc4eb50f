"""Compare two ``moe-interp locate`` output folders value by value (e.g. the same commit on the CPU and on a GPU).

For ``summary.json``, ``circuit.json`` and ``direction.json`` it walks every leaf (timings and the run's
fingerprint left out) and records: how many numbers, the largest absolute and relative difference and where,
and every non-numeric leaf that differs (a selected component, a refusal judgement, a reason string). A leaf
present in one folder only is a difference too.

    python bench/compare_runs.py RUN_A RUN_B --out bench/results/organism_cuda_vs_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILES: tuple[str, ...] = ("summary.json", "circuit.json", "direction.json")
#: leaves that differ between any two runs by design
SKIPPED: tuple[str, ...] = ("timings_s", "fingerprint")


def leaves(x: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of every leaf of a JSON value (keys in :data:`SKIPPED` left out)."""
    if isinstance(x, dict) and x:
        for k, v in x.items():
            if k not in SKIPPED:
                yield from leaves(v, f"{path}/{k}")
    elif isinstance(x, list) and x:
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:  # a value, or an empty container (so that [] against a missing key is a difference)
        yield path, x


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _worse(d: float, worst: float) -> bool:
    """Whether ``d`` replaces ``worst`` (a NaN is worse than any number and is never replaced)."""
    return not math.isnan(worst) and (math.isnan(d) or d > worst)


def compare(a: Any, b: Any) -> dict[str, Any]:
    """Leaf-by-leaf comparison of two JSON values."""
    la, lb = dict(leaves(a)), dict(leaves(b))
    only = sorted(set(la) ^ set(lb))
    n_num, worst_abs, worst_rel, differing = 0, (0.0, ""), (0.0, ""), []
    for key in sorted(set(la) & set(lb)):
        u, v = la[key], lb[key]
        if _is_number(u) and _is_number(v):
            n_num += 1
            if u == v or (math.isnan(u) and math.isnan(v)):  # equal infinities too
                continue
            # NaN on one side only: the worst difference, kept once found; one infinite side: inf
            d = math.nan if math.isnan(u) or math.isnan(v) else abs(u - v)
            if _worse(d, worst_abs[0]):
                worst_abs = (d, key)
            rel = d / max(abs(u), abs(v), 1e-12)
            if _worse(rel, worst_rel[0]):
                worst_rel = (rel, key)
        elif u != v or type(u) is not type(v):  # True against 1 is a difference
            differing.append({"path": key, "a": u, "b": v})
    return {
        "leaves": len(set(la) | set(lb)),
        "numbers": n_num,
        "max_abs_diff": worst_abs[0],
        "max_abs_diff_at": worst_abs[1],
        "max_rel_diff": worst_rel[0],
        "max_rel_diff_at": worst_rel[1],
        "non_numeric_differing": differing,
        "in_one_only": only,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="write the comparison as JSON here")
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"run_a": str(args.run_a), "run_b": str(args.run_b), "files": {}}
    for name in FILES:
        fa, fb = args.run_a / name, args.run_b / name
        if not (fa.is_file() and fb.is_file()):
            res["files"][name] = {"missing": [str(f) for f in (fa, fb) if not f.is_file()]}
            continue
        r = compare(json.loads(fa.read_text()), json.loads(fb.read_text()))
        res["files"][name] = r
        print(
            f"{name}: {r['numbers']} numbers, max |Δ| {r['max_abs_diff']:.3g} ({r['max_abs_diff_at']}), "
            f"max rel {r['max_rel_diff']:.3g}; {len(r['non_numeric_differing'])} other leaves differ, "
            f"{len(r['in_one_only'])} in one run only"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
