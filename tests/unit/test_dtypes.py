"""ckpt-ir's own dtypes (ckpt_ir/dtypes.py) against torch's, which they stand for."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from ckpt_ir import dtypes
from ckpt_ir.converters.storage.safetensors_file import DTYPE_TO_ST
from ckpt_ir.dtypes import DType
from ckpt_ir.errors import FormatError

ALL = [dtypes.named(name) for name in (
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "complex64",
    "complex128", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")]


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_each_dtype_matches_the_torch_dtype_it_stands_for(dtype: DType) -> None:
    t = dtype.torch
    assert isinstance(t, torch.dtype)
    assert (dtype.itemsize, dtype.is_floating_point) == (t.itemsize, t.is_floating_point)
    assert str(dtype) == str(t)  # messages read the same for a spec's dtype and a tensor's
    assert dtypes.from_torch(t) is dtype
    assert dtypes.of(torch.empty(0, dtype=t)) is dtype


def test_safetensors_codes_are_the_readers_and_writers_table() -> None:
    coded = [d for d in ALL if d.safetensors is not None]
    assert {d: d.safetensors for d in coded} == DTYPE_TO_ST
    assert all(dtypes.from_safetensors(d.safetensors) is d for d in coded)
    assert dtypes.from_safetensors("F8_E8M0") is None  # valid safetensors, not read by ckpt-ir


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_one_object_per_dtype_through_pickle_and_copy(dtype: DType) -> None:
    # Worker processes get plans by pickle; identity is what == means.
    assert pickle.loads(pickle.dumps(dtype)) is dtype
    assert copy.deepcopy(dtype) is dtype and copy.copy(dtype) is dtype
    assert dtypes.named(dtype.name) is dtype


def test_comparing_with_a_torch_dtype_is_refused_not_false() -> None:
    # Always-unequal comparisons would silently cast every tensor; a TypeError names the fix.
    with pytest.raises(TypeError, match="convert at the boundary"):
        _ = dtypes.BFLOAT16 == torch.bfloat16
    with pytest.raises(TypeError, match="convert at the boundary"):
        _ = torch.float32 in (dtypes.FLOAT32, dtypes.BFLOAT16)
    assert dtypes.BFLOAT16 != dtypes.FLOAT16 and dtypes.BFLOAT16 != "bfloat16"


def test_dtypes_are_immutable_and_unique() -> None:
    with pytest.raises(AttributeError):
        dtypes.BFLOAT16.itemsize = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="already defined"):
        DType("bfloat16", 2, True, "BF16")


@pytest.mark.parametrize(("given", "expected"), [
    ("bf16", dtypes.BFLOAT16), ("bfloat16", dtypes.BFLOAT16), ("torch.bfloat16", dtypes.BFLOAT16),
    ("BF16", dtypes.BFLOAT16), ("fp16", dtypes.FLOAT16), ("half", dtypes.FLOAT16),
    ("float", dtypes.FLOAT32), ("fp32", dtypes.FLOAT32), ("float64", dtypes.FLOAT64),
])
def test_parse_reads_the_names_users_give(given: str, expected: DType) -> None:
    assert dtypes.parse(given) is expected


@pytest.mark.parametrize("given", ["int8", "float8_e4m3fn", "bool", "f32", "", "torch."])
def test_parse_refuses_anything_but_the_float_dtypes(given: str) -> None:
    with pytest.raises(FormatError, match="expected one of bf16, fp16, fp32"):
        dtypes.parse(given)


def test_resolve_takes_a_name_a_dtype_or_a_torch_dtype() -> None:
    assert dtypes.resolve(None) is None
    assert dtypes.resolve("bf16") is dtypes.BFLOAT16
    assert dtypes.resolve(dtypes.FLOAT16) is dtypes.FLOAT16
    assert dtypes.resolve(torch.float32) is dtypes.FLOAT32
    with pytest.raises(TypeError, match="a dtype is a name"):
        dtypes.resolve(4)  # type: ignore[arg-type]


def test_from_torch_refuses_what_ckpt_ir_does_not_handle() -> None:
    with pytest.raises(FormatError, match=r"dtype torch\.qint8 is not supported"):
        dtypes.from_torch(torch.qint8)
