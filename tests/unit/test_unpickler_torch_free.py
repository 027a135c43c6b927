"""The restricted unpickler's metadata mode (``torch_free=True``): a DCP ``.metadata`` read as
data without importing torch (``ckpt-ir inspect`` of mcore-dist, issue #17 target 3b).

What it must keep: the same values as the default mode (torch.Size -> tuple, torch.<dtype> ->
ckpt-ir's DType of that name, the strided layout -> its name, the memory format -> its
encoding), and exactly the same refusals.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path, PurePath
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

import ckpt_ir
from ckpt_ir import dcp_types, dtypes
from ckpt_ir.converters.storage.dcp_files import read_index
from ckpt_ir.errors import CheckpointError
from ckpt_ir.safety.unpickler import load_pickle
from ckpt_ir.safety.unpickler.allow_list import STRIDED, LayoutName
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
