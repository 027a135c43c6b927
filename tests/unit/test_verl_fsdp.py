"""``verl-fsdp`` without verl: DTensor admission in the restricted unpickler, the reader's
refusals of bad input (library and CLI: one line, exit 2, nothing written), detection, and
the writer's files as torch itself loads them.

Files are built by ckpt-ir's writer (checked against verl's real manager in
``tests/clients/test_verl_fsdp_client.py``), or by its DTensor archive writer from DTensors
built without a process group (``torch.save`` refuses those in torch 2.13: "invalid python
storage"), for other meshes and for shards that do not tile.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import ckpt_ir
from ckpt_ir.cli import main
from ckpt_ir.converters.verl_fsdp import (
    VerlFsdpReader,
    _DTensorRef,
    _DTensorZipWriter,
    chunk_box,
)
from ckpt_ir.detect import resolve
from ckpt_ir.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckpt_ir.safety.unpickler import load_pickle, load_torch
from ckpt_ir.safety.unpickler.dtensor import DTensorRecord
from tests.fixtures import TINY_LLAMA, load_hf_tensors, write_hf


def _mesh(world: int, rank: int, shape: tuple[int, ...] = (), names=("fsdp",)) -> DeviceMesh:
    ranks = torch.arange(world).reshape(shape or (world,))
    return DeviceMesh("cpu", ranks, mesh_dim_names=names, _init_backend=False, _rank=rank)


def _dtensor(full: torch.Tensor, world: int, rank: int, rows: int | None = None) -> DTensor:
    start, n = chunk_box(full.shape[0], world, rank)
    local = full[start:start + (n if rows is None else rows)]
    return DTensor.from_local(local, _mesh(world, rank), [Shard(0)], run_check=False,
                              shape=full.shape, stride=full.stride())


def _save(state: dict, path: Path) -> None:
    """``torch.save`` of ``state`` as FSDP writes it: DTensors pickled by torch's rebuild."""
    archive = _DTensorZipWriter(path)
    out = OrderedDict()
    for name, value in state.items():
        if isinstance(value, DTensor):
            local = value.to_local()
            out[name] = _DTensorRef(archive.add_tensor(local), value._spec, tuple(value.shape),
                                    tuple(value.stride()), value.dtype)
        else:
            out[name] = archive.add_tensor(value)
    archive.close(out)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    write_hf(path, dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def written(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vf") / "actor"
    ckpt_ir.convert(hf_dir, out, "verl-fsdp", fsdp_world_size=3)
    return out


# ---- the restricted unpickler admits DTensors as data, and nothing more ----


def test_dtensor_file_loads_as_records_without_torch_distributed_objects(tmp_path):
    full = torch.randn(7, 4)
    rep = DTensor.from_local(full[4:7], _mesh(4, 3, (2, 2), ("ddp", "fsdp")),
                             [Replicate(), Shard(0)], run_check=False, shape=full.shape,
                             stride=full.stride())
    _save({"w": _dtensor(full, 3, 2), "h": rep, "b": torch.ones(1)}, tmp_path / "m.pt")
    obj = load_torch(tmp_path / "m.pt")
    w, h = obj["w"], obj["h"]
    assert isinstance(w, DTensorRecord) and w.shape == (7, 4) and w.dtype == torch.float32
    assert torch.equal(w.local, full[6:7])  # torch.chunk: 3, 3, 1 rows
    assert [type(p).__name__ for p in w.spec.placements] == ["Shard"]
    assert w.spec.placements[0].dim == 0
    assert h.spec.mesh._mesh_dim_names == ("ddp", "fsdp")
    assert [type(p).__name__ for p in h.spec.placements] == ["Replicate", "Shard"]
    assert type(obj["b"]) is torch.Tensor


def _patched_pickle(tmp_path: Path, old: bytes, new: bytes) -> Path:
    """A DTensor file whose data.pkl has ``old`` replaced by ``new`` (same length)."""
    assert len(old) == len(new)
    src = tmp_path / "src.pt"
    _save({"w": _dtensor(torch.randn(4, 2), 2, 0)}, src)
    out = tmp_path / "patched.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(item, data)
    return out


def test_a_dtensor_pickle_naming_a_class_outside_the_admitted_ones_is_refused(tmp_path):
    # placement_types.Shard -> placement_types.Sh0rd (same length): not admitted.
    path = _patched_pickle(tmp_path, b"placement_types\nShard", b"placement_types\nSh0rd")
    with pytest.raises(UnsafeCheckpointError, match=r"placement_types\.Sh0rd"):
        load_torch(path)


class _Call:
    """Pickles as a call of torch's wrapper-subclass rebuild on its own."""

    def __reduce__(self):
        return (torch._utils._rebuild_wrapper_subclass, (1,))


def test_wrapper_subclass_rebuild_is_only_admitted_inside_a_dtensor():
    with pytest.raises(CorruptCheckpointError, match="outside _rebuild_from_type_v2"):
        load_pickle(pickle.dumps(_Call(), protocol=2))


# ---- reading: bad input is refused before anything is written ----


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``ckpt-ir ARGS`` in this process (the CLI's own ``main``: exit status and streams as
    the command gives them, without a Python start-up per case)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _bad_copy(written: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(written, bad)
    return bad


def _refusals(written: Path, tmp_path: Path):
    bad = _bad_copy(written, tmp_path / "missing")
    (bad / "model_world_size_3_rank_1.pt").unlink()
    yield bad, "model_world_size_3_rank_1.pt is missing"
    bad = _bad_copy(written, tmp_path / "other")
    shutil.copy(bad / "model_world_size_3_rank_0.pt", bad / "model_world_size_2_rank_0.pt")
    yield bad, "is from world size 2 but fsdp_config.json says world_size 3"
    bad = _bad_copy(written, tmp_path / "config")
    (bad / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    yield bad, "model_world_size_3_rank_0.pt is from world size 3"
    bad = _bad_copy(written, tmp_path / "tile")
    # Rank 1 holds one row too few of the embedding: the shards no longer tile it.
    state = torch.load(bad / "model_world_size_3_rank_1.pt", weights_only=True)
    full = torch.zeros(state["model.embed_tokens.weight"].shape)
    state["model.embed_tokens.weight"] = _dtensor(full, 3, 1, rows=32)
    (bad / "model_world_size_3_rank_1.pt").unlink()
    _save(state, bad / "model_world_size_3_rank_1.pt")
    yield bad, "do not tile"
    bad = _bad_copy(written, tmp_path / "unsafe")
    target = bad / "model_world_size_3_rank_2.pt"
    target.write_bytes(_patched_pickle(tmp_path, b"placement_types\nShard",
                                       b"placement_types\nSh0rd").read_bytes())
    yield bad, "not on the allow-list"
    # FSDP1 ShardedTensor files (read since #14) have their own refusals:
    # tests/unit/test_verl_fsdp_sharded_tensor.py.


def test_bad_input_is_one_line_exit_2_and_nothing_written(written, tmp_path):
    for bad, message in _refusals(written, tmp_path):
        dst = tmp_path / f"out-{bad.parent.name}"
        run = _cli("convert", str(bad), str(dst), "--to", "hf", "--no-progress")
        assert run.returncode == 2, (bad, run.stderr)
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0], (message, run.stderr)
        assert not dst.exists()
        assert list(dst.parent.glob(f".{dst.name}*")) == []


# ---- writing ----


def test_written_files_hold_fsdp2_dtensors_torch_loads(written, hf_dir):
    want = load_hf_tensors(hf_dir)
    assert json.loads((written / "fsdp_config.json").read_text()) == {"FSDP_version": 2,
                                                                       "world_size": 3}
    for rank in range(3):
        state = torch.load(written / f"model_world_size_3_rank_{rank}.pt", weights_only=True)
        assert sorted(state) == sorted(want)
        for name, tensor in want.items():
            dt = state[name]
            assert isinstance(dt, DTensor) and dt.placements == (Shard(0),)
            assert dt.device_mesh.mesh_dim_names == ("fsdp",)
            start, n = chunk_box(tensor.shape[0], 3, rank)
            assert dt.shape == tensor.shape
            assert torch.equal(dt.to_local(), tensor[start:start + n])


def test_round_trip_and_reshard(written, hf_dir, tmp_path):
    ckpt_ir.convert(written, tmp_path / "w2", "verl-fsdp", fsdp_world_size=2)
    ckpt_ir.convert(tmp_path / "w2", tmp_path / "hf", "hf")
    want, got = load_hf_tensors(hf_dir), load_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_skyrl_variant_reads(written, hf_dir, tmp_path):
    """SkyRL writes the same file names through fsspec (zip folder ``archive/``) and
    ``fsdp_config.json`` = ``{"fsdp_strategy": ..., "world_size": W}`` (fsdp-dcp-formats.md
    §3.7)."""
    role = tmp_path / "global_step_1" / "policy"
    shutil.copytree(written, role)
    for f in role.glob("model_world_size_*.pt"):
        with zipfile.ZipFile(f) as zin:
            records = [(i.filename.split("/", 1)[1], zin.read(i)) for i in zin.infolist()]
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zout:
            for name, data in records:
                zout.writestr(f"archive/{name}", data)
    (role / "fsdp_config.json").write_text(json.dumps({"fsdp_strategy": "fsdp2",
                                                       "world_size": 3}))
    ckpt_ir.convert(role, tmp_path / "hf", "hf")
    want, got = load_hf_tensors(hf_dir), load_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_fsdp_plus_tp_2d_mesh_reads(hf_dir, tmp_path):
    """A 2x2 ``("dp", "tp")`` mesh with ``(Shard(0), Shard(1))`` placements (FSDP + TP, which
    verl's merger refuses), vectors ``(Shard(0), Replicate())``: assembled bit for bit."""
    want = load_hf_tensors(hf_dir)
    role = tmp_path / "actor"
    role.mkdir()
    shutil.copytree(hf_dir, role / "huggingface", ignore=shutil.ignore_patterns("*.safetensors"))
    (role / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    for rank in range(4):
        mesh = _mesh(4, rank, (2, 2), ("dp", "tp"))
        dp, tp = divmod(rank, 2)
        state = {}
        for name, full in want.items():
            r0, nr = chunk_box(full.shape[0], 2, dp)
            local = full[r0:r0 + nr]
            placements = [Shard(0), Replicate()]
            if full.dim() == 2:
                c0, nc = chunk_box(full.shape[1], 2, tp)
                local, placements = local[:, c0:c0 + nc].contiguous(), [Shard(0), Shard(1)]
            state[name] = DTensor.from_local(local, mesh, placements, run_check=False,
                                             shape=full.shape, stride=full.stride())
        _save(state, role / f"model_world_size_4_rank_{rank}.pt")
    ckpt_ir.convert(role, tmp_path / "hf", "hf")
    got = load_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_one_gpu_save_of_plain_tensors_reads(hf_dir, tmp_path):
    """Single-GPU verl saves before FSDP2 held plain tensors (verl #903), and no
    ``fsdp_config.json`` before 2025-06-25: W comes from the file name, with a note."""
    want = load_hf_tensors(hf_dir)
    role = tmp_path / "actor"
    shutil.copytree(hf_dir, role / "huggingface", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(OrderedDict(want), role / "model_world_size_1_rank_0.pt")
    ckpt_ir.convert(role, tmp_path / "hf", "hf")
    got = load_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    reader = VerlFsdpReader(role)
    try:
        info = reader.describe()
    finally:
        reader.close()
    assert info["world_size"] == 1 and info["mesh"] == "1 (no DTensors (plain))"
    assert any("no fsdp_config.json" in n for n in info["notes"])


def test_world_size_option_is_checked(hf_dir, tmp_path):
    run = _cli("convert", str(hf_dir), str(tmp_path / "x"), "--to", "hf", "--world-size", "2")
    assert run.returncode == 2 and "--world-size applies to --to verl-fsdp" in run.stderr
    run = _cli("convert", str(hf_dir), str(tmp_path / "x"), "--to", "verl-fsdp",
               "--world-size", "0")
    assert run.returncode == 2 and "positive integer" in run.stderr
    assert not (tmp_path / "x").exists()


def test_run_and_step_directories_resolve_through_the_tracker(written, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(written, run / "global_step_5" / "actor")
    shutil.copytree(written, run / "global_step_9" / "actor")  # newer, not in the tracker
    (run / "latest_checkpointed_iteration.txt").write_text("5")
    got = resolve(run)
    assert (got.format, got.path, got.step) == ("verl-fsdp", run / "global_step_5" / "actor", 5)
    assert any("global_step_9 is newer than the tracker" in n for n in got.notes)
    step = resolve(run / "global_step_9")
    assert (step.format, step.path) == ("verl-fsdp", run / "global_step_9" / "actor")


def test_inspect_explains_a_verl_fsdp_role(written):
    run = _cli("inspect", str(written))
    assert run.returncode == 0, run.stderr
    assert "verl-fsdp (verl FSDP per-rank files (world size 3, FSDP2))" in run.stdout
    assert "mesh: 3 (fsdp)" in run.stdout and "lora: no" in run.stdout
    assert "dtype: float32" in run.stdout


def test_tiny_llama_fixture_is_what_the_tests_assume():
    assert TINY_LLAMA["vocab_size"] % 3  # uneven last shard at W=3


def test_trust_pickles_on_dtensor_files_is_a_one_line_refusal(written, tmp_path):
    """torch's own unpickler (``--trust-pickles``) rebuilds real DTensors; ckpt-ir takes their
    shards apart only as the restricted unpickler's records, so it says so (it was an exit 1)."""
    dst = tmp_path / "out"
    run = _cli("convert", str(written), str(dst), "--to", "hf", "--trust-pickles",
               "--no-progress")
    assert run.returncode == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "run without --trust-pickles" in lines[0], run.stderr
    assert not dst.exists()
