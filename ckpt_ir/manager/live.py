"""This rank's share of a live Megatron-Core model, as geometry over the ``mcore`` naming.

A rank of a Megatron-Core job holds, per model chunk (virtual pipeline stage), its TP shard of
each parameter under chunk-local names (``decoder.layers.{local}.…``). This module maps those
onto the ``mcore`` naming of :mod:`ckpt_ir.tables` (global layer index, unsharded TP-invariant
layout) without moving a byte:

* :func:`shard_geometry` says which *rows* (in local order) and which *columns* of the global
  native tensor a TP rank holds, from the row's declared partition;
* :func:`row_segments` follows the row's transform backwards: which rows of which IR tensor
  (HF tensor) each local row is. It applies the transform to *labels* (integers naming
  ``(part, row)``) instead of data, so every transform that moves whole rows (fused QKV, fused
  gate/up, vocab padding) is handled by its own ``apply``, with no per-transform code here::

      InterleaveQKV.apply({q: [1..8], k: [101, 102], v: [201, 202]})   (2 groups, d = 1)
        -> [1 2 3 4 101 201 | 5 6 7 8 102 202]       native rows, group-interleaved
      TP rank 1 of 2 holds native rows 6..11 -> q rows 4..7, k row 1, v row 1

Pure arithmetic, no communication, no megatron-core import: parameters are found by name.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ckpt_ir.errors import FormatError, IncompatibleLayoutError, InternalError
from ckpt_ir.ir import ModelConfig, Shape
from ckpt_ir.layout import ParallelLayout, Partition
from ckpt_ir.tables import PIPELINE_TAIL, Binding, NativeParams, Table, build_table

__all__ = [
    "EMBEDDING",
    "OUTPUT_LAYER",
    "LocalParam",
    "RankCoords",
    "Segment",
    "ShardGeometry",
    "check_supported",
    "live_table",
    "local_params",
    "megatron_coords",
    "native_shapes",
    "row_segments",
    "shard_geometry",
]

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Parameter names that tell the layer spec apart (megatron-core 0.16 local vs TE spec).
_NORM_STYLE = {"input_layernorm.weight": "local",
               "self_attention.linear_qkv.layer_norm_weight": "te"}


@dataclass(frozen=True, slots=True)
class RankCoords:
    """This process's place in the model-parallel grid: tensor, pipeline and data-parallel rank."""

    tp: int = 0
    pp: int = 0
    dp: int = 0


