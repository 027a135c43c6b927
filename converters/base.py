"""The one Reader/Writer protocol every format implements, and the options writers take.

Required: :class:`Reader` and :class:`Writer` (:class:`DistributedWriter` for writers several
processes share). Optional capabilities, tested with ``isinstance`` by the core, are declared in
:mod:`ckpt_ir.capabilities` and re-exported here: :class:`SlabWriter`, :class:`FileSlabWriter`,
:class:`LocatingReader`, :class:`LayoutReader`, :class:`MaybeEmptyReader`,
:class:`PartitionedWriter`, :class:`AlphaSourceReader`, :class:`RowsReader`,
:class:`DequantizingReader`, :class:`RangeReader`. Writers take one typed
:class:`~ckpt_ir.options.WriteOptions`.

A reader exposes *native* tensors (the format's own names, with the unsharded layout of its
naming family, see :mod:`ckpt_ir.tables`) and reads them lazily; a writer accepts native tensors
one at a time after being told, from the plan, every tensor it will receive. Readers and writers
know files, not models: the planner decides what goes where.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from ckpt_ir.capabilities import (
    AlphaSourceReader,
    DequantizingReader,
    FileSlabWriter,
    LayoutReader,
    LocatingReader,
    MaybeEmptyReader,
    PartitionedWriter,
    RangeReader,
    RowsReader,
    SlabWriter,
)
from ckpt_ir.converters.storage.hf_files import SourceFiles
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.options import AdapterTarget, VerlTree, WriteOptions
from ckpt_ir.tables import NativeParams

if TYPE_CHECKING:
    import torch

__all__ = ["AdapterTarget", "AlphaSourceReader", "DequantizingReader", "DistributedWriter",
           "FileSlabWriter", "LayoutReader", "LocatingReader", "MaybeEmptyReader",
           "PartitionedWriter", "RangeReader", "Reader", "RowsReader", "SlabWriter",
           "SourceFiles", "VerlTree", "WriteOptions", "Writer"]


@runtime_checkable
class Reader(Protocol):
    """Lazy read access to one checkpoint in one format."""

    format: ClassVar[str]
    naming: ClassVar[str]
    path: Path
    config: ModelConfig
    params: NativeParams

    def tensors(self) -> Mapping[str, TensorSpec]:
        """Every native model tensor with its global (unsharded) shape and dtype."""

    def dropped(self) -> Mapping[str, str]:
        """Entries that are not model weights (optimizer, rng, extra state) -> why skipped."""

    def read(self, name: str) -> torch.Tensor:
        """One native tensor, reading only the regions it needs. May be a read-only view."""

    def source_files(self) -> SourceFiles:
        """Tokenizer and other files a destination should carry."""

    def describe(self) -> dict[str, Any]:
        """Format-specific facts for ``ckpt-ir inspect`` (layout, resolved paths, notes)."""

    def release(self) -> None:
        """Drop mapped pages of data already consumed, so RSS stays at one unit of work."""

    def close(self) -> None: ...


@runtime_checkable
class Writer(Protocol):
    """Writes one checkpoint in one format into a (temporary) directory.

    Constructed as ``cls(directory, config, options, params)``: ``params`` are what
    :meth:`params_for` returned when the plan was made (None: the writer calls it itself, as
    the checkpoint manager's direct uses do)."""

    format: ClassVar[str]
    naming: ClassVar[str]
    params: NativeParams

    @classmethod
    def params_for(cls, config: ModelConfig, options: WriteOptions) -> NativeParams:
        """The physical choices this writer will make, known before it is constructed."""

    def begin(self, specs: Sequence[TensorSpec]) -> None:
        """Every native tensor this writer will receive, in the order it will receive them."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def finish(self, source: Reader) -> None:
        """Write metadata, config and carried files; called once after the last tensor."""

    def abort(self) -> None:
        """Release resources after a failure; the caller removes the directory."""


@runtime_checkable
class DistributedWriter(Writer, PartitionedWriter, Protocol):
    """A writer several processes can share (``torchrun ... ckpt_ir convert``).

    Every rank calls ``begin`` with *all* destination specs (so every rank agrees on file
    layout), then ``write`` for the tensors of the units it owns. ``file_of`` names the file a
    tensor lands in, or ``None`` when each rank writes such tensors into a file of its own; the
    partitioner gives all tensors of one file to one rank. ``finish_rank`` closes this rank's
    files and returns a picklable summary; rank 0 then calls ``finish_all`` with every rank's
    summary to write the index / metadata last.
    """

    def file_of(self, name: str) -> str | None: ...

    def finish_rank(self) -> Any: ...

    def finish_all(self, source: Reader, parts: Sequence[Any]) -> None: ...
