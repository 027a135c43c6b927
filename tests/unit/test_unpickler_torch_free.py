"""The restricted unpickler's metadata mode (``torch_free=True``): a DCP ``.metadata`` read as
data without importing torch (``ckpt-ir inspect`` of mcore-dist, issue #17 target 3b).

What it must keep: the same values as the default mode (torch.Size -> tuple, torch.<dtype> ->
ckpt-ir's DType of that name, the strided layout -> its name, the memory format -> its
encoding), and exactly the same refusals.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import pickle
import re
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

import ckpt_ir
from ckpt_ir import dcp_types, dtypes
from ckpt_ir.converters.per_rank import _as_tensor
from ckpt_ir.converters.storage.dcp_files import read_index
from ckpt_ir.errors import CheckpointError
from ckpt_ir.safety.unpickler import load_pickle, load_torch_buffer
from ckpt_ir.safety.unpickler.allow_list import _STORAGE_CLASSES, STRIDED, LayoutName
from ckpt_ir.safety.unpickler.records import TensorRecord
from tests.fixtures import write_hf

_ALL_DTYPES = [v for v in vars(dtypes).values() if isinstance(v, dtypes.DType)]


@pytest.mark.parametrize("dtype", _ALL_DTYPES, ids=str)
def test_each_dtype_loads_as_the_dtype_torch_names_so(dtype: dtypes.DType) -> None:
    # Metadata mode resolves the global torch.<name> to the DType of that name, so each name
    # must be torch's dtype of that name, and torch must pickle it under that name.
    real = getattr(torch, dtype.name)
    assert isinstance(real, torch.dtype) and str(real) == str(dtype)
    data = pickle.dumps(real, protocol=2)
    assert load_pickle(data, torch_free=True) is dtype
    assert load_pickle(data) is real


def _as_data(obj: Any) -> Any:
    """DCP metadata from either mode as comparable nested tuples, torch objects as ckpt-ir's."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return (cls.__name__, tuple(sorted((k, _as_data(v)) for k, v in vars(obj).items())))
    if isinstance(obj, dict):
        return ("dict", frozenset((_as_data(k), _as_data(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):  # torch.Size too
        return ("seq", tuple(_as_data(v) for v in obj))
    if isinstance(obj, torch.dtype):
        return dtypes.from_torch(obj)
    if isinstance(obj, torch.layout):
        return str(obj)
    if isinstance(obj, LayoutName):
        return obj.name
    if isinstance(obj, torch.memory_format):
        return next(e for e, f in dcp_types._memory_formats().items() if f == obj)
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def _torch_dcp_metadata(tmp_path: Path) -> bytes:
    state = {"w": torch.zeros(4, 6, dtype=torch.bfloat16), "n": torch.arange(3),
             "f": torch.ones(2, 2, 2), "e": torch.zeros(0, 5, dtype=torch.float16),
             "obj": [None, "x"]}
    dcp.save(state, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    return (tmp_path / ".metadata").read_bytes()


def _ckpt_ir_metadata(tmp_path: Path) -> bytes:
    write_hf(tmp_path / "hf")
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "dist", "mcore-dist")
    return (tmp_path / "dist" / ".metadata").read_bytes()


@pytest.mark.parametrize("writer", [_torch_dcp_metadata, _ckpt_ir_metadata],
                         ids=["torch-dcp", "ckpt-ir"])
def test_metadata_mode_reads_the_values_the_default_mode_reads(tmp_path: Path, writer) -> None:
    data = writer(tmp_path)
    default, free = load_pickle(data), load_pickle(data, torch_free=True)
    assert type(free) is dcp_types.Metadata
    props = [e.properties for e in free.state_dict_metadata.values()
             if isinstance(e, dcp_types.TensorStorageMetadata)]
    assert props and all(isinstance(p.dtype, dtypes.DType) and p.layout is STRIDED
                         and p.memory_format is dcp_types.MemFormatEncoding.TORCH_CONTIGUOUS_FORMAT
                         for p in props)
    assert _as_data(free) == _as_data(default)


# Runs in a fresh interpreter: reading a .metadata (and building the DCP index over it) in
# metadata mode leaves torch unimported.
_PROBE = """
import json, sys
from ckpt_ir.converters.per_rank import _as_tensor
from ckpt_ir.converters.storage.dcp_files import read_index
index = read_index(sys.argv[1])
print(json.dumps({"torch": "torch" in sys.modules,
                  "tensors": {k: [list(t.shape), t.dtype.name] for k, t in index.tensors.items()},
                  "blobs": sorted(index.blobs)}))
"""


def test_read_index_imports_no_torch_and_matches_the_trusted_read(tmp_path: Path) -> None:
    _ckpt_ir_metadata(tmp_path)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "dist")],
                         capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout)
    assert got["torch"] is False
    trusted = read_index(tmp_path / "dist", trust=True)  # plain pickle: torch's own objects
    assert got["tensors"] == {k: [list(t.shape), t.dtype.name]
                              for k, t in trusted.tensors.items()}
    assert got["blobs"] == sorted(trusted.blobs) and got["tensors"]


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _call(module: str, name: str, args: bytes) -> bytes:
    # protocol 2: GLOBAL, MARK args TUPLE, REDUCE, STOP
    return b"\x80\x02" + _global(module, name) + b"(" + args + b"tR."


