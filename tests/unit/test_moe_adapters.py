"""LoRA adapters of MoE models: names, Megatron layout planning and what is refused.

Adapters are written directly; real peft and megatron-core are in
tests/clients/test_moe_lora_client.py, the round-trip properties in
tests/properties/test_moe_adapter_round_trips.py.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt_ir.adapter_api import convert_adapter, open_adapter
from ckpt_ir.adapters import AdapterConfig, LoraLayout, parse_module, plan_lora_layout
from ckpt_ir.converters.storage.dcp_files import DcpDataFile, DcpReader, write_metadata
from ckpt_ir.errors import CheckpointError, CorruptCheckpointError, FormatError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.tables import NativeParams, build_table
from tests.unit.test_moe import DEEPSEEK_V3_671B, TINY

MLP = ["gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def config(arch: str, **overrides) -> ModelConfig:
    return ModelConfig.from_hf({**TINY[arch], **overrides})


def lora(targets, **fields) -> dict:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets, **fields}


def write_adapter(path: Path, arch: str, peft: dict, *, seed: int = 0) -> dict[str, torch.Tensor]:
    adapter = AdapterConfig.from_peft(peft, config(arch))
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g) for n, s in adapter.schema().items()}
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(peft))
    (path / "config.json").write_text(json.dumps(TINY[arch]))
    save_file({"base_model.model." + k: v for k, v in tensors.items()},
              path / "adapter_model.safetensors")
    return tensors


# --- names ------------------------------------------------------------------------------------


def test_expert_adapter_names_are_hf_peft_per_expert_names():
    schema = AdapterConfig.from_peft(lora([*ATTENTION, "w1", "w2", "w3"]),
                                     config("mixtral")).schema()
    assert schema["model.layers.1.block_sparse_moe.experts.3.w1.lora_A.weight"] == (4, 32)
    assert schema["model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight"] == (32, 4)
    assert schema["model.layers.0.self_attn.q_proj.lora_B.weight"] == (32, 4)
    assert len(schema) == 2 * 2 * (4 + 4 * 3)
    qwen2 = AdapterConfig.from_peft(lora(MLP), config("qwen2_moe")).schema()
    assert qwen2["model.layers.0.mlp.gate_proj.lora_B.weight"] == (40, 4)  # dense layer 0
    assert qwen2["model.layers.1.mlp.experts.2.up_proj.lora_B.weight"] == (24, 4)
    assert qwen2["model.layers.1.mlp.shared_expert.down_proj.lora_A.weight"] == (4, 36)
    assert "model.layers.0.mlp.experts.0.gate_proj.lora_A.weight" not in qwen2


def test_module_roles_and_sites():
    m = parse_module("model.layers.2.block_sparse_moe.experts.5.w3")
    assert (m.layer, m.site, m.expert, m.leaf, m.group) == (2, "experts", 5, "up_proj",
                                                            "linear_fc1")
    assert parse_module("model.layers.1.mlp.shared_experts.down_proj").site == "shared_experts"
    with pytest.raises(FormatError, match="not a LoRA-targetable module"):
        parse_module("model.layers.1.mlp.experts.5.w1")


def test_mcore_lora_names_stack_experts_per_layer():
    adapter = AdapterConfig.from_peft(lora(MLP), config("qwen2_moe"))
    layout, _ = plan_lora_layout(adapter, shared_groups={"linear_fc1": True})
    table = build_table("mcore-lora", adapter.base, NativeParams(lora=layout),
                        schema=adapter.schema())
    b, _ = table.by_ir["model.layers.2.mlp.experts.3.gate_proj.lora_A.weight"]
    assert b.native == "decoder.layers.2.mlp.experts.experts.3.linear_fc1.adapter.linear_in.weight"
    assert b.expert == 3 and set(b.ir.values()) == {
        "model.layers.2.mlp.experts.3.gate_proj.lora_A.weight",
        "model.layers.2.mlp.experts.3.up_proj.lora_A.weight"}
    b, _ = table.by_ir["model.layers.1.mlp.shared_expert.down_proj.lora_B.weight"]
    assert b.native == "decoder.layers.1.mlp.shared_experts.linear_fc2.adapter.linear_out.weight"
    b, _ = table.by_ir["model.layers.0.mlp.up_proj.lora_B.weight"]
    assert b.native == "decoder.layers.0.mlp.linear_fc1.adapter.linear_out.weight"


def test_bridge_targets_name_sites_when_only_some_modules_are_adapted():
    qwen2 = config("qwen2_moe")
    everything = AdapterConfig.from_peft(lora(MLP), qwen2)
    layout, _ = plan_lora_layout(everything)
    assert layout.targets(qwen2) == ["linear_fc1", "linear_fc2"]
    shared = AdapterConfig.from_peft(lora(["shared_expert.down_proj", "q_proj"]), qwen2)
    layout, _ = plan_lora_layout(shared)
    assert layout.targets(qwen2) == ["linear_qkv", "*.mlp.shared_experts.linear_fc2"]


# --- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "targets", "message"), [
    ("deepseek_v3", ["q_proj", "gate_proj"],
     "adapter_config.json targets model.layers.0.self_attn.q_proj: LoRA on multi-latent "
     "attention (DeepSeek-V3 q/kv projections, o_proj) is not supported"),
    ("deepseek_v3", ["kv_b_proj"], "adapter_config.json targets model.layers.0.self_attn."
     "kv_b_proj: LoRA on multi-latent attention"),
    ("qwen3_moe", ["gate", "down_proj"], "adapter_config.json targets model.layers.1.mlp.gate: "
     "LoRA on the MoE router is not supported"),
    ("mixtral", "all-linear", "adapter_config.json targets model.layers.0.block_sparse_moe.gate: "
     "LoRA on the MoE router is not supported"),
    ("qwen2_moe", ["shared_expert_gate"], "adapter_config.json targets model.layers.1.mlp."
     "shared_expert_gate: LoRA on the shared-expert gate is not supported"),
])
def test_refused_targets_are_named(arch, targets, message):
    with pytest.raises(FormatError) as e:
        AdapterConfig.from_peft(lora(targets), config(arch))
    assert str(e.value).startswith(message)


def test_deepseek_expert_and_shared_expert_targets_are_supported():
    a = AdapterConfig.from_peft(lora(MLP), config("deepseek_v3"))
    assert "model.layers.1.mlp.shared_experts.up_proj" in a.modules()
    assert "model.layers.0.mlp.down_proj" in a.modules()  # first_k_dense_replace=1
    assert not any("self_attn" in m for m in a.modules())


def test_megatron_refuses_adapters_on_some_experts_only():
    a = AdapterConfig.from_peft(lora(["experts.0.gate_proj", "experts.0.up_proj"]),
                                config("qwen3_moe"))
    with pytest.raises(FormatError, match="wraps every expert alike; this adapter targets "
                                          "different modules in the experts of layer 1"):
        plan_lora_layout(a)


def test_canonical_lora_on_experts_is_refused_and_on_attention_allowed():
    moe = config("qwen3_moe")
    with pytest.raises(FormatError, match="CanonicalLoRA adapters on MoE experts are not "
                                          "supported"):
        plan_lora_layout(AdapterConfig.from_peft(lora(MLP), moe), style="canonical")
    layout, _ = plan_lora_layout(AdapterConfig.from_peft(lora(ATTENTION), moe),
                                 style="canonical")
    assert layout.targets(moe) == ["linear_q", "linear_k", "linear_v", "linear_proj"]


def test_verl_adapter_files_of_moe_models_are_refused(tmp_path):
    write_adapter(tmp_path / "peft", "qwen3_moe", lora(MLP))
    with pytest.raises(FormatError, match="verl adapter files of qwen3_moe \\(MoE\\) models are "
                                          "not supported"):
        convert_adapter(tmp_path / "peft", tmp_path / "verl", "verl-legacy")


# --- Bridge checkpoints without ckpt-ir's layout file -----------------------------------------


def test_bridge_checkpoint_of_some_sites_reads_back_those_sites_only(tmp_path):
    """A Bridge run with wildcard targets (experts' fc2 and attention, not the shared
    expert's or the dense layer's): the config read back names exactly those modules."""
    want = write_adapter(tmp_path / "peft", "qwen2_moe",
                         lora(["experts.0.down_proj", "experts.1.down_proj",
                               "experts.2.down_proj", "experts.3.down_proj", "o_proj"]))
    report = convert_adapter(tmp_path / "peft", tmp_path / "dist", "mcore-dist")
    assert report.adapter["megatron"]["target_modules"] == [
        "linear_proj", "*.mlp.experts.*.linear_fc2"]
    (tmp_path / "dist" / "ckpt_ir_lora.json").unlink()
    convert_adapter(tmp_path / "dist", tmp_path / "back", "hf-peft", lora_alpha=8)
    with open_adapter(tmp_path / "back") as back:
        assert set(back.tensors) == set(want)
        assert isinstance(back.adapter.target_modules, str)  # a module name pattern
        for name, t in want.items():
            assert torch.equal(back.read(name), t), name


# --- scale ------------------------------------------------------------------------------------


def test_deepseek_v3_671b_expert_adapter_plans_quickly():
    base = ModelConfig.from_hf(DEEPSEEK_V3_671B)
    t0 = time.perf_counter()
    adapter = AdapterConfig.from_peft(lora(MLP), base)
    layout, _ = plan_lora_layout(adapter, shared_groups={"linear_fc1": True})
    table = build_table("mcore-lora", base, NativeParams(lora=layout), schema=adapter.schema())
    assert time.perf_counter() - t0 < 30
    # 58 MoE layers x (256 experts + the shared expert) + 3 dense layers, 2 Megatron
    # adapters (fc1, fc2) of 2 tensors each.
    assert len(table.bindings) == (58 * 257 + 3) * 4
    assert isinstance(layout, LoraLayout) and layout.rank == 4


def test_grouped_expert_adapters_are_refused(tmp_path):
    """TEGroupedMLP's adapters (Bridge's default share_expert_adapters=True: one adapter per EP
    rank's experts) sit under ``mlp.experts.linear_fc1.adapter``, not per expert."""
    write_adapter(tmp_path / "peft", "mixtral", lora(["w1", "w2", "w3"]))
    convert_adapter(tmp_path / "peft", tmp_path / "dist", "mcore-dist")
    out = tmp_path / "grouped"
    out.mkdir()
    data = DcpDataFile(out, "__0_0.distcp")
    shapes = {}
    r = DcpReader(tmp_path / "dist")
    for fqn, t in r.index.tensors.items():
        # the same tensors under the grouped-expert key (as if saved with an expert axis)
        key = fqn.replace(".mlp.experts.experts.", ".mlp.experts.")
        data.add_tensor(key, (0,) * len(t.shape),
                        r.read_region(fqn, (0,) * len(t.shape), t.shape).clone())
        shapes[key] = (tuple(t.shape), t.dtype.torch)
    r.close()
    write_metadata(out, data.close(fsync=False), shapes)
    shutil.copytree(tmp_path / "dist" / "hf_config", out / "hf_config")
    shutil.copy(tmp_path / "dist" / "metadata.json", out / "metadata.json")
    with pytest.raises(FormatError, match="decoder.layers.mlp.experts.linear_fc1.adapter.linear_in"
                                          ".weight: Megatron-Bridge adapters of grouped experts "
                                          r"\(TEGroupedMLP"):
        convert_adapter(out, tmp_path / "back", "hf-peft", lora_alpha=8)


