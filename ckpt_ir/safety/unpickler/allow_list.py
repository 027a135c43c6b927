"""The allow-list: which globals a pickle may name, and the safe re-implementation each
resolves to; the bounds on what a loaded object graph may cost its consumers.

Part of :mod:`ckpt_ir.safety.unpickler`; its docstring states the trust model."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import math
import pathlib
import pickle
import sys
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import TYPE_CHECKING, Any

from ckpt_ir import dcp_types, dtypes
from ckpt_ir.safety.unpickler import dtensor, records, sharded_tensor
from ckpt_ir.safety.unpickler.stand_ins import StandIn, _StandInMeta

if TYPE_CHECKING:
    import torch

# torch is imported by the rules that build torch objects (tensors, storages, torch.Size...),
# when a pickle names one, never by importing this module: `ckpt-ir inspect` of a DCP
# directory reads its .metadata in metadata mode (:func:`_metadata_table`) without torch.

_MAX_TENSOR_DIMS = 64
# Nesting deeper than this is refused: CPython hashes, compares and prints nested containers by
# recursion in C, so a 1 MB pickle of a 1,000,000-deep tuple used as a dict key overflows the C
# stack (a segfault, not an exception). Real checkpoints nest a few levels (state dicts of
# optimizer states of lists); 200 leaves Python-level consumers far from the recursion limit.
MAX_NESTING = 200
# A dict key or set element is hashed (and compared) by walking it: at most this many nodes.
# Shared references make a 60-level tuple of pairs a 2**60-node tree to hash.
_MAX_KEY_NODES = 10_000
# Shared references may make the loaded object graph larger, as a tree, than the pickle; more
# than this many nodes per pickle byte (or the floor) means a reference bomb (anything that
# walks or prints the result without a memo would never finish).
_TREE_NODES_PER_BYTE = 16
_MIN_TREE_NODES = 1 << 20


class _Refused(pickle.UnpicklingError):
    """An allowed name used in a way the allow-list does not admit (becomes Unsafe...Error)."""


class _NeedsTorch(Exception):
    """Metadata mode met a torch global outside its torch-free rules: the loader redoes the
    whole load in the default mode, so such a pickle gets exactly the default's checks."""


@dataclass(frozen=True, slots=True)
class _Rule:
    """What an allowed global may do once it is on the pickle stack."""

    obj: Any
    call: Callable[..., Any] | None = None  # REDUCE/INST/OBJ run this instead of obj(*args)
    new: Callable[[], Any] | None = None  # NEWOBJ with no arguments runs this
    new_args: Callable[..., Any] | None = None  # NEWOBJ with arguments runs this (checks them)


def _function(safe: Callable[..., Any]) -> _Rule:
    """An allowed *function* resolves to its safe re-implementation, never to the original:
    a loaded object that holds it (or a planted ``__deepcopy__``) cannot reach the real one."""
    return _Rule(safe, call=safe)


def _argc(name: str, args: tuple[Any, ...], low: int, high: int) -> None:
    if not low <= len(args) <= high:
        raise pickle.UnpicklingError(f"{name} called with {len(args)} argument(s)")


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise pickle.UnpicklingError(what)


def _is_int(x: Any) -> bool:
    return type(x) is int


def _int_tuple(x: Any, what: str) -> tuple[int, ...]:
    _check(isinstance(x, (tuple, list)) and all(_is_int(v) and v >= 0 for v in x),
           f"{what} must be a sequence of non-negative ints")
    _check(len(x) <= _MAX_TENSOR_DIMS, f"{what} has too many dimensions")
    return tuple(x)


