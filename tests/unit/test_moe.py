"""Mixture-of-experts and DeepSeek-V3: schema, namings, layouts and plans, without megatron-core.

The IR schema is checked against what transformers 5.23 itself saves (per-expert names) and
holds in memory (the fused layout); the torch_dist keys against the key names megatron-core
0.16.1 requests (the client tests load them for real).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckpt_ir
from ckpt_ir.converters.storage.dcp_files import DcpReader
from ckpt_ir.ir import ModelConfig
from ckpt_ir.megatron_config import hf_config_from_megatron, megatron_args
from ckpt_ir.tables import NativeParams, build_table
from tests.fixtures import write_hf

GIB = 2**30

TINY = {
    "mixtral": dict(model_type="mixtral", hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                    intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=32, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                      intermediate_size=40, moe_intermediate_size=24,
                      shared_expert_intermediate_size=36, num_experts=4, num_experts_per_tok=2,
                      mlp_only_layers=[0]),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=32, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=50,
                      intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                      num_experts_per_tok=2, decoder_sparse_step=2),
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, vocab_size=50,
                        intermediate_size=40, moe_intermediate_size=12, n_routed_experts=4,
                        n_shared_experts=2, num_experts_per_tok=2, n_group=2, topk_group=1,
                        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=12,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                        num_nextn_predict_layers=1),
}
_CONFIG_CLASSES = {"mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
                   "qwen3_moe": "Qwen3MoeConfig", "deepseek_v3": "DeepseekV3Config"}
VARIANTS = [(a, {}) for a in TINY] + [
    ("deepseek_v3", {"q_lora_rank": None, "n_shared_experts": 1, "first_k_dense_replace": 0}),
    ("qwen2_moe", {"qkv_bias": False, "mlp_only_layers": [], "tie_word_embeddings": True}),
]


def _transformers_model(arch: str, overrides: dict):
    import transformers

    fields = {k: v for k, v in {**TINY[arch], **overrides}.items() if k != "model_type"}
    config = getattr(transformers, _CONFIG_CLASSES[arch])(**fields)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize(("arch", "overrides"), VARIANTS,
                         ids=[f"{a}-{i}" for i, (a, _) in enumerate(VARIANTS)])
def test_schema_is_what_transformers_saves_and_fused_is_what_it_holds(arch, overrides,
                                                                      tmp_path):
    model = _transformers_model(arch, overrides)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    cfg = ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    # transformers neither builds nor saves MTP layers: such a checkpoint reads without them.
    assert cfg.without_mtp().schema() == saved
    fused = build_table("hf", cfg.without_mtp(), NativeParams(hf_experts="fused"))
    memory = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        memory.pop("lm_head.weight")
    shapes = dict(cfg.without_mtp().schema())
    planned = {b.native: b.transform.shapes({r: shapes[n] for r, n in b.ir.items()})
               for b in fused.bindings}
    assert planned == memory


@pytest.mark.parametrize("arch", list(TINY))
def test_fused_hf_checkpoint_loads_in_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    want = write_hf(tmp_path / "hf", TINY[arch], dtype=torch.float32)
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "fused", to="hf", hf_experts="fused")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.1.mlp.experts.gate_up_proj" in load_file(
        tmp_path / "fused" / "model.safetensors")
    assert len(want) > len(a)  # per-expert in the files, fused in memory


def test_mcore_dist_keys_stack_layers_and_experts(tmp_path):
    """mixtral (all layers routed): [L, E, ...] keys, extra states named as megatron-core."""
    write_hf(tmp_path / "hf", TINY["mixtral"])
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "dist", to="mcore-dist", mcore_spec="local")
    r = DcpReader(tmp_path / "dist")
    try:
        keys = {k: tuple(t.shape) for k, t in r.index.tensors.items()}
        objects = set(r.index.blobs)
    finally:
        r.close()
    assert keys["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (2, 4, 48, 32)
    assert keys["decoder.layers.mlp.experts.experts.linear_fc2.weight"] == (2, 4, 32, 24)
    assert keys["decoder.layers.mlp.router.weight"] == (2, 4, 32)
    assert keys["decoder.layers.mlp.linear_fc1.layer_norm_weight"] == (2, 32)
    assert "decoder.layers.pre_mlp_layernorm.weight" not in keys
    assert {"decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_1.3_2.4",
            "decoder.layers.self_attention.linear_qkv._extra_state/shard_1_2"} <= objects
    assert not any(o.startswith("decoder.layers.mlp.linear_fc1._extra_state") for o in objects)


def test_mixed_layers_keep_per_layer_keys(tmp_path):
    """deepseek_v3 with a dense first layer: per-layer keys, experts stacked on axis 0, MTP."""
    write_hf(tmp_path / "hf", TINY["deepseek_v3"])
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "dist", to="mcore-dist", mcore_spec="local")
    r = DcpReader(tmp_path / "dist")
    try:
        keys = {k: tuple(t.shape) for k, t in r.index.tensors.items()}
        objects = set(r.index.blobs)
    finally:
        r.close()
    assert keys["decoder.layers.0.mlp.linear_fc1.weight"] == (80, 32)
    assert keys["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"] == (4, 24, 32)
    assert keys["decoder.layers.2.mlp.router.expert_bias"] == (4,)
    assert keys["decoder.layers.1.self_attention.linear_q_down_proj.weight"] == (16, 32)
    assert keys["decoder.layers.1.pre_mlp_layernorm.weight"] == (32,)
    assert keys["mtp.layers.0.eh_proj.weight"] == (32, 64)
    assert keys["mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc2.weight"] == (
        4, 32, 12)
    assert not any(k.startswith("decoder.layers.mlp") for k in keys)
    assert {"decoder.layers.1.mlp.experts.experts.linear_fc1._extra_state/shard_3_4",
            "decoder.layers.0.self_attention.linear_kv_up_proj._extra_state/shard_0_1",
            "mtp.layers.0.eh_proj._extra_state/shard_0_1"} <= objects


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_te_spec_norm_keys_and_any_writes_both(arch, tmp_path):
    """TE spec: MoE layers keep pre_mlp_layernorm, MLA fuses q/kv norms into the up
    projections (names from megatron-core's TE layer spec; TE cannot run here). ``any`` writes
    the local spec's keys and these copies; reading it back drops the copies."""
    want = write_hf(tmp_path / "hf", TINY[arch], dtype=torch.float32)
    te, local = ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight") \
        if arch == "mixtral" else ("self_attention.linear_q_up_proj.layer_norm_weight",
                                   "self_attention.q_layernorm.weight")
    found = {}
    for spec in ("te", "local", "any"):
        ckpt_ir.convert(tmp_path / "hf", tmp_path / spec, to="mcore-dist", mcore_spec=spec)
        r = DcpReader(tmp_path / spec)
        try:
            found[spec] = {k for k in r.index.tensors if k.endswith((te, local))}
        finally:
            r.close()
        with ckpt_ir.open(tmp_path / spec) as ckpt:
            assert all(torch.equal(ckpt.read(n), t) for n, t in want.items())
    assert all(k.endswith(te) for k in found["te"]) and found["te"]
    assert all(k.endswith(local) for k in found["local"]) and found["local"]
    assert found["any"] == found["te"] | found["local"]
    report = ckpt_ir.convert(tmp_path / "any", tmp_path / "back", to="hf")
    assert any("other layer spec" in why for why in report.dropped.values())


