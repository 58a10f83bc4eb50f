"""Execute every tour notebook top to bottom (nbclient, kernel ``python3``) and fail on any error.

Every notebook carries ``assert`` cells on its key outputs (identities that hold exactly, the organism's
refusal gap, the circuit beating random sets, ...), so a notebook that runs but prints wrong numbers fails
here too. Select with ``-m notebooks`` (they also run by default). The kernel is registered for this user
if none named ``python3`` exists, so CI needs nothing beyond the test dependencies.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300
#: Printed by the notebooks' set-up cell when the organism checkpoint is missing and a random-init model is
#: used instead: the notebooks still run, but their numbers mean nothing, so CI must not take that path.
FALLBACK_MARKER = "RANDOM-INIT"
ASSERT = re.compile(r"^\s*assert\b", re.MULTILINE)

pytestmark = pytest.mark.notebooks


@pytest.fixture(scope="session")
def python3_kernel() -> str:
    """Make sure a kernel named ``python3`` exists (register this interpreter's ipykernel if not)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"],
            check=True,
            capture_output=True,
        )
    return "python3"


def test_notebooks_present_and_clean() -> None:
    names = [p.name for p in NOTEBOOKS]
    assert [n[:2] for n in names] == ["00", "01", "02", "03", "04", "05"], names
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"
        src = "\n".join(c.source for c in nb.cells)
        assert "plt." not in src and "import matplotlib.pyplot" not in src, (
            "figures must come from moe_interp.plotting"
        )
        code_src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert ASSERT.search(code_src), f"{path.name} checks none of its outputs: add assert cells"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, python3_kernel: str, tmp_path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    # The kernel's environment only (this process's is left alone); values already set are kept.
    env = {
        "HF_HUB_OFFLINE": "1",
        "MOE_INTERP_NB_N": "4",  # fewer prompts per split than the interactive default (8)
        # The organism is tiny: a second torch thread buys nothing, and on a shared, oversubscribed 2-core
        # machine a 2-thread pool made each forward ~50x slower (measured 2026-12-01).
        "OMP_NUM_THREADS": "1",
    }
    env.update(os.environ)
    start = time.perf_counter()
    try:
        client = nbclient.NotebookClient(
            nb,
            timeout=CELL_TIMEOUT,
            kernel_name=python3_kernel,
            resources={"metadata": {"path": str(tmp_path)}},
        )
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{str(err)[-3000:]}")
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors, json.dumps(errors)[:2000]
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert FALLBACK_MARKER not in text, f"{path.name} ran on the random-init fallback, not the organism"
    figures = sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    )
    assert figures >= 1, f"{path.name} drew no figure"