_HOSTILE = {
    "os.system": _call("os", "system", b"X\x04\x00\x00\x00echo"),
    "negative size": _call("torch", "Size", b"(J\xff\xff\xff\xfft"),
    "size of floats": _call("torch", "Size", b"(G?\xf0\x00\x00\x00\x00\x00\x00t"),
    "size of 65 dims": _call("torch", "Size", b"(" + b"K\x01" * 65 + b"t"),
    "size with two args": _call("torch", "Size", b"(tK\x01"),
    "unknown layout": _call("torch.serialization", "_get_layout", b"X\x0b\x00\x00\x00torch.bogus"),
    "layout not a str": _call("torch.serialization", "_get_layout", b"K\x01"),
    "sparse layout": _call("torch.serialization", "_get_layout",
                           b"X\x10\x00\x00\x00torch.sparse_coo"),
    "calling a dtype": _call("torch", "bfloat16", b""),
    "an unknown dtype name": b"\x80\x02" + _global("torch", "bfloat17") + b".",
    "an alias dtype": b"\x80\x02" + _global("torch", "half") + b".",
    "a quantized dtype": b"\x80\x02" + _global("torch", "quint8") + b".",
    "a torch function": _call("torch.nn.functional", "silu", b""),
    "a tensor rebuilder without a storage": _call("torch._utils", "_rebuild_tensor_v2",
                                                  b"NK\x00)))\x89}"),
    "a device": _call("torch", "device", b"X\x03\x00\x00\x00cpu"),
    "size as a class": b"\x80\x02" + _global("torch", "Size") + b")\x81.",
    "a defaultdict of sizes": _call("collections", "defaultdict", _global("torch", "Size")),
    "properties with a bad encoding": (
        b"\x80\x02" + _global("torch.distributed.checkpoint.metadata", "TensorProperties")
        + b")\x81(" + _global("torch", "bfloat16") + b"N\x89K\x07\x89tb."),
}


@pytest.mark.parametrize("data", list(_HOSTILE.values()), ids=list(_HOSTILE))
def test_metadata_mode_refuses_what_the_default_mode_refuses(data: bytes) -> None:
    # The same outcome in both modes: the same error and message, or values that are the same
    # data (a sparse layout or an alias dtype resolve through torch's own rules in both). A
    # refused call names the object it resolved to ('torch.Size' / '..._size_as_tuple').
    outcomes = []
    for torch_free in (False, True):
        try:
            outcomes.append(("ok", _as_data(load_pickle(data, torch_free=torch_free))))
        except CheckpointError as exc:
            message = re.sub(r"^refusing to call '[^']*'", "refusing to call '…'", str(exc))
            outcomes.append((type(exc).__name__, message))
    assert outcomes[0] == outcomes[1]


# ---- torch.save archives in metadata mode (per-rank `inspect`) -------------------------------


def _saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8) if t.numel() and t.is_contiguous() else \
        t.detach().contiguous().reshape(-1).view(torch.uint8)


