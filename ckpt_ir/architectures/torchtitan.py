"""``torchtitan`` rows: HF names <-> torchtitan's model FQNs (llama3, qwen3 dense and MoE).

torchtitan checkpoints (``step-N/``, plain DCP) store its own modules' names. The rows here are
its ``state_dict_adapter.py`` ``from_hf_map`` tables at ``b5bcd76`` (2026-08-21; reference
fsdp-dcp-formats.md §4.6), the current key scheme: q/k/v under ``attention.qkv_linear``
(since #2878), ``lm_head.weight`` (since #2937), routed experts stacked over E as
``moe.routed_experts.inner_experts.{w1_EFD,w3_EFD,w2_EDF}`` (since #3859). Older checkpoints
use earlier spellings; :data:`ERA_RENAMES` maps them onto these names (readers rename, writers
always write the current scheme).

torchtitan's llama3 uses Meta's interleaved RoPE, so its q and k rows are permuted
(:class:`~ckpt_ir.transforms.RopeInterleave`); qwen3 uses HF's rotate_half and is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckpt_ir.table_engine import NativeParams, Row, one
from ckpt_ir.transforms import TENSOR, Identity, RopeInterleave, StackExperts

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig

__all__ = ["ERA_KEY_RENAMES", "ERA_RENAMES", "TORCHTITAN_LLAMA3_ROWS", "TORCHTITAN_QWEN3_MOE_ROWS",
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

ERA_RENAMES: tuple[tuple[str, str], ...] = (
    # (older spelling inside a key, current spelling), applied in order by readers.
    (".attention.wq.", ".attention.qkv_linear.wq."),   # before #2878 (2026-04-16)
    (".attention.wk.", ".attention.qkv_linear.wk."),
    (".attention.wv.", ".attention.qkv_linear.wv."),
    (".moe.experts.w1", ".moe.routed_experts.inner_experts.w1_EFD"),  # before #3859
    (".moe.experts.w3", ".moe.routed_experts.inner_experts.w3_EFD"),
    (".moe.experts.w2", ".moe.routed_experts.inner_experts.w2_EDF"),
)
"""Older torchtitan key spellings -> the current ones. ``output.weight`` (before #2937) is
``lm_head.weight``; it is a whole key, renamed by :data:`ERA_KEY_RENAMES`."""

ERA_KEY_RENAMES: dict[str, str] = {"output.weight": "lm_head.weight"}
