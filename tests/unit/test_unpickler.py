"""The restricted unpickler: bit-identical to torch.load where allowed, inert everywhere else."""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import io
import logging
import os
import pickle
import random
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

from ckpt_ir import dcp_types
from ckpt_ir.converters.storage.dcp_files import DcpDataFile, DcpReader, write_metadata
from ckpt_ir.errors import CorruptCheckpointError, FormatError, UnsafeCheckpointError
from ckpt_ir.safety import unpickler
from ckpt_ir.safety.unpickler import (
    RestrictedUnpickler,
    StandIn,
    load_pickle,
    load_torch,
    load_torch_bytes,
)

DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool, torch.complex64, torch.complex128,
]


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, -0.0, subnormals) of ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for n in shape:
        numel *= n
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensor(expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert type(actual) is type(expected)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.stride() == expected.stride()
    assert actual.storage_offset() == expected.storage_offset()
    assert actual.requires_grad == expected.requires_grad
    assert torch.equal(bits(actual), bits(expected))


def saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def trusted(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def mapped_file(ptr: int) -> str | None:
    """The file whose mapping contains address ``ptr`` (Linux /proc), or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= ptr < high:
                return fields[5] if len(fields) > 5 else None
    return None


# ---- tensors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_load_torch_round_trips_every_dtype(dtype: torch.dtype) -> None:
    obj = {"t": random_bits((5, 7), dtype), "row": random_bits((3,), dtype, seed=1)}
    data = saved(obj)
    expected, actual = trusted(data), load_torch_bytes(data)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert_same_tensor(expected[key], actual[key])


def test_load_torch_keeps_views_sharing_one_storage() -> None:
    base = random_bits((8, 8), torch.bfloat16)
    flat = base.reshape(-1)
    obj = {
        "head": base[0:2],
        "tied": base[0:2],  # the same view twice: tied weights
        "strided": base[2:4, ::2],
        "transposed": base[4:6].t(),
        "flat_tail": flat[48:],
    }
    data = saved(obj)
    expected, actual = trusted(data), load_torch_bytes(data)
    for key in obj:
        assert_same_tensor(expected[key], actual[key])
    pointers = {actual[k].untyped_storage().data_ptr() for k in obj}
    assert len(pointers) == 1  # one storage, as torch.load gives


@pytest.mark.parametrize(("views", "message"), [
    # A 2-byte storage declaring 4 GiB: stride-0 views are not backed by bytes.
    (lambda b: {"w": b.reshape(-1)[:1].as_strided((2**16, 2**15), (0, 0))},
     "tensor of size (65536, 32768) with strides (0, 0) addresses some of its storage's "
     "elements more than once"),
    (lambda b: {"w": b[0:1].expand(5, 8)},
     "tensor of size (5, 8) with strides (0, 1) addresses some of its storage's elements "
     "more than once"),
    (lambda b: {"w": b.reshape(-1).as_strided((8, 8), (1, 1))},
     "tensor of size (8, 8) with strides (1, 1) addresses some"),
    (lambda b: {"a": b[0:4], "b": b[2:6]},
     "two tensors share storage bytes without being the same view ((4, 8) and (4, 8))"),
    (lambda b: {"a": b, "b": b[1:4]},
     "two tensors share storage bytes without being the same view ((6, 8) and (3, 8))"),
    (lambda b: {"a": b[0:2], "b": b[0:2].t()},
     "two tensors share storage bytes without being the same view"),
], ids=["stride-0", "expanded", "self-overlap", "overlap", "inside", "same-bytes-other-view"])
def test_views_that_reuse_bytes_are_corrupt(views: Any, message: str) -> None:
    data = saved(views(random_bits((6, 8), torch.bfloat16)))
    with pytest.raises(CorruptCheckpointError, match="cannot unpickle") as info:
        load_torch_bytes(data)
    assert message in str(info.value)


def test_load_torch_handles_zero_size_scalar_and_parameters() -> None:
    tagged = torch.ones(3)
    tagged.layer_hint = "qkv"  # python attributes: saved through _rebuild_from_type_v2
    obj = [
        torch.empty(0), torch.empty(3, 0, 2, dtype=torch.bfloat16), torch.tensor(2.5),
        torch.nn.Parameter(torch.arange(4.0)), torch.nn.Parameter(torch.ones(2), False),
        tagged,
    ]
    data = saved(obj)
    expected, actual = trusted(data), load_torch_bytes(data)
    for e, a in zip(expected, actual, strict=True):
        assert_same_tensor(e, a)
    assert actual[5].layer_hint == "qkv"


def test_load_torch_round_trips_nested_containers_and_rng_state() -> None:
    random.seed(3)
    np.random.seed(4)
    obj = {
        "args": argparse.Namespace(lr=1e-4, params_dtype=torch.bfloat16, name="x", tp=None),
        "ordered": OrderedDict(b=[1, (2, 3.5)], a={"deep": [None, True]}),
        "factory": defaultdict(list, {"k": [1]}),
        "misc": [b"raw", bytearray(b"ba"), {1, 2}, frozenset({3}), 1 + 2j, slice(1, None, 2)],
        "device": torch.device("cpu"),
        "extra_state": io.BytesIO(b"te-fp8-meta"),
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "np_scalars": [np.float32(1.5), np.int64(-3)],
        "torch_rng_state": torch.get_rng_state(),
    }
    data = saved(obj)
    expected, actual = trusted(data), load_torch_bytes(data)
    assert actual["args"] == expected["args"]
    assert actual["ordered"] == expected["ordered"] and type(actual["ordered"]) is OrderedDict
    assert actual["factory"] == expected["factory"]
    assert actual["factory"].default_factory is list
    assert actual["misc"] == expected["misc"]
    assert actual["device"] == expected["device"]
    assert actual["extra_state"].getvalue() == b"te-fp8-meta"
    assert actual["random_rng_state"] == expected["random_rng_state"]
    name, keys, *rest = actual["np_rng_state"]
    assert name == "MT19937" and keys.dtype == np.uint32
    assert np.array_equal(keys, expected["np_rng_state"][1])
    assert tuple(rest) == tuple(expected["np_rng_state"][2:])
    assert actual["np_scalars"] == expected["np_scalars"]
    assert type(actual["np_scalars"][0]) is np.float32
    assert_same_tensor(expected["torch_rng_state"], actual["torch_rng_state"])


def test_tensors_are_zero_copy_views_of_the_file(tmp_path: Path) -> None:
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    path = tmp_path / "model.pt"
    torch.save({"w": random_bits((64, 64), torch.bfloat16), "b": torch.ones(3)}, path)
    before = path.read_bytes()
    loaded = load_torch(path)
    for tensor in loaded.values():
        assert mapped_file(tensor.data_ptr()) == str(path)
    # Private mapping: edits stay in memory and never reach the checkpoint.
    loaded["b"].add_(1)
    assert torch.equal(loaded["b"], torch.full((3,), 2.0))
    assert path.read_bytes() == before


def test_load_torch_reads_archives_embedded_at_any_offset(tmp_path: Path) -> None:
    first = saved({"a": random_bits((3, 5), torch.float32)})
    second = saved([random_bits((7,), torch.bfloat16, seed=2)])
    path = tmp_path / "blob.distcp"
    path.write_bytes(b"xyz" + first + b"q" + second + b"tail")
    got_first = load_torch(path, offset=3, length=len(first))
    got_second = load_torch(path, offset=4 + len(first), length=len(second))
    assert_same_tensor(trusted(first)["a"], got_first["a"])
    assert_same_tensor(trusted(second)[0], got_second[0])


# ---- DCP metadata ----------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """DCP metadata as nested, hashable (torch's class name, fields) tuples: torch's classes and
    ckpt-ir's mirrors of them compare equal exactly when they hold the same values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        name = dcp_types.DCP_CLASSES.get(cls, (cls.__module__, cls.__name__))
        return (name, tuple(sorted((k, _plain(v)) for k, v in vars(obj).items())))
    if isinstance(obj, dict):
        return ("dict", frozenset((_plain(k), _plain(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def test_load_pickle_reads_dcp_metadata_as_the_mirror_classes(tmp_path: Path) -> None:
    state = {"w": random_bits((4, 6), torch.bfloat16), "obj": [None], "n": torch.arange(3)}
    dcp.save(state, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    data = (tmp_path / ".metadata").read_bytes()
    expected, actual = pickle.loads(data), load_pickle(data, path="x/.metadata")
    assert type(actual) is dcp_types.Metadata
    assert _plain(actual) == _plain(expected)


# ---- Megatron stand-ins ----------------------------------------------------------------------
# Megatron is never imported here: pickles are written with placeholder classes of this module
# and their GLOBAL opcodes renamed (protocol 2 writes "c<module>\n<name>\n").


class ModelTypePlaceholder:
    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (ModelTypePlaceholder, (self.value,))


class ConfigPlaceholder:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class MCoreMetadataPlaceholder(Metadata):
    pass


def renamed(data: bytes, placeholder: type, module: str, name: str) -> bytes:
    old = f"c{placeholder.__module__}\n{placeholder.__qualname__}\n".encode()
    assert old in data
    return data.replace(old, f"c{module}\n{name}\n".encode())


def megatron_pickle(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=2)
    data = renamed(data, ModelTypePlaceholder, "megatron.core.enums", "ModelType")
    if b"ConfigPlaceholder" in data:
        data = renamed(data, ConfigPlaceholder,
                       "megatron.core.transformer.transformer_config", "TransformerConfig")
    return data


def test_megatron_enum_becomes_an_inert_stand_in() -> None:
    raw = b"\x80\x02cmegatron.core.enums\nModelType\nK\x01\x85R."  # GLOBAL, 1, TUPLE1, REDUCE
    value = load_pickle(raw)
    assert isinstance(value, StandIn)
    assert (value.module, value.qualname, value.args) == ("megatron.core.enums", "ModelType", (1,))
    assert value == load_pickle(raw) and type(value) is type(load_pickle(raw))


def test_namespace_with_megatron_enum_dtype_and_config_loads() -> None:
    args = argparse.Namespace(
        model_type=ModelTypePlaceholder(1), params_dtype=torch.bfloat16,
        config=ConfigPlaceholder(num_layers=4, hidden_size=64), seq_length=128)
    loaded = load_pickle(megatron_pickle(args))
    assert isinstance(loaded, argparse.Namespace)
    assert loaded.params_dtype is torch.bfloat16 and loaded.seq_length == 128
    assert loaded.model_type.qualname == "ModelType" and loaded.model_type.args == (1,)
    config = loaded.config
    assert config.module == "megatron.core.transformer.transformer_config"
    assert config.state == {"num_layers": 4, "hidden_size": 64}
    assert config.num_layers == 4  # dict state readable as attributes


def test_namespace_with_a_function_reference_is_refused() -> None:
    # Refusing callables outside the list is the documented choice (module docstring).
    args = argparse.Namespace(model_type=ModelTypePlaceholder(1),
                              activation_func=torch.nn.functional.silu)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pickle(megatron_pickle(args), path="ckpt/common.pt")
    assert str(info.value) == (
        "refusing to unpickle global 'torch.nn.functional.silu' in ckpt/common.pt: not on the "
        "allow-list (pass trust_pickles only for files you trust)")
    assert info.value.path == "ckpt/common.pt"


def test_mcore_metadata_comes_back_as_torch_metadata() -> None:
    md = MCoreMetadataPlaceholder(state_dict_metadata={}, storage_data={}, version="1.0.0")
    md.mcore_data = {"w": {"nd_reformulated_orig_global_shape": (4, 4)}}
    data = renamed(pickle.dumps(md, protocol=2), MCoreMetadataPlaceholder,
                   "megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata")
    loaded = load_pickle(data)
    assert type(loaded) is dcp_types.Metadata
    assert loaded.mcore_data == md.mcore_data and loaded.version == "1.0.0"


# ---- refusals --------------------------------------------------------------------------------

def p2(*ops: bytes) -> bytes:
    return b"\x80\x02" + b"".join(ops) + b"."


def g(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def text(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s)) + s.encode()


@pytest.mark.parametrize(("data", "message"), [
    # getattr is a name on the list (protocol 2 spells FSDP1's ShardedTensor.ProcessGroupState
    # with it), callable for exactly that pair.
    (p2(g("builtins", "getattr"), text("x"), b"\x85R"),
     "refusing getattr('x'): only getattr(ShardedTensor, 'ProcessGroupState') is admitted in "
     "m.pkl (pass trust_pickles only for files you trust)"),
    (p2(g("numpy", "ndarray"), b"J\x00\x00\x00\x40\x85\x85R"),
     "refusing to call 'numpy.ndarray' while unpickling m.pkl: not on the allow-list of "
     "callables (pass trust_pickles only for files you trust)"),
    (p2(g("torch", "Tensor"), b")R"),
     "refusing to call 'torch.Tensor' while unpickling m.pkl: not on the allow-list of "
     "callables (pass trust_pickles only for files you trust)"),
    (p2(g("torch", "Size"), b"]K\x02a\x85R}b"),
     "refusing to set state on a torch.Size object while unpickling m.pkl "
     "(pass trust_pickles only for files you trust)"),
    (p2(b"\x82\x01"),
     "refusing pickle extension code 1 in m.pkl (pass trust_pickles only for files you trust)"),
])
def test_refusals_name_what_was_refused(data: bytes, message: str) -> None:
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pickle(data, path="m.pkl")
    assert str(info.value) == message


@pytest.mark.parametrize(("data", "message"), [
    # bytearray(2**40) would allocate a terabyte: only copies of data are admitted.
    (p2(g("builtins", "bytearray"), b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85R"),
     "cannot unpickle m.pkl: UnpicklingError: bytearray called with unsupported arguments"),
    # APPEND through a Namespace attribute named `append` must not call it.
    (p2(g("argparse", "Namespace"), b")\x81}", text("append"), g("builtins", "set"),
        b"sbK\x01a"),
     "cannot unpickle m.pkl: UnpicklingError: APPEND to something that is not a list"),
    (p2(g("collections", "defaultdict"), g("torch", "float32"), b"\x85R"),
     "cannot unpickle m.pkl: UnpicklingError: defaultdict factory is not allowed"),
    (b"\x80\x02]q\x00(K\x01",
     "cannot unpickle m.pkl: pickle data was truncated"),
    (p2(g("copyreg", "_reconstructor"), g("argparse", "Namespace"), g("builtins", "dict"),
        b"N\x87R"),
     "cannot unpickle m.pkl: UnpicklingError: copyreg._reconstructor only admits "
     "(cls, object, None)"),
    # A planted __deepcopy__ would be called by copy.deepcopy(namespace) later.
    (p2(g("argparse", "Namespace"), b")\x81}", text("__deepcopy__"), g("builtins", "set"),
        b"sb"),
     "cannot unpickle m.pkl: UnpicklingError: invalid state for Namespace"),
])
def test_misuse_of_allowed_names_is_corrupt(data: bytes, message: str) -> None:
    with pytest.raises(CorruptCheckpointError) as info:
        load_pickle(data, path="m.pkl")
    assert str(info.value) == message


def _ordered_dict_with_state(key: str) -> bytes:
    # OrderedDict() then BUILD {key: <the allowed `list` callable>}
    return p2(g("collections", "OrderedDict"), b")R}", text(key), g("builtins", "list"), b"sb")


@pytest.mark.parametrize("method", ["items", "get", "keys", "values", "move_to_end"])
def test_state_cannot_replace_a_method(method: str) -> None:
    # An instance attribute shadows a method: reader code calling .items() would call it.
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pickle(_ordered_dict_with_state(method), path="m.pkl")
    assert str(info.value) == (
        f"refusing state {method!r} for a OrderedDict: it would replace a method in m.pkl "
        f"(pass trust_pickles only for files you trust)")
    # Plain attributes still load (a state dict's OrderedDict carries _metadata this way).
    loaded = load_pickle(_ordered_dict_with_state("version"))
    assert type(loaded) is OrderedDict and loaded.version is list


NESTED = "objects are nested more than 200 levels deep"
KEY = "a dict key or set element is nested more than 200 levels deep or has more than 10000 parts"


@pytest.mark.parametrize(("data", "message"), [
    # CPython hashes a nested tuple by C recursion: a 1,000,000-deep key overflowed the stack.
    (p2(b"}K\x00" + b"\x85" * 1_000_000 + b"K\x01s"), KEY),
    (p2(b"(K\x00" + b"\x85" * 1000 + b"\x91"), KEY),  # frozenset element
    (p2(b"(K\x00" + b"\x85" * 1000 + b"K\x01d"), KEY),  # DICT
    (p2(b"\x8f(K\x00" + b"\x85" * 1000 + b"\x90"), KEY),  # ADDITEMS
    (p2(g("builtins", "set"), b"]K\x00" + b"\x85" * 1000 + b"a\x85R"), KEY),
    # 60 levels of (x, x): 2**60 nodes for hash to visit.
    (p2(b"}N" + b"q\x000h\x00h\x00\x86" * 60 + b"K\x01s"), KEY),
    (p2(b"K\x00" + b"\x85" * 300_000), NESTED),
    (p2(b"](" * 5000 + b"e" * 5000), NESTED),
    # l(i+1) = [li, li], 60 levels: printing or walking it never ends.
    (p2(b"]q\x00" + b"".join(b"](h" + bytes([i]) + b"h" + bytes([i]) + b"eq" + bytes([i + 1])
                             for i in range(60))),
     "shared references expand to more than 1048576 objects"),
    (p2(b"]q\x00h\x00a"), "objects refer to themselves (a cycle)"),
    # Enum members and TensorProperties' memory format are looked up by hash too.
    (p2(g("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        b"K\x00" + b"\x85" * 100_000 + b"\x85R"), KEY),
    (p2(g("torch.distributed.checkpoint.metadata", "TensorProperties"), b")\x81(",
        g("torch", "float32"), g("torch", "strided"), b"\x89K\x00" + b"\x85" * 100_000
        + b"\x89tb"), KEY),
], ids=["deep-key", "frozenset", "dict", "additems", "set-call", "shared-key", "deep-tuple",
        "deep-list", "shared-lists", "cycle", "enum-value", "memory-format"])
def test_nesting_and_shared_references_are_bounded(data: bytes, message: str) -> None:
    with pytest.raises(CorruptCheckpointError) as info:
        load_pickle(data, path="m.pkl")
    assert str(info.value) == f"cannot unpickle m.pkl: UnpicklingError: {message}"


def test_real_nesting_and_sharing_still_load() -> None:
    shared = [1, 2]
    obj = {"a": {"b": {"c": [shared, shared, (1, (2, (3,)))]}}, (1, (2, 3)): frozenset({(4,)})}
    for _ in range(150):
        obj = {"nested": obj}
    assert load_pickle(pickle.dumps(obj, protocol=2)) == obj


def _rezipped(archive: bytes, extra: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        for name, data in extra:
            dst.writestr(name, data)
    return out.getvalue()


def test_duplicate_zip_records_are_corrupt() -> None:
    # torch.load reads the first of two same-named records, zipfile the last.
    archive = saved({"w": torch.ones(2)})
    with zipfile.ZipFile(io.BytesIO(archive)) as src:
        [name] = [n for n in src.namelist() if n.endswith("data.pkl")]
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = _rezipped(archive, [(name, pickle.dumps({"w": 1}, protocol=2))])
    with pytest.raises(CorruptCheckpointError) as info:
        load_torch_bytes(data, path="m.pt")
    assert str(info.value) == f"record {name!r} appears twice in m.pt"


def test_huge_zip_directories_are_refused_before_parsing(tmp_path: Path) -> None:
    # 300,000 empty records (a 17 MB directory): zipfile would build a ZipInfo for each.
    archive = saved({"w": torch.ones(2)})
    path = tmp_path / "m.pt"
    path.write_bytes(_rezipped(archive, [(f"archive/x/{i}", b"") for i in range(300_000)]))
    with pytest.raises(CorruptCheckpointError, match=r"zip directory; torch.save archives "
                       r"need far less \(at most 16777216 bytes"):
        load_torch(path)


def test_allowed_functions_resolve_to_safe_stand_ins_not_the_originals() -> None:
    # A loaded object can hold a function reference; it must not be torch's unchecked one.
    loaded = load_pickle(pickle.dumps([torch._utils._rebuild_tensor_v2,
                                       torch._tensor._rebuild_from_type_v2], protocol=2))
    assert loaded[0] is not torch._utils._rebuild_tensor_v2
    assert loaded[1] is not torch._tensor._rebuild_from_type_v2
    with pytest.raises(pickle.UnpicklingError, match="rebuilt without a storage"):
        loaded[0](None, 0, (1,), (1,), False, OrderedDict())


def test_legacy_torch_files_are_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(FormatError) as info:
        load_torch(path)
    assert str(info.value).startswith("legacy torch serialization is not supported")


def test_big_endian_archives_are_a_format_error() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved({"w": torch.ones(2)}))) as src, \
            zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            foreign = "big" if sys.byteorder == "little" else "little"
            dst.writestr(info.filename, foreign if info.filename.endswith("/byteorder")
                         else src.read(info))
    with pytest.raises(FormatError) as info:
        load_torch_bytes(out.getvalue(), path="be.pt")
    assert str(info.value) == (f"be.pt was saved on a {foreign}-endian machine; byte-swapping "
                               f"is not supported")


def test_bad_archives_are_corrupt(tmp_path: Path) -> None:
    data = saved({"w": torch.ones(4)})
    with pytest.raises(CorruptCheckpointError) as info:
        load_torch_bytes(data[: len(data) // 2], path="half.pt")
    assert str(info.value).startswith("half.pt is not a valid torch.save archive: BadZipFile")
    with pytest.raises(CorruptCheckpointError) as info:
        load_torch_bytes(b"not a zip at all", path="junk.pt")
    assert str(info.value) == "junk.pt is not a torch.save zip archive"
    compressed = io.BytesIO()
    with zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps([1]))
    with pytest.raises(CorruptCheckpointError) as info:
        load_torch_bytes(compressed.getvalue(), path="z.pt")
    assert str(info.value) == ("record 'archive/data.pkl' in z.pt is compressed or encrypted; "
                               "torch writes stored records only")
    path = tmp_path / "w.pt"
    path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError) as info:
        load_torch(path, offset=10, length=len(data))
    assert str(info.value) == f"bytes [10, {10 + len(data)}) lie outside {path} " \
                              f"({len(data)} bytes)"


def test_trust_uses_plain_pickle_and_warns(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "f.pt"
    torch.save({"fn": torch.nn.functional.silu}, path)
    # Warnings are once per file, and "<memory>" may have been loaded trusted by an earlier
    # test in this process (a DCP object through load_torch_bytes).
    unpickler._WARNED.clear()
    with caplog.at_level(logging.WARNING):
        loaded = load_torch(path, trust=True)
        assert load_pickle(pickle.dumps(builtins.len), trust=True) is len
    assert loaded["fn"] is torch.nn.functional.silu
    assert sum("trust_pickles" in r.getMessage() for r in caplog.records) == 2


# ---- malicious files -------------------------------------------------------------------------


class RunsShell:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.sentinel}",))


class OpensFile:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.sentinel), "w"))


MALICIOUS = [(RunsShell, f"{os.system.__module__}.system"),
             (OpensFile, f"{builtins.open.__module__}.open")]


@pytest.mark.parametrize(("cls", "name"), MALICIOUS, ids=["system", "open"])
def test_malicious_pickles_never_run(tmp_path: Path, cls: type, name: str) -> None:
    sentinel = tmp_path / "SENTINEL"
    payload = {"evil": cls(sentinel), "innocent": torch.ones(2)}
    refused = f"refusing to unpickle global '{name}' in "

    metadata = tmp_path / ".metadata"
    metadata.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError, match=refused):
        load_pickle(metadata.read_bytes(), path=str(metadata))

    pt = tmp_path / "model.pt"
    torch.save(payload, pt)
    with pytest.raises(UnsafeCheckpointError, match=refused):
        load_torch(pt)

    ckpt = tmp_path / "dcp"
    ckpt.mkdir()
    with DcpDataFile(ckpt) as data_file:
        data_file.add_tensor("w", (0,), torch.ones(2))
        data_file.add_object("common_state/shard_0_1", [cls(sentinel)])
    write_metadata(ckpt, data_file.close(), {"w": ((2,), torch.float32)})
    with DcpReader(ckpt) as reader, pytest.raises(UnsafeCheckpointError, match=refused):
        reader.read_object("common_state/shard_0_1")

    (ckpt / ".metadata").write_bytes(pickle.dumps(cls(sentinel)))
    with pytest.raises(UnsafeCheckpointError, match=refused):
        DcpReader(ckpt)
    assert not sentinel.exists()


# ---- real megatron-core 0.16.1 files ---------------------------------------------------------

MEGATRON_SAVE = """
import argparse
import os
import random
import sys

import numpy as np
import torch

# CPU-only torch: megatron's async writer syncs CUDA and builds a tensor on the current device
# (reference notes 1.11); both are no-ops here.
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.current_device = lambda: "cpu"
import torch.distributed as dist


def main(out, rendezvous):
    # One rank: the rendezvous is a file, not a TCP port another test process could take.
    dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=0, world_size=1)
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.enums import ModelType
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=24,
        ffn_hidden_size=96, use_cpu_initialization=True, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=True, qk_layernorm=True, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=torch.bfloat16, bf16=True)
    model = GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(
            normalization="RMSNorm", qk_layernorm=True),
        vocab_size=128, max_sequence_length=64, position_embedding_type="rope",
        share_embeddings_and_output_weights=False)
    sd = model.sharded_state_dict()
    random.seed(1)
    np.random.seed(2)
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}
    # What Megatron-LM's training loop adds next to the model.
    sd["rng_state"] = ShardedObject("rng_state", [rng], (1, 1), (0, 0), replica_id=0)
    sd["args"] = argparse.Namespace(model_type=ModelType.encoder_or_decoder,
                                    params_dtype=torch.bfloat16, num_layers=2)
    sd["iteration"] = 7
    dist_checkpointing.save(sd, out)
    torch.save({
        "embedding.word_embeddings.weight": model.embedding.word_embeddings.weight.detach(),
        "decoder.layers.self_attention.linear_qkv.weight": torch.stack(
            [m.self_attention.linear_qkv.weight.detach() for m in model.decoder.layers]),
        "rng": rng,
    }, os.path.join(os.path.dirname(out), "expected.pt"))
    dist.destroy_process_group()


# megatron's async writer may start worker processes that re-import this file.
if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
"""


@pytest.fixture(scope="module")
def megatron_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("megatron.core")
    root = tmp_path_factory.mktemp("mcore")
    script = root / "save.py"
    script.write_text(MEGATRON_SAVE)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    done = subprocess.run([sys.executable, str(script), str(ckpt), str(root / "rendezvous")],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return ckpt


# Exactly what megatron-core 0.16.1 (and torch 2.13 DCP underneath) pickled.
MCORE_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch", "bfloat16"), ("torch", "float32"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", n) for n in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
}
MCORE_COMMON_GLOBALS = {("argparse", "Namespace"), ("megatron.core.enums", "ModelType"),
                        ("torch", "bfloat16")}


@pytest.mark.clients
@pytest.mark.slow
def test_real_megatron_checkpoint_loads_restricted(megatron_checkpoint: Path) -> None:
    ckpt = megatron_checkpoint
    expected = torch.load(ckpt.parent / "expected.pt", weights_only=False)

    metadata = RestrictedUnpickler(io.BytesIO((ckpt / ".metadata").read_bytes()))
    md = metadata.load()
    assert type(md) is dcp_types.Metadata and md.all_local_plans  # mcore's extra attribute
    assert metadata.globals_seen == MCORE_METADATA_GLOBALS

    with zipfile.ZipFile(ckpt / "common.pt") as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    common_unpickler = RestrictedUnpickler(io.BytesIO(pickled))
    common_unpickler.load()
    assert common_unpickler.globals_seen == MCORE_COMMON_GLOBALS
    common = load_torch(ckpt / "common.pt")
    assert common["iteration"] == 7
    assert common["args"].params_dtype is torch.bfloat16
    model_type = common["args"].model_type
    assert (model_type.module, model_type.qualname, model_type.args) == (
        "megatron.core.enums", "ModelType", (1,))

    with DcpReader(ckpt) as reader:
        state = {fqn: torch.empty(t.shape, dtype=t.dtype.torch)
                 for fqn, t in reader.index.tensors.items()}
        state.update(dict.fromkeys(reader.index.blobs))
        dcp.load(state, storage_reader=FileSystemReader(ckpt), no_dist=True,
                 planner=DefaultLoadPlanner(flatten_state_dict=False,
                                            flatten_sharded_tensors=False))
        for fqn, tensor in reader.index.tensors.items():
            assert_same_tensor(state[fqn], reader.read_region(fqn, (0,) * len(tensor.shape),
                                                              tensor.shape).contiguous())
        for fqn in ("embedding.word_embeddings.weight",
                    "decoder.layers.self_attention.linear_qkv.weight"):
            whole = reader.read_region(fqn, (0,) * expected[fqn].dim(), expected[fqn].shape)
            assert torch.equal(bits(whole), bits(expected[fqn]))
        extra = [f for f in reader.index.blobs if "_extra_state" in f]
        assert extra and all(reader.read_object(f) == [None] for f in extra)
        # ShardedObject payloads are lists; this one's data is itself a list (as Megatron-LM's).
        ((rng,),) = reader.read_object("rng_state/shard_0.0_1.1")
        want = expected["rng"]
        assert rng["random_rng_state"] == want["random_rng_state"]
        assert np.array_equal(rng["np_rng_state"][1], want["np_rng_state"][1])
        assert rng["np_rng_state"][2:] == want["np_rng_state"][2:]
        assert torch.equal(rng["torch_rng_state"], want["torch_rng_state"])