# --- target_parameters: LoRA on transformers 5's fused expert parameters ------------------------
# The layout peft 0.21 saves is proven against real peft in
# tests/clients/test_peft_target_parameters_client.py; these pin the inputs it refuses.

TP_LORA = lora([], target_parameters=["down_proj", "gate_up_proj"],
               rank_pattern={r".*\.gate_up_proj": 8}, alpha_pattern={r".*\.gate_up_proj": 16})


def _write_packed(path: Path, peft: dict, *, a_gate_up: tuple[int, int] = (4 * 8, 32)) -> None:
    """A mixtral (4 experts, H 32, F 24) target_parameters adapter with the given gate_up A
    shape; the rest as peft writes it."""
    p = "base_model.model.model.layers.{}.mlp.experts."
    tensors = {}
    for layer in range(2):
        tensors[p.format(layer) + "base_layer.lora_A.weight"] = torch.randn(a_gate_up)
        tensors[p.format(layer) + "base_layer.lora_B.weight"] = torch.randn(48, 4 * 8)
        tensors[p.format(layer) + "lora_A.weight"] = torch.randn(4 * 4, 24)
        tensors[p.format(layer) + "lora_B.weight"] = torch.randn(32, 4 * 4)
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(peft))
    (path / "config.json").write_text(json.dumps(TINY["mixtral"]))
    save_file(tensors, path / "adapter_model.safetensors")