def _iterable_call(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        _argc(name, args, 0, 1)
        if args:
            _check(isinstance(args[0], (list, tuple, set, frozenset, dict)),
                   f"{name} needs a container argument")
            if fn in (set, frozenset):
                _check_keys(args[0])
            elif fn in (dict, OrderedDict) and not isinstance(args[0], dict):
                _check_keys(pair[0] for pair in args[0] if type(pair) in (list, tuple) and pair)
        return fn(*args)

    return call


def _safe_bytearray(*args: Any) -> bytearray:
    # bytearray(n) would allocate n bytes chosen by the file: only copies of data are allowed.
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if (len(args) == 2 and isinstance(args[0], str)
            and args[1] in ("latin-1", "latin1")):
        return bytearray(args[0], "latin-1")
    raise pickle.UnpicklingError("bytearray called with unsupported arguments")


def _safe_codecs_encode(*args: Any) -> bytes:
    # Protocol 2 writes bytes as _codecs.encode(str, 'latin1').
    _check(len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"),
           "_codecs.encode called with unsupported arguments")
    return args[0].encode("latin-1")


def _safe_slice(*args: Any) -> slice:
    _argc("slice", args, 1, 3)
    _check(all(a is None or _is_int(a) for a in args), "slice needs ints")
    return slice(*args)


def _safe_complex(*args: Any) -> complex:
    _argc("complex", args, 0, 2)
    _check(all(type(a) in (int, float) for a in args), "complex needs numbers")
    return complex(*args)


_FACTORIES: tuple[Any, ...] = (None, list, dict, set, frozenset, tuple, int, float, str, bytes,
                               bool, OrderedDict)


def _safe_defaultdict(*args: Any) -> defaultdict[Any, Any]:
    _argc("defaultdict", args, 0, 2)
    factory = args[0] if args else None
    # The factory runs later, on a missing key: only builtin constructors are acceptable.
    _check(any(factory is f for f in _FACTORIES), "defaultdict factory is not allowed")
    result: defaultdict[Any, Any] = defaultdict(factory)
    if len(args) == 2:
        _check(isinstance(args[1], (dict, list, tuple)), "defaultdict needs a container")
        if not isinstance(args[1], dict):
            _check_keys(pair[0] for pair in args[1] if type(pair) in (list, tuple) and pair)
        result.update(args[1])
    return result


def _safe_size(*args: Any) -> torch.Size:
    import torch

    _argc("torch.Size", args, 0, 1)
    return torch.Size(_int_tuple(args[0], "torch.Size") if args else ())


def _safe_device(*args: Any) -> torch.device:
    import torch

    _argc("torch.device", args, 1, 2)
    _check(isinstance(args[0], str) and (len(args) == 1 or _is_int(args[1])),
           "torch.device needs (str[, int])")
    return torch.device(*args)


@cache
def _layouts() -> dict[str, torch.layout]:
    import torch

    return {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


def _safe_get_layout(*args: Any) -> torch.layout:
    _check(len(args) == 1 and isinstance(args[0], str) and args[0] in _layouts(),
           "unknown torch layout")
    return _layouts()[args[0]]


def _enum_call(cls: type[Enum]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        # Exactly one value: more arguments would hit Enum's functional API.
        _argc(cls.__name__, args, 1, 1)
        _check_key(args[0])  # looked up by hash among the members' values
        return cls(args[0])

    return call


def _safe_namespace(*args: Any) -> argparse.Namespace:
    _argc("argparse.Namespace", args, 0, 0)
    return argparse.Namespace()


def _safe_bytesio(*args: Any) -> io.BytesIO:
    _argc("io.BytesIO", args, 0, 1)
    _check(not args or isinstance(args[0], (bytes, bytearray)), "BytesIO needs bytes")
    return io.BytesIO(*args)


def _pure_path(cls: type[pathlib.PurePath]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        # torch's FileSystemWriter stores checkpoint_id as a Path in StorageMeta. A pure path
        # is built from strings and has no methods that touch the filesystem.
        _check(all(isinstance(a, str) for a in args), "path parts must be strings")
        return cls(*args)

    return call


def _safe_reconstructor(*args: Any) -> Any:
    # copyreg._reconstructor(cls, object, None) is how protocols 0/1 write a plain instance.
    _check(len(args) == 3 and args[1] is object and args[2] is None,
           "copyreg._reconstructor only admits (cls, object, None)")
    cls = args[0]
    if isinstance(cls, _StandInMeta):
        return cls()
    rule = _rule_for(cls)
    if rule is None or rule.new is None:
        raise _Refused(f"refusing to reconstruct {_describe(cls)}: not on the allow-list")
    return rule.new()


def _check_key(key: Any) -> None:
    """Refuse a dict key / set element whose hash or equality would recurse without bound.

    Walks what ``hash`` walks (tuples, frozensets, the fields of frozen dataclasses) as a tree,
    without a memo on purpose: shared references cost ``hash`` every repetition too.
    """
    if type(key) in (str, int, bytes, float, bool, type(None)):
        return
    todo = [(key, 1)]
    nodes = 0
    while todo:
        obj, depth = todo.pop()
        nodes += 1
        if nodes > _MAX_KEY_NODES or depth > MAX_NESTING:
            raise pickle.UnpicklingError(
                f"a dict key or set element is nested more than {MAX_NESTING} levels deep or "
                f"has more than {_MAX_KEY_NODES} parts")
        if type(obj) in (tuple, frozenset):
            todo.extend((item, depth + 1) for item in obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            todo.extend((item, depth + 1) for item in vars(obj).values())


def _check_keys(keys: Any) -> None:
    for key in keys:
        _check_key(key)


_BASE_LEAVES = (str, int, float, bool, bytes, bytearray, complex, type(None), type,
                dtypes.DType, records.StorageClass, records.StorageRecord)


def _leaves() -> tuple[type, ...]:
    torch = sys.modules.get("torch")
    if torch is None:
        return _BASE_LEAVES
    return (*_BASE_LEAVES, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _tensor_type() -> tuple[type, ...]:
    # Tensors and metadata mode's tensor records (one load has one kind or the other).
    torch = sys.modules.get("torch")
    return (records.TensorRecord,) if torch is None else (records.TensorRecord, torch.Tensor)


def _children(obj: Any, leaves: tuple[type, ...]
              ) -> list[Any] | tuple[Any, ...] | None:
    """What a consumer walking ``obj`` reaches next; None for leaves."""
    cls = type(obj)
    if cls in (list, tuple, set, frozenset):
        return obj
    if isinstance(obj, dict):
        attrs = getattr(obj, "__dict__", None)  # OrderedDict state (a state dict's _metadata)
        return [*obj.keys(), *obj.values(), *(attrs.values() if type(attrs) is dict else ())]
    if isinstance(obj, StandIn):
        return (obj.args, obj.kwargs, obj.state)
    if isinstance(obj, leaves) or isinstance(obj, _StandInMeta):
        return None
    state = getattr(obj, "__dict__", None)
    if type(state) is dict and state:
        return list(state.values())
    return None


def _check_graph(root: Any, nbytes: int) -> list[torch.Tensor]:
    """Bound what a loaded object graph can cost its consumers; return its tensors.

    Nesting depth at most :data:`MAX_NESTING`, no reference cycles, and the graph expanded as a
    tree (what ``repr``, ``==``, ``copy.deepcopy`` or a recursive walk visit) at most
    ``_TREE_NODES_PER_BYTE`` nodes per pickle byte. Iterative, with a memo: linear in the graph.
    """
    budget = max(_MIN_TREE_NODES, _TREE_NODES_PER_BYTE * nbytes)
    tensor_type = _tensor_type()
    leaves = _leaves()
    tensors: list[torch.Tensor] = []
    done: dict[int, tuple[int, int]] = {}  # id -> (depth, tree size); all alive via root
    on_path: set[int] = set()
    frames: list[list[Any]] = []  # [obj, iterator over children, max child depth, tree size]

    def enter(obj: Any, kids: Any) -> None:
        if len(frames) >= MAX_NESTING:
            raise pickle.UnpicklingError(f"objects are nested more than {MAX_NESTING} levels "
                                         f"deep")
        if isinstance(obj, tensor_type):
            tensors.append(obj)
        frames.append([obj, iter(kids), 0, 1])
        on_path.add(id(obj))

    kids = _children(root, leaves)
    if isinstance(root, tensor_type):
        tensors.append(root)
    if kids is None:
        return tensors
    enter(root, kids)
    while frames:
        frame = frames[-1]
        for child in frame[1]:
            known = done.get(id(child))
            if known is None:
                if isinstance(child, tensor_type) and not getattr(child, "__dict__", None):
                    tensors.append(child)
                    done[id(child)] = (0, 1)
                    known = (0, 1)
                else:
                    grandchildren = _children(child, leaves)
                    if grandchildren is None:
                        frame[3] += 1
                        continue
                    if id(child) in on_path:
                        raise pickle.UnpicklingError("objects refer to themselves (a cycle)")
                    enter(child, grandchildren)
                    break
            frame[2] = max(frame[2], known[0])
            frame[3] += known[1]
            if frame[3] > budget:
                raise pickle.UnpicklingError(
                    f"shared references expand to more than {budget} objects")
        else:
            obj, _, depth, size = frames.pop()
            on_path.discard(id(obj))
            done[id(obj)] = (depth + 1, size)
            if frames:
                parent = frames[-1]
                parent[2] = max(parent[2], depth + 1)
                parent[3] += size
                if parent[3] > budget:
                    raise pickle.UnpicklingError(
                        f"shared references expand to more than {budget} objects")
    return tensors


def _view_extent(t: torch.Tensor) -> int:
    """Elements from a view's first to one past its last, in its storage."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))


def _check_disjoint_views(tensors: list[Any]) -> None:
    """Distinct tensors may not share bytes unless they are the same view (tied weights).

    Byte ranges are absolute addresses in the mapped file, so records that a crafted zip
    directory makes overlap are caught too. Each view is already non-self-overlapping
    (:func:`_make_tensor`), so the bytes a checkpoint declares are backed by distinct bytes.
    """
    spans = []
    for t in tensors:
        if t.numel() == 0:
            continue
        start = t.start() if isinstance(t, records.TensorRecord) else \
            t.untyped_storage().data_ptr() + t.storage_offset() * t.dtype.itemsize
        spans.append((start, start + _view_extent(t) * t.dtype.itemsize,
                      (t.dtype, tuple(t.shape), t.stride())))
    spans.sort(key=lambda s: (s[0], s[1]))
    reach: tuple[int, int, Any] | None = None
    for span in spans:
        if reach is not None and span[0] < reach[1] and span != reach:
            raise pickle.UnpicklingError(
                f"two tensors share storage bytes without being the same view ("
                f"{reach[2][1]} and {span[2][1]})")
        if reach is None or span[1] > reach[1]:
            reach = span


# ---- tensors ------------------------------------------------------------------------------


def _make_tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any,
                 requires_grad: Any, metadata: Any) -> torch.Tensor:
    """Bounds-checked stand-in for torch._utils._rebuild_tensor: a view, never a copy."""
    import torch

    _check(type(storage) is torch.storage.TypedStorage,
           "tensor rebuilt from something that is not a storage")
    _check(isinstance(dtype, torch.dtype), "tensor dtype is not a torch.dtype")
    untyped = storage._untyped_storage
    size, stride = _check_view(offset, size, stride, requires_grad, dtype, untyped.nbytes())
    tensor = torch.empty((0,), dtype=dtype).set_(untyped, offset, size, stride)
    if requires_grad:
        tensor.requires_grad_(True)
    if metadata:
        _check_tensor_metadata(metadata)
        torch._utils.set_tensor_metadata(tensor, metadata)
    # backward_hooks are ignored on purpose: torch never saves real hooks, and installing
    # objects from a file as hooks would let them run during backward.
    return tensor


def _check_view(offset: Any, size: Any, stride: Any, requires_grad: Any, dtype: Any,
                nbytes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The checks of a tensor view over a storage of ``nbytes`` bytes (torch tensors and
    metadata-mode :class:`~ckpt_ir.safety.unpickler.records.TensorRecord` alike)."""
    _check(_is_int(offset) and offset >= 0, "tensor storage offset is invalid")
    size = _int_tuple(size, "tensor size")
    stride = _int_tuple(stride, "tensor stride")
    _check(len(size) == len(stride), "tensor size and stride differ in length")
    _check(type(requires_grad) is bool, "requires_grad is not a bool")
    itemsize = dtype.itemsize
    _check(itemsize > 0, f"unsupported dtype {dtype}")
    capacity = nbytes // itemsize
    if math.prod(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        _check(last < capacity, "tensor view reaches past the end of its storage")
        # No element addressed twice (stride 0, or strides shorter than the inner extent):
        # otherwise a 2-byte storage can declare a 4 GiB tensor that a writer then produces.
        reach = 1
        for n, s in sorted(((n, s) for n, s in zip(size, stride, strict=True) if n > 1),
                           key=lambda d: d[1]):
            _check(s >= reach, f"tensor of size {size} with strides {stride} addresses some "
                               f"of its storage's elements more than once")
            reach = s * n
    else:
        _check(offset <= capacity, "tensor storage offset is past the end of its storage")
    return size, stride


def _check_tensor_metadata(metadata: Any) -> None:
    # torch only ever writes the conj/neg bits here.
    _check(isinstance(metadata, dict) and set(metadata) <= {"conj", "neg"}
           and all(type(v) is bool for v in metadata.values()),
           "unsupported tensor metadata")


def _v2_arguments(args: tuple[Any, ...], storage_type: type) -> tuple[Any, ...]:
    """``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])``
    as ``_make_tensor`` / ``_make_record`` take them: the dtype is the storage's."""
    _argc("_rebuild_tensor_v2", args, 6, 7)
    storage = args[0]
    _check(type(storage) is storage_type, "tensor rebuilt without a storage")
    metadata = args[6] if len(args) == 7 else None
    return storage, args[1], args[2], args[3], storage.dtype, args[4], metadata


def _v3_arguments(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[,
    metadata])``: v3 carries the dtype itself (dtypes without a legacy storage class: uint16,
    float8...)."""
    _argc("_rebuild_tensor_v3", args, 7, 8)
    metadata = args[7] if len(args) == 8 else None
    return args[0], args[1], args[2], args[3], args[6], args[4], metadata


def _rebuild_tensor_v2(*args: Any) -> torch.Tensor:
    import torch

    return _make_tensor(*_v2_arguments(args, torch.storage.TypedStorage))


def _rebuild_tensor_v3(*args: Any) -> torch.Tensor:
    return _make_tensor(*_v3_arguments(args))


def _set_safe_state(obj: torch.Tensor, state: Any) -> None:
    """Python attributes on a tensor (Megatron tags params); never shadows a Tensor attribute."""
    import torch

    if isinstance(state, tuple):
        _check(len(state) == 2, "invalid tensor state")
        parts = state
    else:
        parts = (state, None)
    for part in parts:
        if not part:
            continue
        _check(isinstance(part, dict), "tensor state is not a dict")
        for key, value in part.items():
            if (not isinstance(key, str) or not key.isidentifier() or key.startswith("_")
                    or hasattr(torch.Tensor, key) or hasattr(torch.nn.Parameter, key)):
                raise _Refused(f"refusing to set attribute {key!r} on a tensor")
            obj.__dict__[key] = value


def _rebuild_parameter(*args: Any) -> torch.nn.Parameter:
    import torch

    _argc("_rebuild_parameter", args, 3, 3)
    _check(isinstance(args[0], torch.Tensor) and type(args[1]) is bool, "invalid parameter")
    return torch.nn.Parameter(args[0], args[1])


def _rebuild_parameter_with_state(*args: Any) -> torch.nn.Parameter:
    _argc("_rebuild_parameter_with_state", args, 4, 4)
    param = _rebuild_parameter(*args[:3])
    _set_safe_state(param, args[3])
    return param


_TENSOR_REBUILDERS: dict[str, Callable[..., Any]] = {
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
}


def _rebuild_wrapper_subclass(*args: Any) -> Any:
    # Only meaningful inside _rebuild_from_type_v2 (a DTensor), where it is never called.
    raise pickle.UnpicklingError("_rebuild_wrapper_subclass outside _rebuild_from_type_v2")


def _rebuild_dtensor(func_args: Any, state: Any) -> dtensor.DTensorRecord:
    """A pickled DTensor as data: wrapper arguments ``(DTensor, dtype, size, stride,
    storage_offset, layout, device, requires_grad)`` and state ``(None, {"_local_tensor",
    "_spec"})`` (torch 2.13, fsdp-dcp-formats.md §2.2)."""
    import torch

    _check(isinstance(func_args, tuple) and len(func_args) == 8
           and func_args[0] is dtensor.DTensorRecord, "invalid DTensor wrapper arguments")
    _, dtype, size, stride, _offset, _layout, _device, _grad = func_args
    _check(isinstance(dtype, torch.dtype), "DTensor dtype is not a torch.dtype")
    size = _int_tuple(size, "DTensor size")
    stride = _int_tuple(stride, "DTensor stride")
    _check(len(size) == len(stride), "DTensor size and stride differ in length")
    if isinstance(state, tuple):
        _check(len(state) == 2 and state[0] in (None, {}), "invalid DTensor state")
        state = state[1]
    _check(isinstance(state, dict) and set(state) == {"_local_tensor", "_spec"},
           "DTensor state must hold exactly _local_tensor and _spec")
    local, spec = state["_local_tensor"], state["_spec"]
    _check(type(local) is torch.Tensor, "DTensor _local_tensor is not a plain tensor")
    _check(type(spec) is dtensor.DTensorSpec, "DTensor _spec is not a DTensorSpec")
    _check(local.dtype == dtype, "DTensor local tensor dtype differs from its global dtype")
    return dtensor.DTensorRecord(size, stride, dtype, local, spec)


def _rebuild_from_type_v2(*args: Any) -> Any:
    # How torch saves a tensor that carries Python attributes: (func, type, args, state).
    import torch

    _argc("_rebuild_from_type_v2", args, 4, 4)
    func, new_type, func_args, state = args
    rule = _rule_for(func)
    if rule is not None and rule.call is _rebuild_wrapper_subclass:
        if new_type is sharded_tensor.ShardedTensorRecord:
            return sharded_tensor.rebuild(func_args, state)
        _check(new_type is dtensor.DTensorRecord,
               "_rebuild_wrapper_subclass for a type other than DTensor")
        return _rebuild_dtensor(func_args, state)
    if rule is None or rule.call is None or rule.call not in _TENSOR_REBUILDERS.values():
        raise pickle.UnpicklingError(
            "_rebuild_from_type_v2 with a function that is not a tensor rebuilder")
    _check(new_type is torch.Tensor or new_type is torch.nn.Parameter,
           "_rebuild_from_type_v2 with an unsupported tensor type")
    _check(isinstance(func_args, tuple), "_rebuild_from_type_v2 arguments are not a tuple")
    result = rule.call(*func_args)
    if type(result) is not new_type:
        result = result.as_subclass(new_type)
    _set_safe_state(result, state)
    return result


def _safe_getattr(*args: Any) -> Any:
    # Protocol 2 pickles a nested class as getattr(outer, name); the one a checkpoint needs is
    # FSDP1's ShardedTensor.ProcessGroupState. Any other getattr could reach anything.
    if len(args) == 2 and args[0] is sharded_tensor.ShardedTensorRecord \
            and type(args[1]) is str and args[1] == "ProcessGroupState":
        return sharded_tensor.ProcessGroupState
    what = ", ".join(_describe(a) if not isinstance(a, str) else repr(a[:60]) for a in args)
    raise _Refused(f"refusing getattr({what}): only getattr(ShardedTensor, "
                   f"'ProcessGroupState') is admitted")


# ---- numpy --------------------------------------------------------------------------------


def _numpy_rules() -> dict[tuple[str, str], _Rule]:
    import numpy as np

    # numpy 2 moved numpy.core to numpy._core; pickles name either, both map to the same objects.
    core = importlib.import_module("numpy._core" if hasattr(np, "_core") else "numpy.core")
    multiarray = importlib.import_module(f"{core.__name__}.multiarray")

    def reconstruct(*args: Any) -> Any:
        # numpy pickles arrays as _reconstruct(ndarray, (0,), b'b') + BUILD(state); the shape
        # argument would allocate, so only empty ones are admitted.
        _check(len(args) == 3 and args[0] is np.ndarray
               and math.prod(_int_tuple(args[1], "array shape")) == 0
               and isinstance(args[2], (bytes, str)), "unsupported numpy _reconstruct call")
        return multiarray._reconstruct(*args)

    def dtype(*args: Any) -> Any:
        _argc("numpy.dtype", args, 1, 3)
        _check(isinstance(args[0], (str, np.dtype))
               and all(type(a) is bool for a in args[1:]), "unsupported numpy.dtype call")
        return np.dtype(*args)

    def scalar(*args: Any) -> Any:
        _argc("numpy scalar", args, 1, 2)
        _check(isinstance(args[0], np.dtype), "numpy scalar needs a dtype")
        _check(args[0].hasobject or len(args) == 1 or isinstance(args[1], bytes),
               "numpy scalar needs bytes")
        return multiarray.scalar(*args)

    def frombuffer(*args: Any) -> Any:
        # Protocol 5 writes arrays as _frombuffer(buffer, dtype, shape, order): a view of data
        # that is already in memory.
        _check(len(args) == 4 and isinstance(args[0], (bytes, bytearray, memoryview))
               and isinstance(args[1], np.dtype) and not args[1].hasobject
               and args[3] in ("C", "F"), "unsupported numpy _frombuffer call")
        shape = _int_tuple(args[2], "array shape")
        return np.frombuffer(args[0], dtype=args[1]).reshape(shape, order=args[3])

    rules: dict[tuple[str, str], _Rule] = {
        ("numpy", "ndarray"): _Rule(np.ndarray),
        ("numpy", "dtype"): _Rule(np.dtype, call=dtype),
    }
    for spelling in ("numpy.core", "numpy._core"):
        rules[(f"{spelling}.multiarray", "_reconstruct")] = _function(reconstruct)
        rules[(f"{spelling}.multiarray", "scalar")] = _function(scalar)
        rules[(f"{spelling}.numeric", "_frombuffer")] = _function(frombuffer)
    dtypes = importlib.import_module("numpy.dtypes")
    for name in dir(dtypes):
        value = getattr(dtypes, name)
        if name.endswith("DType") and isinstance(value, type):
            rules[("numpy.dtypes", name)] = _Rule(value)  # referenced (pickled dtype types)
    return rules


# ---- the table ----------------------------------------------------------------------------


def _storage_dtypes() -> dict[type, torch.dtype]:
    """Legacy storage classes (``torch.FloatStorage``...) as torch's pickler names them."""
    import torch

    quantized = {torch.quint8, torch.qint8, torch.qint32, torch.quint4x2, torch.quint2x4}
    result: dict[type, torch.dtype] = {torch.storage.UntypedStorage: torch.uint8}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation noise
        for value in vars(torch).values():
            if (isinstance(value, type) and issubclass(value, torch.storage._LegacyStorage)
                    and value is not torch.storage._LegacyStorage):
                dtype = value.dtype
                # Quantized storages need qtensor rebuilding, which is not admitted.
                if isinstance(dtype, torch.dtype) and dtype not in quantized:
                    result[value] = dtype
    return result


def _plain(cls: type) -> _Rule:
    return _Rule(cls, new=lambda: object.__new__(cls))


@cache
def _base_table() -> dict[tuple[str, str], _Rule]:
    """The rules that need no torch: containers, scalars, paths, the plain-data mirrors of
    DCP's, DTensor's and ShardedTensor's classes, Megatron's DCP subclasses."""
    plain = _plain
    rules: dict[tuple[str, str], _Rule] = {
        ("builtins", "dict"): _Rule(dict, call=_iterable_call(dict, "dict")),
        ("builtins", "list"): _Rule(list, call=_iterable_call(list, "list")),
        ("builtins", "tuple"): _Rule(tuple, call=_iterable_call(tuple, "tuple")),
        ("builtins", "set"): _Rule(set, call=_iterable_call(set, "set")),
        ("builtins", "frozenset"): _Rule(frozenset, call=_iterable_call(frozenset, "frozenset")),
        ("builtins", "bytearray"): _Rule(bytearray, call=_safe_bytearray),
        ("builtins", "slice"): _Rule(slice, call=_safe_slice),
        ("builtins", "complex"): _Rule(complex, call=_safe_complex),
        ("_codecs", "encode"): _function(_safe_codecs_encode),
        ("collections", "OrderedDict"): _Rule(OrderedDict,
                                              call=_iterable_call(OrderedDict, "OrderedDict")),
        ("collections", "defaultdict"): _Rule(defaultdict, call=_safe_defaultdict),
        ("copyreg", "_reconstructor"): _function(_safe_reconstructor),
        ("argparse", "Namespace"): _Rule(argparse.Namespace, call=_safe_namespace,
                                         new=argparse.Namespace),
        ("_io", "BytesIO"): _Rule(io.BytesIO, call=_safe_bytesio, new=io.BytesIO),
        ("pathlib", "PosixPath"): _Rule(pathlib.PosixPath,
                                        call=_pure_path(pathlib.PurePosixPath)),
        ("pathlib", "PurePosixPath"): _Rule(pathlib.PurePosixPath,
                                            call=_pure_path(pathlib.PurePosixPath)),
        ("pathlib", "WindowsPath"): _Rule(pathlib.WindowsPath,
                                          call=_pure_path(pathlib.PureWindowsPath)),
        ("pathlib", "PureWindowsPath"): _Rule(pathlib.PureWindowsPath,
                                              call=_pure_path(pathlib.PureWindowsPath)),
    }
    # Scalars and `object` are referenced (defaultdict factories, _reconstructor base), never
    # called: int(<huge str>) or bytes(<int>) would only cost time and memory.
    for ref in (int, float, str, bytes, bool, object):
        rules[("builtins", ref.__name__)] = _Rule(ref)
    # FSDP's DTensors (verl-fsdp), as plain-data mirrors: ckpt_ir.safety.unpickler.dtensor.
    rules[dtensor.DTENSOR_TYPE] = _Rule(dtensor.DTensorRecord)
    for cls, (module, name) in dtensor.DTENSOR_CLASSES.items():
        rules[(module, name)] = plain(cls)
    for cls, (module, name) in dtensor.DTENSOR_TUPLES.items():
        rules[(module, name)] = _Rule(cls, new_args=lambda *a, c=cls: dtensor.make_tuple(c, a))
    # FSDP1's ShardedTensors (verl-fsdp without a device mesh), as plain-data mirrors:
    # ckpt_ir.safety.unpickler.sharded_tensor.
    rules[sharded_tensor.SHARDED_TENSOR_TYPE] = _Rule(sharded_tensor.ShardedTensorRecord)
    for cls, (module, name) in sharded_tensor.CLASSES.items():
        rules[(module, name)] = plain(cls)
    rules[sharded_tensor.MEM_FORMAT] = _Rule(sharded_tensor.MemFormatEncoding,
                                             call=_enum_call(sharded_tensor.MemFormatEncoding))
    rules[("builtins", "getattr")] = _function(_safe_getattr)
    # torch.distributed.checkpoint's metadata classes, read as ckpt-ir's mirrors of them
    # (importing DCP itself costs 0.7 s; see ckpt_ir.dcp_types).
    for cls, (module, name) in dcp_types.DCP_CLASSES.items():
        if issubclass(cls, Enum):
            rules[(module, name)] = _Rule(cls, call=_enum_call(cls))
        else:
            rules[(module, name)] = plain(cls)
    # megatron-core <= 0.15 pickled subclasses of DCP's classes; read them as the real thing.
    mcore = "megatron.core.dist_checkpointing.strategies.torch"
    rules[(mcore, "MCoreMetadata")] = plain(dcp_types.Metadata)
    rules[(mcore, "MCoreSavePlan")] = plain(dcp_types.SavePlan)
    _register(rules)
    return rules


def _torch_table() -> dict[tuple[str, str], _Rule]:
    """The rules that build torch objects: tensors, storages, sizes, dtypes, devices."""
    import torch

    rules: dict[tuple[str, str], _Rule] = {
        ("torch", "Size"): _Rule(torch.Size, call=_safe_size),
        ("torch", "device"): _Rule(torch.device, call=_safe_device),
        ("torch", "Tensor"): _Rule(torch.Tensor),
        ("torch.nn.parameter", "Parameter"): _Rule(torch.nn.Parameter),
        ("torch.serialization", "_get_layout"): _function(_safe_get_layout),
        ("torch._tensor", "_rebuild_from_type_v2"): _function(_rebuild_from_type_v2),
    }
    for name, fn in _TENSOR_REBUILDERS.items():
        rules[("torch._utils", name)] = _function(fn)
    rules[("torch._utils", "_rebuild_wrapper_subclass")] = _function(_rebuild_wrapper_subclass)
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            rules[("torch", name)] = _Rule(value)
    for cls in _storage_dtypes():
        rules[(cls.__module__, cls.__name__)] = _Rule(cls)
        if cls.__module__ == "torch.storage":
            rules[("torch", cls.__name__)] = _Rule(cls)
    return rules


@cache
def _table() -> dict[tuple[str, str], _Rule]:
    """Every rule (imports torch): what a torch.save archive or a trusted-shape pickle gets."""
    rules = {**_base_table(), **_torch_table()}
    _register(rules)
    return rules


# ---- metadata mode: a DCP .metadata read as data, without torch ----------------------------


class LayoutName:
    """A ``torch.layout`` read in metadata mode: only its name (``"torch.strided"``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return type(other) is LayoutName and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return self.name


STRIDED = LayoutName("torch.strided")


def _size_as_tuple(*args: Any) -> tuple[int, ...]:
    # torch.Size's checks (_safe_size), building the tuple torch.Size subclasses.
    _argc("torch.Size", args, 0, 1)
    return _int_tuple(args[0], "torch.Size") if args else ()


def _layout_as_name(*args: Any) -> Any:
    # Every DCP tensor is strided; any other layout is torch's own object, checked as ever.
    if len(args) == 1 and type(args[0]) is str and args[0] == STRIDED.name:
        return STRIDED
    return _safe_get_layout(*args)


def _make_record(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any,
                 requires_grad: Any, metadata: Any) -> records.TensorRecord:
    """:func:`_make_tensor` in metadata mode: the same checks, a record instead of a view."""
    _check(type(storage) is records.StorageRecord,
           "tensor rebuilt from something that is not a storage")
    _check(isinstance(dtype, dtypes.DType), "tensor dtype is not a torch.dtype")
    size, stride = _check_view(offset, size, stride, requires_grad, dtype, storage.nbytes)
    if metadata:
        _check_tensor_metadata(metadata)  # conj/neg bits: values, not metadata; not kept
    return records.TensorRecord(storage, offset, size, stride, dtype, requires_grad)


def _record_v2(*args: Any) -> records.TensorRecord:
    return _make_record(*_v2_arguments(args, records.StorageRecord))


def _record_v3(*args: Any) -> records.TensorRecord:
    return _make_record(*_v3_arguments(args))


def _record_parameter(*args: Any) -> records.TensorRecord:
    _argc("_rebuild_parameter", args, 3, 3)
    _check(isinstance(args[0], records.TensorRecord) and type(args[1]) is bool,
           "invalid parameter")
    t = args[0]
    return records.TensorRecord(t.storage, t.offset, t.shape, t.strides, t.dtype, args[1])


# torch's legacy storage classes (torch.<Name>Storage) and their element types; a test checks
# each against torch's own class.
_STORAGE_CLASSES = {
    "DoubleStorage": dtypes.FLOAT64, "FloatStorage": dtypes.FLOAT32,
    "HalfStorage": dtypes.FLOAT16, "BFloat16Storage": dtypes.BFLOAT16,
    "LongStorage": dtypes.INT64, "IntStorage": dtypes.INT32, "ShortStorage": dtypes.INT16,
    "CharStorage": dtypes.INT8, "ByteStorage": dtypes.UINT8, "BoolStorage": dtypes.BOOL,
    "ComplexFloatStorage": dtypes.COMPLEX64, "ComplexDoubleStorage": dtypes.COMPLEX128,
}


@cache
def _metadata_table() -> dict[tuple[str, str], _Rule]:
    rules = {
        ("torch", "Size"): _function(_size_as_tuple),
        ("torch.serialization", "_get_layout"): _function(_layout_as_name),
        ("torch._utils", "_rebuild_tensor_v2"): _function(_record_v2),
        ("torch._utils", "_rebuild_tensor_v3"): _function(_record_v3),
        ("torch._utils", "_rebuild_parameter"): _function(_record_parameter),
    }
    for name, dtype in _STORAGE_CLASSES.items():
        rules[("torch", name)] = _Rule(records.StorageClass(name, dtype))
    untyped = _Rule(records.StorageClass("UntypedStorage", dtypes.UINT8))  # counted in bytes
    rules[("torch", "UntypedStorage")] = untyped
    rules[("torch.storage", "UntypedStorage")] = untyped
    _register(rules)
    return rules


def _metadata_rule(module: str, name: str) -> _Rule | None:
    """Metadata mode's rule for a torch global, or None (then the load is redone in the
    default mode: :class:`_NeedsTorch`).

    ``torch.Size`` builds a checked tuple, ``torch.<dtype>`` is ckpt-ir's
    :class:`~ckpt_ir.dtypes.DType` of that name (each one is torch's dtype of the same name:
    tests/unit/test_unpickler_torch_free.py), ``torch.strided`` a :class:`LayoutName`, a storage
    class a :class:`~ckpt_ir.safety.unpickler.records.StorageClass` and the tensor rebuilders
    :class:`~ckpt_ir.safety.unpickler.records.TensorRecord` s. For code that only reads the
    metadata (shapes, dtypes, where the bytes are); no tensor or storage is built.
    """
    rule = _metadata_table().get((module, name))
    if rule is None and module == "torch":
        dtype = dtypes.lookup(name)
        if dtype is not None:
            rule = _Rule(dtype)
    return rule


# Keyed by id(): identity, not equality, decides what an object on the stack may do. The
# rules hold strong references, so ids stay valid for the life of the process. Each group of
# rules (torch-free, torch, numpy, metadata mode) joins it when first loaded.
_IDENTITY: dict[int, _Rule] = {}


def _register(rules: dict[tuple[str, str], _Rule]) -> None:
    _IDENTITY.update({id(rule.obj): rule for rule in rules.values()})


_numpy_loaded: dict[tuple[str, str], _Rule] = {}


def _numpy_rule(module: str, name: str) -> _Rule | None:
    # numpy is imported only when a pickle names it (Megatron-LM RNG state), then its rules
    # join the identity index like the others.
    if not _numpy_loaded:
        rules = _numpy_rules()
        _base_table()
        _register(rules)
        _numpy_loaded.update(rules)
    return _numpy_loaded.get((module, name))


def _rule_for(obj: Any) -> _Rule | None:
    _base_table()  # registers the torch-free rules on first use
    return _IDENTITY.get(id(obj))


@cache
def _storage_dtype_by_identity() -> dict[int, torch.dtype]:
    return {id(cls): dtype for cls, dtype in _storage_dtypes().items()}


def _describe(obj: Any) -> str:
    if isinstance(obj, _StandInMeta):
        return f"{obj.module}.{obj.qualname}"
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if isinstance(module, str) and isinstance(name, str):
        return f"{module}.{name}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__} object"


# Python 2 module names that protocol 0-2 pickles (torch.save's default) still write.
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


@cache
def _dict_state_types() -> tuple[type, ...]:
    """Classes whose BUILD state is applied as a plain ``__dict__`` update (no setattr)."""
    return (argparse.Namespace, OrderedDict, *(
        cls for cls in dcp_types.DCP_CLASSES
        if not issubclass(cls, Enum) and cls is not dcp_types.TensorProperties),
        *dtensor.DTENSOR_CLASSES)
