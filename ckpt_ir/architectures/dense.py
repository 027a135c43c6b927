"""The dense decoder families (llama, mistral, qwen2, qwen3): one record each, shared rows.

``mcore`` rows: HF names <-> Megatron-Core GPTModel names. The four families differ only by
features the rows name in ``when`` (qwen2's q/k/v biases, qwen3's QK norm), so they share one
tuple. ``verl-native`` rows: verl's era-A models (below), for the families verl had then.

Facts: Megatron-Bridge's llama/qwen2/qwen3 registries and megatron-core's ``sharded_state_dict``
(the local spec remaps its norms to the TE-style keys in torch_dist; per-rank state dicts keep
the spec's own names, hence the ``te_norms`` / ``local_norms`` variants).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.record import Architecture
from ckpt_ir.architectures.torchtitan import TORCHTITAN_LLAMA3_ROWS, TORCHTITAN_QWEN3_ROWS
from ckpt_ir.errors import PlanError
from ckpt_ir.layout import Partition
from ckpt_ir.table_engine import NativeParams, Row, one
from ckpt_ir.transforms import ConcatGateUp, ConcatQKV, InterleaveQKV, PadRows

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig

__all__ = ["ATTENTION_ROWS", "DENSE_MCORE_ROWS", "LLAMA", "MISTRAL", "QWEN2", "QWEN3",
           "VALUE_HEAD_ROW", "VERL_NATIVE_ROWS"]


def interleave_qkv(config: ModelConfig, params: NativeParams) -> InterleaveQKV:
    """InterleaveQKV over the model's KV groups."""
    return InterleaveQKV(config.num_key_value_heads, config.heads_per_group, config.head_dim)


def pad_vocab(config: ModelConfig, params: NativeParams) -> PadRows:
    """PadRows from the HF vocab to the padded vocab."""
    padded = params.padded_vocab_size or config.vocab_size
    if padded < config.vocab_size:
        # A source whose embedding holds fewer rows than the config's vocabulary (a missing
        # TP rank, a wrong config): bad input, reported with every other plan problem.
        raise PlanError([f"the embedding has {padded} rows, fewer than vocab_size="
                         f"{config.vocab_size}"])
    return PadRows(config.vocab_size, padded)


L = "decoder.layers.{layer}."
H = "model.layers.{layer}."

# Self-attention of a GPT layer (input norm, fused QKV, QK norm, o_proj): shared by every
# architecture with standard attention (the dense ones here, the MoE ones in moe.py).
ATTENTION_ROWS: tuple[Row, ...] = (
    Row(L + "self_attention.linear_qkv.layer_norm_weight", one(H + "input_layernorm.weight"),
        when="te_norms"),
    # The local spec's torch_dist keys are the TE ones (its sharded_state_dict_keys_map).
    Row(L + "self_attention.linear_qkv.layer_norm_weight", one(H + "input_layernorm.weight"),
        when="local_dist_norms"),
    Row(L + "input_layernorm.weight", one(H + "input_layernorm.weight"), when="local_norms"),
    Row(L + "self_attention.linear_qkv.weight",
        {"q": H + "self_attn.q_proj.weight", "k": H + "self_attn.k_proj.weight",
         "v": H + "self_attn.v_proj.weight"},
        interleave_qkv, Partition.QKV),
    Row(L + "self_attention.linear_qkv.bias",
        {"q": H + "self_attn.q_proj.bias", "k": H + "self_attn.k_proj.bias",
         "v": H + "self_attn.v_proj.bias"},
        interleave_qkv, Partition.QKV, when="has_qkv_bias"),
    Row(L + "self_attention.q_layernorm.weight", one(H + "self_attn.q_norm.weight"),
        when="has_qk_norm"),
    Row(L + "self_attention.k_layernorm.weight", one(H + "self_attn.k_norm.weight"),
        when="has_qk_norm"),
    Row(L + "self_attention.linear_proj.weight", one(H + "self_attn.o_proj.weight"),
        partition=Partition.ROW),
)

