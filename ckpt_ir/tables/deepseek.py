"""DeepSeek-V3 rows: multi-head latent attention, dense-first layers, sigmoid routing with a
score-correction bias, shared experts and multi-token-prediction (MTP) layers.

MLA maps name for name (no row permutation; verl and Megatron-Bridge agree)::

    HF self_attn.                      megatron-core self_attention.
    q_a_proj        [q_lora, H]        linear_q_down_proj
    q_a_layernorm   [q_lora]           q_layernorm (local) | linear_q_up_proj.layer_norm_weight (TE)
    q_b_proj        [n*(dn+dr), q_l]   linear_q_up_proj          (q_proj -> linear_q_proj
                                                                  when q_lora_rank is null)
    kv_a_proj_with_mqa [kv_l+dr, H]    linear_kv_down_proj
    kv_a_layernorm  [kv_lora]          kv_layernorm (local) | linear_kv_up_proj.layer_norm_weight
    kv_b_proj       [n*(dn+dv), kv_l]  linear_kv_up_proj
    o_proj          [H, n*dv]          linear_proj

The local spec's MLA layer has no key map, so torch_dist keeps its own names there
(``input_layernorm``, ``pre_mlp_layernorm`` on every layer); the TE spec fuses the q/kv norms
into the up projections and, on dense layers, the post-attention norm into ``linear_fc1``. The
down projections are column-parallel under the local spec and replicated (``duplicated``)
under TE.

MTP layer ``k`` is HF layer ``num_layers + k`` and megatron-core ``mtp.layers.{k}``: ``enorm``,
``hnorm``, ``eh_proj`` (over ``[enorm(embedding); hnorm(hidden)]``), a full decoder layer under
``transformer_layer.`` and ``final_layernorm`` (HF ``shared_head.norm``). The HF copies
``model.layers.{num_layers + k}.embed_tokens`` / ``shared_head.head`` are dropped on read:
megatron-core shares the model's embedding and output layer.

Facts: megatron-core 0.16.1 ``sharded_state_dict()`` of an MLA + MoE + MTP GPTModel built on
this machine (docs/moe.md), /work/shared/reference/mcore-dist-and-bridge.md §2.8.
"""

from __future__ import annotations

import dataclasses

from ckpt_ir.ir import MOE_NAMES
from ckpt_ir.layout import Partition
from ckpt_ir.tables import Row, one
from ckpt_ir.tables.dense import VALUE_HEAD_ROW, pad_vocab
from ckpt_ir.tables.moe import dense_mlp_rows, moe_mlp_rows

__all__ = ["DEEPSEEK_V3_MCORE_ROWS"]

L = "decoder.layers.{layer}."
H = "model.layers.{layer}."
A = L + "self_attention."
S = H + "self_attn."
_LOCAL = ("local_norms", "local_dist_norms")


def _local(row: Row) -> tuple[Row, ...]:
    """``row`` under both local-spec namings (in memory and torch_dist agree for MLA)."""
    conds = row.conditions
    return tuple(dataclasses.replace(row, when=(*conds, style)) for style in _LOCAL)


def _layer_rows() -> tuple[Row, ...]:
    post = one(H + "post_attention_layernorm.weight")
    return (
        Row(L + "input_layernorm.weight", one(H + "input_layernorm.weight")),
        Row(A + "linear_q_proj.weight", one(S + "q_proj.weight"), partition=Partition.COLUMN,
            when="no_q_lora"),
        Row(A + "linear_q_down_proj.weight", one(S + "q_a_proj.weight"),
            when=("has_q_lora", "te_norms")),
        *_local(Row(A + "linear_q_down_proj.weight", one(S + "q_a_proj.weight"),
                    partition=Partition.COLUMN, when="has_q_lora")),
        Row(A + "linear_q_up_proj.layer_norm_weight", one(S + "q_a_layernorm.weight"),
            when=("has_q_lora", "te_norms")),
        *_local(Row(A + "q_layernorm.weight", one(S + "q_a_layernorm.weight"),
                    when="has_q_lora")),
        Row(A + "linear_q_up_proj.weight", one(S + "q_b_proj.weight"),
            partition=Partition.COLUMN, when="has_q_lora"),
        Row(A + "linear_kv_down_proj.weight", one(S + "kv_a_proj_with_mqa.weight"),
            when="te_norms"),
        *_local(Row(A + "linear_kv_down_proj.weight", one(S + "kv_a_proj_with_mqa.weight"),
                    partition=Partition.COLUMN)),
        Row(A + "linear_kv_up_proj.layer_norm_weight", one(S + "kv_a_layernorm.weight"),
            when="te_norms"),
        *_local(Row(A + "kv_layernorm.weight", one(S + "kv_a_layernorm.weight"))),
        Row(A + "linear_kv_up_proj.weight", one(S + "kv_b_proj.weight"),
            partition=Partition.COLUMN),
        Row(A + "linear_proj.weight", one(S + "o_proj.weight"), partition=Partition.ROW),
        Row(L + "mlp.linear_fc1.layer_norm_weight", post, when=("dense_layer", "te_norms")),
        Row(L + "pre_mlp_layernorm.weight", post, when=("moe_layer", "te_norms")),
        *_local(Row(L + "pre_mlp_layernorm.weight", post)),
        *dense_mlp_rows(),
        *moe_mlp_rows(MOE_NAMES["deepseek_v3"]),
    )


def _as_mtp(row: Row) -> Row:
    """A decoder-layer row moved to MTP layer ``{mtp}``'s ``transformer_layer``."""
    return dataclasses.replace(
        row, native=row.native.replace(L, "mtp.layers.{mtp}.transformer_layer."),
        ir={role: n.replace(H, "model.layers.{mtp_layer}.") for role, n in row.ir.items()})


M = "mtp.layers.{mtp}."
HM = "model.layers.{mtp_layer}."
_LAYER_ROWS = _layer_rows()

DEEPSEEK_V3_MCORE_ROWS: tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", one("model.embed_tokens.weight"), pad_vocab,
        Partition.VOCAB),
    *_LAYER_ROWS,
    Row("decoder.final_layernorm.weight", one("model.norm.weight")),
    Row(M + "enorm.weight", one(HM + "enorm.weight")),
    Row(M + "hnorm.weight", one(HM + "hnorm.weight")),
    Row(M + "eh_proj.weight", one(HM + "eh_proj.weight"), partition=Partition.COLUMN),
    *map(_as_mtp, _LAYER_ROWS),
    Row(M + "final_layernorm.weight", one(HM + "shared_head.norm.weight")),
    Row("output_layer.weight", one("lm_head.weight"), pad_vocab, Partition.VOCAB,
        when="is_untied"),
    VALUE_HEAD_ROW,
)
