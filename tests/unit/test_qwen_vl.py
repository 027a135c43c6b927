"""The Qwen VL records without weights: the published configs read and plan (--dry-run), the
tables pin every Megatron name, shape and transform of the vision tower to Megatron-Bridge's
mapping (architectures-wave2 §3.3), the transforms invert, and bad configs are refused in one
line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckpt_ir.architectures.vision import HubStackExperts, InterleaveHeads
from ckpt_ir.cli import main
from ckpt_ir.errors import FormatError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.layout import Partition
from ckpt_ir.megatron_config import megatron_args
from ckpt_ir.table_engine import NativeParams
from ckpt_ir.tables import build_table
from ckpt_ir.transforms import TENSOR, Identity, StackExperts

# Qwen/Qwen2.5-VL-72B-Instruct config.json as published: the flat hub layout (text fields at
# the top level, no text_config), rope_scaling {"type": "mrope"}; numbers from
# /work/shared/reference/architectures-wave2.md §3.1 (mrope [16, 24, 24], patch 14, window 112,
# full-attention blocks [7, 15, 23, 31], token ids) and the 72B model card (80 layers, hidden
# 8192, 64 / 8 heads, FFN 29568, vocab 152064; vision 32 blocks of 1280, 16 heads, FFN 3456).
QWEN2_5_VL_72B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "hidden_act": "silu", "hidden_size": 8192, "initializer_range": 0.02,
    "intermediate_size": 29568, "max_position_embeddings": 128000, "max_window_layers": 80,
    "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.49.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3456,
        "num_heads": 16, "in_chans": 3, "out_hidden_size": 8192, "patch_size": 14,
        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2},
}

# Qwen/Qwen3-VL-30B-A3B-Instruct config.json: nested text_config / vision_config; numbers
# from architectures-wave2 §3.1-§3.2 (128 experts of 768, top 8; mrope [24, 20, 20]
# interleaved; vision 27 blocks of 1152, 16 heads, FFN 4304, patch 16, 2304 positions,
# deepstack [8, 16, 24]; the published tensor shapes checked below).
QWEN3_VL_30B_A3B = {
    "architectures": ["Qwen3VLMoeForConditionalGeneration"],
    "model_type": "qwen3_vl_moe",
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0",
    "text_config": {
        "model_type": "qwen3_vl_moe_text", "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "decoder_sparse_step": 1,
        "dtype": "bfloat16", "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 262144, "mlp_only_layers": [],
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
        "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                         "rope_type": "default"},
        "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936},
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24], "depth": 27,
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "in_channels": 3,
        "initializer_range": 0.02, "intermediate_size": 4304, "model_type": "qwen3_vl_moe",
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
}

GIB = 2**30


def _write(tmp_path: Path, name: str, config: dict) -> Path:
    src = tmp_path / name
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    return src


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def test_the_72b_flat_hub_config_reads_as_qwen2_with_a_vision_tower():
    cfg = ModelConfig.from_hf(QWEN2_5_VL_72B)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_key_value_heads,
            cfg.has_qkv_bias, cfg.has_qk_norm, cfg.vision_blocks, cfg.deepstack_mergers) == \
        ("qwen2_5_vl", 80, 8192, 8, True, False, 32, 0)
    schema = cfg.schema()
    assert schema["visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert schema["visual.blocks.31.attn.qkv.weight"] == (3840, 1280)
    assert schema["visual.blocks.0.mlp.gate_proj.bias"] == (3456,)
    assert schema["visual.merger.mlp.0.weight"] == (5120, 5120)
    assert schema["visual.merger.mlp.2.weight"] == (8192, 5120)
    assert "visual.patch_embed.proj.bias" not in schema  # §3.6 trap 6
    assert schema["model.layers.79.self_attn.q_proj.bias"] == (8192,)
    total = sum(_numel(s) for s in schema.values())
    assert 73.3e9 < total < 73.5e9  # the published "73.4B"


def test_the_30b_a3b_config_reads_as_qwen3_moe_with_deepstack():
    cfg = ModelConfig.from_hf(QWEN3_VL_30B_A3B)
    assert (cfg.architecture, cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok,
            cfg.moe_intermediate_size, cfg.has_qk_norm, cfg.tie_word_embeddings,
            cfg.vision_blocks, cfg.deepstack_mergers) == \
        ("qwen3_vl_moe", 48, 128, 8, 768, True, False, 27, 3)
    schema = cfg.schema()
    # The published tensor shapes (architectures-wave2 §3.2).
    assert schema["model.visual.blocks.0.attn.qkv.weight"] == (3456, 1152)
    assert schema["model.visual.pos_embed.weight"] == (2304, 1152)
    assert schema["model.visual.patch_embed.proj.weight"] == (1152, 3, 2, 16, 16)
    assert schema["model.visual.merger.linear_fc1.weight"] == (4608, 4608)
    assert schema["model.visual.merger.norm.weight"] == (1152,)  # before the shuffle
    assert schema["model.visual.deepstack_merger_list.2.norm.weight"] == (4608,)  # after it
    hf = build_table("hf", cfg, NativeParams(hf_experts="fused-hub"))
    gate_up = hf.by_native["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    down = hf.by_native["model.language_model.layers.0.mlp.experts.down_proj"]
    parts = {r: schema[n] for r, n in gate_up.ir.items()}
    assert gate_up.transform.shapes(parts) == (128, 2048, 1536)
    assert down.transform.shapes({r: schema[n] for r, n in down.ir.items()}) == (128, 768, 2048)
    total = sum(_numel(s) for s in schema.values())
    assert 31.0e9 < total < 31.2e9  # the published "31.1B"


@pytest.mark.parametrize(("config", "tensors"), [
    # Per layer: two norms, QKV weight and bias, proj, fc1, fc2 (qwen2 rows); per vision
    # block the 12 HF tensors (identity); patch embed, merger 5; embedding, final norm, head.
    (QWEN2_5_VL_72B, 80 * 7 + 32 * 12 + 1 + 5 + 3),
    # Per layer: norm, QKV, q/k norm, proj, pre-MLP norm, router, 128 x 2 experts; per
    # vision block 12; patch 2, pos 1, merger 6, 3 deepstack x 6; head 3.
    (QWEN3_VL_30B_A3B, 48 * (1 + 1 + 2 + 1 + 1 + 1 + 256) + 27 * 12 + 3 + 6 + 18 + 3),
])
def test_the_published_configs_plan_without_weights(tmp_path, capsys, config, tensors):
    src = _write(tmp_path, config["model_type"], config)
    code = main(["convert", str(src), str(tmp_path / "out"), "--to", "mcore-dist", "--dry-run",
                 "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    plan = json.loads(out.out)
    assert plan["architecture"] == config["model_type"]
    assert plan["tensors_written"] == tensors
    total = sum(_numel(s) for s in ModelConfig.from_hf(config).schema().values())
    assert 2 * total <= plan["bytes_written"] < 2 * total + GIB  # bf16
    assert not (tmp_path / "out").exists()


def test_megatron_args_carry_mrope():
    q25 = megatron_args(QWEN2_5_VL_72B)
    assert q25.gpt_model["position_embedding_type"] == "mrope"
    assert q25.transformer_config["mrope_section"] == [16, 24, 24]  # TransformerConfig's
    assert q25.transformer_config["add_qkv_bias"] is True
    assert q25.gpt_model["rotary_base"] == 1e6
    q3 = megatron_args(QWEN3_VL_30B_A3B)
    assert q3.transformer_config["mrope_section"] == [24, 20, 20]
    assert q3.transformer_config["num_moe_experts"] == 128
    assert q3.transformer_config["qk_layernorm"] is True
    assert any("mrope_interleaved" in n for n in q3.notes)


# -- Megatron-Bridge names, shapes and transforms (qwen3_vl_bridge.py / qwen25_vl_bridge.py) --

def _mcore(config: dict):
    return build_table("mcore", ModelConfig.from_hf(config), NativeParams())


def test_qwen3_vl_vision_rows_are_megatron_bridges():
    t = _mcore(QWEN3_VL_30B_A3B)
    v, b = "vision_model.", "vision_model.decoder.layers.26."
    hv = "model.visual.blocks.26."
    expected = {
        v + "patch_embed.proj.weight": ("model.visual.patch_embed.proj.weight", Identity,
                                        Partition.REPLICATED),
        v + "patch_embed.proj.bias": ("model.visual.patch_embed.proj.bias", Identity,
                                      Partition.REPLICATED),
        v + "pos_embed.weight": ("model.visual.pos_embed.weight", Identity,
                                 Partition.REPLICATED),
        b + "self_attention.linear_qkv.weight": (hv + "attn.qkv.weight", InterleaveHeads,
                                                 Partition.QKV),
        b + "self_attention.linear_qkv.bias": (hv + "attn.qkv.bias", InterleaveHeads,
                                               Partition.QKV),
        b + "self_attention.linear_qkv.layer_norm_weight": (hv + "norm1.weight", Identity,
                                                            Partition.REPLICATED),
        b + "self_attention.linear_qkv.layer_norm_bias": (hv + "norm1.bias", Identity,
                                                          Partition.REPLICATED),
        b + "self_attention.linear_proj.weight": (hv + "attn.proj.weight", Identity,
                                                  Partition.ROW),
        b + "self_attention.linear_proj.bias": (hv + "attn.proj.bias", Identity,
                                                Partition.REPLICATED),
        b + "mlp.linear_fc1.layer_norm_weight": (hv + "norm2.weight", Identity,
                                                 Partition.REPLICATED),
        b + "mlp.linear_fc1.layer_norm_bias": (hv + "norm2.bias", Identity,
                                               Partition.REPLICATED),
        b + "mlp.linear_fc1.weight": (hv + "mlp.linear_fc1.weight", Identity, Partition.COLUMN),
        b + "mlp.linear_fc1.bias": (hv + "mlp.linear_fc1.bias", Identity, Partition.COLUMN),
        b + "mlp.linear_fc2.weight": (hv + "mlp.linear_fc2.weight", Identity, Partition.ROW),
        b + "mlp.linear_fc2.bias": (hv + "mlp.linear_fc2.bias", Identity, Partition.REPLICATED),
        v + "merger.patch_norm.weight": ("model.visual.merger.norm.weight", Identity,
                                         Partition.REPLICATED),
        v + "merger.linear_fc1.weight": ("model.visual.merger.linear_fc1.weight", Identity,
                                         Partition.COLUMN),
        v + "merger.linear_fc2.weight": ("model.visual.merger.linear_fc2.weight", Identity,
                                         Partition.ROW),
        # Under decoder. (§3.3 "note: under decoder.").
        v + "decoder.deepstack_merger_list.2.patch_norm.bias": (
            "model.visual.deepstack_merger_list.2.norm.bias", Identity, Partition.REPLICATED),
        v + "decoder.deepstack_merger_list.2.linear_fc1.weight": (
            "model.visual.deepstack_merger_list.2.linear_fc1.weight", Identity,
            Partition.COLUMN),
        "language_model.embedding.word_embeddings.weight": ("model.embed_tokens.weight", None,
                                                            Partition.VOCAB),
        "language_model.output_layer.weight": ("lm_head.weight", None, Partition.VOCAB),
        "language_model.decoder.final_layernorm.weight": ("model.norm.weight", Identity,
                                                          Partition.REPLICATED),
        "language_model.decoder.layers.47.mlp.router.weight": (
            "model.layers.47.mlp.gate.weight", Identity, Partition.REPLICATED),
        "language_model.decoder.layers.47.mlp.experts.experts.127.linear_fc2.weight": (
            "model.layers.47.mlp.experts.127.down_proj.weight", Identity, Partition.ROW),
    }
    for native, (ir, transform, partition) in expected.items():
        binding = t.by_native[native]
        assert next(iter(binding.ir.values())) == ir, native
        assert binding.partition is partition, native
        if transform is not None:
            assert type(binding.transform) is transform, native
        assert binding.layer is None or native.startswith("language_model.decoder.layers.")
    qkv = t.by_native[b + "self_attention.linear_qkv.weight"].transform
    assert (qkv.heads, qkv.head_dim) == (16, 72)
    # Every vision / deepstack binding belongs to no decoder layer: the first pipeline stage.
    tower = [x for x in t.bindings if x.native.startswith(v)]
    assert len(tower) == 3 + 27 * 12 + 6 + 3 * 6
    assert all(x.layer is None for x in tower)
    fc1 = t.by_native["language_model.decoder.layers.0.mlp.experts.experts.0.linear_fc1.weight"]
    assert dict(fc1.ir) == {"gate": "model.layers.0.mlp.experts.0.gate_proj.weight",
                            "up": "model.layers.0.mlp.experts.0.up_proj.weight"}


def test_qwen2_5_vl_tower_is_transformers_module_under_visual():
    t = _mcore(QWEN2_5_VL_72B)
    tower = [b for b in t.bindings if b.native.startswith("visual.")]
    # ReplicatedMapping("visual.**"): identical names, no transform, whole on every rank.
    assert len(tower) == 1 + 32 * 12 + 5
    assert all(dict(b.ir) == {TENSOR: b.native} and isinstance(b.transform, Identity)
               and b.partition is Partition.REPLICATED and b.layer is None for b in tower)
    qkv = t.by_native["language_model.decoder.layers.0.self_attention.linear_qkv.bias"]
    assert set(qkv.ir) == {"q", "k", "v"}


def test_interleave_heads_is_megatron_bridges_concatenated_qkv():
    heads, d, hidden = 3, 2, 5
    hf = torch.arange(3 * heads * d * hidden, dtype=torch.float32).reshape(3 * heads * d, hidden)
    q, k, v = hf.split(heads * d)
    # ConcatenatedQKVMapping: per head h, rows [q_h; k_h; v_h].
    expected = torch.cat([torch.cat([x[h * d:(h + 1) * d] for x in (q, k, v)])
                          for h in range(heads)])
    t = InterleaveHeads(heads, d)
    native = t.apply({TENSOR: hf})
    assert torch.equal(native, expected)
    assert torch.equal(t.inverse(native)[TENSOR], hf)
    bias = torch.arange(3 * heads * d, dtype=torch.float32)
    assert torch.equal(t.inverse(t.apply({TENSOR: bias}))[TENSOR], bias)


def test_hub_experts_are_the_transpose_of_transformers_5s():
    e, f, h = 3, 4, 6
    parts = {f"{p}[{i}]": torch.randn(f, h) for i in range(e) for p in ("gate", "up")}
    hub = HubStackExperts(e, ("gate", "up"))
    saved = StackExperts(e, ("gate", "up")).apply(parts)
    native = hub.apply(parts)
    assert native.shape == (e, h, 2 * f)  # [E, H, 2F]: last dim gate then up
    assert torch.equal(native, saved.transpose(1, 2))
    assert all(torch.equal(hub.inverse(native)[r], parts[r]) for r in parts)
    assert hub.shapes({r: tuple(x.shape) for r, x in parts.items()}) == (e, h, 2 * f)


def test_the_expert_orientation_is_read_from_the_shapes_or_the_transformers_version():
    from ckpt_ir.architectures.qwen_vl import hf_expert_layout

    cfg = ModelConfig.from_hf(QWEN3_VL_30B_A3B)
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert hf_expert_layout(cfg, {name: (128, 2048, 1536)}) == "fused-hub"
    assert hf_expert_layout(cfg, {name: (128, 1536, 2048)}) == "fused"
    square = {**QWEN3_VL_30B_A3B, "text_config": {**QWEN3_VL_30B_A3B["text_config"],
                                                  "moe_intermediate_size": 1024}}
    sq = ModelConfig.from_hf(square)
    assert hf_expert_layout(sq, {name: (128, 2048, 2048)}) == "fused-hub"  # 4.57 wrote it
    assert hf_expert_layout(ModelConfig.from_hf({**square, "transformers_version": "5.23.0"}),
                            {name: (128, 2048, 2048)}) == "fused"
    no_version = {k: v for k, v in square.items() if k != "transformers_version"}
    with pytest.raises(FormatError, match="only the config's transformers_version"):
        hf_expert_layout(ModelConfig.from_hf(no_version), {name: (128, 2048, 2048)})


@pytest.mark.parametrize(("change", "message"), [
    ({"vision_config": {**QWEN3_VL_30B_A3B["vision_config"], "out_hidden_size": 4096}},
     "vision_config.out_hidden_size=4096 is not the language model's hidden_size=2048"),
    ({"vision_config": {**QWEN3_VL_30B_A3B["vision_config"], "num_heads": 5}},
     "over num_heads=5 is not a vision tower"),
    ({"vision_config": "none"}, "vision_config must be an object"),
    ({"text_config": [1]}, "text_config must be an object"),
])
def test_a_malformed_vl_config_is_refused_in_one_line(tmp_path, capsys, change, message):
    src = _write(tmp_path, "q", {**QWEN3_VL_30B_A3B, **change})
    code = main(["convert", str(src), str(tmp_path / "out"), "--to", "mcore-dist", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err


def test_a_tp_that_does_not_divide_the_split_vision_heads_is_refused(tmp_path):
    from ckpt_ir.errors import IncompatibleLayoutError
    from ckpt_ir.layout import ParallelLayout

    # The language model (32 heads, 4 KV groups, FFN 6144, experts of 768) splits over TP=32;
    # the vision tower's 16 heads do not.
    q3 = ModelConfig.from_hf(QWEN3_VL_30B_A3B)
    assert q3.vision_split_heads == 16
    ParallelLayout(tp=8).check_model(q3)
    with pytest.raises(IncompatibleLayoutError,
                       match="TP=32 does not divide the vision tower's 16 attention heads"):
        ParallelLayout(tp=32).check_model(q3, padded_vocab_size=151936 + 32 * 2)
    # Qwen2.5-VL's tower is replicated: no constraint from its heads.
    assert ModelConfig.from_hf(QWEN2_5_VL_72B).vision_split_heads == 0
