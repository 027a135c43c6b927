"""Building blocks of the mixture-of-experts families: rows and HF config fields they share.

The records are in ``mixtral.py``, ``qwen_moe.py`` and ``deepseek_v3.py``; each passes its
:class:`MoeNames` to these builders. IR names are what transformers *writes* for each
family: Mixtral ``block_sparse_moe.experts.{expert}.w1/w3/w2`` and ``block_sparse_moe.gate``,
the Qwen families ``mlp.experts.{expert}.gate_proj/up_proj/down_proj`` and ``mlp.gate``.
The ``mcore`` naming gives each routed expert its own tensor,
``decoder.layers.{layer}.mlp.experts.experts.{expert}.`` with the *global* expert index:
exactly the torch_dist key with the expert taken off the expert axis (mcore_dist stacks it
back), and what per-rank formats cut by EP rank.

Facts: megatron-core 0.16.1 ``sharded_state_dict()`` of ``get_gpt_layer_local_spec(num_experts=E,
moe_grouped_gemm=False)`` (SequentialMLP) and of ``get_gpt_decoder_block_spec`` for mixed
dense/MoE stacks, printed on this machine (docs/moe.md lists the keys); Megatron-Bridge's
qwen2_moe / qwen3_moe / mixtral registries. Norm keys differ by layer spec and layer kind:

==================  =====================================  ===================================
post-attn norm      dense layer                            MoE layer
==================  =====================================  ===================================
TE spec             ``mlp.linear_fc1.layer_norm_weight``   ``pre_mlp_layernorm.weight``
local, in memory    ``pre_mlp_layernorm.weight``           ``pre_mlp_layernorm.weight``
local, torch_dist   ``mlp.linear_fc1.layer_norm_weight``   ``mlp.linear_fc1.layer_norm_weight``
==================  =====================================  ===================================

(the local spec's ``sharded_state_dict_keys_map`` renames ``pre_mlp_layernorm`` for MoE layers
too), hence the ``te_norms`` / ``local_norms`` / ``local_dist_norms`` variants below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.dense import ATTENTION_ROWS, VALUE_HEAD_ROW, pad_vocab
from ckpt_ir.architectures.record import MoeNames, hf_int
from ckpt_ir.layout import Partition
from ckpt_ir.table_engine import NativeParams, Row, one
from ckpt_ir.transforms import TENSOR, ConcatGateUp, StackExperts

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig

__all__ = ["dense_mlp_rows", "expert_fields", "fused_hf_rows", "moe_mcore_rows", "moe_mlp_rows"]

L = "decoder.layers.{layer}."
H = "model.layers.{layer}."


def stack_gate_up(config: ModelConfig, params: NativeParams) -> StackExperts:
    """StackExperts of [gate; up] over the model's experts."""
    return StackExperts(config.num_experts, ("gate", "up"))


def stack_down(config: ModelConfig, params: NativeParams) -> StackExperts:
    """StackExperts of down_proj over the model's experts."""
    return StackExperts(config.num_experts)


def dense_mlp_rows(native: str = L, hf: str = H) -> tuple[Row, ...]:
    """The SwiGLU MLP of the dense layers of an MoE model (``first_k_dense_replace``,
    ``mlp_only_layers``)."""
    return (
        Row(native + "mlp.linear_fc1.weight",
            {"gate": hf + "mlp.gate_proj.weight", "up": hf + "mlp.up_proj.weight"},
            ConcatGateUp(), Partition.SWIGLU, when="dense_layer"),
        Row(native + "mlp.linear_fc2.weight", one(hf + "mlp.down_proj.weight"),
            partition=Partition.ROW, when="dense_layer"),
    )


