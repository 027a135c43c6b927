"""seed_oss (Seed-OSS-36B): its config reads as qwen2's tensors with an independent head_dim,
its bias flags map or are refused by name, megatron_args zeroes the dropouts and says so, and
the published 36B config plans (--dry-run) without weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt_ir
from ckpt_ir.errors import FormatError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.megatron_config import hf_config_from_megatron, megatron_args

GIB = 2**30

# ByteDance-Seed/Seed-OSS-36B-Base config.json, from /work/shared/reference/
# architectures-wave2.md section 7.3 (no hub access here). The reference leaves hidden_size
# UNCONFIRMED (transformers' default is 4096); 5120 is the value whose parameter count is the
# published 36B (36.15e9, checked below; 4096 gives 28.9e9). rope_theta 1e7 is not in the
# reference (UNCONFIRMED); it changes no tensor.
SEED_OSS_36B = {
    "architectures": ["SeedOssForCausalLM"],
    "model_type": "seed_oss",
    "attention_bias": True,
    "attention_out_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.1,
    "residual_dropout": 0.1,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 27648,
    "max_position_embeddings": 524288,
    "num_attention_heads": 80,
    "num_hidden_layers": 64,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0},
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 155136,
}


def _params(c: dict) -> int:
    h, d, nh, g, f = (c["hidden_size"], c["head_dim"], c["num_attention_heads"],
                      c["num_key_value_heads"], c["intermediate_size"])
    layer = (h * nh * d + nh * d          # q_proj + bias
             + 2 * (h * g * d + g * d)    # k_proj, v_proj + biases
             + nh * d * h                 # o_proj, no bias
             + 3 * h * f                  # gate, up, down
             + 2 * h)                     # two norms
    return c["num_hidden_layers"] * layer + 2 * c["vocab_size"] * h + h


def _write(tmp_path: Path, config: dict) -> Path:
    src = tmp_path / "seed-oss-36b"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_the_36b_config_reads_as_qwen2_tensors_with_its_own_head_dim():
    assert _params(SEED_OSS_36B) == 36_151_104_512
    cfg = ModelConfig.from_hf(SEED_OSS_36B)
    assert (cfg.architecture, cfg.has_qkv_bias, cfg.has_qk_norm, cfg.tie_word_embeddings) == \
        ("seed_oss", True, False, False)
    assert cfg.head_dim * cfg.num_attention_heads == 10240 != cfg.hidden_size
    schema = cfg.schema()
    assert schema["model.layers.0.self_attn.q_proj.weight"] == (10240, 5120)
    assert schema["model.layers.0.self_attn.k_proj.bias"] == (1024,)
    assert schema["model.layers.0.self_attn.o_proj.weight"] == (5120, 10240)
    assert "model.layers.0.self_attn.o_proj.bias" not in schema
    assert not any(n.startswith("model.layers.0.mlp.") and n.endswith(".bias") for n in schema)
    assert sum(_numel(s) for s in schema.values()) == _params(SEED_OSS_36B)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def test_megatron_args_are_qwen2s_with_kv_channels_and_zero_dropouts():
    args = megatron_args(SEED_OSS_36B)
    tc = args.transformer_config
    assert (tc["add_qkv_bias"], tc["add_bias_linear"], tc["qk_layernorm"]) == (True, False, False)
    assert (tc["kv_channels"], tc["num_query_groups"], tc["num_attention_heads"]) == (128, 8, 80)
    # Parity, not training: the HF config's 0.1 dropouts are not carried, and the notes say so.
    assert (tc["attention_dropout"], tc["hidden_dropout"]) == (0.0, 0.0)
    assert any("attention_dropout=0.1, residual_dropout=0.1 not carried" in n
               for n in args.notes)
    assert args.gpt_model["rotary_base"] == 1e7
    assert args.gpt_model["share_embeddings_and_output_weights"] is False


def test_a_config_without_dropouts_has_no_dropout_note():
    assert not any("dropout" in n for n in megatron_args(
        {**SEED_OSS_36B, "attention_dropout": 0.0, "residual_dropout": 0.0}).notes)


def test_attention_bias_false_is_llamas_rows():
    cfg = ModelConfig.from_hf({**SEED_OSS_36B, "attention_bias": False})
    assert not cfg.has_qkv_bias
    assert "model.layers.0.self_attn.q_proj.bias" not in cfg.schema()
    assert megatron_args(cfg).transformer_config["add_qkv_bias"] is False


@pytest.mark.parametrize(("flag", "message"), [
    ("attention_out_bias", "seed_oss with attention_out_bias=True \\(o_proj bias\\) is not "
                           "supported: Megatron has it only as add_bias_linear"),
    ("mlp_bias", "seed_oss with mlp_bias=True is not supported"),
])
def test_o_proj_and_mlp_biases_are_refused_by_name(flag, message):
    with pytest.raises(FormatError, match=message):
        ModelConfig.from_hf({**SEED_OSS_36B, flag: True})


def test_hf_config_from_megatron_keeps_the_qkv_biases():
    args = megatron_args(SEED_OSS_36B)
    back = hf_config_from_megatron({**args.transformer_config, **args.gpt_model},
                                   architecture="seed_oss", tied=False)
    assert back["architectures"] == ["SeedOssForCausalLM"]
    # attention_bias is the q/k/v bias here, not the generic "false" other families get.
    assert back["attention_bias"] is True
    again = ModelConfig.from_hf(back)
    assert again.schema() == ModelConfig.from_hf(SEED_OSS_36B).schema()


def test_the_36b_config_plans_without_weights(tmp_path):
    src = _write(tmp_path, SEED_OSS_36B)
    report = ckpt_ir.convert(src, tmp_path / "out", to="mcore-dist", dry_run=True)
    assert report.architecture == "seed_oss"
    # Per layer: two norms, fused QKV weight and bias, o_proj, fc1, fc2; plus embedding,
    # final norm, untied output layer.
    assert report.tensors_written == 64 * 7 + 3
    assert report.bytes_written >= 2 * _params(SEED_OSS_36B)  # bf16
    assert report.bytes_written < 2 * _params(SEED_OSS_36B) + GIB  # metadata, not weights
    assert not (tmp_path / "out").exists()


def test_the_cli_dry_run_plans_the_36b_config(tmp_path):
    src = _write(tmp_path, SEED_OSS_36B)
    dst = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", str(src), str(dst),
                        "--to", "mcore-dist", "--dry-run", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["architecture"] == "seed_oss"
    assert plan["tensors_written"] == 64 * 7 + 3
    assert not dst.exists()


def test_the_cli_refuses_an_o_proj_bias_in_one_line(tmp_path):
    src = _write(tmp_path, {**SEED_OSS_36B, "attention_out_bias": True})
    r = subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", str(src),
                        str(tmp_path / "out"), "--to", "mcore-dist", "--dry-run"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "attention_out_bias=True" in r.stderr
