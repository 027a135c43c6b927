"""``convert --workers N``: forked processes on one machine give the single process's output.

Also the multi-node launch simulated on one machine: two torchrun invocations with
``--nnodes 2 --node-rank {0,1}`` meeting at one static rendezvous, as two nodes would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckpt_ir
from ckpt_ir.errors import CheckpointError, InternalError
from ckpt_ir.options import WriteOptions
from ckpt_ir.orchestration import open_reader, plan_conversion
from ckpt_ir.workers import run_workers
from tests.clients.mcore_harness import free_port, port_taken
from tests.fixtures import TINY_LLAMA, load_dcp_tensors, write_hf
from tests.strategies import bits_equal

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("workers") / "hf"
    write_hf(src, {**TINY_LLAMA, "num_hidden_layers": 4}, shards=2)
    return src


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("workers32") / "hf"
    # Large enough that casting a tensor to bf16 is a parallel region in torch (more than its
    # 32768-element grain): a forked worker must not enter one with the parent's thread team.
    write_hf(src, {**TINY_LLAMA, "num_hidden_layers": 2, "hidden_size": 256,
                   "intermediate_size": 512, "vocab_size": 512}, dtype=torch.float32)
    return src


def _no_temps(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".ckpt-ir-tmp-" in p.name]


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_hf_to_mcore_dist_matches_single_process(model, tmp_path, workers):
    ckpt_ir.convert(model, tmp_path / "single", to="mcore-dist")
    report = ckpt_ir.convert(model, tmp_path / "multi", to="mcore-dist", workers=workers)
    assert f"written by {workers} processes" in report.notes
    files = {p.name for p in (tmp_path / "multi").iterdir()}
    assert {f"__{r}_0.distcp" for r in range(workers)} <= files
    a, b = load_dcp_tensors(tmp_path / "single"), load_dcp_tensors(tmp_path / "multi")
    assert a.keys() == b.keys()
    assert all(bits_equal(a[k], b[k]) for k in a)
    assert _no_temps(tmp_path)


def test_workers_mcore_dist_to_hf_is_byte_identical(model, tmp_path):
    ckpt_ir.convert(model, tmp_path / "dist", to="mcore-dist")
    ckpt_ir.convert(tmp_path / "dist", tmp_path / "single", to="hf", max_shard_size=20000)
    seen: list[tuple[int, int]] = []
    ckpt_ir.convert(tmp_path / "dist", tmp_path / "multi", to="hf", max_shard_size=20000,
                    workers=3, progress=lambda done, total: seen.append((done, total)))
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len([n for n in single if n.endswith(".safetensors")]) > 2
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == single
    for name in single:
        assert (tmp_path / "single" / name).read_bytes() == \
            (tmp_path / "multi" / name).read_bytes(), name
    # Every worker's progress reaches the caller: the last report is the whole plan.
    assert seen and seen[-1][0] == seen[-1][1]


def test_forked_workers_cast_after_the_parent_used_threads(fp32_model, tmp_path):
    torch.randn(1 << 20).to(torch.bfloat16)  # the parent's OpenMP team exists before the fork
    ckpt_ir.convert(fp32_model, tmp_path / "single", to="hf", dtype="bf16",
                    max_shard_size=200_000)
    threads = torch.get_num_threads()
    ckpt_ir.convert(fp32_model, tmp_path / "multi", to="hf", dtype="bf16",
                    max_shard_size=200_000, workers=2)
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) >= 2
    for name in names:
        assert (tmp_path / "single" / name).read_bytes() == \
            (tmp_path / "multi" / name).read_bytes(), name


def _failing_on_rank_one(base: type) -> type:
    """``base`` whose rank 1 fails on its first tensor: a worker's error must abort the
    whole conversion."""

    class Failing(base):
        def write(self, name, tensor):
            if self.options.rank == 1:
                raise CheckpointError(f"injected failure writing {name}")
            return super().write(name, tensor)

        def write_slabs(self, name, slabs):
            if self.options.rank == 1:
                raise CheckpointError(f"injected failure writing {name}")
            return super().write_slabs(name, slabs)

    return Failing


def test_a_failing_worker_aborts_the_conversion_and_writes_nothing(model, tmp_path):
    reader, _ = open_reader(model, None)
    try:
        plan, writer_cls = plan_conversion(reader, "mcore-dist", WriteOptions())
        with pytest.raises(CheckpointError, match="injected failure"):
            run_workers(plan, reader, _failing_on_rank_one(writer_cls), WriteOptions(),
                        tmp_path / "out", workers=2, overwrite=False, protect=(model,))
    finally:
        reader.close()
    assert not (tmp_path / "out").exists()
    assert _no_temps(tmp_path)


def _dying_on_rank_one(base: type) -> type:
    """``base`` whose rank 1 process exits at once, as one killed by the OOM killer would:
    it reports nothing."""

    class Dying(base):
        def begin(self, specs):
            if self.options.rank == 1:
                os._exit(9)
            return super().begin(specs)

    return Dying


def test_a_worker_that_dies_is_noticed(model, tmp_path):
    reader, _ = open_reader(model, None)
    try:
        plan, writer_cls = plan_conversion(reader, "mcore-dist", WriteOptions())
        with pytest.raises(InternalError, match="worker 1 exited"):
            run_workers(plan, reader, _dying_on_rank_one(writer_cls), WriteOptions(),
                        tmp_path / "out", workers=2, overwrite=False, protect=(model,))
    finally:
        reader.close()
    assert not (tmp_path / "out").exists()
    assert _no_temps(tmp_path)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_ir", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          timeout=300)


def test_cli_workers(model, tmp_path):
    r = _cli("convert", str(model), str(tmp_path / "out"), "--to", "mcore-dist",
             "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "written by 2 processes" in r.stdout
    bad = _cli("convert", str(model), str(tmp_path / "bad"), "--to", "mcore-dist",
               "--workers", "0")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "--workers" in bad.stderr
    both = _cli("convert", str(model), str(tmp_path / "both"), "--to", "mcore-dist",
                "--workers", "2", env={"RANK": "0", "WORLD_SIZE": "2"})
    assert both.returncode == 2
    assert "torchrun" in both.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "both").exists()


def test_two_nodes_simulated_with_node_ranks_match_one_process(model, tmp_path):
    """``torchrun --nnodes 2 --node-rank R`` on one machine, one process per 'node', both
    pointing at the same static rendezvous: the launch a two-node job uses."""
    ckpt_ir.convert(model, tmp_path / "single", to="mcore-dist")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for attempt in range(3):  # the free port may be taken before the launcher binds it
        port = free_port()
        nodes = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={n}",
             "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
             "-m", "ckpt_ir", "convert", str(model), str(tmp_path / "multi"), "--to",
             "mcore-dist", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for n in (0, 1)]
        outs = [p.communicate(timeout=300) for p in nodes]
        if attempt < 2 and any(p.returncode for p in nodes) \
                and any(port_taken(err) for _, err in outs):
            continue
        break
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    assert "written by 2 processes" in outs[0][0]  # node 0's rank 0 reports
    assert "written by" not in outs[1][0]
    a, b = load_dcp_tensors(tmp_path / "single"), load_dcp_tensors(tmp_path / "multi")
    assert a.keys() == b.keys()
    assert all(bits_equal(a[k], b[k]) for k in a)
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (tmp_path / "multi").iterdir()}
    assert _no_temps(tmp_path)


def test_fewer_destination_files_than_workers_forks_only_ranks_with_work(model, tmp_path,
                                                                          monkeypatch):
    """One HF shard and three workers: nothing is forked (ranks 1 and 2 have nothing to write),
    and the output is the single process's, byte for byte."""
    import multiprocessing.context

    forked: list[int] = []
    start = multiprocessing.context.ForkProcess._Popen

    def counting(process_obj):
        forked.append(1)
        return start(process_obj)

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "_Popen", staticmethod(counting))
    ckpt_ir.convert(model, tmp_path / "single", to="hf")
    ckpt_ir.convert(model, tmp_path / "multi", to="hf", workers=3)
    assert forked == []
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "multi").iterdir())
    for name in names:
        assert (tmp_path / "single" / name).read_bytes() == \
            (tmp_path / "multi" / name).read_bytes(), name


