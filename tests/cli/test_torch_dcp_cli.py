"""torch-dcp from the command line: torchtitan's names and key eras, DCP trainers' directory
trees (torchtitan, verl's torchtitan engine, NeMo-RL v1/v2), and damaged input (one line on
stderr, exit 2, nothing written).

DCP directories here are written by ckpt-ir and by ``dcp.save(..., no_dist=True)`` (torch's own
writer without a process group); FSDP2 saves are in tests/clients/test_torch_dcp_client.py.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckpt_ir
from ckpt_ir.converters.storage.dcp_files import DcpDataFile, DcpReader, write_metadata
from ckpt_ir.converters.torch_dcp import TorchDcpReader
from ckpt_ir.detect import resolve
from ckpt_ir.errors import FormatError
from tests.fixtures import TINY_LLAMA, load_dcp_tensors, load_hf_tensors, tree_bytes, write_hf
from tests.strategies import bits_equal

REPO = Path(__file__).resolve().parents[2]

QWEN3_MOE = {
    "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2,
    "hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "num_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
    "intermediate_size": 12, "mlp_only_layers": [0], "vocab_size": 31,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "max_position_embeddings": 64,
}


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckpt_ir", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _assert_same_hf(got_dir: Path, want: dict[str, torch.Tensor]) -> None:
    got = load_hf_tensors(got_dir)
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for name, t in want.items():
        assert bits_equal(got[name], t), name


def test_torchtitan_output_has_torchtitans_keys_and_rope_order(tmp_path: Path) -> None:
    want = write_hf(tmp_path / "hf", TINY_LLAMA, dtype=torch.float32)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "tt", to="torch-dcp", torchtitan=True)
    got = load_dcp_tensors(tmp_path / "tt" / "step-0")
    layer = {f"layers.0.{k}" for k in (
        "attention_norm.weight", "attention.qkv_linear.wq.weight",
        "attention.qkv_linear.wk.weight", "attention.qkv_linear.wv.weight",
        "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight",
        "feed_forward.w2.weight", "feed_forward.w3.weight")}
    assert {k for k in got if k.startswith("layers.0.")} == layer
    assert {k for k in got if not k.startswith("layers.")} == {
        "tok_embeddings.weight", "norm.weight", "lm_head.weight"}
    # torchtitan's llama3 adapter, from_hf: _reverse_permute(w, n_heads) on q and k.
    heads, kv, hd, dim = 4, 2, 12, 32
    for key, hf, n in (("wq", "q_proj", heads), ("wk", "k_proj", kv)):
        w = want[f"model.layers.0.self_attn.{hf}.weight"]
        permuted = w.view(n, 2, hd // 2, dim).transpose(1, 2).reshape(n * hd, dim)
        assert bits_equal(got[f"layers.0.attention.qkv_linear.{key}.weight"], permuted)
    assert bits_equal(got["layers.0.attention.qkv_linear.wv.weight"],
                      want["model.layers.0.self_attn.v_proj.weight"])
    # torch's own reader takes it too (what torchtitan's dcp.load goes through).
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(tmp_path / "tt" / "step-0", tmp_path / "tt.pt")
    loaded = torch.load(tmp_path / "tt.pt", weights_only=True)
    assert loaded.keys() == got.keys()
    assert all(bits_equal(loaded[k], got[k]) for k in got)


def test_torchtitan_moe_experts_are_stacked(tmp_path: Path) -> None:
    want = write_hf(tmp_path / "hf", QWEN3_MOE, dtype=torch.bfloat16)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "tt", to="torch-dcp", torchtitan=True)
    got = load_dcp_tensors(tmp_path / "tt" / "step-0")
    e = "layers.1.moe.routed_experts.inner_experts."
    for key, proj in (("w1_EFD", "gate_proj"), ("w3_EFD", "up_proj"), ("w2_EDF", "down_proj")):
        stacked = torch.stack([want[f"model.layers.1.mlp.experts.{i}.{proj}.weight"]
                               for i in range(3)])
        assert bits_equal(got[e + key], stacked), key
    assert "layers.0.feed_forward.w1.weight" in got  # mlp_only_layers: a dense layer
    assert bits_equal(got["layers.1.moe.router.gate.weight"],
                      want["model.layers.1.mlp.gate.weight"])


def test_older_torchtitan_key_schemes_are_read(tmp_path: Path) -> None:
    """Keys from before #2878 (attention.wq) and #2937 (output.weight), beside optimizer,
    scheduler and training state saved by torch's own writer: read, the rest listed."""
    want = write_hf(tmp_path / "hf", TINY_LLAMA, dtype=torch.float32)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "tt", to="torch-dcp", torchtitan=True)
    state = {k.replace("qkv_linear.", "").replace("lm_head.", "output."): v
             for k, v in load_dcp_tensors(tmp_path / "tt" / "step-0").items()}
    state.update({"optimizer.state.norm.weight.exp_avg": torch.zeros(32),
                  "lr_scheduler.last_epoch": 7, "train_state.step": 7})
    old = tmp_path / "dump" / "checkpoint" / "step-7"
    dcp.save(state, checkpoint_id=str(old), no_dist=True)
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "dump" / "config.json")
    found = resolve(tmp_path / "dump" / "checkpoint")
    assert (found.format, found.path) == ("torch-dcp", old)
    report = ckpt_ir.convert(tmp_path / "dump" / "checkpoint", tmp_path / "back", to="hf")
    _assert_same_hf(tmp_path / "back", want)
    assert report.dropped == {"optimizer.state.norm.weight.exp_avg": "optimizer state",
                              "lr_scheduler.last_epoch": "learning-rate scheduler state",
                              "train_state.step": "training state (step, tokens seen)"}


