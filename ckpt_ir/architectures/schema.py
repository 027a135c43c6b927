"""The logical IR tensors of a decoder-only model (its schema), per layer kind.

A record's ``schema`` defaults to :func:`decoder_schema`: standard attention or MLA, a dense
SwiGLU MLP or routed experts named by the family's :class:`MoeNames`, MTP layers, and an LM or
token-classification head. A family with tensors of its own (extra norms, attention sinks)
gives its record a schema built from these pieces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig, Shape

__all__ = ["attention_schema", "decoder_schema", "head_schema", "mlp_schema", "moe_schema"]


def decoder_schema(config: ModelConfig) -> dict[str, Shape]:
    """Every logical IR tensor of a decoder-only model with its global shape, in a stable order:
    the dense layout, or :func:`moe_schema` for MoE / MLA / MTP models."""
    if config.is_moe or config.has_mla:
        return moe_schema(config)
    h, d, f = config.hidden_size, config.head_dim, config.intermediate_size
    q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
    out: dict[str, Shape] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q_rows, h)
        out[p + "self_attn.k_proj.weight"] = (kv_rows, h)
        out[p + "self_attn.v_proj.weight"] = (kv_rows, h)
        if config.has_qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (q_rows,)
            out[p + "self_attn.k_proj.bias"] = (kv_rows,)
            out[p + "self_attn.v_proj.bias"] = (kv_rows,)
        if config.has_qk_norm:
            out[p + "self_attn.q_norm.weight"] = (d,)
            out[p + "self_attn.k_norm.weight"] = (d,)
        out[p + "self_attn.o_proj.weight"] = (h, q_rows)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (f, h)
        out[p + "mlp.up_proj.weight"] = (f, h)
        out[p + "mlp.down_proj.weight"] = (h, f)
    out["model.norm.weight"] = (h,)
    head_schema(config, out)
    return out


def head_schema(config: ModelConfig, out: dict[str, Shape]) -> None:
    """The output head: ``score`` of a token-classification model, else ``lm_head``
    unless tied to the embedding."""
    h = config.hidden_size
    if config.is_value_model:
        out["score.weight"] = (config.num_labels, h)
        if config.has_score_bias:
            out["score.bias"] = (config.num_labels,)
    elif not config.tie_word_embeddings:
        out["lm_head.weight"] = (config.vocab_size, h)


def moe_schema(config: ModelConfig) -> dict[str, Shape]:
    """The schema of MoE / MLA / MTP models, per layer kind.

    Layer ``i`` holds attention (standard or MLA), its two norms, and either a dense MLP or
    a router with ``num_experts`` experts (names from the record's :class:`MoeNames`), an optional
    shared expert, its gate or the routing bias. MTP layer ``k`` is HF layer
    ``num_layers + k``: a full decoder layer plus ``enorm``, ``hnorm``, ``eh_proj`` and
    ``shared_head.norm``. Its copies of the embedding and the output head are not IR
    tensors (megatron-core shares them with the main model).
    """
    h = config.hidden_size
    out: dict[str, Shape] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers + config.num_mtp_layers):
        p = f"model.layers.{i}."
        if i >= config.num_layers:
            out[p + "enorm.weight"] = (h,)
            out[p + "hnorm.weight"] = (h,)
            out[p + "eh_proj.weight"] = (h, 2 * h)
        out[p + "input_layernorm.weight"] = (h,)
        attention_schema(config, p, out)
        out[p + "post_attention_layernorm.weight"] = (h,)
        mlp_schema(config, i, p, out)
        if i >= config.num_layers:
            out[p + "shared_head.norm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    head_schema(config, out)
    return out


def attention_schema(config: ModelConfig, p: str, out: dict[str, Shape]) -> None:
    h = config.hidden_size
    a = p + "self_attn."
    if not config.has_mla:
        d = config.head_dim
        q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
        out[a + "q_proj.weight"] = (q_rows, h)
        out[a + "k_proj.weight"] = (kv_rows, h)
        out[a + "v_proj.weight"] = (kv_rows, h)
        if config.has_qkv_bias:
            out[a + "q_proj.bias"] = (q_rows,)
            out[a + "k_proj.bias"] = (kv_rows,)
            out[a + "v_proj.bias"] = (kv_rows,)
        if config.has_qk_norm:
            out[a + "q_norm.weight"] = (d,)
            out[a + "k_norm.weight"] = (d,)
        out[a + "o_proj.weight"] = (h, q_rows)
        return
    n = config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    if config.q_lora_rank:
        out[a + "q_a_proj.weight"] = (config.q_lora_rank, h)
        out[a + "q_a_layernorm.weight"] = (config.q_lora_rank,)
        out[a + "q_b_proj.weight"] = (n * qk, config.q_lora_rank)
    else:
        out[a + "q_proj.weight"] = (n * qk, h)
    out[a + "kv_a_proj_with_mqa.weight"] = (config.kv_lora_rank + config.qk_rope_head_dim, h)
    out[a + "kv_a_layernorm.weight"] = (config.kv_lora_rank,)
    out[a + "kv_b_proj.weight"] = (n * (config.qk_nope_head_dim + config.v_head_dim),
                                   config.kv_lora_rank)
    out[a + "o_proj.weight"] = (h, n * config.v_head_dim)


def mlp_schema(config: ModelConfig, layer: int, p: str, out: dict[str, Shape]) -> None:
    h = config.hidden_size
    names = config.moe_names
    if names is None or not config.is_moe_layer(layer):
        f = config.intermediate_size
        out[p + "mlp.gate_proj.weight"] = (f, h)
        out[p + "mlp.up_proj.weight"] = (f, h)
        out[p + "mlp.down_proj.weight"] = (h, f)
        return
    e_count, f = config.num_experts, config.moe_intermediate_size
    out[p + names.router] = (e_count, h)
    if names.expert_bias:
        out[p + names.expert_bias] = (e_count,)
    for e in range(e_count):
        x = p + names.expert.format(expert=e)
        out[x + names.gate + ".weight"] = (f, h)
        out[x + names.up + ".weight"] = (f, h)
        out[x + names.down + ".weight"] = (h, f)
    if names.shared and config.shared_expert_intermediate_size:
        fs = config.shared_expert_intermediate_size
        out[p + names.shared + "gate_proj.weight"] = (fs, h)
        out[p + names.shared + "up_proj.weight"] = (fs, h)
        out[p + names.shared + "down_proj.weight"] = (h, fs)
    if names.shared_gate:
        out[p + names.shared_gate] = (1, h)
