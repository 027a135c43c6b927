"""OLMo 2 (``olmo2``: OLMo-2-7B / 13B / 32B): post-norm layers and full-width q/k norms.

transformers' ``Olmo2DecoderLayer`` has no input norm and no pre-MLP norm; it normalises the
*outputs* of attention and of the MLP before each residual add::

    h   = x + post_attention_layernorm(attn(x))
    out = h + post_feedforward_layernorm(mlp(h))

and its q/k norms are RMSNorms over the whole projection before the split into heads:
``q_norm`` is ``[nh*d]``, ``k_norm`` ``[G*d]`` (OLMo-2-32B: 40 heads, 8 KV groups, so they
differ).

megatron-core 0.16.1 has no such layer (no post-norm slot in ``TransformerLayerSubmodules``, its
``q_layernorm`` is per head), and neither Megatron-Bridge, mbridge, slime nor verl maps OLMo 2.
The Megatron names here are the ones Megatron-Bridge gives the same two norms in Gemma 2/3
(``self_attention.linear_proj.post_layernorm``, ``mlp.linear_fc2.post_layernorm``, inside its
TE ``*LinearLayerNorm`` modules) and GPTModel's ``q_layernorm`` / ``k_layernorm`` at their full
width. Every norm is a copy. The q/k norms are held whole on every TP rank (``REPLICATED``):
their RMS runs over all heads, which a rank's slice cannot compute alone. These are ckpt-ir's
choices, documented in docs/architectures.md; they round-trip bit for bit through every format.
``megatron_args`` says in its notes that megatron-core cannot build the model. Megatron
arguments describe OLMo 2 once the architecture is named (no argument says "post-norm", so it
is never guessed: bare arguments with ``qk_layernorm`` read as qwen3).

Facts: /work/shared/reference/architectures-wave2.md section 7.2 (transformers 5.23
``modeling_olmo2``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckpt_ir.architectures.dense import VALUE_HEAD_ROW, H, L, interleave_qkv, pad_vocab
from ckpt_ir.architectures.record import Architecture, MegatronExtra
from ckpt_ir.architectures.schema import head_schema
from ckpt_ir.layout import Partition
from ckpt_ir.table_engine import Row, one
from ckpt_ir.transforms import ConcatGateUp

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig, Shape

__all__ = ["OLMO2", "OLMO2_MCORE_ROWS", "POST_NORM_ROWS"]

# The post-attention and post-MLP norms (Megatron-Bridge's Gemma names; OLMo 2 and Gemma share
# them).
POST_NORM_ROWS: tuple[Row, ...] = (
    Row(L + "self_attention.linear_proj.post_layernorm.weight",
        one(H + "post_attention_layernorm.weight")),
    Row(L + "mlp.linear_fc2.post_layernorm.weight", one(H + "post_feedforward_layernorm.weight")),
)

OLMO2_MCORE_ROWS: tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", one("model.embed_tokens.weight"),
        pad_vocab, Partition.VOCAB),
    Row(L + "self_attention.linear_qkv.weight",
        {"q": H + "self_attn.q_proj.weight", "k": H + "self_attn.k_proj.weight",
         "v": H + "self_attn.v_proj.weight"},
        interleave_qkv, Partition.QKV),
    # Full width ([nh*d], [G*d]), whole on every rank: the RMS runs over all heads.
    Row(L + "self_attention.q_layernorm.weight", one(H + "self_attn.q_norm.weight")),
    Row(L + "self_attention.k_layernorm.weight", one(H + "self_attn.k_norm.weight")),
    Row(L + "self_attention.linear_proj.weight", one(H + "self_attn.o_proj.weight"),
        partition=Partition.ROW),
    POST_NORM_ROWS[0],
    Row(L + "mlp.linear_fc1.weight",
        {"gate": H + "mlp.gate_proj.weight", "up": H + "mlp.up_proj.weight"},
        ConcatGateUp(), Partition.SWIGLU),
    Row(L + "mlp.linear_fc2.weight", one(H + "mlp.down_proj.weight"), partition=Partition.ROW),
    POST_NORM_ROWS[1],
    Row("decoder.final_layernorm.weight", one("model.norm.weight")),
    Row("output_layer.weight", one("lm_head.weight"), pad_vocab, Partition.VOCAB,
        when="is_untied"),
    VALUE_HEAD_ROW,
)


def olmo2_schema(config: ModelConfig) -> dict[str, Shape]:
    """Per layer: q/k/v, full-width q/k norms, o_proj, the post-attention norm, the MLP and the
    post-MLP norm (no input or pre-MLP norm)."""
    h, d, f = config.hidden_size, config.head_dim, config.intermediate_size
    q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
    out: dict[str, Shape] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (q_rows, h)
        out[p + "self_attn.k_proj.weight"] = (kv_rows, h)
        out[p + "self_attn.v_proj.weight"] = (kv_rows, h)
        out[p + "self_attn.o_proj.weight"] = (h, q_rows)
        out[p + "self_attn.q_norm.weight"] = (q_rows,)
        out[p + "self_attn.k_norm.weight"] = (kv_rows,)
        out[p + "mlp.gate_proj.weight"] = (f, h)
        out[p + "mlp.up_proj.weight"] = (f, h)
        out[p + "mlp.down_proj.weight"] = (h, f)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "post_feedforward_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    head_schema(config, out)
    return out


def _megatron(config: ModelConfig, notes: list[str]) -> MegatronExtra:
    notes.append("olmo2: megatron-core 0.16.1 cannot build this model (post-attention and "
                 "post-MLP norms without input / pre-MLP norms; q/k RMSNorm over the whole "
                 "projection, not per head: qk_layernorm here names the tensors only)")
    return MegatronExtra()


OLMO2 = Architecture("olmo2", "Olmo2", {"mcore": OLMO2_MCORE_ROWS}, schema=olmo2_schema,
                     qk_norm=True, megatron_extra=_megatron)
