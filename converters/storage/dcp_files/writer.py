"""Writing a DCP directory: chunks streamed into ``.distcp`` files, then ``.metadata``
committed atomically over every rank's records.

Part of :mod:`ckpt_ir.converters.storage.dcp_files`; its docstring describes the layout on disk."""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_ir.converters.storage.dcp_files.records import METADATA_FILE, Box, DcpRecord
from ckpt_ir.converters.storage.dcp_files.regions import _coverage_problem
from ckpt_ir.converters.storage.torch_zip import ALIGNMENT, TorchZipWriter
from ckpt_ir.dcp_types import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
    dumps_metadata,
)
from ckpt_ir.dcp_types import StorageInfo as _StorageInfo
from ckpt_ir.durable import atomic_write, close_file
from ckpt_ir.errors import DestinationExistsError, InternalError
from ckpt_ir.slabs import FileSlab

if TYPE_CHECKING:
    import torch

# The DCP format version torch 2.x writes (and megatron-core 0.16.1 wrote).
_DCP_VERSION = "1.0.0"


def _check_name(name: str) -> None:
    if (not name or "/" in name or "\\" in name or "\x00" in name or name in (".", "..")
            or name.startswith(METADATA_FILE)):
        raise InternalError(f"invalid DCP data file name {name!r}")


@contextlib.contextmanager
def _without_record_crc32() -> Iterator[None]:
    """Skip the CRC-32 torch.save computes per zip record (10x slower than the write itself).

    Neither torch's DCP reader (``torch.load``), megatron-core nor our reader verify record
    CRCs (torch stores 0 when the option is off); the byte ranges in ``.metadata`` and the
    per-record lengths are what readers check. The option is process-global, so it is
    restored right after each save.
    """
    import torch

    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


class DcpDataFile:
    """One ``.distcp`` file: ``torch.save``-format archives one after another, each 64-byte aligned.

    Tensor chunks are written by ckpt-ir's streaming archive writer
    (:class:`~ckpt_ir.converters.storage.torch_zip.TorchZipWriter`), which takes the chunk as
    row-major slabs: a fused QKV or ``[gate; up]`` goes from its parts straight to the file.
    torch.save would need it built in memory first (a copy of 60% of a Llama's bytes), would
    store the whole storage of a view, and computes a CRC-32 per record that nothing reads.
    Objects (the few non-tensor entries) are plain ``torch.save`` archives.

    Records describe what was written; pass them all to :func:`write_metadata`, which commits
    the checkpoint. Usable as a context manager (closes with fsync on success).
    """

    def __init__(self, directory: str | os.PathLike[str], name: str = "__0_0.distcp") -> None:
        _check_name(name)
        self.name = name
        self.path = Path(directory) / name
        try:
            self._file: io.BufferedWriter | None = open(self.path, "xb")
        except FileExistsError:
            raise DestinationExistsError(f"{self.path} already exists",
                                         path=str(self.path)) from None
        self._records: list[DcpRecord] = []

    def __enter__(self) -> DcpDataFile:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(fsync=exc_type is None)

    def _start(self) -> io.BufferedWriter:
        """The file, positioned at a 64-byte boundary for the next archive."""
        if self._file is None:
            raise InternalError(f"{self.path} is closed")
        pad = -self._file.tell() % ALIGNMENT
        if pad:
            self._file.write(bytes(pad))
        return self._file

    def _append(self, obj: Any) -> tuple[int, int]:
        file = self._start()
        start = file.tell()
        import torch

        with _without_record_crc32():
            torch.save(obj, file)
        return start, file.tell() - start

    def add_tensor(self, fqn: str, offsets: Sequence[int], tensor: torch.Tensor) -> DcpRecord:
        """Append one chunk of tensor ``fqn`` whose first element sits at ``offsets``."""
        return self.add_tensor_slabs(fqn, offsets, tuple(tensor.shape), tensor.dtype, (tensor,))

    def add_tensor_slabs(self, fqn: str, offsets: Sequence[int], shape: Sequence[int],
                         dtype: torch.dtype, slabs: Iterable[torch.Tensor | FileSlab]
                         ) -> DcpRecord:
        """Append one ``shape`` chunk of ``fqn`` at ``offsets``, given as row-major slabs.

        The archive is what ``torch.save(chunk)`` writes (one storage of exactly the chunk's
        elements, no CRC), so torch's DCP reader and megatron-core load it.
        """
        offsets, shape = tuple(offsets), tuple(int(n) for n in shape)
        if len(offsets) != len(shape) or any(type(o) is not int or o < 0 for o in offsets):
            raise InternalError(f"chunk of {fqn!r}: offsets {offsets} do not fit a "
                                f"{len(shape)}-D tensor")
        file = self._start()
        start = file.tell()
        archive = TorchZipWriter.appending(file, self.path, crc32=False)
        ref = archive.add_tensor_slabs(dtype, shape, slabs)
        length = archive.finish(ref)
        record = DcpRecord(fqn, offsets, shape, dtype, self.name, start, length)
        self._records.append(record)
        return record

    def add_object(self, fqn: str, obj: Any) -> DcpRecord:
        """Append ``torch.save(obj)`` (what DCP stores for non-tensor state-dict entries)."""
        start, length = self._append(obj)
        record = DcpRecord(fqn, None, None, None, self.name, start, length)
        self._records.append(record)
        return record

    def close(self, *, fsync: bool = True) -> list[DcpRecord]:
        """Flush (and fsync) the file; returns every record written. Idempotent."""
        if self._file is not None:
            file, self._file = self._file, None
            close_file(file, fsync=fsync)
        return list(self._records)


