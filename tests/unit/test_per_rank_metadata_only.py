"""Per-rank readers opened for metadata only (``ckpt-ir inspect``): the rank files' tensors
are read as records, and the reader indexes, checks and describes exactly what it does with
tensors; reading a tensor is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ckpt_ir.errors import CorruptCheckpointError, InternalError
from ckpt_ir.orchestration import open_reader
from ckpt_ir.safety.unpickler.records import TensorRecord
from tests.unit.test_expert_tp_per_rank import write_etp1

EXPERT = "decoder.layers.0.mlp.experts.linear_fc2.weight0"


@pytest.fixture(scope="module")
def etp1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # TP 2, expert TP 1: both TP ranks hold whole experts, compared while indexing.
    return write_etp1(tmp_path_factory.mktemp("etp1"))


def test_metadata_only_reader_indexes_what_the_default_reader_does(etp1: Path) -> None:
    full, _ = open_reader(etp1, None)
    meta, _ = open_reader(etp1, None, metadata_only=True)
    try:
        assert meta._metadata_only and not full._metadata_only
        assert any(isinstance(v, TensorRecord) for c in meta._state.values() for chunk in c
                   for v in chunk.values())
        assert dict(meta.tensors()) == dict(full.tensors())
        assert dict(meta.dropped()) == dict(full.dropped())
        assert meta.describe() == full.describe()
        name = next(iter(meta.tensors()))
        with pytest.raises(InternalError, match="opened for its metadata only"):
            meta.read(name)
        assert full.read(name).shape == meta.tensors()[name].shape
    finally:
        full.close()
        meta.close()


def test_metadata_only_reader_refuses_disagreeing_expert_pieces(etp1: Path,
                                                                 tmp_path: Path) -> None:
    bad = shutil.copytree(etp1, tmp_path / "bad")
    path = bad / "model" / "mp_rank_01" / "model.pt"
    chunks = torch.load(path, weights_only=True)
    chunks[0][EXPERT] = chunks[0][EXPERT] + 1
    torch.save(chunks, path)
    with pytest.raises(CorruptCheckpointError, match="differs between TP ranks 0 and 1"):
        open_reader(bad, None, metadata_only=True)
