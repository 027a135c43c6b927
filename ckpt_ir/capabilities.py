"""Optional reader and writer capabilities, declared as protocols.

The required protocols (:class:`~ckpt_ir.converters.base.Reader`, ``Writer``) live with the
converters; these optional ones live in the core because the executor, which must not import
converters, asks for them. ``ckpt_ir.converters.base`` re-exports them, so a format author finds
every protocol in one place. Each is ``runtime_checkable``: callers test ``isinstance(reader,
LocatingReader)`` rather than probing attribute names with ``getattr``. (``isinstance`` on such
a protocol checks that the members exist, not their signatures; the converter tests exercise
the signatures.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from ckpt_ir.slabs import FileSlab

if TYPE_CHECKING:
    import torch

    from ckpt_ir.dtypes import DType
    from ckpt_ir.layout import ParallelLayout

__all__ = ["AlphaSourceReader", "DequantizingReader", "FileSlabWriter", "LayoutReader",
           "LocatingReader", "MaybeEmptyReader", "PartitionedWriter", "RangeReader", "RowsReader",
           "SlabWriter"]


@runtime_checkable
class SlabWriter(Protocol):
    """A writer that takes a destination tensor as the row-major slabs of its transform (a
    fused QKV as its q/k/v row blocks), so the executor never builds it in memory."""

    def write_slabs(self, name: str, slabs: Iterable[torch.Tensor | FileSlab]) -> None: ...


@runtime_checkable
class FileSlabWriter(SlabWriter, Protocol):
    """A slab writer that also takes :class:`~ckpt_ir.slabs.FileSlab` s (byte ranges of a
    source file, copied by the kernel). The class attribute is the declaration."""

    accepts_file_slabs: ClassVar[bool]


@runtime_checkable
class LocatingReader(Protocol):
    """A reader whose tensors are views of memory-mapped files: ``locate`` says which file
    and offset a tensor's bytes start at (None when it is not such a view)."""

    def locate(self, tensor: torch.Tensor) -> tuple[Path, int] | None: ...


@runtime_checkable
class RangeReader(Protocol):
    """A reader that can say, from metadata, where a native tensor's bytes lie in its files:
    ``(path, offset, length)`` ranges (none when it cannot tell), for
    :mod:`ckpt_ir.readahead` to ask the kernel for them before they are read."""

    def byte_ranges(self, name: str) -> Sequence[tuple[Path, int, int]]: ...


@runtime_checkable
class RowsReader(Protocol):
    """A reader that can hand a tensor over as row blocks that, joined along dim 0, are the
    tensor (each a view of the file holding it): a DCP tensor stored as FSDP2's row chunks
    streams chunk by chunk instead of being assembled. None: read it whole."""

    def read_rows(self, name: str) -> tuple[torch.Tensor, ...] | None: ...


@runtime_checkable
class DequantizingReader(Protocol):
    """A reader of a quantized checkpoint that can round what it dequantizes straight to the
    destination's dtype (None: the dtype its tensors are presented in) instead of handing over
    float32 weights for the executor to cast: same bits, a third of the memory."""

    def dequantize_to(self, dtype: DType | None) -> None: ...


@runtime_checkable
class LayoutReader(Protocol):
    """A reader of a checkpoint stored in a Megatron parallel layout (per-rank files): a
    destination layout given as field overrides starts from this one."""

    layout: ParallelLayout


@runtime_checkable
class MaybeEmptyReader(Protocol):
    """A reader that may have found a config and no weights (only a dry run can plan it)."""

    has_data: bool


@runtime_checkable
class AlphaSourceReader(Protocol):
    """An adapter reader whose checkpoint may not record LoRA alpha: ``alpha_from`` says
    where the alpha it uses came from (a layout file, run_config.yaml, an HF PEFT export,
    ``--lora-alpha``)."""

    @property
    def alpha_from(self) -> str: ...


@runtime_checkable
class PartitionedWriter(Protocol):
    """The methods that let several processes share one writer (see
    :class:`~ckpt_ir.converters.base.DistributedWriter`). Methods only, so
    ``issubclass(writer_cls, PartitionedWriter)`` works on a class before it is built."""

    def file_of(self, name: str) -> str | None: ...

    def finish_rank(self) -> Any: ...

    def finish_all(self, source: Any, parts: Sequence[Any]) -> None: ...
