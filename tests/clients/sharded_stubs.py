"""Stand-ins for megatron-core's sharded-state-dict leaves, for tests that run without it.

They carry the attributes :mod:`ckpt_ir.manager.sharded` recognises (its duck typing), with
megatron-core 0.16's field names; the real classes are exercised by ``test_manager_client``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LocalNonpersistentObject", "ShardedObject", "ShardedTensor"]


@dataclass
class ShardedTensor:
    key: str
    data: torch.Tensor | None
    dtype: torch.dtype
    local_shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    axis_fragmentations: tuple[int, ...] | None
    replica_id: Any = 0
    prepend_axis_num: int = 0
    allow_shape_mismatch: bool = False
    flattened_range: slice | None = None


@dataclass
class ShardedObject:
    key: str
    data: Any
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    replica_id: Any = 0


class LocalNonpersistentObject:
    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def unwrap(self) -> Any:
        return self.obj
