"""LoRA adapters: config validation, layout planning, readers' inputs and failure modes.

Adapters here are written directly (safetensors + adapter_config.json); real peft is in
tests/clients/test_peft_client.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir
from ckpt_ir.adapter_api import convert_adapter, open_adapter
from ckpt_ir.adapters import AdapterConfig, LoraLayout, plan_lora_layout
from ckpt_ir.converters.storage.dcp_files import DcpDataFile, DcpReader, write_metadata
from ckpt_ir.detect import resolve_adapter
from ckpt_ir.errors import (
    CorruptCheckpointError,
    FormatError,
    MissingConfigError,
    PlanError,
)
from ckpt_ir.ir import ModelConfig
from tests.fixtures import TINY_LLAMA, write_hf
from tests.strategies import bits_equal

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE = ModelConfig.from_hf(TINY_LLAMA)


def lora(**fields) -> dict:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ALL, **fields}


def write_adapter(path: Path, config: dict | None = None, *, seed: int = 0,
                  base_config: bool = True) -> dict[str, torch.Tensor]:
    """A PEFT adapter directory for TINY_LLAMA; returns the tensors by IR name."""
    config = config or lora()
    adapter = AdapterConfig.from_peft(config, BASE)
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g) for n, s in adapter.schema().items()}
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    if base_config:
        (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    save_file({"base_model.model." + k: v for k, v in tensors.items()},
              path / "adapter_model.safetensors")
    return tensors


# --- adapter_config.json --------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "error", "message"), [
    ({"peft_type": "IA3"}, FormatError,
     "adapter_config.json: peft_type 'IA3' is not supported (LORA only)"),
    ({"r": 0}, CorruptCheckpointError, "adapter_config.json: r must be a positive integer, got 0"),
    ({"r": True}, CorruptCheckpointError,
     "adapter_config.json: r must be a positive integer, got True"),
    ({"lora_alpha": "8"}, CorruptCheckpointError,
     "adapter_config.json: lora_alpha must be a finite number, got '8'"),
    ({"use_rslora": "yes"}, CorruptCheckpointError,
     "adapter_config.json: use_rslora must be true or false, got 'yes'"),
    ({"rank_pattern": {"q_proj": 0}}, CorruptCheckpointError,
     'adapter_config.json: rank_pattern must map module name patterns to positive integers, '
     'got {"q_proj": 0}'),
    ({"rank_pattern": {"(": 2}}, CorruptCheckpointError,
     "adapter_config.json: rank_pattern key '(' is not a valid pattern"),
    ({"target_modules": []}, CorruptCheckpointError,
     "adapter_config.json: target_modules must be a module name pattern or a non-empty list of "
     "module names, got []"),
    ({"use_dora": True}, FormatError,
     "adapter_config.json: DoRA is not supported (use_dora=true)"),
    ({"bias": "all"}, FormatError,
     'adapter_config.json: bias training is not supported (bias="all")'),
    ({"layers_to_transform": 0}, FormatError,
     "adapter_config.json: layers_to_transform is not supported (layers_to_transform=0)"),
    ({"modules_to_save": ["lm_head"]}, FormatError,
     "adapter_config.json: modules_to_save (fully trained extra modules) is not supported"),
    ({"target_modules": ["q_proj", "lm_head"]}, FormatError,
     "adapter_config.json targets lm_head: LoRA on embeddings or the output layer is not "
     "supported"),
    ({"target_modules": ["c_attn"]}, FormatError,
     "adapter_config.json target_modules ('c_attn',) match no linear module of this llama "
     "model"),
])
def test_adapter_config_is_validated_strictly(fields, error, message):
    with pytest.raises(error) as e:
        AdapterConfig.from_peft(lora(**fields), BASE)
    assert str(e.value).startswith(message)


def test_patterns_and_regex_targets_resolve_like_peft():
    a = AdapterConfig.from_peft(lora(target_modules=r".*\.(q_proj|v_proj)", r=4, lora_alpha=8,
                                     rank_pattern={"model.layers.1.self_attn.q_proj": 2,
                                                   "q_proj": 8},
                                     alpha_pattern={"v_proj": 2}, use_rslora=True), BASE)
    assert a.modules() == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                           "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
    assert a.rank("model.layers.0.self_attn.q_proj") == 8
    assert a.rank("model.layers.1.self_attn.q_proj") == 2  # first matching key wins, as in PEFT
    assert a.scaling("model.layers.0.self_attn.v_proj") == 2 / 2  # alpha / sqrt(r)
    assert a.schema()["model.layers.0.self_attn.q_proj.lora_B.weight"] == (48, 8)


# --- Megatron layout planning -----------------------------------------------------------------


def test_layout_stacks_different_a_and_pads_every_adapter_to_one_rank():
    a = AdapterConfig.from_peft(lora(rank_pattern={"q_proj": 8}), BASE)
    layout, notes = plan_lora_layout(a, shared_groups={"linear_qkv": False}, rank_multiple=5)
    assert layout.blocks["model.layers.0.self_attn.q_proj"] == (0, 8)
    assert layout.blocks["model.layers.0.self_attn.k_proj"] == (8, 4)
    assert layout.blocks["model.layers.0.self_attn.v_proj"] == (12, 4)
    assert layout.blocks["model.layers.0.mlp.up_proj"] == (4, 4)  # gate/up not shared either
    assert layout.rank == 20  # 16 rounded up to a multiple of 5 (e.g. TP)
    assert layout.factors == {f"model.layers.{i}.self_attn.q_proj": 0.5 for i in range(2)}
    assert layout.alpha / layout.rank == 2.0  # the scaling of most modules: 8 / 4
    assert any("ranks stacked (8 + 4 + 4 = 16)" in n for n in notes)
    assert any("power of two" not in n and "(0.5)" in n for n in notes)


def test_layout_keeps_a_shared_a_and_says_when_b_is_rounded():
    a = AdapterConfig.from_peft(lora(alpha_pattern={"o_proj": 3}), BASE)
    layout, notes = plan_lora_layout(a, shared_groups={"linear_qkv": True, "linear_fc1": True})
    assert layout.rank == 4 and layout.alpha == 8
    assert {layout.blocks[f"model.layers.0.self_attn.{m}_proj"] for m in "qkv"} == {(0, 4)}
    assert any("not bit-exact" in n for n in notes)


def test_megatron_needs_the_same_targets_in_every_layer():
    a = AdapterConfig.from_peft(lora(target_modules=r"model\.layers\.0\..*_proj"), BASE)
    with pytest.raises(FormatError, match="same target modules in every layer"):
        plan_lora_layout(a)


def test_layout_json_is_validated():
    layout = LoraLayout.uniform("fused", ["model.layers.0.self_attn.q_proj"], 4, 8)
    assert LoraLayout.from_json(layout.to_json()) == layout
    bad = {**layout.to_json(), "blocks": {"model.layers.0.self_attn.q_proj": [2, 4]}}
    with pytest.raises(CorruptCheckpointError, match="within the rank 4"):
        LoraLayout.from_json(bad)


# --- hf-peft reader -------------------------------------------------------------------------------


def test_adapter_model_bin_is_read_safely(tmp_path):
    want = write_adapter(tmp_path / "st")
    binned = tmp_path / "bin"
    binned.mkdir()
    for f in ("adapter_config.json", "config.json"):
        shutil.copy(tmp_path / "st" / f, binned / f)
    torch.save({"base_model.model." + k: v for k, v in want.items()},
               binned / "adapter_model.bin")
    ckpt_ir.convert(binned, tmp_path / "out", to="hf-peft")
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(bits_equal(got["base_model.model." + k], v) for k, v in want.items())


def test_base_config_comes_from_base_model_name_or_path(tmp_path):
    write_hf(tmp_path / "base")
    write_adapter(tmp_path / "ad", lora(base_model_name_or_path=str(tmp_path / "base")),
                  base_config=False)
    with open_adapter(tmp_path / "ad") as ckpt:
        assert ckpt.config.num_layers == 2 and len(ckpt.tensors) == 28


def test_missing_base_config_is_a_typed_error(tmp_path):
    write_adapter(tmp_path / "ad", lora(base_model_name_or_path="meta-llama/Llama-3-8B"),
                  base_config=False)
    with pytest.raises(MissingConfigError) as e:
        open_adapter(tmp_path / "ad")
    assert "does not say which model it adapts (no config.json, and base_model_name_or_path " \
           "'meta-llama/Llama-3-8B' is not a local model directory); pass --hf-config DIR" \
        in str(e.value)


def test_tensors_the_config_does_not_explain_are_plan_errors(tmp_path):
    tensors = write_adapter(tmp_path / "ad", lora(target_modules=["q_proj"]))
    extra = {"base_model.model." + k: v for k, v in tensors.items()}
    extra["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(extra, tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(PlanError) as e:
        ckpt_ir.convert(tmp_path / "ad", tmp_path / "out", to="mcore-dist")
    assert e.value.problems == ["source tensor model.layers.0.self_attn.k_proj.lora_A.weight "
                                "[4, 32] is not mapped by the llama hf table"]
    assert not (tmp_path / "out").exists()


def test_adapter_without_weights_file_is_corrupt(tmp_path):
    write_adapter(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"has adapter_config\.json but no "
                                                     r"adapter_model\.safetensors"):
        open_adapter(tmp_path / "ad")


def test_an_adapter_converts_only_to_adapter_formats(tmp_path):
    write_adapter(tmp_path / "ad")
    with pytest.raises(FormatError, match="holds a LoRA adapter, which converts to hf-peft, "
                                          "mcore-dist, verl-legacy, not 'hf'; merge-adapter"):
        ckpt_ir.convert(tmp_path / "ad", tmp_path / "out", to="hf")


# --- verl adapter files ---------------------------------------------------------------------------


def test_verl_adapter_files_need_alpha_and_every_rank(tmp_path):
    write_adapter(tmp_path / "ad")
    convert_adapter(tmp_path / "ad", tmp_path / "actor", "verl-legacy", layout={"tp": 2})
    files = tmp_path / "actor" / "adapter_checkpoint"
    assert sorted(p.name for p in files.iterdir()) == [
        "ckpt_ir_lora.json", "mp_rank_00_adapter.pt", "mp_rank_01_adapter.pt"]
    obj = torch.load(files / "mp_rank_01_adapter.pt", weights_only=True)
    state = obj["adapter_state_dict"]
    # TP rank 1's shards, chunk-local names, Bridge's ParallelLinearAdapter shapes.
    assert state["decoder.layers.1.self_attention.linear_qkv.adapter.linear_in.weight"].shape \
        == (6, 32)  # [rank / tp, hidden]: the stacked q/k/v ranks 4 + 4 + 4, split over TP
    assert state["decoder.layers.1.self_attention.linear_proj.adapter.linear_in.weight"].shape \
        == (12, 24)  # row-parallel base: A split along in (48 / 2), padded to rank 12
    assert state["decoder.layers.1.mlp.linear_fc2.adapter.linear_out.weight"].shape == (16, 12)
    (files / "ckpt_ir_lora.json").unlink()  # as verl wrote them: no config at all
    with pytest.raises(MissingConfigError, match="pass --lora-alpha"):
        ckpt_ir.extract_adapter(tmp_path / "actor", tmp_path / "x")
    report = ckpt_ir.extract_adapter(tmp_path / "actor", tmp_path / "x", lora_alpha=16)
    assert report.adapter["source"]["r"] == 12 and report.source_format == "verl-legacy"
    (files / "mp_rank_00_adapter.pt").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"adapter file mp_rank_00_adapter\.pt is "
                                                     r"missing \(file names give TP=2, PP=1\)"):
        ckpt_ir.extract_adapter(tmp_path / "actor", tmp_path / "y", lora_alpha=16)


def test_verl_adapter_file_with_dora_or_a_foreign_object_is_refused(tmp_path):
    files = tmp_path / "actor" / "adapter_checkpoint"
    files.mkdir(parents=True)
    (tmp_path / "actor" / "huggingface").mkdir()
    (tmp_path / "actor" / "huggingface" / "config.json").write_text(json.dumps(TINY_LLAMA))
    torch.save({"weights": {}}, files / "mp_rank_00_adapter.pt")
    with pytest.raises(CorruptCheckpointError, match=r"does not hold \{'adapter_state_dict'"):
        ckpt_ir.extract_adapter(tmp_path / "actor", tmp_path / "x", lora_alpha=8)
    torch.save({"adapter_state_dict": {
        "decoder.layers.0.self_attention.linear_qkv.adapter.weight_magnitude": torch.ones(4)}},
        files / "mp_rank_00_adapter.pt")
    with pytest.raises(FormatError, match="DoRA adapters are not supported"):
        ckpt_ir.extract_adapter(tmp_path / "actor", tmp_path / "x", lora_alpha=8)


def test_adapters_are_found_in_verl_trees(tmp_path):
    write_adapter(tmp_path / "ad")
    role = tmp_path / "run" / "global_step_7" / "actor"
    convert_adapter(tmp_path / "ad", role, "verl-legacy")
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("7")
    r = resolve_adapter(tmp_path / "run")
    assert r.format == "verl-legacy" and r.path == role / "adapter_checkpoint" and r.step == 7
    # verl #5575's HF PEFT export beside the torch_dist files
    v2 = tmp_path / "v2" / "model" / "huggingface"
    v2.mkdir(parents=True)
    shutil.copytree(tmp_path / "ad", v2 / "adapter")
    assert resolve_adapter(tmp_path / "v2").format == "hf-peft"
    with pytest.raises(FormatError, match="holds no LoRA adapter"):
        resolve_adapter(tmp_path / "run" / "global_step_7" / "actor" / "huggingface")


# --- torch_dist: adapter-only and base + adapter ----------------------------------------------


def _combine_dist(parts: list[Path], out: Path) -> None:
    """One torch_dist dir holding every tensor of ``parts`` (a base + adapter checkpoint)."""
    out.mkdir()
    data = DcpDataFile(out, "__0_0.distcp")
    shapes = {}
    for part in parts:
        r = DcpReader(part)
        for fqn, t in r.index.tensors.items():
            data.add_tensor(fqn, (0,) * len(t.shape),
                            r.read_region(fqn, (0,) * len(t.shape), t.shape).clone())
            shapes[fqn] = (tuple(t.shape), t.dtype.torch)
        r.close()
    write_metadata(out, data.close(fsync=False), shapes)
    shutil.copytree(parts[0] / "hf_config", out / "hf_config")
    shutil.copy(parts[0] / "metadata.json", out / "metadata.json")


def test_base_plus_adapter_checkpoint(tmp_path):
    base = write_hf(tmp_path / "hf", dtype=torch.float32)
    write_adapter(tmp_path / "ad", lora(r=2, lora_alpha=4))
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "base-dist", to="mcore-dist")
    convert_adapter(tmp_path / "ad", tmp_path / "lora-dist", "mcore-dist")
    (tmp_path / "lora-dist" / "ckpt_ir_lora.json").unlink()  # Bridge writes none
    _combine_dist([tmp_path / "base-dist", tmp_path / "lora-dist"], tmp_path / "full")
    (tmp_path / "full" / "run_config.yaml").write_text("peft:\n  dim: 6\n  alpha: 12\n")
    # The model view skips the adapter, naming why.
    report = ckpt_ir.convert(tmp_path / "full", tmp_path / "hf2", to="hf")
    assert "LoRA adapter weight (read by extract-adapter, merge-adapter and convert --to " \
           "hf-peft)" in report.dropped.values()
    got = load_file(tmp_path / "hf2" / "model.safetensors")
    assert all(bits_equal(got[k], v) for k, v in base.items())
    # The adapter view skips the base; alpha comes from run_config.yaml.
    extracted = ckpt_ir.extract_adapter(tmp_path / "full", tmp_path / "ad2")
    (tmp_path / "full" / "run_config.yaml").write_text("peft:\n  dim: 16\n  alpha: 12\n")
    with pytest.raises(CorruptCheckpointError, match=r"run_config\.yaml says dim=16"):
        ckpt_ir.extract_adapter(tmp_path / "full", tmp_path / "ad3")
    (tmp_path / "full" / "run_config.yaml").write_text("peft:\n  dim: 6\n  alpha: 12\n")
    # alpha 12: the adapter's scaling 4 / 2 at Megatron's rank 6
    assert extracted.adapter["source"]["lora_alpha"] == 12 and \
        extracted.adapter["source"]["r"] == 6  # the stacked q/k/v ranks 2 + 2 + 2
    # One directory as both BASE and ADAPTER merges like the separate checkpoints.
    ckpt_ir.merge_adapter(tmp_path / "full", tmp_path / "full", tmp_path / "m1")
    ckpt_ir.merge_adapter(tmp_path / "hf", tmp_path / "ad", tmp_path / "m2")
    m1 = load_file(tmp_path / "m1" / "model.safetensors")
    m2 = load_file(tmp_path / "m2" / "model.safetensors")
    assert m1.keys() == m2.keys()
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k  # the same fp32 arithmetic on the same inputs


def test_merge_refuses_an_adapter_for_another_model(tmp_path):
    write_hf(tmp_path / "hf", {**TINY_LLAMA, "intermediate_size": 24})
    write_adapter(tmp_path / "ad")
    with pytest.raises(PlanError) as e:
        ckpt_ir.merge_adapter(tmp_path / "hf", tmp_path / "ad", tmp_path / "out")
    assert "source tensor model.layers.0.mlp.gate_proj.lora_B.weight has shape [40, 4], but " \
           "the config implies [24, 4]" in e.value.problems
    assert not (tmp_path / "out").exists()
