"""``megatron-fsdp`` from the command line: a good fsdp_dtensor directory converts, bad ones are
refused in one line with exit 2 and nothing written (issue #14).

The checkpoint is written by torch's ``dcp.save`` as Megatron-FSDP writes it
(tests/clients/mfsdp_models.py): a tiny HF Llama and Qwen3-MoE, converted by ckpt-ir to
torch_dist (TE spec) for their megatron-core names, saved under ``model.module.`` with grouped
expert keys ``weight{e}``, fc1 split into ``_w``/``_v`` and uneven ``Shard(0)`` boxes of three
ranks (one empty). Against megatron-core's own GPTModel: tests/clients/test_megatron_fsdp_client.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

import ckpt_ir
from ckpt_ir.converters.mcore_dist import McoreDistReader
from ckpt_ir.converters.megatron_fsdp import mcore_name
from ckpt_ir.converters.storage.dcp_files import DcpReader
from ckpt_ir.detect import resolve
from ckpt_ir.transforms import same_bits
from tests.clients import hf_models
from tests.clients.mfsdp_models import (
    from_mcore_natives,
    fsdp_dtensor_state_dict,
    save_fsdp_dtensor,
)

REPO = Path(__file__).resolve().parents[2]
QKV = "model.module.decoder.layers.0.self_attention.linear_qkv.weight"


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckpt_ir", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mfsdp_cli")
    out: dict[str, Path] = {"root": root}
    for arch in ("llama", "qwen3_moe"):
        hf = hf_models.make_hf_model(arch, root / "hf")
        # TE-spec names: what a Megatron-FSDP (GPU, Transformer Engine) model's state_dict()
        # holds; the client test covers the local spec's.
        ckpt_ir.convert(hf, root / "dist" / arch, to="mcore-dist", mcore_spec="te")
        reader = McoreDistReader(root / "dist" / arch)
        try:
            natives = {n: reader.read(n).clone() for n in reader.tensors()}
        finally:
            reader.close()
        save_fsdp_dtensor(fsdp_dtensor_state_dict(from_mcore_natives(natives)), root / arch)
        out[arch], out[f"hf-{arch}"] = root / arch, hf
    return out


def _one_line_exit_2(run: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr)
    line, = run.stderr.strip().splitlines()
    for n in needles:
        assert n in line, line
    return line


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_an_fsdp_dtensor_save_converts_back_to_the_hf_weights(made: dict[str, Path], arch: str,
                                                              tmp_path: Path) -> None:
    src, hf = made[arch], made[f"hf-{arch}"]
    # The tensors really are stored as uneven row boxes, some with an empty one.
    with DcpReader(src) as dcp:
        rows = [[c.sizes[0] for c in t.chunks] for k, t in dcp.index.tensors.items()
                if k.startswith("model.module.") and len(t.chunks) == 3]
    assert rows and any(0 in r for r in rows) and any(len(set(r)) == 3 for r in rows)
    run = cli("convert", src, tmp_path / "out", "--to", "hf", "--hf-config", hf)
    assert run.returncode == 0, run.stderr
    want = load_file(next(hf.glob("*.safetensors")))
    got = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        got.update(load_file(f))
    assert sorted(got) == sorted(want)
    assert not [k for k in want if not same_bits(want[k], got[k])]


def test_inspect_explains_the_directory(made: dict[str, Path]) -> None:
    run = cli("inspect", made["qwen3_moe"], "--hf-config", made["hf-qwen3_moe"])
    assert run.returncode == 0, run.stderr
    assert "megatron-fsdp" in run.stdout and "model.module." in run.stdout


def test_megatron_fsdp_is_not_a_destination(made: dict[str, Path], tmp_path: Path) -> None:
    run = cli("convert", made["hf-llama"], tmp_path / "out", "--to", "megatron-fsdp")
    assert run.returncode == 2 and "megatron-fsdp" in run.stderr
    assert not (tmp_path / "out").exists()


def test_chunks_that_do_not_tile_are_refused(made: dict[str, Path], tmp_path: Path) -> None:
    bad = shutil.copytree(made["llama"], tmp_path / "bad")
    md = pickle.loads((bad / ".metadata").read_bytes())  # our own file: trusted
    entry = md.state_dict_metadata[QKV]
    # Shrink the largest box by a row: one row of the tensor is then stored nowhere.
    i = max(range(len(entry.chunks)), key=lambda j: entry.chunks[j].sizes[0])
    c = entry.chunks[i]
    entry.chunks[i] = ChunkStorageMetadata(offsets=c.offsets,
                                           sizes=torch.Size((c.sizes[0] - 1, *c.sizes[1:])))
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    run = cli("convert", bad, tmp_path / "out", "--to", "hf", "--hf-config", made["hf-llama"])
    _one_line_exit_2(run, "linear_qkv")
    assert not (tmp_path / "out").exists()


def test_a_cut_short_distcp_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    bad = shutil.copytree(made["llama"], tmp_path / "bad")
    data = next(bad.glob("*.distcp"))
    with data.open("r+b") as fh:
        fh.truncate(data.stat().st_size // 2)
    run = cli("convert", bad, tmp_path / "out", "--to", "hf", "--hf-config", made["hf-llama"])
    _one_line_exit_2(run, data.name)
    assert not (tmp_path / "out").exists()


def test_a_missing_config_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    run = cli("convert", made["llama"], tmp_path / "out", "--to", "hf")
    _one_line_exit_2(run, "--hf-config")
    assert not (tmp_path / "out").exists()


def test_a_swiglu_half_alone_is_refused(made: dict[str, Path], tmp_path: Path) -> None:
    bad = shutil.copytree(made["llama"], tmp_path / "bad")
    md = pickle.loads((bad / ".metadata").read_bytes())  # our own file: trusted
    del md.state_dict_metadata["model.module.decoder.layers.1.mlp.linear_fc1.weight_v"]
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    run = cli("convert", bad, tmp_path / "out", "--to", "hf", "--hf-config", made["hf-llama"])
    _one_line_exit_2(run, "linear_fc1.weight", "lacks its v part")


@pytest.mark.parametrize(("key", "native", "part"), [
    ("decoder.layers.3.mlp.experts.linear_fc1.weight7_w",
     "decoder.layers.3.mlp.experts.experts.7.linear_fc1.weight", "w"),
    ("decoder.layers.3.mlp.experts.linear_fc2.weight12",
     "decoder.layers.3.mlp.experts.experts.12.linear_fc2.weight", None),
    ("decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight",
     "decoder.layers.0.mlp.experts.experts.2.linear_fc1.weight", None),
    ("decoder.layers.0.mlp.shared_experts.linear_fc1.weight_v",
     "decoder.layers.0.mlp.shared_experts.linear_fc1.weight", "v"),
    ("decoder.layers.0.self_attention.in_proj.weight.beta",
     "decoder.layers.0.self_attention.in_proj.weight", "beta"),
    ("mtp.layers.0.mtp_model_layer.self_attention.linear_qkv.weight",
     "mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight", None),
    ("embedding.word_embeddings.weight", "embedding.word_embeddings.weight", None),
])
def test_fsdp_dtensor_keys_map_to_mcore_natives(key: str, native: str, part: str | None) -> None:
    assert mcore_name(key) == (native, part)


def test_a_verl_v2_manifest_naming_the_fsdp_dtensor_directory_is_followed(
        made: dict[str, Path], tmp_path: Path) -> None:
    """verl v2 with use_megatron_fsdp: ckpt_contents.json names model/dist_ckpt; whatever
    format it records there, the directory's evidence says fsdp_dtensor, and the HF config
    comes from the role's huggingface/ copy (no --hf-config)."""
    role = tmp_path / "run" / "global_step_2" / "actor"
    shutil.copytree(made["llama"], role / "model" / "dist_ckpt")
    (role / "huggingface").mkdir()
    shutil.copy(made["hf-llama"] / "config.json", role / "huggingface" / "config.json")
    (role / "ckpt_contents.json").write_text(json.dumps({"contents": {"model": {
        "path": "model/dist_ckpt", "format": "megatron_dist_checkpoint"}}}))
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("2")
    found = resolve(tmp_path / "run")
    assert (found.format, found.path) == ("megatron-fsdp", role / "model" / "dist_ckpt")
    assert "ckpt_contents.json" in found.layout and not found.notes[1:]
    ckpt_ir.convert(tmp_path / "run", tmp_path / "out", to="hf")
    want = load_file(next(made["hf-llama"].glob("*.safetensors")))
    got = load_file(next((tmp_path / "out").glob("*.safetensors")))
    assert sorted(got) == sorted(want) and all(same_bits(want[k], got[k]) for k in want)


