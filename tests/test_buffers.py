"""The buffer pool behind the dense ``hook_expert_out``: a reused buffer is always zero where it is not written.

Reuse zeroes only the rows the previous call wrote, trusting the buffer's version counter to show any other
in-place write; these tests fail if the stale rows are left in place or the counter is not checked.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from conftest import PROMPTS

from moe_interp.buffers import BUFFERS, BufferPool

NAME = "blocks.1.mlp.hook_expert_out"
CPU = torch.device("cpu")


def _pool() -> BufferPool:
    pool = BufferPool(min_bytes=0)
    with torch.no_grad():
        probe = pool.zeros((4,), torch.float32, CPU)
    if pool.nbytes == 0:
        pytest.skip("this torch has no storage use count, so the buffer pool is off")
    del probe
    return pool


@torch.no_grad()
def test_reuse_zeroes_the_written_rows() -> None:
    pool = _pool()
    a = pool.zeros((6, 3), torch.float32, CPU)
    rows = torch.tensor([1, 4])
    a.index_add_(0, rows, torch.ones(2, 3))
    pool.written(a, rows)
    ptr = a.data_ptr()
    del a
    b = pool.zeros((6, 3), torch.float32, CPU)
    assert b.data_ptr() == ptr  # reused, not a fresh allocation
    assert torch.equal(b, torch.zeros(6, 3))


@torch.no_grad()
@pytest.mark.parametrize("write", ["fill_", "row_view", "unrecorded"])
def test_an_unrecorded_write_zeroes_everything(write: str) -> None:
    pool = _pool()
    a = pool.zeros((6, 3), torch.float32, CPU)
    rows = torch.tensor([1, 4])
    a.index_add_(0, rows, torch.ones(2, 3))
    if write != "unrecorded":
        pool.written(a, rows)
    if write == "fill_":  # e.g. an edit, or the user, writing in place into a cached value
        a.fill_(7.0)
    elif write == "row_view":  # through a view: views share the version counter
        a.view(3, 6)[0].add_(5.0)
    del a
    b = pool.zeros((6, 3), torch.float32, CPU)
    assert torch.equal(b, torch.zeros(6, 3))


@torch.no_grad()
def test_a_held_buffer_is_not_reused() -> None:
    pool = _pool()
    a = pool.zeros((6, 3), torch.float32, CPU)
    a.fill_(1.0)
    b = pool.zeros((6, 3), torch.float32, CPU)
    assert b.data_ptr() != a.data_ptr() and torch.equal(b, torch.zeros(6, 3))
    assert torch.equal(a, torch.ones(6, 3))


def test_inference_mode_buffers_are_zeroed_in_full() -> None:
    pool = _pool()
    with torch.inference_mode():  # inference tensors have no version counter
        a = pool.zeros((6, 3), torch.float32, CPU)
        a.fill_(3.0)
        pool.written(a, torch.tensor([0]))
        del a
        b = pool.zeros((6, 3), torch.float32, CPU)
        assert torch.equal(b, torch.zeros(6, 3))


@pytest.fixture
def pooled_small_buffers() -> Iterator[None]:
    """The tiny models' dense expert outputs are below the pool's size floor: pool them for these tests."""
    old = BUFFERS.min_bytes
    BUFFERS.min_bytes = 0
    BUFFERS.clear()
    try:
        yield
    finally:
        BUFFERS.min_bytes = old
        BUFFERS.clear()


def _unpooled(model, prompts: list[str]) -> torch.Tensor:  # noqa: ANN001
    BUFFERS.enabled = False
    try:
        return model.run_with_cache(prompts, names=[NAME])[1][NAME]
    finally:
        BUFFERS.enabled = True


@pytest.mark.parametrize("mutate", [False, True])
def test_pooled_expert_out_equals_a_fresh_one(tiny_model, pooled_small_buffers, mutate: bool) -> None:  # noqa: ANN001
    """Two calls routing differently through one reused buffer; the first cache optionally written in place
    (a user's ``fill_``) before it is dropped."""
    model = tiny_model("olmoe")
    first = [PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    second = [PROMPTS[2], PROMPTS[0], PROMPTS[2]]  # same padded length, other tokens, other routing
    want = _unpooled(model, second)
    cache = model.run_with_cache(first, names=[NAME])[1]
    ptr = cache[NAME].data_ptr()
    if mutate:
        cache[NAME].fill_(7.0)
    del cache
    got = model.run_with_cache(second, names=[NAME])[1][NAME]
    if got.data_ptr() != ptr:
        pytest.skip("the pool did not reuse the buffer (no storage use count in this torch)")
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_an_inference_mode_buffer_is_not_reused_outside_inference_mode() -> None:
    pool = _pool()
    with torch.inference_mode():
        a = pool.zeros((6, 3), torch.float32, CPU)
        a.fill_(3.0)
        del a
    with torch.no_grad():
        b = pool.zeros((6, 3), torch.float32, CPU)  # in place on an inference tensor would raise here
        b.add_(1.0)
    assert torch.equal(b, torch.ones(6, 3))
