"""The package type-checks: ``python -m mypy moe_interp`` (settings in ``[tool.mypy]`` of pyproject.toml)
reports no error, so a type error fails the suite (and CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_reports_no_error(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    # mypy's incremental cache under .pytest_cache (git-ignored): a cold run takes minutes (it analyses
    # torch and transformers), a warm one seconds
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cache_dir = cache.mkdir("mypy") if cache is not None else tmp_path / "mypy_cache"
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "moe_interp", "--cache-dir", str(cache_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, f"mypy found type errors:\n{done.stdout}{done.stderr}"


def test_jaxtyping_shapes_are_checked() -> None:
    """conftest.py puts jaxtyping's import hook on the package (tests/_shape_checks.py): a call whose array
    shapes contradict the annotations fails before it runs."""
    import torch
    from jaxtyping import TypeCheckError

    from moe_interp.experts import topk_to_dense

    weights, indices = torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.long)
    assert topk_to_dense(weights, indices, 4).shape == (3, 4)
    with pytest.raises(TypeCheckError):
        topk_to_dense(weights, indices[:2], 4)  # n_tok 3 vs 2