def moe_mlp_rows(names: MoeNames, native: str = L, hf: str = H) -> tuple[Row, ...]:
    """Router, routing bias, routed experts (one tensor each) and the shared expert."""
    x = hf + names.expert
    e = native + "mlp.experts.experts.{expert}."
    rows = [
        Row(native + "mlp.router.weight", one(hf + names.router), when="moe_layer"),
    ]
    if names.expert_bias:
        rows.append(Row(native + "mlp.router.expert_bias", one(hf + names.expert_bias),
                        when=("moe_layer", "has_expert_bias")))
    rows += [
        # Expert TP (ETP) splits an expert like a dense MLP: fc1 as [gate_t; up_t], fc2 by column.
        Row(e + "linear_fc1.weight",
            {"gate": x + names.gate + ".weight", "up": x + names.up + ".weight"},
            ConcatGateUp(), Partition.SWIGLU, when="moe_layer"),
        Row(e + "linear_fc2.weight", one(x + names.down + ".weight"),
            partition=Partition.ROW, when="moe_layer"),
    ]
    if names.shared:
        s = hf + names.shared
        rows += [
            Row(native + "mlp.shared_experts.linear_fc1.weight",
                {"gate": s + "gate_proj.weight", "up": s + "up_proj.weight"},
                ConcatGateUp(), Partition.SWIGLU, when=("moe_layer", "has_shared_experts")),
            Row(native + "mlp.shared_experts.linear_fc2.weight", one(s + "down_proj.weight"),
                partition=Partition.ROW, when=("moe_layer", "has_shared_experts")),
        ]
    if names.shared_gate:
        rows.append(Row(native + "mlp.shared_experts.gate_weight", one(hf + names.shared_gate),
                        when=("moe_layer", "has_shared_expert_gate")))
    return tuple(rows)


def moe_mcore_rows(names: MoeNames) -> tuple[Row, ...]:
    """The ``mcore`` rows of a standard-attention MoE family."""
    post = one(H + "post_attention_layernorm.weight")
    return (
        Row("embedding.word_embeddings.weight", one("model.embed_tokens.weight"),
            pad_vocab, Partition.VOCAB),
        *ATTENTION_ROWS,
        Row(L + "mlp.linear_fc1.layer_norm_weight", post, when=("dense_layer", "te_norms")),
        Row(L + "mlp.linear_fc1.layer_norm_weight", post, when="local_dist_norms"),
        Row(L + "pre_mlp_layernorm.weight", post, when=("moe_layer", "te_norms")),
        Row(L + "pre_mlp_layernorm.weight", post, when="local_norms"),
        *dense_mlp_rows(),
        *moe_mlp_rows(names),
        Row("decoder.final_layernorm.weight", one("model.norm.weight")),
        Row("output_layer.weight", one("lm_head.weight"), pad_vocab, Partition.VOCAB,
            when="is_untied"),
        VALUE_HEAD_ROW,
    )


def fused_hf_rows(names: MoeNames) -> tuple[Row, ...]:
    """transformers 5's in-memory expert layout, as ``hf`` variant rows (``fused_experts``).

    ``mlp.experts.gate_up_proj`` [E, 2F, H] holds ``[gate; up]`` of every expert and
    ``mlp.experts.down_proj`` [E, H, F] their down projections (transformers' own
    ``MergeModulelist`` + ``Concatenate`` conversion); the router is ``mlp.gate.weight``
    (Mixtral's ``block_sparse_moe`` is ``mlp`` in memory).
    """
    x = H + names.expert
    rows = [
        Row(H + "mlp.experts.gate_up_proj",
            {"gate": x + names.gate + ".weight", "up": x + names.up + ".weight"},
            stack_gate_up, when=("fused_experts", "moe_layer"), stack="expert"),
        Row(H + "mlp.experts.down_proj", {TENSOR: x + names.down + ".weight"}, stack_down,
            when=("fused_experts", "moe_layer"), stack="expert"),
    ]
    if names.router != "mlp.gate.weight":
        rows.append(Row(H + "mlp.gate.weight", one(H + names.router),
                        when=("fused_experts", "moe_layer")))
    return tuple(rows)


def expert_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The expert count and top k of an HF MoE config.

    transformers 5 spells the expert count ``num_local_experts`` for mixtral and qwen3_moe
    (``num_experts`` is an alias), ``num_experts`` for qwen2_moe, ``n_routed_experts`` for
    DeepSeek; every family reads all three.
    """
    return {"num_experts": hf_int(hf, "num_local_experts", "num_experts", "n_routed_experts"),
            "num_experts_per_tok": hf_int(hf, "num_experts_per_tok")}
