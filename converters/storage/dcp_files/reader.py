"""Reading a DCP directory: ``.metadata`` through the restricted unpickler into a validated
:class:`DcpIndex`, and regions loaded from only the chunks they need.

Part of :mod:`ckpt_ir.converters.storage.dcp_files`; its docstring describes the layout on disk."""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ckpt_ir import dtypes
from ckpt_ir.converters.storage.dcp_files.records import (
    METADATA_FILE,
    Box,
    DcpBlob,
    DcpChunk,
    DcpIndex,
    DcpTensor,
)
from ckpt_ir.converters.storage.dcp_files.regions import (
    _contains,
    _coverage_problem,
    _Grid,
    _intersection,
    _volume,
)
from ckpt_ir.dcp_types import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from ckpt_ir.dcp_types import StorageInfo as _StorageInfo
from ckpt_ir.errors import CorruptCheckpointError, FormatError, InternalError
from ckpt_ir.safety.files import read_bytes
from ckpt_ir.safety.unpickler import load_pickle, load_torch, load_torch_buffer, map_file
from ckpt_ir.slabs import mapping_address, offset_in_mapping

if TYPE_CHECKING:
    import torch


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        return None
    return tuple(value)


def _safe_relative(name: str) -> bool:
    if not name or "\\" in name or "\x00" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and path.parts != ()


