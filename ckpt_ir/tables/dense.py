"""Dense decoder rows (llama, mistral, qwen2, qwen3): HF names <-> Megatron-Core GPTModel names.

Facts: Megatron-Bridge's llama/qwen2/qwen3 registries and megatron-core's ``sharded_state_dict``
(the local spec remaps its norms to the TE-style keys in torch_dist; per-rank state dicts keep
the spec's own names, hence the ``te_norms`` / ``local_norms`` variants).
"""

from __future__ import annotations

from ckpt_ir.errors import PlanError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.layout import Partition
from ckpt_ir.tables import NativeParams, Row, one
from ckpt_ir.transforms import ConcatGateUp, InterleaveQKV, PadRows

__all__ = ["ATTENTION_ROWS", "DENSE_MCORE_ROWS", "VALUE_HEAD_ROW"]


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
# architecture with standard attention (the dense ones here, the MoE ones in tables/moe.py).
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
