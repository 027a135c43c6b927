"""GLM-4.5 / 4.6 / 4.7 / 4.5-Air (``glm4_moe``) and GLM-4.7-Flash (``glm4_moe_lite``).

``glm4_moe`` is standard GQA attention with q/k/v biases (``attention_bias``; o_proj never has
one) and, where ``use_qk_norm`` says so, a per-head q/k RMSNorm over ``head_dim`` (Megatron
``qk_layernorm``), rotary embeddings on the first ``partial_rotary_factor`` of each head
(Megatron ``rotary_percent``, read from ``rope_parameters`` first: transformers 5.23 keeps it
only there, and assumes 0.5 when a config names none); DeepSeek's MoE around it:
``first_k_dense_replace`` dense layers, then sigmoid routing over ``mlp.gate`` with the fp32
``e_score_correction_bias`` (Megatron ``router.expert_bias``) scaled by
``routed_scaling_factor``, and ``n_shared_experts`` shared experts. Its rows are the
standard-attention MoE rows (``moe.py``), plus the MTP layer: HF ``model.layers.{L + k}``
(``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and a full MoE decoder layer) <->
megatron-core ``mtp.layers.{k}`` with the inner layer under ``transformer_layer.`` (0.16.1's
name). The hub's MTP copies of the embedding and the output head are not IR tensors, as for
deepseek_v3 (megatron-core shares the model's).

``glm4_moe_lite`` is DeepSeek-V3's multi-latent attention over GLM's MoE: deepseek_v3's rows
and config reading, with GLM's routing defaults (one expert group, ``routed_scaling_factor``
1.8 when absent) and transformers' ``mlp_layer_types`` (default: the first layer dense; the
class ignores ``first_k_dense_replace``).

Facts: /work/shared/reference/architectures-wave2.md section 2 (transformers 5.23 tensor lists,
Megatron-Bridge ``glm/glm45_bridge.py`` / ``glm47_flash_bridge.py`` @067f987d, megatron-core
0.16.1 local spec on CPU reproducing HF logits); tests/clients/test_glm_client.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.deepseek_v3 import (
    DEEPSEEK_V3,
    MTP_HF_COPY_ROWS,
    model_rows_with_mtp,
)
from ckpt_ir.architectures.dense import ATTENTION_ROWS
from ckpt_ir.architectures.moe import dense_mlp_rows, expert_fields, fused_hf_rows, moe_mlp_rows
from ckpt_ir.architectures.record import (
    Architecture,
    MegatronFields,
    MegatronMoe,
    MoeNames,
    hf_int,
    megatron_arg,
)
from ckpt_ir.errors import FormatError
from ckpt_ir.table_engine import Row, one

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig

__all__ = ["GLM4_MOE", "GLM4_MOE_LITE", "GLM4_MOE_MCORE_ROWS", "mlp_layer_types_moe_layers",
           "sigmoid_router"]

NAMES = MoeNames("mlp.gate.weight", "mlp.experts.{expert}.", "gate_proj", "up_proj",
                 "down_proj", shared="mlp.shared_experts.",
                 expert_bias="mlp.gate.e_score_correction_bias")

L = "decoder.layers.{layer}."
H = "model.layers.{layer}."


def _layer_rows() -> tuple[Row, ...]:
    """One decoder layer: attention (q/k/v biases, QK norm as the features say), the post-
    attention norm under each spec's key, a dense MLP or the routed and shared experts."""
    post = one(H + "post_attention_layernorm.weight")
    return (
        *ATTENTION_ROWS,
        Row(L + "mlp.linear_fc1.layer_norm_weight", post, when=("dense_layer", "te_norms")),
        Row(L + "mlp.linear_fc1.layer_norm_weight", post, when="local_dist_norms"),
        Row(L + "pre_mlp_layernorm.weight", post, when=("moe_layer", "te_norms")),
        Row(L + "pre_mlp_layernorm.weight", post, when="local_norms"),
        *dense_mlp_rows(),
        *moe_mlp_rows(NAMES),
    )


# The MTP block, embedding and head are DeepSeek-V3's around GLM's own layer rows.
GLM4_MOE_MCORE_ROWS: tuple[Row, ...] = model_rows_with_mtp(_layer_rows())