def _nested_save(d: Path, want: dict[str, torch.Tensor], *, prefix: bool) -> None:
    state = {"model": dict(want)} if prefix else dict(want)
    dcp.save(state, checkpoint_id=str(d), no_dist=True)


def test_dcp_trainer_trees_are_walked(tmp_path: Path) -> None:
    want = write_hf(tmp_path / "hf", TINY_LLAMA, dtype=torch.bfloat16)
    cfg = tmp_path / "hf"
    # NeMo-RL v1: step_N/policy/weights/ holds {"model": ...}; v2: .../weights/model/, bare.
    nemo1 = tmp_path / "nemo1" / "step_3" / "policy" / "weights"
    _nested_save(nemo1, want, prefix=True)
    (tmp_path / "nemo1" / "tmp_step_4").mkdir()  # an unfinished save: never a step
    nemo2 = tmp_path / "nemo2" / "step_5" / "policy" / "weights" / "model"
    _nested_save(nemo2, want, prefix=False)
    # verl's torchtitan engine: global_step_N/step-N/ under the run's tracker.
    verl = tmp_path / "verl" / "global_step_2" / "step-2"
    _nested_save(verl, want, prefix=False)
    (tmp_path / "verl" / "latest_checkpointed_iteration.txt").write_text("2")
    for run, inner, step in ((tmp_path / "nemo1", nemo1, 3), (tmp_path / "nemo2", nemo2, 5),
                             (tmp_path / "verl", verl, 2)):
        found = resolve(run)
        assert (found.format, found.path, found.step) == ("torch-dcp", inner, step), run
        out = tmp_path / f"{run.name}-hf"
        ckpt_ir.convert(run, out, to="hf", hf_config=cfg)
        _assert_same_hf(out, want)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A torch-dcp checkpoint of HF names written by torch's own DCP writer, with its config."""
    write_hf(tmp_path / "hf", TINY_LLAMA, dtype=torch.float32)
    d = tmp_path / "dcp"
    dcp.save(load_hf_tensors(tmp_path / "hf"), checkpoint_id=str(d), no_dist=True)
    shutil.copy(tmp_path / "hf" / "config.json", d / "config.json")
    return d


def _one_line_exit_2(src: Path, dst: Path, *expected: str) -> None:
    before = tree_bytes(src)
    run = cli("convert", src, dst, "--to", "hf", "--no-progress")
    assert run.returncode == 2, run.stderr
    line, = run.stderr.strip().splitlines()
    for text in expected:
        assert text in line, line
    assert not dst.exists() and not any(dst.parent.glob(f".{dst.name}*"))
    assert tree_bytes(src) == before


