"""Gemma 2 and Gemma 3 text (``gemma2``, ``gemma3_text``): four norms per layer, GeGLU.

transformers' Gemma layer normalises before *and* after attention and the MLP::

    h   = x + post_attention_layernorm(attn(input_layernorm(x)))
    out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

with a gated MLP over ``gelu_pytorch_tanh`` (``hidden_activation``), the embedding multiplied by
``sqrt(H)``, tied embeddings (no ``lm_head.weight`` on disk), and Gemma 3's per-head q/k norms.

Names follow Megatron-Bridge (``gemma/gemma2_bridge.py``, ``gemma/gemma3_bridge.py``): the
input norm is ``linear_qkv.layer_norm_weight`` (TE spec), the pre-MLP norm
``linear_fc1.layer_norm_weight``, the post-norms ``linear_proj.post_layernorm`` and
``linear_fc2.post_layernorm`` (modules of Megatron-Bridge's TE ``*LinearLayerNorm``), the q/k
norms ``q_layernorm`` / ``k_layernorm``.

``(1 + w)`` norms: every Gemma RMSNorm computes ``x_hat * (1 + w)`` and stores the zero-centred
``w``. The weights are **copied**, never offset: Megatron-Bridge's providers set
``layernorm_zero_centered_gamma=True`` (TransformerEngine's norms then apply ``1 + w``; the
local spec's ``WrappedTorchNorm`` refuses the flag), and ``megatron_args`` sets it too. (NeMo
1.0 added 1 during conversion instead; a converter that did so would also round ``1 + w`` in
bf16.) A bit-exact round trip needs the copy.

What megatron-core 0.16.1 cannot express is carried in the HF config every format keeps and
named in ``megatron_args``' notes: attention and final logit softcapping (Gemma 2), the
``sqrt(H)`` embedding scale, Gemma 3's local RoPE base (one ``rotary_base``: the global one),
the post-norms (no slot in ``TransformerLayerSubmodules``). It cannot build the model on CPU
(reference section 6.4); the sliding window ``N`` becomes ``window_size=(N-1, 0)`` with
``window_attn_skip_freq`` from ``layer_types`` (1 = sliding), the softmax scale
``query_pre_attn_scalar ** -0.5``. Megatron arguments alone do not hold these, so a Megatron
checkpoint of Gemma is read with its HF config.

Facts: /work/shared/reference/architectures-wave2.md section 6 (transformers 5.23
``modeling_gemma2`` / ``modeling_gemma3``; Megatron-Bridge @067f987d).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.dense import ATTENTION_ROWS, VALUE_HEAD_ROW, H, L, pad_vocab
from ckpt_ir.architectures.olmo2 import POST_NORM_ROWS
from ckpt_ir.architectures.record import Architecture, MegatronExtra
from ckpt_ir.architectures.schema import attention_schema, head_schema
from ckpt_ir.layout import Partition
from ckpt_ir.table_engine import Row, one
from ckpt_ir.transforms import ConcatGateUp

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig, Shape

__all__ = ["GEMMA2", "GEMMA3_TEXT", "GEMMA_MCORE_ROWS", "gemma_schema"]

_PRE_MLP = H + "pre_feedforward_layernorm.weight"

GEMMA_MCORE_ROWS: tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", one("model.embed_tokens.weight"),
        pad_vocab, Partition.VOCAB),
    *ATTENTION_ROWS,
    POST_NORM_ROWS[0],
    Row(L + "mlp.linear_fc1.layer_norm_weight", one(_PRE_MLP), when="te_norms"),
    Row(L + "mlp.linear_fc1.layer_norm_weight", one(_PRE_MLP), when="local_dist_norms"),
    Row(L + "pre_mlp_layernorm.weight", one(_PRE_MLP), when="local_norms"),
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


def gemma_schema(config: ModelConfig) -> dict[str, Shape]:
    """Per layer: the input norm, attention (Gemma 3: per-head q/k norms), the post-attention
    norm, the pre-MLP norm, the gated MLP, the post-MLP norm."""
    h, f = config.hidden_size, config.intermediate_size
    out: dict[str, Shape] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        attention_schema(config, p, out)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "pre_feedforward_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (f, h)
        out[p + "mlp.up_proj.weight"] = (f, h)
        out[p + "mlp.down_proj.weight"] = (h, f)
        out[p + "post_feedforward_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    head_schema(config, out)
    return out


def _sliding_pattern(config: ModelConfig) -> list[int]:
    """1 for a sliding-window layer, 0 for a global one (megatron-core's list form of
    ``window_attn_skip_freq``). ``layer_types`` when given; else Gemma 2's alternation from a
    sliding layer 0, Gemma 3's ``sliding_window_pattern`` (every N-th layer global)."""
    hf = config.hf
    types = hf.get("layer_types")
    if isinstance(types, list) and len(types) == config.num_layers:
        return [int(t == "sliding_attention") for t in types]
    every = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 2
    every = every if type(every) is int and every > 0 else 2
    return [int((i + 1) % every != 0) for i in range(config.num_layers)]


