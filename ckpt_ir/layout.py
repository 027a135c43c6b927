"""Tensor-parallel partition rules: how one native tensor is split across TP ranks.

Pure region arithmetic, no communication: ``shard`` cuts a global native tensor into the
pieces TP ranks hold, ``unshard`` joins them back. Mapping rows declare their rule as data
(a column of the table), never inferred from module class names at run time.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

from ckpt_ir.errors import IncompatibleLayoutError

__all__ = ["Partition", "shard", "unshard"]


class Partition(enum.Enum):
    """How a native tensor is split across tensor-parallel ranks."""

    REPLICATED = "replicated"  # every rank holds the whole tensor (norms, routers)
    COLUMN = "column"          # split on dim 0 (output rows)
    ROW = "row"                # split on the last dim (input columns); 1-D tensors replicated
    VOCAB = "vocab"            # split on dim 0 of the (padded) vocabulary
    QKV = "qkv"                # split on dim 0 in whole KV groups (interleaved layout)
    SWIGLU = "swiglu"          # global [gate; up]; rank t holds [gate_t; up_t]


def _check_divisible(size: int, tp: int, what: str) -> None:
    if size % tp:
        raise IncompatibleLayoutError(f"TP={tp} does not divide {what} ({size})")


def shard(tensor: torch.Tensor, partition: Partition, tp: int) -> list[torch.Tensor]:
    """The ``tp`` pieces of ``tensor`` under ``partition`` (views where possible)."""
    if tp == 1 or partition is Partition.REPLICATED:
        return [tensor] * tp
    if partition is Partition.ROW:
        if tensor.dim() == 1:
            return [tensor] * tp
        _check_divisible(tensor.shape[-1], tp, "the input dimension")
        return list(tensor.tensor_split(tp, dim=-1))
    if partition is Partition.SWIGLU:
        _check_divisible(tensor.shape[0], 2 * tp, "the fused gate/up rows")
        gate, up = tensor.tensor_split(2, dim=0)
        return [torch.cat((g, u), dim=0)
                for g, u in zip(gate.tensor_split(tp), up.tensor_split(tp), strict=True)]
    _check_divisible(tensor.shape[0], tp, f"the {partition.value}-parallel rows")
    return list(tensor.tensor_split(tp, dim=0))


def unshard(pieces: Sequence[torch.Tensor], partition: Partition) -> torch.Tensor:
    """Inverse of :func:`shard`."""
    tp = len(pieces)
    if tp == 1 or partition is Partition.REPLICATED:
        return pieces[0]
    if partition is Partition.ROW:
        if pieces[0].dim() == 1:
            return pieces[0]
        return torch.cat(tuple(pieces), dim=-1)
    if partition is Partition.SWIGLU:
        halves = [p.tensor_split(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(tuple(pieces), dim=0)
