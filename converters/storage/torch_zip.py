"""Streaming writer of ``torch.save`` archives: tensor data goes to disk as it arrives.

``torch.save(obj)`` needs every tensor of ``obj`` in memory at once. A per-rank checkpoint
file (verl's ``model.pt``, Megatron-LM's ``model_optim_rng.pt``) can be tens of GB, and
ckpt-ir produces its tensors one at a time, so :class:`TorchZipWriter` writes the same archive
incrementally:

* :meth:`TorchZipWriter.add_tensor` appends the tensor's bytes as a stored (uncompressed)
  record ``<archive>/data/<key>`` whose data starts on a 64-byte boundary (what torch writes, so
  ``torch.load(mmap=True)`` and ckpt-ir's zero-copy reader map it directly), and returns a
  :class:`TensorRef` to place in the object; :meth:`TorchZipWriter.add_tensor_slabs` does the
  same for a tensor given as row-major pieces (a fused QKV as its per-group q/k/v rows), so the
  fused tensor is never built;
* :meth:`TorchZipWriter.close` pickles the object (protocol 2, tensors as
  ``torch._utils._rebuild_tensor_v2`` over persistent storage ids, exactly like torch), writes
  ``data.pkl``, the small metadata records and the zip central directory.

The archive layout on disk::

    <archive>/data/0        storage bytes of the first tensor (64-byte aligned)
    <archive>/data/1        ...
    <archive>/data.pkl      the pickled object, referencing storages by key
    <archive>/.format_version, .storage_alignment, byteorder, version, .data/serialization_id
    central directory       (ZIP64 records when offsets or sizes pass 4 GiB)

Records are in a different order than ``torch.save`` writes them (``data.pkl`` last), which
zip readers do not care about: they locate records through the central directory. Output
loads with ``torch.load(weights_only=True)`` (plain containers and tensors) and with
:func:`ckpt_ir.safety.unpickler.load_torch`. Several writers may be open at once.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import uuid
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_ir.durable import WRITEBACK_MIN, close_file, start_writeback
from ckpt_ir.errors import DestinationExistsError, InternalError
from ckpt_ir.slabs import FileSlab, copy_range

if TYPE_CHECKING:
    import torch

__all__ = ["ALIGNMENT", "TensorRef", "TorchZipWriter"]

ALIGNMENT = 64
"""Data of every record starts at a multiple of this (torch's ``.storage_alignment``)."""

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory header, 46 bytes
_EOCD = struct.Struct("<IHHHHIIH")  # end of central directory, 22 bytes
_EOCD64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end of central directory, 56 bytes
_LOCATOR64 = struct.Struct("<IIQI")  # zip64 end of central directory locator, 20 bytes
_U32 = 0xFFFFFFFF
_U16 = 0xFFFF
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, what torch writes
_PAD_ID = 0x4246  # "FB": torch's padding extra field
_CRC_AT = 14  # offset of the CRC-32 in a local file header

# Legacy storage classes by dtype: torch pickles a storage's type as one of these globals.
_STORAGE_NAMES = ("DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage",
                  "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage",
                  "ComplexFloatStorage", "ComplexDoubleStorage")


@cache
def _storage_types() -> dict[torch.dtype, type]:
    # Built on first write: importing this module (the per-rank and DCP readers do) must not
    # import torch (`ckpt-ir inspect`).
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading a legacy class's dtype warns about TypedStorage
        return {getattr(torch, n).dtype: getattr(torch, n) for n in _STORAGE_NAMES}


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor already written to an archive; put it where the tensor goes in the object."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def stride(self) -> tuple[int, ...]:
        stride, acc = [], 1
        for n in reversed(self.shape):
            stride.append(acc)
            acc *= max(n, 1)
        return tuple(reversed(stride))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True, slots=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True, slots=True)
class _Entry:
    name: bytes
    offset: int  # of the local header
    size: int
    crc: int


class _Pickler(pickle.Pickler):
    """torch's tensor pickling, for :class:`TensorRef` placeholders instead of tensors."""

    def persistent_id(self, obj: Any) -> Any:
        import torch

        if isinstance(obj, _StorageRef):
            legacy = _storage_types().get(obj.dtype)
            if legacy is None:  # counted in bytes, like torch's UntypedStorage
                return ("storage", torch.UntypedStorage, obj.key, "cpu",
                        obj.numel * _itemsize(obj.dtype))
            return ("storage", legacy, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        import torch

        if isinstance(obj, TensorRef):
            storage = _StorageRef(obj.key, obj.dtype, obj.numel)
            # (storage, storage_offset, size, stride, requires_grad, backward_hooks), as
            # torch.Tensor.__reduce_ex__ writes for a plain CPU tensor; dtypes without a legacy
            # storage class (float8, uint16, ...) add the dtype and use _rebuild_tensor_v3.
            if obj.dtype in _storage_types():
                return (torch._utils._rebuild_tensor_v2,
                        (storage, 0, obj.shape, obj.stride, False, OrderedDict()))
            return (torch._utils._rebuild_tensor_v3,
                    (storage, 0, obj.shape, obj.stride, False, OrderedDict(), obj.dtype))
        if isinstance(obj, torch.Tensor):
            raise InternalError("TorchZipWriter objects hold TensorRefs, not tensors")
        return NotImplemented


@cache
def _quantized() -> frozenset[torch.dtype]:
    import torch

    return frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})


