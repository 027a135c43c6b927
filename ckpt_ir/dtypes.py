"""ckpt-ir's own element types: what the IR's metadata says about a tensor, without torch.

:class:`~ckpt_ir.ir.TensorSpec` carries a :class:`DType`, not a ``torch.dtype``, so that
planning (readers' headers, the planner, the tables) never imports torch: ``import torch`` is
1.3-1.7 s, most of what ``ckpt-ir inspect`` would cost (docs/performance.md). Code that touches
tensors converts at that boundary, and only there: ``spec.dtype.torch`` for torch, and
:func:`of` / :func:`from_torch` back.

There is exactly one :class:`DType` object per element type (``is`` and ``==`` agree, pickling
keeps that), named like torch's attribute (``"bfloat16"``) and printed like torch prints its
dtypes (``torch.bfloat16``), so messages read the same whether they name a tensor's dtype or a
spec's. Comparing a :class:`DType` with a ``torch.dtype`` is a bug (always unequal) and raises
:class:`TypeError` instead of quietly answering ``False``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckpt_ir.errors import FormatError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BFLOAT16",
    "BOOL",
    "FLOAT8_E4M3FN",
    "FLOAT8_E5M2",
    "FLOAT16",
    "FLOAT32",
    "FLOAT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "DType",
    "from_safetensors",
    "from_torch",
    "named",
    "of",
    "parse",
]


class DType:
    """One element type: ``name`` (torch's attribute name), ``itemsize`` in bytes, whether it
    is floating point, and its safetensors code (None: safetensors has none)."""

    __slots__ = ("is_floating_point", "itemsize", "name", "safetensors")

    name: str
    itemsize: int
    is_floating_point: bool
    safetensors: str | None

    def __init__(self, name: str, itemsize: int, is_floating_point: bool,
                 safetensors: str | None) -> None:
        if name in _BY_NAME:
            raise ValueError(f"dtype {name!r} is already defined (DTypes are unique)")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "itemsize", itemsize)
        object.__setattr__(self, "is_floating_point", is_floating_point)
        object.__setattr__(self, "safetensors", safetensors)
        _BY_NAME[name] = self
        if safetensors is not None:
            _BY_SAFETENSORS[safetensors] = self

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("DType is immutable")

    @property
    def torch(self) -> torch.dtype:
        """The ``torch.dtype`` (imports torch: call it only where tensors are touched)."""
        import torch

        return getattr(torch, self.name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DType):
            return self is other
        if _is_torch_dtype(other):
            raise TypeError(f"comparing ckpt-ir's {self!r} with {other!r}: convert at the "
                            "boundary (dtypes.of(tensor), spec.dtype.torch)")
        return NotImplemented

    __hash__ = object.__hash__

    def __str__(self) -> str:
        return f"torch.{self.name}"

    def __repr__(self) -> str:
        return f"DType({self.name!r})"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Unpickled (worker processes) as the same interned object.
        return named, (self.name,)


def _is_torch_dtype(value: object) -> bool:
    # Without importing torch: a torch.dtype's class is torch.dtype.
    cls = type(value)
    return cls.__name__ == "dtype" and cls.__module__ == "torch"


_BY_NAME: dict[str, DType] = {}
_BY_SAFETENSORS: dict[str, DType] = {}

BOOL = DType("bool", 1, False, "BOOL")
UINT8 = DType("uint8", 1, False, "U8")
INT8 = DType("int8", 1, False, "I8")
INT16 = DType("int16", 2, False, "I16")
UINT16 = DType("uint16", 2, False, "U16")
INT32 = DType("int32", 4, False, "I32")
UINT32 = DType("uint32", 4, False, "U32")
INT64 = DType("int64", 8, False, "I64")
UINT64 = DType("uint64", 8, False, "U64")
FLOAT16 = DType("float16", 2, True, "F16")
BFLOAT16 = DType("bfloat16", 2, True, "BF16")
FLOAT32 = DType("float32", 4, True, "F32")
FLOAT64 = DType("float64", 8, True, "F64")
FLOAT8_E4M3FN = DType("float8_e4m3fn", 1, True, "F8_E4M3")
FLOAT8_E5M2 = DType("float8_e5m2", 1, True, "F8_E5M2")
# Element types a torch.save / DCP file may hold that safetensors has no code for.
COMPLEX64 = DType("complex64", 8, False, None)
COMPLEX128 = DType("complex128", 16, False, None)
FLOAT8_E4M3FNUZ = DType("float8_e4m3fnuz", 1, True, None)
FLOAT8_E5M2FNUZ = DType("float8_e5m2fnuz", 1, True, None)
FLOAT8_E8M0FNU = DType("float8_e8m0fnu", 1, True, None)


def named(name: str) -> DType:
    """The dtype torch calls ``torch.<name>`` (``"bfloat16"``); KeyError if ckpt-ir has none."""
    return _BY_NAME[name]


def lookup(name: str) -> DType | None:
    """:func:`named`, or None."""
    return _BY_NAME.get(name)


def from_safetensors(code: str) -> DType | None:
    """The dtype of a safetensors header code (``"BF16"``), or None if ckpt-ir has none."""
    return _BY_SAFETENSORS.get(code)


def from_torch(dtype: torch.dtype) -> DType:
    """ckpt-ir's dtype for a ``torch.dtype`` (a tensor's, a torch.save file's).

    Raises:
        FormatError: a dtype ckpt-ir does not handle (quantized, complex32...).
    """
    found = _BY_NAME.get(str(dtype).removeprefix("torch."))
    if found is None:
        raise FormatError(f"dtype {dtype} is not supported")
    return found


def of(tensor: torch.Tensor) -> DType:
    """The dtype of a tensor."""
    return from_torch(tensor.dtype)


_ALIASES = {"bf16": BFLOAT16, "fp16": FLOAT16, "half": FLOAT16, "fp32": FLOAT32,
            "float": FLOAT32, "fp64": FLOAT64}


def parse(name: str) -> DType:
    """A floating-point dtype a user names: ``"bf16"`` / ``"bfloat16"`` / ``"torch.bfloat16"``.

    Raises:
        FormatError: not one of bf16, fp16, fp32, fp64 (in any of those spellings).
    """
    key = name.removeprefix("torch.").lower()
    found = _ALIASES.get(key) or _BY_NAME.get(key)
    if found is None or found not in (BFLOAT16, FLOAT16, FLOAT32, FLOAT64):
        raise FormatError(f"unknown dtype {name!r}; expected one of bf16, fp16, fp32")
    return found


def resolve(value: str | DType | torch.dtype | None) -> DType | None:
    """A floating-point dtype as a caller of the public API gives it: a name (:func:`parse`),
    a :class:`DType` or a ``torch.dtype``; None stays None."""
    if value is None or isinstance(value, DType):
        return value
    if isinstance(value, str):
        return parse(value)
    if _is_torch_dtype(value):
        return from_torch(value)
    raise TypeError(f"a dtype is a name, a ckpt_ir.dtypes.DType or a torch.dtype, not {value!r}")
