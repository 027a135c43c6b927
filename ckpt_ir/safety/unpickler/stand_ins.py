"""Stand-ins for Megatron / Transformer Engine globals: inert classes that record what a
pickle asked of them, so Megatron is never imported.

Part of :mod:`ckpt_ir.safety.unpickler`; its docstring states the trust model."""

from __future__ import annotations

import reprlib
from typing import Any, ClassVar

_MAX_CACHED_STAND_INS = 4096


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
