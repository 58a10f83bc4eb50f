"""Shared fixtures: session-scoped tiny models per family, the organism, and a fixed set of prompts."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator

import _shape_checks
import pytest
import torch
from hypothesis import settings

# jaxtyping shape annotations are checked at run time in the tests (see _shape_checks): before moe_interp
# is imported
_shape_checks.install()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Property tests check behaviour, not speed: hypothesis' default 200 ms deadline can turn a slow first example
# on a loaded 2-core machine into a spurious failure. (A fresh-clone CI run failed one unidentified test once,
# not reproduced in four reruns; this deadline was the suite's tightest timing dependence.)
settings.register_profile("moe_interp", deadline=None)
settings.load_profile("moe_interp")
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

#: Prompts of different lengths, so that batches are padded.
PROMPTS: list[str] = [
    "How do I bake bread at home?",
    "Hi",
    "Write a short poem about the sea and the sky, with three verses.",
]


def _families() -> list[str]:
    from moe_interp.tiny import tiny_families

    return tiny_families()


FAMILIES: list[str] = _families()


@functools.cache
def _load_cached(family: str):  # noqa: ANN202 - MoEModel, imported lazily
    import moe_interp as mi

    return mi.load(f"tiny:{family}")


@pytest.fixture(scope="session")
def tiny_model() -> Callable[[str], object]:
    """``tiny_model(family)``: a seeded fp32 tiny model, loaded once per session and shared.

    Tests must not modify its weights (edits go through ``model.intervene``); tests that need to
    modify or wrap the HF model load their own copy with ``mi.load(f"tiny:{family}")``.
    """
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return _load_cached


@pytest.fixture(scope="session")
def organism() -> Iterator[object]:
    """The bundled organism (``mi.load("organism")``, an ``MoEModel``), loaded once per session and shared.

    Same rules as :func:`tiny_model`: edits go through ``model.intervene`` (or a copy, e.g. ``orthogonalize``);
    a test that changes a setting (``tokenizer.padding_side``) restores it. At the end of the session the
    weights are compared with those loaded, so a test that edited them in place fails the run.
    """
    import moe_interp as mi

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = mi.load("organism")
    loaded = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    yield model
    changed = [k for k, v in model.hf_model.state_dict().items() if not torch.equal(v, loaded[k])]
    assert not changed, f"a test modified the shared organism's weights in place: {changed[:3]}"


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Every family with a tiny config."""
    return request.param
