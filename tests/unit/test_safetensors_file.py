"""Tests of ckpt_ir.converters.storage.safetensors_file against the real safetensors library.

Bit identity is checked on raw bytes (``view(torch.uint8)``), so NaN payloads and -0.0 count.
"""

from __future__ import annotations

import gc
import json
import random
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_ir import dtypes
from ckpt_ir.converters.storage.safetensors_file import (
    DTYPE_TO_ST,
    ST_TO_DTYPE,
    SafetensorsFile,
    SafetensorsHeader,
    SafetensorsWriter,
    TensorEntry,
    plan_layout,
    read_header,
)
from ckpt_ir.dtypes import DType
from ckpt_ir.errors import (
    CheckpointError,
    CorruptCheckpointError,
    DestinationExistsError,
    FormatError,
    InternalError,
)

DTYPES = list(DTYPE_TO_ST)
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3), (2, 3, 5), (1, 1, 1, 4)]
Spec = tuple[str, DType, tuple[int, ...]]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor, so that NaN payloads and -0.0 compare exactly."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_bits_equal(actual: Mapping[str, torch.Tensor],
                      expected: Mapping[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert torch.equal(bits(got), bits(want)), name


def random_tensor(dtype: DType, shape: tuple[int, ...], rng: random.Random) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs with payloads, -0.0, subnormals) of ``dtype``."""
    numel = 1
    for dim in shape:
        numel *= dim
    if dtype is dtypes.BOOL:
        raw = bytes(rng.getrandbits(1) for _ in range(numel))
    else:
        raw = rng.randbytes(numel * dtype.itemsize)
    if not raw:
        return torch.empty(shape, dtype=dtype.torch)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype.torch).reshape(shape)


def specials() -> dict[str, torch.Tensor]:
    """Values that a float comparison would blur: -0.0 and NaNs carrying payloads."""
    f32 = torch.tensor([0x7FC00001, 0x80000000, 0xFFFFFFFF, 0x00000001],
                       dtype=torch.int64).to(torch.int32).view(torch.float32)
    bf16 = torch.tensor([0x7FC1, 0x8000, 0xFF81], dtype=torch.int32).to(torch.int16)
    return {"special.f32": f32, "special.bf16": bf16.view(torch.bfloat16)}


def write_with_writer(path: Path, tensors: Mapping[str, torch.Tensor], order: Sequence[str],
                      metadata: Mapping[str, str] | None = None,
                      write_order: Sequence[str] | None = None) -> None:
    specs = [(name, dtypes.of(tensors[name]), tuple(tensors[name].shape)) for name in order]
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name in write_order if write_order is not None else order:
            writer.write(name, tensors[name])


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return {name: f.get(name) for name in f.keys()}


# ------------------------------------------------------------------------------------------
# dtype tables


def test_dtype_tables_are_inverse_and_cover_the_safetensors_names() -> None:
    assert {v: k for k, v in DTYPE_TO_ST.items()} == ST_TO_DTYPE
    assert set(ST_TO_DTYPE) == {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64",
                                "F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_names_match_what_safetensors_writes(tmp_path: Path, dtype: DType) -> None:
    path = tmp_path / "one.safetensors"
    safetensors.torch.save_file({"t": torch.zeros(2, dtype=dtype.torch)}, path)
    assert read_header(path).entries["t"].dtype == dtype
    with safetensors.safe_open(path, "pt") as f:
        assert f.get_slice("t").get_dtype() == DTYPE_TO_ST[dtype]


# ------------------------------------------------------------------------------------------
# Interoperability with the reference implementation


def test_writer_output_loads_bit_identically_with_safetensors(tmp_path: Path) -> None:
    rng = random.Random(1234)
    tensors = {f"{DTYPE_TO_ST[dtype]}.{i}": random_tensor(dtype, shape, rng)
               for dtype in DTYPES for i, shape in enumerate(SHAPES)}
    for dtype in DTYPES:
        shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 4)))
        tensors[f"{DTYPE_TO_ST[dtype]}.random"] = random_tensor(dtype, shape, rng)
    tensors.update(specials())
    order = sorted(tensors)
    write_order = order[:]
    rng.shuffle(write_order)
    metadata = {"format": "pt", "note": "naïve ✓", "empty": ""}
    path = tmp_path / "ours.safetensors"

    write_with_writer(path, tensors, order, metadata, write_order)

    assert_bits_equal(safetensors.torch.load_file(path), tensors)
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == metadata
        assert sorted(f.keys()) == order
    assert_bits_equal(read_all(path), tensors)


def test_writer_output_is_byte_identical_to_save_file_in_its_order(tmp_path: Path) -> None:
    rng = random.Random(7)
    tensors = {f"t{i}": random_tensor(dtype, shape, rng)
               for i, (dtype, shape) in enumerate(zip(DTYPES * 2, SHAPES * 4, strict=False))}
    reference = tmp_path / "reference.safetensors"
    safetensors.torch.save_file(tensors, reference, metadata={"format": "pt"})
    ours = tmp_path / "ours.safetensors"

    # One metadata key: the reference serialises metadata from a hash map, in no fixed order.
    write_with_writer(ours, tensors, list(read_header(reference).entries), {"format": "pt"},
                      write_order=sorted(tensors, reverse=True))

    assert ours.read_bytes() == reference.read_bytes()


def test_save_file_output_is_read_identically(tmp_path: Path) -> None:
    rng = random.Random(99)
    tensors = {f"{DTYPE_TO_ST[dtype]}.{i}": random_tensor(dtype, shape, rng)
               for dtype in DTYPES for i, shape in enumerate(SHAPES)}
    tensors.update(specials())
    metadata = {"format": "pt", "source": "ünïcode"}
    path = tmp_path / "reference.safetensors"
    safetensors.torch.save_file(tensors, path, metadata=metadata)

    header = read_header(path)
    loaded = read_all(path)

    assert dict(header.metadata) == metadata
    assert header.file_size == path.stat().st_size
    assert header.data_offset % 8 == 0
    for name, tensor in tensors.items():
        entry = header.entries[name]
        assert (entry.dtype, entry.shape) == (dtypes.of(tensor), tuple(tensor.shape))
        assert entry.nbytes == tensor.numel() * tensor.element_size()
    assert_bits_equal(loaded, safetensors.torch.load_file(path))
    assert_bits_equal(loaded, tensors)


# ------------------------------------------------------------------------------------------
# Round-trip property


@st.composite
def declared_tensors(draw: st.DrawFn) -> tuple[list[Spec], dict[str, bytes]]:
    """Entries valid by construction, with each tensor's raw bytes."""
    names = draw(st.lists(st.text(max_size=6), max_size=6, unique=True)
                 .filter(lambda ns: "__metadata__" not in ns))
    specs: list[Spec] = []
    raw: dict[str, bytes] = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        nbytes = dtype.itemsize
        for dim in shape:
            nbytes *= dim
        data = draw(st.binary(min_size=nbytes, max_size=nbytes))
        if dtype is dtypes.BOOL:
            data = bytes(b & 1 for b in data)  # torch bools must be 0 or 1
        specs.append((name, dtype, shape))
        raw[name] = data
    return specs, raw