def test_a_verl_transformer_config_json_describes_the_model(made: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """A role directory with verl's transformer_config.json and no HF config: the config is
    rebuilt from Megatron's arguments, tied embeddings and vocabulary read from the
    fsdp_dtensor tensors under their prefix."""
    verl = ckpt_ir.convert(made["hf-llama"], tmp_path / "verl", to="mcore-dist", verl_tree=True)
    assert verl.dest_format == "mcore-dist"
    fields = json.loads((tmp_path / "verl" / "transformer_config.json").read_text())
    hf = json.loads((made["hf-llama"] / "config.json").read_text())
    # What TransformerConfig lacks and verl's file therefore does not record.
    fields.update(rotary_base=hf.get("rope_theta", 10000.0),
                  max_position_embeddings=hf["max_position_embeddings"])
    role = tmp_path / "run" / "global_step_1" / "actor"
    shutil.copytree(made["llama"], role / "model" / "dist_ckpt")
    (role / "transformer_config.json").write_text(json.dumps(fields))
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("1")
    ckpt_ir.convert(tmp_path / "run", tmp_path / "out", to="hf")
    want = load_file(next(made["hf-llama"].glob("*.safetensors")))
    got = load_file(next((tmp_path / "out").glob("*.safetensors")))
    assert sorted(got) == sorted(want) and all(same_bits(want[k], got[k]) for k in want)
