"""Fuzz the safetensors reader with mutated files.

Whatever the bytes, ``read_header`` and ``SafetensorsFile.get`` either succeed with a header
whose entries tile the data section, or raise a ``CheckpointError``; any other exception, a
slow example or a large allocation (a header value trusted as a size) is a failure.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from ckpt_ir import dtypes
from ckpt_ir.converters.storage.safetensors_file import (
    SafetensorsFile,
    SafetensorsHeader,
    SafetensorsWriter,
    read_header,
)
from ckpt_ir.errors import CheckpointError

PEAK_LIMIT = 50 * 2**20
FUZZ = settings(deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def valid_file(path: Path) -> bytes:
    tensors = {
        "model.embed.weight": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
        "model.norm.weight": torch.tensor([1.0, -0.0, float("nan")]),
        "model.scale": torch.tensor(2, dtype=torch.int64),
        "model.empty": torch.zeros(0, 5, dtype=torch.float16),
        "model.mask": torch.tensor([True, False, True]),
        "model.fp8": torch.tensor([0.5, -2.0], dtype=torch.float8_e4m3fn),
    }
    specs = [(name, dtypes.of(t), tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsWriter(path, specs, {"format": "pt", "origin": "fuzz"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    return path.read_bytes()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def seed(workdir: Path) -> bytes:
    return valid_file(workdir / "seed.safetensors")


def check_header_invariants(header: SafetensorsHeader, content: bytes) -> None:
    assert header.file_size == len(content)
    assert header.data_offset == 8 + struct.unpack("<Q", content[:8])[0]
    covered = 0
    for entry in header.entries.values():  # data order
        assert entry.start == covered <= entry.end
        numel = 1
        for dim in entry.shape:
            numel *= dim
        assert entry.nbytes == numel * entry.dtype.itemsize
        covered = entry.end
    assert header.data_offset + covered == header.file_size


def exercise(path: Path, content: bytes) -> None:
    """Read everything; return only through success or CheckpointError."""
    path.write_bytes(content)
    try:
        header = read_header(path)
    except CheckpointError as e:
        note(f"read_header refused: {e}")
        with pytest.raises(CheckpointError):
            SafetensorsFile(path).close()  # the two entry points agree
        return
    check_header_invariants(header, content)
    with SafetensorsFile(path) as f:
        assert f.header == header
        for name in f.keys():
            entry = header.entries[name]
            tensor = f.get(name)
            assert (dtypes.of(tensor), tuple(tensor.shape)) == (entry.dtype, entry.shape)
            raw = tensor.contiguous().reshape(-1).view(torch.uint8)
            start = header.data_offset + entry.start
            assert bytes(raw.numpy()) == content[start:start + entry.nbytes]


def run_bounded(path: Path, content: bytes) -> None:
    tracemalloc.start()
    try:
        exercise(path, content)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"peak Python allocation {peak} bytes"


# -----------------------------------------------------------------------------------------
# Byte mutations

positions = st.integers(0, 2**16)
mutations = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(1, 255)),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), positions, st.integers(1, 32)),
    st.tuples(st.just("overwrite"), positions, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("prefix"), st.integers(0, 2**64 - 1) | st.integers(0, 1024)),
)


def mutate(content: bytes, ops: list[tuple]) -> bytes:
    data = bytearray(content)
    for op in ops:
        kind = op[0]
        if kind == "prefix":
            data[:8] = op[1].to_bytes(8, "little")
        elif kind == "truncate":
            del data[op[1] % (len(data) + 1):]
        elif kind == "insert":
            at = op[1] % (len(data) + 1)
            data[at:at] = op[2]
        elif not data:
            continue
        elif kind == "flip":
            data[op[1] % len(data)] ^= op[2]
        elif kind == "delete":
            at = op[1] % len(data)
            del data[at:at + op[2]]
        else:
            at = op[1] % len(data)
            data[at:at + len(op[2])] = op[2]
    return bytes(data)


@FUZZ
@given(ops=st.lists(mutations, min_size=1, max_size=4))
@example(ops=[("prefix", 2**64 - 1)])
@example(ops=[("prefix", 0)])
@example(ops=[("truncate", 7)])
@example(ops=[("truncate", 300)])  # inside the data section: must not reach past the file
def test_mutated_file_is_read_or_refused_as_checkpoint_error(
        workdir: Path, seed: bytes, ops: list[tuple]) -> None:
    run_bounded(workdir / "mutated.safetensors", mutate(seed, ops))


# -----------------------------------------------------------------------------------------
# Structured mutations: well-formed JSON with hostile values where the validator looks

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=8,
)
near_ints = (st.integers(-2, 64) | st.integers(2**63 - 2, 2**64 + 2)
             | st.sampled_from([2**31, 2**32, 2**62]))
field_values = st.one_of(
    json_values,
    st.sampled_from(["F32", "BF16", "BOOL", "C64", "F8_E8M0", "f32", ""]),
    st.lists(near_ints, max_size=4),
)


def zero_size_with_huge_dim(content: bytes) -> bytes:
    """Regression: the fuzzer's [0, 2**63] passed validation, then broke torch.empty."""
    (length,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8:8 + length])
    header["model.empty"]["shape"] = [0, 2**63]
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + content[8 + length:]


def test_zero_size_tensor_with_a_dimension_past_int64_is_refused(workdir: Path,
                                                                 seed: bytes) -> None:
    path = workdir / "regression.safetensors"
    path.write_bytes(zero_size_with_huge_dim(seed))
    for load in (read_header, SafetensorsFile):
        with pytest.raises(CheckpointError, match="past torch's limit"):
            load(path)


@FUZZ
@given(data=st.data())
def test_mutated_header_fields_are_read_or_refused(workdir: Path, seed: bytes,
                                                   data: st.DataObject) -> None:
    (length,) = struct.unpack("<Q", seed[:8])
    header = json.loads(seed[8:8 + length])
    payload = seed[8 + length:]
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        key = data.draw(st.sampled_from([*header, "__metadata__", "extra"]), label="key")
        if key in header and isinstance(header[key], dict) and data.draw(st.booleans()):
            field = data.draw(st.sampled_from([*header[key], "dtype", "shape", "data_offsets",
                                               "other"]), label="field")
            header[key] = {**header[key], field: data.draw(field_values, label="value")}
        else:
            header[key] = data.draw(json_values, label="entry")
    body = json.dumps(header).encode()
    body += b" " * data.draw(st.integers(0, 7), label="padding")
    cut = data.draw(st.integers(-8, 8), label="data length change")
    tail = payload[:len(payload) + cut] if cut < 0 else payload + bytes(cut)
    run_bounded(workdir / "fields.safetensors", struct.pack("<Q", len(body)) + body + tail)


def test_hostile_shape_is_refused_in_linear_time(workdir: Path) -> None:
    """A megabyte of 2**62-sized dimensions must not become a big-integer product."""
    header = {"x": {"dtype": "F32", "shape": [2**62] * 50_000, "data_offsets": [0, 4]}}
    body = json.dumps(header).encode()
    path = workdir / "hostile.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(4))
    with pytest.raises(CheckpointError, match="needs more than 2\\*\\*64"):
        read_header(path)