def test_mtp_layers_absent_from_the_files_are_dropped_from_the_config(tmp_path):
    cfg = ModelConfig.from_hf(TINY["deepseek_v3"])
    state = {n: torch.randn(s) for n, s in cfg.without_mtp().schema().items()}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(TINY["deepseek_v3"]))
    save_file(state, tmp_path / "hf" / "model.safetensors")
    ckpt_ir.convert(tmp_path / "hf", tmp_path / "dist", to="mcore-dist")
    written = json.loads((tmp_path / "dist" / "hf_config" / "config.json").read_text())
    assert written["num_nextn_predict_layers"] == 0
    assert not megatron_args(written).mtp


def test_partial_mtp_layers_are_reported_and_mtp_copies_dropped(tmp_path):
    want = write_hf(tmp_path / "hf", TINY["deepseek_v3"])
    state = dict(want)
    # DeepSeek's own files repeat the embedding and the head inside the MTP layer.
    state["model.layers.3.embed_tokens.weight"] = want["model.embed_tokens.weight"].clone()
    state["model.layers.3.shared_head.head.weight"] = want["lm_head.weight"].clone()
    save_file(state, tmp_path / "hf" / "model.safetensors")
    report = ckpt_ir.convert(tmp_path / "hf", tmp_path / "dist", to="mcore-dist")
    assert "MTP layer's copy" in report.dropped["model.layers.3.embed_tokens.weight"]
    del state["model.layers.3.eh_proj.weight"]
    save_file(state, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ckpt_ir.PlanError, match=r"model\.layers\.3\.eh_proj\.weight has no "):
        ckpt_ir.convert(tmp_path / "hf", tmp_path / "dist2", to="mcore-dist")


