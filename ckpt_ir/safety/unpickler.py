"""Restricted unpickling: nothing in a checkpoint is ever executed.

Trust model
-----------
A pickle is a program: ``GLOBAL`` imports any name, ``REDUCE`` calls it. A checkpoint from a model
hub or a colleague's bucket is untrusted input, so ckpt-ir never hands one to :func:`pickle.load`
or ``torch.load(weights_only=False)``. Instead :class:`RestrictedUnpickler` runs the pickle
machine with every operation that can reach code gated:

* ``GLOBAL``/``STACK_GLOBAL``/``INST`` resolve names only through an allow-list of what the
  supported formats need: builtin containers and scalars, ``collections.OrderedDict`` and
  ``defaultdict``, torch tensor rebuilding (``torch._utils._rebuild_tensor_v2`` and friends),
  storage classes, ``torch.Size``, dtypes, layouts, ``torch.device``, ``argparse.Namespace``,
  numpy array reconstruction (Megatron-LM keeps numpy RNG state), ``io.BytesIO`` (Transformer
  Engine extra state), ``pathlib`` paths (rebuilt as pure paths; DCP's ``StorageMeta`` holds
  one) and the dataclasses of ``torch.distributed.checkpoint`` metadata (built as ckpt-ir's
  field-for-field mirrors, :mod:`ckpt_ir.dcp_types`, so DCP is never imported). Anything else
  raises :class:`~ckpt_ir.errors.UnsafeCheckpointError` naming the global.
* Globals of ``megatron.*`` and ``transformer_engine.*`` become inert :class:`StandIn` classes:
  Megatron is never imported, a "call" (``ModelType(1)``) or ``__setstate__`` only records its
  arguments. Two exceptions keep DCP metadata usable: ``MCoreMetadata``/``MCoreSavePlan`` (saved by
  megatron-core <= 0.15 as subclasses of DCP's ``Metadata``/``SavePlan``) come back as torch's
  real classes, with their extra attributes (``mcore_data``) kept in ``__dict__``.
* Being on the list does not make a name callable. ``REDUCE``/``NEWOBJ``/``INST``/``OBJ`` call
  only a safe re-implementation registered for that exact object, which checks argument types
  (``bytearray`` refuses an int size, numpy ``_reconstruct`` only builds empty arrays, tensors are
  rebuilt by our own bounds-checked code). ``BUILD`` sets state only on stand-ins (recorded),
  plain-data classes (``__dict__`` update, never ``setattr``) and a few C types whose
  ``__setstate__`` only parses data. ``APPEND``/``SETITEM``/``ADDITEMS`` work on real
  ``list``/``dict``/``set`` objects only, so an attribute named ``append`` cannot be invoked.
  Copyreg extension codes are refused.
* Callables that are not needed are refused even when harmless-looking: a Namespace holding
  ``torch.nn.functional.silu`` fails with the global named. Refusing is the safe default; an
  inert stand-in for arbitrary callables would make every new name silently "work".
* What a loaded object costs its consumers is bounded: dict keys and set elements are checked
  before they are hashed (CPython hashes nested tuples by C recursion: a 1,000,000-deep key was
  a segfault), and the finished graph is walked once, iteratively: at most
  :data:`MAX_NESTING` levels, no cycles, and no reference bomb (shared references that expand,
  as a tree, far beyond the pickle's size). ``BUILD`` state may not replace a method.
* Tensors must be backed by their own bytes: no view addresses an element twice (stride 0),
  and two tensors share bytes only as the same view (tied weights). Zip archives with a record
  name twice (torch reads the first, zipfile the last) or a directory beyond
  :data:`MAX_ZIP_DIRECTORY` bytes are refused.
* The pure-Python unpickler is used on purpose: the C one preallocates attacker-chosen lengths
  (an 8-byte header made CPython 3.11 allocate 2 GB) and cannot restrict ``BUILD``. Reads are
  bounded by the input, the memo is a dict, so memory stays proportional to the input.

Tensor data is never copied: ``torch.save`` archives are zip files whose records are stored
uncompressed, so each storage becomes ``torch.frombuffer`` over a private (copy-on-write) mmap of
the file. The mapping is read-only with respect to the file: in-place edits of a loaded tensor
touch private pages instead of crashing or corrupting the checkpoint. ``.distcp`` files of
``torch.distributed.checkpoint`` hold many archives back to back; :func:`load_torch` reads one at
``[offset, offset + length)``.

``trust=True`` (CLI ``--trust-pickles``) is the documented escape hatch for files you produced
yourself: it uses plain ``pickle``/``torch.load(weights_only=False)`` and logs a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import logging
import math
import mmap
import os
import pathlib
import pickle
import reprlib
import struct
import sys
import warnings
import zipfile
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any, BinaryIO, ClassVar

import torch

from ckpt_ir import dcp_types
from ckpt_ir.errors import (
    CheckpointError,
    CorruptCheckpointError,
    FormatError,
    UnsafeCheckpointError,
)
from ckpt_ir.safety.files import open_regular

__all__ = [
    "RestrictedUnpickler",
    "StandIn",
    "load_pickle",
    "load_torch",
    "load_torch_buffer",
    "load_torch_bytes",
    "map_file",
]

logger = logging.getLogger(__name__)

_TRUST_HINT = "pass trust_pickles only for files you trust"
# The magic number that pre-1.6 (non-zip) torch.save files start with, pickled with protocol 2.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
_MAX_TENSOR_DIMS = 64
_MAX_CACHED_STAND_INS = 4096
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


# --------------------------------------------------------------------------------------------
# Stand-ins for Megatron / Transformer Engine globals
# --------------------------------------------------------------------------------------------


class _StandInMeta(type):
    module: str
    qualname: str

    def __repr__(cls) -> str:
        return f"<stand-in class {cls.module}.{cls.qualname}>"


class StandIn(metaclass=_StandInMeta):
    """Inert placeholder for a Megatron/TE class, enum or function found in a pickle.

    Nothing of the original is imported or run. The class carries ``module`` and ``qualname``;
    an instance records how the pickle built it: ``args``/``kwargs`` of the call (``ModelType(1)``
    has ``args == (1,)``) and the ``state`` a ``BUILD`` would have applied. Attributes found in a
    dict ``state`` are readable as attributes (``cfg.num_layers``) for convenience.
    """

    __slots__ = ("args", "kwargs", "state")
    module: ClassVar[str] = ""
    qualname: ClassVar[str] = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        # Recording only: the real class's __setstate__ is never looked up.
        self.state = state

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            state = object.__getattribute__(self, "state")
        except AttributeError:
            raise AttributeError(name) from None
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict) and name in state:
            return state[name]
        raise AttributeError(f"stand-in {type(self).module}.{type(self).qualname} has no {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StandIn) or type(other) is not type(self):
            return NotImplemented
        return (self.args, self.kwargs, self.state) == (other.args, other.kwargs, other.state)

    def __hash__(self) -> int:
        return hash((type(self).module, type(self).qualname))

    def __repr__(self) -> str:
        cls = type(self)
        parts = [repr(a) for a in self.args]
        parts += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        text = f"<stand-in {cls.module}.{cls.qualname}({', '.join(parts)})"
        if self.state is not None:
            text += f" state={reprlib.repr(self.state)}"
        return text + ">"


_STAND_INS: dict[tuple[str, str], type[StandIn]] = {}


def _stand_in_class(module: str, qualname: str) -> type[StandIn]:
    """One class per (module, qualname), so ``isinstance`` and ``==`` work across loads."""
    cls = _STAND_INS.get((module, qualname))
    if cls is None:
        cls = _StandInMeta(
            qualname.rpartition(".")[2],
            (StandIn,),
            {"__slots__": (), "module": module, "qualname": qualname},
        )
        if len(_STAND_INS) < _MAX_CACHED_STAND_INS:  # bound growth on hostile inputs
            _STAND_INS[(module, qualname)] = cls
    return cls


def _is_stand_in_module(module: str) -> bool:
    return module.split(".", 1)[0] in ("megatron", "transformer_engine")


# --------------------------------------------------------------------------------------------
# The allow-list
# --------------------------------------------------------------------------------------------


class _Refused(pickle.UnpicklingError):
    """An allowed name used in a way the allow-list does not admit (becomes Unsafe...Error)."""


@dataclass(frozen=True, slots=True)
class _Rule:
    """What an allowed global may do once it is on the pickle stack."""

    obj: Any
    call: Callable[..., Any] | None = None  # REDUCE/INST/OBJ run this instead of obj(*args)
    new: Callable[[], Any] | None = None  # NEWOBJ with no arguments runs this


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
    _argc("torch.Size", args, 0, 1)
    return torch.Size(_int_tuple(args[0], "torch.Size") if args else ())


def _safe_device(*args: Any) -> torch.device:
    _argc("torch.device", args, 1, 2)
    _check(isinstance(args[0], str) and (len(args) == 1 or _is_int(args[1])),
           "torch.device needs (str[, int])")
    return torch.device(*args)


@cache
def _layouts() -> dict[str, torch.layout]:
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


_LEAVES = (str, int, float, bool, bytes, bytearray, complex, type(None), torch.dtype,
           torch.device, torch.layout, torch.memory_format, type)


def _children(obj: Any) -> list[Any] | tuple[Any, ...] | None:
    """What a consumer walking ``obj`` reaches next; None for leaves."""
    cls = type(obj)
    if cls in (list, tuple, set, frozenset):
        return obj
    if isinstance(obj, dict):
        attrs = getattr(obj, "__dict__", None)  # OrderedDict state (a state dict's _metadata)
        return [*obj.keys(), *obj.values(), *(attrs.values() if type(attrs) is dict else ())]
    if isinstance(obj, StandIn):
        return (obj.args, obj.kwargs, obj.state)
    if isinstance(obj, _LEAVES) or isinstance(obj, _StandInMeta):
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
    tensors: list[torch.Tensor] = []
    done: dict[int, tuple[int, int]] = {}  # id -> (depth, tree size); all alive via root
    on_path: set[int] = set()
    frames: list[list[Any]] = []  # [obj, iterator over children, max child depth, tree size]

    def enter(obj: Any, kids: Any) -> None:
        if len(frames) >= MAX_NESTING:
            raise pickle.UnpicklingError(f"objects are nested more than {MAX_NESTING} levels "
                                         f"deep")
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        frames.append([obj, iter(kids), 0, 1])
        on_path.add(id(obj))

    kids = _children(root)
    if isinstance(root, torch.Tensor):
        tensors.append(root)
    if kids is None:
        return tensors
    enter(root, kids)
    while frames:
        frame = frames[-1]
        for child in frame[1]:
            known = done.get(id(child))
            if known is None:
                if isinstance(child, torch.Tensor) and not vars(child):
                    tensors.append(child)
                    done[id(child)] = (0, 1)
                    known = (0, 1)
                else:
                    grandchildren = _children(child)
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


def _check_disjoint_views(tensors: list[torch.Tensor]) -> None:
    """Distinct tensors may not share bytes unless they are the same view (tied weights).

    Byte ranges are absolute addresses in the mapped file, so records that a crafted zip
    directory makes overlap are caught too. Each view is already non-self-overlapping
    (:func:`_make_tensor`), so the bytes a checkpoint declares are backed by distinct bytes.
    """
    spans = []
    for t in tensors:
        if t.numel() == 0:
            continue
        start = t.untyped_storage().data_ptr() + t.storage_offset() * t.dtype.itemsize
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
    _check(type(storage) is torch.storage.TypedStorage,
           "tensor rebuilt from something that is not a storage")
    _check(isinstance(dtype, torch.dtype), "tensor dtype is not a torch.dtype")
    _check(_is_int(offset) and offset >= 0, "tensor storage offset is invalid")
    size = _int_tuple(size, "tensor size")
    stride = _int_tuple(stride, "tensor stride")
    _check(len(size) == len(stride), "tensor size and stride differ in length")
    _check(type(requires_grad) is bool, "requires_grad is not a bool")
    untyped = storage._untyped_storage
    itemsize = dtype.itemsize
    _check(itemsize > 0, f"unsupported dtype {dtype}")
    capacity = untyped.nbytes() // itemsize
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
    tensor = torch.empty((0,), dtype=dtype).set_(untyped, offset, size, stride)
    if requires_grad:
        tensor.requires_grad_(True)
    if metadata:
        # torch only ever writes the conj/neg bits here.
        _check(isinstance(metadata, dict) and set(metadata) <= {"conj", "neg"}
               and all(type(v) is bool for v in metadata.values()),
               "unsupported tensor metadata")
        torch._utils.set_tensor_metadata(tensor, metadata)
    # backward_hooks are ignored on purpose: torch never saves real hooks, and installing
    # objects from a file as hooks would let them run during backward.
    return tensor


def _rebuild_tensor_v2(*args: Any) -> torch.Tensor:
    _argc("_rebuild_tensor_v2", args, 6, 7)
    storage = args[0]
    _check(type(storage) is torch.storage.TypedStorage, "tensor rebuilt without a storage")
    metadata = args[6] if len(args) == 7 else None
    return _make_tensor(storage, args[1], args[2], args[3], storage.dtype, args[4], metadata)


def _rebuild_tensor_v3(*args: Any) -> torch.Tensor:
    # v3 carries the dtype explicitly (dtypes without a legacy storage class: uint16, float8...).
    _argc("_rebuild_tensor_v3", args, 7, 8)
    metadata = args[7] if len(args) == 8 else None
    return _make_tensor(args[0], args[1], args[2], args[3], args[6], args[4], metadata)


def _set_safe_state(obj: torch.Tensor, state: Any) -> None:
    """Python attributes on a tensor (Megatron tags params); never shadows a Tensor attribute."""
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


def _rebuild_from_type_v2(*args: Any) -> torch.Tensor:
    # How torch saves a tensor that carries Python attributes: (func, type, args, state).
    _argc("_rebuild_from_type_v2", args, 4, 4)
    func, new_type, func_args, state = args
    rule = _rule_for(func)
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


_QUANTIZED = frozenset({torch.quint8, torch.qint8, torch.qint32, torch.quint4x2, torch.quint2x4})


def _storage_dtypes() -> dict[type, torch.dtype]:
    """Legacy storage classes (``torch.FloatStorage``...) as torch's pickler names them."""
    result: dict[type, torch.dtype] = {torch.storage.UntypedStorage: torch.uint8}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation noise
        for value in vars(torch).values():
            if (isinstance(value, type) and issubclass(value, torch.storage._LegacyStorage)
                    and value is not torch.storage._LegacyStorage):
                dtype = value.dtype
                # Quantized storages need qtensor rebuilding, which is not admitted.
                if isinstance(dtype, torch.dtype) and dtype not in _QUANTIZED:
                    result[value] = dtype
    return result


