"""Plain-data mirrors of the ``ShardedTensor`` classes a ``torch.save`` of FSDP1 pickles.

FSDP1 without a device mesh saves each sharded parameter (``SHARDED_STATE_DICT``) as a
``ShardedTensor``: ``_rebuild_from_type_v2(_rebuild_wrapper_subclass, ShardedTensor, args,
state)``, whose ``state`` is the 5-tuple of ``ShardedTensor.__getstate__``::

    (local_shards: [Shard{tensor, metadata: ShardMetadata}],
     ShardedTensorMetadata{shards_metadata: [ShardMetadata{shard_offsets, shard_sizes,
                           placement: _remote_device}], size, tensor_properties},
     ProcessGroupState{local_rank, global_rank, local_world_size, global_world_size},
     ChunkShardingSpec{dim, placements} | EnumerableShardingSpec{shards},
     init_rrefs: bool)

(torch 2.13, /work/shared/reference/fsdp-dcp-formats.md §2.3). torch's ``__setstate__``
refuses to run outside a process group of the saved rank and size; nothing of that is needed to
read the bytes: each local shard's tensor and the global offsets of every shard are plain data.
So the allow-list maps exactly these names onto the classes below:

* ``…sharded_tensor.api.ShardedTensor`` -> :class:`ShardedTensorRecord`; only ever built by the
  wrapper-subclass rebuild (:func:`rebuild`), and named by ``getattr(ShardedTensor,
  "ProcessGroupState")``: protocol 2 pickles the nested class that way, and that is the one
  ``getattr`` the allow-list admits.
* ``Shard``, ``ShardMetadata``, ``_remote_device``, ``ShardedTensorMetadata``,
  ``TensorProperties``, ``ProcessGroupState``, ``ChunkShardingSpec``,
  ``EnumerableShardingSpec``: created empty (``NEWOBJ`` with no arguments), then given their
  state by :func:`set_state` in exactly the form torch writes it (a ``__dict__``, a
  ``(None, slots)`` pair for the slotted ``Shard`` and ``ShardMetadata``, a 5-tuple for
  ``TensorProperties``) with exactly torch's field names, each value type-checked.
* ``MEM_FORMAT_ENCODING``: the enum :class:`MemFormatEncoding` (called with one value).

Part of :mod:`ckpt_ir.safety.unpickler`; its docstring states the trust model. Nothing here
interprets the geometry: :mod:`ckpt_ir.converters.verl_fsdp` checks that the shards tile the
tensor and that each rank's file holds what the metadata places on it.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

__all__ = ["CLASSES", "MEM_FORMAT", "SHARDED_TENSOR_TYPE", "ChunkShardingSpec",
           "EnumerableShardingSpec", "LocalShard", "MemFormatEncoding", "ProcessGroupState",
           "RemoteDevice", "ShardMetadata", "ShardedTensorMetadata", "ShardedTensorRecord",
           "TensorProperties", "rebuild", "set_state"]

_MAX_DIMS = 64


def _torch() -> Any:
    # The field checks run only when a pickle names these classes; importing this module (the
    # allow-list does, to read a .metadata for `inspect`) must not import torch.
    import torch

    return torch


def _fail(what: str) -> None:
    raise pickle.UnpicklingError(what)


def _is_int(x: Any, *, low: int = 0) -> bool:
    return type(x) is int and x >= low


def _ints(x: Any) -> bool:
    return type(x) is list and len(x) <= _MAX_DIMS and all(_is_int(v) for v in x)


def _list_of(cls: type) -> Callable[[Any], bool]:
    return lambda x: type(x) is list and all(type(v) is cls for v in x)


class _Mirror:
    """An attribute bag whose state must hold exactly ``FIELDS``, each passing its check."""

    FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {}
    SLOTS: ClassVar[bool] = False  # torch's class has __slots__: state is (None, {slots})

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class RemoteDevice(_Mirror):
    """``torch.distributed.remote_device._remote_device``: ``_rank`` is the shard's rank in
    the process group (None for an RPC worker name), ``_device`` its device."""

    FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "_worker_name": lambda x: x is None or type(x) is str,
        "_rank": lambda x: x is None or _is_int(x),
        "_device": lambda x: type(x) is _torch().device,
    }


class ShardMetadata(_Mirror):
    """``…_shard.metadata.ShardMetadata``: one shard's global offsets and sizes (elements,
    one per dimension) and placement."""

    SLOTS = True
    FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "shard_offsets": _ints,
        "shard_sizes": _ints,
        "placement": lambda x: x is None or type(x) is RemoteDevice,
    }


class LocalShard(_Mirror):
    """``…sharded_tensor.shard.Shard``: this rank's ``tensor`` of one shard, with its
    ``metadata``."""

    SLOTS = True
    FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "tensor": lambda x: type(x) is _torch().Tensor,
        "metadata": lambda x: type(x) is ShardMetadata,
    }


class MemFormatEncoding(Enum):
    """``…sharded_tensor.metadata.MEM_FORMAT_ENCODING`` (how TensorProperties pickles a
    memory format)."""

    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


class TensorProperties(_Mirror):
    """``…sharded_tensor.metadata.TensorProperties``, pickled as the 5-tuple ``(dtype, layout,
    requires_grad, MEM_FORMAT_ENCODING, pin_memory)``."""

    TUPLE: ClassVar[tuple[tuple[str, Callable[[Any], bool]], ...]] = (
        ("dtype", lambda x: isinstance(x, _torch().dtype)),
        ("layout", lambda x: isinstance(x, _torch().layout)),
        ("requires_grad", lambda x: type(x) is bool),
        ("memory_format", lambda x: type(x) is MemFormatEncoding),
        ("pin_memory", lambda x: type(x) is bool),
    )


class ShardedTensorMetadata(_Mirror):
    """``…sharded_tensor.metadata.ShardedTensorMetadata``: every shard's metadata (all ranks),
    the global ``size`` and the tensor properties."""

    FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "shards_metadata": _list_of(ShardMetadata),
        "size": lambda x: type(x) is _torch().Size,
        "tensor_properties": lambda x: type(x) is TensorProperties,
    }


class ProcessGroupState(_Mirror):
    """``ShardedTensor.ProcessGroupState``: the saving rank and world size, in the sharding
    process group (local) and in the default one (global)."""

    FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "local_rank": _is_int,
        "global_rank": _is_int,
        "local_world_size": lambda x: _is_int(x, low=1),
        "global_world_size": lambda x: _is_int(x, low=1),
    }


class ChunkShardingSpec(_Mirror):
    """``…sharding_spec.chunk_sharding_spec.ChunkShardingSpec``: ``torch.chunk`` along
    ``dim`` over ``placements``."""

    FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "dim": lambda x: _is_int(x) or type(x) is str,
        "placements": _list_of(RemoteDevice),
    }


class EnumerableShardingSpec(_Mirror):
    """``…sharding_spec.api.EnumerableShardingSpec``: the shards listed one by one (FSDP1 uses
    it for a tensor with fewer rows than ranks)."""

    FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "shards": _list_of(ShardMetadata),
    }


class ShardedTensorRecord:
    """One pickled ShardedTensor, as data: its global ``shape`` / ``stride`` / ``dtype`` from
    the wrapper arguments, this rank's ``local_shards``, the global ``metadata`` (every shard's
    offsets, sizes and rank), the saving ``process_group`` and the ``sharding_spec``."""

    def __init__(self, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype,
                 local_shards: list[LocalShard], metadata: ShardedTensorMetadata,
                 process_group: ProcessGroupState,
                 sharding_spec: ChunkShardingSpec | EnumerableShardingSpec) -> None:
        self.shape = shape
        self.stride = stride
        self.dtype = dtype
        self.local_shards = local_shards
        self.metadata = metadata
        self.process_group = process_group
        self.sharding_spec = sharding_spec

    def __repr__(self) -> str:
        return (f"ShardedTensorRecord(shape={self.shape}, dtype={self.dtype}, local="
                f"{[tuple(s.tensor.shape) for s in self.local_shards]})")


_API = "torch.distributed._shard.sharded_tensor.api"
CLASSES: dict[type, tuple[str, str]] = {
    LocalShard: ("torch.distributed._shard.sharded_tensor.shard", "Shard"),
    ShardMetadata: ("torch.distributed._shard.metadata", "ShardMetadata"),
    RemoteDevice: ("torch.distributed.remote_device", "_remote_device"),
    ShardedTensorMetadata: ("torch.distributed._shard.sharded_tensor.metadata",
                            "ShardedTensorMetadata"),
    TensorProperties: ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
    # Protocol 2 reaches it as getattr(ShardedTensor, "ProcessGroupState"); protocol 4 would
    # name it by its qualified name, which is this key.
    ProcessGroupState: (_API, "ShardedTensor.ProcessGroupState"),
    ChunkShardingSpec: ("torch.distributed._shard.sharding_spec.chunk_sharding_spec",
                        "ChunkShardingSpec"),
    EnumerableShardingSpec: ("torch.distributed._shard.sharding_spec.api",
                             "EnumerableShardingSpec"),
}
"""Mirrors built by an empty ``NEWOBJ``, then :func:`set_state`."""

MEM_FORMAT = ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING")
"""torch's name of :class:`MemFormatEncoding`."""

