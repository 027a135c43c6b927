"""HF config <-> Megatron arguments: both directions agree on every model-defining field."""

from __future__ import annotations

import pytest
from hypothesis import given

from ckpt_ir.errors import FormatError, MissingConfigError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.megatron_config import (
    hf_config_from_megatron,
    megatron_args,
    missing_fields,
    padded_vocab_size,
)
from tests.strategies import dense_configs


@given(dense_configs())
def test_megatron_args_and_back_preserve_the_model(hf):
    args = megatron_args(hf)
    flat = {**args.transformer_config, **args.gpt_model}
    back = ModelConfig.from_hf(hf_config_from_megatron(flat, vocab_size=hf["vocab_size"],
                                                       architecture=hf["model_type"]))
    want = ModelConfig.from_hf(hf)
    for field in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings",
                  "has_qkv_bias", "has_qk_norm"):
        assert getattr(back, field) == getattr(want, field), field


def test_architecture_is_inferred_from_megatron_features():
    base = {"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "ffn_hidden_size": 16,
            "padded_vocab_size": 32, "share_embeddings_and_output_weights": False}
    assert hf_config_from_megatron(base)["model_type"] == "llama"
    assert hf_config_from_megatron({**base, "add_qkv_bias": True})["model_type"] == "qwen2"
    assert hf_config_from_megatron({**base, "qk_layernorm": True})["model_type"] == "qwen3"


def test_megatron_lm_args_untie_and_group_query_attention():
    args = {"num_layers": 2, "hidden_size": 8, "num_attention_heads": 4, "ffn_hidden_size": 16,
            "vocab_size": 30, "untie_embeddings_and_output_weights": False,
            "group_query_attention": False, "num_query_groups": 2, "norm_epsilon": 1e-5}
    hf = hf_config_from_megatron(args)
    assert hf["tie_word_embeddings"] is True
    assert hf["num_key_value_heads"] == 4  # GQA off: num_query_groups is ignored
    assert hf["rms_norm_eps"] == 1e-5


def test_padding_and_rope_scaling():
    assert padded_vocab_size(301, 128) == 384
    assert padded_vocab_size(256, 128) == 256
    assert padded_vocab_size(301, None) == 301
    hf = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 8,
          "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 301,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    args = megatron_args(hf, pad_vocab_to_multiple=128)
    assert args.gpt_model["vocab_size"] == 384
    assert args.gpt_model["rotary_base"] == 5e5
    assert args.gpt_model["rope_scaling"] is True and args.gpt_model["rope_scaling_factor"] == 8


def test_unrepresentable_models_are_refused():
    base = {"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "ffn_hidden_size": 16,
            "vocab_size": 32, "share_embeddings_and_output_weights": False}
    with pytest.raises(FormatError, match="add_bias_linear"):
        hf_config_from_megatron({**base, "add_bias_linear": True})
    with pytest.raises(FormatError, match="normalization 'LayerNorm'"):
        hf_config_from_megatron({**base, "normalization": "LayerNorm"})
    with pytest.raises(MissingConfigError, match="vocabulary size"):
        hf_config_from_megatron({k: v for k, v in base.items() if k != "vocab_size"})


def test_values_the_arguments_do_not_hold_are_left_out_not_guessed():
    # verl's transformer_config.json: a TransformerConfig, which has no rotary base, no
    # sequence length and no tying flag.
    tc = {"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "ffn_hidden_size": 16,
          "layernorm_epsilon": 1e-6, "add_qkv_bias": True}
    with pytest.raises(MissingConfigError, match="tied to the output layer"):
        hf_config_from_megatron(tc, vocab_size=32)
    hf = hf_config_from_megatron(tc, vocab_size=32, tied=True)
    assert hf["tie_word_embeddings"] is True and hf["model_type"] == "qwen2"
    assert "max_position_embeddings" not in hf and "rope_theta" not in hf["rope_parameters"]
    assert missing_fields(hf) == ["max_position_embeddings", "rope_theta"]
    # What the arguments say wins over the checkpoint's hint; present values are kept.
    hf = hf_config_from_megatron({**tc, "share_embeddings_and_output_weights": False,
                                  "rotary_base": 1e6, "seq_length": 256}, vocab_size=32,
                                 tied=True)
    assert hf["tie_word_embeddings"] is False
    assert (hf["rope_parameters"]["rope_theta"], hf["max_position_embeddings"]) == (1e6, 256)
    assert missing_fields(hf) == []
