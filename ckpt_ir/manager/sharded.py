"""Megatron-Core sharded state dicts written and read as torch_dist, without megatron-core.

The caller's optimizer, RNG and scheduler state (and, if it likes, its model) come as the
*sharded state dict* megatron-core builds (``optimizer.sharded_state_dict(...)``,
``ShardedObject("rng_state", ...)``): nested dicts and lists whose leaves are

* ``ShardedTensor``: ``key``, ``data``, ``global_shape``, ``global_offset``,
  ``prepend_axis_num``, ``replica_id``, ``flattened_range``, ``axis_fragmentations``;
* ``ShardedObject``: ``key``, ``data``, ``global_shape``, ``global_offset``, ``replica_id``;
* ``ShardedTensorFactory``: ``build()`` -> a sub-state-dict, ``merge_fn`` to undo it on load;
* ``LocalNonpersistentObject``: ``unwrap()``; never stored, handed back on load;
* anything else: *common* state, stored once by rank 0.

They are recognised by their attributes (duck typing), so the library never imports
megatron-core. The bytes on disk are what ``dist_checkpointing.save`` (torch_dist) writes:

* one DCP chunk per *main replica* ``ShardedTensor`` (replica id 0 or all zeros) at its global
  offset, sized ``(1,) * prepend_axis_num + local_shape``; fqn = ``key``;
* ``ShardedObject`` -> object ``<key>/shard_<offsets>_<shape>`` holding ``torch.save([data])``;
* common state -> ``common.pt`` (megatron-core <= 0.18) and the object
  ``common_state/shard_0_1`` (>= 0.19); ``metadata.json`` last.

Loading reads, for each requested ``ShardedTensor``, exactly its box of the stored tensor,
whatever layout wrote it: resharding, as megatron-core's loader does.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckpt_ir.converters.mcore_dist import METADATA_JSON
from ckpt_ir.converters.storage.dcp_files import DcpDataFile, DcpReader, DcpRecord, write_metadata
from ckpt_ir.durable import sync_file, write_synced
from ckpt_ir.errors import (
    CorruptCheckpointError,
    FormatError,
    IncompatibleLayoutError,
    InternalError,
)
from ckpt_ir.safety.unpickler import load_torch

__all__ = ["COMMON_OBJECT", "RankPart", "ShardedSnapshot", "finish_sharded", "is_common_only",
           "is_sharded_state_dict", "load_sharded", "snapshot", "write_sharded_rank"]

COMMON_OBJECT = "common_state/shard_0_1"
_MISSING = object()


# --------------------------------------------------------------------------------------------
# Duck typing
# --------------------------------------------------------------------------------------------


def _is_tensor_leaf(x: Any) -> bool:
    return (hasattr(x, "global_offset") and hasattr(x, "axis_fragmentations")
            and hasattr(x, "key") and hasattr(x, "data"))


def _is_object_leaf(x: Any) -> bool:
    return (hasattr(x, "global_offset") and hasattr(x, "global_shape") and hasattr(x, "key")
            and hasattr(x, "data") and not hasattr(x, "axis_fragmentations"))


def _is_factory(x: Any) -> bool:
    return callable(getattr(x, "build", None)) and hasattr(x, "merge_fn")


def _is_nonpersistent(x: Any) -> bool:
    return callable(getattr(x, "unwrap", None)) and hasattr(x, "obj")


def _is_sharded(x: Any) -> bool:
    return _is_tensor_leaf(x) or _is_object_leaf(x) or _is_factory(x)


def is_sharded_state_dict(x: Any) -> bool:
    """Whether ``x`` is a (nested) mapping holding at least one sharded leaf."""
    if _is_sharded(x):
        return True
    if isinstance(x, Mapping):
        return any(is_sharded_state_dict(v) for v in x.values())
    if isinstance(x, list):
        return any(is_sharded_state_dict(v) for v in x)
    return False


def _main_replica(replica_id: Any) -> bool:
    if isinstance(replica_id, int):
        return replica_id == 0
    return all(r == 0 for r in replica_id)


def _object_fqn(obj: Any) -> str:
    offsets = ".".join(str(int(o)) for o in obj.global_offset)
    shape = ".".join(str(int(s)) for s in obj.global_shape)
    return f"{obj.key}/shard_{offsets}_{shape}"


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Chunk:
    fqn: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    data: torch.Tensor  # with the prepended axes


@dataclass
class ShardedSnapshot:
    """What one rank stores of a sharded state dict: its main-replica chunks and objects, and
    (rank 0) the common state. With ``copy`` the tensors are private CPU copies, so the caller
    may go on training while a background thread writes them."""

    chunks: list[_Chunk] = field(default_factory=list)
    objects: dict[str, list[Any]] = field(default_factory=dict)
    common: Any = None

    @property
    def nbytes(self) -> int:
        return sum(c.data.numel() * c.data.element_size() for c in self.chunks)


def _split_common(x: Any) -> Any:
    """The non-sharded part of ``x``, structure kept as megatron-core's
    ``extract_matching_values`` keeps it (lists compacted)."""
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if isinstance(v, (Mapping, list)):
                rest = _split_common(v)
                if rest or not v:
                    out[k] = rest
            elif not (_is_sharded(v) or _is_nonpersistent(v)):
                out[k] = v
        return out
    if isinstance(x, list):
        out_list = []
        for v in x:
            if isinstance(v, (Mapping, list)) and v:
                rest = _split_common(v)
                if rest:
                    out_list.append(rest)
            elif not (_is_sharded(v) or _is_nonpersistent(v)):
                out_list.append(v)
        return out_list
    return x


def snapshot(state: Mapping[str, Any], *, copy_data: bool, what: str) -> ShardedSnapshot:
    """This rank's share of ``state`` (factories built, non-main replicas left out).

    Raises:
        FormatError: a ``ShardedTensor`` without data, with a ``flattened_range`` (the legacy
            distributed-optimizer format megatron-core >= 0.16 cannot save either), or whose
            data does not have its declared local shape.
    """
    if not isinstance(state, Mapping):
        raise FormatError(f"{what}: expected a sharded state dict (a mapping), got "
                          f"{type(state).__qualname__}")
    snap = ShardedSnapshot()

    def walk(x: Any) -> None:
        if _is_factory(x):
            walk(x.build())
        elif _is_tensor_leaf(x):
            add_tensor(x)
        elif _is_object_leaf(x):
            if _main_replica(x.replica_id):
                data = copy.deepcopy(x.data) if copy_data else x.data
                snap.objects.setdefault(_object_fqn(x), []).append(data)
        elif isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    def add_tensor(t: Any) -> None:
        if not _main_replica(t.replica_id):
            return
        if getattr(t, "flattened_range", None) is not None:
            raise FormatError(f"{what}: {t.key} has a flattened_range (the legacy "
                              "fully_sharded_model_space optimizer format, which megatron-core "
                              ">= 0.16 cannot save either); use dp_reshardable or "
                              "fully_reshardable")
        if not isinstance(t.data, torch.Tensor):
            raise FormatError(f"{what}: {t.key} has no tensor data")
        prepend = int(getattr(t, "prepend_axis_num", 0) or 0)
        data = t.data.detach()
        sizes = (1,) * prepend + tuple(data.shape)
        offsets = tuple(int(o) for o in t.global_offset)
        shape = tuple(int(s) for s in t.global_shape)
        if len(offsets) != len(sizes) or len(shape) != len(sizes):
            raise FormatError(f"{what}: {t.key} has offsets {offsets} and global shape {shape} "
                              f"for a local tensor of {len(sizes)} dims")
        if copy_data:
            data = data.to("cpu", copy=True)
        snap.chunks.append(_Chunk(str(t.key), shape, offsets, data.reshape(sizes)))

    walk(state)
    common = _split_common(state)
    snap.common = copy.deepcopy(common) if copy_data else common
    return snap


@dataclass(frozen=True)
class RankPart:
    """One rank's records and the global shape/dtype of each tensor it wrote chunks of."""

    records: list[DcpRecord]
    globals: dict[str, tuple[tuple[int, ...], torch.dtype]]


