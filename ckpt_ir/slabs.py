"""Slabs that are byte ranges of a source file, copied in the kernel.

A destination tensor reaches a streaming writer as row-major slabs
(:meth:`~ckpt_ir.transforms.Transform.slabs`). Most slabs are views of a source tensor that is
itself a view of a memory-mapped source file (a safetensors entry, a torch_dist record): the
bytes to write are a byte range of that file. Writing them from the mapping costs a page fault
per 4-64 KiB and a copy through user space; ``copy_file_range(2)`` moves them inside the kernel,
as ``cp`` does. On a 2 GiB file here that is 1.0 s instead of 1.5 s, most of what separated a
conversion from the copy floor.

The executor asks the reader where a slab's bytes are (``reader.locate(tensor)``: a path and an
offset, or None) and hands the writer a :class:`FileSlab` in its place; writers that take them
(``accepts_file_slabs``) write one with :func:`copy_range`. Anything else (a fused part built in
memory, a cast, a slab that is not contiguous) stays a tensor.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


__all__ = ["FileSlab", "copy_range", "mapping_address", "offset_in_mapping"]

_CHUNK = 1 << 30  # bytes per copy_file_range call (the kernel caps one call near 2 GiB)
_FALLBACK_CHUNK = 64 << 20


@dataclass(frozen=True, slots=True)
class FileSlab:
    """``nbytes`` bytes of the open file ``fd`` from ``offset``, standing for a ``dtype`` slab."""

    fd: int
    offset: int
    nbytes: int
    dtype: torch.dtype


def mapping_address(mm: mmap.mmap) -> int:
    """The address of a mapping's first byte."""
    anchor = ctypes.c_char.from_buffer(mm)  # holds an export on the mapping while it lives
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def offset_in_mapping(tensor: torch.Tensor, address: int, size: int) -> int | None:
    """Where ``tensor``'s bytes start in a mapping of ``size`` bytes at ``address``, if the
    tensor is a contiguous run of that mapping's bytes; otherwise None."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return None
    start = tensor.data_ptr() - address
    if start < 0 or start + tensor.numel() * tensor.element_size() > size:
        return None
    return start


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` from ``src_fd`` at ``src_offset`` to ``dst_fd`` at ``dst_offset``.

    ``copy_file_range`` where the kernel and filesystems allow it; ``pread``/``pwrite`` where
    they do not (another filesystem on old kernels, some network filesystems).
    """
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(nbytes - done, _CHUNK),
                                   src_offset + done, dst_offset + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                               errno.EBADF, errno.EPERM):
                raise
            _copy_through_memory(src_fd, src_offset + done, dst_fd, dst_offset + done,
                                 nbytes - done)
            return
        if n == 0:
            raise OSError(errno.EIO, f"source ended {nbytes - done} bytes early at offset "
                                     f"{src_offset + done}")
        done += n


def _copy_through_memory(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int,
                         nbytes: int) -> None:
    done = 0
    while done < nbytes:
        data = os.pread(src_fd, min(nbytes - done, _FALLBACK_CHUNK), src_offset + done)
        if not data:
            raise OSError(errno.EIO, f"source ended {nbytes - done} bytes early")
        view = memoryview(data)
        while view:
            written = os.pwrite(dst_fd, view, dst_offset + done)
            view = view[written:]
            done += written
