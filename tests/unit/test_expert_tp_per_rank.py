"""Expert TP in per-rank files read back: what the reader refuses (hostile or inconsistent
files) as typed errors. The happy paths are in tests/clients/test_gpt_oss_etp_client.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ckpt_ir
from ckpt_ir.errors import CorruptCheckpointError
from tests.clients import hf_models

EXPERT = "decoder.layers.0.mlp.experts.linear_fc2.weight0"


def write_etp1(root: Path) -> Path:
    """A tiny qwen3_moe as verl-legacy at TP 2, expert TP 1: both TP ranks hold whole experts
    (also the checkpoint of tests/unit/test_per_rank_metadata_only.py)."""
    hf = hf_models.make_hf_model("qwen3_moe", root, seed=4)
    out = root / "verl"
    ckpt_ir.convert(hf, out, to="verl-legacy", layout={"tp": 2, "etp": 1},
                    pad_vocab_to_multiple=128)
    return out


@pytest.fixture(scope="module")
def etp1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_etp1(tmp_path_factory.mktemp("etp1"))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_the_record_says_etp_1_and_both_tp_ranks_hold_whole_experts(etp1: Path) -> None:
    record = json.loads((etp1 / "model" / "ckpt_ir_layout.json").read_text())
    assert (record["tp"], record["etp"]) == (2, 1)
    a, b = (torch.load(etp1 / "model" / f"mp_rank_0{t}" / "model.pt", weights_only=True)[0]
            for t in (0, 1))
    assert torch.equal(a[EXPERT], b[EXPERT]) and a[EXPERT].shape[-1] == 32  # F = 32, whole


def test_a_record_with_a_bad_etp_is_refused(etp1: Path, tmp_path: Path) -> None:
    bad = _copy(etp1, tmp_path / "bad")
    path = bad / "model" / "ckpt_ir_layout.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "etp": "1"}))
    with pytest.raises(CorruptCheckpointError, match="positive integer etp"):
        ckpt_ir.convert(bad, tmp_path / "hf", to="hf")
    path.write_text(json.dumps({**json.loads(path.read_text()), "etp": 4}))
    with pytest.raises(CorruptCheckpointError, match="expert TP=4 does not divide TP=2"):
        ckpt_ir.convert(bad, tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


def test_tp_ranks_disagreeing_on_a_shared_expert_piece_are_refused(etp1: Path,
                                                                    tmp_path: Path) -> None:
    bad = _copy(etp1, tmp_path / "bad")
    path = bad / "model" / "mp_rank_01" / "model.pt"
    chunks = torch.load(path, weights_only=True)
    chunks[0][EXPERT] = chunks[0][EXPERT] + 1
    torch.save(chunks, path)
    with pytest.raises(CorruptCheckpointError, match="differs between TP ranks 0 and 1"):
        ckpt_ir.convert(bad, tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()