def _itemsize(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _file_crc32(slab: FileSlab, crc: int) -> int:
    done = 0
    while done < slab.nbytes:
        data = os.pread(slab.fd, min(slab.nbytes - done, 64 << 20), slab.offset + done)
        if not data:
            raise InternalError(f"file range of {slab.nbytes} bytes ends after {done}")
        crc = zlib.crc32(data, crc)
        done += len(data)
    return crc


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as bytes, without a copy when it is contiguous on the CPU."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


class TorchZipWriter:
    """One ``torch.save``-compatible archive, written record by record.

    Example::

        w = TorchZipWriter(path)
        ref = w.add_tensor(torch.ones(3))
        w.close([{"weight": ref}])        # == torch.save([{"weight": torch.ones(3)}], path)

    :meth:`appending` writes an archive into a file that is already open, from its current
    position (torch DCP's ``.distcp`` files are archives one after another); zip offsets are then
    relative to the archive's first byte, as ``torch.save`` into a file object writes them.
    ``crc32=False`` stores 0 as every record's CRC-32, as ``torch.save`` does with
    ``torch.serialization.set_crc32_options(False)`` (torch's readers do not check it).
    ``force_zip64`` writes ZIP64 records even for small archives (tests exercise the > 4 GiB
    layout with it).
    """

    def __init__(self, path: str | os.PathLike[str], *, archive_name: str | None = None,
                 force_zip64: bool = False, crc32: bool = True) -> None:
        self.path = Path(path)
        name = archive_name if archive_name is not None else self.path.stem
        try:
            file = open(self.path, "xb")
        except FileExistsError:
            raise DestinationExistsError(f"{self.path} already exists", path=self.path) from None
        self._setup(file, name, force_zip64, crc32, owned=True)

    @classmethod
    def appending(cls, file: io.BufferedWriter, path: str | os.PathLike[str], *,
                  archive_name: str = "archive", crc32: bool = False) -> TorchZipWriter:
        """An archive written into ``file`` (named ``path`` in errors) from its position."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self._setup(file, archive_name, False, crc32, owned=False)
        return self

    def _setup(self, file: io.BufferedWriter, name: str, force_zip64: bool, crc32: bool, *,
               owned: bool) -> None:
        if not name or "/" in name or "\\" in name:
            if owned:
                file.close()
            raise InternalError(f"invalid archive name {name!r}")
        self._prefix = name + "/"
        self._zip64 = force_zip64
        self._crc32 = crc32
        self._file: io.BufferedWriter | None = file
        self._owned = owned
        self._base = file.tell()
        self._entries: list[_Entry] = []
        self._next_key = 0

    @property
    def bytes_written(self) -> int:
        return 0 if self._file is None else self._file.tell() - self._base

    def _big(self, value: int) -> bool:
        return self._zip64 or value >= _U32

    def _record(self, name: str, size: int,
                chunks: Iterable[memoryview | bytes | FileSlab]) -> None:
        """Write record ``name`` of ``size`` bytes from ``chunks``, as they come (a
        :class:`~ckpt_ir.slabs.FileSlab` is copied from its file in the kernel)."""
        file = self._file
        if file is None:
            raise InternalError(f"{self.path} is closed")
        raw_name = (self._prefix + name).encode()
        offset = file.tell() - self._base
        zip64 = b""
        if self._big(size):
            zip64 = struct.pack("<HHQQ", 0x0001, 16, size, size)
        # Pad the local header with torch's "FB" extra field so the data is aligned.
        unpadded = offset + _LOCAL.size + len(raw_name) + len(zip64) + 4
        pad = -unpadded % ALIGNMENT
        extra = zip64 + struct.pack("<HH", _PAD_ID, pad) + b"Z" * pad
        shown = _U32 if zip64 else size
        # The CRC is patched in after the data (streamed chunks are not all known up front).
        file.write(_LOCAL.pack(0x04034B50, 45 if zip64 else 20, 0, 0, 0, _DOS_DATE, 0, shown,
                               shown, len(raw_name), len(extra)) + raw_name + extra)
        crc, written = 0, 0
        for chunk in chunks:
            if isinstance(chunk, FileSlab):
                written += chunk.nbytes
                if written > size:
                    break
                if self._crc32:
                    crc = _file_crc32(chunk, crc)
                file.flush()
                at = file.tell()
                copy_range(chunk.fd, chunk.offset, file.fileno(), at, chunk.nbytes)
                file.seek(at + chunk.nbytes)
                continue
            if self._crc32:
                crc = zlib.crc32(chunk, crc)
            written += len(chunk)
            if written > size:
                break
            file.write(chunk)
        if written != size:
            raise InternalError(f"record {name!r} of {self.path}: {written} bytes arrived for "
                                f"a declared {size}")
        if size >= WRITEBACK_MIN:
            file.flush()
            start_writeback(file.fileno(), file.tell() - size, size)
        if crc:
            end = file.tell()
            file.seek(self._base + offset + _CRC_AT)
            file.write(struct.pack("<I", crc))
            file.seek(end)
        self._entries.append(_Entry(raw_name, offset, size, crc))

    def add_tensor(self, tensor: torch.Tensor) -> TensorRef:
        """Append the tensor's data now; return the placeholder for :meth:`close`'s object.

        Only the tensor's own elements are stored (a view of a larger tensor does not drag its
        base along), as one storage of exactly ``numel`` elements.
        """
        return self.add_tensor_slabs(tensor.dtype, tuple(tensor.shape), (tensor,))

    def add_tensor_slabs(self, dtype: torch.dtype, shape: Sequence[int],
                         slabs: Iterable[torch.Tensor | FileSlab]) -> TensorRef:
        """Append a ``shape`` tensor whose row-major bytes are ``slabs``, one after another.

        Each slab goes to the file as it comes (a fused tensor is never built in memory);
        a slab of another dtype, or bytes that do not add up to ``shape``, is an InternalError.
        """
        if dtype in _quantized():
            raise InternalError(f"dtype {dtype} cannot be written as plain bytes")
        ref = TensorRef(str(self._next_key), dtype, tuple(int(n) for n in shape))
        self._next_key += 1

        def chunks() -> Iterator[memoryview | FileSlab]:
            for slab in slabs:
                if slab.dtype != dtype:
                    raise InternalError(f"a slab of {slab.dtype} in a {dtype} tensor")
                yield slab if isinstance(slab, FileSlab) else _tensor_bytes(slab)

        self._record(f"data/{ref.key}", ref.numel * _itemsize(dtype), chunks())
        return ref

    def _pickler(self, file: io.BytesIO) -> pickle.Pickler:
        """The pickler of ``data.pkl``; a subclass writing other tensor types (DTensors)
        returns its own."""
        return _Pickler(file, protocol=2)

    def _finish_archive(self, obj: Any) -> None:
        buffer = io.BytesIO()
        self._pickler(buffer).dump(obj)
        for name, data in (("data.pkl", buffer.getbuffer()), (".format_version", b"1"),
                           (".storage_alignment", str(ALIGNMENT).encode()),
                           ("byteorder", b"little"), ("version", b"3\n"),
                           (".data/serialization_id", uuid.uuid4().hex.encode().ljust(40, b"0"))):
            self._record(name, len(data), (data,))
        self._central_directory()

    def finish(self, obj: Any) -> int:
        """End an :meth:`appending` archive (the file stays open); returns its length."""
        if self._owned:
            raise InternalError("finish() ends an appended archive; close() a file of its own")
        self._finish_archive(obj)
        length = self.bytes_written
        self._file = None
        return length

    def close(self, obj: Any, *, fsync: bool = True) -> None:
        """Pickle ``obj`` (TensorRefs where tensors go), finish the archive, close the file."""
        if self._file is None:
            raise InternalError(f"{self.path} is closed")
        if not self._owned:
            raise InternalError("close() a file of its own; finish() an appended archive")
        self._finish_archive(obj)
        file, self._file = self._file, None
        close_file(file, fsync=fsync)

    def _central_directory(self) -> None:
        if self._file is None:
            raise InternalError(f"{self.path} is closed")
        start = self._file.tell() - self._base
        for e in self._entries:
            fields = []
            if self._big(e.size):
                fields += [e.size, e.size]
            if self._big(e.offset):
                fields.append(e.offset)
            extra = struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields) \
                if fields else b""
            size = _U32 if self._big(e.size) else e.size
            offset = _U32 if self._big(e.offset) else e.offset
            version = 45 if fields else 20
            self._file.write(_CENTRAL.pack(0x02014B50, version, version, 0, 0, 0, _DOS_DATE,
                                           e.crc, size, size, len(e.name), len(extra), 0, 0, 0,
                                           0, offset) + e.name + extra)
        end = self._file.tell() - self._base
        count, length = len(self._entries), end - start
        if self._zip64 or count >= _U16 or start >= _U32 or length >= _U32:
            self._file.write(_EOCD64.pack(0x06064B50, _EOCD64.size - 12, 45, 45, 0, 0, count,
                                          count, length, start))
            self._file.write(_LOCATOR64.pack(0x07064B50, 0, end, 1))
            self._file.write(_EOCD.pack(0x06054B50, 0, 0, _U16, _U16, _U32, _U32, 0))
        else:
            self._file.write(_EOCD.pack(0x06054B50, 0, 0, count, count, length, start, 0))

    def abort(self) -> None:
        """Close without finishing (the caller removes the file or its directory)."""
        if self._file is not None:
            file, self._file = self._file, None
            if self._owned:
                file.close()

    def __enter__(self) -> TorchZipWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.abort()