SHARDED_TENSOR_TYPE = (_API, "ShardedTensor")
"""The wrapper subclass itself; only a rebuild argument (and ``getattr`` target), never
instantiated."""


def set_state(inst: _Mirror, state: Any) -> None:
    """``BUILD`` for a :data:`CLASSES` instance: ``state`` must be what torch pickles for it,
    field for field; values are checked, nothing is called."""
    cls = type(inst)
    name = CLASSES[cls][1]
    if cls is TensorProperties:
        if type(state) is not tuple or len(state) != len(cls.TUPLE):
            _fail(f"{name} state is not a {len(cls.TUPLE)}-tuple")
        for (field, ok), value in zip(cls.TUPLE, state, strict=True):
            if not ok(value):
                _fail(f"invalid {name}.{field}")
            inst.__dict__[field] = value
        return
    if cls.SLOTS:
        # A slotted dataclass pickles (None, {slot: value}).
        if type(state) is not tuple or len(state) != 2 or state[0] is not None:
            _fail(f"{name} state is not a (None, slots) pair")
        state = state[1]
    if type(state) is not dict or set(state) != set(cls.FIELDS):
        got = sorted(state) if type(state) is dict else type(state).__name__
        _fail(f"{name} state must hold exactly {sorted(cls.FIELDS)}, not {got}")
    for field, ok in cls.FIELDS.items():
        if not ok(state[field]):
            _fail(f"invalid {name}.{field}")
    inst.__dict__.update(state)


