"""Conversion spread over processes (torchrun, gloo): same output as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt_ir
from ckpt_ir import dtypes
from ckpt_ir.distributed import partition_units
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.planner import DestView, SourceView, make_plan
from ckpt_ir.tables import NativeParams
from tests.fixtures import TINY_LLAMA, load_dcp_tensors, write_hf
from tests.strategies import bits_equal, dense_configs

REPO = Path(__file__).resolve().parents[2]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "ckpt_ir", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@settings(max_examples=40)
@given(config=dense_configs(), world=st.integers(1, 5), files=st.integers(1, 7))
def test_partition_covers_every_unit_once_and_keeps_files_together(config, world, files):
    cfg = ModelConfig.from_hf(config)
    specs = {n: TensorSpec(n, s, dtypes.BFLOAT16) for n, s in cfg.schema().items()}
    plan = make_plan(SourceView("hf", "hf", NativeParams(), specs),
                     DestView("mcore-dist", "mcore", NativeParams()), cfg)
    names = [s.name for s in plan.dest_specs]
    file_of = {n: (f"f{i * files // len(names)}" if i % 3 else None)
               for i, n in enumerate(names)}
    shares = partition_units(plan, file_of.__getitem__, world)
    assert len(shares) == world
    assert sorted(i for s in shares for i in s) == list(range(len(plan.units)))
    owner = {}
    for rank, share in enumerate(shares):
        for i in share:
            for t in plan.units[i].targets:
                f = file_of[t.native]
                if f is not None:
                    assert owner.setdefault(f, rank) == rank



@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("dist") / "hf"
    write_hf(src, {**TINY_LLAMA, "num_hidden_layers": 4}, shards=2)
    return src


def test_torchrun_hf_to_mcore_dist_matches_single_process(model, tmp_path):
    ckpt_ir.convert(model, tmp_path / "single", to="mcore-dist")
    r = torchrun("convert", str(model), str(tmp_path / "multi"), "--to", "mcore-dist",
                 "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("written by 2 processes") == 1  # only rank 0 reports
    files = {p.name for p in (tmp_path / "multi").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "metadata.json"} <= files
    a, b = load_dcp_tensors(tmp_path / "single"), load_dcp_tensors(tmp_path / "multi")
    assert a.keys() == b.keys()
    assert all(bits_equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if ".ckpt-ir-tmp-" in p.name]


def test_torchrun_mcore_dist_to_hf_is_byte_identical(model, tmp_path):
    ckpt_ir.convert(model, tmp_path / "dist", to="mcore-dist")
    ckpt_ir.convert(tmp_path / "dist", tmp_path / "single", to="hf", max_shard_size=20000)
    r = torchrun("convert", str(tmp_path / "dist"), str(tmp_path / "multi"), "--to", "hf",
                 "--max-shard-size", "20000", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len([n for n in single if n.endswith(".safetensors")]) > 2
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == single
    for name in single:
        assert (tmp_path / "single" / name).read_bytes() == \
            (tmp_path / "multi" / name).read_bytes(), name


def test_torchrun_reports_input_errors_once_and_writes_nothing(model, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")  # an empty directory would be taken
    r = torchrun("convert", str(model), str(tmp_path / "taken"), "--to", "mcore-dist",
                 "--overwrite")
    assert r.returncode != 0
    assert "holds files that are not a checkpoint ckpt-ir recognises" in r.stderr
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if ".ckpt-ir-tmp-" in p.name]


GROUP_SCRIPT = """
import sys
import torch.distributed as dist
import ckpt_ir

mine = sys.argv[3] == "caller-group"
if mine:
    dist.init_process_group("gloo")
rank = dist.get_rank() if mine else None
ckpt_ir.convert(sys.argv[1], sys.argv[2], to="mcore-dist")
# ckpt-ir destroys only a group it created itself (gloo's threads must not outlive the
# interpreter: SIGABRT at exit otherwise); the caller's group stays usable.
assert dist.is_initialized() == mine, dist.is_initialized()
if mine:
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("who", ["ckpt-ir-group", "caller-group"])
def test_the_process_group_is_destroyed_only_by_whoever_created_it(model, tmp_path, who):
    script = tmp_path / "job.py"
    script.write_text(GROUP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", str(script), str(model), str(tmp_path / "out"),
                        who], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / ".metadata").is_file()
