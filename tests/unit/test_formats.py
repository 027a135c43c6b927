"""hf and mcore-dist readers/writers: inputs people actually have, and their failure modes."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import ckpt_ir
from ckpt_ir.detect import resolve
from ckpt_ir.errors import CorruptCheckpointError, FormatError, MissingConfigError
from tests.fixtures import TINY_LLAMA, write_hf
from tests.strategies import bits_equal


@pytest.fixture()
def hf(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = write_hf(tmp_path / "hf", extra_files={"tokenizer.json": '{"t": 1}',
                                                    "generation_config.json": "{}"})
    return tmp_path / "hf", state


def _all(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_sharded_output_has_a_correct_index(hf, tmp_path):
    src, state = hf
    ckpt_ir.convert(src, tmp_path / "dist", to="mcore-dist")
    out = tmp_path / "out"
    ckpt_ir.convert(tmp_path / "dist", out, to="hf", max_shard_size=4000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for name, file in index["weight_map"].items():
        assert name in load_file(out / file)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    assert (out / "tokenizer.json").read_text() == '{"t": 1}'
    assert (out / "generation_config.json").is_file()


def test_sharded_input_and_bin_input(tmp_path):
    state = write_hf(tmp_path / "sharded", shards=3)
    ckpt_ir.convert(tmp_path / "sharded", tmp_path / "a", to="mcore-dist")
    binned = tmp_path / "bin"
    binned.mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", binned)
    torch.save({k: v.clone() for k, v in state.items()}, binned / "pytorch_model.bin")
    ckpt_ir.convert(binned, tmp_path / "b", to="hf")
    got = _all(tmp_path / "b")
    assert all(bits_equal(got[k], v) for k, v in state.items())


def test_dtype_cast_updates_config(hf, tmp_path):
    src, state = hf
    ckpt_ir.convert(src, tmp_path / "out", to="hf", dtype="fp32")
    got = _all(tmp_path / "out")
    assert {t.dtype for t in got.values()} == {torch.float32}
    assert all(torch.equal(got[k], v.float()) for k, v in state.items())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_missing_shard_and_wrong_index_are_corrupt(tmp_path):
    write_hf(tmp_path / "s", shards=2)
    (tmp_path / "s" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match=re.escape(
            "shard model-00002-of-00002.safetensors listed in model.safetensors.index.json is "
            "missing")):
        ckpt_ir.convert(tmp_path / "s", tmp_path / "o", to="mcore-dist")
    assert not (tmp_path / "o").exists()
    write_hf(tmp_path / "t", shards=2)
    index = json.loads((tmp_path / "t" / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    (tmp_path / "t" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"lists {name} in model-00002")):
        ckpt_ir.convert(tmp_path / "t", tmp_path / "o", to="mcore-dist")


def test_unsupported_architecture_is_a_format_error(tmp_path):
    write_hf(tmp_path / "m", TINY_LLAMA)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="unsupported architecture 'gpt2'"):
        ckpt_ir.convert(tmp_path / "m", tmp_path / "o", to="mcore-dist")


@pytest.fixture()
def dist(hf, tmp_path) -> Path:
    ckpt_ir.convert(hf[0], tmp_path / "dist", to="mcore-dist")
    return tmp_path / "dist"


def _strip_config(dist: Path) -> None:
    shutil.rmtree(dist / "hf_config")


def test_config_from_megatron_lm_args(hf, dist, tmp_path):
    _strip_config(dist)
    c = TINY_LLAMA
    args = argparse.Namespace(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
        ffn_hidden_size=c["intermediate_size"], num_attention_heads=c["num_attention_heads"],
        group_query_attention=True, num_query_groups=c["num_key_value_heads"],
        kv_channels=c["head_dim"], padded_vocab_size=c["vocab_size"], vocab_size=None,
        untie_embeddings_and_output_weights=True, add_qkv_bias=False, qk_layernorm=False,
        norm_epsilon=1e-6, rotary_base=10000, max_position_embeddings=64,
        normalization="RMSNorm", params_dtype=torch.bfloat16)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7}, dist / "common.pt")
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest_checkpointed_iteration.txt").write_text("7")
    shutil.move(dist, run / "iter_0000007")
    r = ckpt_ir.convert(run, tmp_path / "out", to="hf")
    assert "latest_checkpointed_iteration.txt points at iter_0000007" in r.notes
    got = _all(tmp_path / "out")
    assert all(bits_equal(got[k], v) for k, v in hf[1].items())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2


def test_config_from_bridge_run_config(hf, dist, tmp_path):
    _strip_config(dist)
    c = TINY_LLAMA
    (dist / "run_config.yaml").write_text(yaml.safe_dump({"model": {
        "num_layers": c["num_hidden_layers"], "hidden_size": c["hidden_size"],
        "ffn_hidden_size": c["intermediate_size"], "num_attention_heads": c["num_attention_heads"],
        "num_query_groups": c["num_key_value_heads"], "kv_channels": c["head_dim"],
        "vocab_size": c["vocab_size"], "share_embeddings_and_output_weights": False,
        "layernorm_epsilon": 1e-6, "rotary_base": 10000.0, "seq_length": 64}}))
    root = tmp_path / "bridge"
    root.mkdir()
    shutil.move(dist, root / "iter_0000020")
    (root / "iter_0000010").mkdir()
    resolved = resolve(root)
    assert resolved.path.name == "iter_0000020" and resolved.layout == "megatron-bridge iter"
    ckpt_ir.convert(root, tmp_path / "out", to="hf")
    got = _all(tmp_path / "out")
    assert all(bits_equal(got[k], v) for k, v in hf[1].items())


@pytest.mark.parametrize("layout,inner,cfg_dir", [
    ("verl v1 (dist_ckpt)", "dist_ckpt", "huggingface"),
    ("verl v2 (model/dist_ckpt)", "model/dist_ckpt", "model/huggingface"),
])
def test_verl_role_dirs_resolve(hf, dist, tmp_path, layout, inner, cfg_dir):
    _strip_config(dist)
    role = tmp_path / "run" / "global_step_5" / "actor"
    (role / inner).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(dist, role / inner)
    (role / cfg_dir).mkdir(parents=True, exist_ok=True)
    shutil.copy(hf[0] / "config.json", role / cfg_dir / "config.json")
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("5")
    resolved = resolve(tmp_path / "run")
    assert resolved.format == "mcore-dist" and resolved.layout == layout
    assert resolved.step == 5
    ckpt_ir.convert(tmp_path / "run", tmp_path / "out", to="hf")
    got = _all(tmp_path / "out")
    assert all(bits_equal(got[k], v) for k, v in hf[1].items())


def test_dist_without_any_config_says_how_to_fix(dist, tmp_path):
    _strip_config(dist)
    with pytest.raises(MissingConfigError, match="pass --hf-config DIR"):
        ckpt_ir.convert(dist, tmp_path / "out", to="hf")


def test_megatron_written_generation_019_common_state_only(hf, dist, tmp_path):
    # A >=0.19 checkpoint has no common.pt; the reader uses the common_state object instead.
    (dist / "common.pt").unlink()
    with ckpt_ir.open(dist) as ckpt:
        assert ckpt.config.architecture == "llama"
        name = "model.layers.1.self_attn.k_proj.weight"
        assert bits_equal(ckpt.read(name), hf[1][name])
