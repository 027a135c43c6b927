"""``torch.save`` zip archives read in place: records located without a copy, each storage
a ``torch.frombuffer`` over the caller's mapping.

Part of :mod:`ckpt_ir.safety.unpickler`; its docstring states the trust model."""

from __future__ import annotations

import mmap
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from ckpt_ir.dtypes import DType
from ckpt_ir.errors import CorruptCheckpointError, FormatError
from ckpt_ir.safety.unpickler.allow_list import _check, _NeedsTorch
from ckpt_ir.safety.unpickler.machine import _unpickle
from ckpt_ir.safety.unpickler.records import StorageRecord

# The magic number that pre-1.6 (non-zip) torch.save files start with, pickled with protocol 2.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]


class _ViewReader:
    """A seekable file over a memoryview, so zipfile can parse an archive without a copy."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self._pos + n)
        start = min(self._pos, end)
        self._pos = max(self._pos, end)
        return bytes(self._view[start:end])

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class _Record:
    offset: int  # absolute, in the underlying buffer
    size: int


MAX_ZIP_DIRECTORY = 16 * 2**20
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"


def _central_directory_size(view: memoryview) -> int | None:
    """The central directory size an archive's end records declare (zip64 included), or None
    when there are none (zipfile then refuses the archive itself)."""
    tail_start = max(0, len(view) - (22 + 65535))
    tail = bytes(view[tail_start:])
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        return None
    (size,) = struct.unpack("<I", tail[at + 12:at + 16])
    locator = tail_start + at - 20
    if locator >= 0 and bytes(view[locator:locator + 4]) == _ZIP64_LOCATOR:
        (record,) = struct.unpack("<Q", bytes(view[locator + 8:locator + 16]))
        if record + 56 <= len(view) and bytes(view[record:record + 4]) == _ZIP64_EOCD:
            # zipfile takes every field from the zip64 record when there is one.
            (size,) = struct.unpack("<Q", bytes(view[record + 40:record + 48]))
    return min(size, len(view))  # zipfile reads no further than the archive's end


class _Archive:
    """One torch.save archive inside ``buffer[start:start + length]``; storages are views."""

    def __init__(self, buffer: mmap.mmap | bytearray, start: int, length: int, where: str,
                 path: str | None) -> None:
        self._buffer = buffer
        self._where = where
        self._path = path
        self._storages: dict[str, tuple[torch.storage.TypedStorage, torch.dtype, int]] = {}
        self._storage_records: dict[str, StorageRecord] = {}
        view = memoryview(buffer)[start:start + length]
        head = bytes(view[:512])
        if not head.startswith(b"PK\x03\x04"):
            if head.startswith(_LEGACY_TORCH_MAGIC) or head[257:262] == b"ustar":
                raise FormatError(
                    f"legacy torch serialization is not supported: {where} predates torch 1.6 "
                    f"(re-save it with a current torch)", path=path)
            raise CorruptCheckpointError(f"{where} is not a torch.save zip archive", path=path)
        directory = _central_directory_size(view)
        if directory is not None and directory > MAX_ZIP_DIRECTORY:
            # zipfile builds a ~600-byte ZipInfo per 46-byte entry before anything else can
            # be checked: a 251 MB directory of 4M entries took 3 GB.
            raise CorruptCheckpointError(
                f"{where} has a {directory}-byte zip directory; torch.save archives need "
                f"far less (at most {MAX_ZIP_DIRECTORY} bytes, ~200,000 records, accepted)",
                path=path)
        try:
            with zipfile.ZipFile(_ViewReader(view)) as archive:
                infos = archive.infolist()
        except Exception as exc:  # zipfile raises many types on hostile central directories
            raise CorruptCheckpointError(
                f"{where} is not a valid torch.save archive: {type(exc).__name__}: {exc}",
                path=path) from exc
        records: dict[str, _Record] = {}
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size \
                    or info.flag_bits & 0x1:
                raise CorruptCheckpointError(
                    f"record {info.filename!r} in {where} is compressed or encrypted; torch "
                    f"writes stored records only", path=path)
            # zipfile shifts offsets when the directory disagrees with the data; a negative one
            # would index backwards (Python slicing) into whatever precedes the archive.
            header = info.header_offset
            local = bytes(view[header:header + 30]) if header >= 0 else b""
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CorruptCheckpointError(
                    f"record {info.filename!r} in {where} has no local header", path=path)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            data = header + 30 + name_len + extra_len
            if data + info.file_size > length:
                raise CorruptCheckpointError(
                    f"record {info.filename!r} in {where} extends past the end of the archive",
                    path=path)
            if info.filename in records:
                # torch.load reads the first of two same-named records, zipfile the last:
                # which bytes are "the checkpoint" would depend on the reader.
                raise CorruptCheckpointError(
                    f"record {info.filename!r} appears twice in {where}", path=path)
            records[info.filename] = _Record(start + data, info.file_size)
        pickles = [name for name in records if name == "data.pkl" or name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CorruptCheckpointError(
                f"{where} has {len(pickles)} data.pkl records; expected exactly one", path=path)
        prefix = pickles[0][: -len("data.pkl")]
        self._records = {name[len(prefix):]: rec for name, rec in records.items()
                         if name.startswith(prefix)}
        order = self._records.get("byteorder")
        if order is not None and order.size <= 8:
            value = self._read(order)
            if value in (b"little", b"big") and value != sys.byteorder.encode():
                raise FormatError(f"{where} was saved on a {value.decode()}-endian machine; "
                                  f"byte-swapping is not supported", path=path)
        if order is not None and (order.size > 8 or self._read(order) not in (b"little", b"big")):
            raise CorruptCheckpointError(f"{where} has an invalid byteorder record", path=path)

    def _read(self, record: _Record) -> bytes:
        return bytes(memoryview(self._buffer)[record.offset:record.offset + record.size])

    def _storage_bytes(self, key: str, nbytes: int) -> _Record:
        """The record holding storage ``key``, which must be exactly ``nbytes`` long: the one
        check both loading modes make before a storage or its record exists."""
        record = self._records.get(f"data/{key}")
        if record is None:
            raise pickle.UnpicklingError(f"storage record data/{key} is missing")
        _check(record.size == nbytes,
               f"storage record data/{key} has {record.size} bytes, expected {nbytes}")
        return record

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.storage.TypedStorage:
        import torch  # an archive's storages are torch's; a .metadata load never gets here

        cached = self._storages.get(key)
        if cached is not None:
            _check(cached[1:] == (dtype, numel), f"storage {key} is used with two dtypes/sizes")
            return cached[0]
        record = self._storage_bytes(key, numel * dtype.itemsize)
        nbytes = record.size
        if nbytes == 0:
            untyped = torch.UntypedStorage(0)
        else:
            # A memoryview (not the mmap itself) so that closing the mmap while tensors use it
            # raises BufferError instead of unmapping live memory.
            untyped = torch.frombuffer(memoryview(self._buffer), dtype=torch.uint8,
                                       count=nbytes, offset=record.offset).untyped_storage()
        storage = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        self._storages[key] = (storage, dtype, numel)
        return storage

    def storage_record(self, key: str, dtype: DType, numel: int) -> StorageRecord:
        """:meth:`storage` in metadata mode: the same checks, a record of where the bytes are."""
        cached = self._storage_records.get(key)
        if cached is not None:
            _check((cached.dtype, cached.numel) == (dtype, numel),
                   f"storage {key} is used with two dtypes/sizes")
            return cached
        record = self._storage_bytes(key, numel * dtype.itemsize)
        storage = StorageRecord(key, dtype, numel, self._buffer, record.offset)
        self._storage_records[key] = storage
        return storage

    def load(self, *, metadata_only: bool = False) -> Any:
        data = self._read(self._records["data.pkl"])
        if metadata_only:
            try:
                return _unpickle(data, self._where, self._path, storages=self.storage_record,
                                 torch_free=True)
            except _NeedsTorch:
                pass  # a torch global metadata mode has no rule for: tensors, as by default
        return _unpickle(data, self._where, self._path, storages=self.storage)


def _where(path: str | None, offset: int, length: int, whole: bool) -> str:
    name = "<memory>" if path is None else path
    return name if whole else f"{name} [bytes {offset}:{offset + length}]"
