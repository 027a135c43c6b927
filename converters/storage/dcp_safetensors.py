"""HF safetensors shards written by torch's ``HuggingFaceStorageWriter(save_distributed=True)``.

Each rank writes ``shard-{rank+1:05d}-model-{i:05d}-of-{n:05d}.safetensors`` holding its local
boxes of the HF tensors, with ``__metadata__["DCP_SHARDING_INFO"]`` giving each box's offset in
the global tensor (JSON ``{fqn: {"saved_offsets": [...]}}``). No global shape is stored: like
torch's consolidator (``_consolidate_hf_safetensors``) it is inferred per dimension as
``max(offset + size)`` over every file. Empty shards are stored as shape ``[0]``. Reference:
fsdp-dcp-formats.md §5.

Reading is the consolidator's byte copy, tensor by tensor: a tensor stored whole in one file is
a zero-copy view of it; otherwise each box is copied from its file into the tensor. Unlike
torch's consolidator, boxes must tile the tensor exactly (no overlap, no gap: a stale shard
from an earlier save is refused, not silently mixed in) and integer tensors are fine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ckpt_ir.converters.storage.dcp_files.regions import _coverage_problem
from ckpt_ir.converters.storage.safetensors_file import SafetensorsFile, read_header
from ckpt_ir.dtypes import DType
from ckpt_ir.errors import CorruptCheckpointError, InternalError
from ckpt_ir.ir import TensorSpec

if TYPE_CHECKING:
    import torch

__all__ = ["SHARDING_INFO", "ShardedSafetensors"]

SHARDING_INFO = "DCP_SHARDING_INFO"


@dataclass(frozen=True, slots=True)
class _Box:
    file: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def _offsets(value: object) -> tuple[int, ...] | None:
    if isinstance(value, list) and all(type(v) is int and v >= 0 for v in value):
        return tuple(value)
    return None


class ShardedSafetensors:
    """The tensors of a directory of DCP-sharded safetensors files, consolidated on read."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.files = sorted(p.name for p in self.directory.glob("*.safetensors") if p.is_file())
        self._boxes: dict[str, list[_Box]] = {}
        self._dtypes: dict[str, DType] = {}
        self._open: dict[str, SafetensorsFile] = {}
        for name in self.files:
            self._scan(name)
        self.specs: dict[str, TensorSpec] = {}
        for fqn, boxes in self._boxes.items():
            ndim = len(boxes[0].offsets)
            shape = tuple(max(b.offsets[d] + b.sizes[d] for b in boxes) for d in range(ndim))
            problem = _coverage_problem(shape, [(b.offsets, b.sizes) for b in boxes])
            if problem is not None:
                raise CorruptCheckpointError(
                    f"tensor {fqn!r} {problem} (its boxes across {len(boxes)} shard files; a "
                    "stale shard from another save, or one missing)",
                    path=self.directory, tensor=fqn)
            self.specs[fqn] = TensorSpec(fqn, shape, self._dtypes[fqn])

    def _scan(self, name: str) -> None:
        path = self.directory / name
        header = read_header(path)
        raw = header.metadata.get(SHARDING_INFO)
        if raw is None:
            raise CorruptCheckpointError(
                f"{name} has no {SHARDING_INFO} in its metadata, unlike the other shards "
                "written by HuggingFaceStorageWriter beside it", path=path)
        try:
            info = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpointError(f"{name}: {SHARDING_INFO} is not JSON: {e}",
                                         path=path) from e
        if not isinstance(info, dict):
            raise CorruptCheckpointError(f"{name}: {SHARDING_INFO} is not a JSON object",
                                         path=path)
        for fqn, entry in header.entries.items():
            if entry.nbytes == 0 and entry.shape == (0,):
                continue  # an empty shard (a rank past the last torch.chunk box)
            box = info.get(fqn)
            offsets = _offsets(box.get("saved_offsets") if isinstance(box, dict) else None)
            if offsets is None or len(offsets) != len(entry.shape):
                raise CorruptCheckpointError(
                    f"{name}: tensor {fqn!r} has no valid saved_offsets for its "
                    f"{len(entry.shape)}-D shape in {SHARDING_INFO}", path=path, tensor=fqn)
            known = self._dtypes.setdefault(fqn, entry.dtype)
            boxes = self._boxes.setdefault(fqn, [])
            if known != entry.dtype or (boxes and len(boxes[0].offsets) != len(offsets)):
                raise CorruptCheckpointError(
                    f"{name}: tensor {fqn!r} is {entry.dtype} {list(entry.shape)}, unlike its "
                    f"other shards ({known}, {len(boxes[0].offsets) if boxes else '?'}-D)",
                    path=path, tensor=fqn)
            boxes.append(_Box(name, offsets, entry.shape))

    def _file(self, name: str) -> SafetensorsFile:
        handle = self._open.get(name)
        if handle is None:
            handle = self._open[name] = SafetensorsFile(self.directory / name)
        return handle

    def read(self, fqn: str) -> torch.Tensor:
        """Tensor ``fqn`` assembled from its boxes (a view when one file holds it whole)."""
        import torch

        spec = self.specs.get(fqn)
        if spec is None:
            raise InternalError(f"{fqn!r} is not a tensor of {self.directory}")
        boxes = self._boxes[fqn]
        if len(boxes) == 1:
            return self._file(boxes[0].file).get(fqn)
        out = torch.empty(spec.shape, dtype=spec.dtype.torch)
        for box in boxes:
            dst = out
            for d, (o, s) in enumerate(zip(box.offsets, box.sizes, strict=True)):
                dst = dst.narrow(d, o, s)
            dst.copy_(self._file(box.file).get(fqn))
        return out

    def locate(self, tensor: torch.Tensor) -> tuple[Path, int] | None:
        for handle in self._open.values():
            offset = handle.locate(tensor)
            if offset is not None:
                return Path(handle.path), offset
        return None

    def release(self) -> None:
        for handle in self._open.values():
            handle.release()

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()
