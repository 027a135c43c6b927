"""FSDP1 ``ShardedTensor`` rank files as torch writes them, built without a process group
(tests only).

``torch.save`` of an FSDP1 model without a device mesh (``SHARDED_STATE_DICT``) pickles each
parameter as ``_rebuild_from_type_v2(_rebuild_wrapper_subclass, ShardedTensor, args, state)``
with ``state = ShardedTensor.__getstate__()`` (fsdp-dcp-formats.md §2.3). A real
``ShardedTensor`` needs a process group of the saved size, so the unit tests and the fuzz seed
build the same pickle from torch's own metadata classes (``Shard``, ``ShardMetadata``,
``ShardedTensorMetadata``, ``TensorProperties``, ``ShardedTensor.ProcessGroupState``, the
sharding spec torch infers) around a stand-in for the wrapper, cut as FSDP1's
``_create_chunk_sharded_tensor`` cuts (``torch.chunk`` on dim 0, ``rank:{r}/cpu``
placements, no local shard on ranks past the last chunk). The real thing is in
``tests/clients/test_fsdp1_client.py``; it checks that both carry the same globals.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)
from torch.distributed._shard.sharded_tensor.shard import Shard
from torch.distributed._shard.sharding_spec.api import (
    EnumerableShardingSpec,
    _infer_sharding_spec_from_shards_metadata,
)

from ckpt_ir.converters.verl_fsdp import _DTensorZipWriter

__all__ = ["FakeShardedTensor", "chunk_metadata", "fsdp1_rank_states", "save_rank_file",
           "sharded"]


class FakeShardedTensor:
    """Pickles exactly as torch pickles a ShardedTensor saved by ``rank`` of ``world``."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, local_shards: list[Shard],
                 metadata: ShardedTensorMetadata, rank: int, world: int,
                 group: int | None = None) -> None:
        self.shape, self.dtype = shape, dtype
        self.local_shards, self.metadata = local_shards, metadata
        group = group or world
        self.group = ShardedTensor.ProcessGroupState(rank % group, rank, group, world)
        self.init_rrefs: Any = False  # the state's last field (a payload, in hostile tests)
        try:
            self.spec = _infer_sharding_spec_from_shards_metadata(metadata.shards_metadata)
        except ValueError:
            # Shards that overlap (bad-input tests): torch would refuse to build the spec, a
            # hostile file need not. The listed shards, unchecked.
            self.spec = object.__new__(EnumerableShardingSpec)
            self.spec.shards = metadata.shards_metadata

    def __reduce_ex__(self, protocol: Any) -> Any:
        stride = torch.empty(self.shape, device="meta").stride()
        args = (ShardedTensor, self.dtype, self.shape, stride, 0, torch.strided,
                torch.device("cpu"), False)
        state = (self.local_shards, self.metadata, self.group, self.spec, self.init_rrefs)
        return (torch._tensor._rebuild_from_type_v2,
                (torch._utils._rebuild_wrapper_subclass, ShardedTensor, args, state))


def chunk_metadata(full: torch.Tensor, world: int, first_rank: int = 0
                   ) -> ShardedTensorMetadata:
    """The global metadata FSDP1 gives ``full`` sharded over ``world`` ranks: one shard per
    ``torch.chunk`` piece of dim 0, on global ranks ``first_rank``, ``first_rank + 1``, ...
    (a hybrid-sharding group starts past 0)."""
    chunks = full.chunk(world, dim=0)
    starts = [0, *itertools.accumulate(c.shape[0] for c in chunks)][:-1]
    shards = [ShardMetadata([s] + [0] * (full.dim() - 1), list(c.shape),
                            f"rank:{first_rank + r}/cpu")
              for r, (s, c) in enumerate(zip(starts, chunks, strict=True))]
    return ShardedTensorMetadata(shards, full.shape, TensorProperties(
        dtype=full.dtype, layout=torch.strided, requires_grad=False,
        memory_format=torch.contiguous_format, pin_memory=False))


def sharded(full: torch.Tensor, world: int, rank: int,
            metadata: ShardedTensorMetadata | None = None,
            group: int | None = None) -> FakeShardedTensor:
    """``full`` as rank ``rank`` of ``world`` saves it: the local shards are the pieces of
    ``full`` that ``metadata`` (default: FSDP1's chunks over ``group`` consecutive ranks, the
    whole world unless hybrid sharding) places on this rank."""
    group = group or world
    if metadata is None:
        metadata = chunk_metadata(full, group, rank - rank % group)
    local = []
    for shard in metadata.shards_metadata:
        if shard.placement.rank() != rank:
            continue
        index = tuple(slice(o, o + n) for o, n in zip(shard.shard_offsets, shard.shard_sizes,
                                                       strict=True))
        local.append(Shard(full[index].clone(), shard))
    return FakeShardedTensor(tuple(full.shape), full.dtype, local, metadata, rank, world,
                             group)


def fsdp1_rank_states(full: Mapping[str, torch.Tensor], world: int,
                      buffers: tuple[str, ...] = (), group: int | None = None
                      ) -> list[OrderedDict[str, Any]]:
    """Each rank's ``SHARDED_STATE_DICT``: every tensor a ShardedTensor but ``buffers``
    (plain full copies, as FSDP1 leaves them); with ``group``, hybrid sharding over groups of
    that many consecutive ranks (each group a replica)."""
    return [OrderedDict((k, v.clone() if k in buffers else sharded(v, world, r, group=group))
                        for k, v in full.items()) for r in range(world)]


def save_rank_file(state: Mapping[str, Any], path: Path) -> None:
    """``torch.save(state, path)`` as torch writes it (the zip layout of ckpt-ir's archive
    writer, whose pickler stores every plain tensor, the local shards' included)."""
    _DTensorZipWriter(path).close(OrderedDict(state))