def _moe_fields(hf: Mapping[str, Any], layers: int, *, first_dense: int) -> dict[str, Any]:
    out = {**expert_fields(hf), "moe_intermediate_size": hf_int(hf, "moe_intermediate_size")}
    out["moe_layers"] = tuple(range(max(first_dense, 0), layers))
    # transformers' Glm4MoeConfig default: one shared expert.
    out["shared_expert_intermediate_size"] = (
        hf_int(hf, "n_shared_experts", default=1) * out["moe_intermediate_size"])
    return out


def _glm4_moe_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    # transformers' defaults when the file leaves a field out: one dense layer, one MTP layer.
    out = _moe_fields(hf, layers, first_dense=hf_int(hf, "first_k_dense_replace", default=1))
    out["num_mtp_layers"] = hf_int(hf, "num_nextn_predict_layers", "num_mtp_layers", default=1)
    return out


def mlp_layer_types_moe_layers(hf: Mapping[str, Any], layers: int,
                               default: list[str]) -> tuple[int, ...]:
    """The routed layers of transformers' ``mlp_layer_types`` ("dense" / "sparse" per layer),
    which the GLM-4.7-Flash and DSA classes read instead of ``first_k_dense_replace``;
    ``default`` when the config has none."""
    types = hf.get("mlp_layer_types")
    if types is None:
        types = default
    if type(types) is not list or len(types) != layers or any(
            t not in ("dense", "sparse") for t in types):
        raise ValueError(f"mlp_layer_types must list 'dense' or 'sparse' for each of {layers} "
                         "layers")
    return tuple(i for i, t in enumerate(types) if t == "sparse")


def _lite_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    out = DEEPSEEK_V3.hf_fields(hf, layers)  # type: ignore[misc]  # a MoE record
    # Glm4MoeLiteConfig's default: the first layer dense (first_k_dense_replace is not read).
    out["moe_layers"] = mlp_layer_types_moe_layers(hf, layers,
                                                   ["dense"] + ["sparse"] * (layers - 1))
    return out


def _check(config: ModelConfig) -> None:
    # transformers builds these shared experts whatever their size; with size 0 they are empty
    # tensors that megatron-core (no shared expert) has no place for.
    if config.shared_expert_intermediate_size <= 0:
        raise FormatError(f"{config.architecture} needs n_shared_experts > 0")


def sigmoid_router(groups: int, group_topk: int, scale: float) -> MegatronFields:
    """DeepSeek-style routing with the family's transformers defaults (``n_group``,
    ``topk_group``, ``routed_scaling_factor`` when the config leaves them out): sigmoid
    scores, expert choice on ``score + e_score_correction_bias`` (kept fp32; rounded to bf16
    it changes the choice), the chosen unbiased scores normalised and scaled."""

    def router(config: ModelConfig, notes: list[str]) -> dict[str, Any]:
        hf = config.hf
        n_group = int(hf.get("n_group") or groups)
        topk_group = int(hf.get("topk_group") or group_topk)
        tc: dict[str, Any] = {
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            # The bias is a trained value here, not one for megatron-core to keep adjusting.
            "moe_router_bias_update_rate": 0.0,
            "moe_router_topk_scaling_factor": float(hf.get("routed_scaling_factor") or scale),
            "moe_router_dtype": "fp32",
        }
        if n_group > 1:
            tc.update(moe_router_num_groups=n_group, moe_router_group_topk=topk_group)
            if config.num_experts_per_tok // topk_group != 2:
                notes.append(f"num_experts_per_tok / topk_group = {config.num_experts_per_tok}"
                             f" / {topk_group} != 2: megatron-core scores expert groups by "
                             f"their top {config.num_experts_per_tok // topk_group} experts, "
                             "transformers by their top 2; the routing will differ")
        eps = float(hf.get("rms_norm_eps", 1e-6))
        if config.has_mla and eps != 1e-6:
            # transformers builds q_a_layernorm / kv_a_layernorm with RMSNorm's default eps;
            # megatron-core's MLA uses layernorm_epsilon for every norm.
            notes.append(f"rms_norm_eps={eps:g}: transformers normalises q_a / kv_a with eps "
                         "1e-6, megatron-core with layernorm_epsilon; the logits differ "
                         "slightly (2e-5 to 3e-5 on tiny fp32 GLM-4.7-Flash models)")
        if config.num_mtp_layers:
            # megatron_args sets it for MLA models only; GLM-4.5's MTP has standard attention.
            tc["mtp_num_layers"] = config.num_mtp_layers
        if not hf.get("norm_topk_prob", True) and config.num_experts_per_tok > 1:
            notes.append("norm_topk_prob=false: megatron-core always normalises sigmoid "
                         "routing scores over the top k; the routing will differ")
        return tc

    return router