def rebuild(func_args: Any, state: Any) -> ShardedTensorRecord:
    """A pickled ShardedTensor as data: wrapper arguments ``(ShardedTensor, dtype, size,
    stride, storage_offset, layout, device, requires_grad)`` and the 5-tuple state of
    ``ShardedTensor.__getstate__``."""
    if type(func_args) is not tuple or len(func_args) != 8 \
            or func_args[0] is not ShardedTensorRecord:
        _fail("invalid ShardedTensor wrapper arguments")
    torch = _torch()
    _, dtype, size, stride, offset, layout, device, grad = func_args
    if not (isinstance(dtype, torch.dtype) and isinstance(layout, torch.layout)
            and type(device) is torch.device and _is_int(offset) and type(grad) is bool):
        _fail("invalid ShardedTensor wrapper arguments")
    for what, dims in (("size", size), ("stride", stride)):
        if type(dims) not in (tuple, torch.Size) or len(dims) > _MAX_DIMS \
                or not all(_is_int(v) for v in dims):
            _fail(f"ShardedTensor {what} must be a tuple of non-negative ints")
    if len(size) != len(stride):
        _fail("ShardedTensor size and stride differ in length")
    if type(state) is not tuple or len(state) != 5:
        _fail("ShardedTensor state is not the 5-tuple torch pickles")
    shards, metadata, group, spec, init_rrefs = state
    if not (_list_of(LocalShard)(shards) and type(metadata) is ShardedTensorMetadata
            and type(group) is ProcessGroupState
            and type(spec) in (ChunkShardingSpec, EnumerableShardingSpec)
            and type(init_rrefs) is bool):
        _fail("ShardedTensor state must be (local shards, ShardedTensorMetadata, "
              "ProcessGroupState, sharding spec, bool)")
    return ShardedTensorRecord(tuple(size), tuple(stride), dtype, shards, metadata, group, spec)
