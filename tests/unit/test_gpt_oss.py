"""gpt_oss (gpt-oss-20b / 120b), bf16 layout: the published configs read and plan (--dry-run)
without weights, megatron_args carries every gpt-oss setting, and configs or tensors that
contradict the family are refused in one line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckpt_ir
from ckpt_ir.errors import CheckpointError, FormatError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.megatron_config import hf_config_from_megatron, megatron_args
from ckpt_ir.tables import build_table

GIB = 2**30

# openai/gpt-oss-20b config.json as the hub serves it (transformers 4.55: rope_scaling and
# rope_theta), from /work/shared/reference/architectures-wave2.md section 4.1, without the
# MXFP4 ``quantization_config`` of the original release: the bf16 layout this record reads
# (as in unsloth/gpt-oss-20b-BF16). The published parameter counts (20.91e9, 116.83e9) are
# checked below.
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn",
                     "truncate": False},
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 201088,
}
# gpt-oss-120b: 36 layers of 128 experts, everything else as 20b (the reference marks the two
# numbers UNCONFIRMED; the parameter count they give is the published 116.83e9).
GPT_OSS_120B = {**GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128,
                "layer_types": ["sliding_attention", "full_attention"] * 18}
RELEASES = {"20b": (GPT_OSS_20B, 20_914_757_184), "120b": (GPT_OSS_120B, 116_829_156_672)}


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _write(tmp_path: Path, config: dict, name: str = "gpt-oss") -> Path:
    src = tmp_path / name
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    return src


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("size", RELEASES)
def test_the_published_configs_read_as_gpt_oss_with_the_published_parameter_count(size):
    config, params = RELEASES[size]
    cfg = ModelConfig.from_hf(config)
    assert (cfg.architecture, cfg.has_qkv_bias, cfg.tie_word_embeddings) == \
        ("gpt_oss", True, False)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == \
        (config["num_local_experts"], 4, 2880)
    assert cfg.has_expert_biases
    schema = cfg.schema()
    assert sum(_numel(s) for s in schema.values()) == params
    p = "model.layers.0."
    assert schema[p + "self_attn.sinks"] == (64,)
    assert schema[p + "self_attn.o_proj.bias"] == (2880,)
    assert schema[p + "mlp.router.bias"] == (config["num_local_experts"],)
    assert schema[p + "mlp.experts.0.gate_proj.bias"] == (2880,)
    # The HF naming holds the fused, input-major tensors transformers saves.
    hf = {b.native: b for b in build_table("hf", cfg).bindings}
    e = config["num_local_experts"]
    shapes = {n: hf[n].transform.shapes({r: schema[i] for r, i in hf[n].ir.items()})
              for n in (p + "mlp.experts.gate_up_proj", p + "mlp.experts.gate_up_proj_bias",
                        p + "mlp.experts.down_proj", p + "mlp.experts.down_proj_bias")}
    assert list(shapes.values()) == [(e, 2880, 5760), (e, 5760), (e, 2880, 2880), (e, 2880)]


@pytest.mark.parametrize("size", RELEASES)
def test_the_published_configs_plan_without_weights(tmp_path, size):
    config, params = RELEASES[size]
    src = _write(tmp_path, config)
    report = ckpt_ir.convert(src, tmp_path / "out", to="mcore-dist", dry_run=True)
    assert report.architecture == "gpt_oss"
    # Per layer: two norms, QKV weight and bias, linear_proj weight and bias, softmax_offset,
    # router weight and bias, and per expert fc1 / fc2 weights and biases; plus embedding,
    # final norm and the untied output layer.
    layers, experts = config["num_hidden_layers"], config["num_local_experts"]
    assert report.tensors_written == layers * (9 + 4 * experts) + 3
    assert 2 * params <= report.bytes_written < 2 * params + GIB  # bf16
    assert not (tmp_path / "out").exists()


def test_the_cli_dry_run_plans_the_120b_config_to_hf(tmp_path):
    src = _write(tmp_path, GPT_OSS_120B)
    dst = tmp_path / "out"
    r = _cli(str(src), str(dst), "--to", "hf", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["architecture"] == "gpt_oss"
    # Per layer: 4 attention weights, 4 biases, sinks, two norms, router weight and bias, and
    # the four fused expert tensors; plus embedding, final norm and lm_head.
    assert plan["tensors_written"] == 36 * 17 + 3
    assert not dst.exists()


def test_megatron_args_carry_every_gpt_oss_setting():
    args = megatron_args(GPT_OSS_20B)
    tc = args.transformer_config
    assert (tc["add_qkv_bias"], tc["add_bias_linear"]) == (True, True)
    assert (tc["num_attention_heads"], tc["num_query_groups"], tc["kv_channels"]) == (64, 8, 64)
    assert (tc["num_moe_experts"], tc["moe_router_topk"], tc["moe_ffn_hidden_size"]) == \
        (32, 4, 2880)
    assert "moe_router_pre_softmax" not in tc  # top-k of the logits, then softmax
    assert tc["softmax_type"] == "learnable"
    assert (tc["activation_func_clamp_value"], tc["glu_linear_offset"]) == (7.0, 1.0)
    assert args.activation == "quick_gelu"
    # HF window 128 (q - k < 128) is megatron-core's (127, 0); 1-indexed even layers are full.
    assert (tc["window_size"], tc["window_attn_skip_freq"]) == ((127, 0), 2)
    assert tc["layernorm_epsilon"] == 1e-5
    assert args.gpt_model["position_embedding_type"] == "yarn"
    assert args.gpt_model["rotary_base"] == 150000.0
    assert args.config_attributes == {
        "yarn_rotary_scaling_factor": 32.0, "yarn_original_max_position_embeddings": 4096,
        "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_mscale": None,
        "yarn_mscale_all_dim": None, "yarn_correction_range_round_to_int": False}
    assert not any("yarn" in n for n in args.notes)


def test_layer_types_other_than_the_alternation_become_megatron_core_s_list():
    types = ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 20
    tc = megatron_args({**GPT_OSS_20B, "layer_types": types}).transformer_config
    assert tc["window_attn_skip_freq"] == [int(t == "sliding_attention") for t in types]
    full = megatron_args({**GPT_OSS_20B, "layer_types": ["full_attention"] * 24})
    assert "window_size" not in full.transformer_config


@pytest.mark.parametrize(("change", "message"), [
    ({"attention_bias": False}, "gpt_oss with attention_bias=False is not supported"),
    ({"swiglu_alpha": 1.5}, "swiglu_alpha=1.5 is not supported: megatron-core's quick_gelu"),
    ({"swiglu_limit": "7"}, "swiglu_limit must be a finite number"),
    ({"swiglu_limit": -1.0}, "swiglu_limit must be positive"),
    ({"layer_types": ["full_attention"] * 23}, "layer_types must list"),
    ({"layer_types": ["chunked_attention"] * 24}, "layer_types must list"),
    ({"sliding_window": 0}, "sliding_window must be a positive integer"),
    ({"sliding_window": None}, "sliding_window must be a positive integer"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "YaRN factor must be a positive number"),
    ({"rope_scaling": {**GPT_OSS_20B["rope_scaling"], "beta_fast": "32"}},
     "YaRN beta_fast must be a positive number"),
    ({"rope_scaling": {**GPT_OSS_20B["rope_scaling"], "original_max_position_embeddings": 4e3}},
     "original_max_position_embeddings must be a positive integer"),
])
def test_contradicting_configs_are_refused_by_name(change, message):
    with pytest.raises(FormatError, match=message):
        ModelConfig.from_hf({**GPT_OSS_20B, **change})


def test_the_cli_refuses_a_contradicting_config_in_one_line(tmp_path):
    src = _write(tmp_path, {**GPT_OSS_20B, "swiglu_alpha": 1.0})
    r = _cli(str(src), str(tmp_path / "out"), "--to", "mcore-dist", "--dry-run")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "swiglu_alpha=1.0" in r.stderr


# A tiny gpt-oss written from ckpt-ir's own hf table (the real-client tests prove that layout
# against transformers): F = 48 != H = 64, so an orientation error changes shapes.
TINY = {**GPT_OSS_20B, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 301,
        "num_local_experts": 4, "num_experts_per_tok": 2, "experts_per_token": 2,
        "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
        "torch_dtype": "float32"}


def _tiny_checkpoint(tmp_path: Path, config: dict,
                     swap: dict[str, tuple[int, ...]] | None = None) -> Path:
    swap = swap or {}
    cfg = ModelConfig.from_hf(config)
    schema = cfg.schema()
    tensors = {}
    for b in build_table("hf", cfg).bindings:
        shape = swap.get(b.native) or b.transform.shapes({r: schema[n] for r, n in b.ir.items()})
        tensors[b.native] = torch.zeros(shape)
    src = _write(tmp_path, config, "tiny")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


def test_a_down_proj_stored_output_major_is_refused_in_one_line(tmp_path):
    # [E, H, F] is the MXFP4 blocks' orientation, and what Megatron-Bridge wrote by mistake
    # (MB #3743); the bf16 layout is [E, F, H]. Refused before anything is written.
    src = _tiny_checkpoint(tmp_path, TINY, {"model.layers.1.mlp.experts.down_proj": (4, 64, 48)})
    dst = tmp_path / "out"
    r = _cli(str(src), str(dst), "--to", "mcore-dist")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "model.layers.1.mlp.experts.down_proj" in r.stderr
    assert not dst.exists()


def test_a_config_whose_expert_size_contradicts_the_tensors_is_refused(tmp_path):
    src = _tiny_checkpoint(tmp_path, TINY)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 32}))
    r = _cli(str(src), str(tmp_path / "out"), "--to", "mcore-dist")
    assert r.returncode == 2, r.stderr
    # Every fused expert tensor of both layers disagrees: the plan error names the first and
    # lists the others ("also: ...").
    first, *rest = r.stderr.splitlines()
    assert first.startswith("ckpt-ir: error: source tensor model.layers.0.mlp.experts.")
    assert "but the config implies" in first
    assert all(line.startswith("ckpt-ir:") for line in rest)
    assert not (tmp_path / "out").exists()


def test_per_rank_files_with_expert_tp_are_refused(tmp_path):
    # megatron-core 0.16.1: "Bias in Moe is only supported when ETP==1": --tp 2 alone gives
    # expert TP 1 (whole experts in every TP rank's file); asking for expert TP 2 is refused.
    src = _tiny_checkpoint(tmp_path, TINY)
    ok = _cli(str(src), str(tmp_path / "etp1"), "--to", "verl-legacy", "--tp", "2",
              "--pad-vocab-to-multiple", "128")
    assert ok.returncode == 0, ok.stderr
    record = json.loads((tmp_path / "etp1" / "model" / "ckpt_ir_layout.json").read_text())
    assert (record["tp"], record["etp"]) == (2, 1)
    dst = tmp_path / "out"
    r = _cli(str(src), str(dst), "--to", "verl-legacy", "--tp", "2", "--etp", "2",
             "--pad-vocab-to-multiple", "128")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1
    assert "gpt_oss's experts have biases" in r.stderr and "expert TP 1" in r.stderr
    assert not dst.exists()


def test_megatron_arguments_named_gpt_oss_read_back_as_the_published_config():
    # Megatron-Bridge's GPT-OSS provider records these fields, yarn_* included.
    args = megatron_args(GPT_OSS_20B)
    fields = {**args.transformer_config, **args.gpt_model, **args.config_attributes}
    back = hf_config_from_megatron(fields, architecture="gpt_oss", tied=False)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                "num_local_experts", "num_experts_per_tok", "attention_bias", "layer_types",
                "sliding_window", "swiglu_limit", "rms_norm_eps", "max_position_embeddings"):
        assert back[key] == GPT_OSS_20B[key], key
    assert back["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 150000.0,
                                       **GPT_OSS_20B["rope_scaling"]}
    assert megatron_args(back).transformer_config == args.transformer_config


@pytest.mark.parametrize(("drop", "message"), [
    ("softmax_type", "softmax_type='learnable'"),
    ("activation_func_clamp_value", "the clamped SwiGLU"),
    ("yarn_rotary_scaling_factor", "carry no yarn_rotary_scaling_factor"),
])
def test_megatron_arguments_missing_a_gpt_oss_setting_are_refused(drop, message):
    args = megatron_args(GPT_OSS_20B)
    fields = {**args.transformer_config, **args.gpt_model, **args.config_attributes}
    fields.pop(drop)
    with pytest.raises(CheckpointError, match=message):
        hf_config_from_megatron(fields, architecture="gpt_oss", tied=False)


def test_bare_megatron_arguments_with_linear_biases_name_no_family():
    args = megatron_args(GPT_OSS_20B)
    with pytest.raises(FormatError, match="add_bias_linear=True have no HF equivalent"):
        hf_config_from_megatron({**args.transformer_config, **args.gpt_model}, tied=False)


def test_an_hf_peft_adapter_naming_gpt_oss_experts_as_modules_is_not_written(tmp_path):
    # What an adapter created from Megatron LoRA alone would say (AdapterConfig.create);
    # peft on gpt-oss has no per-expert modules, so it could not load such a file.
    from ckpt_ir.adapters import AdapterConfig
    from ckpt_ir.converters.hf_peft import HfPeftWriter
    from ckpt_ir.options import AdapterTarget, WriteOptions

    base = ModelConfig.from_hf(TINY)
    adapter = AdapterConfig.create(base, r=2, lora_alpha=4, leaves=["q_proj", "gate_proj",
                                                                     "up_proj"])
    with pytest.raises(FormatError, match="must target their fused parameters"):
        HfPeftWriter(tmp_path / "out", base, WriteOptions(adapter=AdapterTarget(adapter)))
    attention = AdapterConfig.create(base, r=2, lora_alpha=4, leaves=["q_proj", "o_proj"])
    HfPeftWriter(tmp_path / "out", base, WriteOptions(adapter=AdapterTarget(attention)))
