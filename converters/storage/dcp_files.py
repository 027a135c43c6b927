"""``torch.distributed.checkpoint`` (DCP) directories, read and written without torch's planner.

Why not ``dcp.load``/``dcp.save``: the saver needs the whole state dict in memory and the reader
unpickles ``.metadata`` with plain :mod:`pickle`. Here the writer streams (one chunk at a time,
appended to a ``.distcp`` file), the reader loads only the chunks a region needs, and every
pickle goes through :mod:`ckpt_ir.safety.unpickler`.

On disk (torch 2.x ``FileSystemWriter``, also what megatron-core's ``torch_dist`` writes)::

    .metadata        pickled Metadata(state_dict_metadata, storage_data, version, storage_meta)
                     state_dict_metadata: fqn -> TensorStorageMetadata(dtype, size, chunks)
                                                | BytesStorageMetadata()
                     storage_data: MetadataIndex(fqn, chunk offsets | None) -> _StorageInfo(
                                   relative_path, offset, length)
    __0_0.distcp     torch.save(chunk) | torch.save(obj) | ...   archives back to back

A tensor's chunks are hyper-rectangles (offsets, sizes) that tile its global shape exactly.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import io
import itertools
import math
import mmap
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

import torch

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
from ckpt_ir.durable import atomic_write
from ckpt_ir.errors import (
    CorruptCheckpointError,
    DestinationExistsError,
    FormatError,
    InternalError,
)
from ckpt_ir.safety.files import read_bytes
from ckpt_ir.safety.unpickler import load_pickle, load_torch, load_torch_buffer, map_file
from ckpt_ir.slabs import FileSlab, mapping_address, offset_in_mapping

__all__ = [
    "DcpBlob",
    "DcpChunk",
    "DcpDataFile",
    "DcpIndex",
    "DcpReader",
    "DcpRecord",
    "DcpTensor",
    "read_index",
    "write_metadata",
]

METADATA_FILE = ".metadata"
# The DCP format version torch 2.x writes (and megatron-core 0.16.1 wrote).
_DCP_VERSION = "1.0.0"
# Above this many grid cells per chunk a tiling is "irregular" and checked by a sweep instead.
_GRID_CELLS_PER_CHUNK = 4
_GRID_MIN_CELLS = 1 << 16

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


@dataclass(frozen=True, slots=True)
class DcpChunk:
    """One stored piece of a tensor: the box ``offsets + sizes`` at ``file[offset:+length]``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpTensor:
    """A tensor's global shape and dtype, and the chunks that tile it."""

    fqn: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[DcpChunk, ...]


@dataclass(frozen=True, slots=True)
class DcpBlob:
    """A non-tensor item: a ``torch.save(obj)`` archive at ``file[offset:+length]``."""

    fqn: str
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpIndex:
    """Everything ``.metadata`` says, validated: tensors and blobs by fqn."""

    tensors: Mapping[str, DcpTensor]
    blobs: Mapping[str, DcpBlob]


@dataclass(frozen=True, slots=True)
class DcpRecord:
    """What :class:`DcpDataFile` wrote: a tensor chunk (``offsets``) or an object (None)."""

    fqn: str
    offsets: tuple[int, ...] | None
    sizes: tuple[int, ...] | None
    dtype: torch.dtype | None
    file: str
    offset: int
    length: int


# --------------------------------------------------------------------------------------------
# Region arithmetic (pure)
# --------------------------------------------------------------------------------------------


_SWEEP_PAIRS = 200_000  # pairs tested to name an overlap in an irregular tiling that fails


def _volume(sizes: Sequence[int]) -> int:
    return math.prod(sizes)


def _intersection(a: Box, b: Box) -> Box | None:
    starts = tuple(max(x, y) for x, y in zip(a[0], b[0], strict=True))
    ends = tuple(min(x + s, y + t) for x, s, y, t in zip(a[0], a[1], b[0], b[1], strict=True))
    if any(e <= s for s, e in zip(starts, ends, strict=True)):
        return None
    return starts, tuple(e - s for s, e in zip(starts, ends, strict=True))


def _contains(outer: Box, inner: Box) -> bool:
    return all(o <= i and i + t <= o + s
               for o, s, i, t in zip(outer[0], outer[1], inner[0], inner[1], strict=True))


