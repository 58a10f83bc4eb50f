"""Reusable zero-filled CPU buffers for the large hook tensors the adapter allocates on every call.

The dense ``hook_expert_out`` is ``[batch·pos, E, d_model]`` per layer (64 MB at the bench geometry). glibc
serves blocks that large with ``mmap`` and unmaps them when freed, so a fresh tensor per call costs a page
fault per 4 KB page on every call, then a second zero-fill. :data:`BUFFERS` keeps such buffers after the
caller drops its cache and hands them out again, zeroed and with no page faults.

A writer that fills only some rows (the dense expert outputs: k of every E rows) reports them with
:meth:`BufferPool.written`; on reuse only those rows are zeroed, unless the buffer's version counter shows an
in-place operation since (an edit, a user's ``fill_``), in which case all of it is. Writes that bypass the
version counter (through ``.data``, ``untyped_storage()``, ``set_``, DLPack or a NumPy view) are outside this
contract, as they are for autograd.

A buffer is reused only when nothing outside the pool holds its storage (no live cache entry or view of it),
so cached values are never overwritten. The pool applies on the CPU without autograd (the CUDA caching
allocator already reuses GPU memory) and holds at most :attr:`BufferPool.max_bytes`; ``BUFFERS.clear()``
releases it, ``BUFFERS.enabled = False`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BUFFERS", "BufferPool"]


def _use_count_fn() -> Callable[[Tensor], int] | None:
    """Storage use count (how many tensors and views share it), or None if this torch lacks the API."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None
    return lambda t: int(fn(t.untyped_storage()._cdata))


def _version(t: Tensor) -> int | None:
    """The tensor's in-place version counter, or None where it has none (inference-mode tensors)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


@dataclass
class _Slot:
    buf: Tensor
    idle: int  # the storage use count when only the pool holds it
    rows: Tensor | None = None  # rows (of ``row_len`` elements) that may be non-zero; None: any may be
    row_len: int = 0
    version: int | None = None  # the buffer's version counter right after those rows were written


class BufferPool:
    """A small pool of flat CPU buffers, keyed by (numel, dtype)."""

    def __init__(self, min_bytes: int = 1 << 20, max_bytes: int = 4 << 30) -> None:
        self.enabled = True
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self._use_count = _use_count_fn()
        self._slots: list[_Slot] = []  # oldest first

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool (in use by callers or free)."""
        return sum(s.buf.numel() * s.buf.element_size() for s in self._slots)

    def _free(self, slot: _Slot) -> bool:
        assert self._use_count is not None
        return self._use_count(slot.buf) == slot.idle

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
        for slot in self._slots:
            if (
                slot.buf.numel() == numel
                and slot.buf.dtype == dtype
                and self._free(slot)
                # an inference-mode buffer cannot be written in place outside inference mode
                and (torch.is_inference_mode_enabled() or not slot.buf.is_inference())
            ):
                self._zero(slot)
                return slot.buf.view(shape)
        buf = torch.zeros(numel, dtype=dtype, device=device)
        self._slots.append(_Slot(buf, self._use_count(buf)))
        self._evict()
        return buf.view(shape)

    @staticmethod
    def _zero(slot: _Slot) -> None:
        rows = slot.rows
        if rows is not None and slot.version is not None and _version(slot.buf) == slot.version:
            slot.buf.view(-1, slot.row_len).index_fill_(0, rows, 0)
        else:
            slot.buf.zero_()
        slot.rows = slot.version = None

    def written(self, t: Tensor, rows: Tensor) -> None:
        """Record that ``t`` (a tensor :meth:`zeros` returned, viewed as ``[-1, t.shape[-1]]``) is zero outside
        ``rows``, as it is right now; a tensor not from the pool is ignored."""
        ptr = t.untyped_storage().data_ptr()
        for slot in self._slots:
            if slot.buf.untyped_storage().data_ptr() == ptr and t.numel() == slot.buf.numel():
                slot.rows, slot.row_len, slot.version = rows.detach(), t.shape[-1], _version(slot.buf)
                return

    def _evict(self) -> None:
        """Drop free buffers, oldest first, while the pool holds more than ``max_bytes``."""
        total = self.nbytes
        keep = []
        for slot in self._slots:
            size = slot.buf.numel() * slot.buf.element_size()
            if total > self.max_bytes and self._free(slot):
                total -= size
            else:
                keep.append(slot)
        # buffers in use above the cap are forgotten (freed when their caller drops them)
        while total > self.max_bytes and len(keep) > 1:
            slot = keep.pop(0)
            total -= slot.buf.numel() * slot.buf.element_size()
        self._slots = keep

    def clear(self) -> None:
        """Forget every buffer (memory is freed once callers drop their caches)."""
        self._slots = []

    def __getstate__(self) -> dict:
        # a pickled pool (e.g. shipped by value with a remote trace) carries its settings, never its buffers
        return {"enabled": self.enabled, "min_bytes": self.min_bytes, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["min_bytes"], state["max_bytes"])  # type: ignore[misc]  # re-init on unpickling
        self.enabled = state["enabled"]


#: the process-wide pool used by :mod:`moe_interp.tracing`
BUFFERS = BufferPool()
