"""The save plan every rank derives identically from every rank's parameter inventory.

Each rank reports its parameters (global native name, local shape, dtype: a few KB); from all
reports every rank computes the same :class:`ModelPlan` (which rank writes each TP shard: the
lowest data-parallel replica, TP rank 0 for replicated tensors) and the same list of
:class:`HfItem` (for each HF tensor: the owner rank of its safetensors file and the pieces the
holders send it). Pure functions; the manager moves the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ckpt_ir.converters.hf import HfWriter
from ckpt_ir.dtypes import DType
from ckpt_ir.dtypes import lookup as lookup_dtype
from ckpt_ir.errors import InternalError, PlanError
from ckpt_ir.ir import ModelConfig, Shape, TensorSpec
from ckpt_ir.layout import ParallelLayout
from ckpt_ir.manager.live import (
    EMBEDDING,
    OUTPUT_LAYER,
    RankCoords,
    Segment,
    ShardGeometry,
    live_table,
    native_shapes,
    row_segments,
    shard_geometry,
)
from ckpt_ir.tables import Binding, Table

__all__ = ["Entry", "HfItem", "Inventory", "ModelPlan", "Piece", "build_model_plan", "hf_items",
           "is_tied_copy", "needed_tp", "place", "rows_of"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One parameter as a rank reports it."""

    native: str
    shape: Shape
    dtype: str


@dataclass(frozen=True)
class Inventory:
    coords: RankCoords
    norm_style: str | None
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class Piece:
    """A source rank's contribution to one HF tensor."""

    rank: int
    native: str
    segments: tuple[Segment, ...]
    cols: range | None
    shape: Shape


@dataclass(frozen=True, slots=True)
class HfItem:
    name: str
    shape: Shape
    dtype: DType
    owner: int
    pieces: tuple[Piece, ...]


@dataclass
class ModelPlan:
    table: Table
    shapes: dict[str, Shape]
    dtypes: dict[str, DType]
    sources: dict[tuple[str, int], int]   # (native, tp rank) -> the rank that writes it
    tp: int
    padded_vocab: int
    mine: dict[str, torch.Tensor] = field(default_factory=dict)  # natives this rank writes


def _dtype(name: str) -> DType:
    value = lookup_dtype(name.removeprefix("torch."))
    if value is None:
        raise InternalError(f"unknown dtype {name!r}")
    return value


def needed_tp(binding: Binding, shape: Shape, tp: int) -> list[int]:
    """TP ranks whose shards together hold the tensor once (one for replicated tensors)."""
    whole = shard_geometry(binding.partition, shape, tp, 0, name=binding.native)
    return [0] if whole == ShardGeometry((range(shape[0] if shape else 1),)) else list(range(tp))


def is_tied_copy(native: str, config: ModelConfig) -> bool:
    # With tied embeddings and PP > 1, megatron-core keeps a synchronized copy of the embedding
    # as the last stage's output layer: saved once (from the embedding), loaded into both.
    return native == OUTPUT_LAYER and config.shares_output_with_embedding


def build_model_plan(config: ModelConfig, layout: ParallelLayout,
                      inventories: Sequence[Inventory]) -> ModelPlan:
    """Validate every rank's parameters against the table; choose each shard's writer."""
    problems: list[str] = []
    styles = {inv.norm_style for inv in inventories if inv.norm_style is not None}
    if len(styles) > 1:
        raise PlanError([f"ranks disagree on the layer spec (norm names {sorted(styles)})"])
    norm_style = styles.pop() if styles else "te"
    tp = layout.tp
    padded = set()
    # A value head's output layer ([num_labels, H], whole on every rank) has no vocabulary rows.
    vocab_rows = (EMBEDDING,) if config.is_value_model else (EMBEDDING, OUTPUT_LAYER)
    for inv in inventories:
        for e in inv.entries:
            if e.native in vocab_rows:
                padded.add(e.shape[0] * tp)
    if len(padded) > 1:
        raise PlanError([f"ranks disagree on the padded vocabulary size ({sorted(padded)})"])
    padded_vocab = padded.pop() if padded else config.vocab_size
    if padded_vocab < config.vocab_size:
        raise PlanError([f"the model's embedding has {padded_vocab} rows, fewer than the "
                         f"config's vocab_size {config.vocab_size}"])
    table = live_table(config, padded_vocab_size=padded_vocab, norm_style=norm_style)
    shapes = native_shapes(table, config)
    dtypes: dict[str, DType] = {}
    holders: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for rank, inv in enumerate(inventories):
        for e in inv.entries:
            binding = table.by_native.get(e.native)
            if binding is None:
                if not is_tied_copy(e.native, config):
                    problems.append(f"rank {rank}: parameter {e.native} is not mapped by the "
                                    f"{config.architecture} mcore table")
                continue
            geometry = shard_geometry(binding.partition, shapes[e.native], tp, inv.coords.tp,
                                      name=e.native)
            expected = geometry.local_shape(shapes[e.native])
            if e.shape != expected:
                problems.append(f"rank {rank} (tp {inv.coords.tp}): {e.native} has shape "
                                f"{list(e.shape)}, expected {list(expected)} at "
                                f"{layout.describe()}")
                continue
            dtype = _dtype(e.dtype)
            if dtypes.setdefault(e.native, dtype) != dtype:
                problems.append(f"{e.native}: ranks hold it in different dtypes")
            holders.setdefault((e.native, inv.coords.tp), []).append((inv.coords.dp, rank))
    sources: dict[tuple[str, int], int] = {}
    for b in table.bindings:
        for t in needed_tp(b, shapes[b.native], tp):
            found = holders.get((b.native, t))
            if not found:
                problems.append(f"no rank holds {b.native} (TP rank {t})")
                continue
            sources[(b.native, t)] = min(found)[1]  # the lowest data-parallel replica
    if problems:
        raise PlanError(problems)
    return ModelPlan(table, shapes, dtypes, sources, tp, padded_vocab)


