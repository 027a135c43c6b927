"""Device-to-host copies of a GPU rank's tensors for a save: pinned, and overlapped with writes.

A tensor on a GPU reaches a file through host memory. ``tensor.cpu()`` copies it into freshly
allocated pageable memory (a page fault per page, and the driver bounces the copy through a
pinned buffer of its own), and nothing is written while it copies: on one H100 that made the
manager's save 0.81x megatron-core's (issue #17). Two tools replace it:

* :class:`HostStream` (synchronous saves): pieces of at most ``piece_bytes`` are copied on a
  side CUDA stream into a small ring of pinned buffers, up to ``depth`` pieces ahead of the
  writer, so the bus and the file are busy at the same time, and host memory stays a few
  pieces whatever the model's size.
* :class:`HostArena` (``async_=True``): one pinned buffer, kept from save to save, receives every
  tensor with non-blocking copies and one synchronisation, so ``save`` returns after the bus
  time alone; the background write then reads host memory the training cannot touch.

CPU tensors pass through both untouched.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch

from ckpt_ir.errors import InternalError

__all__ = ["HostArena", "HostStream"]

_ALIGN = 64  # bytes between two tensors of the arena (any dtype's alignment)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1) if t.is_contiguous() else t.detach().contiguous().view(-1)


class HostStream:
    """Host copies of ``tensors``' bytes, piece by piece, a few pieces ahead of the consumer.

    Consume the tensors in order, each through :meth:`pieces`: it yields CPU tensors of the
    same dtype holding successive row-major runs of the tensor's elements, each valid until the
    next is requested (its pinned buffer is then reused). Copies for the following pieces, of
    this tensor and the next ones, are already under way while a piece is being written.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], *, piece_bytes: int = 64 << 20,
                 depth: int = 4) -> None:
        self._tensors = list(tensors)
        # (tensor index, first element, element count) for every piece of every CUDA tensor
        self._items: list[tuple[int, int, int]] = []
        device = None
        for i, t in enumerate(self._tensors):
            if not t.is_cuda:
                continue
            device = device or t.device
            per = max(1, piece_bytes // t.element_size())
            n = t.numel()
            self._items.extend((i, a, min(per, n - a)) for a in range(0, n, per))
        self._next_tensor = 0
        self._issued = 0   # items whose copy has been started
        self._consumed = 0
        # (item, host view, copy done, its pinned buffer, the device source kept alive)
        self._inflight: deque[tuple[int, torch.Tensor, torch.cuda.Event, torch.Tensor,
                                    torch.Tensor]] = deque()
        self._free: deque[torch.Tensor] = deque()
        self._stream = None
        if device is not None:
            self._stream = torch.cuda.Stream(device)
            # The tensors were produced on the caller's stream: copy only once that is done.
            self._stream.wait_stream(torch.cuda.current_stream(device))
            for _ in range(max(1, depth)):
                self._free.append(torch.empty(piece_bytes, dtype=torch.uint8, pin_memory=True))

    def _issue(self) -> None:
        while self._free and self._issued < len(self._items):
            i, start, count = self._items[self._issued]
            src = _flat(self._tensors[i]).narrow(0, start, count)
            buf = self._free.popleft()
            dst = buf[: count * src.element_size()].view(src.dtype)
            with torch.cuda.stream(self._stream):
                dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            # src is kept alive with the copy: a contiguous() temporary must outlive it.
            self._inflight.append((self._issued, dst, event, buf, src))
            self._issued += 1

    def pieces(self, index: int) -> Iterator[torch.Tensor]:
        """The bytes of tensor ``index`` (the next one in order) as host pieces."""
        if index != self._next_tensor:
            raise InternalError(f"host stream: tensor {index} requested, {self._next_tensor} "
                                "is next")
        self._next_tensor += 1
        tensor = self._tensors[index]
        if not tensor.is_cuda:
            yield tensor
            return
        while self._consumed < len(self._items) and self._items[self._consumed][0] == index:
            self._issue()
            item, dst, event, buf, _src = self._inflight.popleft()
            if item != self._consumed:
                raise InternalError("host stream: pieces out of order")
            event.synchronize()
            self._consumed += 1
            try:
                yield dst
            finally:
                self._free.append(buf)
                self._issue()

    def close(self) -> None:
        """Wait for copies still in flight (after an error midway)."""
        if self._stream is not None:
            self._stream.synchronize()
        self._inflight.clear()


class HostArena:
    """A pinned host buffer that receives a rank's CUDA tensors, reused from save to save.

    Pinned memory is what lets the copies run at the bus's speed without the CPU, but pinning
    is slow (the kernel faults in and locks every page), so the buffer is registered once and
    kept; it grows when a save needs more. The memory is a plain CPU tensor registered with
    ``cudaHostRegister`` for exactly the bytes asked, rather than torch's pinned allocator,
    which rounds every block up to a power of two (4 GiB for a 2.2 GB model).
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._registered = False

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def _reserve(self, nbytes: int) -> torch.Tensor:
        if self._buffer is not None and self._buffer.numel() >= nbytes:
            return self._buffer
        self.release()
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        # On failure (no room to lock that much memory) the copies still work, pageable.
        self._registered = int(err) == 0
        self._buffer = buffer
        return buffer

    def copy(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Host copies of ``tensors`` (CUDA ones through the arena, others cloned), once the
        copies are complete. They stay valid until the next :meth:`copy` or :meth:`release`."""
        sizes = [t.numel() * t.element_size() if t.is_cuda else 0 for t in tensors]
        total = sum(-(-n // _ALIGN) * _ALIGN for n in sizes)
        if total == 0:
            return [t.detach().to("cpu", copy=True) for t in tensors]
        buffer = self._reserve(total)
        out: list[torch.Tensor] = []
        at = 0
        devices = set()
        for t, n in zip(tensors, sizes, strict=True):
            if not t.is_cuda:
                out.append(t.detach().to("cpu", copy=True))
                continue
            dst = buffer[at: at + n].view(t.dtype).view(t.shape)
            dst.copy_(t.detach(), non_blocking=True)
            devices.add(t.device)
            out.append(dst)
            at += -(-n // _ALIGN) * _ALIGN
        for device in devices:
            torch.cuda.current_stream(device).synchronize()
        return out

    def release(self) -> None:
        """Unpin and free the buffer."""
        if self._buffer is not None and self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._buffer.data_ptr())
        self._buffer, self._registered = None, False
