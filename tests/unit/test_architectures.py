"""The architecture records and the table engine: one registry, records consulted by
ModelConfig / megatron_config / the tables, and an import order without cycles."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ckpt_ir.architectures import (
    ARCHITECTURES,
    MOE_NAMES,
    REGISTRY,
    TABLES,
    architecture,
    guess_from_megatron,
)
from ckpt_ir.errors import FormatError, InternalError, MissingConfigError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.megatron_config import hf_config_from_megatron, megatron_args
from ckpt_ir.table_engine import Row, one
from ckpt_ir.tables import NativeParams, build_table
from ckpt_ir.tables.lora import LORA_ROWS, row_style
from tests.clients.qwen_vl_models import config_dict as vl_config
from tests.clients.vl_passthrough_models import config_dict as passthrough_vl_config
from tests.unit.test_glm import TINY as GLM_TINY
from tests.unit.test_gpt_oss import TINY as GPT_OSS_TINY
from tests.unit.test_moe import TINY
from tests.unit.test_qwen3_next import TINY as QWEN3_NEXT_TINY

DENSE = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 40, "vocab_size": 50,
         "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 64,
         "rope_theta": 10000.0}


# Vision-language families: a text model's arguments do not describe their vision tower, so
# their Megatron round trip is the language model's (test_qwen_vl.py).
VL = tuple(n for n in ARCHITECTURES if REGISTRY[n].text_config is not None)


def _tiny(name: str) -> dict:
    if name in ("gemma3", "mistral3"):
        return passthrough_vl_config(name)
    if name in VL:
        return vl_config(name)
    tiny = {**TINY, **GLM_TINY, "gpt_oss": GPT_OSS_TINY, "qwen3_next": QWEN3_NEXT_TINY}
    return dict(tiny[name]) if name in tiny else {**DENSE, "model_type": name}


def test_the_registry_is_the_one_list_of_architectures():
    assert ARCHITECTURES == tuple(REGISTRY) == tuple(TABLES)
    assert set(ARCHITECTURES) == {"llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe",
                                  "qwen3_moe", "deepseek_v3", "seed_oss", "glm4_moe",
                                  "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa", "gpt_oss",
                                  "qwen3_next", "phi3", "olmo2", "gemma2",
                                  "gemma3_text", "ministral3", "qwen2_5_vl", "qwen3_vl",
                                  "qwen3_vl_moe", "gemma3", "mistral3"}
    for name, record in REGISTRY.items():
        assert record.name == name
        assert "mcore" in record.tables
        # An MoE family names its expert tensors and has the fused-experts hf variant.
        assert (name in MOE_NAMES) == record.is_moe
        # hf rows: the fused-experts variant of an MoE family, Qwen3-VL's model.language_model.,
        # Gemma 3's / Mistral 3's language_model.model.
        assert ("hf" in record.tables) == (record.is_moe
                                           or name in ("qwen3_vl", "gemma3", "mistral3"))
    # Families that differ only by row conditions share one tuple (the doc says "same rows").
    assert REGISTRY["mistral"].tables["mcore"] is REGISTRY["llama"].tables["mcore"]
    assert "verl-native" not in REGISTRY["qwen3"].tables


def test_an_unknown_architecture_names_the_registered_ones():
    with pytest.raises(FormatError, match="unsupported architecture 'gemma4'; supported: llama, "
                                          "mistral, qwen2, qwen3, mixtral"):
        ModelConfig.from_hf({**DENSE, "model_type": "gemma4"})
    with pytest.raises(FormatError, match="unsupported architecture"):
        architecture(["llama"])


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in VL])
def test_each_record_reads_its_config_and_names_its_class(name):
    cfg = ModelConfig.from_hf(_tiny(name))
    record = REGISTRY[name]
    assert cfg.architecture == name
    assert cfg.has_qk_norm == record.has_qk_norm(cfg.hf)
    assert cfg.moe_names == record.moe
    assert cfg.as_value_model().hf["architectures"] == [f"{record.hf_class}"
                                                        "ForTokenClassification"]
    # Megatron arguments and back: the record's class name, its MoE fields, the same model.
    args = megatron_args(cfg)
    if not record.megatron_args_suffice:
        # Gemma: softcaps, embedding scale, local RoPE base live in the HF config only.
        with pytest.raises(MissingConfigError, match="pass the model's HF config"):
            hf_config_from_megatron({**args.transformer_config, **args.gpt_model},
                                    architecture=name, tied=cfg.tie_word_embeddings)
        return
    back = hf_config_from_megatron({**args.transformer_config, **args.gpt_model,
                                    **args.config_attributes},
                                   architecture=name, tied=cfg.tie_word_embeddings)
    assert back["architectures"] == [record.causal_lm_class]
    again = ModelConfig.from_hf(back)
    assert again.schema() == cfg.schema()
    assert (again.num_experts, again.moe_layers, again.shared_expert_intermediate_size,
            again.has_qkv_bias) == (cfg.num_experts, cfg.moe_layers,
                                    cfg.shared_expert_intermediate_size, cfg.has_qkv_bias)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_record_maps_its_whole_schema(name):
    cfg = ModelConfig.from_hf(_tiny(name))
    table = build_table("mcore", cfg, NativeParams())
    assert set(table.by_ir) == set(cfg.schema())


def test_a_partial_row_needs_a_factory_and_a_layer():
    with pytest.raises(InternalError, match="partial row"):
        Row("decoder.final_layernorm.weight", one("model.norm.weight"),
            lambda c, p, ir: None, partial=True)  # type: ignore[arg-type,return-value]
    with pytest.raises(InternalError, match="partial row"):
        Row("decoder.layers.{layer}.x", one("model.layers.{layer}.x"), partial=True)


def test_lora_rows_are_engine_rows_with_a_style_feature():
    styles = {row_style(r) for r in LORA_ROWS}
    assert styles == {"fused", "canonical", None}
    assert all(isinstance(r, Row) and r.partial for r in LORA_ROWS)


def test_records_and_the_engine_import_without_ir():
    """ir.py imports the records, so neither they nor the engine may import ir.py back."""
    code = ("import sys, ckpt_ir.architectures, ckpt_ir.table_engine; "
            "bad = sorted(m for m in ('ckpt_ir.ir', 'ckpt_ir.tables', 'ckpt_ir.adapters') "
            "if m in sys.modules); print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(("flags", "moe", "want"), [
    ({}, False, "llama"),
    ({"add_qkv_bias": True}, False, "qwen2"),
    ({"add_qkv_bias": True, "qk_layernorm": True}, False, "qwen3"),
    ({}, True, "mixtral"),
    ({"qk_layernorm": True}, True, "qwen3_moe"),
    ({"qk_layernorm": True, "moe_shared_expert_intermediate_size": 24}, True, "qwen2_moe"),
    ({"multi_latent_attention": True, "moe_shared_expert_intermediate_size": 24}, True,
     "deepseek_v3"),
])
def test_the_records_guess_the_family_of_bare_megatron_arguments(flags, moe, want):
    assert guess_from_megatron(flags, moe=moe) == want