@cache
def _table() -> dict[tuple[str, str], _Rule]:
    def plain(cls: type) -> _Rule:
        return _Rule(cls, new=lambda: object.__new__(cls))

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
        ("torch", "Size"): _Rule(torch.Size, call=_safe_size),
        ("torch", "device"): _Rule(torch.device, call=_safe_device),
        ("torch", "Tensor"): _Rule(torch.Tensor),
        ("torch.nn.parameter", "Parameter"): _Rule(torch.nn.Parameter),
        ("torch.serialization", "_get_layout"): _function(_safe_get_layout),
        ("torch._tensor", "_rebuild_from_type_v2"): _function(_rebuild_from_type_v2),
    }
    # Scalars and `object` are referenced (defaultdict factories, _reconstructor base), never
    # called: int(<huge str>) or bytes(<int>) would only cost time and memory.
    for ref in (int, float, str, bytes, bool, object):
        rules[("builtins", ref.__name__)] = _Rule(ref)
    for name, fn in _TENSOR_REBUILDERS.items():
        rules[("torch._utils", name)] = _function(fn)
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            rules[("torch", name)] = _Rule(value)
    for cls in _storage_dtypes():
        rules[(cls.__module__, cls.__name__)] = _Rule(cls)
        if cls.__module__ == "torch.storage":
            rules[("torch", cls.__name__)] = _Rule(cls)
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
    return rules


