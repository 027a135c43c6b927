"""A plain PyTorch DCP checkpoint is told apart from a Megatron-Core torch_dist one (issue #13)
and from Megatron-FSDP's fsdp_dtensor (issue #14, read as megatron-fsdp).

All are ``torch.distributed.checkpoint`` directories with a ``.metadata`` file; megatron-core
adds ``metadata.json`` (``sharded_backend``) and names its parameters ``decoder.layers...``;
Megatron-FSDP puts those names under ``model.module.``. The checkpoints here are written by
torch itself: FSDP2 (``fully_shard`` on a one-rank gloo group, CPU) saving an HF-named model
with ``dcp.save``, and ``dcp.save`` of a torchtitan-named state dict without any process group.
ckpt-ir reads them as ``torch-dcp`` (before the registry it called them mcore-dist and failed in
the llama mcore table); without a model config they are refused in one line, exit 2, nothing
written. Conversions of real FSDP2 saves: tests/clients/test_torch_dcp_client.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_ir.detect import describe_entry, resolve
from ckpt_ir.probes import is_dist_dir, is_plain_dcp_dir
from tests.fixtures import tree_bytes

REPO = Path(__file__).resolve().parents[2]

# FSDP2 needs a process group; a one-rank gloo group on CPU is a real one. The model carries
# HF Llama parameter names, as an FSDP2 training script's model does.
_FSDP2_SAVE = """
import sys
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard

# One rank: the rendezvous is a file, not a TCP port another test process could take first.
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(16, 16, bias=False)
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(32, 16, bias=False)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(64, 16)
        self.model.layers = nn.ModuleList([Layer(), Layer()])
        self.lm_head = nn.Linear(16, 64, bias=False)


torch.manual_seed(0)
m = Model()
for layer in m.model.layers:
    fully_shard(layer)
fully_shard(m)
dcp.save({"model": m.state_dict()}, checkpoint_id=sys.argv[1])
dist.destroy_process_group()
"""

# torchtitan's parameter names, saved without a process group (DCP's no-dist path).
_TITAN_SAVE = """
import sys
import torch
import torch.distributed.checkpoint as dcp

state = {"tok_embeddings.weight": torch.randn(64, 16),
         "layers.0.attention.wq.weight": torch.randn(16, 16),
         "layers.0.feed_forward.w1.weight": torch.randn(32, 16),
         "norm.weight": torch.ones(16), "output.weight": torch.randn(64, 16)}
dcp.save(state, checkpoint_id=sys.argv[1], no_dist=True)
"""


def _save(script: str, out: Path, *extra: str) -> Path:
    done = subprocess.run([sys.executable, "-c", script, str(out), *extra], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / ".metadata").is_file() and not (out / "metadata.json").exists()
    return out


@pytest.fixture(scope="module")
def plain_dcp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plain_dcp")
    return {"fsdp2": _save(_FSDP2_SAVE, root / "fsdp2", str(root / "rendezvous")),
            "torchtitan": _save(_TITAN_SAVE, root / "torchtitan")}


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckpt_ir", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("kind", ["fsdp2", "torchtitan"])
def test_plain_dcp_is_not_mistaken_for_torch_dist(plain_dcp: dict[str, Path], kind: str) -> None:
    d = plain_dcp[kind]
    assert is_plain_dcp_dir(d) and not is_dist_dir(d)
    assert resolve(d).format == "torch-dcp"
    assert describe_entry(d) == "plain PyTorch DCP checkpoint (FSDP2 dcp.save, torchtitan, NeMo-RL)"


@pytest.mark.parametrize("kind", ["fsdp2", "torchtitan"])
def test_plain_dcp_without_a_config_is_one_line_exit_2(plain_dcp: dict[str, Path], kind: str,
                                                       tmp_path: Path) -> None:
    d = plain_dcp[kind]
    before = tree_bytes(d)
    for args in (("inspect", d), ("convert", d, tmp_path / "out", "--to", "hf", "--no-progress")):
        run = cli(*args)
        assert run.returncode == 2, (args, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1, run.stderr
        assert "DCP checkpoint without a model config" in lines[0] and "--hf-config" in lines[0]
        assert "mcore" not in lines[0]
    assert not (tmp_path / "out").exists()
    assert tree_bytes(d) == before


def test_plain_dcp_inside_a_run_directory_is_found(plain_dcp: dict[str, Path],
                                                   tmp_path: Path) -> None:
    # The walk reaches it through a tracker and a step directory, as it would a torch_dist one.
    run = tmp_path / "run"
    step = run / "iter_0000005"
    step.parent.mkdir()
    os.symlink(plain_dcp["fsdp2"], step)
    (run / "latest_checkpointed_iteration.txt").write_text("5")
    found = resolve(run)
    assert (found.format, found.path, found.step) == ("torch-dcp", step, 5)


def test_an_fsdp_dtensor_directory_is_not_read_as_plain_dcp(tmp_path: Path) -> None:
    """Megatron-FSDP's keys (model.module.<Megatron-Core name>) in DCP files without
    metadata.json: neither torch_dist nor a plain DCP of HF names; read as megatron-fsdp
    (tests/cli/test_megatron_fsdp_cli.py), and without a config refused in one line."""
    import torch
    import torch.distributed.checkpoint as dcp

    d = tmp_path / "fsdp_dtensor"
    dcp.save({"model.module.embedding.word_embeddings.weight": torch.zeros(4, 2),
              "model.module.decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(8, 2)},
             checkpoint_id=str(d), no_dist=True)
    assert resolve(d).format == "megatron-fsdp" and not is_plain_dcp_dir(d)
    run = cli("convert", d, tmp_path / "out", "--to", "hf")
    assert run.returncode == 2, run.stderr
    line, = run.stderr.strip().splitlines()
    assert "--hf-config" in line


def test_verls_megatron_fsdp_tree_is_found_not_misread(tmp_path: Path) -> None:
    """verl's use_megatron_fsdp puts the fsdp_dtensor DCP in model/dist_ckpt/, where torch_dist
    would be: the run walk finds it as megatron-fsdp, not torch_dist."""
    import torch
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "run"
    d = run / "global_step_4" / "actor" / "model" / "dist_ckpt"
    dcp.save({"model.module.decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(8, 2)},
             checkpoint_id=str(d), no_dist=True)
    (run / "latest_checkpointed_iteration.txt").write_text("4")
    found = resolve(run)
    assert (found.format, found.path, found.step) == ("megatron-fsdp", d, 4)
    assert "model/dist_ckpt" in found.layout
