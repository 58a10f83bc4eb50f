"""Reusable zero-filled CPU buffers for the large hook tensors the adapter allocates on every call.

The dense ``hook_expert_out`` is ``[batch·pos, E, d_model]`` per layer (64 MB at the bench geometry). glibc
serves blocks that large with ``mmap`` and unmaps them when freed, so a fresh tensor per call costs a page
fault per 4 KB page on every call, then a second zero-fill. :data:`BUFFERS` keeps such buffers after the
caller drops its cache and hands them out again, zeroed with one ``memset`` and no page faults.

A buffer is reused only when nothing outside the pool holds its storage (no live cache entry or view of it),
so cached values are never overwritten. The pool applies on the CPU without autograd (the CUDA caching
allocator already reuses GPU memory) and holds at most :attr:`BufferPool.max_bytes`; ``BUFFERS.clear()``
releases it, ``BUFFERS.enabled = False`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["BUFFERS", "BufferPool"]


def _use_count_fn() -> Callable[[Tensor], int] | None:
    """Storage use count (how many tensors and views share it), or None if this torch lacks the API."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None
    return lambda t: int(fn(t.untyped_storage()._cdata))


class BufferPool:
    """A small pool of flat CPU buffers, keyed by (numel, dtype)."""

    def __init__(self, min_bytes: int = 1 << 20, max_bytes: int = 4 << 30) -> None:
        self.enabled = True
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self._use_count = _use_count_fn()
        #: (buffer, its use count when only the pool holds it), oldest first
        self._bufs: list[tuple[Tensor, int]] = []

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool (in use by callers or free)."""
        return sum(b.numel() * b.element_size() for b, _ in self._bufs)

    def _free(self, buf: Tensor, idle: int) -> bool:
        assert self._use_count is not None
        return self._use_count(buf) == idle

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A zero tensor of ``shape``: a pooled buffer where allowed, else ``torch.zeros``."""
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        usable = (
            self.enabled
            and torch.device(device).type == "cpu"
            and not torch.is_grad_enabled()
            and self.min_bytes <= nbytes <= self.max_bytes
        )
        if not usable or self._use_count is None:
            return torch.zeros(shape, dtype=dtype, device=device)
        for buf, idle in self._bufs:
            if buf.numel() == numel and buf.dtype == dtype and self._free(buf, idle):
                return buf.zero_().view(shape)
        buf = torch.zeros(numel, dtype=dtype, device=device)
        self._bufs.append((buf, self._use_count(buf)))
        self._evict()
        return buf.view(shape)

    def _evict(self) -> None:
        """Drop free buffers, oldest first, while the pool holds more than ``max_bytes``."""
        total = self.nbytes
        keep = []
        for buf, idle in self._bufs:
            size = buf.numel() * buf.element_size()
            if total > self.max_bytes and self._free(buf, idle):
                total -= size
            else:
                keep.append((buf, idle))
        # buffers in use above the cap are forgotten (freed when their caller drops them)
        while total > self.max_bytes and len(keep) > 1:
            buf, _ = keep.pop(0)
            total -= buf.numel() * buf.element_size()
        self._bufs = keep

    def clear(self) -> None:
        """Forget every buffer (memory is freed once callers drop their caches)."""
        self._bufs = []

    def __getstate__(self) -> dict:
        # a pickled pool (e.g. shipped by value with a remote trace) carries its settings, never its buffers
        return {"enabled": self.enabled, "min_bytes": self.min_bytes, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["min_bytes"], state["max_bytes"])  # type: ignore[misc]  # re-init on unpickling
        self.enabled = state["enabled"]


#: the process-wide pool used by :mod:`moe_interp.tracing`
BUFFERS = BufferPool()