@cache
def _rules_by_identity() -> dict[int, _Rule]:
    # Keyed by id(): identity, not equality, decides what an object on the stack may do.
    # The rules hold strong references, so ids stay valid for the life of the process.
    return {id(rule.obj): rule for rule in _table().values()}


_numpy_loaded: dict[tuple[str, str], _Rule] = {}


def _numpy_rule(module: str, name: str) -> _Rule | None:
    # numpy is imported only when a pickle names it (Megatron-LM RNG state), then its rules
    # join the identity index like the others.
    if not _numpy_loaded:
        rules = _numpy_rules()
        _rules_by_identity().update({id(r.obj): r for r in rules.values()})
        _numpy_loaded.update(rules)
    return _numpy_loaded.get((module, name))


def _rule_for(obj: Any) -> _Rule | None:
    return _rules_by_identity().get(id(obj))


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
        if not issubclass(cls, Enum) and cls is not dcp_types.TensorProperties))


# --------------------------------------------------------------------------------------------
# The unpickler
# --------------------------------------------------------------------------------------------

StorageLoader = Callable[[str, torch.dtype, int], torch.storage.TypedStorage]


class RestrictedUnpickler(pickle._Unpickler):
    """A pickle machine that resolves names through the allow-list and calls nothing else.

    Built on the pure-Python unpickler so that every opcode that can reach code is overridden
    (see the module docstring). ``storages`` turns torch persistent ids ``('storage', type,
    key, location, numel)`` into storages; without it a persistent id is an error (plain
    pickles such as DCP ``.metadata`` have none). ``globals_seen`` records every
    ``(module, name)`` the pickle asked for, allowed or not.
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, *, where: str = "<memory>",
                 storages: StorageLoader | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self.where = where
        self.globals_seen: set[tuple[str, str]] = set()
        self._storages = storages

    # ---- names ----

    def find_class(self, module: str, name: str) -> Any:
        self.globals_seen.add((module, name))
        module = _MODULE_ALIASES.get(module, module)
        rule = _table().get((module, name))
        if rule is None and module.split(".", 1)[0] == "numpy":
            rule = _numpy_rule(module, name)
        if rule is not None:
            return rule.obj
        if _is_stand_in_module(module) and all(
                part.isidentifier() for part in (*module.split("."), *name.split("."))):
            return _stand_in_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to unpickle global '{module}.{name}' in {self.where}: "
            f"not on the allow-list ({_TRUST_HINT})", path=self.where)

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None:
            raise pickle.UnpicklingError("unexpected persistent id in a plain pickle")
        _check(isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage",
               "unsupported persistent id")
        _, storage_type, key, _location, numel = pid
        dtype = _storage_dtype_by_identity().get(id(storage_type))
        if dtype is None:
            raise pickle.UnpicklingError("persistent id names an unknown storage type")
        _check(isinstance(key, str) and _is_int(numel) and numel >= 0,
               "invalid storage key or size")
        return self._storages(key, dtype, numel)

    # ---- calls ----

    def _refuse_call(self, obj: Any) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"refusing to call '{_describe(obj)}' while unpickling {self.where}: not on the "
            f"allow-list of callables ({_TRUST_HINT})", path=self.where)

    def _call(self, func: Any, args: Any) -> Any:
        _check(isinstance(args, tuple), "call arguments are not a tuple")
        if isinstance(func, _StandInMeta):
            return func(*args)
        rule = _rule_for(func)
        if rule is None or rule.call is None:
            raise self._refuse_call(func)
        return rule.call(*args)

    def _new(self, cls: Any, args: Any, kwargs: Any = None) -> Any:
        _check(isinstance(args, tuple), "NEWOBJ arguments are not a tuple")
        if isinstance(cls, _StandInMeta):
            _check(kwargs is None or isinstance(kwargs, dict), "NEWOBJ_EX kwargs not a dict")
            return cls(*args, **(kwargs or {}))
        rule = _rule_for(cls)
        if rule is None or rule.new is None or args or kwargs:
            raise self._refuse_call(cls)
        return rule.new()

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        stack[-1] = self._call(stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ
        self.append(self._call(klass, tuple(args)))

    def get_extension(self, code: int) -> None:  # EXT1/2/4
        raise UnsafeCheckpointError(
            f"refusing pickle extension code {code} in {self.where} ({_TRUST_HINT})",
            path=self.where)

    # ---- state ----

    def load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if isinstance(inst, StandIn):
            inst.state = state
            return
        cls = type(inst)
        if cls in _dict_state_types():
            if isinstance(state, tuple) and len(state) == 2 and not state[1]:
                state = state[0]
            # No dunder keys: an instance attribute such as __deepcopy__ or __reduce_ex__ would
            # be looked up (and called) by copy/pickle on the loaded object later.
            _check(state is None or (isinstance(state, dict) and all(
                type(k) is str and not k.startswith("__") for k in state)),
                   f"invalid state for {cls.__qualname__}")
            for key in state or ():
                # An instance attribute shadows a method (a function is a non-data
                # descriptor): state {'items': <allowed callable>} would make a loaded
                # OrderedDict's .items() call it. Dataclass field defaults are plain values.
                attr = inspect.getattr_static(cls, key, None)
                if callable(attr) or hasattr(type(attr), "__get__"):
                    raise _Refused(f"refusing state {key!r} for a {cls.__qualname__}: it "
                                   f"would replace a method")
            if state:
                inst.__dict__.update(state)
            return
        if cls is dcp_types.TensorProperties:
            # Its __setstate__ only unpacks a 5-tuple and maps an enum to a memory format.
            _check(isinstance(state, tuple) and len(state) == 5, "invalid TensorProperties")
            _check_key(state[3])  # the memory format encoding is looked up by hash
            try:
                dcp_types.TensorProperties.__setstate__(inst, state)
            except ValueError as e:
                raise UnsafeCheckpointError(str(e)) from None
            return
        if cls is io.BytesIO:
            _check(isinstance(state, tuple) and len(state) == 3
                   and isinstance(state[0], bytes) and _is_int(state[1])
                   and (state[2] is None or (isinstance(state[2], dict) and all(
                       type(k) is str and not k.startswith("__") for k in state[2]))),
                   "invalid BytesIO state")
            inst.__setstate__(state)
            return
        if "numpy" in sys.modules and _is_numpy_data(inst):
            # numpy's C __setstate__ parses (version, shape, dtype, fortran, raw) and checks
            # that the raw data matches; it calls nothing from the pickle.
            _check(isinstance(state, tuple), "invalid numpy state")
            inst.__setstate__(state)
            return
        raise UnsafeCheckpointError(
            f"refusing to set state on a {cls.__module__}.{cls.__qualname__} object while "
            f"unpickling {self.where} ({_TRUST_HINT})", path=self.where)

    # ---- containers: only the real builtin types, so no attribute of a loaded object runs ----

    def load_append(self) -> None:
        value = self.stack.pop()
        target = self.stack[-1]
        _check(type(target) is list, "APPEND to something that is not a list")
        target.append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        _check(type(target) is list, "APPENDS to something that is not a list")
        target.extend(items)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        target = self.stack[-1]
        _check(type(target) in (dict, OrderedDict, defaultdict),
               "SETITEM on something that is not a dict")
        _check_key(key)
        target[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        _check(type(target) in (dict, OrderedDict, defaultdict),
               "SETITEMS on something that is not a dict")
        _check(len(items) % 2 == 0, "SETITEMS with an odd number of items")
        for i in range(0, len(items), 2):
            _check_key(items[i])
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        _check(type(target) is set, "ADDITEMS on something that is not a set")
        _check_keys(items)
        target.update(items)

    def load_dict(self) -> None:
        items = self.pop_mark()
        _check(len(items) % 2 == 0, "DICT with an odd number of items")
        _check_keys(items[0::2])
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        _check_keys(items)
        self.append(frozenset(items))

    def load_bytearray8(self) -> None:
        # The stock version allocates the declared length before reading it.
        (length,) = struct.unpack("<Q", self.read(8))
        data = self.read(length)
        _check(len(data) == length, "pickle data was truncated")
        self.append(bytearray(data))

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.FROZENSET[0]] = load_frozenset
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def _is_numpy_data(obj: Any) -> bool:
    np = sys.modules["numpy"]
    return type(obj) is np.ndarray or isinstance(obj, np.dtype)


def _unpickle(data: bytes | bytearray | memoryview, where: str, path: str | None,
              storages: StorageLoader | None = None) -> Any:
    try:
        result = RestrictedUnpickler(io.BytesIO(data), where=where, storages=storages).load()
        _check_disjoint_views(_check_graph(result, len(data)))
        return result
    except _Refused as exc:
        raise UnsafeCheckpointError(f"{exc} in {where} ({_TRUST_HINT})", path=path) from exc
    except UnsafeCheckpointError as exc:
        exc.path = path
        raise
    except CheckpointError:
        raise
    except EOFError as exc:
        raise CorruptCheckpointError(f"cannot unpickle {where}: pickle data was truncated",
                                     path=path) from exc
    except Exception as exc:  # hostile input can raise anything; report it as corruption
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        reason = reason if len(reason) <= 200 else reason[:197] + "..."  # long bytes reprs
        raise CorruptCheckpointError(f"cannot unpickle {where}: {reason}", path=path) from exc


# --------------------------------------------------------------------------------------------
# torch.save zip archives
# --------------------------------------------------------------------------------------------


class _ViewReader:
    """A seekable file over a memoryview, so zipfile can parse an archive without a copy."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self._pos + n)
        start = min(self._pos, end)
        self._pos = max(self._pos, end)
        return bytes(self._view[start:end])

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class _Record:
    offset: int  # absolute, in the underlying buffer
    size: int


