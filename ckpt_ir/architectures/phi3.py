"""Phi-3 / Phi-3.5 / Phi-4-mini (``phi3``): llama's layer with two fused HF projections.

transformers' ``Phi3ForCausalLM`` stores ``self_attn.qkv_proj.weight`` as plain
``[Q_all; K_all; V_all]`` rows (``nh*d + 2*G*d``) and ``mlp.gate_up_proj.weight`` as
``[gate; up]`` (``2F``). Those names are the IR names here (the IR is the HF checkpoint), so:

* ``linear_qkv`` <- ``qkv_proj``: split by the head counts, then Megatron's per-group
  interleave (:class:`~ckpt_ir.transforms.InterleaveFusedQKV`; not the identity unless
  ``G = n = 1``). A ``qkv_proj`` whose rows do not split so is refused by the plan's shape
  check before anything is read.
* ``linear_fc1`` <- ``gate_up_proj``: already Megatron's global ``[gate; up]`` (the identity in
  torch_dist); a TP rank holds ``[gate_t; up_t]`` (partition ``SWIGLU``).
* everything else is llama's rows (norms, ``o_proj``, ``down_proj``, embedding, head).

Megatron-Bridge has no merged Phi-3 bridge (the stale PR #270 maps both fused tensors as plain
TP copies, without the QKV interleave: not followed). Megatron config: llama's, plus
``rotary_percent = partial_rotary_factor`` (Phi-4-mini: 0.75). LongRoPE (Phi-3.5-mini,
Phi-4-mini: ``rope_type longrope`` with ``short_factor`` / ``long_factor``) has no megatron-core
0.16.1 position embedding: the factors are carried unchanged in the HF config every format
keeps, and ``megatron_args`` says so in its notes.

Facts: /work/shared/reference/architectures-wave2.md section 7.1 (transformers 5.23
``modeling_phi3``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.dense import DENSE_MCORE_ROWS, H, L
from ckpt_ir.architectures.record import Architecture, MegatronExtra
from ckpt_ir.architectures.schema import decoder_schema
from ckpt_ir.layout import Partition
from ckpt_ir.table_engine import NativeParams, Row, one
from ckpt_ir.transforms import InterleaveFusedQKV

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig, Shape

__all__ = ["PHI3", "PHI3_MCORE_ROWS", "partial_rotary_factor"]


def interleave_fused_qkv(config: ModelConfig, params: NativeParams) -> InterleaveFusedQKV:
    """InterleaveFusedQKV over the model's KV groups."""
    return InterleaveFusedQKV(config.num_key_value_heads, config.heads_per_group,
                              config.head_dim)


# Llama's rows with the two fused HF tensors in place of their parts (Phi-3 has neither q/k/v
# biases nor q/k norms).
_FUSED: dict[str, Row] = {
    L + "self_attention.linear_qkv.weight": Row(
        L + "self_attention.linear_qkv.weight", one(H + "self_attn.qkv_proj.weight"),
        interleave_fused_qkv, Partition.QKV),
    L + "mlp.linear_fc1.weight": Row(
        L + "mlp.linear_fc1.weight", one(H + "mlp.gate_up_proj.weight"),
        partition=Partition.SWIGLU),
}
PHI3_MCORE_ROWS: tuple[Row, ...] = tuple(
    _FUSED.get(r.native, r) for r in DENSE_MCORE_ROWS
    if not {"has_qkv_bias", "has_qk_norm"} & set(r.conditions))


def phi3_schema(config: ModelConfig) -> dict[str, Shape]:
    """The dense schema with ``qkv_proj`` for q/k/v and ``gate_up_proj`` for gate/up."""
    h, d, f = config.hidden_size, config.head_dim, config.intermediate_size
    rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    out: dict[str, Shape] = {}
    for name, shape in decoder_schema(config).items():
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight",
                          "mlp.up_proj.weight")):
            continue
        if name.endswith("self_attn.q_proj.weight"):
            out[name.removesuffix("q_proj.weight") + "qkv_proj.weight"] = (rows, h)
        elif name.endswith("mlp.gate_proj.weight"):
            out[name.removesuffix("gate_proj.weight") + "gate_up_proj.weight"] = (2 * f, h)
        else:
            out[name] = shape
    return out


def partial_rotary_factor(hf: dict[str, Any] | Any) -> float:
    """transformers 5.23 keeps it in ``rope_parameters``; older configs at the top level."""
    rope = hf.get("rope_parameters") or {}
    value = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return float(value if value is not None else 1.0)


def _megatron(config: ModelConfig, notes: list[str]) -> MegatronExtra:
    hf = config.hf
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if (rope.get("rope_type") or rope.get("type")) == "longrope":
        notes.append("phi3 LongRoPE (short_factor / long_factor, attention factor) has no "
                     "megatron-core 0.16.1 position embedding: the factors stay in the HF "
                     "config carried with the checkpoint; a Megatron run needs its own rotary "
                     "module")
    return MegatronExtra(gpt_model={"rotary_percent": partial_rotary_factor(hf)})


PHI3 = Architecture("phi3", "Phi3", {"mcore": PHI3_MCORE_ROWS}, schema=phi3_schema,
                    megatron_extra=_megatron)
