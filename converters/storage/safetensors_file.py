"""Streaming safetensors files: a validating mmap reader and a pre-sized, any-order writer.

Why not ``safetensors.torch.save_file``/``load_file``: a converter must stream, its memory bounded
by one tensor and never by the model. ``save_file`` needs every tensor in memory at once, so
instead :class:`SafetensorsWriter` sizes the file from metadata alone (names, dtypes and shapes
known from a plan), writes the header first, then writes each tensor's bytes at its offset, in
any order, as the tensor is produced. The reader treats a file as untrusted: :func:`read_header`
checks every header field (length prefix, UTF-8, JSON, dtypes, shapes, byte counts, offsets that
tile the data section exactly up to the end of the file) before a single data byte is touched,
never allocates based on a header value, and :class:`SafetensorsFile` then hands out zero-copy
tensors backed by a read-only ``mmap``.

File layout (little-endian), as in the reference implementation::

    +-----------+-------------------------------+---------------------------------------+
    | u64 N     | N bytes: JSON header, padded  | data section: tensors back to back,   |
    | (8 bytes) | with spaces to 8-byte align   | offsets relative to its start         |
    +-----------+-------------------------------+---------------------------------------+
    0           8                               8 + N = data_offset                file_size

Example::

    with SafetensorsWriter(path, [("w", dtypes.FLOAT32, (2, 3))], {"format": "pt"}) as writer:
        writer.write("w", torch.zeros(2, 3))
    with SafetensorsFile(path) as f:
        w = f.get("w")
"""

from __future__ import annotations

import json
import math
import mmap
import operator
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Self

from ckpt_ir import dtypes
from ckpt_ir.dtypes import DType
from ckpt_ir.durable import start_writeback
from ckpt_ir.errors import (
    CorruptCheckpointError,
    DestinationExistsError,
    FormatError,
    InternalError,
)
from ckpt_ir.safety.files import open_fd
from ckpt_ir.slabs import FileSlab, copy_range, mapping_address, offset_in_mapping

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPE_TO_ST",
    "ST_TO_DTYPE",
    "SafetensorsFile",
    "SafetensorsHeader",
    "SafetensorsWriter",
    "TensorEntry",
    "plan_layout",
    "read_header",
]

# The safetensors codes ckpt-ir reads and writes (every DType that has one).
DTYPE_TO_ST: dict[DType, str] = {d: d.safetensors for d in (
    dtypes.BOOL, dtypes.UINT8, dtypes.INT8, dtypes.INT16, dtypes.UINT16, dtypes.INT32,
    dtypes.UINT32, dtypes.INT64, dtypes.UINT64, dtypes.FLOAT16, dtypes.BFLOAT16, dtypes.FLOAT32,
    dtypes.FLOAT64, dtypes.FLOAT8_E4M3FN, dtypes.FLOAT8_E5M2) if d.safetensors is not None}
ST_TO_DTYPE: dict[str, DType] = {name: dtype for dtype, name in DTYPE_TO_ST.items()}

