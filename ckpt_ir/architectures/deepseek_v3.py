"""DeepSeek-V3: multi-head latent attention, dense-first layers, sigmoid routing with a
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
``model.layers.{num_layers + k}.embed_tokens`` / ``shared_head.head`` are not IR tensors:
megatron-core shares the model's embedding and output layer. An hf destination writes them
back as copies of ``model.embed_tokens`` / ``lm_head`` (the releases store them so, and
inference engines that load MTP layers read them); an hf source's copies are checked for shape
and not read (``MTP_HF_COPY_ROWS``).

Facts: megatron-core 0.16.1 ``sharded_state_dict()`` of an MLA + MoE + MTP GPTModel built on
this machine (docs/moe.md), /work/shared/reference/mcore-dist-and-bridge.md §2.8.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.dense import VALUE_HEAD_ROW, pad_vocab
from ckpt_ir.architectures.moe import dense_mlp_rows, expert_fields, fused_hf_rows, moe_mlp_rows
from ckpt_ir.architectures.record import (
    Architecture,
    MegatronMoe,
    MoeNames,
    hf_int,
    megatron_arg,
)
from ckpt_ir.architectures.torchtitan import TORCHTITAN_DEEPSEEK_V3_ROWS
from ckpt_ir.errors import FormatError
from ckpt_ir.layout import Partition
from ckpt_ir.table_engine import Row, one

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig

__all__ = ["DEEPSEEK_V3", "DEEPSEEK_V3_MCORE_ROWS", "MTP_HF_COPY_ROWS", "model_rows_with_mtp"]

NAMES = MoeNames("mlp.gate.weight", "mlp.experts.{expert}.", "gate_proj", "up_proj",
                 "down_proj", shared="mlp.shared_experts.",
                 expert_bias="mlp.gate.e_score_correction_bias")

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
        *moe_mlp_rows(NAMES),
    )


M = "mtp.layers.{mtp}."
HM = "model.layers.{mtp_layer}."


def _as_mtp(row: Row) -> Row:
    """A decoder-layer row moved to MTP layer ``{mtp}``'s ``transformer_layer`` (megatron-core
    builds it from the decoder's layer spec, so its keys follow the same spec rules)."""
    return dataclasses.replace(
        row, native=row.native.replace(L, M + "transformer_layer."),
        ir={role: n.replace(H, HM) for role, n in row.ir.items()})


def model_rows_with_mtp(layer_rows: tuple[Row, ...]) -> tuple[Row, ...]:
    """The whole ``mcore`` table of a DeepSeek-style model around its decoder-layer rows:
    embedding, layers, final norm, MTP layers (``enorm``, ``hnorm``, ``eh_proj``, the layer
    rows under ``transformer_layer.``, ``shared_head.norm``), output layer, value head.
    Shared by deepseek_v3 and glm4_moe, whose layers differ and whose MTP blocks do not."""
    return (
        Row("embedding.word_embeddings.weight", one("model.embed_tokens.weight"), pad_vocab,
            Partition.VOCAB),
        *layer_rows,
        Row("decoder.final_layernorm.weight", one("model.norm.weight")),
        Row(M + "enorm.weight", one(HM + "enorm.weight")),
        Row(M + "hnorm.weight", one(HM + "hnorm.weight")),
        # Columns: [enorm(embedding); hnorm(hidden)], megatron-core 0.16.1's concatenation order.
        Row(M + "eh_proj.weight", one(HM + "eh_proj.weight"), partition=Partition.COLUMN),
        *map(_as_mtp, layer_rows),
        Row(M + "final_layernorm.weight", one(HM + "shared_head.norm.weight")),
        Row("output_layer.weight", one("lm_head.weight"), pad_vocab, Partition.VOCAB,
            when="is_untied"),
        VALUE_HEAD_ROW,
    )


DEEPSEEK_V3_MCORE_ROWS: tuple[Row, ...] = model_rows_with_mtp(_layer_rows())


MTP_HF_COPY_ROWS: tuple[Row, ...] = (
    # hf variant rows replace the identity of the IR tensors they cover, so the embedding and
    # the head keep their own binding, the one a reader reads.
    Row("model.embed_tokens.weight", one("model.embed_tokens.weight")),
    Row("lm_head.weight", one("lm_head.weight"), when="is_untied"),
    Row(HM + "embed_tokens.weight", one("model.embed_tokens.weight"), copy=True),
    Row(HM + "shared_head.head.weight", one("lm_head.weight"), when="is_untied", copy=True),
)
"""An MTP layer's copies of the embedding and the output head, in the ``hf`` naming (any
family whose HF MTP layer is ``model.layers.{num_layers + k}`` with ``shared_head``)."""


