"""Qwen2-MoE and Qwen3-MoE: experts under ``mlp.experts.{expert}``, dense layers where
``mlp_only_layers`` / ``decoder_sparse_step`` say; Qwen2-MoE adds a gated shared expert and
q/k/v biases, Qwen3-MoE a QK norm.

Routing: ``norm_topk_prob=False`` keeps the unnormalised softmax weights, megatron-core's
``moe_router_pre_softmax`` (verified by logits on CPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.moe import expert_fields, fused_hf_rows, moe_mcore_rows
from ckpt_ir.architectures.record import (
    Architecture,
    MegatronMoe,
    MoeNames,
    hf_int,
    hf_int_list,
    megatron_arg,
)
from ckpt_ir.architectures.torchtitan import TORCHTITAN_QWEN3_MOE_ROWS
from ckpt_ir.errors import FormatError

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig

__all__ = ["QWEN2_MOE", "QWEN3_MOE"]

QWEN2_MOE_NAMES = MoeNames("mlp.gate.weight", "mlp.experts.{expert}.", "gate_proj", "up_proj",
                           "down_proj", shared="mlp.shared_expert.",
                           shared_gate="mlp.shared_expert_gate.weight")
QWEN3_MOE_NAMES = MoeNames("mlp.gate.weight", "mlp.experts.{expert}.", "gate_proj", "up_proj",
                           "down_proj")


def _hf_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    out = {**expert_fields(hf), "moe_intermediate_size": hf_int(hf, "moe_intermediate_size")}
    # transformers: routed unless listed in mlp_only_layers, every decoder_sparse_step-th.
    step = hf_int(hf, "decoder_sparse_step", default=1)
    if step < 1:
        raise ValueError("decoder_sparse_step must be >= 1")
    dense = set(hf_int_list(hf, "mlp_only_layers"))
    out["moe_layers"] = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
    return out


def _qwen2_moe_hf_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    return {**_hf_fields(hf, layers),
            "shared_expert_intermediate_size": hf_int(hf, "shared_expert_intermediate_size")}


def _check_qwen2_moe(config: ModelConfig) -> None:
    # transformers builds these shared experts whatever their size; with size 0 they are empty
    # tensors that megatron-core (no shared expert) has no place for.
    if config.shared_expert_intermediate_size <= 0:
        raise FormatError("qwen2_moe needs shared_expert_intermediate_size > 0")


def _router(config: ModelConfig, notes: list[str]) -> dict[str, Any]:
    return {} if config.hf.get("norm_topk_prob", False) else {"moe_router_pre_softmax": True}


def _from_megatron(args: Mapping[str, Any], moe: MegatronMoe) -> dict[str, Any]:
    return {"num_experts_per_tok": moe.topk, "moe_intermediate_size": moe.ffn,
            "mlp_only_layers": moe.dense, "decoder_sparse_step": 1,
            "norm_topk_prob": not moe.pre_softmax}


def _qwen2_moe_from_megatron(args: Mapping[str, Any], moe: MegatronMoe) -> dict[str, Any]:
    return {**_from_megatron(args, moe), "num_experts": moe.experts,
            "shared_expert_intermediate_size": moe.shared,
            "qkv_bias": bool(megatron_arg(args, "add_qkv_bias", default=False))}


def _qwen3_moe_from_megatron(args: Mapping[str, Any], moe: MegatronMoe) -> dict[str, Any]:
    return {**_from_megatron(args, moe), "num_local_experts": moe.experts}


def _qwen2_moe_qkv_bias(hf: Mapping[str, Any]) -> bool:
    """Qwen2-MoE's ``qkv_bias`` (default true) covers q/k/v only."""
    return bool(hf.get("qkv_bias", True))


QWEN2_MOE = Architecture(
    "qwen2_moe", "Qwen2Moe",
    {"mcore": moe_mcore_rows(QWEN2_MOE_NAMES), "hf": fused_hf_rows(QWEN2_MOE_NAMES)},
    moe=QWEN2_MOE_NAMES, hf_fields=_qwen2_moe_hf_fields, qkv_bias=_qwen2_moe_qkv_bias,
    attention_bias_refused=False, check_moe=_check_qwen2_moe, megatron_moe=_router,
    hf_moe_from_megatron=_qwen2_moe_from_megatron,
    megatron_guess=(1, ("moe_shared_expert_intermediate_size",)))

QWEN3_MOE = Architecture(
    "qwen3_moe", "Qwen3Moe",
    {"mcore": moe_mcore_rows(QWEN3_MOE_NAMES), "hf": fused_hf_rows(QWEN3_MOE_NAMES),
     "torchtitan": TORCHTITAN_QWEN3_MOE_ROWS},
    moe=QWEN3_MOE_NAMES, hf_fields=_hf_fields, qk_norm=True, megatron_moe=_router,
    hf_moe_from_megatron=_qwen3_moe_from_megatron, megatron_guess=(2, ("qk_layernorm",)))