def _rope_by_layer_type(hf: Any, kind: str) -> dict[str, Any]:
    """Gemma 3's RoPE parameters of one layer type (transformers 5: ``rope_parameters`` keyed
    by layer type; 4.x: ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``)."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params.get(kind), dict):
        return dict(params[kind])
    if kind == "sliding_attention":
        return {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    return {**(hf.get("rope_scaling") or {}), "rope_theta": params.get(
        "rope_theta", hf.get("rope_theta", 1e6))}


def _megatron(config: ModelConfig, notes: list[str]) -> MegatronExtra:
    hf = config.hf
    tc: dict[str, Any] = {"layernorm_zero_centered_gamma": True}
    gpt: dict[str, Any] = {}
    scalar = hf.get("query_pre_attn_scalar")
    if isinstance(scalar, (int, float)) and scalar > 0:
        tc["softmax_scale"] = float(scalar) ** -0.5
    window = hf.get("sliding_window")
    if type(window) is int and window > 0:
        tc["window_size"] = (window - 1, 0)
        tc["window_attn_skip_freq"] = _sliding_pattern(config)
    missing = ["the sqrt(hidden_size) embedding scale", "post-attention / post-MLP norms"]
    if hf.get("attn_logit_softcapping") or hf.get("final_logit_softcapping"):
        missing.insert(0, f"logit softcapping (attention {hf.get('attn_logit_softcapping')}, "
                          f"final {hf.get('final_logit_softcapping')})")
    if config.architecture != "gemma2":
        glob, local = (_rope_by_layer_type(hf, k) for k in ("full_attention",
                                                            "sliding_attention"))
        gpt["rotary_base"] = float(glob.get("rope_theta", 1e6))
        kind = glob.get("rope_type") or glob.get("type") or "default"
        if kind == "linear":
            gpt["seq_len_interpolation_factor"] = float(glob["factor"])
        elif kind != "default":
            notes.append(f"{config.architecture} global rope_type {kind!r} has no GPTModel "
                         "equivalent here; set it yourself")
        missing.append(f"the local RoPE base {local.get('rope_theta')} of sliding layers "
                       "(rotary_base is the global one)")
    notes.append(f"{config.architecture}: megatron-core 0.16.1 cannot build this model; not "
                 f"expressible there: {'; '.join(missing)}. Megatron-Bridge's Gemma providers "
                 "(TransformerEngine) read the same names; layernorm_zero_centered_gamma: the "
                 "(1 + w) norm weights are copied")
    return MegatronExtra(transformer_config=tc, gpt_model=gpt)


_GEMMA: dict[str, Any] = {
    "schema": gemma_schema, "activation_fields": ("hidden_activation", "hidden_act"),
    "activations": ("gelu_pytorch_tanh",), "megatron_activation": "fast_gelu",
    "megatron_extra": _megatron, "megatron_args_suffice": False,
}
GEMMA2 = Architecture("gemma2", "Gemma2", {"mcore": GEMMA_MCORE_ROWS}, **_GEMMA)
GEMMA3_TEXT = Architecture("gemma3_text", "Gemma3", {"mcore": GEMMA_MCORE_ROWS}, qk_norm=True,
                           **_GEMMA)
