"""What a DCP directory holds, as ckpt-ir's own records: the validated index a reader
builds from ``.metadata`` and what a writer appended.

Part of :mod:`ckpt_ir.converters.storage.dcp_files`; its docstring describes the layout on disk."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckpt_ir.dtypes import DType

if TYPE_CHECKING:
    import torch


METADATA_FILE = ".metadata"

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
    dtype: DType
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