class _Grid:
    """The cells cut by every chunk boundary, and which chunk owns each cell.

    Real layouts (TP/PP/EP shards, stacked layers) are grids, so there are about as many cells
    as chunks and both the exact-cover check and region lookups cost O(n log n). ``build``
    returns None when the boxes cut the shape into too many cells (irregular tilings).
    """

    def __init__(self, bounds: list[list[int]], owner: list[int]) -> None:
        self.bounds = bounds
        self.owner = owner
        self.strides = [math.prod(len(b) - 1 for b in bounds[d + 1:]) for d in range(len(bounds))]

    @staticmethod
    def cuts(shape: Sequence[int], boxes: Sequence[Box]) -> list[list[int]]:
        bounds: list[set[int]] = [{0, n} for n in shape]
        for offsets, sizes in boxes:
            for d, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
                bounds[d].update((o, o + s))
        return [sorted(b) for b in bounds]

    @classmethod
    def build(cls, shape: Sequence[int], boxes: Sequence[Box]
              ) -> tuple[_Grid | None, tuple[int, int] | None]:
        """The grid, and the first pair of overlapping boxes (by index) if any."""
        bounds = cls.cuts(shape, boxes)
        cells = math.prod(len(b) - 1 for b in bounds)
        if cells > max(_GRID_CELLS_PER_CHUNK * len(boxes), _GRID_MIN_CELLS):
            return None, None
        grid = cls(bounds, [-1] * cells)
        for i, box in enumerate(boxes):
            for cell in grid.cells(box):
                if grid.owner[cell] >= 0:
                    return grid, (grid.owner[cell], i)
                grid.owner[cell] = i
        return grid, None

    def cells(self, box: Box) -> Iterator[int]:
        """Flat indices of the cells that intersect ``box``."""
        ranges = []
        for d, (o, s) in enumerate(zip(*box, strict=True)):
            cuts = self.bounds[d]
            first = bisect.bisect_right(cuts, o) - 1
            last = bisect.bisect_left(cuts, o + s)
            if first >= last:
                return
            ranges.append(range(first * self.strides[d], last * self.strides[d],
                                self.strides[d]))
        for combo in itertools.product(*ranges):
            yield sum(combo)


def _sweep_overlap(boxes: Sequence[Box], budget: int) -> tuple[int, int] | None:
    """First overlapping pair of an irregular tiling found by a sweep along its most-cut
    dimension, testing at most ``budget`` pairs (None: none found within it)."""
    if not boxes:
        return None
    ndim = len(boxes[0][0])
    if ndim == 0:
        return (0, 1) if len(boxes) > 1 else None
    dim = max(range(ndim), key=lambda d: len({b[0][d] for b in boxes}))
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][0][dim])
    active: list[tuple[int, int]] = []  # heap of (end along dim, box index)
    found: list[tuple[int, int]] = []
    for i in order:
        start = boxes[i][0][dim]
        while active and active[0][0] <= start:
            heapq.heappop(active)
        budget -= len(active)
        if budget < 0:
            break
        for _, j in active:
            if _intersection(boxes[i], boxes[j]) is not None:
                found.append((min(i, j), max(i, j)))
        heapq.heappush(active, (start + boxes[i][1][dim], i))
    return min(found) if found else None


def _tiles_exactly(shape: Sequence[int], boxes: Sequence[Box]) -> bool | None:
    """Whether boxes that lie inside ``shape`` and whose volumes sum to its volume tile it.

    O(n 2^d) for n boxes cutting d dimensions, whatever the arrangement: count every box
    corner modulo 2. The mixed finite difference of the coverage count f (how many boxes hold
    a point) is the signed sum of the box corners, so the corners that occur an odd number of
    times fix f modulo 2. If they are exactly the corners of ``shape``, f is odd, so at least 1,
    everywhere inside; with the volumes summing to the shape's volume, f is 1 everywhere: no
    overlap, no gap. None when 2^d is too many corners to count (d > 16 dimensions cut).
    """
    cut = [d for d, n in enumerate(shape)
           if any(offsets[d] != 0 or sizes[d] != n for offsets, sizes in boxes)]
    if len(cut) > 16:
        return None
    odd: set[tuple[int, ...]] = set()
    for offsets, sizes in [*boxes, ((0,) * len(shape), tuple(shape))]:
        # Toggling the shape's own corners too: an exact tiling leaves nothing.
        ends = [(offsets[d], offsets[d] + sizes[d]) for d in cut]
        odd.symmetric_difference_update(itertools.product(*ends))
    return not odd