def _outcome(data: bytes, metadata_only: bool) -> Any:
    """What a load gives, as comparable data: tensors and tensor records alike as their dtype,
    geometry and bytes; or the error."""
    def walk(obj: Any) -> Any:
        if isinstance(obj, TensorRecord):
            obj = _as_tensor(obj)  # a view of the same mapped bytes
        if isinstance(obj, torch.Tensor):
            return ("tensor", dtypes.of(obj), tuple(obj.shape), obj.stride(),
                    obj.storage_offset(), bytes(_bits(obj).numpy()))
        if isinstance(obj, dict):
            return ("dict", type(obj).__name__, tuple((k, walk(v)) for k, v in obj.items()))
        if isinstance(obj, (list, tuple)):
            return ("seq", tuple(walk(v) for v in obj))
        if isinstance(obj, argparse.Namespace):
            return ("ns", walk(vars(obj)))
        if isinstance(obj, torch.dtype):
            return dtypes.from_torch(obj)
        if isinstance(obj, io.BytesIO):
            return ("bytesio", obj.getvalue())
        if isinstance(obj, np.ndarray):
            return ("array", obj.dtype.str, obj.tobytes())
        return obj

    try:
        return ("ok", walk(load_torch_buffer(bytearray(data), path="r.pt",
                                             metadata_only=metadata_only)))
    except CheckpointError as exc:
        return (type(exc).__name__,
                re.sub(r"^refusing to call '[^']*'", "refusing to call '…'", str(exc)))


def _base() -> torch.Tensor:
    return torch.arange(48, dtype=torch.float32).reshape(6, 8).to(torch.bfloat16)


_ARCHIVES = {
    **{f"dtype {d}": (lambda d=d: {"w": torch.ones(3, 2, dtype=d)})
       for d in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                 torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint16,
                 torch.uint32, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64)},
    "views of one storage": lambda: (lambda b: {"a": b[0:2], "b": b[2:4],
                                                 "c": b[4:, ::2]})(_base()),
    "tied weights": lambda: (lambda b: {"a": b, "b": b})(_base()),
    "empty, scalar, parameter": lambda: {"e": torch.zeros(0, 5), "s": torch.tensor(2.5),
                                         "p": torch.nn.Parameter(torch.ones(2, 2))},
    "a parameter with attributes": lambda: {"p": (lambda p: (setattr(p, "tag", 1), p)[1])(
        torch.nn.Parameter(torch.ones(2)))},
    "megatron-like file": lambda: {
        "model": OrderedDict(w=torch.ones(4, 4, dtype=torch.bfloat16),
                             x=io.BytesIO(b"extra")),
        "args": argparse.Namespace(params_dtype=torch.bfloat16, tensor_model_parallel_size=2),
        "rng_state": [{"np": np.random.RandomState(0).get_state(),
                       "torch": torch.get_rng_state()}],
        "iteration": 7},
    "a quantized tensor": lambda: {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0,
                                                                  torch.quint8)},
    "stride 0": lambda: {"w": _base().reshape(-1)[:1].as_strided((2**16, 2**15), (0, 0))},
    "expanded": lambda: {"w": _base()[0:1].expand(5, 8)},
    "overlap": lambda: (lambda b: {"a": b[0:4], "b": b[2:6]})(_base()),
    "inside": lambda: (lambda b: {"a": b, "b": b[1:4]})(_base()),
    "same bytes, another view": lambda: (lambda b: {"a": b[0:2], "b": b[0:2].t()})(_base()),
    "a device": lambda: {"d": torch.device("cpu")},
    "a torch function": lambda: {"f": torch.nn.functional.silu},
}


@pytest.mark.parametrize("build", list(_ARCHIVES.values()), ids=list(_ARCHIVES))
def test_archives_in_metadata_mode_read_and_refuse_what_the_default_mode_does(build) -> None:
    data = _saved(build())
    default, records = _outcome(data, False), _outcome(data, True)
    assert records == default


def test_metadata_mode_builds_records_not_tensors() -> None:
    got = load_torch_buffer(bytearray(_saved({"w": _base(), "v": _base()[1:3, ::2]})),
                            metadata_only=True)
    assert all(type(t) is TensorRecord for t in got.values())
    assert (got["v"].shape, got["v"].stride(), got["v"].offset, got["v"].dtype) == \
        ((2, 4), (8, 2), 8, dtypes.BFLOAT16)
    assert got["w"].contiguous_bytes() == bytes(_bits(_base()).numpy())
    assert got["v"].contiguous_bytes() is None


@pytest.mark.parametrize("name", list(_STORAGE_CLASSES))
def test_each_storage_class_stands_for_torchs_dtype(name: str) -> None:
    # Metadata mode reads a storage's element type from its class's name.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _STORAGE_CLASSES[name].torch == getattr(torch, name).dtype