def hf_items(plan: ModelPlan, config: ModelConfig, writer: HfWriter,
              specs: Sequence[TensorSpec], world: int) -> list[HfItem]:
    """Owner and pieces of every HF tensor; every rank computes the same list."""
    schema = config.schema()
    by_ir = plan.table.by_ir
    # File owners: least-loaded rank first, preferring a rank that holds some of the file.
    file_bytes: dict[str, int] = {}
    file_sources: dict[str, set[int]] = {}
    for s in specs:
        f = writer.file_of(s.name)
        file_bytes[f] = file_bytes.get(f, 0) + s.nbytes
        b = by_ir[s.name][0]
        file_sources.setdefault(f, set()).update(
            plan.sources[(b.native, t)] for t in needed_tp(b, plan.shapes[b.native], plan.tp))
    load = [0] * world
    owner_of: dict[str, int] = {}
    for f in sorted(file_bytes, key=lambda f: -file_bytes[f]):
        owner = min(range(world), key=lambda r: (load[r], r not in file_sources[f], r))
        owner_of[f] = owner
        load[owner] += file_bytes[f]
    segments_cache: dict[tuple[str, int], tuple[ShardGeometry, tuple[Segment, ...]]] = {}
    items = []
    for s in specs:
        b, role = by_ir[s.name]
        part_rows = {r: schema[n][0] if schema[n] else 1 for r, n in b.ir.items()}
        pieces = []
        covered = 0
        for t in needed_tp(b, plan.shapes[b.native], plan.tp):
            key = (b.native, t)
            if key not in segments_cache:
                g = shard_geometry(b.partition, plan.shapes[b.native], plan.tp, t, name=b.native)
                segments_cache[key] = (g, row_segments(b, part_rows, g))
            g, segs = segments_cache[key]
            mine = tuple(x for x in segs if x.role == role)
            if not mine:
                continue
            shape = (sum(x.length for x in mine), *s.shape[1:])
            if g.cols is not None:
                shape = (*shape[:-1], len(g.cols))
            covered += _prod(shape)
            pieces.append(Piece(plan.sources[key], b.native, mine, g.cols, shape))
        if covered != _prod(s.shape):
            raise InternalError(f"{s.name}: the TP shards cover {covered} of "
                                f"{_prod(s.shape)} elements")
        items.append(HfItem(s.name, s.shape, s.dtype, owner_of[writer.file_of(s.name)],
                             tuple(pieces)))
    return items


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def rows_of(tensor: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """The local rows of ``segments``, stacked (a view when there is one segment)."""
    if len(segments) == 1:
        return tensor.narrow(0, segments[0].local, segments[0].length)
    return torch.cat([tensor.narrow(0, s.local, s.length) for s in segments])


def place(out: torch.Tensor, piece: torch.Tensor, segments: Sequence[Segment],
           cols: range | None) -> None:
    at = 0
    for s in segments:
        dst = out.narrow(0, s.part, s.length)
        if cols is not None:
            dst = dst.narrow(-1, cols.start, len(cols))
        dst.copy_(piece.narrow(0, at, s.length))
        at += s.length