def test_target_parameters_are_the_per_expert_modules_at_the_parameters_rank():
    adapter = AdapterConfig.from_peft(TP_LORA, config("mixtral"))
    schema = adapter.schema()
    assert len(schema) == 2 * 4 * 3 * 2  # layers x experts x (w1, w3, w2) x (A, B)
    e = "model.layers.1.block_sparse_moe.experts.3."
    assert schema[e + "w1.lora_A.weight"] == (8, 32) and schema[e + "w3.lora_B.weight"] == (24, 8)
    assert schema[e + "w2.lora_A.weight"] == (4, 24)
    assert adapter.scaling(e + "w1") == adapter.scaling(e + "w2") == 2.0
    assert adapter.summary()["target_parameters"] == ["down_proj", "gate_up_proj"]


@pytest.mark.parametrize(("arch", "peft", "message"), [
    ("mixtral", lora([], target_parameters=["experts.weight"]),
     r"target_parameters 'experts\.weight' is not supported \(LoRA on parameters: the fused "
     r"MoE expert parameters gate_up_proj and down_proj only\)"),
    ("mixtral", lora([], target_parameters=["layers.9.mlp.experts.down_proj"]),
     r"target_parameters 'layers\.9\.mlp\.experts\.down_proj' match no fused expert parameter"),
    ("mixtral", lora([], target_parameters="down_proj"),
     r"target_parameters must be a list of parameter names"),
])
def test_target_parameters_refusals(arch, peft, message):
    with pytest.raises(CheckpointError, match=message):
        AdapterConfig.from_peft(peft, config(arch))