def write_sharded_rank(directory: Path, snap: ShardedSnapshot, rank: int) -> RankPart:
    """Append this rank's chunks and objects to ``__<rank>_0.distcp`` and fsync it."""
    globals_: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    data = DcpDataFile(directory, f"__{rank}_0.distcp")
    try:
        for c in snap.chunks:
            prev = globals_.setdefault(c.fqn, (c.global_shape, c.data.dtype))
            if prev != (c.global_shape, c.data.dtype):
                raise FormatError(f"{c.fqn}: shards disagree on global shape or dtype "
                                  f"({prev} vs {(c.global_shape, c.data.dtype)})")
            data.add_tensor(c.fqn, c.offsets, c.data)
        for fqn, objs in snap.objects.items():
            data.add_object(fqn, objs)
        if rank == 0:
            data.add_object(COMMON_OBJECT, [snap.common])
        records = data.close(fsync=True)
    except BaseException:
        data.close(fsync=False)
        raise
    return RankPart(records, globals_)


def finish_sharded(directory: Path, parts: Sequence[RankPart], common: Any) -> None:
    """Rank 0: ``.metadata`` over every rank's records, ``common.pt``, ``metadata.json`` last.

    Raises:
        FormatError: the ranks' main replicas do not tile some tensor exactly (a shard claimed
            by two ranks, or by none), or disagree on its shape.
    """
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for part in parts:
        for fqn, meta in part.globals.items():
            prev = tensors.setdefault(fqn, meta)
            if prev != meta:
                raise FormatError(f"{fqn}: ranks disagree on its global shape or dtype "
                                  f"({prev} vs {meta})")
    try:
        write_metadata(directory, [r for p in parts for r in p.records], tensors)
    except InternalError as e:
        # Coverage is the caller's input here (replica ids and offsets), not our invariant.
        raise FormatError(f"the sharded state dict does not describe one checkpoint: {e}",
                          path=directory) from e
    with open(directory / "common.pt", "wb") as f:
        torch.save(common, f)
        sync_file(f)
    write_synced(directory / "metadata.json", json.dumps(METADATA_JSON))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_common(reader: DcpReader, directory: Path, trust: bool) -> Any:
    if (directory / "common.pt").is_file():
        return load_torch(directory / "common.pt", trust=trust)
    if COMMON_OBJECT in reader.index.blobs:
        obj = reader.read_object(COMMON_OBJECT)
        return obj[0] if isinstance(obj, list) and obj else obj
    return {}