def test_unknown_hf_experts_layout_is_refused(tmp_path):
    write_hf(tmp_path / "hf", TINY["mixtral"])
    with pytest.raises(ckpt_ir.FormatError, match="hf_experts must be one of per-expert, fused"):
        ckpt_ir.convert(tmp_path / "hf", tmp_path / "out", to="hf", hf_experts="stacked")
    assert not (tmp_path / "out").exists()


def test_cli_writes_fused_experts(tmp_path):
    write_hf(tmp_path / "hf", TINY["qwen3_moe"])
    r = subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", str(tmp_path / "hf"),
                        str(tmp_path / "out"), "--to", "hf", "--hf-experts", "fused",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = load_file(tmp_path / "out" / "model.safetensors")
    assert names["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 48, 32)
    assert "model.layers.0.mlp.gate_proj.weight" in names  # layer 0 is dense (sparse step 2)


DEEPSEEK_V3_671B = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "num_nextn_predict_layers": 1,
    "dtype": "bfloat16", "rope_interleave": True,
    "rope_parameters": {"rope_type": "yarn", "factor": 40,
                        "original_max_position_embeddings": 4096, "beta_fast": 32,
                        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                        "rope_theta": 10000},
}


def test_deepseek_v3_671b_plans_one_expert_at_a_time(tmp_path):
    src = tmp_path / "dsv3"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(DEEPSEEK_V3_671B))
    t0 = time.perf_counter()
    report = ckpt_ir.convert(src, tmp_path / "out", to="mcore-dist", dry_run=True)
    assert time.perf_counter() - t0 < 60
    # 58 MoE layers + 1 MTP layer of 256 experts, 2 tensors each, dominate the count.
    assert report.tensors_written > 59 * 256 * 2
    # 671B parameters + the 14B MTP layer, bf16.
    assert 1.2e12 < report.bytes_written < 1.4e12
    # The largest unit is the (vocab-sized) embedding, not a layer's experts.
    assert report.peak_bytes_estimate < 2 * GIB


def test_megatron_args_for_deepseek_v3_671b():
    args = megatron_args(DEEPSEEK_V3_671B)
    tc = args.transformer_config
    assert args.config_class == "MLATransformerConfig" and args.decoder_block_spec and args.mtp
    assert tc["moe_layer_freq"] == [0, 0, 0] + [1] * 58
    assert (tc["num_moe_experts"], tc["moe_router_topk"], tc["moe_ffn_hidden_size"]) == \
        (256, 8, 2048)
    assert tc["moe_shared_expert_intermediate_size"] == 2048
    assert (tc["moe_router_score_function"], tc["moe_router_enable_expert_bias"]) == \
        ("sigmoid", True)
    assert (tc["moe_router_num_groups"], tc["moe_router_group_topk"],
            tc["moe_router_topk_scaling_factor"]) == (8, 4, 2.5)
    assert (tc["q_lora_rank"], tc["kv_lora_rank"], tc["qk_head_dim"],
            tc["qk_pos_emb_head_dim"], tc["v_head_dim"]) == (1536, 512, 128, 64, 128)
    assert (tc["rope_type"], tc["rotary_scaling_factor"], tc["mscale_all_dim"]) == \
        ("yarn", 40.0, 1.0)
    assert tc["mtp_num_layers"] == 1 and "num_query_groups" not in tc
    assert args.notes == ()
    back = hf_config_from_megatron({**tc, **args.gpt_model})
    assert back["model_type"] == "deepseek_v3"
    assert ModelConfig.from_hf(back).schema() == ModelConfig.from_hf(DEEPSEEK_V3_671B).schema()


def test_megatron_args_routing_per_family():
    q2 = megatron_args(TINY["qwen2_moe"]).transformer_config
    assert q2["moe_router_pre_softmax"] is True  # norm_topk_prob defaults to False
    assert q2["moe_shared_expert_gate"] is True and q2["moe_layer_freq"] == [0, 1, 1]
    q3 = megatron_args({**TINY["qwen3_moe"], "norm_topk_prob": True}).transformer_config
    assert "moe_router_pre_softmax" not in q3 and q3["moe_layer_freq"] == [0, 1, 0, 1]
    mx = megatron_args(TINY["mixtral"])
    assert "moe_layer_freq" not in mx.transformer_config and not mx.decoder_block_spec
    assert mx.layer_spec["num_experts"] == 4


def test_architecture_doc_lists_every_moe_architecture():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "architectures.md").read_text()
    for arch in TINY:
        assert f"## {arch} (mcore)" in doc
        assert f"## {arch} (hf)" in doc