def test_cli_workers_share_torch_threads_and_do_not_hang(fp32_model, tmp_path):
    """The command forks before any tensor work of its own, so its workers may run torch
    with several threads: in a fresh process that declares it (as ``ckpt-ir convert`` does),
    workers forced to 2 threads each run parallel casts in the forked children. They must
    finish (a child entering an OpenMP team its parent started would hang) and write what
    one process writes."""
    code = f"""
import sys, ckpt_ir, ckpt_ir.workers as w
w.fork_before_threads()
w._threads_per_process = lambda procs: 2  # this machine may have too few cores for 2 each
ckpt_ir.convert({str(fp32_model)!r}, sys.argv[1], to="hf", dtype="bf16",
                max_shard_size=200_000, workers=2)
"""
    many = subprocess.run([sys.executable, "-c", code, str(tmp_path / "many")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert many.returncode == 0, many.stderr
    ckpt_ir.convert(fp32_model, tmp_path / "one", to="hf", dtype="bf16",
                    max_shard_size=200_000)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) >= 2
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == \
            (tmp_path / "many" / name).read_bytes(), name


def test_threads_are_shared_out_only_where_the_process_forks_before_threads():
    code = ("import torch, ckpt_ir.workers as w; a = w._threads_per_process(2); "
            "w.fork_before_threads(); print(a, w._threads_per_process(1), "
            "w._threads_per_process(10**6), torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    a, one, many, threads = out.stdout.split()
    # A caller's process: one thread per worker; the command: its threads shared out.
    assert (a, one, many) == ("1", threads, "1")