def _glm4_moe_from_megatron(args: Mapping[str, Any], moe: MegatronMoe) -> dict[str, Any]:
    pattern, layers = moe.pattern, len(moe.pattern)
    first_dense = pattern.index(1) if 1 in pattern else layers
    if pattern != [0] * first_dense + [1] * (layers - first_dense):
        raise FormatError(f"glm4_moe has dense layers first only; moe_layer_freq is {pattern}")
    groups = int(megatron_arg(args, "moe_router_num_groups", default=1) or 1)
    return {
        "n_routed_experts": moe.experts, "num_experts_per_tok": moe.topk,
        "moe_intermediate_size": moe.ffn,
        "n_shared_experts": moe.shared // moe.ffn if moe.shared else 0,
        "first_k_dense_replace": first_dense,
        "n_group": groups,
        "topk_group": int(megatron_arg(args, "moe_router_group_topk", default=1) or 1),
        "routed_scaling_factor": float(megatron_arg(args, "moe_router_topk_scaling_factor",
                                                    default=1.0) or 1.0),
        "norm_topk_prob": True,
        "use_qk_norm": bool(megatron_arg(args, "qk_layernorm", default=False)),
        "num_nextn_predict_layers": int(megatron_arg(args, "mtp_num_layers", default=0) or 0),
    }


def _lite_from_megatron(args: Mapping[str, Any], moe: MegatronMoe) -> dict[str, Any]:
    out = DEEPSEEK_V3.hf_moe_from_megatron(args, moe)  # type: ignore[misc]  # a MoE record
    out["mlp_layer_types"] = ["sparse" if v else "dense" for v in moe.pattern]
    return out


def _use_qk_norm(hf: Mapping[str, Any]) -> bool:
    """GLM-4.5's per-head q/k RMSNorm (transformers' default: off)."""
    return bool(hf.get("use_qk_norm", False))


def _attention_bias(hf: Mapping[str, Any]) -> bool:
    """``attention_bias`` gives q/k/v biases only (transformers' default: off)."""
    return bool(hf.get("attention_bias", False))


# No megatron_guess: bare Megatron arguments of a GLM model read as deepseek_v3 / qwen3_moe;
# only a named architecture or an HF config makes them GLM.
GLM4_MOE = Architecture(
    "glm4_moe", "Glm4Moe",
    # The hf rows write the MTP layer's embed / head copies back, as DeepSeek's do.
    {"mcore": GLM4_MOE_MCORE_ROWS, "hf": (*fused_hf_rows(NAMES), *MTP_HF_COPY_ROWS)},
    moe=NAMES, hf_fields=_glm4_moe_fields, qkv_bias=_attention_bias,
    attention_bias_refused=False, attention_bias_is_qkv_bias=True, qk_norm=_use_qk_norm,
    check_moe=_check, megatron_moe=sigmoid_router(1, 1, 1.0),
    hf_moe_from_megatron=_glm4_moe_from_megatron, partial_rotary_default=0.5)

GLM4_MOE_LITE = dataclasses.replace(
    DEEPSEEK_V3, name="glm4_moe_lite", hf_class="Glm4MoeLite", hf_fields=_lite_fields,
    # deepseek_v3's tables less its torchtitan naming: torchtitan has no GLM model.
    tables={k: v for k, v in DEEPSEEK_V3.tables.items() if k != "torchtitan"},
    check_moe=_check, megatron_moe=sigmoid_router(1, 1, 1.8),
    hf_moe_from_megatron=_lite_from_megatron, megatron_guess=None)
