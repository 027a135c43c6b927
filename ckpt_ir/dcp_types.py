"""The classes of a ``torch.distributed.checkpoint`` ``.metadata`` file, without importing DCP.

A ``.metadata`` file is a pickle of ``torch.distributed.checkpoint.metadata.Metadata`` and the
dataclasses under it. Importing that package costs 0.7 s here (it pulls in DTensor, sympy and
``torch.fx``): more than everything else ckpt-ir's CLI imports beyond torch, and the whole of the
start-up budget. These classes mirror torch's field for field (torch 2.4 - 2.13 define them the
same way), so:

* the restricted unpickler builds them when it reads a ``.metadata`` (or an object that holds
  them), under torch's module and class names;
* :func:`dumps_metadata` writes them under torch's names, so the file is byte for byte what
  ``pickle.dumps`` of torch's own objects gives (a test compares the two), and torch's DCP
  reader and megatron-core load it as their own.

Pure data, no behaviour beyond what pickling needs. Importing it imports no torch (the
defaults and the memory-format table are looked up when used): ``ckpt-ir inspect`` reads a
``.metadata`` into these classes with torch's sizes and dtypes as tuples and
:class:`~ckpt_ir.dtypes.DType` (:func:`set_properties_state_as_data`).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "DCP_CLASSES",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "LoadItemType",
    "MemFormatEncoding",
    "Metadata",
    "MetadataIndex",
    "SavePlan",
    "StorageInfo",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "TensorWriteData",
    "WriteItem",
    "WriteItemType",
    "dumps_metadata",
]

_METADATA = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"
_PLANNER = "torch.distributed.checkpoint.planner"


class MemFormatEncoding(Enum):
    """``metadata._MEM_FORMAT_ENCODING``: how TensorProperties pickles a memory format."""

    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


def _memory_formats() -> dict[MemFormatEncoding, torch.memory_format]:
    # torch's objects, looked up when a TensorProperties is built or pickled: importing this
    # module (to read a .metadata for `inspect`) must not import torch.
    import torch

    return {
        MemFormatEncoding.TORCH_CONTIGUOUS_FORMAT: torch.contiguous_format,
        MemFormatEncoding.TORCH_CHANNELS_LAST: torch.channels_last,
        MemFormatEncoding.TORCH_PRESERVE_FORMAT: torch.preserve_format,
    }


def _default_dtype() -> torch.dtype:
    import torch

    return torch.get_default_dtype()


def _strided() -> torch.layout:
    import torch

    return torch.strided


def _contiguous() -> torch.memory_format:
    import torch

    return torch.contiguous_format


@dataclass
class ChunkStorageMetadata:
    offsets: torch.Size
    sizes: torch.Size


@dataclass
class TensorProperties:
    dtype: torch.dtype = field(default_factory=_default_dtype)
    layout: torch.layout = field(default_factory=_strided)
    requires_grad: bool = False
    memory_format: torch.memory_format = field(default_factory=_contiguous)
    pin_memory: bool = False

    # torch.memory_format cannot be pickled; torch stores an enum in a 5-tuple instead.
    def __getstate__(self) -> tuple[Any, ...]:
        encoding = next((e for e, f in _memory_formats().items()
                         if f == self.memory_format), None)
        if encoding is None:
            raise ValueError(f"invalid memory format {self.memory_format}")
        return (self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory = state
        formats = _memory_formats()
        if encoding not in formats:
            raise ValueError(f"invalid memory format encoding {encoding!r}")
        self.memory_format = formats[encoding]


def set_properties_state_as_data(props: TensorProperties, state: tuple[Any, ...]) -> None:
    """:meth:`TensorProperties.__setstate__` for a ``.metadata`` read as data, without torch.

    The restricted unpickler's metadata mode (``ckpt-ir inspect``) resolves ``torch.bfloat16``
    to a :class:`~ckpt_ir.dtypes.DType` and the layout to a name; the memory format stays its
    :class:`MemFormatEncoding`, checked exactly as torch's ``__setstate__`` checks it.
    """
    props.dtype, props.layout, props.requires_grad, encoding, props.pin_memory = state
    if not isinstance(encoding, MemFormatEncoding):
        raise ValueError(f"invalid memory format encoding {encoding!r}")
    props.memory_format = encoding


@dataclass
class TensorStorageMetadata:
    properties: TensorProperties
    size: torch.Size
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    pass


@dataclass(frozen=True)
class MetadataIndex:
    fqn: str
    offset: torch.Size | None = None
    index: int | None = field(hash=False, compare=False, default=None)

    # torch's own __init__: the offset becomes a torch.Size, and only when given (so an
    # object's key pickles without an offset entry, exactly as torch writes it).
    def __init__(self, fqn: str, offset: Sequence[int] | None = None,
                 index: int | None = None) -> None:
        object.__setattr__(self, "fqn", fqn)
        object.__setattr__(self, "index", index)
        if offset is not None:
            import torch

            object.__setattr__(self, "offset", torch.Size(offset))


@dataclass
class StorageMeta:
    checkpoint_id: str | os.PathLike[str] | None = None
    save_id: str | None = None
    load_id: str | None = None
    modules: list[str] = field(default_factory=list)


@dataclass
class Metadata:
    state_dict_metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata]
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: StorageMeta | None = None
    version: str | None = None


@dataclass
class StorageInfo:
    """``filesystem._StorageInfo``: where one item's bytes are."""

    relative_path: str
    offset: int
    length: int
    transform_descriptors: Sequence[str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


# Planner classes: not part of .metadata, but megatron-core and torch have pickled save plans
# into checkpoints' common state; read only.
class WriteItemType(Enum):
    TENSOR = 1
    SHARD = 2
    BYTE_IO = 3


class LoadItemType(Enum):
    TENSOR = 1
    BYTE_IO = 2


@dataclass(frozen=True)
class TensorWriteData:
    chunk: ChunkStorageMetadata
    properties: TensorProperties
    size: torch.Size


@dataclass(frozen=True)
class WriteItem:
    index: MetadataIndex
    type: WriteItemType
    bytes_io_data: Any = None
    tensor_data: TensorWriteData | None = None


@dataclass(frozen=True)
class SavePlan:
    items: list[WriteItem]
    storage_data: Any = None
    planner_data: Any = None
    usable: bool = True


DCP_CLASSES: dict[type, tuple[str, str]] = {
    ChunkStorageMetadata: (_METADATA, "ChunkStorageMetadata"),
    TensorProperties: (_METADATA, "TensorProperties"),
    TensorStorageMetadata: (_METADATA, "TensorStorageMetadata"),
    BytesStorageMetadata: (_METADATA, "BytesStorageMetadata"),
    MetadataIndex: (_METADATA, "MetadataIndex"),
    StorageMeta: (_METADATA, "StorageMeta"),
    Metadata: (_METADATA, "Metadata"),
    MemFormatEncoding: (_METADATA, "_MEM_FORMAT_ENCODING"),
    StorageInfo: (_FILESYSTEM, "_StorageInfo"),
    WriteItemType: (_PLANNER, "WriteItemType"),
    LoadItemType: (_PLANNER, "LoadItemType"),
    TensorWriteData: (_PLANNER, "TensorWriteData"),
    WriteItem: (_PLANNER, "WriteItem"),
    SavePlan: (_PLANNER, "SavePlan"),
}
"""Each mirror class -> torch's ``(module, name)`` for it."""


class _TorchNamesPickler(pickle._Pickler):
    """The pure-Python pickler, writing the mirror classes under torch's names.

    The C pickler checks that a class is importable under the name it writes, which would
    import DCP; the Python one lets :meth:`save_global` be replaced. Its opcodes are the same.
    """

    def save_global(self, obj: Any, name: str | None = None) -> None:
        real = DCP_CLASSES.get(obj) if isinstance(obj, type) else None
        if real is None:
            super().save_global(obj, name)
            return
        # pickle._Pickler.save_global for protocol >= 4, with the name given.
        self.save(real[0])
        self.save(real[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def dumps_metadata(metadata: Metadata) -> bytes:
    """``pickle.dumps(metadata, protocol=4)`` as if ``metadata`` were torch's own objects."""
    buffer = io.BytesIO()
    _TorchNamesPickler(buffer, protocol=4).dump(metadata)
    return buffer.getvalue()