def _coverage_problem(shape: tuple[int, ...], boxes: Sequence[Box]) -> str | None:
    """Why ``boxes`` do not tile ``shape`` exactly (inside, disjoint, complete), or None.

    Grid layouts (every real TP/PP/EP split) are checked cell by cell; irregular tilings by
    corner parity (:func:`_tiles_exactly`), and only a failing one is searched, within a
    budget, for an overlapping pair to name. Both are O(n log n) in the number of chunks.
    """
    for offsets, sizes in boxes:
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            return (f"chunk at offsets {offsets} with sizes {sizes} does not have "
                    f"{len(shape)} dimensions")
        if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
            return f"chunk at offsets {offsets} with sizes {sizes} lies outside its shape {shape}"
    solid = [i for i, (_, sizes) in enumerate(boxes) if _volume(sizes) > 0]
    solid_boxes = [boxes[i] for i in solid]
    covered = sum(_volume(sizes) for _, sizes in solid_boxes)
    numel = _volume(shape)
    grid, pair = _Grid.build(shape, solid_boxes)
    if grid is None:
        exact = covered == numel and _tiles_exactly(shape, solid_boxes)
        if exact is None:
            return (f"has chunks cutting more than 16 of its {len(shape)} dimensions "
                    f"irregularly (not a grid)")
        if exact:
            return None
        pair = _sweep_overlap(solid_boxes, budget=_SWEEP_PAIRS + 4 * len(solid_boxes))
        if pair is None and covered >= numel:
            # Not exact with the full volume covered: some chunks overlap (and leave a gap).
            return f"has overlapping chunks (they cover {covered} of {numel} elements)"
    if pair is not None:
        a, b = boxes[solid[pair[0]]][0], boxes[solid[pair[1]]][0]
        return f"has overlapping chunks at offsets {a} and {b}"
    if covered != numel:
        return f"has a gap: its chunks cover {covered} of {numel} elements"
    return None


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


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
        if not isinstance(props, TensorProperties) or not isinstance(dtype, torch.dtype):
            raise self.corrupt(f"tensor {fqn!r} has no valid dtype", fqn)
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
    md = load_pickle(data, path=str(meta_path), trust=trust)
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

    def _chunk(self, tensor: DcpTensor, chunk: DcpChunk) -> torch.Tensor:
        data = self._load(chunk.file, chunk.offset, chunk.length)
        if (not isinstance(data, torch.Tensor) or data.dtype != tensor.dtype
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
            return torch.empty(region[1], dtype=tensor.dtype)
        hits = self._overlapping(tensor, region)
        for chunk in hits:
            if _contains((chunk.offsets, chunk.sizes), region):
                view = self._chunk(tensor, chunk)
                for d, (o, s) in enumerate(zip(*region, strict=True)):
                    view = view.narrow(d, o - chunk.offsets[d], s)
                return view
        out = torch.empty(region[1], dtype=tensor.dtype)
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

    def read_object(self, fqn: str) -> Any:
        """The object stored under ``fqn`` (restricted unpickling unless ``trust``)."""
        blob = self.index.blobs.get(fqn)
        if blob is None:
            raise InternalError(f"read_object: {fqn!r} is not an object of {self.directory}")
        return self._load(blob.file, blob.offset, blob.length)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


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
            try:
                file.flush()
                if fsync:
                    os.fsync(file.fileno())
            finally:
                file.close()
        return list(self._records)


def write_metadata(directory: str | os.PathLike[str], records: Iterable[DcpRecord],
                   tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Commit a DCP checkpoint: build torch's ``Metadata`` and write ``.metadata`` atomically.

    ``tensors`` gives each tensor's global shape and dtype; its chunks come from ``records``.
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
        planner_data=None,
        storage_data=storage,
        storage_meta=StorageMeta(save_id=str(uuid.uuid4())),
        version=_DCP_VERSION,
    )
    atomic_write(root / METADATA_FILE, dumps_metadata(metadata),
                 tmp=root / f"{METADATA_FILE}.{uuid.uuid4().hex}.tmp")