def test_a_distcp_cut_short_is_one_line_exit_2(ckpt: Path, tmp_path: Path) -> None:
    data = ckpt / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    _one_line_exit_2(ckpt, tmp_path / "out", "__0_0.distcp", "bytes")


def test_a_missing_distcp_is_one_line_exit_2(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "__0_0.distcp").unlink()
    _one_line_exit_2(ckpt, tmp_path / "out", "missing file '__0_0.distcp'")


def _rewrite_metadata(d: Path, edit) -> None:
    # The test's own fixture, written by torch a moment ago: plain pickle is fine here.
    md = pickle.loads((d / ".metadata").read_bytes())
    edit(md)
    (d / ".metadata").write_bytes(pickle.dumps(md, protocol=4))


def test_chunks_that_do_not_tile_a_tensor_are_one_line_exit_2(ckpt: Path,
                                                               tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    def shrink(md) -> None:
        entry = md.state_dict_metadata["model.norm.weight"]
        entry.chunks = [ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([20]))]

    _rewrite_metadata(ckpt, shrink)
    _one_line_exit_2(ckpt, tmp_path / "out", "model.norm.weight")


def test_a_metadata_pickle_naming_other_classes_is_refused(ckpt: Path, tmp_path: Path) -> None:
    def hostile(md) -> None:
        md.planner_data = {"x": subprocess.Popen}

    _rewrite_metadata(ckpt, hostile)
    _one_line_exit_2(ckpt, tmp_path / "out", "subprocess")


def test_torchtitan_needs_a_family_torchtitan_has(tmp_path: Path) -> None:
    write_hf(tmp_path / "hf", {**TINY_LLAMA, "model_type": "mistral",
                               "architectures": ["MistralForCausalLM"]})
    run = cli("convert", tmp_path / "hf", tmp_path / "out", "--to", "torch-dcp", "--torchtitan")
    assert run.returncode == 2, run.stderr
    line, = run.stderr.strip().splitlines()
    assert "torchtitan" in line and "mistral" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(FormatError, match="writes torch-dcp, not hf"):
        ckpt_ir.convert(tmp_path / "hf", tmp_path / "out", to="hf", torchtitan=True)


def test_chunks_of_two_ranks_are_assembled_and_whole_ones_are_views(tmp_path: Path) -> None:
    """Each tensor's rows split over two data files, as two FSDP2 ranks write them
    (``torch.chunk`` boxes): assembled bit for bit; a one-chunk tensor is read as a view of
    its data file, nothing beyond it loaded."""
    want = write_hf(tmp_path / "hf", TINY_LLAMA, dtype=torch.bfloat16)
    d = tmp_path / "dcp"
    d.mkdir()
    files = [DcpDataFile(d, f"__{r}_0.distcp") for r in range(2)]
    for name, t in want.items():
        row = 0
        for rank, piece in enumerate(t.chunk(2)):
            files[rank].add_tensor(name, (row, *[0] * (t.dim() - 1)), piece.contiguous())
            row += piece.shape[0]
    records = [r for f in files for r in f.close()]
    write_metadata(d, records, {n: (tuple(t.shape), t.dtype) for n, t in want.items()})
    ckpt_ir.convert(d, tmp_path / "back", to="hf", hf_config=tmp_path / "hf")
    _assert_same_hf(tmp_path / "back", want)
    # The executor streams such a tensor as its chunks (RowsReader): views of the data files,
    # each a range the writer can copy_file_range, never an assembled copy.
    reader = TorchDcpReader(d, hf_config=tmp_path / "hf")
    try:
        rows = reader.read_rows("model.embed_tokens.weight")
        assert rows is not None and [r.shape[0] for r in rows] == [49, 48]
        assert all(reader.locate(r) is not None for r in rows)
        assert bits_equal(torch.cat(rows), want["model.embed_tokens.weight"])
        assert reader.read_rows("model.norm.weight") is not None
    finally:
        reader.close()
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "whole", to="torch-dcp")
    with DcpReader(tmp_path / "whole") as r:
        t = r.index.tensors["model.embed_tokens.weight"]
        assert len(t.chunks) == 1
        assert r.locate(r.read_region(t.fqn, (0, 0), t.shape)) is not None