# Valid safetensors dtypes that ckpt-ir does not handle: a file using them is well formed, so it
# is a FormatError (unsupported variant), not a CorruptCheckpointError.
_UNSUPPORTED_ST_DTYPES = frozenset(
    {"C64", "F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})

# The reference implementation's cap; it keeps a hostile prefix from making us read 2**64 bytes.
_MAX_HEADER_SIZE = 100_000_000
_METADATA_KEY = "__metadata__"
_ENTRY_KEYS = ("data_offsets", "dtype", "shape")
_PREFIX = 8
# Byte counts are exact Python ints; past 2**64 (the reference's overflow point) the product
# stops growing, so hostile shapes ([2**64] * 10**6) cost linear time and no big-int blowup.
_MAX_TENSOR_BYTES = 2**64
_MAX_DIM = 2**63 - 1
_Corrupt = Callable[..., CorruptCheckpointError]
# Linux moves at most ~2 GiB per read/write call; 1 GiB chunks stay below that everywhere.
_IO_CHUNK = 1 << 30


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a safetensors file; ``start``/``end`` are relative to the data section."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A validated header: ``entries`` in data order, ``data_offset`` = 8 + header length."""

    entries: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]
    data_offset: int
    file_size: int


# --------------------------------------------------------------------------------------------
# Reading


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``; no data byte is read.

    Raises:
        CorruptCheckpointError: the file cannot be read or any header field is invalid
            (``path`` is set; the message is one line naming the offending field).
        FormatError: the header is valid but uses a dtype ckpt-ir does not support.
    """
    fd = _open_readonly(path)
    try:
        return _read_header_fd(fd, path)
    finally:
        os.close(fd)


class SafetensorsFile:
    """A safetensors file opened read-only with ``mmap``; its header is validated on open.

    Tensors from :meth:`get` are zero-copy views of the mapping and stay valid after
    :meth:`close`: the mapping is released when the last of them is freed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._mmap: mmap.mmap | None = None
        fd = _open_readonly(path)
        try:
            self.header: SafetensorsHeader = _read_header_fd(fd, path)
            # The mapping keeps its own reference to the file; our descriptor is not needed.
            # Copy-on-write rather than read-only: torch cannot mark a tensor read-only, and an
            # in-place op on a read-only mapping is a SIGSEGV. Nothing here writes, so no page
            # is ever copied.
            self._mmap = mmap.mmap(fd, self.header.file_size, access=mmap.ACCESS_COPY)
            self._address = mapping_address(self._mmap)
        except (OSError, ValueError) as e:
            # ValueError: the file shrank between the header check and the mapping.
            raise CorruptCheckpointError(
                f"cannot map safetensors file {self.path}: {getattr(e, 'strerror', None) or e}",
                path=self.path) from e
        finally:
            os.close(fd)

    def keys(self) -> list[str]:
        """Tensor names in data order (ascending offsets), the order that reads sequentially."""
        return list(self.header.entries)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a zero-copy view of the file.

        The mapping is private (copy-on-write): an in-place op changes this process's copy
        only, never the file, and :meth:`release` discards such changes. A tensor
        whose offset is not a multiple of its item size (never the case in files from
        :class:`SafetensorsWriter` with entries sorted by descending item size, nor from the
        reference writer) is copied instead, because misaligned element pointers are undefined
        behaviour for torch kernels.

        Raises:
            FormatError: the file has no tensor ``name``.
        """
        import torch

        entry = self.header.entries.get(name)
        if entry is None:
            raise FormatError(f"tensor {name!r} not in {self.path}", path=self.path, tensor=name)
        if self._mmap is None:
            raise InternalError(f"SafetensorsFile.get({name!r}) after close() of {self.path}")
        if entry.nbytes == 0:
            # torch.frombuffer rejects empty buffers.
            return torch.empty(entry.shape, dtype=entry.dtype.torch)
        offset = self.header.data_offset + entry.start
        # A fresh memoryview per tensor: torch keeps it alive, and with it an export on the
        # mmap, so close() cannot unmap memory a live tensor still points into.
        view = memoryview(self._mmap)
        itemsize = entry.dtype.itemsize
        if offset % itemsize == 0:
            flat = torch.frombuffer(view, dtype=entry.dtype.torch,
                                    count=entry.nbytes // itemsize, offset=offset)
        else:
            raw = torch.frombuffer(view, dtype=torch.uint8, count=entry.nbytes, offset=offset)
            flat = raw.clone().view(entry.dtype.torch)
        return flat.view(entry.shape)

    def locate(self, tensor: torch.Tensor) -> int | None:
        """The file offset of ``tensor``'s bytes, if it is a contiguous view of this mapping."""
        if self._mmap is None:
            return None
        return offset_in_mapping(tensor, self._address, len(self._mmap))

    def release(self) -> None:
        """Drop the pages read so far from this process (they stay in the page cache).

        Mapped pages count towards RSS until unmapped; a streaming reader calls this after each
        unit of work so RSS stays at one unit, not the whole file. Tensors still alive remain
        valid: their pages fault back in from the file.
        """
        if self._mmap is not None:
            self._mmap.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Drop the mapping; it is unmapped now, or when the last tensor from it is freed."""
        if self._mmap is None:
            return
        try:
            self._mmap.close()
        except BufferError:
            pass  # tensors still reference it; it unmaps when the last one is freed
        self._mmap = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._mmap is None else "open"
        return f"SafetensorsFile({self.path!r}, {len(self.header.entries)} tensors, {state})"


def _open_readonly(path: str | os.PathLike[str]) -> int:
    return open_fd(path, "safetensors file")


def _pread_exact(fd: int, size: int, offset: int, path: str | os.PathLike[str]) -> bytes:
    chunks = []
    while size > 0:
        try:
            chunk = os.pread(fd, min(size, _IO_CHUNK), offset)
        except OSError as e:
            raise CorruptCheckpointError(
                f"cannot read safetensors file {os.fspath(path)}: {e.strerror or e}", path=path
            ) from e
        if not chunk:
            raise CorruptCheckpointError(
                f"safetensors file {os.fspath(path)} ended while reading its header "
                "(was it truncated while open?)", path=path)
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_header_fd(fd: int, path: str | os.PathLike[str]) -> SafetensorsHeader:
    try:
        file_size = os.fstat(fd).st_size
    except OSError as e:
        raise CorruptCheckpointError(
            f"cannot stat safetensors file {os.fspath(path)}: {e.strerror or e}", path=path
        ) from e
    if file_size < _PREFIX:
        raise CorruptCheckpointError(
            f"safetensors file {os.fspath(path)} is {file_size} bytes, "
            "shorter than the 8-byte header length prefix", path=path)
    header_len = int.from_bytes(_pread_exact(fd, _PREFIX, 0, path), "little")
    # Both bounds are checked before reading, so the read below is at most the file's size.
    _check_header_len(header_len, file_size, path)
    return _parse_header(_pread_exact(fd, header_len, _PREFIX, path), file_size, path)


def _check_header_len(header_len: int, file_size: int, path: str | os.PathLike[str]) -> None:
    where = os.fspath(path)
    if header_len > _MAX_HEADER_SIZE:
        raise CorruptCheckpointError(
            f"safetensors header of {where} declares {header_len} bytes, "
            f"above the {_MAX_HEADER_SIZE}-byte limit", path=path)
    if header_len > file_size - _PREFIX:
        raise CorruptCheckpointError(
            f"safetensors header of {where} declares {header_len} bytes "
            f"but the file has only {file_size - _PREFIX} after the length prefix", path=path)


def _parse_header(header: bytes, file_size: int,
                  path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Validate the JSON header bytes (without the length prefix) of a file of ``file_size``."""
    where = os.fspath(path)

    def corrupt(problem: str, tensor: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"safetensors header of {where} {problem}",
                                      path=path, tensor=tensor)

    data_offset = _PREFIX + len(header)
    data_len = file_size - data_offset
    if data_len < 0:
        raise InternalError(f"_parse_header: {len(header)}-byte header in a {file_size}-byte file")
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise corrupt(f"is not valid UTF-8 (byte {e.start})") from e
    try:
        root = json.loads(text, object_pairs_hook=_unique_object,
                          parse_constant=_reject_constant)
    except _DuplicateKeyError as e:
        raise corrupt(f"repeats the key {_short(e.key)} in one object") from e
    except json.JSONDecodeError as e:
        raise corrupt(f"is not valid JSON: {e.msg} at character {e.pos}") from e
    except (ValueError, RecursionError) as e:
        # NaN/Infinity (not JSON), integers past Python's digit limit, absurd nesting.
        raise corrupt(f"is not valid JSON: {_one_line(e)}") from e
    if not isinstance(root, dict):
        raise corrupt(f"is a JSON {_json_type(root)}, not an object")

    metadata = _check_metadata(root.pop(_METADATA_KEY, {}), corrupt)
    entries = [_check_entry(name, info, data_len, path, corrupt) for name, info in root.items()]

    # Sorted by offsets, entries must tile [0, data_len) exactly: a gap would hide bytes, an
    # overlap would alias two tensors, and trailing bytes would mean the file is not what the
    # header claims. The sort is stable, so zero-size tensors at one offset keep the header's
    # order, and a writer given these entries in this order reproduces the file byte for byte.
    entries.sort(key=lambda e: (e.start, e.end))
    covered = 0
    previous = ""
    for entry in entries:
        if entry.start > covered:
            raise corrupt(f"leaves bytes [{covered}, {entry.start}) of the data section unused "
                          f"before tensor {entry.name!r}", tensor=entry.name)
        if entry.start < covered:
            raise corrupt(f"declares tensor {entry.name!r} at bytes [{entry.start}, {entry.end}) "
                          f"overlapping tensor {previous!r}, which ends at {covered}",
                          tensor=entry.name)
        covered = entry.end
        previous = entry.name
    if covered != data_len:
        raise corrupt(f"leaves bytes [{covered}, {data_len}) of the data section unused "
                      "at the end of the file")
    return SafetensorsHeader(
        entries=MappingProxyType({e.name: e for e in entries}),
        metadata=MappingProxyType(metadata),
        data_offset=data_offset,
        file_size=file_size,
    )


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of duplicate keys, other readers may keep the first: refuse, so
    # that no two readers can see different tensors in one file.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _check_metadata(value: Any, corrupt: _Corrupt) -> dict[str, str]:
    if not isinstance(value, dict):
        raise corrupt(f"has __metadata__ that is a JSON {_json_type(value)}, not an object")
    for key, item in value.items():
        if not isinstance(item, str):
            raise corrupt(f"has __metadata__ value for {_short(key)} that is a "
                          f"JSON {_json_type(item)}, not a string")
        if not _is_utf8(key) or not _is_utf8(item):
            raise corrupt("has __metadata__ with an unpaired surrogate escape")
    return value


def _check_entry(name: str, info: Any, data_len: int, path: str | os.PathLike[str],
                 corrupt: _Corrupt) -> TensorEntry:
    def bad(problem: str) -> CorruptCheckpointError:
        return corrupt(f"declares tensor {name!r} {problem}", tensor=name)

    if not _is_utf8(name):
        # No tensor= here: str() would append the raw name, which cannot be printed.
        raise corrupt(f"declares tensor {name!r} whose name has an unpaired surrogate escape")
    if not isinstance(info, dict):
        raise bad(f"as a JSON {_json_type(info)}, not an object")
    for key in _ENTRY_KEYS:
        if key not in info:
            raise bad(f"without the key {key!r}")
    for key in info:
        if key not in _ENTRY_KEYS:
            raise bad(f"with the unexpected key {_short(key)}")

    st_dtype = info["dtype"]
    # isinstance first: a JSON array or object is unhashable and would break the lookups.
    dtype = ST_TO_DTYPE.get(st_dtype) if isinstance(st_dtype, str) else None
    if dtype is None:
        if isinstance(st_dtype, str) and st_dtype in _UNSUPPORTED_ST_DTYPES:
            raise FormatError(
                f"safetensors file {os.fspath(path)} declares tensor {name!r} with dtype "
                f"{st_dtype}, which ckpt-ir does not support", path=path, tensor=name)
        raise bad(f"with unknown dtype {_short(st_dtype)}")

    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise bad(f"with shape {_short(shape)}, not a list of non-negative integers")

    offsets = info["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_index(o) for o in offsets) or offsets[0] > offsets[1]):
        raise bad(f"with data_offsets {_short(offsets)}, not two integers 0 <= start <= end")
    start, end = offsets
    if end > data_len:
        raise bad(f"at bytes [{start}, {end}) beyond the {data_len}-byte data section")

    nbytes = end - start
    needed = _bounded_product(shape, dtype.itemsize, _MAX_TENSOR_BYTES)
    if needed != nbytes:
        need = str(needed) if needed <= _MAX_TENSOR_BYTES else "more than 2**64"
        raise bad(f"with {nbytes} bytes but shape {_short(shape)} of {st_dtype} needs {need}")
    # A zero-size tensor passes the byte count whatever its other dimensions, but torch
    # computes strides from them and refuses any past int64 (found by the fuzzer).
    if nbytes == 0 and _bounded_product([d for d in shape if d], 1, _MAX_DIM) > _MAX_DIM:
        raise bad(f"with shape {_short(shape)}, whose non-zero dimensions multiply past "
                  "torch's limit of 2**63 - 1")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), start=start, end=end)