def write_metadata(directory: str | os.PathLike[str], records: Iterable[DcpRecord],
                   tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]], *,
                   flat_planner_data: bool = False) -> None:
    """Commit a DCP checkpoint: build torch's ``Metadata`` and write ``.metadata`` atomically.

    ``tensors`` gives each tensor's global shape and dtype; its chunks come from ``records``.
    ``flat_planner_data``: record every key as a one-element path, as torch's
    ``DefaultSavePlanner`` does for a flat state dict (``dcp_to_torch_save`` unflattens with
    it); megatron-core writes None there.
    Written last (temp file, fsync, ``os.replace``), so a directory with ``.metadata`` is
    complete.

    Raises:
        InternalError: the records do not tile each tensor exactly, disagree on dtype, name a
            tensor missing from ``tensors``, repeat an object, or point outside their file.
    """
    root = Path(directory)
    chunks: dict[str, list[DcpRecord]] = {fqn: [] for fqn in tensors}
    objects: dict[str, DcpRecord] = {}
    sizes: dict[str, int] = {}
    for record in records:
        if record.file not in sizes:
            _check_name(record.file)
            try:
                sizes[record.file] = (root / record.file).stat().st_size
            except OSError as exc:
                raise InternalError(f"record of {record.fqn!r} names missing file "
                                    f"{record.file!r}") from exc
        if record.offset < 0 or record.offset + record.length > sizes[record.file]:
            raise InternalError(f"record of {record.fqn!r} lies outside {record.file!r}")
        if record.offsets is None:
            if record.fqn in objects or record.fqn in tensors:
                raise InternalError(f"object {record.fqn!r} is written twice or is also "
                                    f"a tensor")
            objects[record.fqn] = record
        elif record.fqn not in chunks:
            raise InternalError(f"chunk of {record.fqn!r}, which is not in `tensors`")
        else:
            chunks[record.fqn].append(record)

    import torch  # the pickle names torch.Size and torch's dtypes, as torch's DCP writes them

    entries: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for fqn, (shape, dtype) in tensors.items():
        shape = tuple(shape)
        pieces = chunks[fqn]
        for piece in pieces:
            if piece.dtype != dtype:
                raise InternalError(f"tensor {fqn!r}: chunk at {piece.offsets} is "
                                    f"{piece.dtype}, expected {dtype}")
        boxes: list[Box] = [(p.offsets or (), p.sizes or ()) for p in pieces]
        problem = _coverage_problem(shape, boxes)
        if problem is not None:
            raise InternalError(f"tensor {fqn!r} {problem}")
        entries[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(shape),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s))
                    for o, s in boxes],
        )
        for i, piece in enumerate(pieces):
            storage[MetadataIndex(fqn, piece.offsets, i)] = _StorageInfo(
                piece.file, piece.offset, piece.length)
    for fqn, record in objects.items():
        entries[fqn] = BytesStorageMetadata()
        storage[MetadataIndex(fqn)] = _StorageInfo(record.file, record.offset, record.length)

    metadata = Metadata(
        state_dict_metadata=entries,
        planner_data={fqn: (fqn,) for fqn in entries} if flat_planner_data else None,
        storage_data=storage,
        storage_meta=StorageMeta(save_id=str(uuid.uuid4())),
        version=_DCP_VERSION,
    )
    atomic_write(root / METADATA_FILE, dumps_metadata(metadata),
                 tmp=root / f"{METADATA_FILE}.{uuid.uuid4().hex}.tmp")