MAX_ZIP_DIRECTORY = 16 * 2**20
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"


def _central_directory_size(view: memoryview) -> int | None:
    """The central directory size an archive's end records declare (zip64 included), or None
    when there are none (zipfile then refuses the archive itself)."""
    tail_start = max(0, len(view) - (22 + 65535))
    tail = bytes(view[tail_start:])
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        return None
    (size,) = struct.unpack("<I", tail[at + 12:at + 16])
    locator = tail_start + at - 20
    if locator >= 0 and bytes(view[locator:locator + 4]) == _ZIP64_LOCATOR:
        (record,) = struct.unpack("<Q", bytes(view[locator + 8:locator + 16]))
        if record + 56 <= len(view) and bytes(view[record:record + 4]) == _ZIP64_EOCD:
            # zipfile takes every field from the zip64 record when there is one.
            (size,) = struct.unpack("<Q", bytes(view[record + 40:record + 48]))
    return min(size, len(view))  # zipfile reads no further than the archive's end


class _Archive:
    """One torch.save archive inside ``buffer[start:start + length]``; storages are views."""

    def __init__(self, buffer: mmap.mmap | bytearray, start: int, length: int, where: str,
                 path: str | None) -> None:
        self._buffer = buffer
        self._where = where
        self._path = path
        self._storages: dict[str, tuple[torch.storage.TypedStorage, torch.dtype, int]] = {}
        view = memoryview(buffer)[start:start + length]
        head = bytes(view[:512])
        if not head.startswith(b"PK\x03\x04"):
            if head.startswith(_LEGACY_TORCH_MAGIC) or head[257:262] == b"ustar":
                raise FormatError(
                    f"legacy torch serialization is not supported: {where} predates torch 1.6 "
                    f"(re-save it with a current torch)", path=path)
            raise CorruptCheckpointError(f"{where} is not a torch.save zip archive", path=path)
        directory = _central_directory_size(view)
        if directory is not None and directory > MAX_ZIP_DIRECTORY:
            # zipfile builds a ~600-byte ZipInfo per 46-byte entry before anything else can
            # be checked: a 251 MB directory of 4M entries took 3 GB.
            raise CorruptCheckpointError(
                f"{where} has a {directory}-byte zip directory; torch.save archives need "
                f"far less (at most {MAX_ZIP_DIRECTORY} bytes, ~200,000 records, accepted)",
                path=path)
        try:
            with zipfile.ZipFile(_ViewReader(view)) as archive:
                infos = archive.infolist()
        except Exception as exc:  # zipfile raises many types on hostile central directories
            raise CorruptCheckpointError(
                f"{where} is not a valid torch.save archive: {type(exc).__name__}: {exc}",
                path=path) from exc
        records: dict[str, _Record] = {}
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size \
                    or info.flag_bits & 0x1:
                raise CorruptCheckpointError(
                    f"record {info.filename!r} in {where} is compressed or encrypted; torch "
                    f"writes stored records only", path=path)
            # zipfile shifts offsets when the directory disagrees with the data; a negative one
            # would index backwards (Python slicing) into whatever precedes the archive.
            header = info.header_offset
            local = bytes(view[header:header + 30]) if header >= 0 else b""
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CorruptCheckpointError(
                    f"record {info.filename!r} in {where} has no local header", path=path)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            data = header + 30 + name_len + extra_len
            if data + info.file_size > length:
                raise CorruptCheckpointError(
                    f"record {info.filename!r} in {where} extends past the end of the archive",
                    path=path)
            if info.filename in records:
                # torch.load reads the first of two same-named records, zipfile the last:
                # which bytes are "the checkpoint" would depend on the reader.
                raise CorruptCheckpointError(
                    f"record {info.filename!r} appears twice in {where}", path=path)
            records[info.filename] = _Record(start + data, info.file_size)
        pickles = [name for name in records if name == "data.pkl" or name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CorruptCheckpointError(
                f"{where} has {len(pickles)} data.pkl records; expected exactly one", path=path)
        prefix = pickles[0][: -len("data.pkl")]
        self._records = {name[len(prefix):]: rec for name, rec in records.items()
                         if name.startswith(prefix)}
        order = self._records.get("byteorder")
        if order is not None and order.size <= 8:
            value = self._read(order)
            if value in (b"little", b"big") and value != sys.byteorder.encode():
                raise FormatError(f"{where} was saved on a {value.decode()}-endian machine; "
                                  f"byte-swapping is not supported", path=path)
        if order is not None and (order.size > 8 or self._read(order) not in (b"little", b"big")):
            raise CorruptCheckpointError(f"{where} has an invalid byteorder record", path=path)

    def _read(self, record: _Record) -> bytes:
        return bytes(memoryview(self._buffer)[record.offset:record.offset + record.size])

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.storage.TypedStorage:
        cached = self._storages.get(key)
        if cached is not None:
            _check(cached[1:] == (dtype, numel), f"storage {key} is used with two dtypes/sizes")
            return cached[0]
        record = self._records.get(f"data/{key}")
        if record is None:
            raise pickle.UnpicklingError(f"storage record data/{key} is missing")
        nbytes = numel * dtype.itemsize
        _check(record.size == nbytes,
               f"storage record data/{key} has {record.size} bytes, expected {nbytes}")
        if nbytes == 0:
            untyped = torch.UntypedStorage(0)
        else:
            # A memoryview (not the mmap itself) so that closing the mmap while tensors use it
            # raises BufferError instead of unmapping live memory.
            untyped = torch.frombuffer(memoryview(self._buffer), dtype=torch.uint8,
                                       count=nbytes, offset=record.offset).untyped_storage()
        storage = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        self._storages[key] = (storage, dtype, numel)
        return storage

    def load(self) -> Any:
        data = self._read(self._records["data.pkl"])
        return _unpickle(data, self._where, self._path, storages=self.storage)


def _where(path: str | None, offset: int, length: int, whole: bool) -> str:
    name = "<memory>" if path is None else path
    return name if whole else f"{name} [bytes {offset}:{offset + length}]"


_WARNED: set[str] = set()


def _warn_trusted(where: str, path: str | None = None) -> None:
    # Once per file: a DCP reader with trust loads hundreds of archives from one .distcp.
    key = where if path is None else path
    if key in _WARNED:
        return
    if len(_WARNED) < 4096:
        _WARNED.add(key)
    logger.warning("trust_pickles: unpickling %s without restrictions; code in it will run",
                   where)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_pickle(data: bytes | bytearray | memoryview | BinaryIO, *, path: str | None = None,
                trust: bool = False) -> Any:
    """Unpickle a plain pickle (DCP ``.metadata``) through the allow-list.

    Args:
        data: the pickle bytes, or a binary file positioned at its start.
        path: shown in error messages and stored on raised errors.
        trust: use plain :func:`pickle.loads` (runs code from the file; logs a warning).

    Raises:
        UnsafeCheckpointError: a global outside the allow-list; nothing was executed.
        CorruptCheckpointError: truncated or malformed pickle data.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = data.read()
    where = "<memory>" if path is None else path
    if trust:
        _warn_trusted(where)
        return _TrustingUnpickler(io.BytesIO(data)).load()
    return _unpickle(data, where, path)


class _TrustingUnpickler(pickle.Unpickler):
    """Plain unpickling (anything goes), with DCP's metadata classes built as ckpt-ir's
    mirrors, so trusted and restricted loads return the same types."""

    def find_class(self, module: str, name: str) -> Any:
        mirror = _DCP_MIRRORS.get((module, name))
        return mirror if mirror is not None else super().find_class(module, name)


_DCP_MIRRORS = {real: cls for cls, real in dcp_types.DCP_CLASSES.items()}


def load_torch(path: str | os.PathLike[str], *, offset: int = 0, length: int | None = None,
               trust: bool = False) -> Any:
    """Load a ``torch.save`` archive: a whole file or the one at ``[offset, offset + length)``.

    Tensors are zero-copy views of a private mmap of the file (in-place edits never reach the
    file). Works for every dtype, views sharing a storage and nested containers.

    Raises:
        UnsafeCheckpointError: a global outside the allow-list; nothing was executed.
        CorruptCheckpointError: truncated archive, bad records, malformed pickle.
        FormatError: a pre-1.6 (non-zip) torch file or a big-endian archive.
    """
    name = os.fspath(path)
    if trust:
        with open_regular(name) as file:
            size = os.fstat(file.fileno()).st_size
        length = size - offset if length is None else length
        _check_range(name, size, offset, length)
        _warn_trusted(_where(name, offset, length, offset == 0 and length == size), name)
        if offset == 0 and length == size:
            return torch.load(name, map_location="cpu", weights_only=False, mmap=True)
        with open_regular(name) as file:
            file.seek(offset)
            return torch.load(io.BytesIO(file.read(length)), map_location="cpu",
                              weights_only=False)
    return load_torch_buffer(map_file(name), offset=offset, length=length, path=name)


def map_file(path: str | os.PathLike[str]) -> mmap.mmap:
    """A private, copy-on-write mmap of a whole file, as :func:`load_torch_buffer` wants it.

    Readers that take many archives from one file (DCP ``.distcp``) map it once. Never close
    the map while tensors from it are alive: tensors hold a buffer export, so ``close`` then
    raises ``BufferError``; dropping the reference is enough.
    """
    name = os.fspath(path)
    try:
        with open_regular(name) as file:
            if os.fstat(file.fileno()).st_size == 0:
                raise CorruptCheckpointError(f"{name} is empty", path=name)
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read {name}: {exc}", path=name) from exc


def load_torch_buffer(buffer: mmap.mmap | bytearray, *, offset: int = 0,
                      length: int | None = None, path: str | None = None) -> Any:
    """Restricted load of the ``torch.save`` archive at ``buffer[offset:offset + length]``.

    Tensors are views of ``buffer`` (keep it writable-private: :func:`map_file` or a
    ``bytearray``). ``path`` names the file in errors.
    """
    size = len(buffer)
    length = size - offset if length is None else length
    name = "<memory>" if path is None else path
    _check_range(name, size, offset, length)
    where = _where(path, offset, length, offset == 0 and length == size)
    if length == 0:
        raise CorruptCheckpointError(f"{where} is empty", path=path)
    return _Archive(buffer, offset, length, where, path).load()


def _check_range(name: str, size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise CorruptCheckpointError(
            f"bytes [{offset}, {offset + length}) lie outside {name} ({size} bytes)", path=name)


def load_torch_bytes(data: bytes | bytearray | memoryview, *, path: str | None = None,
                     trust: bool = False) -> Any:
    """:func:`load_torch` for an archive held in memory (small DCP byte objects).

    The data is copied once into a private buffer that the returned tensors share.
    """
    where = "<memory>" if path is None else path
    if trust:
        _warn_trusted(where)
        return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=False)
    return load_torch_buffer(bytearray(data), path=path)
