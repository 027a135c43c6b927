"""FSDP1 without a device mesh (real torch ``FullyShardedDataParallel`` under gloo on CPU)
against ``verl-fsdp``: its ``ShardedTensor`` rank files, read without a process group.

A tiny random llama (vocab 301: no world size divides it, so the last shards are short) is
wrapped in ``FullyShardedDataParallel(model, device_id=cpu)`` with no device mesh and saved
(``tests/clients/fsdp1_jobs.py``) at W=2 and W=3, two ways each: ``torch.save`` of the
``SHARDED_STATE_DICT`` (a hand-rolled FSDP1 trainer) and verl 0.9.1's ``FSDPCheckpointManager``
(fp32 and bf16), a model with tied embeddings (qwen2, W=2), and ``HYBRID_SHARD`` at W=4 (two
groups of 2 ranks, each a replica: only the first is read). Each converts to HF bit for
bit with its dtype kept (verl's merger casts to bf16), transformers' logits from ckpt-ir's
output equal the model's, and the optimizer file is listed as not converted. The unit tests'
fixture writer (tests/clients/fsdp1_files.py) pickles the same globals as the real saves.

Three process launches (W=2, W=3, W=4) carry all of it.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir
from ckpt_ir.orchestration import open_reader
from tests.clients import hf_models
from tests.clients.fsdp1_files import fsdp1_rank_states, save_rank_file
from tests.clients.fsdp1_jobs import launch

pytestmark = [pytest.mark.clients, pytest.mark.slow]

SAVES = {  # name: (world size, how, dtype)
    "torch_w2": (2, "torch", "float32"),
    "verl_w2": (2, "verl", "float32"),
    "torch_w3": (3, "torch", "float32"),
    "verl_w3_bf16": (3, "verl", "bfloat16"),
}


@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fsdp1")
    hf = hf_models.make_hf_model("llama", base, seed=3)
    out = {name: base / "run" / name / "actor" for name in SAVES}
    # Tied embeddings (qwen2): one parameter under two state-dict keys.
    tied = hf_models.make_hf_model("qwen2", base, seed=4)
    out["tied_w2"] = base / "run" / "tied_w2" / "actor"
    tied_job = {"command": "save", "hf_dir": str(tied), "out": str(out["tied_w2"]),
                "how": "torch", "dtype": "float32"}
    for world in (2, 3):
        launch("batch", [{"command": "save", "hf_dir": str(hf), "out": str(out[name]),
                          "how": how, "dtype": dtype}
                         for name, (w, how, dtype) in SAVES.items() if w == world]
               + ([tied_job] if world == 2 else []), world_size=world)
    # HYBRID_SHARD at W=4: two groups of 2 ranks, each a replica.
    out["hybrid_w4"] = base / "run" / "hybrid_w4" / "actor"
    launch("save", {"hf_dir": str(hf), "out": str(out["hybrid_w4"]), "how": "torch",
                    "dtype": "float32", "hybrid": 2}, world_size=4)
    out["hf"], out["tied_hf"] = hf, tied
    return out


def _hf(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("save", sorted(SAVES))
def test_fsdp1_saves_convert_to_hf_bit_exact(saves, tmp_path, save):
    world, how, dtype_name = SAVES[save]
    dtype = getattr(torch, dtype_name)
    src = saves[save]
    if how == "torch":  # a bare torch.save: no config beside the files
        hf_config = saves["hf"]
    else:
        hf_config = None
        assert (src / "fsdp_config.json").is_file()
    report = ckpt_ir.convert(src, tmp_path / "hf", "hf", hf_config=hf_config)
    got, want = _hf(tmp_path / "hf"), _hf(saves["hf"])
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == dtype, name  # fp32 stays fp32, bf16 stays bf16
        assert torch.equal(got[name], tensor.to(dtype)), name
    if how == "verl":
        assert any("optimizer state" in why for why in report.dropped.values())
    reader, _ = open_reader(src, None, hf_config=hf_config)
    try:
        info = reader.describe()
    finally:
        reader.close()
    assert info["world_size"] == world
    assert info["mesh"] == f"{world} (ShardedTensor, no device mesh)"
    assert info["rank_files_read"] == list(range(world))
    if how == "verl":
        assert info["fsdp"] == "FSDP1"


def test_transformers_logits_from_the_converted_save_equal_the_model_s(saves, tmp_path):
    ckpt_ir.convert(saves["verl_w2"], tmp_path / "hf", "hf")
    ids = hf_models.input_ids()
    assert torch.equal(hf_models.hf_logits(tmp_path / "hf", ids),
                       hf_models.hf_logits(saves["hf"], ids))


def _globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        text = io.StringIO()
        pickletools.dis(z.read(name), text)
    return set(re.findall(r"GLOBAL\s+'([^']+)'", text.getvalue()))


def test_the_unit_tests_fixture_pickles_what_fsdp1_pickles(saves, tmp_path):
    real = saves["torch_w3"] / "model_world_size_3_rank_2.pt"
    states = fsdp1_rank_states(_hf(saves["hf"]), 3)
    save_rank_file(states[2], tmp_path / "fixture.pt")
    assert "torch.distributed._shard.sharded_tensor.api ShardedTensor" in _globals(real)
    assert _globals(tmp_path / "fixture.pt") == _globals(real)


def test_tied_embeddings_convert_bit_exact(saves, tmp_path):
    ckpt_ir.convert(saves["tied_w2"], tmp_path / "hf", "hf", hf_config=saves["tied_hf"])
    got, want = _hf(tmp_path / "hf"), _hf(saves["tied_hf"])
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_hybrid_sharding_reads_the_first_replica_bit_exact(saves, tmp_path):
    src = saves["hybrid_w4"]
    ckpt_ir.convert(src, tmp_path / "hf", "hf", hf_config=saves["hf"])
    got, want = _hf(tmp_path / "hf"), _hf(saves["hf"])
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    reader, _ = open_reader(src, None, hf_config=saves["hf"])
    try:
        assert reader.describe()["rank_files_read"] == [0, 1]
    finally:
        reader.close()