class _IndexBuilder:
    """Validates one ``.metadata``; each failure names the fqn and the file involved."""

    def __init__(self, directory: Path, md: Metadata) -> None:
        self.directory = directory
        self.meta_path = str(directory / METADATA_FILE)
        self.md = md
        self.file_sizes: dict[str, int] = {}

    def corrupt(self, message: str, fqn: str | None, path: str | None = None
                ) -> CorruptCheckpointError:
        return CorruptCheckpointError(message, path=path or self.meta_path, tensor=fqn)

    def records(self) -> dict[tuple[str, tuple[int, ...] | None], _StorageInfo]:
        # getattr everywhere: a hostile pickle can build these classes without their fields.
        storage = getattr(self.md, "storage_data", None)
        if not isinstance(storage, dict):
            raise self.corrupt(".metadata has no storage_data mapping", None)
        result: dict[tuple[str, tuple[int, ...] | None], _StorageInfo] = {}
        for key, info in storage.items():
            fqn = getattr(key, "fqn", None)
            raw = getattr(key, "offset", None)
            if not isinstance(key, MetadataIndex) or not isinstance(fqn, str):
                raise self.corrupt("storage_data has a key that is not a MetadataIndex", None)
            offset = None if raw is None else _int_tuple(raw)
            if raw is not None and offset is None:
                raise self.corrupt(f"storage record for {fqn!r} has invalid offsets", fqn)
            if not isinstance(info, _StorageInfo):
                raise self.corrupt(f"storage record for {fqn!r} is not a _StorageInfo", fqn)
            result[(fqn, offset)] = info
        return result

    def locate(self, fqn: str, what: str, info: _StorageInfo) -> tuple[str, int, int]:
        """Check one storage record against the directory; returns (file, offset, length)."""
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not _safe_relative(name):
            raise self.corrupt(f"storage record for {what} uses path {name!r} that escapes "
                               f"the checkpoint directory", fqn)
        transforms = getattr(info, "transform_descriptors", None)
        if transforms:
            raise FormatError(
                f"storage record for {what} in {name!r} uses DCP storage transforms "
                f"{transforms!r}, which ckpt-ir cannot read", path=self.meta_path, tensor=fqn)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise self.corrupt(f"storage record for {what} in {name!r} has invalid offset "
                               f"{offset!r} or length {length!r}", fqn)
        size = self.file_sizes.get(name)
        if size is None:
            path = self.directory / name
            try:
                stat = path.stat()
            except OSError:
                raise self.corrupt(f"storage record for {what} points to missing file "
                                   f"{name!r}", fqn, str(path)) from None
            if not path.is_file():
                raise self.corrupt(f"storage record for {what} points to {name!r}, which is "
                                   f"not a regular file", fqn, str(path))
            size = self.file_sizes[name] = stat.st_size
        if offset + length > size:
            raise self.corrupt(
                f"storage record for {what} points to bytes [{offset}, {offset + length}) of "
                f"{name!r}, which has {size} bytes", fqn, str(self.directory / name))
        return name, offset, length

    def tensor(self, fqn: str, md: TensorStorageMetadata,
               records: Mapping[tuple[str, tuple[int, ...] | None], _StorageInfo]) -> DcpTensor:
        props = getattr(md, "properties", None)
        dtype = getattr(props, "dtype", None)
        size = getattr(md, "size", None)
        shape = _int_tuple(size)
        # A DType from the torch-free load (read_index); a torch.dtype from a trusted one, or
        # for a dtype ckpt-ir has no DType of (then from_torch refuses it, naming it). Only a
        # process that imported torch can hold a torch.dtype.
        torch = sys.modules.get("torch")
        if not isinstance(props, TensorProperties) or not (
                isinstance(dtype, dtypes.DType)
                or (torch is not None and isinstance(dtype, torch.dtype))):
            raise self.corrupt(f"tensor {fqn!r} has no valid dtype", fqn)
        if not isinstance(dtype, dtypes.DType):
            dtype = dtypes.from_torch(dtype)
        if shape is None or any(n < 0 for n in shape):
            raise self.corrupt(f"tensor {fqn!r} has invalid shape {size!r}", fqn)
        chunk_list = getattr(md, "chunks", None)
        if not isinstance(chunk_list, list):
            raise self.corrupt(f"tensor {fqn!r} has no chunk list", fqn)
        boxes: list[Box] = []
        for chunk in chunk_list:
            offsets = _int_tuple(getattr(chunk, "offsets", None))
            sizes = _int_tuple(getattr(chunk, "sizes", None))
            if not isinstance(chunk, ChunkStorageMetadata) or offsets is None or sizes is None:
                raise self.corrupt(f"tensor {fqn!r} has an invalid chunk", fqn)
            boxes.append((offsets, sizes))
        problem = _coverage_problem(shape, boxes)
        if problem is not None:
            raise self.corrupt(f"tensor {fqn!r} {problem}", fqn)
        chunks = []
        for offsets, sizes in boxes:
            info = records.get((fqn, offsets))
            if info is None:
                raise self.corrupt(f"tensor {fqn!r} chunk at offsets {offsets} has no storage "
                                   f"record", fqn)
            name, offset, length = self.locate(fqn, f"{fqn!r} chunk {offsets}", info)
            # A chunk's archive holds its data and more: a shape claiming more bytes than the
            # record has would size allocations (and per-layer loops) by the claim, not by
            # the file.
            needed = _volume(sizes) * dtype.itemsize
            if needed > length:
                raise self.corrupt(
                    f"tensor {fqn!r} chunk at offsets {offsets} with sizes {sizes} needs "
                    f"{needed} bytes but its record in {name!r} has {length}", fqn,
                    str(self.directory / name))
            chunks.append(DcpChunk(offsets, sizes, name, offset, length))
        return DcpTensor(fqn, shape, dtype, tuple(chunks))

    def build(self) -> DcpIndex:
        entries = getattr(self.md, "state_dict_metadata", None)
        if not isinstance(entries, dict):
            raise self.corrupt(".metadata has no state_dict_metadata mapping", None)
        records = self.records()
        tensors: dict[str, DcpTensor] = {}
        blobs: dict[str, DcpBlob] = {}
        for fqn, entry in entries.items():
            if not isinstance(fqn, str):
                raise self.corrupt(f"state_dict_metadata key {fqn!r} is not a string", None)
            if isinstance(entry, TensorStorageMetadata):
                tensors[fqn] = self.tensor(fqn, entry, records)
            elif isinstance(entry, BytesStorageMetadata):
                info = records.get((fqn, None))
                if info is None:
                    raise self.corrupt(f"object {fqn!r} has no storage record", fqn)
                name, offset, length = self.locate(fqn, f"object {fqn!r}", info)
                blobs[fqn] = DcpBlob(fqn, name, offset, length)
            else:
                raise self.corrupt(f"entry {fqn!r} has unknown metadata type "
                                   f"{type(entry).__qualname__}", fqn)
        return DcpIndex(MappingProxyType(tensors), MappingProxyType(blobs))


