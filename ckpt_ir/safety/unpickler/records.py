"""Tensors read as metadata: what a ``torch.save`` archive declares about each tensor, without
torch (``ckpt-ir inspect`` of per-rank checkpoints).

In metadata mode with an archive (:func:`~ckpt_ir.safety.unpickler.load_torch_buffer` with
``metadata_only=True``) a storage's persistent id becomes a :class:`StorageRecord` (its dtype
from the storage class's name, its bytes located and sized exactly as the default mode checks
them) and ``_rebuild_tensor_v2`` / ``_v3`` / ``_rebuild_parameter`` a :class:`TensorRecord`
after exactly the bounds and overlap checks of the tensor rebuilder
(:func:`~ckpt_ir.safety.unpickler.allow_list._check_view`). No storage is materialised; the
record knows where its bytes are, so a caller can compare two views' bytes.

Part of :mod:`ckpt_ir.safety.unpickler`; its docstring states the trust model.
"""

from __future__ import annotations

from typing import Any

from ckpt_ir.dtypes import DType

__all__ = ["StorageClass", "StorageRecord", "TensorRecord"]


class StorageClass:
    """A legacy storage class global (``torch.BFloat16Storage``) read in metadata mode: only
    the element type it stands for."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: DType) -> None:
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class StorageRecord:
    """One storage of an archive: ``numel`` elements of ``dtype`` at ``buffer[start:+nbytes]``."""

    __slots__ = ("buffer", "dtype", "key", "nbytes", "numel", "start")

    def __init__(self, key: str, dtype: DType, numel: int, buffer: Any, start: int) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.nbytes = numel * dtype.itemsize
        self.buffer = buffer
        self.start = start

    def __repr__(self) -> str:
        return f"StorageRecord({self.key!r}, {self.dtype}, {self.numel})"


class TensorRecord:
    """A tensor as metadata: ``shape``, ``stride()``, ``dtype`` (a :class:`DType`), its
    element offset in ``storage``; the few tensor methods the readers' metadata passes use."""

    __slots__ = ("dtype", "offset", "requires_grad", "shape", "storage", "strides")

    def __init__(self, storage: StorageRecord, offset: int, shape: tuple[int, ...],
                 strides: tuple[int, ...], dtype: DType, requires_grad: bool) -> None:
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.strides = strides
        self.dtype = dtype
        self.requires_grad = requires_grad

    def dim(self) -> int:
        return len(self.shape)

    def stride(self) -> tuple[int, ...]:
        return self.strides

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def start(self) -> int:
        """Where its first element is, in the mapped buffer."""
        return self.storage.start + self.offset * self.dtype.itemsize

    def contiguous_bytes(self) -> memoryview | None:
        """Its elements' bytes, row-major, if it is a contiguous view; None otherwise."""
        acc = 1
        for n, s in zip(reversed(self.shape), reversed(self.strides), strict=True):
            if n > 1 and s != acc:
                return None
            acc *= n
        start = self.start()
        return memoryview(self.storage.buffer)[start:start + self.numel() * self.dtype.itemsize]

    def __repr__(self) -> str:
        return f"TensorRecord({self.dtype}, {self.shape})"
