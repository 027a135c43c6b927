"""Load a committed checkpoint into this rank's model chunks, at this job's layout.

Each parameter's shard is read straight from the files, nothing else: from torch_dist, the
boxes its rows and columns occupy in the stored (layer-stacked) tensors; from HF safetensors,
the rows of each IR tensor its local rows hold (:func:`ckpt_ir.manager.live.row_segments`),
which the memory-mapped files page in alone. Vocabulary padding rows are zero.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ckpt_ir.converters.hf import HfReader
from ckpt_ir.converters.storage.dcp_files import DcpReader
from ckpt_ir.errors import CorruptCheckpointError, IncompatibleLayoutError, PlanError
from ckpt_ir.ir import ModelConfig, Shape
from ckpt_ir.layout import ParallelLayout, Partition
from ckpt_ir.manager.live import (
    EMBEDDING,
    OUTPUT_LAYER,
    LocalParam,
    RankCoords,
    ShardGeometry,
    live_table,
    local_params,
    native_shapes,
    row_segments,
    shard_geometry,
)
from ckpt_ir.manager.plan import is_tied_copy
from ckpt_ir.tables import Binding

__all__ = ["fill_from_dist", "fill_from_hf"]

_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


View = list[tuple[LocalParam, Binding, ShardGeometry, Shape]]


def _local_view(chunks: Sequence[Any], config: ModelConfig, layout: ParallelLayout,
                coords: RankCoords) -> tuple[View, int]:
    """Every parameter of this rank with its binding, geometry and global shape, checked
    (all problems at once); and the live model's padded vocabulary."""
    params, style = local_params(chunks, layout, coords, config.num_layers)
    tp = layout.tp
    padded = config.vocab_size
    for p in params:
        if p.native in (EMBEDDING, OUTPUT_LAYER):
            padded = p.tensor.shape[0] * tp
    table = live_table(config, padded_vocab_size=padded, norm_style=style)
    shapes = native_shapes(table, config)
    out = []
    problems = []
    for p in params:
        native = EMBEDDING if is_tied_copy(p.native, config) else p.native
        binding = table.by_native.get(native)
        if binding is None:
            problems.append(f"parameter {p.native} is not mapped by the "
                            f"{config.architecture} mcore table")
            continue
        g = shard_geometry(binding.partition, shapes[native], tp, coords.tp,
                           name=native)
        if tuple(p.tensor.shape) != g.local_shape(shapes[native]):
            problems.append(f"{p.native} has shape {list(p.tensor.shape)}, expected "
                            f"{list(g.local_shape(shapes[native]))} at "
                            f"{layout.describe()}")
            continue
        out.append((p, binding, g, shapes[native]))
    if problems:
        raise PlanError(problems)
    return out, padded


@torch.no_grad()
def fill_from_dist(chunks: Sequence[Any], directory: Path, *, config: ModelConfig,
                   layout: ParallelLayout, coords: RankCoords, trust: bool) -> None:
    """Fill the chunks from a torch_dist directory (any layout saved it)."""
    view, padded = _local_view(chunks, config, layout, coords)
    dist_table = live_table(config, padded_vocab_size=padded, norm_style="te")
    reader = DcpReader(directory, trust=trust)
    try:
        for p, binding, g, shape in view:
            name = dist_table.by_ir[next(iter(binding.ir.values()))][0].native
            m = _PER_LAYER.match(name)
            key, prefix = (f"decoder.layers.{m.group(2)}", (int(m.group(1)),)) if m \
                else (name, ())
            stored = reader.index.tensors.get(key)
            if stored is None:
                raise CorruptCheckpointError(f"{key} is not in the checkpoint",
                                             path=directory, tensor=key)
            stored_shape = stored.shape[len(prefix):]
            vocab = binding.partition is Partition.VOCAB
            if stored_shape != shape and not (vocab and stored_shape[1:] == shape[1:]):
                raise IncompatibleLayoutError(
                    f"{key}: the checkpoint holds {list(stored_shape)} per layer, this "
                    f"model {list(shape)}", path=directory)
            local = p.tensor
            at = 0
            for run in g.rows:
                # Rows past a smaller stored (padded) vocabulary stay zero.
                n = max(0, min(run.stop, stored_shape[0]) - run.start)
                dst = local.narrow(0, at, len(run))
                if n < len(run):
                    dst.zero_()
                if n > 0:
                    offsets = [*prefix, run.start] + [0] * (len(shape) - 1)
                    sizes = [1] * len(prefix) + [n, *shape[1:]]
                    if g.cols is not None:
                        offsets[-1], sizes[-1] = g.cols.start, len(g.cols)
                    region = reader.read_region(key, offsets, sizes)
                    dst.narrow(0, 0, n).copy_(region.reshape(sizes[len(prefix):]))
                at += len(run)
            reader.release()
    finally:
        reader.close()


@torch.no_grad()
def fill_from_hf(chunks: Sequence[Any], directory: Path, *, config: ModelConfig,
                 layout: ParallelLayout, coords: RankCoords) -> None:
    """Fill the chunks from an HF model directory of the same model."""
    view, _ = _local_view(chunks, config, layout, coords)
    reader = HfReader(directory)
    try:
        theirs, ours = reader.config.schema(), config.schema()
        if theirs != ours:
            diff = sorted(set(theirs.items()) ^ set(ours.items()))[:3]
            raise PlanError([f"the HF checkpoint's config does not describe this model "
                             f"(e.g. {diff})"], path=directory)
        schema = ours
        for p, binding, g, _ in view:
            part_rows = {r: schema[n][0] if schema[n] else 1 for r, n in binding.ir.items()}
            local = p.tensor
            for seg in row_segments(binding, part_rows, g):
                dst = local.narrow(0, seg.local, seg.length)
                if seg.role is None:
                    dst.zero_()  # vocabulary padding rows hold no IR data
                    continue
                src = reader.read(binding.ir[seg.role]).narrow(0, seg.part, seg.length)
                if g.cols is not None:
                    src = src.narrow(-1, g.cols.start, len(g.cols))
                dst.copy_(src)
            reader.release()
    finally:
        reader.close()
