"""The top-level package imports its public names lazily; the organism modules need no nnsight."""

from __future__ import annotations

import subprocess
import sys

import pytest

import moe_interp


def test_organism_scripts_do_not_import_nnsight_or_transformer_lens() -> None:
    code = (
        "import sys, moe_interp.organisms.train, moe_interp.organisms.evaluate, moe_interp.organisms.sweep\n"
        "heavy = sorted(m for m in ('nnsight', 'transformer_lens') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_public_names_resolve_lazily() -> None:
    assert sorted(moe_interp.__all__) == sorted(moe_interp._LAZY)
    for name in moe_interp.__all__:
        assert getattr(moe_interp, name) is getattr(__import__(moe_interp._LAZY[name], fromlist=[name]), name)
        assert name in dir(moe_interp)
    assert moe_interp.patching.__name__ == "moe_interp.patching"  # submodules resolve on attribute access
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        moe_interp.nope  # noqa: B018
