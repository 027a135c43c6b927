"""Plain-data mirrors of the DTensor classes a ``torch.save`` of an FSDP model pickles.

FSDP2 (and FSDP1 given a device mesh) saves each sharded parameter as a DTensor: the pickle
rebuilds it with ``_rebuild_from_type_v2(_rebuild_wrapper_subclass, DTensor, args, state)``,
whose state holds this rank's ``_local_tensor`` and a ``DTensorSpec`` (device mesh, placements,
tensor meta). Unpickling the real classes would import ``torch.distributed.tensor`` and build
a ``DeviceMesh`` (which wants process groups); nothing of that is needed to read the bytes. So
the allow-list maps exactly these names (torch 2.13 spellings, see
/work/shared/reference/fsdp-dcp-formats.md §2.2, §2.4) onto the attribute bags below:

* ``torch.distributed.tensor.DTensor`` -> :class:`DTensorRecord` (global shape and stride,
  dtype, the local tensor, the spec); only ever built by the wrapper-subclass rebuild.
* ``DTensorSpec``, ``DeviceMesh``, ``_MeshLayout``, ``_FlatLayout``, ``Shard``, ``Replicate``,
  ``_StridedShard``, ``Partial``: created empty (``NEWOBJ`` with no arguments), then given
  their pickled ``__dict__`` (``BUILD``), like DCP's metadata mirrors (:mod:`ckpt_ir.dcp_types`).
* ``TensorMeta`` and ``ShardOrderEntry`` (named tuples, ``NEWOBJ`` with arguments): tuples
  whose fields are checked.

Part of :mod:`ckpt_ir.safety.unpickler`; its docstring states the trust model. Nothing here
interprets the state: :mod:`ckpt_ir.converters.verl_fsdp` does, and checks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

__all__ = ["DTENSOR_CLASSES", "DTENSOR_TUPLES", "DTensorRecord", "DTensorSpec", "DeviceMesh",
           "Partial", "Replicate", "Shard", "ShardOrderEntry", "StridedShard", "TensorMeta"]


class _Bag:
    """An attribute bag: the pickled ``__dict__`` of one object, nothing else."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class DTensorSpec(_Bag):
    """``mesh``, ``placements``, ``tensor_meta`` (+ ``shard_order`` in recent torch)."""


class DeviceMesh(_Bag):
    """``_mesh_dim_names``, ``_layout`` (torch >= 2.10: axis shapes) or ``mesh`` (older:
    the rank tensor), ``_rank``, ``_coordinate_on_dim``, ..."""


class MeshLayout(_Bag):
    """``axes``: one :class:`FlatLayout` per mesh dimension (torch 2.13's ``_MeshLayout``)."""


class FlatLayout(_Bag):
    """``shape`` and ``stride`` of one mesh axis (torch 2.13's ``_FlatLayout``)."""


class Shard(_Bag):
    """``dim``: the tensor dimension cut along this mesh dimension (``torch.chunk`` rule)."""


class Replicate(_Bag):
    """A whole copy along this mesh dimension (HSDP's replica axis)."""


class StridedShard(_Bag):
    """``dim``, ``split_factor``: a strided cut (FSDP over TP); read as unsupported."""


class Partial(_Bag):
    """``reduce_op``: pending reduction, not data; read as unsupported."""


class TensorMeta(NamedTuple):
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


class ShardOrderEntry(NamedTuple):
    tensor_dim: int
    mesh_dims: tuple[int, ...]


class DTensorRecord:
    """One pickled DTensor, as data: its global ``shape`` / ``stride`` / ``dtype`` from the
    wrapper arguments, this rank's ``local`` tensor and the ``spec``."""

    def __init__(self, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype,
                 local: torch.Tensor, spec: DTensorSpec) -> None:
        self.shape = shape
        self.stride = stride
        self.dtype = dtype
        self.local = local
        self.spec = spec

    def __repr__(self) -> str:
        return (f"DTensorRecord(shape={self.shape}, dtype={self.dtype}, "
                f"local={tuple(self.local.shape)})")


_D = "torch.distributed"
DTENSOR_CLASSES: dict[type, tuple[str, str]] = {
    DTensorSpec: (f"{_D}.tensor._dtensor_spec", "DTensorSpec"),
    DeviceMesh: (f"{_D}.device_mesh", "DeviceMesh"),
    MeshLayout: (f"{_D}._mesh_layout", "_MeshLayout"),
    FlatLayout: (f"{_D}._mesh_layout", "_FlatLayout"),
    Shard: (f"{_D}.tensor.placement_types", "Shard"),
    Replicate: (f"{_D}.tensor.placement_types", "Replicate"),
    StridedShard: (f"{_D}.tensor.placement_types", "_StridedShard"),
    Partial: (f"{_D}.tensor.placement_types", "Partial"),
}
"""Attribute-bag mirrors: ``NEWOBJ()`` then ``BUILD(dict)``."""

DTENSOR_TUPLES: dict[type, tuple[str, str]] = {
    TensorMeta: (f"{_D}.tensor._dtensor_spec", "TensorMeta"),
    ShardOrderEntry: (f"{_D}.tensor._dtensor_spec", "ShardOrderEntry"),
}
"""Named-tuple mirrors: ``NEWOBJ(args)``."""

DTENSOR_TYPE = (f"{_D}.tensor", "DTensor")
"""The wrapper subclass itself; only a rebuild argument, never instantiated."""


def make_tuple(cls: type, args: tuple[Any, ...]) -> Any:
    """A :data:`DTENSOR_TUPLES` instance from ``NEWOBJ`` arguments, checked field by field."""
    if cls is TensorMeta:
        import torch

        if (len(args) != 3 or not isinstance(args[0], tuple) or not isinstance(args[1], tuple)
                or not isinstance(args[2], torch.dtype)
                or not all(type(v) is int for v in (*args[0], *args[1]))):
            raise ValueError("invalid TensorMeta")
        return TensorMeta(tuple(args[0]), tuple(args[1]), args[2])
    if (len(args) != 2 or type(args[0]) is not int or not isinstance(args[1], tuple)
            or not all(type(v) is int for v in args[1])):
        raise ValueError("invalid ShardOrderEntry")
    return ShardOrderEntry(args[0], tuple(args[1]))
