"""``torchtitan`` rows: HF names <-> torchtitan's model FQNs (llama3, qwen3 dense and MoE,
deepseek_v3, gpt_oss).

torchtitan checkpoints (``step-N/``, plain DCP) store its own modules' names. The rows here are
its ``state_dict_adapter.py`` ``from_hf_map`` tables at ``b5bcd76`` (2026-08-21; reference
fsdp-dcp-formats.md §4.6), the current key scheme: q/k/v under ``attention.qkv_linear``
(since #2878), ``lm_head.weight`` (since #2937), routed experts stacked over E as
``moe.routed_experts.inner_experts.{w1_EFD,w3_EFD,w2_EDF}`` (since #3859). Older checkpoints
use earlier spellings; :data:`ERA_RENAMES` maps them onto these names (readers rename, writers
always write the current scheme). torchtitan 0.3.0 (PyPI, 2026-11) has this scheme; its MoE
load-balancing buffer is ``moe.expert_bias_E`` (``moe.expert_bias`` before), checked against its
``state_dict_adapter.py`` by the torchtitan client tests.

torchtitan's llama3 uses Meta's interleaved RoPE, so its q and k rows are permuted
(:class:`~ckpt_ir.transforms.RopeInterleave`); qwen3 uses HF's rotate_half and is not.

deepseek_v3 (``DeepSeekV3StateDictAdapter``): MLA maps name for name, without a permutation.
torchtitan rotates MLA's rope dims as interleaved pairs (``ComplexRoPE``) and so does
transformers when ``rope_interleave`` is true (its default, what DeepSeek's releases set:
``apply_rotary_pos_emb_interleave`` de-interleaves at run time), so both store the same rows;
a config with ``rope_interleave: false`` is refused (torchtitan's adapter has no permutation
for it). MTP layer ``k`` (HF ``model.layers.{num_layers + k}``) is ``mtp_layers.{k}``: the
layer's own rows plus ``enorm``, ``hnorm``, ``eh_proj`` and ``mtp_norm`` (HF
``shared_head.norm``); HF's per-MTP-layer copies of the embedding and head have no torchtitan
tensor (its MTP block shares ``tok_embeddings`` and ``lm_head``). The router's
``e_score_correction_bias`` is ``moe.expert_bias_E``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ckpt_ir.errors import FormatError
from ckpt_ir.table_engine import NativeParams, Row, one
from ckpt_ir.transforms import TENSOR, Identity, InterleaveExperts, RopeInterleave, StackExperts

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig

__all__ = ["ERA_KEY_RENAMES", "ERA_RENAMES", "EXPERT_BIAS", "TORCHTITAN_DEEPSEEK_V3_ROWS",
           "TORCHTITAN_GPT_OSS_ROWS", "TORCHTITAN_LLAMA3_ROWS", "TORCHTITAN_QWEN3_MOE_ROWS",
           "TORCHTITAN_QWEN3_ROWS"]

T = "layers.{layer}."
H = "model.layers.{layer}."


def rope_q(config: ModelConfig, params: NativeParams) -> RopeInterleave:
    return RopeInterleave(config.num_attention_heads, config.head_dim)


def rope_k(config: ModelConfig, params: NativeParams) -> RopeInterleave:
    return RopeInterleave(config.num_key_value_heads, config.head_dim)


def stack_experts(config: ModelConfig, params: NativeParams) -> StackExperts:
    """One projection of every expert of a layer, stacked on dim 0 (``[E, ...]``)."""
    return StackExperts(config.num_experts)


def _ends() -> tuple[Row, ...]:
    return (
        Row("tok_embeddings.weight", one("model.embed_tokens.weight")),
        Row("norm.weight", one("model.norm.weight")),
        Row("lm_head.weight", one("lm_head.weight"), when="is_untied"),
    )


def _attention(rope: bool) -> tuple[Row, ...]:
    q, k = (rope_q, rope_k) if rope else (Identity(), Identity())
    return (
        Row(T + "attention_norm.weight", one(H + "input_layernorm.weight")),
        Row(T + "attention.qkv_linear.wq.weight", one(H + "self_attn.q_proj.weight"), q),
        Row(T + "attention.qkv_linear.wk.weight", one(H + "self_attn.k_proj.weight"), k),
        Row(T + "attention.qkv_linear.wv.weight", one(H + "self_attn.v_proj.weight")),
        Row(T + "attention.wo.weight", one(H + "self_attn.o_proj.weight")),
        Row(T + "attention.q_norm.weight", one(H + "self_attn.q_norm.weight"),
            when="has_qk_norm"),
        Row(T + "attention.k_norm.weight", one(H + "self_attn.k_norm.weight"),
            when="has_qk_norm"),
        Row(T + "ffn_norm.weight", one(H + "post_attention_layernorm.weight")),
    )


def _dense_mlp(when: str | None = None) -> tuple[Row, ...]:
    return (
        Row(T + "feed_forward.w1.weight", one(H + "mlp.gate_proj.weight"), when=when),
        Row(T + "feed_forward.w3.weight", one(H + "mlp.up_proj.weight"), when=when),
        Row(T + "feed_forward.w2.weight", one(H + "mlp.down_proj.weight"), when=when),
    )


_X = H + "mlp.experts.{expert}."
_E = T + "moe.routed_experts.inner_experts."

TORCHTITAN_LLAMA3_ROWS: tuple[Row, ...] = (*_ends(), *_attention(rope=True), *_dense_mlp())
TORCHTITAN_QWEN3_ROWS: tuple[Row, ...] = (*_ends(), *_attention(rope=False), *_dense_mlp())
TORCHTITAN_QWEN3_MOE_ROWS: tuple[Row, ...] = (
    *_ends(), *_attention(rope=False), *_dense_mlp(when="dense_layer"),
    Row(T + "moe.router.gate.weight", one(H + "mlp.gate.weight"), when="moe_layer"),
    Row(_E + "w1_EFD", {TENSOR: _X + "gate_proj.weight"}, stack_experts, when="moe_layer",
        stack="expert"),
    Row(_E + "w3_EFD", {TENSOR: _X + "up_proj.weight"}, stack_experts, when="moe_layer",
        stack="expert"),
    Row(_E + "w2_EDF", {TENSOR: _X + "down_proj.weight"}, stack_experts, when="moe_layer",
        stack="expert"),
)


def mla_rope(config: ModelConfig, params: NativeParams) -> Identity:
    """Identity (MLA's rope rows alike, rope_interleave); rope_interleave=false is refused.

    torchtitan's interleaved RoPE is transformers' with ``rope_interleave`` (see the module
    docstring); the half-split variant has no torchtitan counterpart."""
    if not config.hf.get("rope_interleave", True):
        raise FormatError("deepseek_v3 with rope_interleave=false has no torchtitan naming: "
                          "torchtitan rotates MLA's rope dims as interleaved pairs and its "
                          "state_dict_adapter permutes nothing")
    return Identity()


_S = H + "self_attn."
_A = T + "attention."
_MLP = H + "mlp."
_X3 = _MLP + "experts.{expert}."

_DEEPSEEK_V3_LAYER: tuple[Row, ...] = (
    Row(T + "attention_norm.weight", one(H + "input_layernorm.weight")),
    Row(_A + "wq.weight", one(_S + "q_proj.weight"), mla_rope, when="no_q_lora"),
    Row(_A + "wq_a.weight", one(_S + "q_a_proj.weight"), when="has_q_lora"),
    Row(_A + "q_norm.weight", one(_S + "q_a_layernorm.weight"), when="has_q_lora"),
    Row(_A + "wq_b.weight", one(_S + "q_b_proj.weight"), mla_rope, when="has_q_lora"),
    Row(_A + "wkv_a.weight", one(_S + "kv_a_proj_with_mqa.weight"), mla_rope),
    Row(_A + "kv_norm.weight", one(_S + "kv_a_layernorm.weight")),
    Row(_A + "wkv_b.weight", one(_S + "kv_b_proj.weight")),
    Row(_A + "wo.weight", one(_S + "o_proj.weight")),
    Row(T + "ffn_norm.weight", one(H + "post_attention_layernorm.weight")),
    *_dense_mlp(when="dense_layer"),
    Row(T + "moe.router.gate.weight", one(_MLP + "gate.weight"), when="moe_layer"),
    Row(T + "moe.expert_bias_E", one(_MLP + "gate.e_score_correction_bias"),
        when=("moe_layer", "has_expert_bias")),
    Row(_E + "w1_EFD", {TENSOR: _X3 + "gate_proj.weight"}, stack_experts, when="moe_layer",
        stack="expert"),
    Row(_E + "w3_EFD", {TENSOR: _X3 + "up_proj.weight"}, stack_experts, when="moe_layer",
        stack="expert"),
    Row(_E + "w2_EDF", {TENSOR: _X3 + "down_proj.weight"}, stack_experts, when="moe_layer",
        stack="expert"),
    *(Row(T + f"moe.shared_experts.{w}.weight", one(_MLP + f"shared_experts.{hf}.weight"),
          when=("moe_layer", "has_shared_experts"))
      for w, hf in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))),
)

_TM = "mtp_layers.{mtp}."
_HM = "model.layers.{mtp_layer}."


def _as_mtp(row: Row) -> Row:
    """A decoder-layer row moved to MTP layer ``{mtp}`` (torchtitan builds each MTP block from
    the last decoder layer's config, as megatron-core and ckpt-ir's IR do)."""
    return dataclasses.replace(row, native=row.native.replace(T, _TM),
                               ir={role: n.replace(H, _HM) for role, n in row.ir.items()})


TORCHTITAN_DEEPSEEK_V3_ROWS: tuple[Row, ...] = (
    *_ends(), *_DEEPSEEK_V3_LAYER,
    *map(_as_mtp, _DEEPSEEK_V3_LAYER),
    Row(_TM + "enorm.weight", one(_HM + "enorm.weight")),
    Row(_TM + "hnorm.weight", one(_HM + "hnorm.weight")),
    # Columns [enorm(embedding); hnorm(hidden)]: MTPTransformerBlock.forward's concatenation,
    # the same as transformers' and megatron-core's.
    Row(_TM + "eh_proj.weight", one(_HM + "eh_proj.weight")),
    Row(_TM + "mtp_norm.weight", one(_HM + "shared_head.norm.weight")),
)


def interleave_gate_up(config: ModelConfig, params: NativeParams) -> InterleaveExperts:
    """gpt-oss's ``mlp1``: each expert's gate and up rows interleaved (row ``2j`` gate ``j``,
    ``2j + 1`` up ``j``: torchtitan's ``swiglu`` reads ``x[..., ::2]`` / ``x[..., 1::2]``),
    output-major, experts stacked: ``[E, 2F, D]`` weights, ``[E, 2F]`` biases."""
    return InterleaveExperts(config.num_experts, ("gate", "up"), input_major=False)


_G = _E  # gpt-oss's inner experts: mlp1_* / mlp2_*, named by their axes since torchtitan 0.3.0

TORCHTITAN_GPT_OSS_ROWS: tuple[Row, ...] = (
    *_ends(),
    Row(T + "attention_norm.weight", one(H + "input_layernorm.weight")),
    *(Row(T + f"attention.qkv_linear.w{x}.{kind}", one(_S + f"{x}_proj.{kind}"))
      for x in "qkv" for kind in ("weight", "bias")),
    Row(_A + "wo.weight", one(_S + "o_proj.weight")),
    Row(_A + "wo.bias", one(_S + "o_proj.bias")),
    Row(_A + "sinks", one(_S + "sinks")),
    Row(T + "ffn_norm.weight", one(H + "post_attention_layernorm.weight")),
    Row(T + "moe.router.gate.weight", one(_MLP + "router.weight")),
    Row(T + "moe.router.gate.bias", one(_MLP + "router.bias")),
    Row(_G + "mlp1_weight_EGD", {"gate": _X3 + "gate_proj.weight", "up": _X3 + "up_proj.weight"},
        interleave_gate_up, stack="expert"),
    Row(_G + "mlp1_bias_EG", {"gate": _X3 + "gate_proj.bias", "up": _X3 + "up_proj.bias"},
        interleave_gate_up, stack="expert"),
    Row(_G + "mlp2_weight_EDF", {TENSOR: _X3 + "down_proj.weight"}, stack_experts,
        stack="expert"),
    Row(_G + "mlp2_bias_ED", {TENSOR: _X3 + "down_proj.bias"}, stack_experts, stack="expert"),
)
"""gpt-oss from torchtitan 0.3.0's model (``GptOssGroupedExperts``): its adapter maps
``inner_experts.mlp1_weight`` etc. (names without the axis suffix, the MXFP4 ``*_blocks`` keys
of the hub), which its own model no longer has, so its ``to_hf`` drops the routed experts; the
rows here follow the model's parameters. RoPE is HF's rotate_half (``CosSinRoPE``): no
permutation."""

EXPERT_BIAS = T + "moe.expert_bias_E"
"""torchtitan's aux-loss-free load-balancing bias of an MoE layer (``[E]``, fp32, persistent
when ``load_balance_coeff`` is set): added to the router's scores to choose experts only.
deepseek_v3 maps it to HF's ``e_score_correction_bias``; qwen3 MoE has no HF counterpart, so a
writer stores it as torchtitan initialises it (zeros: the routing transformers computes) and a
reader lists it as dropped, as torchtitan's own ``to_hf`` drops it."""

ERA_RENAMES: tuple[tuple[str, str], ...] = (
    # (older spelling inside a key, current spelling), applied in order by readers.
    (".attention.wq.", ".attention.qkv_linear.wq."),   # before #2878 (2026-04-16)
    (".attention.wk.", ".attention.qkv_linear.wk."),
    (".attention.wv.", ".attention.qkv_linear.wv."),
    (".moe.experts.w1", ".moe.routed_experts.inner_experts.w1_EFD"),  # before #3859
    (".moe.experts.w3", ".moe.routed_experts.inner_experts.w3_EFD"),
    (".moe.experts.w2", ".moe.routed_experts.inner_experts.w2_EDF"),
    (".moe.expert_bias", ".moe.expert_bias_E"),  # the _E suffix: 0.3.0 and b5bcd76 have it
)
"""Older torchtitan key spellings -> the current ones. ``output.weight`` (before #2937) is
``lm_head.weight``; it is a whole key, renamed by :data:`ERA_KEY_RENAMES`."""

ERA_KEY_RENAMES: dict[str, str] = {"output.weight": "lm_head.weight"}
