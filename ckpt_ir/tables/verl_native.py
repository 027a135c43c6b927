"""verl's era-A Megatron models (March-April 2025): HF names <-> verl-native per-rank names.

verl's own ``ParallelLlamaForCausalLMRmPadPP`` / ``ParallelQwen2ForCausalLMRmPadPP`` (before it
switched to megatron-core's GPTModel in PR #884) used HF-like names with two fused tensors:

* ``self_attn.qkv_proj``: plain ``[q; k; v]`` (``QKVParallelLinear``), *not* group-interleaved;
  TP rank ``t`` holds ``[q_t; k_t; v_t]`` (partition ``BLOCKS``);
* ``mlp.gate_up_proj``: ``[gate; up]``; TP rank ``t`` holds ``[gate_t; up_t]`` (``SWIGLU``).

Facts: /work/shared/reference/verl-formats.md §3.3. Read-only: nothing writes this naming.
"""

from __future__ import annotations

from ckpt_ir.ir import ModelConfig
from ckpt_ir.layout import Partition
from ckpt_ir.tables import NativeParams, Row, one
from ckpt_ir.tables.dense import pad_vocab
from ckpt_ir.transforms import ConcatGateUp, ConcatQKV

__all__ = ["VERL_NATIVE_ROWS"]


def concat_qkv(config: ModelConfig, params: NativeParams) -> ConcatQKV:
    """ConcatQKV with the model's query and key/value row counts."""
    return ConcatQKV(config.num_attention_heads * config.head_dim,
                     config.num_key_value_heads * config.head_dim)


H = "model.layers.{layer}."

VERL_NATIVE_ROWS: tuple[Row, ...] = (
    Row("model.embed_tokens.weight", one("model.embed_tokens.weight"), pad_vocab,
        Partition.VOCAB),
    Row(H + "input_layernorm.weight", one(H + "input_layernorm.weight")),
    Row(H + "self_attn.qkv_proj.weight",
        {"q": H + "self_attn.q_proj.weight", "k": H + "self_attn.k_proj.weight",
         "v": H + "self_attn.v_proj.weight"},
        concat_qkv, Partition.BLOCKS),
    Row(H + "self_attn.qkv_proj.bias",
        {"q": H + "self_attn.q_proj.bias", "k": H + "self_attn.k_proj.bias",
         "v": H + "self_attn.v_proj.bias"},
        concat_qkv, Partition.BLOCKS, when="has_qkv_bias"),
    Row(H + "self_attn.o_proj.weight", one(H + "self_attn.o_proj.weight"),
        partition=Partition.ROW),
    Row(H + "post_attention_layernorm.weight", one(H + "post_attention_layernorm.weight")),
    Row(H + "mlp.gate_up_proj.weight",
        {"gate": H + "mlp.gate_proj.weight", "up": H + "mlp.up_proj.weight"},
        ConcatGateUp(), Partition.SWIGLU),
    Row(H + "mlp.down_proj.weight", one(H + "mlp.down_proj.weight"), partition=Partition.ROW),
    Row("model.norm.weight", one("model.norm.weight")),
    Row("lm_head.weight", one("lm_head.weight"), pad_vocab, Partition.VOCAB, when="is_untied"),
    # Era A value models kept their [1, H] head under the LM head's name, whole on every rank.
    Row("lm_head.weight", one("score.weight"), when=("is_value_model", "no_score_bias")),
)