def test_target_parameters_on_a_dense_model_are_refused():
    from tests.fixtures import TINY_LLAMA

    with pytest.raises(FormatError, match="name fused expert parameters, but llama has no "
                                          "experts"):
        AdapterConfig.from_peft(lora([], target_parameters=["down_proj"]),
                                ModelConfig.from_hf(TINY_LLAMA))


def test_a_packed_tensor_of_the_wrong_shape_is_corrupt(tmp_path):
    _write_packed(tmp_path / "ok", TP_LORA)
    with open_adapter(tmp_path / "ok") as a:
        assert len(a.tensors) == 48
    _write_packed(tmp_path / "bad", TP_LORA, a_gate_up=(30, 32))
    with pytest.raises(CorruptCheckpointError, match=r"mlp\.experts\.base_layer\.lora_A\.weight "
                                                     r"has shape \[30, 32\], not the"):
        open_adapter(tmp_path / "bad")


def test_packing_gate_and_up_with_different_a_is_refused(tmp_path):
    # A per-expert adapter whose config says target_parameters: one ParamWrapper cannot hold
    # gate and up adapters with different A matrices.
    _write_packed(tmp_path / "ad", TP_LORA)
    with open_adapter(tmp_path / "ad") as a:
        tensors = {n: a.read(n).clone() for n in a.tensors}
    e = "model.layers.0.block_sparse_moe.experts.2."
    assert torch.equal(tensors[e + "w1.lora_A.weight"], tensors[e + "w3.lora_A.weight"])
    tensors[e + "w3.lora_A.weight"] += 1
    per_expert = tmp_path / "per-expert"
    per_expert.mkdir()
    (per_expert / "adapter_config.json").write_text(json.dumps(lora(["w1", "w2", "w3"], r=8)))
    (per_expert / "config.json").write_text(json.dumps(TINY["mixtral"]))
    save_file({"base_model.model." + k: v for k, v in tensors.items()
               if ".w2." not in k}, per_expert / "adapter_model.safetensors")
    cfg = json.loads((per_expert / "adapter_config.json").read_text())
    (per_expert / "adapter_config.json").write_text(json.dumps(
        {**cfg, "target_modules": [], "target_parameters": ["gate_up_proj"]}))
    with pytest.raises(FormatError, match=r"expert 2's gate and up adapters have different A "
                                          r"matrices, which one ParamWrapper "
                                          r"\(model\.layers\.0\.mlp\.experts\) cannot hold"):
        convert_adapter(per_expert, tmp_path / "out", "hf-peft")
    assert not (tmp_path / "out").exists()