def test_torchrun_writes_one_data_file_per_process(tmp_path: Path) -> None:
    """``torchrun -m ckpt_ir convert --to torch-dcp``: each process appends the tensors it owns
    to its own ``__R_0.distcp``; rank 0 commits ``.metadata``; the same tensors as one process."""
    write_hf(tmp_path / "hf", TINY_LLAMA, dtype=torch.bfloat16)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "single", to="torch-dcp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", "-m", "ckpt_ir", "convert", str(tmp_path / "hf"),
                          str(tmp_path / "multi"), "--to", "torch-dcp", "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "config.json"} <= {
        p.name for p in (tmp_path / "multi").iterdir()}
    a, b = load_dcp_tensors(tmp_path / "single"), load_dcp_tensors(tmp_path / "multi")
    assert a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in a)


def _hf_sharded(d: Path, want: dict[str, torch.Tensor], world: int) -> None:
    """What ``HuggingFaceStorageWriter(save_distributed=True)`` writes for ``world`` FSDP2
    ranks: per rank, its ``torch.chunk`` row box of every tensor with ``DCP_SHARDING_INFO``
    (empty boxes as shape [0]), in ``shard-RRRRR-model-00001-of-00001.safetensors``."""
    import json

    from safetensors.torch import save_file

    d.mkdir(parents=True)
    for rank in range(world):
        tensors, info = {}, {}
        for name, t in want.items():
            boxes = t.chunk(world)
            start = sum(b.shape[0] for b in boxes[:rank])
            box = boxes[rank] if rank < len(boxes) else t.new_empty(0)
            tensors[name] = box.contiguous() if box.numel() else t.new_empty(0)
            info[name] = {"saved_offsets": [start, *[0] * (t.dim() - 1)]}
        save_file(tensors, d / f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors",
                  metadata={"DCP_SHARDING_INFO": json.dumps(info), "DCP_VERSION": "1.0",
                            "format": "pt"})


def test_torch_hf_shards_in_a_torchtitan_step_are_found_and_consolidated(tmp_path: Path) -> None:
    # Integer tensors too (torch's own consolidator raises on them), and 3 ranks for 2-row
    # tensors (an empty box).
    cfg = {**TINY_LLAMA, "num_hidden_layers": 1}
    want = write_hf(tmp_path / "hf", cfg, dtype=torch.float16)
    sharded = tmp_path / "dump" / "checkpoint" / "step-5" / "sharded"
    _hf_sharded(sharded, want, world=3)
    found = resolve(tmp_path / "dump" / "checkpoint")
    assert (found.format, found.path) == ("hf", sharded)
    ckpt_ir.convert(tmp_path / "dump" / "checkpoint", tmp_path / "back", to="hf",
                    hf_config=tmp_path / "hf")
    _assert_same_hf(tmp_path / "back", want)


def test_a_stale_or_missing_hf_shard_is_one_line_exit_2(tmp_path: Path) -> None:
    want = write_hf(tmp_path / "hf", TINY_LLAMA, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    _hf_sharded(sharded, want, world=2)
    shutil.copy(tmp_path / "hf" / "config.json", sharded / "config.json")
    # A shard of an earlier 3-rank save left in the folder: its boxes overlap.
    _hf_sharded(tmp_path / "old", want, world=3)
    stale = sharded / "shard-00003-model-00001-of-00001.safetensors"
    shutil.copy(tmp_path / "old" / stale.name, stale)
    _one_line_exit_2(sharded, tmp_path / "out", "overlap")
    # The last rank's shard missing: no box says the tensors went on (torch's consolidator
    # would write them cut short); the config's shapes do, and the plan refuses them all.
    stale.unlink()
    (sharded / "shard-00002-model-00001-of-00001.safetensors").unlink()
    run = cli("convert", sharded, tmp_path / "out2", "--to", "hf", "--no-progress")
    assert run.returncode == 2, run.stderr
    assert "model.embed_tokens.weight has shape [49, 32], but the config implies [97, 32]" \
        in run.stderr
    assert not (tmp_path / "out2").exists()