def read_index(directory: str | os.PathLike[str], *, trust: bool = False) -> DcpIndex:
    """Read and validate ``directory/.metadata``.

    Checks that every tensor's chunks lie inside its shape, are disjoint and cover it exactly,
    and that every chunk and object has a storage record pointing inside an existing file of
    the directory (no absolute paths, no ``..``).

    Raises:
        CorruptCheckpointError: naming the fqn and the file at fault.
        UnsafeCheckpointError: ``.metadata`` pickles a global outside the allow-list.
        FormatError: records use DCP storage transforms (e.g. compression).
    """
    root = Path(directory)
    meta_path = root / METADATA_FILE
    data = read_bytes(meta_path)
    # Read as data (torch-free): the index keeps shapes, DTypes and byte ranges, no torch object.
    md = load_pickle(data, path=str(meta_path), trust=trust, torch_free=True)
    if not isinstance(md, Metadata):
        raise CorruptCheckpointError(
            f"{meta_path} holds a {type(md).__qualname__}, not torch.distributed.checkpoint "
            f"Metadata", path=str(meta_path))
    return _IndexBuilder(root, md).build()


class DcpReader:
    """Random access to the tensors and objects of a DCP directory.

    Data files are mapped lazily, once each; chunks are loaded only when a region needs them and
    are zero-copy views of the mapping.

    Example::

        with DcpReader(path) as reader:
            qkv = reader.read_region("decoder.layers.self_attention.linear_qkv.weight",
                                     (3, 0, 0), (1, 96, 64))
    """

    def __init__(self, directory: str | os.PathLike[str], *, trust: bool = False) -> None:
        self.directory = Path(directory)
        self.index = read_index(self.directory, trust=trust)
        self._trust = trust
        self._maps: dict[str, mmap.mmap] = {}
        self._addresses: dict[str, int] = {}
        self._grids: dict[str, tuple[_Grid | None, list[DcpChunk]]] = {}

    def __enter__(self) -> DcpReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def release(self) -> None:
        """Drop the pages read so far from this process (they stay in the page cache).

        Mapped pages count towards RSS until dropped; a streaming caller calls this after each
        unit of work. Tensors already returned stay valid (their pages fault back in from the
        file), but in-place edits made to such views are discarded: copy before editing.
        """
        for buffer in self._maps.values():
            buffer.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Drop the file mappings; tensors already returned keep theirs alive."""
        maps, self._maps = self._maps, {}
        self._addresses.clear()
        for buffer in maps.values():
            try:
                buffer.close()
            except BufferError:
                pass  # a returned tensor still uses it; it is unmapped when that tensor dies

    def _load(self, file: str, offset: int, length: int) -> Any:
        path = self.directory / file
        if self._trust:
            return load_torch(path, offset=offset, length=length, trust=True)
        buffer = self._maps.get(file)
        if buffer is None:
            buffer = self._maps[file] = map_file(path)
            self._addresses[file] = mapping_address(buffer)
        return load_torch_buffer(buffer, offset=offset, length=length, path=str(path))

    def locate(self, tensor: torch.Tensor) -> tuple[Path, int] | None:
        """The file and offset holding ``tensor``'s bytes, if it is a contiguous view of one
        of this reader's mappings (a chunk read without a copy)."""
        for file, address in self._addresses.items():
            offset = offset_in_mapping(tensor, address, len(self._maps[file]))
            if offset is not None:
                return self.directory / file, offset
        return None

    def byte_ranges(self, fqn: str, offsets: Sequence[int] | None = None,
                    sizes: Sequence[int] | None = None) -> list[tuple[Path, int, int]]:
        """Where the chunks overlapping the box ``[offsets, offsets + sizes)`` of tensor
        ``fqn`` (the whole tensor by default) are stored: ``(path, offset, length)`` each,
        from the metadata alone."""
        tensor = self.index.tensors[fqn]
        if offsets is None or sizes is None:
            chunks: Sequence[DcpChunk] = tensor.chunks
        else:
            chunks = self._overlapping(tensor, (tuple(offsets), tuple(sizes)))
        return [(self.directory / c.file, c.offset, c.length) for c in chunks]

    def _chunk(self, tensor: DcpTensor, chunk: DcpChunk) -> torch.Tensor:
        import torch

        data = self._load(chunk.file, chunk.offset, chunk.length)
        if (not isinstance(data, torch.Tensor) or data.dtype != tensor.dtype.torch
                or tuple(data.shape) != chunk.sizes):
            found = (f"{data.dtype} {tuple(data.shape)}" if isinstance(data, torch.Tensor)
                     else type(data).__qualname__)
            raise CorruptCheckpointError(
                f"tensor {tensor.fqn!r} chunk at offsets {chunk.offsets} in {chunk.file!r} "
                f"holds {found}, expected {tensor.dtype} {chunk.sizes}",
                path=str(self.directory / chunk.file), tensor=tensor.fqn)
        return data

    def _overlapping(self, tensor: DcpTensor, region: Box) -> list[DcpChunk]:
        if len(tensor.chunks) <= 16:
            hits = [c for c in tensor.chunks if _intersection((c.offsets, c.sizes), region)]
            return hits
        if tensor.fqn not in self._grids:
            solid = [c for c in tensor.chunks if _volume(c.sizes)]
            grid = _Grid.build(tensor.shape, [(c.offsets, c.sizes) for c in solid])[0]
            self._grids[tensor.fqn] = (grid, solid)
        grid, solid = self._grids[tensor.fqn]
        if grid is None:
            return [c for c in solid if _intersection((c.offsets, c.sizes), region)]
        seen = dict.fromkeys(grid.owner[cell] for cell in grid.cells(region))
        return [solid[i] for i in seen if i >= 0]

    def read_region(self, fqn: str, offsets: Sequence[int], sizes: Sequence[int]
                    ) -> torch.Tensor:
        """The box ``[offsets, offsets + sizes)`` of tensor ``fqn``, in its stored dtype.

        When one chunk contains the box the result is a zero-copy view of it (possibly
        non-contiguous); otherwise the overlapping chunks are copied into a new tensor.

        Raises:
            CorruptCheckpointError: a chunk's file holds something other than the tensor the
                metadata announced.
            InternalError: ``fqn`` is not a tensor of the index or the box leaves its shape
                (callers plan from ``index``).
        """
        import torch

        tensor = self.index.tensors.get(fqn)
        if tensor is None:
            raise InternalError(f"read_region: {fqn!r} is not a tensor of {self.directory}")
        region: Box = (tuple(offsets), tuple(sizes))
        if (len(region[0]) != len(tensor.shape) or len(region[1]) != len(tensor.shape)
                or any(o < 0 or s < 0 or o + s > n
                       for o, s, n in zip(*region, tensor.shape, strict=True))):
            raise InternalError(f"read_region: box {region} is outside {fqn!r} "
                                f"of shape {tensor.shape}")
        if _volume(region[1]) == 0:
            return torch.empty(region[1], dtype=tensor.dtype.torch)
        hits = self._overlapping(tensor, region)
        for chunk in hits:
            if _contains((chunk.offsets, chunk.sizes), region):
                view = self._chunk(tensor, chunk)
                for d, (o, s) in enumerate(zip(*region, strict=True)):
                    view = view.narrow(d, o - chunk.offsets[d], s)
                return view
        out = torch.empty(region[1], dtype=tensor.dtype.torch)
        for chunk in hits:
            common = _intersection((chunk.offsets, chunk.sizes), region)
            if common is None:
                continue
            src = self._chunk(tensor, chunk)
            dst = out
            for d, (o, s) in enumerate(zip(*common, strict=True)):
                src = src.narrow(d, o - chunk.offsets[d], s)
                dst = dst.narrow(d, o - region[0][d], s)
            dst.copy_(src)
        return out

    def read_rows(self, fqn: str) -> tuple[torch.Tensor, ...] | None:
        """Tensor ``fqn`` as its row chunks in order, each a zero-copy view of its ``.distcp``
        range, when its non-empty chunks are full-width row boxes (``Shard(0)``: FSDP2's
        ``torch.chunk`` boxes, Megatron-FSDP's uneven ones) and more than one; None otherwise
        (read it whole)."""
        t = self.index.tensors.get(fqn)
        if t is None:
            return None
        boxes = sorted((c for c in t.chunks if _volume(c.sizes)), key=lambda c: c.offsets)
        if len(t.shape) == 0 or len(boxes) < 2 or any(
                c.sizes[1:] != t.shape[1:] or any(c.offsets[1:]) for c in boxes):
            return None
        # Boxes tile the tensor (checked when the index was read), so sorted by row they are
        # its rows in order.
        return tuple(self.read_region(fqn, c.offsets, c.sizes) for c in boxes)

    def read_object(self, fqn: str) -> Any:
        """The object stored under ``fqn`` (restricted unpickling unless ``trust``)."""
        blob = self.index.blobs.get(fqn)
        if blob is None:
            raise InternalError(f"read_object: {fqn!r} is not an object of {self.directory}")
        return self._load(blob.file, blob.offset, blob.length)