@settings(deadline=None)  # file I/O: timing varies with the machine
@given(declared=declared_tensors(), data=st.data(),
       metadata=st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_plan_write_read_round_trips(tmp_path_factory: pytest.TempPathFactory,
                                     declared: tuple[list[Spec], dict[str, bytes]],
                                     data: st.DataObject,
                                     metadata: dict[str, str] | None) -> None:
    specs, raw = declared
    tensors = {name: (torch.frombuffer(bytearray(raw[name]), dtype=torch.uint8)
                      .view(dtype.torch).reshape(shape) if raw[name]
                      else torch.empty(shape, dtype=dtype.torch))
               for name, dtype, shape in specs}
    write_order = data.draw(st.permutations([name for name, _, _ in specs]))
    path = tmp_path_factory.mktemp("roundtrip") / "model.safetensors"
    header_bytes, offsets, file_size = plan_layout(specs, metadata)

    with SafetensorsWriter(path, specs, metadata) as writer:
        for name in write_order:
            writer.write(name, tensors[name])

    header = read_header(path)
    assert path.stat().st_size == file_size == header.file_size
    assert path.read_bytes()[:len(header_bytes)] == header_bytes
    assert header.data_offset == len(header_bytes)
    assert dict(header.metadata) == (metadata or {})
    assert list(header.entries) == [name for name, _, _ in specs]  # data in the given order
    assert {n: (e.dtype, e.shape, (e.start, e.end)) for n, e in header.entries.items()} == {
        name: (dtype, shape, offsets[name]) for name, dtype, shape in specs}
    assert_bits_equal(read_all(path), tensors)
    assert_bits_equal(safetensors.torch.load_file(path), tensors)


# ------------------------------------------------------------------------------------------
# Reader behaviour


def test_get_is_zero_copy_and_outlives_close(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(6, dtype=torch.float64), "b": torch.arange(4, dtype=torch.int32),
               "c": torch.ones(3, dtype=torch.bfloat16)}
    path = tmp_path / "m.safetensors"
    write_with_writer(path, tensors, ["a", "b", "c"])

    f = SafetensorsFile(path)
    got = {name: f.get(name) for name in f.keys()}
    f.close()
    gc.collect()

    entries = f.header.entries
    base = got["a"].data_ptr() - entries["a"].start
    assert all(got[n].data_ptr() - base == entries[n].start for n in got)  # one mapping
    assert_bits_equal(got, tensors)  # still readable: the mapping lives while tensors do


def test_keys_are_in_data_order(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {name: torch.zeros(1) for name in ("z", "a", "m")}
    write_with_writer(path, tensors, ["z", "a", "m"])
    with SafetensorsFile(path) as f:
        assert f.keys() == ["z", "a", "m"]


def test_misaligned_tensor_is_copied_with_its_values(tmp_path: Path) -> None:
    # Given order F16 then F32 puts the F32 tensor at an offset that is 2 mod 4.
    tensors = {"half": torch.tensor([1.5], dtype=torch.float16),
               "single": torch.tensor([-0.0, 3.25], dtype=torch.float32)}
    path = tmp_path / "m.safetensors"
    write_with_writer(path, tensors, ["half", "single"])

    got = read_all(path)

    assert got["single"].data_ptr() % 4 == 0
    assert_bits_equal(got, tensors)


def test_get_of_unknown_name_raises_format_error(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_with_writer(path, {"a": torch.zeros(1)}, ["a"])
    with SafetensorsFile(path) as f, pytest.raises(FormatError) as info:
        f.get("nope")
    assert str(info.value) == f"tensor 'nope' not in {path}"
    assert (info.value.path, info.value.tensor) == (str(path), "nope")


def test_get_after_close_is_an_internal_error(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_with_writer(path, {"a": torch.zeros(1)}, ["a"])
    f = SafetensorsFile(path)
    f.close()
    f.close()  # idempotent
    with pytest.raises(InternalError):
        f.get("a")


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CorruptCheckpointError) as info:
        read_header(path)
    assert str(info.value) == f"cannot open safetensors file {path}: No such file or directory"
    assert info.value.path == str(path)


@pytest.mark.parametrize("header", [
    b"{}",
    b'{"__metadata__":{}}',
    b'  {"__metadata__":{"a":"b"}}        ',
    b'{"e":{"dtype":"I8","shape":[0],"data_offsets":[0,0]}}',
], ids=["empty", "empty-metadata", "whitespace", "zero-size-only"])
def test_headers_without_data_are_valid(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    parsed = read_header(path)
    assert parsed.data_offset == parsed.file_size == 8 + len(header)
    assert {n: t.shape for n, t in read_all(path).items()} == {
        n: e.shape for n, e in parsed.entries.items()}


def test_header_types() -> None:
    entry = TensorEntry(name="w", dtype=dtypes.FLOAT32, shape=(2, 3), start=8, end=32)
    assert entry.nbytes == 24
    with pytest.raises(AttributeError):
        entry.start = 0  # type: ignore[misc]
    header = SafetensorsHeader(entries={"w": entry}, metadata={}, data_offset=16, file_size=48)
    assert header.entries["w"] is entry


# ------------------------------------------------------------------------------------------
# Header validation: one crafted file per rule, exact one-line messages


def entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def header_file(header: object, data: bytes = b"") -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


HUGE = 2**40
CORRUPT_CASES = [
    ("empty-file", b"",
     "safetensors file {path} is 0 bytes, shorter than the 8-byte header length prefix"),
    ("short-file", b"\x01\x02\x03",
     "safetensors file {path} is 3 bytes, shorter than the 8-byte header length prefix"),
    ("prefix-over-limit", struct.pack("<Q", 100_000_001) + b"{}",
     "safetensors header of {path} declares 100000001 bytes, above the 100000000-byte limit"),
    ("prefix-u64-max", b"\xff" * 8 + b"{}",
     "safetensors header of {path} declares 18446744073709551615 bytes, "
     "above the 100000000-byte limit"),
    ("prefix-past-end", struct.pack("<Q", 10) + b"{}",
     "safetensors header of {path} declares 10 bytes but the file has only 2 "
     "after the length prefix"),
    ("not-utf8", header_file(b'{"\xff":1}'),
     "safetensors header of {path} is not valid UTF-8 (byte 2)"),
    ("not-json", header_file(b'{"a":'),
     "safetensors header of {path} is not valid JSON: Expecting value at character 5"),
    ("nan-not-json", header_file(b'{"a":NaN}'),
     "safetensors header of {path} is not valid JSON: NaN is not a JSON value"),
    ("trailing-nul-not-json", header_file(b"{}\x00"),
     "safetensors header of {path} is not valid JSON: Extra data at character 2"),
    ("duplicate-key", header_file(b'{"x":{},"x":{}}'),
     "safetensors header of {path} repeats the key 'x' in one object"),
    ("array", header_file([]), "safetensors header of {path} is a JSON array, not an object"),
    ("null", header_file(None), "safetensors header of {path} is a JSON null, not an object"),
    ("string", header_file("x"), "safetensors header of {path} is a JSON string, not an object"),
    ("metadata-array", header_file({"__metadata__": [1]}),
     "safetensors header of {path} has __metadata__ that is a JSON array, not an object"),
    ("metadata-null", header_file({"__metadata__": None}),
     "safetensors header of {path} has __metadata__ that is a JSON null, not an object"),
    ("metadata-value", header_file({"__metadata__": {"k": 1}}),
     "safetensors header of {path} has __metadata__ value for 'k' that is a JSON number, "
     "not a string"),
    ("metadata-surrogate", header_file(b'{"__metadata__":{"k":"\\udc00"}}'),
     "safetensors header of {path} has __metadata__ with an unpaired surrogate escape"),
    ("entry-array", header_file({"x": [1]}),
     "safetensors header of {path} declares tensor 'x' as a JSON array, not an object"),
    ("entry-missing-key", header_file({"x": {"dtype": "F32", "shape": [2]}}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' without the key 'data_offsets'"),
    ("entry-extra-key", header_file({"x": {**entry(), "extra": 1}}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with the unexpected key 'extra'"),
    ("name-surrogate", header_file(b'{"\\ud800":{}}'),
     "safetensors header of {path} declares tensor '\\ud800' whose name has an unpaired "
     "surrogate escape"),
    ("unknown-dtype", header_file({"x": entry(dtype="F33")}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with unknown dtype 'F33'"),
    ("lowercase-dtype", header_file({"x": entry(dtype="f32")}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with unknown dtype 'f32'"),
    ("non-string-dtype", header_file({"x": entry(dtype=4)}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with unknown dtype 4"),
    ("array-dtype", header_file({"x": entry(dtype=[])}, bytes(8)),  # found by the fuzzer
     "safetensors header of {path} declares tensor 'x' with unknown dtype []"),
    ("long-dtype", header_file({"x": entry(dtype="A" * 100)}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with unknown dtype "
     f"'{'A' * 59}...(102 chars)"),
    ("shape-not-list", header_file({"x": entry(shape=2)}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with shape 2, "
     "not a list of non-negative integers"),
    ("shape-negative", header_file({"x": entry(shape=[-2])}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with shape [-2], "
     "not a list of non-negative integers"),
    ("shape-float", header_file({"x": entry(shape=[2.0])}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with shape [2.0], "
     "not a list of non-negative integers"),
    ("shape-bool", header_file({"x": entry(shape=[True, 2])}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with shape [true, 2], "
     "not a list of non-negative integers"),
    ("offsets-one", header_file({"x": entry(offsets=[8])}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with data_offsets [8], "
     "not two integers 0 <= start <= end"),
    ("offsets-reversed", header_file({"x": entry(offsets=[8, 0])}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with data_offsets [8, 0], "
     "not two integers 0 <= start <= end"),
    ("offsets-negative", header_file({"x": entry(offsets=[-8, 0])}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with data_offsets [-8, 0], "
     "not two integers 0 <= start <= end"),
    ("offsets-object", header_file({"x": entry(offsets={"0": 8})}, bytes(8)),
     "safetensors header of {path} declares tensor 'x' with data_offsets {{\"0\": 8}}, "
     "not two integers 0 <= start <= end"),
    ("offsets-past-data", header_file({"x": entry(shape=[6], offsets=[0, 24])}, bytes(16)),
     "safetensors header of {path} declares tensor 'x' at bytes [0, 24) "
     "beyond the 16-byte data section"),
    ("bytes-vs-shape", header_file({"x": entry(shape=[2, 3], offsets=[0, 16])}, bytes(16)),
     "safetensors header of {path} declares tensor 'x' with 16 bytes but shape [2, 3] "
     "of F32 needs 24"),
    ("bytes-vs-huge-shape", header_file({"x": entry(shape=[HUGE] * 4, offsets=[0, 16])},
                                        bytes(16)),
     "safetensors header of {path} declares tensor 'x' with 16 bytes but shape "
     f"[{HUGE}, {HUGE}, {HUGE}, {HUGE}] of F32 needs more than 2**64"),
    ("zero-dim-with-bytes", header_file({"x": entry(shape=[0, HUGE], offsets=[0, 4])},
                                        bytes(4)),
     "safetensors header of {path} declares tensor 'x' with 4 bytes but shape "
     f"[0, {HUGE}] of F32 needs 0"),
    ("zero-size-past-int64", header_file({"x": entry(shape=[0, 2**63], offsets=[0, 0])}),
     "safetensors header of {path} declares tensor 'x' with shape [0, 9223372036854775808], "
     "whose non-zero dimensions multiply past torch's limit of 2**63 - 1"),
    ("zero-size-strides-overflow", header_file({"x": entry(shape=[0, 2**62, 4],
                                                            offsets=[0, 0])}),
     "safetensors header of {path} declares tensor 'x' with shape [0, 4611686018427387904, 4], "
     "whose non-zero dimensions multiply past torch's limit of 2**63 - 1"),
    ("scalar-bytes", header_file({"x": entry(dtype="F64", shape=[], offsets=[0, 4])},
                                 bytes(4)),
     "safetensors header of {path} declares tensor 'x' with 4 bytes but shape [] "
     "of F64 needs 8"),
    ("gap", header_file({"x": entry(shape=[1], offsets=[0, 4]),
                         "y": entry(shape=[1], offsets=[8, 12])}, bytes(12)),
     "safetensors header of {path} leaves bytes [4, 8) of the data section unused "
     "before tensor 'y'"),
    ("gap-at-start", header_file({"y": entry(shape=[1], offsets=[4, 8])}, bytes(8)),
     "safetensors header of {path} leaves bytes [0, 4) of the data section unused "
     "before tensor 'y'"),
    ("overlap", header_file({"x": entry(offsets=[0, 8]), "y": entry(offsets=[4, 12])},
                            bytes(12)),
     "safetensors header of {path} declares tensor 'y' at bytes [4, 12) overlapping "
     "tensor 'x', which ends at 8"),
    ("same-offsets", header_file({"x": entry(), "y": entry()}, bytes(8)),
     "safetensors header of {path} declares tensor 'y' at bytes [0, 8) overlapping "
     "tensor 'x', which ends at 8"),
    ("zero-size-inside", header_file({"x": entry(), "y": entry(shape=[0], offsets=[4, 4])},
                                     bytes(8)),
     "safetensors header of {path} declares tensor 'y' at bytes [4, 4) overlapping "
     "tensor 'x', which ends at 8"),
    ("trailing-bytes", header_file({"x": entry(shape=[1], offsets=[0, 4])}, bytes(8)),
     "safetensors header of {path} leaves bytes [4, 8) of the data section unused "
     "at the end of the file"),
    ("data-without-tensors", header_file({}, b"\x00"),
     "safetensors header of {path} leaves bytes [0, 1) of the data section unused "
     "at the end of the file"),
]


@pytest.mark.parametrize(("content", "message"), [c[1:] for c in CORRUPT_CASES],
                         ids=[c[0] for c in CORRUPT_CASES])
def test_corrupt_header_is_refused_with_exact_message(tmp_path: Path, content: bytes,
                                                      message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    expected = message.format(path=path)

    for load in (read_header, SafetensorsFile):
        with pytest.raises(CorruptCheckpointError) as info:
            load(path)
        assert str(info.value) == expected
        assert info.value.path == str(path)
        assert "\n" not in str(info.value)


def test_deeply_nested_header_is_refused_as_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(header_file(b'{"x":' + b"[" * 100_000))
    with pytest.raises(CorruptCheckpointError) as info:
        read_header(path)
    assert str(info.value).startswith(f"safetensors header of {path} is not valid JSON: ")


def test_corrupt_tensor_errors_name_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(header_file({"x": entry(shape=[3])}, bytes(8)))
    with pytest.raises(CorruptCheckpointError) as info:
        read_header(path)
    assert info.value.tensor == "x"


@pytest.mark.parametrize("dtype", ["C64", "F8_E8M0", "F4"])
def test_valid_but_unsupported_dtype_is_a_format_error(tmp_path: Path, dtype: str) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(header_file({"x": entry(dtype=dtype, shape=[0], offsets=[0, 0])}))
    with pytest.raises(FormatError) as info:
        read_header(path)
    assert str(info.value) == (f"safetensors file {path} declares tensor 'x' with dtype {dtype}, "
                               "which ckpt-ir does not support")
    assert isinstance(info.value, CheckpointError)


def test_reference_reader_agrees_on_a_corrupt_file(tmp_path: Path) -> None:
    """Our strictness matches the reference on the rule the example message pins."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(header_file({"x": entry(shape=[2, 3], offsets=[0, 16])}, bytes(16)))
    with pytest.raises(safetensors.SafetensorError):
        safetensors.torch.load_file(path)


# ------------------------------------------------------------------------------------------
# Planning and writer misuse


def test_plan_layout_pads_the_header_and_lays_data_out_in_order() -> None:
    specs = [("b", dtypes.FLOAT16, (3,)), ("a", dtypes.FLOAT32, (2, 2)), ("e", dtypes.INT8, (0,)),
             ("s", dtypes.BFLOAT16, ())]

    header, offsets, size = plan_layout(specs, {"format": "pt"})

    (length,) = struct.unpack("<Q", header[:8])
    assert length == len(header) - 8 and length % 8 == 0
    parsed = json.loads(header[8:])
    assert list(parsed) == ["__metadata__", "b", "a", "e", "s"]
    assert parsed["a"] == {"dtype": "F32", "shape": [2, 2], "data_offsets": [6, 22]}
    assert offsets == {"b": (0, 6), "a": (6, 22), "e": (22, 22), "s": (22, 24)}
    assert size == len(header) + 24
    assert header[8:].decode().endswith("}" + " " * (len(header) - 9 - header[8:].rindex(b"}")))


def test_plan_layout_without_metadata_writes_no_metadata_key() -> None:
    header, offsets, size = plan_layout([])
    assert header == struct.pack("<Q", 8) + b"{}      "
    assert (offsets, size) == ({}, 16)


@pytest.mark.parametrize(("specs", "metadata"), [
    ([("a", dtypes.FLOAT32, (1,)), ("a", dtypes.FLOAT32, (1,))], None),
    ([("__metadata__", dtypes.FLOAT32, (1,))], None),
    ([("a", torch.complex64, (1,))], None),
    ([("a", dtypes.FLOAT32, (-1,))], None),
    ([("a", dtypes.FLOAT32, (1.5,))], None),
    ([("\ud800", dtypes.FLOAT32, (1,))], None),
    ([], {"k": 1}),
], ids=["duplicate", "reserved-name", "complex", "negative-dim", "float-dim", "surrogate",
        "metadata-value"])
def test_plan_layout_refuses_invalid_declarations(specs: list[Spec],
                                                  metadata: dict[str, str] | None) -> None:
    with pytest.raises(InternalError):
        plan_layout(specs, metadata)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[SafetensorsWriter]:
    w = SafetensorsWriter(tmp_path / "w.safetensors",
                          [("a", dtypes.FLOAT32, (2, 3)), ("b", dtypes.INT64, ())])
    yield w
    w.abort()


@pytest.mark.parametrize(("name", "tensor", "message"), [
    ("a", torch.zeros(2, 3, dtype=torch.float64),
     "tensor 'a' has dtype torch.float64 but {path} declares torch.float32"),
    ("a", torch.zeros(3, 2), "tensor 'a' has shape [3, 2] but {path} declares [2, 3]"),
    ("b", torch.zeros(1, dtype=torch.int64), "tensor 'b' has shape [1] but {path} declares []"),
    ("c", torch.zeros(1), "tensor 'c' was not declared for {path}"),
    ("a", torch.zeros(2, 3, device="meta"), "tensor 'a' is torch.strided on meta, "
                                             "which has no bytes to write"),
], ids=["dtype", "shape", "scalar-shape", "undeclared", "meta"])
def test_writer_refuses_a_tensor_unlike_its_declaration(writer: SafetensorsWriter, name: str,
                                                        tensor: torch.Tensor,
                                                        message: str) -> None:
    with pytest.raises(InternalError) as info:
        writer.write(name, tensor)
    assert str(info.value) == message.format(path=writer.path)


def test_writer_refuses_a_second_write(writer: SafetensorsWriter) -> None:
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(InternalError) as info:
        writer.write("a", torch.ones(2, 3))
    assert str(info.value) == f"tensor 'a' written twice to {writer.path}"


def test_writer_close_refuses_a_missing_tensor_and_closes_anyway(
        writer: SafetensorsWriter) -> None:
    writer.write("b", torch.tensor(5))
    with pytest.raises(InternalError) as info:
        writer.close()
    assert str(info.value) == f"{writer.path} closed without writing tensor 'a'"
    with pytest.raises(InternalError) as info:
        writer.write("a", torch.zeros(2, 3))
    assert str(info.value) == f"write of 'a' to {writer.path} after close or abort"
    writer.close()  # already closed: nothing left to check


def test_writer_context_aborts_on_error_without_masking_it(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    with pytest.raises(RuntimeError, match="producer failed"),  \
            SafetensorsWriter(path, [("a", dtypes.FLOAT32, (1,))]):
        raise RuntimeError("producer failed")
    assert path.stat().st_size > 0  # left for the caller to remove with its temp dir


def test_writer_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(DestinationExistsError):
        SafetensorsWriter(path, [])
    assert path.read_bytes() == b"precious"


def test_writer_accepts_views_and_grad_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"t": base.t(), "slice": base[1:3, ::2], "grad": torch.ones(3, requires_grad=True),
               "expanded": torch.tensor([1, 2], dtype=torch.int16).expand(3, 2)}
    path = tmp_path / "w.safetensors"
    write_with_writer(path, tensors, list(tensors), write_order=list(reversed(tensors)))
    assert_bits_equal(safetensors.torch.load_file(path),
                      {n: t.detach().contiguous() for n, t in tensors.items()})


def test_writer_presizes_the_file_before_any_write(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    specs = [("a", dtypes.FLOAT32, (1000,))]
    _, _, size = plan_layout(specs)
    w = SafetensorsWriter(path, specs)
    try:
        assert path.stat().st_size == size
    finally:
        w.abort()


def test_writer_accepts_torch_size_shapes(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    with SafetensorsWriter(path, [("a", dtypes.FLOAT32, torch.Size([2, 3]))]) as w:
        w.write("a", torch.zeros(2, 3))
    assert read_header(path).entries["a"].shape == (2, 3)