def _load_tensor(reader: DcpReader, t: Any, directory: Path) -> torch.Tensor:
    key = str(t.key)
    stored = reader.index.tensors.get(key)
    if stored is None:
        raise CorruptCheckpointError(f"{key} is not in the checkpoint", path=directory,
                                     tensor=key)
    if getattr(t, "flattened_range", None) is not None:
        raise FormatError(f"{key}: flattened_range shards cannot be loaded (legacy format)")
    prepend = int(getattr(t, "prepend_axis_num", 0) or 0)
    local = tuple(int(s) for s in (t.local_shape if hasattr(t, "local_shape")
                                   else t.data.shape))
    sizes = (1,) * prepend + local
    offsets = tuple(int(o) for o in t.global_offset)
    shape = tuple(int(s) for s in t.global_shape)
    dtype = t.data.dtype if isinstance(t.data, torch.Tensor) else getattr(t, "dtype",
                                                                          stored.dtype.torch)
    if stored.shape != shape:
        if not getattr(t, "allow_shape_mismatch", False) or len(stored.shape) != len(shape):
            raise IncompatibleLayoutError(
                f"{key}: the checkpoint holds global shape {list(stored.shape)}, the model "
                f"asks for {list(shape)}", path=directory)
    # With allow_shape_mismatch (padded vocabularies) only the overlap is read; the rest is 0.
    out = torch.zeros(sizes, dtype=dtype)
    box = [(o, min(o + s, n) - o) for o, s, n in zip(offsets, sizes, stored.shape, strict=True)]
    if all(n > 0 for _, n in box):
        region = reader.read_region(key, [o for o, _ in box], [n for _, n in box])
        target = out
        for d, (_, n) in enumerate(box):
            target = target.narrow(d, 0, n)
        target.copy_(region)
    out = out.reshape(local)
    if isinstance(t.data, torch.Tensor):
        with torch.no_grad():
            t.data.copy_(out)
        return t.data
    return out


def load_sharded(directory: Path, request: Mapping[str, Any], *,
                 trust_pickles: bool = False) -> dict[str, Any]:
    """The state dict ``request`` describes, read from the torch_dist directory ``directory``.

    Like megatron-core's ``dist_checkpointing.load``: sharded tensors are read at the
    requester's layout (tensors with data are filled in place and returned), objects come back
    as stored, factories are merged, non-persistent objects unwrapped, and every other value
    comes from the stored common state.
    """
    reader = DcpReader(directory, trust=trust_pickles)
    try:
        common = _read_common(reader, directory, trust_pickles)
        seen: dict[str, int] = {}

        def load(x: Any, stored: Any) -> Any:
            if _is_factory(x):
                return x.merge_fn(load(x.build(), _MISSING))
            if _is_tensor_leaf(x):
                return _load_tensor(reader, x, directory)
            if _is_object_leaf(x):
                fqn = _object_fqn(x)
                if fqn not in reader.index.blobs:
                    raise CorruptCheckpointError(f"object {fqn} is not in the checkpoint",
                                                 path=directory)
                objs = reader.read_object(fqn)
                i = seen.get(fqn, 0)
                seen[fqn] = i + 1
                return objs[i] if isinstance(objs, list) and len(objs) > i else objs
            if _is_nonpersistent(x):
                return x.unwrap()
            if isinstance(x, Mapping):
                base = dict(stored) if isinstance(stored, Mapping) else {}
                for k, v in x.items():
                    base[k] = load(v, stored.get(k, _MISSING) if isinstance(stored, Mapping)
                                   else _MISSING)
                return base
            if isinstance(x, list):
                same = isinstance(stored, list) and len(stored) == len(x)
                return [load(v, stored[i] if same else _MISSING) for i, v in enumerate(x)]
            return x if stored is _MISSING else stored

        return load(request, common)
    finally:
        reader.close()


def is_common_only(request: Mapping[str, Any]) -> bool:
    """Whether ``request`` holds no sharded leaf (then the stored common state is returned)."""
    return not is_sharded_state_dict(request)