# verl's critic: megatron-core's output layer replaced by LinearForLastLayer(H, 1), a plain
# nn.Linear without bias that every TP rank holds whole; HF token classification's `score`.
VALUE_HEAD_ROW = Row("output_layer.weight", one("score.weight"),
                     when=("is_value_model", "no_score_bias"))

DENSE_MCORE_ROWS: tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", one("model.embed_tokens.weight"),
        pad_vocab, Partition.VOCAB),
    *ATTENTION_ROWS,
    Row(L + "mlp.linear_fc1.layer_norm_weight", one(H + "post_attention_layernorm.weight"),
        when="te_norms"),
    Row(L + "mlp.linear_fc1.layer_norm_weight", one(H + "post_attention_layernorm.weight"),
        when="local_dist_norms"),
    Row(L + "pre_mlp_layernorm.weight", one(H + "post_attention_layernorm.weight"),
        when="local_norms"),
    Row(L + "mlp.linear_fc1.weight",
        {"gate": H + "mlp.gate_proj.weight", "up": H + "mlp.up_proj.weight"},
        ConcatGateUp(), Partition.SWIGLU),
    Row(L + "mlp.linear_fc2.weight", one(H + "mlp.down_proj.weight"), partition=Partition.ROW),
    Row("decoder.final_layernorm.weight", one("model.norm.weight")),
    Row("output_layer.weight", one("lm_head.weight"), pad_vocab, Partition.VOCAB,
        when="is_untied"),
    VALUE_HEAD_ROW,
)


# verl's era-A Megatron models (March-April 2025): HF names <-> verl-native per-rank names.
#
# verl's own ``ParallelLlamaForCausalLMRmPadPP`` / ``ParallelQwen2ForCausalLMRmPadPP`` (before it
# switched to megatron-core's GPTModel in PR #884) used HF-like names with two fused tensors:
#
# * ``self_attn.qkv_proj``: plain ``[q; k; v]`` (``QKVParallelLinear``), *not* group-interleaved;
#   TP rank ``t`` holds ``[q_t; k_t; v_t]`` (partition ``BLOCKS``);
# * ``mlp.gate_up_proj``: ``[gate; up]``; TP rank ``t`` holds ``[gate_t; up_t]`` (``SWIGLU``).
#
# Facts: /work/shared/reference/verl-formats.md §3.3. Read-only: nothing writes this naming.


def concat_qkv(config: ModelConfig, params: NativeParams) -> ConcatQKV:
    """ConcatQKV with the model's query and key/value row counts."""
    return ConcatQKV(config.num_attention_heads * config.head_dim,
                     config.num_key_value_heads * config.head_dim)


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


# verl's era-A models existed for Llama, Mistral and Qwen2 only (Qwen3 came after verl moved to
# megatron-core's GPTModel), so qwen3 has no verl-native rows.
_DENSE: Mapping[str, tuple[Row, ...]] = {"mcore": DENSE_MCORE_ROWS,
                                         "verl-native": VERL_NATIVE_ROWS}


def _qwen2_qkv_bias(hf: Mapping[str, Any]) -> bool:
    """Qwen2 always has q/k/v biases (and no o_proj bias)."""
    return True


LLAMA = Architecture("llama", "Llama", {**_DENSE, "torchtitan": TORCHTITAN_LLAMA3_ROWS},
                     megatron_guess=(2, ()))
MISTRAL = Architecture("mistral", "Mistral", _DENSE)
QWEN2 = Architecture("qwen2", "Qwen2", _DENSE, qkv_bias=_qwen2_qkv_bias,
                     attention_bias_refused=False, spells_attention_bias=False,
                     megatron_guess=(1, ("add_qkv_bias",)))
QWEN3 = Architecture("qwen3", "Qwen3", {"mcore": DENSE_MCORE_ROWS,
                                        "torchtitan": TORCHTITAN_QWEN3_ROWS}, qk_norm=True,
                     megatron_guess=(0, ("qk_layernorm",)))
