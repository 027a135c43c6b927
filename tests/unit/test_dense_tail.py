"""The dense long tail (issue #16): phi3, olmo2, gemma2, gemma3_text.

- The published configs (numbers from /work/shared/reference/architectures-wave2.md sections
  6.1, 7.1, 7.2; no hub access here) read, count the published parameters, and plan
  (``--dry-run``) without weights; so do the published Gemma-3-4B and Ministral-3-3B VL
  configs, tower and projector included.
- Every Megatron name, shape, transform and TP partition of one layer is pinned: megatron-core
  0.16.1 cannot build OLMo 2 or Gemma on CPU (reference section 10), so this table is the
  check that ckpt-ir's names are the ones Megatron-Bridge uses (Gemma) or documents (OLMo 2's
  Gemma-named post-norms, the phi3 QKV interleave).
- ``megatron_args`` carries what megatron-core can express and names what it cannot.
- Bad input: a fused ``qkv_proj`` whose rows do not split by the head counts is refused in
  one line, exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt_ir
from ckpt_ir.errors import FormatError, MissingConfigError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.megatron_config import hf_config_from_megatron, megatron_args
from ckpt_ir.tables import build_table

GIB = 2**30
REPO = Path(__file__).resolve().parents[2]


def _longrope(pairs: int, short: list[float], long: list[float]) -> dict:
    assert len(short) == len(long) == pairs
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
            "long_factor": long}


# microsoft/Phi-3.5-mini-instruct (reference 7.1): MHA 32:32, d 128, untied, LongRoPE with 48
# factors per list (short 1.0 .. 2.84 there; the values here are placeholders of that range,
# UNCONFIRMED: no tensor depends on them).
PHI3_5_MINI = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
    "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_dropout": 0.0,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "bos_token_id": 1, "eos_token_id": 32000,
    "pad_token_id": 32000, "sliding_window": 262144, "dtype": "bfloat16",
    "rope_parameters": _longrope(48, [1.0 + 1.84 * i / 47 for i in range(48)],
                                 [1.0 + 0.5 * i for i in range(48)]),
}
# microsoft/Phi-4-mini-instruct (reference 7.1): GQA 24:8, d 128, partial rotary 0.75 (96
# rotary dims, 48 factors; the short ones all 1.0), tied.
PHI4_MINI = {
    **PHI3_5_MINI, "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
    "tie_word_embeddings": True, "bos_token_id": 199999, "eos_token_id": 199999,
    "pad_token_id": 199999, "sliding_window": None,
    "rope_parameters": {**_longrope(48, [1.0] * 48, [1.0 + 0.6 * i for i in range(48)]),
                        "partial_rotary_factor": 0.75},
}
# allenai/OLMo-2-1124-7B (reference 7.2).
OLMO2_7B = {
    "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 100352,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "attention_dropout": 0.0, "pad_token_id": 100277,
    "eos_token_id": 100257, "dtype": "float32",
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
}

# google/gemma-2-9b (reference 6.1): head_dim 256 != 3584 / 16, softcaps, alternating
# sliding window, tied.
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
    "vocab_size": 256000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0, "rope_theta": 10000.0, "attention_bias": False,
    "attention_dropout": 0.0, "tie_word_embeddings": True, "pad_token_id": 0,
    "eos_token_id": 1, "bos_token_id": 2, "dtype": "float32",
}
# google/gemma-3-1b-pt (reference 6.1), as the hub writes it (transformers 4.x fields: global
# rope_theta, rope_local_base_freq, sliding_window_pattern 6): MQA, q/k norms, tied.
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
    "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "rope_scaling": None, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "attention_bias": False, "tie_word_embeddings": True,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "dtype": "bfloat16",
}
# mistralai/Ministral-3-3B-*-2512 (reference 7.4): the language model (``text_config`` of the
# mistral3 checkpoint): GQA 32:8, head_dim 128, YaRN with the Llama-4 query temperature, tied.
# 3.43e9 is the language model's count from these sizes (the published 3B adds the Pixtral
# tower and projector: MINISTRAL3_3B_VL below).
MINISTRAL3_3B = {
    "architectures": ["Ministral3ForCausalLM"], "model_type": "ministral3", "hidden_act": "silu",
    "hidden_size": 3072, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
    "max_position_embeddings": 262144, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "sliding_window": None, "dtype": "bfloat16",
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                        "original_max_position_embeddings": 16384, "beta_fast": 32.0,
                        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                        "llama_4_scaling_beta": 0.1},
}
# google/gemma-3-4b-pt's language model (its ``text_config``, reference 6.1): GQA 8:4, q/k
# norms, a linear RoPE factor 8 on the global layers, sliding window 1024. 3.88e9 from these
# sizes (the published 4.3B adds the SigLIP tower and projector: GEMMA3_4B_VL below).
GEMMA3_4B = {
    **GEMMA3_1B, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
    "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 262208,
    "max_position_embeddings": 131072, "sliding_window": 1024,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
}

# name -> (config, published parameter count, tensors per layer in Megatron, other tensors)
PUBLISHED = {
    "Phi-3.5-mini": (PHI3_5_MINI, 3_821_079_552, 6, 3),
    "Phi-4-mini": (PHI4_MINI, 3_836_021_760, 6, 2),
    "OLMo-2-7B": (OLMO2_7B, 7_298_617_344, 8, 3),
    "Gemma-2-9B": (GEMMA2_9B, 9_241_705_984, 8, 2),
    "Gemma-3-1B": (GEMMA3_1B, 999_885_952, 10, 2),
    "Gemma-3-4B (language model)": (GEMMA3_4B, 3_880_263_168, 10, 2),
    "Ministral-3-3B (language model)": (MINISTRAL3_3B, 3_429_006_336, 6, 2),
}


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _write(tmp_path: Path, config: dict) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("name", PUBLISHED)
def test_the_published_config_counts_the_published_parameters(name):
    config, params, _, _ = PUBLISHED[name]
    schema = ModelConfig.from_hf(config).schema()
    assert sum(_numel(s) for s in schema.values()) == params


@pytest.mark.parametrize("name", PUBLISHED)
def test_the_published_config_plans_without_weights(name, tmp_path):
    config, params, per_layer, other = PUBLISHED[name]
    src = _write(tmp_path, config)
    report = ckpt_ir.convert(src, tmp_path / "out", to="mcore-dist", dry_run=True)
    assert report.architecture == config["model_type"]
    assert report.tensors_written == config["num_hidden_layers"] * per_layer + other
    width = 4 if config["dtype"] == "float32" else 2
    assert width * params <= report.bytes_written < width * params + GIB
    assert not (tmp_path / "out").exists()


def test_the_cli_dry_run_plans_phi4_mini_at_tp2_pp2(tmp_path):
    src = _write(tmp_path, PHI4_MINI)
    r = subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", str(src),
                        str(tmp_path / "out"), "--to", "megatron-legacy", "--tp", "2", "--pp",
                        "2", "--dry-run", "--json"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["architecture"] == "phi3"
    assert not (tmp_path / "out").exists()


def _layer0(config: dict) -> dict[str, tuple[dict[str, str], str, str, tuple[int, ...]]]:
    """native -> (IR parts, transform, TP partition, native shape) of layer 0 and the rest."""
    cfg = ModelConfig.from_hf(config)
    schema = cfg.schema()
    out = {}
    for b in build_table("mcore", cfg).bindings:
        if b.layer in (None, 0):
            shape = b.transform.shapes({r: schema[n] for r, n in b.ir.items()})
            out[b.native] = (dict(b.ir), b.transform.describe(), b.partition.value, shape)
    return out


L0, H0 = "decoder.layers.0.", "model.layers.0."


def test_phi3_rows_split_the_fused_qkv_then_interleave_and_keep_gate_up():
    rows = _layer0(PHI4_MINI)
    assert rows == {
        "embedding.word_embeddings.weight": (
            {"tensor": "model.embed_tokens.weight"}, "PadRows(200064 -> 200064)", "vocab",
            (200064, 3072)),
        L0 + "self_attention.linear_qkv.layer_norm_weight": (
            {"tensor": H0 + "input_layernorm.weight"}, "Identity", "replicated", (3072,)),
        # [nh*d + 2*G*d, H] = [(24 + 16) * 128, 3072], 8 groups of 3 q heads.
        L0 + "self_attention.linear_qkv.weight": (
            {"tensor": H0 + "self_attn.qkv_proj.weight"},
            "InterleaveFusedQKV(groups=8, heads/group=3, head_dim=128)", "qkv", (5120, 3072)),
        L0 + "self_attention.linear_proj.weight": (
            {"tensor": H0 + "self_attn.o_proj.weight"}, "Identity", "row", (3072, 3072)),
        L0 + "mlp.linear_fc1.layer_norm_weight": (
            {"tensor": H0 + "post_attention_layernorm.weight"}, "Identity", "replicated",
            (3072,)),
        # Already [gate; up]: the identity globally, [gate_t; up_t] per TP rank.
        L0 + "mlp.linear_fc1.weight": (
            {"tensor": H0 + "mlp.gate_up_proj.weight"}, "Identity", "swiglu", (16384, 3072)),
        L0 + "mlp.linear_fc2.weight": (
            {"tensor": H0 + "mlp.down_proj.weight"}, "Identity", "row", (3072, 8192)),
        "decoder.final_layernorm.weight": (
            {"tensor": "model.norm.weight"}, "Identity", "replicated", (3072,)),
    }


def test_olmo2_rows_are_post_norms_and_full_width_qk_norms():
    # OLMo-2-32B's GQA (40:8) makes q_norm and k_norm differ in width.
    config = {**OLMO2_7B, "hidden_size": 5120, "num_attention_heads": 40,
              "num_key_value_heads": 8, "intermediate_size": 27648, "num_hidden_layers": 64}
    rows = _layer0(config)
    assert rows == {
        "embedding.word_embeddings.weight": (
            {"tensor": "model.embed_tokens.weight"}, "PadRows(100352 -> 100352)", "vocab",
            (100352, 5120)),
        L0 + "self_attention.linear_qkv.weight": (
            {"q": H0 + "self_attn.q_proj.weight", "k": H0 + "self_attn.k_proj.weight",
             "v": H0 + "self_attn.v_proj.weight"},
            "InterleaveQKV(groups=8, heads/group=5, head_dim=128)", "qkv", (7168, 5120)),
        L0 + "self_attention.q_layernorm.weight": (
            {"tensor": H0 + "self_attn.q_norm.weight"}, "Identity", "replicated", (5120,)),
        L0 + "self_attention.k_layernorm.weight": (
            {"tensor": H0 + "self_attn.k_norm.weight"}, "Identity", "replicated", (1024,)),
        L0 + "self_attention.linear_proj.weight": (
            {"tensor": H0 + "self_attn.o_proj.weight"}, "Identity", "row", (5120, 5120)),
        L0 + "self_attention.linear_proj.post_layernorm.weight": (
            {"tensor": H0 + "post_attention_layernorm.weight"}, "Identity", "replicated",
            (5120,)),
        L0 + "mlp.linear_fc1.weight": (
            {"gate": H0 + "mlp.gate_proj.weight", "up": H0 + "mlp.up_proj.weight"},
            "ConcatGateUp", "swiglu", (55296, 5120)),
        L0 + "mlp.linear_fc2.weight": (
            {"tensor": H0 + "mlp.down_proj.weight"}, "Identity", "row", (5120, 27648)),
        L0 + "mlp.linear_fc2.post_layernorm.weight": (
            {"tensor": H0 + "post_feedforward_layernorm.weight"}, "Identity", "replicated",
            (5120,)),
        "decoder.final_layernorm.weight": (
            {"tensor": "model.norm.weight"}, "Identity", "replicated", (5120,)),
        "output_layer.weight": (
            {"tensor": "lm_head.weight"}, "PadRows(100352 -> 100352)", "vocab", (100352, 5120)),
    }
    # No input or pre-MLP norm in any spelling.
    assert not any("layer_norm_weight" in n or "input_layernorm" in n or "pre_mlp" in n
                   for n in rows)


def test_phi3_megatron_args_carry_partial_rotary_and_name_longrope():
    args = megatron_args(PHI4_MINI)
    assert args.gpt_model["rotary_percent"] == 0.75
    assert args.transformer_config["num_query_groups"] == 8
    assert args.gpt_model["share_embeddings_and_output_weights"] is True
    assert any("LongRoPE" in n and "carried" in n for n in args.notes)
    assert megatron_args(PHI3_5_MINI).gpt_model["rotary_percent"] == 1.0


def test_olmo2_megatron_args_say_megatron_core_cannot_build_it():
    args = megatron_args(OLMO2_7B)
    assert any("olmo2: megatron-core 0.16.1 cannot build" in n for n in args.notes)
    # Named, the arguments describe the model; bare, qk_layernorm reads as qwen3.
    plain = {**args.transformer_config, **args.gpt_model}
    back = hf_config_from_megatron(plain, architecture="olmo2", tied=False)
    assert ModelConfig.from_hf(back).schema() == ModelConfig.from_hf(OLMO2_7B).schema()
    assert hf_config_from_megatron(plain, tied=False)["model_type"] == "qwen3"


def test_an_activation_the_family_does_not_have_is_refused_by_name():
    with pytest.raises(FormatError, match="hidden_act 'gelu' is not supported for phi3"):
        ModelConfig.from_hf({**PHI4_MINI, "hidden_act": "gelu"})


def test_a_qkv_proj_that_does_not_split_by_the_head_counts_exits_2_in_one_line(tmp_path):
    from tests.clients import dense_tail_models

    hf = dense_tail_models.make_model("phi3", tmp_path, num_hidden_layers=1)
    config = json.loads((hf / "config.json").read_text())
    # The tensors hold (4 + 2*2) heads of 16 rows; the config now says 4 + 2*1.
    (hf / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))
    r = subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", str(hf),
                        str(tmp_path / "out"), "--to", "mcore-dist"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert "model.layers.0.self_attn.qkv_proj.weight has shape [128, 64], but the config " \
           "implies [96, 64]" in r.stderr
    assert not (tmp_path / "out").exists()


def test_gemma_rows_are_megatron_bridges_four_norms_copied():
    rows = _layer0(GEMMA3_1B)
    norm = ("Identity", "replicated", (1152,))
    assert rows == {
        "embedding.word_embeddings.weight": (
            {"tensor": "model.embed_tokens.weight"}, "PadRows(262144 -> 262144)", "vocab",
            (262144, 1152)),
        L0 + "self_attention.linear_qkv.layer_norm_weight": (
            {"tensor": H0 + "input_layernorm.weight"}, *norm),
        L0 + "self_attention.linear_qkv.weight": (
            {"q": H0 + "self_attn.q_proj.weight", "k": H0 + "self_attn.k_proj.weight",
             "v": H0 + "self_attn.v_proj.weight"},
            "InterleaveQKV(groups=1, heads/group=4, head_dim=256)", "qkv", (1536, 1152)),
        L0 + "self_attention.q_layernorm.weight": (
            {"tensor": H0 + "self_attn.q_norm.weight"}, "Identity", "replicated", (256,)),
        L0 + "self_attention.k_layernorm.weight": (
            {"tensor": H0 + "self_attn.k_norm.weight"}, "Identity", "replicated", (256,)),
        L0 + "self_attention.linear_proj.weight": (
            {"tensor": H0 + "self_attn.o_proj.weight"}, "Identity", "row", (1152, 1024)),
        L0 + "self_attention.linear_proj.post_layernorm.weight": (
            {"tensor": H0 + "post_attention_layernorm.weight"}, *norm),
        L0 + "mlp.linear_fc1.layer_norm_weight": (
            {"tensor": H0 + "pre_feedforward_layernorm.weight"}, *norm),
        L0 + "mlp.linear_fc1.weight": (
            {"gate": H0 + "mlp.gate_proj.weight", "up": H0 + "mlp.up_proj.weight"},
            "ConcatGateUp", "swiglu", (13824, 1152)),
        L0 + "mlp.linear_fc2.weight": (
            {"tensor": H0 + "mlp.down_proj.weight"}, "Identity", "row", (1152, 6912)),
        L0 + "mlp.linear_fc2.post_layernorm.weight": (
            {"tensor": H0 + "post_feedforward_layernorm.weight"}, *norm),
        "decoder.final_layernorm.weight": ({"tensor": "model.norm.weight"}, *norm),
    }
    # Gemma 2 is the same rows without the q/k norms; both tied (no output layer).
    gemma2 = _layer0(GEMMA2_9B)
    assert {n for n in rows if "q_layernorm" not in n and "k_layernorm" not in n} == set(gemma2)


def test_gemma_local_spec_names_its_input_and_pre_mlp_norms():
    from ckpt_ir.tables import NativeParams

    cfg = ModelConfig.from_hf(GEMMA2_9B)
    names = set(build_table("mcore", cfg, NativeParams(norm_style="local")).by_native)
    assert {L0 + "input_layernorm.weight", L0 + "pre_mlp_layernorm.weight"} <= names
    assert L0 + "mlp.linear_fc1.layer_norm_weight" not in names


def test_gemma2_megatron_args_carry_what_megatron_core_has_and_name_the_rest():
    args = megatron_args(GEMMA2_9B)
    tc, gpt = args.transformer_config, args.gpt_model
    assert args.activation == "fast_gelu"
    assert tc["layernorm_zero_centered_gamma"] is True  # (1 + w) weights copied
    assert tc["softmax_scale"] == 256 ** -0.5
    assert tc["window_size"] == (4095, 0)
    assert tc["window_attn_skip_freq"] == [1, 0] * 21  # layer 0 sliding, alternating
    assert gpt["share_embeddings_and_output_weights"] is True
    note = next(n for n in args.notes if n.startswith("gemma2: megatron-core 0.16.1 cannot"))
    assert "logit softcapping (attention 50.0, final 30.0)" in note
    assert "sqrt(hidden_size) embedding scale" in note


def test_gemma3_megatron_args_take_the_global_rope_base_and_the_five_to_one_pattern():
    args = megatron_args(GEMMA3_1B)
    assert args.gpt_model["rotary_base"] == 1e6
    assert args.transformer_config["window_size"] == (511, 0)
    assert args.transformer_config["window_attn_skip_freq"] == ([1] * 5 + [0]) * 4 + [1, 1]
    assert any("local RoPE base 10000.0" in n for n in args.notes)
    # The hub's 4.x spelling of Gemma-3-4B: rope_scaling applies to the global layers.
    assert megatron_args(GEMMA3_4B).gpt_model["seq_len_interpolation_factor"] == 8.0
    # transformers 5's spelling: rope_parameters per layer type, a linear factor (4B+).
    five = {**GEMMA3_1B, "layer_types": ["sliding_attention"] * 25 + ["full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    args = megatron_args(five)
    assert args.gpt_model["rotary_base"] == 1e6
    assert args.gpt_model["seq_len_interpolation_factor"] == 8.0
    assert args.transformer_config["window_attn_skip_freq"] == [1] * 25 + [0]


@pytest.mark.parametrize("config", [GEMMA2_9B, GEMMA3_1B])
def test_gemma_from_megatron_arguments_alone_asks_for_the_hf_config(config):
    args = megatron_args(config)
    with pytest.raises(MissingConfigError, match="pass the model's HF config"):
        hf_config_from_megatron({**args.transformer_config, **args.gpt_model},
                                architecture=config["model_type"], tied=True)


def test_gemma_refuses_an_activation_it_does_not_have():
    with pytest.raises(FormatError, match="hidden_activation 'silu' is not supported for gemma2 "
                                          "\\(gelu_pytorch_tanh only\\)"):
        ModelConfig.from_hf({**GEMMA2_9B, "hidden_activation": "silu"})


def test_ministral3_megatron_args_are_llamas_and_name_yarn_and_the_temperature():
    args = megatron_args(MINISTRAL3_3B)
    assert args.activation == "silu"
    assert (args.transformer_config["kv_channels"], args.transformer_config["num_query_groups"]) \
        == (128, 8)
    assert args.gpt_model["rotary_base"] == 1e6
    assert any("ministral3 YaRN (factor=16.0, original_max_position_embeddings=16384" in n
               for n in args.notes)
    assert any("llama_4_scaling_beta=0.1" in n for n in args.notes)
    assert _layer0(MINISTRAL3_3B).keys() == _layer0({**MINISTRAL3_3B, "model_type": "llama"}
                                                    ).keys()


# The published VL checkpoints (reference 6.6, 7.4): the language models above under
# text_config (written out in full: the published text_config leaves most fields to
# transformers' defaults, which ckpt-ir does not apply), the towers' vision_config as published.
# google/gemma-3-4b-it: SigLIP so400m at 896 px (27 layers, hidden 1152, 16 heads, ffn 4304,
# patch 14: 64x64 positions), no pooling head; 4,300,079,472 parameters from these sizes (the
# published 4.3B).
GEMMA3_4B_VL = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
    "mm_tokens_per_image": 256, "dtype": "bfloat16",
    "text_config": {**GEMMA3_4B, "model_type": "gemma3_text"},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152,
                      "image_size": 896, "intermediate_size": 4304, "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}
# mistralai/Ministral-3-3B-*-2512: Pixtral (24 layers, hidden 1024, 16 heads of 64, ffn 4096,
# patch 14), 2x2 merger, bias-free projector. 420,083,712 tower + projector parameters from
# these sizes (reference 7.4 gives no published total) on the 3,429,006,336 above.
MINISTRAL3_3B_VL = {
    "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
    "image_token_index": 10, "spatial_merge_size": 2, "projector_hidden_act": "gelu",
    "multimodal_projector_bias": False, "vision_feature_layer": -1, "dtype": "bfloat16",
    "tie_word_embeddings": True, "text_config": MINISTRAL3_3B,
    "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "head_dim": 64,
                      "image_size": 1540, "patch_size": 14, "hidden_act": "silu",
                      "rope_theta": 10000.0},
}
# name -> (config, parameters, Megatron tensors: language model + tower + projector)
PUBLISHED_VL = {
    "Gemma-3-4B": (GEMMA3_4B_VL, 4_300_079_472, 34 * 10 + 2 + (3 + 27 * 16 + 2) + 2),
    "Ministral-3-3B": (MINISTRAL3_3B_VL, 3_429_006_336 + 420_083_712,
                       26 * 6 + 2 + (2 + 24 * 9) + 4),
}


@pytest.mark.parametrize("name", PUBLISHED_VL)
def test_the_published_vl_config_plans_the_whole_model(name, tmp_path):
    """--dry-run of the published VL configs plans the language model, the tower and the
    projector (they were refused until issue #16's VL part)."""
    config, params, tensors = PUBLISHED_VL[name]
    schema = ModelConfig.from_hf(config).schema()
    assert sum(_numel(s) for s in schema.values()) == params
    src = _write(tmp_path, config)
    r = subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", str(src),
                        str(tmp_path / "out"), "--to", "mcore-dist", "--dry-run", "--json"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["architecture"] == config["model_type"]
    assert plan["tensors_written"] == tensors
    assert 2 * params <= plan["bytes_written"] < 2 * params + GIB
    assert not (tmp_path / "out").exists()
