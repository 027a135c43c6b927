"""Mixtral: every layer routed, experts under ``block_sparse_moe`` (``w1`` gate, ``w3`` up,
``w2`` down), expert FFN size in ``intermediate_size``, no shared expert.

Routing: Mixtral softmaxes over all experts, keeps the top k and renormalises, which is
megatron-core's default (top k of the logits, softmax over those): no router fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckpt_ir.architectures.moe import expert_fields, fused_hf_rows, moe_mcore_rows
from ckpt_ir.architectures.record import Architecture, MegatronMoe, MoeNames, hf_int
from ckpt_ir.errors import FormatError

__all__ = ["MIXTRAL"]

NAMES = MoeNames("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{expert}.",
                 "w1", "w3", "w2")


def _hf_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    return {**expert_fields(hf), "moe_intermediate_size": hf_int(hf, "intermediate_size"),
            "moe_layers": tuple(range(layers))}


def _from_megatron(args: Mapping[str, Any], moe: MegatronMoe) -> dict[str, Any]:
    if moe.dense:
        raise FormatError(f"mixtral has no dense layers; moe_layer_freq marks {moe.dense}")
    return {"num_local_experts": moe.experts, "num_experts_per_tok": moe.topk,
            "intermediate_size": moe.ffn}


MIXTRAL = Architecture(
    "mixtral", "Mixtral", {"mcore": moe_mcore_rows(NAMES), "hf": fused_hf_rows(NAMES)},
    moe=NAMES, hf_fields=_hf_fields, hf_moe_from_megatron=_from_megatron,
    megatron_guess=(3, ()))