def _bounded_product(shape: list[int], itemsize: int, bound: int) -> int:
    """``prod(shape) * itemsize``, or some value above ``bound`` once the product exceeds it."""
    if 0 in shape:
        return 0
    product = itemsize
    for dim in shape:
        product *= dim
        if product > bound:
            return product
    return product


def _is_index(value: Any) -> bool:
    # bool is an int subclass, but `true` is not a JSON integer.
    return type(value) is int and value >= 0


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _short(value: Any, limit: int = 60) -> str:
    # Hostile headers can hold megabyte strings or million-element shapes; error messages stay
    # one readable line, and rendering them stays cheap.
    if isinstance(value, list) and len(value) > limit:
        value = value[:limit]
    text = repr(value) if isinstance(value, str) else _json_repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _json_repr(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=True, separators=(", ", ": "))
    except (ValueError, RecursionError):
        return "<unprintable>"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --------------------------------------------------------------------------------------------
# Writing


def plan_layout(
    entries: Sequence[tuple[str, DType, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, dict[str, tuple[int, int]], int]:
    """Lay out a safetensors file from metadata alone.

    Data is laid out in the given order with no padding (the format forbids gaps). Pass entries
    sorted by descending item size, as the reference writer does, to keep every tensor aligned
    for zero-copy reads.

    Returns:
        The header bytes (8-byte length prefix included, JSON padded with spaces to a multiple
        of 8 bytes like the reference implementation), each name's ``(start, end)`` relative to
        the data section, and the total file size.

    Raises:
        InternalError: a name repeats or is ``__metadata__``, a dtype is unsupported, a shape
            is not a tuple of non-negative ints, metadata is not str -> str, or the header
            would exceed the reader's size limit.
    """
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InternalError(f"safetensors metadata must map str to str, got {metadata!r}")
        header[_METADATA_KEY] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    cursor = 0
    for name, dtype, shape in entries:
        if not isinstance(name, str) or name == _METADATA_KEY:
            raise InternalError(f"invalid safetensors tensor name {name!r}")
        if name in offsets:
            raise InternalError(f"tensor {name!r} declared twice in one safetensors file")
        st_dtype = DTYPE_TO_ST.get(dtype)
        if st_dtype is None:
            raise InternalError(f"tensor {name!r} has dtype {dtype}, not storable in safetensors")
        dims = _plan_shape(name, shape)
        nbytes = math.prod(dims) * dtype.itemsize
        offsets[name] = (cursor, cursor + nbytes)
        header[name] = {"dtype": st_dtype, "shape": dims, "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    try:
        body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise InternalError(f"safetensors names and metadata must be valid UTF-8: {e}") from e
    body += b" " * (-len(body) % 8)
    if len(body) > _MAX_HEADER_SIZE:
        raise InternalError(f"safetensors header of {len(body)} bytes exceeds the "
                            f"{_MAX_HEADER_SIZE}-byte limit: split the tensors over more files")
    header_bytes = len(body).to_bytes(_PREFIX, "little") + body
    return header_bytes, offsets, len(header_bytes) + cursor


def _plan_shape(name: str, shape: Sequence[int]) -> list[int]:
    try:
        dims = [operator.index(d) for d in shape]
    except TypeError as e:
        raise InternalError(f"tensor {name!r} has shape {shape!r}, not a tuple of ints") from e
    if any(d < 0 or isinstance(d, bool) for d in dims):
        raise InternalError(f"tensor {name!r} has shape {shape!r} with a negative dimension")
    return dims


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in any order, memory bounded by one tensor.

    Call order: construct (creates the file, sizes it, writes the header), :meth:`write` each
    declared tensor exactly once, then :meth:`close` (checks completeness, fsyncs), or
    :meth:`abort` on failure. As a context manager it closes on success and aborts on error.
    :meth:`write` may be called from several threads: the writes go to disjoint byte ranges.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[tuple[str, DType, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Raises DestinationExistsError if ``path`` exists: the executor writes into a fresh
        temporary directory, and truncating a file that someone has mapped would crash them."""
        self.path = str(path)
        entries = list(entries)
        header, offsets, self.file_size = plan_layout(entries, metadata)
        self._data_offset = len(header)
        # plan_layout has checked the shapes, so operator.index cannot fail here.
        self._specs = {name: (dtype, tuple(operator.index(d) for d in shape))
                       for name, dtype, shape in entries}
        self._offsets = offsets
        self._written: set[str] = set()
        self._lock = threading.Lock()
        try:
            self._fd: int | None = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileExistsError as e:
            raise DestinationExistsError(f"{self.path} already exists", path=path) from e
        try:
            # A sparse, full-size file up front: tensors can then land at their offsets in any
            # order, and running out of disk shows up at write time, not as a short file.
            os.ftruncate(self._fd, self.file_size)
            _pwrite_all(self._fd, memoryview(header), 0)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` at the offset of ``name``; no copy if it is already contiguous CPU.

        Raises:
            InternalError: ``name`` is undeclared or already written, dtype or shape differ
                from the declaration, or the writer is closed.
        """
        spec = self._specs.get(name)
        if spec is not None and tuple(tensor.shape) != spec[1]:
            raise InternalError(f"tensor {name!r} has shape {list(tensor.shape)} but "
                                f"{self.path} declares {list(spec[1])}")
        self.write_slabs(name, (tensor,))

    def write_slabs(self, name: str, slabs: Iterable[torch.Tensor | FileSlab]) -> None:
        """Write ``name`` from row-major pieces, each at the next offset (none is joined);
        a :class:`~ckpt_ir.slabs.FileSlab` is copied from its file in the kernel.

        Raises:
            InternalError: ``name`` is undeclared or already written, a slab's dtype differs
                from the declaration, the slabs' bytes do not fill the tensor exactly, or the
                writer is closed.
        """
        import torch

        spec = self._specs.get(name)
        if spec is None:
            raise InternalError(f"tensor {name!r} was not declared for {self.path}")
        dtype = spec[0].torch  # the tensors' side of the boundary
        with self._lock:
            if self._fd is None:
                raise InternalError(f"write of {name!r} to {self.path} after close or abort")
            if name in self._written:
                raise InternalError(f"tensor {name!r} written twice to {self.path}")
            # Claimed before the (lock-free) write so a concurrent duplicate is caught.
            self._written.add(name)
            fd = self._fd
        start, end = self._offsets[name]
        at = start
        try:
            for tensor in slabs:
                if isinstance(tensor, FileSlab):
                    if tensor.dtype != dtype or at + tensor.nbytes > end:
                        raise InternalError(f"tensor {name!r}: a {tensor.dtype} file range of "
                                            f"{tensor.nbytes} bytes does not fit")
                    copy_range(tensor.fd, tensor.offset, fd, self._data_offset + at,
                               tensor.nbytes)
                    at += tensor.nbytes
                    continue
                if tensor.dtype != dtype:
                    raise InternalError(f"tensor {name!r} has dtype {tensor.dtype} but "
                                        f"{self.path} declares {dtype}")
                if tensor.layout != torch.strided or tensor.is_meta:
                    raise InternalError(f"tensor {name!r} is {tensor.layout} on "
                                        f"{tensor.device}, which has no bytes to write")
                if tensor.numel() == 0:
                    continue
                # reshape(-1) first: view(uint8) refuses 0-d tensors; both are free if
                # contiguous.
                flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                if at + flat.numel() > end:
                    raise InternalError(f"tensor {name!r}: more bytes than the {end - start} "
                                        f"declared in {self.path}")
                _pwrite_all(fd, memoryview(flat.numpy()), self._data_offset + at)
                at += flat.numel()
            if at != end:
                raise InternalError(f"tensor {name!r}: {at - start} bytes written of the "
                                    f"{end - start} declared in {self.path}")
            start_writeback(fd, self._data_offset + start, end - start)
        except BaseException:
            # Unclaim it, so that close() reports the tensor missing if the caller goes on.
            with self._lock:
                self._written.discard(name)
            raise

    def close(self, *, fsync: bool = True) -> None:
        """Finish the file: fsync it (unless ``fsync=False``) and close it.

        Raises:
            InternalError: a declared tensor was never written (the file is closed anyway).
        """
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            missing = [name for name in self._specs if name not in self._written]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise InternalError(f"{self.path} closed without writing tensor "
                                    f"{missing[0]!r}{more}")
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Close without checks or fsync; the caller removes the partial file."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return (f"SafetensorsWriter({self.path!r}, {len(self._written)}/{len(self._specs)} "
                f"tensors written, {self.file_size} bytes)")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # pwrite may write less than asked (signals, per-call caps); loop until all bytes are down.
    data = data.cast("B")
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:done + _IO_CHUNK], offset + done)
        if n == 0:
            raise OSError(f"pwrite wrote 0 bytes at offset {offset + done}")
        done += n
