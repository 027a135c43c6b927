"""glm4_moe, glm4_moe_lite, deepseek_v32 and glm_moe_dsa without weights: the published configs
read, size and plan (``--dry-run``); the mapping rows equal Megatron-Bridge's as documented
(/work/shared/reference/architectures-wave2.md sections 2.3, 2.7, 8.3: names, shapes,
transforms, TP partitions); ``megatron_args`` and its inverse carry GLM's partial rotary,
q/k/v bias, QK norm and routing; what ckpt-ir cannot express is refused in one line.

The configs are written from the reference's numbers (no hub access). Parameter counts are
checked against the sizes the hub lists for each release (safetensors totals, MTP layer and its
embedding / head copies included); the copies are not IR tensors (megatron-core shares the
model's), so the schema counts them apart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import ckpt_ir
from ckpt_ir.architectures import lookup
from ckpt_ir.errors import FormatError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.layout import Partition
from ckpt_ir.megatron_config import hf_config_from_megatron, megatron_args
from ckpt_ir.tables import NativeParams, build_table
from ckpt_ir.transforms import ConcatGateUp, Identity, InterleaveQKV

_BASE: dict[str, Any] = {"hidden_act": "silu", "tie_word_embeddings": False,
                         "rms_norm_eps": 1e-5, "norm_topk_prob": True, "dtype": "bfloat16",
                         "num_nextn_predict_layers": 1, "n_shared_experts": 1}

# zai-org/GLM-4.5 (section 2.1; rope_theta 1e6 and max_position_embeddings are not in the
# reference: UNCONFIRMED, they change no tensor). transformers 5.12 and the hub file keep
# partial_rotary_factor as a top-level attribute.
GLM_45 = {**_BASE, "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
          "hidden_size": 5120, "num_hidden_layers": 92, "vocab_size": 151552,
          "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
          "attention_bias": True, "use_qk_norm": True, "partial_rotary_factor": 0.5,
          "rope_theta": 1000000.0, "max_position_embeddings": 131072,
          "intermediate_size": 12288, "first_k_dense_replace": 3, "n_routed_experts": 160,
          "num_experts_per_tok": 8, "moe_intermediate_size": 1536,
          "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1}
# zai-org/GLM-4.5-Air: the reference gives no Air numbers (section 2.5: flags UNCONFIRMED);
# these are the published file's as recalled (H 4096, 46 layers, 128 experts of 1408, one dense
# layer, q/k/v bias, no QK norm, scaling 1.0). The count below matches the hub's 110B.
GLM_45_AIR = {**GLM_45, "hidden_size": 4096, "num_hidden_layers": 46,
              "intermediate_size": 10944, "moe_intermediate_size": 1408,
              "n_routed_experts": 128, "first_k_dense_replace": 1, "use_qk_norm": False,
              "routed_scaling_factor": 1.0}
# zai-org/GLM-4.7-Flash (section 2.7; intermediate / moe_intermediate sizes are transformers'
# Glm4MoeLiteConfig defaults, which the real list's shapes confirm: 9,701 tensors).
GLM_47_FLASH = {**_BASE, "architectures": ["Glm4MoeLiteForCausalLM"],
                "model_type": "glm4_moe_lite", "hidden_size": 2048, "num_hidden_layers": 47,
                "num_attention_heads": 20, "num_key_value_heads": 20, "q_lora_rank": 768,
                "kv_lora_rank": 512, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64,
                "v_head_dim": 256, "rope_interleave": True, "partial_rotary_factor": 1.0,
                "rope_theta": 1000000.0, "intermediate_size": 10240,
                "moe_intermediate_size": 1536, "first_k_dense_replace": 1,
                "n_routed_experts": 64, "num_experts_per_tok": 4,
                "routed_scaling_factor": 1.8, "n_group": 1, "topk_group": 1,
                "vocab_size": 154880, "max_position_embeddings": 202752}
# deepseek-ai/DeepSeek-V3.2 (section 8.1; the V3 dimensions of section 9 and
# mcore-dist-and-bridge.md). Its quantization_config (block FP8, ue8m0 scales) is left out:
# quantized reading is another part of issue 15.
DEEPSEEK_V3_2 = {**_BASE, "architectures": ["DeepseekV32ForCausalLM"],
                 "model_type": "deepseek_v32", "hidden_size": 7168, "num_hidden_layers": 61,
                 "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
                 "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                 "v_head_dim": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
                 "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8,
                 "topk_group": 4, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5,
                 "vocab_size": 129280, "rms_norm_eps": 1e-6, "index_n_heads": 64,
                 "index_head_dim": 128, "index_topk": 2048, "max_position_embeddings": 163840,
                 "rope_scaling": {"type": "yarn", "factor": 40,
                                  "original_max_position_embeddings": 4096, "beta_fast": 32,
                                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}
# zai-org/GLM-5 (section 8.1: the transformers 5.23 defaults, which are GLM-5's).
GLM_5 = {**_BASE, "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
         "hidden_size": 6144, "num_hidden_layers": 78, "num_attention_heads": 64,
         "num_key_value_heads": 64, "q_lora_rank": 2048, "kv_lora_rank": 512,
         "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
         "intermediate_size": 12288, "moe_intermediate_size": 2048, "n_routed_experts": 256,
         "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 3,
         "routed_scaling_factor": 2.5, "vocab_size": 154880, "index_n_heads": 32,
         "index_head_dim": 128, "index_topk": 2048, "max_position_embeddings": 202752}

# name -> (config, IR tensors, parameters without / with the MTP embedding and head copies).
# Hub sizes: GLM-4.5 358B, GLM-4.5-Air 110B, GLM-4.7-Flash 31B (9,701 + 2 tensors in the real
# list), DeepSeek-V3.2 685B; GLM-5's "744B" excludes its MTP layer.
PUBLISHED: dict[str, tuple[dict[str, Any], int, int, int]] = {
    "GLM-4.5": (GLM_45, 44689, 356_785_898_816, 358_337_791_296),
    "GLM-4.5-Air": (GLM_45_AIR, 18327, 109_227_310_848, 110_468_824_832),
    "GLM-4.7-Flash": (GLM_47_FLASH, 9701, 30_587_100_096, 31_221_488_576),
    "DeepSeek-V3.2": (DEEPSEEK_V3_2, 46491, 683_501_971_712, 685_355_329_792),
    "GLM-5": (GLM_5, 59870, 753_864_139_008, 755_767_304_448),
}
GIB = 2**30


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _write(tmp_path: Path, config: dict[str, Any], name: str = "model") -> Path:
    src = tmp_path / name
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_reads_with_its_hub_size(name: str) -> None:
    config, tensors, params, with_copies = PUBLISHED[name]
    cfg = ModelConfig.from_hf(config)
    schema = cfg.schema()
    assert len(schema) == tensors
    total = sum(_numel(s) for s in schema.values())
    assert total == params
    assert total + 2 * cfg.vocab_size * cfg.hidden_size * cfg.num_mtp_layers == with_copies
    assert cfg.num_mtp_layers == 1


def test_glm5_without_its_mtp_layer_is_the_744b_of_its_name() -> None:
    mtp_free = ModelConfig.from_hf({**GLM_5, "num_nextn_predict_layers": 0})
    total = sum(_numel(s) for s in mtp_free.schema().values())
    assert round(total / 1e9) == 744


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_plans_without_weights(name: str, tmp_path: Path) -> None:
    config, _, params, _ = PUBLISHED[name]
    report = ckpt_ir.convert(_write(tmp_path, config), tmp_path / "out", to="mcore-dist",
                             dry_run=True)
    assert report.architecture == config["model_type"]
    assert report.bytes_written >= 2 * params  # bf16
    assert report.bytes_written < 2 * params + GIB
    assert not (tmp_path / "out").exists()


def test_the_cli_dry_run_plans_glm_4_5_air_to_per_rank_files(tmp_path: Path) -> None:
    src = _write(tmp_path, GLM_45_AIR)
    r = subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", str(src),
                        str(tmp_path / "out"), "--to", "megatron-legacy", "--tp", "4",
                        "--pp", "2", "--ep", "8", "--dry-run", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["architecture"] == "glm4_moe"


# ---------------------------------------------------------------- glm4_moe config and rows


def test_glm_4_5_reads_its_attention_flags() -> None:
    cfg = ModelConfig.from_hf(GLM_45)
    assert (cfg.has_qkv_bias, cfg.has_qk_norm, cfg.head_dim) == (True, True, 128)
    assert cfg.moe_layers == tuple(range(3, 92))
    assert cfg.shared_expert_intermediate_size == 1536
    air = ModelConfig.from_hf(GLM_45_AIR)
    assert (air.has_qkv_bias, air.has_qk_norm) == (True, False)
    schema = cfg.schema()
    assert schema["model.layers.0.self_attn.q_proj.bias"] == (12288,)
    assert "model.layers.0.self_attn.o_proj.bias" not in schema
    assert schema["model.layers.3.mlp.gate.e_score_correction_bias"] == (160,)
    assert schema["model.layers.92.eh_proj.weight"] == (5120, 10240)


@pytest.mark.parametrize(("config", "expected"), [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                          "partial_rotary_factor": 0.5}}, 0.5),      # transformers 5.23
    ({"partial_rotary_factor": 0.25, "rope_theta": 1e6}, 0.25),      # hub file / 5.12
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5},
      "partial_rotary_factor": 1.0}, 0.5),                           # rope_parameters first
    ({}, 0.5),                                                       # Glm4MoeConfig's default
])
def test_partial_rotary_comes_from_rope_parameters_first(config: dict, expected: float) -> None:
    hf = {k: v for k, v in GLM_45.items() if k not in ("partial_rotary_factor", "rope_theta")}
    assert megatron_args({**hf, **config}).gpt_model["rotary_percent"] == expected


def test_other_families_keep_full_rotary() -> None:
    llama = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 128}
    assert megatron_args(llama).gpt_model["rotary_percent"] == 1.0
    with pytest.raises(FormatError, match="partial_rotary_factor"):
        megatron_args({**GLM_45, "partial_rotary_factor": 0})


def test_glm_4_5_megatron_args_follow_megatron_bridge() -> None:
    args = megatron_args(GLM_45)
    tc = args.transformer_config
    assert (tc["add_qkv_bias"], tc["qk_layernorm"], tc["add_bias_linear"]) == (True, True, False)
    assert (tc["kv_channels"], tc["num_query_groups"], tc["num_attention_heads"]) == \
        (128, 8, 96)
    assert tc["moe_layer_freq"] == [0] * 3 + [1] * 89
    assert (tc["num_moe_experts"], tc["moe_router_topk"], tc["moe_ffn_hidden_size"]) == \
        (160, 8, 1536)
    assert tc["moe_shared_expert_intermediate_size"] == 1536
    assert tc["moe_router_score_function"] == "sigmoid"
    assert tc["moe_router_enable_expert_bias"] is True
    assert tc["moe_router_bias_update_rate"] == 0.0
    assert tc["moe_router_topk_scaling_factor"] == 2.5
    assert tc["moe_router_dtype"] == "fp32"
    assert "moe_router_num_groups" not in tc  # one group: no grouped routing
    assert tc["mtp_num_layers"] == 1
    assert args.gpt_model["rotary_percent"] == 0.5 and args.gpt_model["rotary_base"] == 1e6
    assert (args.config_class, args.decoder_block_spec, args.mtp) == \
        ("TransformerConfig", True, True)


@pytest.mark.parametrize("config", [GLM_45, GLM_45_AIR])
def test_hf_config_from_megatron_inverts_megatron_args(config: dict) -> None:
    args = megatron_args(config)
    back = hf_config_from_megatron({**args.transformer_config, **args.gpt_model},
                                   architecture="glm4_moe", tied=False)
    assert back["architectures"] == ["Glm4MoeForCausalLM"]
    assert back["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert back["attention_bias"] is True
    assert back["use_qk_norm"] is config["use_qk_norm"]
    assert back["routed_scaling_factor"] == config["routed_scaling_factor"]
    again = ModelConfig.from_hf(back)
    assert again.schema() == ModelConfig.from_hf(config).schema()
    assert megatron_args(back).transformer_config == args.transformer_config


def test_hf_config_from_megatron_writes_full_rotary_for_glm_explicitly() -> None:
    args = megatron_args({**GLM_45, "partial_rotary_factor": 1.0})
    back = hf_config_from_megatron({**args.transformer_config, **args.gpt_model},
                                   architecture="glm4_moe", tied=False)
    # Left out, transformers would assume GLM's 0.5.
    assert back["rope_parameters"]["partial_rotary_factor"] == 1.0


TINY_GLM = {**GLM_45, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 24, "intermediate_size": 96,
            "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "vocab_size": 300}


def _rows(config: dict, norm_style: str) -> dict[str, tuple[dict, Any, Partition]]:
    table = build_table("mcore", ModelConfig.from_hf(config), NativeParams(norm_style=norm_style))
    return {b.native: (dict(b.ir), b.transform, b.partition) for b in table.bindings}


def test_glm4_moe_rows_are_megatron_bridges() -> None:
    """Section 2.3: every Megatron name (local spec's torch_dist keys, per expert), its HF
    parts, transform and TP partition, for the dense layer 0, the MoE layer 1 and MTP layer 0."""
    rows = _rows(TINY_GLM, "local-dist")
    d, m, t = "decoder.layers.0.", "decoder.layers.1.", "mtp.layers.0.transformer_layer."
    h0, h1, h2 = "model.layers.0.", "model.layers.1.", "model.layers.2."
    qkv = InterleaveQKV(2, 2, 24)
    expected: dict[str, tuple[dict, Any, Partition]] = {}
    for native, hf in ((d, h0), (m, h1), (t, h2)):
        a = hf + "self_attn."
        expected |= {
            native + "self_attention.linear_qkv.layer_norm_weight":
                ({"tensor": hf + "input_layernorm.weight"}, Identity(), Partition.REPLICATED),
            native + "self_attention.linear_qkv.weight":
                ({r: a + f"{r}_proj.weight" for r in "qkv"}, qkv, Partition.QKV),
            native + "self_attention.linear_qkv.bias":
                ({r: a + f"{r}_proj.bias" for r in "qkv"}, qkv, Partition.QKV),
            native + "self_attention.q_layernorm.weight":
                ({"tensor": a + "q_norm.weight"}, Identity(), Partition.REPLICATED),
            native + "self_attention.k_layernorm.weight":
                ({"tensor": a + "k_norm.weight"}, Identity(), Partition.REPLICATED),
            native + "self_attention.linear_proj.weight":
                ({"tensor": a + "o_proj.weight"}, Identity(), Partition.ROW),
            native + "mlp.linear_fc1.layer_norm_weight":
                ({"tensor": hf + "post_attention_layernorm.weight"}, Identity(),
                 Partition.REPLICATED),
        }
    expected |= {
        d + "mlp.linear_fc1.weight": ({"gate": h0 + "mlp.gate_proj.weight",
                                       "up": h0 + "mlp.up_proj.weight"}, ConcatGateUp(),
                                      Partition.SWIGLU),
        d + "mlp.linear_fc2.weight": ({"tensor": h0 + "mlp.down_proj.weight"}, Identity(),
                                      Partition.ROW),
    }
    for native, hf in ((m, h1), (t, h2)):
        expected |= {
            native + "mlp.router.weight": ({"tensor": hf + "mlp.gate.weight"}, Identity(),
                                           Partition.REPLICATED),
            native + "mlp.router.expert_bias":
                ({"tensor": hf + "mlp.gate.e_score_correction_bias"}, Identity(),
                 Partition.REPLICATED),
            native + "mlp.shared_experts.linear_fc1.weight":
                ({"gate": hf + "mlp.shared_experts.gate_proj.weight",
                  "up": hf + "mlp.shared_experts.up_proj.weight"}, ConcatGateUp(),
                 Partition.SWIGLU),
            native + "mlp.shared_experts.linear_fc2.weight":
                ({"tensor": hf + "mlp.shared_experts.down_proj.weight"}, Identity(),
                 Partition.ROW),
        }
        for e in range(4):
            x = hf + f"mlp.experts.{e}."
            expected |= {
                native + f"mlp.experts.experts.{e}.linear_fc1.weight":
                    ({"gate": x + "gate_proj.weight", "up": x + "up_proj.weight"},
                     ConcatGateUp(), Partition.SWIGLU),
                native + f"mlp.experts.experts.{e}.linear_fc2.weight":
                    ({"tensor": x + "down_proj.weight"}, Identity(), Partition.ROW),
            }
    expected |= {
        "embedding.word_embeddings.weight": ({"tensor": "model.embed_tokens.weight"}, None,
                                             Partition.VOCAB),
        "decoder.final_layernorm.weight": ({"tensor": "model.norm.weight"}, Identity(),
                                           Partition.REPLICATED),
        "output_layer.weight": ({"tensor": "lm_head.weight"}, None, Partition.VOCAB),
        "mtp.layers.0.enorm.weight": ({"tensor": h2 + "enorm.weight"}, Identity(),
                                      Partition.REPLICATED),
        "mtp.layers.0.hnorm.weight": ({"tensor": h2 + "hnorm.weight"}, Identity(),
                                      Partition.REPLICATED),
        "mtp.layers.0.eh_proj.weight": ({"tensor": h2 + "eh_proj.weight"}, Identity(),
                                        Partition.COLUMN),
        "mtp.layers.0.final_layernorm.weight": ({"tensor": h2 + "shared_head.norm.weight"},
                                                Identity(), Partition.REPLICATED),
    }
    assert sorted(rows) == sorted(expected)
    for native, (ir, transform, partition) in expected.items():
        assert rows[native][0] == ir, native
        assert rows[native][2] == partition, native
        if transform is not None:  # the vocabulary rows pad (PadRows), checked elsewhere
            assert rows[native][1] == transform, native


def test_the_te_spec_names_glm_norms_like_megatron_bridge() -> None:
    rows = _rows(TINY_GLM, "te")
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in rows  # dense: fused norm
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in rows          # MoE: its own norm
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" not in rows


def test_air_has_no_qk_norm_rows() -> None:
    rows = _rows({**TINY_GLM, "use_qk_norm": False}, "local-dist")
    assert not any("q_layernorm" in n or "k_layernorm" in n for n in rows)


# ---------------------------------------------------------------- MLA families and DSA


def test_glm_4_7_flash_is_deepseek_v3_rows_with_glm_routing() -> None:
    cfg = ModelConfig.from_hf(GLM_47_FLASH)
    assert cfg.moe_layers == tuple(range(1, 47))
    # deepseek_v3's rows, less the torchtitan naming (torchtitan has no GLM model).
    assert lookup("glm4_moe_lite").tables == {
        k: v for k, v in lookup("deepseek_v3").tables.items() if k != "torchtitan"}
    tc = megatron_args(GLM_47_FLASH).transformer_config
    assert tc["moe_router_topk_scaling_factor"] == 1.8
    assert "moe_router_num_groups" not in tc
    assert (tc["multi_latent_attention"], tc["q_lora_rank"], tc["kv_lora_rank"]) == \
        (True, 768, 512)
    assert (tc["qk_head_dim"], tc["qk_pos_emb_head_dim"], tc["v_head_dim"]) == (192, 64, 256)
    assert tc["mtp_num_layers"] == 1


def test_mlp_layer_types_decide_the_routed_layers() -> None:
    """transformers' Glm4MoeLite / DSA classes read mlp_layer_types, not first_k_dense_replace."""
    types = ["dense", "sparse", "dense"] + ["sparse"] * 44
    assert ModelConfig.from_hf({**GLM_47_FLASH, "mlp_layer_types": types}).moe_layers == \
        (1, *range(3, 47))
    # Glm4MoeLiteConfig ignores first_k_dense_replace: one dense layer unless listed.
    assert ModelConfig.from_hf({**GLM_47_FLASH, "first_k_dense_replace": 3}).moe_layers == \
        tuple(range(1, 47))
    assert ModelConfig.from_hf(GLM_5).moe_layers == tuple(range(3, 78))
    with pytest.raises(FormatError, match="mlp_layer_types"):
        ModelConfig.from_hf({**GLM_5, "mlp_layer_types": ["dense"] * 3})


@pytest.mark.parametrize("config", [DEEPSEEK_V3_2, GLM_5], ids=["deepseek_v32", "glm_moe_dsa"])
def test_dsa_indexer_rows_are_megatron_bridges(config: dict) -> None:
    """Section 8.3: every layer's indexer (MTP layer included), name for name, identity
    copies, whole on every TP rank (``duplicated``); section 8.2 shapes."""
    cfg = ModelConfig.from_hf(config)
    heads, dim, h, q_lora = (config["index_n_heads"], config["index_head_dim"],
                             config["hidden_size"], config["q_lora_rank"])
    shapes = {"wq_b.weight": (heads * dim, q_lora), "wk.weight": (dim, h),
              "k_norm.weight": (dim,), "k_norm.bias": (dim,),
              "weights_proj.weight": (heads, h)}
    megatron = {"wq_b.weight": "linear_wq_b.weight", "wk.weight": "linear_wk.weight",
                "k_norm.weight": "k_norm.weight", "k_norm.bias": "k_norm.bias",
                "weights_proj.weight": "linear_weights_proj.weight"}
    schema = cfg.schema()
    rows = {b.native: b for b in build_table("mcore", cfg, NativeParams()).bindings}
    layers = cfg.num_layers
    for layer in range(layers + 1):
        hf = f"model.layers.{layer}.self_attn.indexer."
        native = (f"decoder.layers.{layer}." if layer < layers
                  else "mtp.layers.0.transformer_layer.") + "self_attention.core_attention.indexer."
        for name, shape in shapes.items():
            assert schema[hf + name] == shape
            b = rows[native + megatron[name]]
            assert dict(b.ir) == {"tensor": hf + name}
            assert b.transform == Identity() and b.partition == Partition.REPLICATED
    assert sum("indexer." in n for n in schema) == 5 * (layers + 1)
    assert sum(".indexer." in n for n in rows) == 5 * (layers + 1)


def test_dsa_megatron_args_name_the_indexer_and_say_what_0_16_1_lacks() -> None:
    args = megatron_args(GLM_5)
    tc = args.transformer_config
    assert tc["experimental_attention_variant"] == "dsa"
    assert (tc["dsa_indexer_n_heads"], tc["dsa_indexer_head_dim"], tc["dsa_indexer_topk"]) == \
        (32, 128, 2048)
    assert any("cannot build it" in n for n in args.notes)
    v32 = megatron_args(DEEPSEEK_V3_2).transformer_config
    assert (v32["moe_router_num_groups"], v32["moe_router_group_topk"]) == (8, 4)
    assert v32["rope_type"] == "yarn"


def test_dsa_hf_config_from_megatron_keeps_the_indexer() -> None:
    args = megatron_args(GLM_5)
    back = hf_config_from_megatron({**args.transformer_config, **args.gpt_model},
                                   architecture="glm_moe_dsa", tied=False)
    assert (back["index_n_heads"], back["index_head_dim"], back["index_topk"]) == (32, 128, 2048)
    assert ModelConfig.from_hf(back).schema() == ModelConfig.from_hf(GLM_5).schema()


@pytest.mark.parametrize("fields", [
    {"indexer_types": ["full", "shared"] * 39},
    {"index_topk_pattern": "FS" * 39},
    {"index_topk_freq": 2},
])
def test_shared_indexer_layers_are_refused_by_name(fields: dict) -> None:
    with pytest.raises(FormatError, match=r"'shared' indexer layers .* not supported"):
        ModelConfig.from_hf({**GLM_5, **fields})


def test_the_cli_refuses_shared_indexer_layers_in_one_line(tmp_path: Path) -> None:
    src = _write(tmp_path, {**GLM_5, "index_topk_freq": 4})
    r = subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", str(src),
                        str(tmp_path / "out"), "--to", "mcore-dist", "--dry-run"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "'shared' indexer layers" in r.stderr


def test_dsa_without_q_lora_is_refused() -> None:
    with pytest.raises(FormatError, match="q_lora_rank > 0"):
        ModelConfig.from_hf({**DEEPSEEK_V3_2, "q_lora_rank": None})


def test_mla_notes_the_q_kv_norm_epsilon() -> None:
    assert any("q_a / kv_a with eps 1e-6" in n for n in megatron_args(GLM_47_FLASH).notes)
    assert not any("q_a / kv_a" in n for n in megatron_args(DEEPSEEK_V3_2).notes)


# ---------------------------------------------------------------- schema = transformers' files

# Tiny configs of each family (every structural flag of the published ones), keyed by
# architecture; tests/unit/test_architectures.py runs its per-record checks over them too.
TINY: dict[str, dict[str, Any]] = {
    "glm4_moe": dict(TINY_GLM, vocab_size=50, num_hidden_layers=3,
                     first_k_dense_replace=1),
    "glm4_moe_lite": dict(model_type="glm4_moe_lite", hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=4, vocab_size=50,
                          intermediate_size=40, moe_intermediate_size=12, n_routed_experts=4,
                          n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=16,
                          kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                          v_head_dim=6, routed_scaling_factor=1.8,
                          num_nextn_predict_layers=1),
}
TINY["deepseek_v32"] = dict(TINY["glm4_moe_lite"], model_type="deepseek_v32", n_group=2,
                            topk_group=1, first_k_dense_replace=1, index_n_heads=2,
                            index_head_dim=8, index_topk=4)
TINY["glm_moe_dsa"] = dict(TINY["deepseek_v32"], model_type="glm_moe_dsa", n_group=1)
_CONFIG_CLASSES = {"glm4_moe": "Glm4MoeConfig", "glm4_moe_lite": "Glm4MoeLiteConfig",
                   "deepseek_v32": "DeepseekV32Config", "glm_moe_dsa": "GlmMoeDsaConfig"}
VARIANTS = [(a, {}) for a in TINY] + [("glm4_moe", {"use_qk_norm": False}),
                                      ("glm4_moe", {"attention_bias": False})]


@pytest.mark.parametrize(("arch", "overrides"), VARIANTS,
                         ids=[f"{a}-{i}" for i, (a, _) in enumerate(VARIANTS)])
def test_schema_is_what_transformers_saves_and_fused_is_what_it_holds(
        arch: str, overrides: dict, tmp_path: Path) -> None:
    import transformers

    fields = {k: v for k, v in {**TINY[arch], **overrides}.items() if k != "model_type"}
    config = getattr(transformers, _CONFIG_CLASSES[arch])(**fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    cfg = ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text())).without_mtp()
    # transformers neither builds nor saves MTP layers: such a checkpoint reads without them.
    assert cfg.schema() == saved
    fused = build_table("hf", cfg, NativeParams(hf_experts="fused"))
    memory = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = dict(cfg.schema())
    planned = {b.native: b.transform.shapes({r: shapes[n] for r, n in b.ir.items()})
               for b in fused.bindings}
    assert planned == memory