def _hf_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    out = {**expert_fields(hf), "moe_intermediate_size": hf_int(hf, "moe_intermediate_size")}
    first_dense = hf_int(hf, "first_k_dense_replace", default=0)
    out["moe_layers"] = tuple(range(max(first_dense, 0), layers))
    out["shared_expert_intermediate_size"] = (
        hf_int(hf, "n_shared_experts", default=0) * out["moe_intermediate_size"])
    out["q_lora_rank"] = hf_int(hf, "q_lora_rank", default=0)
    out["kv_lora_rank"] = hf_int(hf, "kv_lora_rank")
    out["qk_nope_head_dim"] = hf_int(hf, "qk_nope_head_dim")
    out["qk_rope_head_dim"] = hf_int(hf, "qk_rope_head_dim")
    out["v_head_dim"] = hf_int(hf, "v_head_dim")
    out["num_mtp_layers"] = hf_int(hf, "num_nextn_predict_layers", "num_mtp_layers", default=0)
    return out


def _check(config: ModelConfig) -> None:
    # transformers builds these shared experts whatever their size; with size 0 they are empty
    # tensors that megatron-core (no shared expert) has no place for.
    if config.shared_expert_intermediate_size <= 0:
        raise FormatError("deepseek_v3 needs n_shared_experts > 0")


def _router(config: ModelConfig, notes: list[str]) -> dict[str, Any]:
    """DeepSeek-V3 scores with a sigmoid, picks experts from ``score +
    e_score_correction_bias`` within the best ``topk_group`` of ``n_group`` groups, normalises
    the chosen scores and scales them by ``routed_scaling_factor``."""
    hf = config.hf
    tc: dict[str, Any] = {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        # transformers' DeepseekV3Config defaults when the file leaves a field out.
        "moe_router_num_groups": int(hf.get("n_group") or 8),
        "moe_router_group_topk": int(hf.get("topk_group") or 4),
        "moe_router_topk_scaling_factor": float(hf.get("routed_scaling_factor") or 2.5),
        # HF computes DeepSeek's router logits in fp32.
        "moe_router_dtype": "fp32",
    }
    groups, group_topk = tc["moe_router_num_groups"], tc["moe_router_group_topk"]
    if groups > 1 and config.num_experts_per_tok // group_topk != 2:
        # megatron-core ranks groups by their top (topk / group_topk) scores, HF by top 2
        # (the same for DeepSeek-V3's 8 / 4).
        notes.append(f"num_experts_per_tok / topk_group = {config.num_experts_per_tok} / "
                     f"{group_topk} != 2: megatron-core scores expert groups by their top "
                     f"{config.num_experts_per_tok // group_topk} experts, transformers by "
                     "their top 2; the routing will differ")
    if not hf.get("norm_topk_prob", True) and config.num_experts_per_tok > 1:
        notes.append("norm_topk_prob=false: megatron-core always normalises sigmoid "
                     "routing scores over the top k; the routing will differ")
    return tc


def _from_megatron(args: Mapping[str, Any], moe: MegatronMoe) -> dict[str, Any]:
    pattern, layers = moe.pattern, len(moe.pattern)
    first_dense = pattern.index(1) if 1 in pattern else layers
    if pattern != [0] * first_dense + [1] * (layers - first_dense):
        raise FormatError(f"deepseek_v3 has dense layers first only; moe_layer_freq is "
                          f"{pattern}")
    q_lora = megatron_arg(args, "q_lora_rank", default=None)
    return {
        "n_routed_experts": moe.experts, "num_experts_per_tok": moe.topk,
        "moe_intermediate_size": moe.ffn,
        "n_shared_experts": moe.shared // moe.ffn if moe.shared else 0,
        "first_k_dense_replace": first_dense,
        "q_lora_rank": int(q_lora) if q_lora else None,
        "kv_lora_rank": int(megatron_arg(args, "kv_lora_rank", default=512)),
        "qk_nope_head_dim": int(megatron_arg(args, "qk_head_dim", default=128)),
        "qk_rope_head_dim": int(megatron_arg(args, "qk_pos_emb_head_dim", default=64)),
        "v_head_dim": int(megatron_arg(args, "v_head_dim", default=128)),
        "n_group": int(megatron_arg(args, "moe_router_num_groups", default=1)),
        "topk_group": int(megatron_arg(args, "moe_router_group_topk", default=1)),
        "routed_scaling_factor": float(megatron_arg(args, "moe_router_topk_scaling_factor",
                                                    default=1.0)),
        "norm_topk_prob": True, "rope_interleave": True,
        "num_nextn_predict_layers": int(megatron_arg(args, "mtp_num_layers", default=0) or 0),
    }


DEEPSEEK_V3 = Architecture(
    "deepseek_v3", "DeepseekV3",
    {"mcore": DEEPSEEK_V3_MCORE_ROWS, "hf": (*fused_hf_rows(NAMES), *MTP_HF_COPY_ROWS),
     "torchtitan": TORCHTITAN_DEEPSEEK_V3_ROWS},
    moe=NAMES, hf_fields=_hf_fields, mla=True, check_moe=_check, megatron_moe=_router,
    hf_moe_from_megatron=_from_megatron, megatron_guess=(0, ("multi_latent_attention",)))
