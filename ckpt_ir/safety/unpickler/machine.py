"""The pickle machine: a pure-Python unpickler that resolves names only through the
allow-list and calls nothing else.

Part of :mod:`ckpt_ir.safety.unpickler`; its docstring states the trust model."""

from __future__ import annotations

import inspect
import io
import pickle
import struct
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

if TYPE_CHECKING:
    import torch

from ckpt_ir import dcp_types
from ckpt_ir.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from ckpt_ir.safety.unpickler import records, sharded_tensor
from ckpt_ir.safety.unpickler.allow_list import (
    _MODULE_ALIASES,
    _base_table,
    _check,
    _check_disjoint_views,
    _check_graph,
    _check_key,
    _check_keys,
    _describe,
    _dict_state_types,
    _is_int,
    _metadata_rule,
    _NeedsTorch,
    _numpy_rule,
    _Refused,
    _rule_for,
    _storage_dtype_by_identity,
    _table,
)
from ckpt_ir.safety.unpickler.stand_ins import (
    StandIn,
    _is_stand_in_module,
    _stand_in_class,
    _StandInMeta,
)

_TRUST_HINT = "pass trust_pickles only for files you trust"


StorageLoader = Callable[[str, "torch.dtype", int], "torch.storage.TypedStorage"]


class RestrictedUnpickler(pickle._Unpickler):
    """A pickle machine that resolves names through the allow-list and calls nothing else.

    Built on the pure-Python unpickler so that every opcode that can reach code is overridden
    (see the module docstring). ``storages`` turns torch persistent ids ``('storage', type,
    key, location, numel)`` into storages; without it a persistent id is an error (plain
    pickles such as DCP ``.metadata`` have none). ``globals_seen`` records every
    ``(module, name)`` the pickle asked for, allowed or not.

    ``torch_free`` (metadata mode, for pickles read only as metadata): ``torch.Size``,
    ``torch.<dtype>``, the strided layout, storage classes and the tensor rebuilders resolve to
    a checked tuple, a :class:`~ckpt_ir.dtypes.DType`, a layout name and
    :mod:`~ckpt_ir.safety.unpickler.records` (after the default rules' checks), so a DCP
    ``.metadata`` or a ``torch.save`` archive loads without importing torch. Any other torch
    global raises :class:`_NeedsTorch`: the caller redoes the load in the default mode, so
    nothing is admitted that the default mode refuses.
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, *, where: str = "<memory>",
                 storages: StorageLoader | None = None, torch_free: bool = False) -> None:
        super().__init__(file, encoding="utf-8")
        self.where = where
        self.globals_seen: set[tuple[str, str]] = set()
        self._storages = storages
        self._torch_free = torch_free

    # ---- names ----

    def find_class(self, module: str, name: str) -> Any:
        self.globals_seen.add((module, name))
        module = _MODULE_ALIASES.get(module, module)
        if self._torch_free:
            rule = _metadata_rule(module, name) or _base_table().get((module, name))
            if rule is None and module.split(".", 1)[0] == "torch":
                raise _NeedsTorch(f"{module}.{name}")
        else:
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
        if self._torch_free:
            dtype = storage_type.dtype if type(storage_type) is records.StorageClass else None
        else:
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
        if rule is not None and rule.new_args is not None and not kwargs:
            return rule.new_args(*args)  # named tuples (DTensor's TensorMeta): checked fields
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
        if cls in sharded_tensor.CLASSES:
            sharded_tensor.set_state(inst, state)  # FSDP1 ShardedTensor parts: torch's fields
            return
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
                if self._torch_free:
                    dcp_types.set_properties_state_as_data(inst, state)
                else:
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
              storages: StorageLoader | None = None, *, torch_free: bool = False) -> Any:
    try:
        result = RestrictedUnpickler(io.BytesIO(data), where=where, storages=storages,
                                     torch_free=torch_free).load()
        _check_disjoint_views(_check_graph(result, len(data)))
        return result
    except _NeedsTorch:
        raise  # metadata mode: the caller loads again in the default mode
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
