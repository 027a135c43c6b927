"""verl-fsdp's streaming read: ``Shard(0)`` shards handed over as row blocks (``read_rows``)
that ``locate`` finds in the rank files, so ``convert --to hf`` copies them file to file.

Tensors here are larger than the executor's 1 MiB FileSlab threshold, so the conversions
below take the ``copy_file_range`` path; uneven ``torch.chunk`` cuts (8191 rows over 3 or 2
ranks) and an HSDP mesh whose replicas must be skipped are covered.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import ckpt_ir
from ckpt_ir.capabilities import LocatingReader, RowsReader
from ckpt_ir.converters.verl_fsdp import (
    VerlFsdpReader,
    _DTensorRef,
    _DTensorZipWriter,
    chunk_box,
)
from tests.fixtures import TINY_LLAMA, load_hf_tensors, write_hf

# vocab 8191 x hidden 64 in fp32: embed_tokens and lm_head are 2 MiB, cut unevenly.
BIG = {**TINY_LLAMA, "vocab_size": 8191, "hidden_size": 64, "head_dim": 16}
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    write_hf(path, BIG, dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def role(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vf") / "actor"
    ckpt_ir.convert(hf_dir, out, "verl-fsdp", fsdp_world_size=3)
    return out


def _file_bytes(path: Path, offset: int, nbytes: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


def test_rows_are_the_shards_in_order_and_located_in_their_rank_files(role, hf_dir):
    want = load_hf_tensors(hf_dir)
    reader = VerlFsdpReader(role)
    try:
        assert isinstance(reader, RowsReader) and isinstance(reader, LocatingReader)
        rows = reader.read_rows(EMBED)
        assert rows is not None and [r.shape[0] for r in rows] == [2731, 2731, 2729]
        assert torch.equal(torch.cat(rows), want[EMBED])
        for rank, block in enumerate(rows):
            where = reader.locate(block)
            assert where is not None
            path, offset = where
            assert path.name == f"model_world_size_3_rank_{rank}.pt"
            # The located range holds exactly the block's bytes: what copy_file_range copies.
            nbytes = block.numel() * block.element_size()
            assert _file_bytes(path, offset, nbytes) == block.numpy().tobytes()
        assert reader.locate(torch.zeros(4)) is None  # not a view of a rank file
        assert reader.read_rows("no.such.tensor") is None
    finally:
        reader.close()


def test_convert_to_hf_copies_the_rows_bit_exact(role, hf_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in role.glob("model_world_size_*.pt")}
    ckpt_ir.convert(role, tmp_path / "hf", "hf")
    want, got = load_hf_tensors(hf_dir), load_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    # Copied out of the rank files, never written into them.
    assert {p.name: p.read_bytes() for p in role.glob("model_world_size_*.pt")} == before


def test_a_dtype_change_casts_each_row_block(role, hf_dir, tmp_path):
    """``--dtype bf16``: the row blocks are cast one at a time (memory slabs, no FileSlab)."""
    want = load_hf_tensors(hf_dir)
    ckpt_ir.convert(role, tmp_path / "bf16", "hf", dtype="bf16")
    got = load_hf_tensors(tmp_path / "bf16")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)


def _save(state: dict, path: Path) -> None:
    """``torch.save`` of ``state`` as FSDP writes it: DTensors pickled by torch's rebuild."""
    archive = _DTensorZipWriter(path)
    out = OrderedDict()
    for name, value in state.items():
        local = value.to_local()
        out[name] = _DTensorRef(archive.add_tensor(local), value._spec, tuple(value.shape),
                                tuple(value.stride()), value.dtype)
    archive.close(out)


def _hsdp_role(hf_dir: Path, tmp_path: Path, want: dict[str, torch.Tensor]) -> Path:
    """4 ranks on a 2x2 ``("ddp", "fsdp")`` mesh, ``[Replicate(), Shard(0)]``: ranks 2 and 3
    are replicas of ranks 0 and 1."""
    role = tmp_path / "actor"
    role.mkdir()
    shutil.copytree(hf_dir, role / "huggingface", ignore=shutil.ignore_patterns("*.safetensors"))
    (role / "fsdp_config.json").write_text('{"FSDP_version": 2, "world_size": 4}')
    for rank in range(4):
        mesh = DeviceMesh("cpu", torch.arange(4).reshape(2, 2), mesh_dim_names=("ddp", "fsdp"),
                          _init_backend=False, _rank=rank)
        state = {}
        for name, full in want.items():
            start, n = chunk_box(full.shape[0], 2, rank % 2)
            state[name] = DTensor.from_local(full[start:start + n], mesh,
                                             [Replicate(), Shard(0)], run_check=False,
                                             shape=full.shape, stride=full.stride())
        _save(state, role / f"model_world_size_4_rank_{rank}.pt")
    return role


def test_hsdp_rows_come_from_the_first_replica_only(hf_dir, tmp_path):
    want = load_hf_tensors(hf_dir)
    role = _hsdp_role(hf_dir, tmp_path, want)
    reader = VerlFsdpReader(role)
    try:
        rows = reader.read_rows(EMBED)
        assert rows is not None and len(rows) == 2
        assert [reader.locate(r)[0].name for r in rows] == ["model_world_size_4_rank_0.pt",
                                                            "model_world_size_4_rank_1.pt"]
    finally:
        reader.close()
    # The replicas' files are not needed: the conversion reads ranks 0 and 1 alone.
    for rank in (2, 3):
        os.truncate(role / f"model_world_size_4_rank_{rank}.pt", 0)
    ckpt_ir.convert(role, tmp_path / "hf", "hf")
    got = load_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