def megatron_coords(rank: int, world_size: int, layout: ParallelLayout) -> RankCoords:
    """Coordinates under megatron-core's default rank order ``tp-cp-ep-dp-pp`` (CP = EP = 1).

    ``rank = tp_rank + TP * (dp_rank + DP * pp_rank)``; jobs that order ranks otherwise pass
    their :class:`RankCoords` (from ``parallel_state``) to the manager.
    """
    per_replica = layout.tp * layout.pp
    if world_size % per_replica:
        raise IncompatibleLayoutError(f"{world_size} processes do not divide into TP×PP = "
                                      f"{layout.tp}×{layout.pp} model replicas")
    dp = world_size // per_replica
    return RankCoords(tp=rank % layout.tp, dp=(rank // layout.tp) % dp,
                      pp=rank // (layout.tp * dp))


def check_supported(config: ModelConfig, layout: ParallelLayout) -> None:
    """Refuse what the manager cannot map yet (typed, before anything is written)."""
    if config.is_moe or config.has_mla or config.num_mtp_layers:
        raise FormatError(f"the checkpoint manager supports dense models; {config.architecture} "
                          "with experts, latent attention or MTP layers is not supported yet")
    if layout.ep != 1:
        raise IncompatibleLayoutError("the checkpoint manager supports EP = 1 only")
    # The vocabulary padding is the live model's (known once its embedding is seen): any
    # multiple of TP will do here.
    layout.check_model(config, padded_vocab_size=-(-config.vocab_size // layout.tp) * layout.tp)


def live_table(config: ModelConfig, *, padded_vocab_size: int | None,
               norm_style: str) -> Table:
    """The ``mcore`` table of a live model (its own norm names and vocab padding)."""
    return build_table("mcore", config, NativeParams(padded_vocab_size=padded_vocab_size,
                                                     norm_style=norm_style))


def native_shapes(table: Table, config: ModelConfig) -> dict[str, Shape]:
    """Global (unsharded) shape of every native tensor of ``table``."""
    schema = config.schema()
    return {b.native: tuple(b.transform.shapes({r: schema[n] for r, n in b.ir.items()}))
            for b in table.bindings}


# --------------------------------------------------------------------------------------------
# Geometry of one TP shard
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardGeometry:
    """Which part of a global native tensor a TP rank holds.

    ``rows`` are runs of global rows (dim 0) in the order the local tensor stacks them;
    ``cols`` is the run of global columns (last dim) it holds, or None for all of them.
    """

    rows: tuple[range, ...]
    cols: range | None = None

    @property
    def num_rows(self) -> int:
        return sum(len(r) for r in self.rows)

    def local_shape(self, shape: Shape) -> Shape:
        if not shape:
            return shape
        out = (self.num_rows, *shape[1:])
        if self.cols is not None:
            out = (*out[:-1], len(self.cols))
        return out


def _split(size: int, tp: int, rank: int, what: str) -> range:
    if size % tp:
        raise IncompatibleLayoutError(f"TP={tp} does not divide {what} ({size})")
    n = size // tp
    return range(rank * n, (rank + 1) * n)


def shard_geometry(partition: Partition, shape: Shape, tp: int, tp_rank: int, *,
                   name: str = "tensor") -> ShardGeometry:
    """The rows and columns of a ``shape`` tensor that TP rank ``tp_rank`` of ``tp`` holds.

    Mirrors :func:`ckpt_ir.layout.shard` (which cuts data) as index arithmetic::

        COLUMN / VOCAB / QKV   rows [t*R/tp, (t+1)*R/tp)
        ROW (2-D and up)       columns [t*C/tp, (t+1)*C/tp); 1-D: everything
        SWIGLU                 [gate_t; up_t]: two row runs, one in each half
    """
    rows = shape[0] if shape else 1
    whole = ShardGeometry((range(rows),))
    if tp == 1 or partition is Partition.REPLICATED or not shape:
        return whole
    if partition is Partition.ROW:
        if len(shape) == 1:
            return whole
        return ShardGeometry((range(rows),), _split(shape[-1], tp, tp_rank,
                                                    f"the columns of {name}"))
    if partition is Partition.SWIGLU:
        half = rows // 2
        gate = _split(half, tp, tp_rank, f"the gate rows of {name}")
        up = _split(rows - half, tp, tp_rank, f"the up rows of {name}")
        return ShardGeometry((gate, range(half + up.start, half + up.stop)))
    if partition in (Partition.COLUMN, Partition.VOCAB, Partition.QKV):
        return ShardGeometry((_split(rows, tp, tp_rank, f"the rows of {name}"),))
    raise FormatError(f"{name}: TP partition {partition.value!r} is not supported by the "
                      "checkpoint manager")


# --------------------------------------------------------------------------------------------
# Local rows -> IR rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """``length`` consecutive local rows from ``local`` hold rows ``part ..`` of IR role ``role``
    (``role`` None: padding rows, which hold no IR data)."""

    role: str | None
    local: int
    part: int
    length: int


def row_segments(binding: Binding, part_rows: Mapping[str, int],
                 geometry: ShardGeometry) -> tuple[Segment, ...]:
    """Which IR rows each local row of a shard holds, as runs (see the module docstring)."""
    roles = list(binding.ir)
    stride = max(part_rows.values()) + 1
    labels = {role: torch.arange(part_rows[role], dtype=torch.int64) + 1 + i * stride
              for i, role in enumerate(roles)}
    native = binding.transform.apply(labels)
    if native.dim() != 1:
        raise InternalError(f"{binding.native}: label map is not one row per label")
    local = torch.cat([native[r.start:r.stop] for r in geometry.rows])
    part = torch.where(local > 0, (local - 1) // stride, -1)
    row = torch.where(local > 0, (local - 1) % stride, 0)
    if local.numel() == 0:
        return ()
    # A run breaks where the part changes or a data row does not follow its predecessor.
    breaks = torch.ones_like(local, dtype=torch.bool)
    if local.numel() > 1:
        breaks[1:] = (part[1:] != part[:-1]) | ((part[1:] >= 0) & (row[1:] != row[:-1] + 1))
    starts = [*torch.nonzero(breaks).flatten().tolist(), local.numel()]
    out = []
    for a, b in itertools.pairwise(starts):
        p = int(part[a])
        out.append(Segment(roles[p] if p >= 0 else None, a, int(row[a]), b - a))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# The parameters of this rank's model chunks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalParam:
    """One parameter of this rank: its global native name and local tensor."""

    name: str              # parameter name inside its chunk
    chunk: int             # virtual pipeline chunk
    native: str            # mcore name with the global layer index
    tensor: torch.Tensor


def _chunk_params(chunk: object) -> Iterable[tuple[str, torch.Tensor]]:
    named = getattr(chunk, "named_parameters", None)
    if named is None:
        raise FormatError(f"model chunk {type(chunk).__qualname__} has no named_parameters(); "
                          "pass the Megatron-Core model chunks (torch.nn.Module)")
    return named()


def local_params(chunks: Sequence[object], layout: ParallelLayout, coords: RankCoords,
                 num_layers: int) -> tuple[list[LocalParam], str]:
    """This rank's parameters under global native names, and the layer spec's norm style.

    Raises:
        IncompatibleLayoutError: the number of chunks is not the layout's VPP, or a chunk holds
            a layer the layout does not place there.
    """
    if len(chunks) != layout.vpp:
        raise IncompatibleLayoutError(f"{len(chunks)} model chunk(s) given, but the layout "
                                      f"{layout.describe()} has {layout.vpp} per pipeline rank")
    placement = layout.placement(num_layers)
    out: list[LocalParam] = []
    styles: set[str] = set()
    for v, chunk in enumerate(chunks):
        held = placement.chunks[coords.pp][v]
        for name, tensor in _chunk_params(chunk):
            native = name
            m = _LAYER.match(name)
            if m is not None:
                local, rest = int(m.group(1)), m.group(2)
                if local >= len(held):
                    raise IncompatibleLayoutError(
                        f"chunk {v} of pipeline rank {coords.pp} has {name}, but the layout "
                        f"{layout.describe()} places {len(held)} layer(s) there")
                native = f"decoder.layers.{held.start + local}.{rest}"
                if rest in _NORM_STYLE:
                    styles.add(_NORM_STYLE[rest])
            out.append(LocalParam(name, v, native, tensor))
    if len(styles) > 1:
        raise FormatError("the model chunks mix local-spec and TE-spec norm names")
    return out, styles.pop() if styles else "te"


def is_tail(native: str) -> bool:
    """Whether a non-layer tensor lives on the last pipeline stage (final norm, output layer)."""
    return native.startswith(PIPELINE_TAIL)


def numel(shape: Shape) -> int:
    return math.prod(shape)
