"""Hostile bytes: the loaders raise CheckpointError subclasses only, quickly, in bounded memory.

Any other exception type, a run past the deadline, or a Python allocation peak above the bound
fails the property. Inputs are a few KiB, so a bound of 16 MiB only trips on allocations sized
by a length field of the input (the 2 GB preallocation this module pins in @examples).
"""

from __future__ import annotations

import argparse
import atexit
import io
import pickle
import shutil
import struct
import tempfile
import tracemalloc
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ckpt_ir.converters.storage.dcp_files import DcpDataFile, DcpReader, write_metadata
from ckpt_ir.errors import CheckpointError
from ckpt_ir.safety.unpickler import load_pickle, load_torch_bytes

PEAK_BOUND = 16 * 2**20
# Example counts come from the active Hypothesis profile (dev: fast, ci: >= 2000).
FUZZ = settings(deadline=timedelta(seconds=2))


def saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@cache
def torch_archive() -> bytes:
    base = torch.arange(24, dtype=torch.bfloat16).reshape(6, 4)
    # Two views of one storage, disjoint (overlapping ones are refused as corrupt).
    return saved({"w": base[:3], "view": base[3:, 1:3], "ids": torch.arange(3),
                  "args": argparse.Namespace(lr=0.1, dtype=torch.float16),
                  "nested": OrderedDict(a=[1, None, "x", (2.5, b"b")])})


@cache
def dcp_directory() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="ckpt_ir_fuzz_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    full = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    with DcpDataFile(directory) as data_file:
        records = [data_file.add_tensor("w", (0, 0), full[:2]),
                   data_file.add_tensor("w", (2, 0), full[2:, :3]),
                   data_file.add_tensor("w", (2, 3), full[2:, 3:]),
                   data_file.add_object("common_state/shard_0_1", [{"iteration": 1}])]
    write_metadata(directory, records, {"w": ((4, 6), torch.float32)})
    return directory


@cache
def dcp_metadata() -> bytes:
    return (dcp_directory() / ".metadata").read_bytes()


def with_data_pkl(archive: bytes, pickled: bytes) -> bytes:
    """The archive with its data.pkl record replaced (storages kept), to reach the unpickler."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = pickled if info.filename.endswith("data.pkl") else src.read(info)
            dst.writestr(info.filename, body, zipfile.ZIP_STORED)
    return out.getvalue()


def data_pkl(archive: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(archive)) as src:
        return src.read(next(n for n in src.namelist() if n.endswith("data.pkl")))


@st.composite
def mutated(draw: st.DrawFn, base: Callable[[], bytes]) -> bytes:
    data = bytearray(base())
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 0:
        del data[draw(st.integers(0, len(data))):]
    return bytes(data)


def only_checkpoint_errors(load: Callable[[], Any]) -> None:
    """Run ``load`` under tracemalloc: CheckpointError or success, bounded Python memory."""
    tracemalloc.start()
    try:
        load()
    except CheckpointError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PEAK_BOUND, f"peak Python allocation {peak} bytes"


def warm_up() -> None:
    # First use imports torch.distributed.checkpoint and builds the allow-list; keep that
    # one-time cost out of the traced peak.
    load_torch_bytes(torch_archive())
    load_pickle(dcp_metadata())


warm_up()

# Length fields that the C unpickler (CPython 3.11) trusts before reading: each made it allocate
# or attempt gigabytes. Protocol header + opcode + length, no payload.
BOMBS = [
    b"\x80\x03B" + struct.pack("<I", 2**31) + b"abc",  # BINBYTES
    b"\x80\x04\x8e" + struct.pack("<Q", 2**40),  # BINBYTES8
    b"\x80\x05\x96" + struct.pack("<Q", 2**40),  # BYTEARRAY8
    b"\x80\x02N" + b"r" + struct.pack("<I", 2**31 - 1) + b".",  # LONG_BINPUT far index
    b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.",  # FRAME
    b"\x80\x02\x8b" + struct.pack("<I", 2**31),  # LONG4
]


@FUZZ
@given(mutated(torch_archive))
def test_mutated_torch_archives_raise_checkpoint_errors_only(data: bytes) -> None:
    only_checkpoint_errors(lambda: load_torch_bytes(data))


@FUZZ
@given(mutated(lambda: data_pkl(torch_archive())))
def test_mutated_tensor_pickles_raise_checkpoint_errors_only(pickled: bytes) -> None:
    archive = with_data_pkl(torch_archive(), pickled)
    only_checkpoint_errors(lambda: load_torch_bytes(archive))


@FUZZ
@given(mutated(dcp_metadata))
@example(b"")
def test_mutated_metadata_raises_checkpoint_errors_only(data: bytes) -> None:
    only_checkpoint_errors(lambda: load_pickle(data))


@FUZZ
@given(st.sampled_from(BOMBS))
def test_length_bombs_allocate_nothing(data: bytes) -> None:
    only_checkpoint_errors(lambda: load_pickle(data))
    only_checkpoint_errors(lambda: load_torch_bytes(with_data_pkl(torch_archive(), data)))


def read_everything(directory: Path) -> None:
    with DcpReader(directory) as reader:
        for fqn, tensor in reader.index.tensors.items():
            reader.read_region(fqn, (0,) * len(tensor.shape), tensor.shape)
        for fqn in reader.index.blobs:
            reader.read_object(fqn)


@FUZZ
@given(metadata=mutated(dcp_metadata), data=mutated(
    lambda: (dcp_directory() / "__0_0.distcp").read_bytes()), which=st.integers(0, 2))
def test_mutated_dcp_directories_raise_checkpoint_errors_only(metadata: bytes, data: bytes,
                                                              which: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        shutil.copy(dcp_directory() / "__0_0.distcp", directory)
        shutil.copy(dcp_directory() / ".metadata", directory)
        if which in (0, 2):
            (directory / ".metadata").write_bytes(metadata)
        if which in (1, 2):
            (directory / "__0_0.distcp").write_bytes(data)
        only_checkpoint_errors(lambda: read_everything(directory))


def test_fuzz_inputs_are_valid_before_mutation() -> None:
    assert load_torch_bytes(torch_archive())["view"].shape == (3, 2)
    assert load_torch_bytes(with_data_pkl(torch_archive(),
                                          data_pkl(torch_archive())))["ids"].tolist() == [0, 1, 2]
    assert pickle.loads(dcp_metadata()).version == load_pickle(dcp_metadata()).version
    read_everything(dcp_directory())
