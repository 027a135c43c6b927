"""Qwen3-Next (Qwen3-Next-80B-A3B): a hybrid stack of Gated DeltaNet (linear attention) and
gated full-attention layers, every MLP routed (512 experts, a gated shared expert), one MTP
layer, zero-centred RMSNorms.

Layer kinds: ``layer_types`` (or ``full_attention_interval`` N: layers N-1, 2N-1, ... are
full attention) decides per layer; megatron-core's ``linear_attention_freq`` is the same
pattern (``0 if (i + 1) % N == 0 else 1``, 1 = linear). A linear layer holds
``linear_attn.*``, a full one ``self_attn.*``; both hold the two norms and the MoE block.

Mapping (Megatron-Bridge ``qwen/qwen3_next_bridge.py`` @067f987d, helpers in
``conversion/param_mapping.py``; /work/shared/reference/architectures-wave2.md §5.3)::

    HF (model.layers.{l}.)                 megatron-core (decoder.layers.{l}.)   transform
    input_layernorm        (linear layer)  self_attention.in_proj.layer_norm_weight   copy
    linear_attn.in_proj_qkvz + in_proj_ba  self_attention.in_proj.weight         GroupGDNInProj
    linear_attn.conv1d.weight              self_attention.conv1d.weight          copy ([q;k;v])
    linear_attn.A_log / dt_bias            self_attention.A_log / dt_bias        copy
    linear_attn.norm.weight                self_attention.out_norm.weight        w - 1
    linear_attn.out_proj.weight            self_attention.out_proj.weight        copy
    input_layernorm        (full layer)    self_attention.linear_qkv.layer_norm_weight copy
    self_attn.q_proj + k_proj + v_proj     self_attention.linear_qkv.weight      InterleaveGatedQKV
    self_attn.q_norm / k_norm              self_attention.q_layernorm / k_layernorm  copy
    self_attn.o_proj                       self_attention.linear_proj.weight     copy
    post_attention_layernorm               pre_mlp_layernorm.weight              copy
    mlp.gate / experts / shared_expert / shared_expert_gate: qwen2_moe's rows

    mtp.fc.weight                          mtp.layers.0.eh_proj.weight           copy
    mtp.pre_fc_norm_embedding / _hidden    mtp.layers.0.enorm / hnorm            copy
    mtp.layers.0.<param>                   mtp.layers.0.transformer_layer.<param> (full layer)
    mtp.norm.weight                        mtp.layers.0.final_layernorm.weight   copy

Zero-centred norms: HF's ``Qwen3NextRMSNorm`` scales by ``1 + w`` (weights initialised to 0)
and megatron-core, built with ``layernorm_zero_centered_gamma=True``, does the same, so
every such norm (input / post-attention / q / k / final / MTP norms) is **copied**, as
Megatron-Bridge does. The GDN output norm (``RMSNormGated``) is plain in HF (``w``, init 1)
but zero-centred in megatron-core: it is stored **offset**, ``w - 1``
(:class:`~ckpt_ir.transforms.ZeroCentre`, exact or refused). The MTP ``eh_proj`` is copied
as Megatron-Bridge does (slime swaps its column halves; §5.5 trap 8).

Only the TE layer spec builds this model (megatron-core 0.16.1: the GDN block spec asserts
``transformer_impl == "transformer_engine"``), so the rows use the TE spec's names for every
norm style. Megatron's torch_dist splits ``in_proj.weight`` and ``conv1d.weight`` into
TP-invariant sub-keys (``.query``, ``.key``, ``.value``, ``.z``, ``.beta``, ``.alpha``);
:mod:`ckpt_ir.converters.mcore_dist` writes and reads those (the blocks of
:meth:`Transform.tp_blocks`). Per-rank formats hold the in-memory tensors: a TP rank's
``in_proj.weight`` is ``[q_t; k_t; v_t; z_t; b_t; a_t]`` of its key heads and its
``conv1d.weight`` ``[q_t; k_t; v_t]`` (the ``BLOCKS`` partition).

MTP: the hub files hold one MTP layer under ``mtp.`` (transformers ignores ``^mtp.*``, so a
model saved by transformers has none). The config names no count, so ckpt-ir assumes the
published one (``num_nextn_predict_layers`` or ``mtp_num_hidden_layers`` override it) and
drops it, as for DeepSeek-V3, when the files hold no MTP tensor.
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
    hf_int_list,
    megatron_arg,
)
from ckpt_ir.architectures.schema import head_schema, mlp_schema
from ckpt_ir.errors import FormatError
from ckpt_ir.layout import Partition
from ckpt_ir.table_engine import NativeParams, Row, one
from ckpt_ir.transforms import GroupGDNInProj, InterleaveGatedQKV, RowBlocks, ZeroCentre

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig, Shape

__all__ = ["QWEN3_NEXT", "QWEN3_NEXT_MCORE_ROWS", "GdnSizes", "gdn_sizes"]

NAMES = MoeNames("mlp.gate.weight", "mlp.experts.{expert}.", "gate_proj", "up_proj",
                 "down_proj", shared="mlp.shared_expert.",
                 shared_gate="mlp.shared_expert_gate.weight")

# Published Qwen3-Next checkpoints hold one MTP layer; their config does not count it.
_DEFAULT_MTP_LAYERS = 1


@dataclasses.dataclass(frozen=True, slots=True)
class GdnSizes:
    """The Gated DeltaNet sizes of a config (HF ``linear_*`` fields)."""

    num_key_heads: int     # linear_num_key_heads
    key_head_dim: int      # linear_key_head_dim
    num_value_heads: int   # linear_num_value_heads
    value_head_dim: int    # linear_value_head_dim
    conv_kernel: int       # linear_conv_kernel_dim

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def value_heads_per_key(self) -> int:
        return self.num_value_heads // self.num_key_heads


def gdn_sizes(hf: Mapping[str, Any]) -> GdnSizes:
    """The GDN sizes of an HF config (transformers' defaults where a field is absent)."""
    return GdnSizes(hf_int(hf, "linear_num_key_heads", default=16),
                    hf_int(hf, "linear_key_head_dim", default=128),
                    hf_int(hf, "linear_num_value_heads", default=32),
                    hf_int(hf, "linear_value_head_dim", default=128),
                    hf_int(hf, "linear_conv_kernel_dim", default=4))


def _layer_types(hf: Mapping[str, Any], layers: int) -> list[str]:
    """transformers' ``layer_types``, or its default from ``full_attention_interval``."""
    types = hf.get("layer_types")
    if types is None:
        interval = hf_int(hf, "full_attention_interval", default=4)
        if interval < 1:
            raise ValueError("full_attention_interval must be >= 1")
        return ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(layers)]
    if type(types) is not list or len(types) != layers or any(
            t not in ("full_attention", "linear_attention") for t in types):
        raise ValueError(f"layer_types must list 'full_attention' or 'linear_attention' for "
                         f"each of {layers} layers")
    return types


def _hf_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    out = {**expert_fields(hf), "moe_intermediate_size": hf_int(hf, "moe_intermediate_size"),
           "shared_expert_intermediate_size": hf_int(hf, "shared_expert_intermediate_size")}
    # transformers: routed unless listed in mlp_only_layers, every decoder_sparse_step-th.
    step = hf_int(hf, "decoder_sparse_step", default=1)
    if step < 1:
        raise ValueError("decoder_sparse_step must be >= 1")
    dense = set(hf_int_list(hf, "mlp_only_layers"))
    out["moe_layers"] = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
    types = _layer_types(hf, layers)
    out["linear_attention_layers"] = tuple(
        i for i, t in enumerate(types) if t == "linear_attention")
    out["num_mtp_layers"] = hf_int(hf, "num_nextn_predict_layers", "mtp_num_hidden_layers",
                                   default=_DEFAULT_MTP_LAYERS)
    return out


def _check(config: ModelConfig) -> None:
    g = gdn_sizes(config.hf)
    if min(g.num_key_heads, g.key_head_dim, g.num_value_heads, g.value_head_dim,
           g.conv_kernel) <= 0:
        raise FormatError("qwen3_next's linear_* sizes must be positive")
    if g.num_value_heads % g.num_key_heads:
        raise FormatError(f"linear_num_value_heads={g.num_value_heads} is not a multiple of "
                          f"linear_num_key_heads={g.num_key_heads}")
    if config.shared_expert_intermediate_size <= 0:
        raise FormatError("qwen3_next needs shared_expert_intermediate_size > 0")
    if config.num_mtp_layers > 1:
        # The hub names hold one MTP layer (mtp.fc, mtp.norm): no index for a second one.
        raise FormatError(f"qwen3_next with {config.num_mtp_layers} MTP layers is not "
                          "supported (the published layout has one)")


def schema(config: ModelConfig) -> dict[str, Shape]:
    """Every HF tensor of a Qwen3-Next model (as ``save_pretrained`` and the hub write them),
    per layer kind; the MTP layer under ``mtp.``."""
    h = config.hidden_size
    g = gdn_sizes(config.hf)
    out: dict[str, Shape] = {"model.embed_tokens.weight": (config.vocab_size, h)}

    def layer(i: int, p: str) -> None:
        out[p + "input_layernorm.weight"] = (h,)
        if config.is_linear_attention_layer(i):
            a = p + "linear_attn."
            out[a + "in_proj_qkvz.weight"] = (2 * g.key_dim + 2 * g.value_dim, h)
            out[a + "in_proj_ba.weight"] = (2 * g.num_value_heads, h)
            out[a + "conv1d.weight"] = (2 * g.key_dim + g.value_dim, 1, g.conv_kernel)
            out[a + "dt_bias"] = (g.num_value_heads,)
            out[a + "A_log"] = (g.num_value_heads,)
            out[a + "norm.weight"] = (g.value_head_dim,)
            out[a + "out_proj.weight"] = (h, g.value_dim)
        else:
            a, d = p + "self_attn.", config.head_dim
            q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
            out[a + "q_proj.weight"] = (2 * q_rows, h)
            out[a + "k_proj.weight"] = (kv_rows, h)
            out[a + "v_proj.weight"] = (kv_rows, h)
            out[a + "o_proj.weight"] = (h, q_rows)
            out[a + "q_norm.weight"] = (d,)
            out[a + "k_norm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        mlp_schema(config, i, p, out)

    for i in range(config.num_layers):
        layer(i, f"model.layers.{i}.")
    for k in range(config.num_mtp_layers):
        out["mtp.fc.weight"] = (h, 2 * h)
        out["mtp.pre_fc_norm_embedding.weight"] = (h,)
        out["mtp.pre_fc_norm_hidden.weight"] = (h,)
        layer(config.num_layers + k, f"mtp.layers.{k}.")
        out["mtp.norm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    head_schema(config, out)
    return out


# -- rows ------------------------------------------------------------------------------------

L = "decoder.layers.{layer}."
H = "model.layers.{layer}."
A = L + "self_attention."
LIN = H + "linear_attn."
ATT = H + "self_attn."


def gdn_in_proj(config: ModelConfig, params: NativeParams) -> GroupGDNInProj:
    """GroupGDNInProj of the config's GDN sizes."""
    g = gdn_sizes(config.hf)
    return GroupGDNInProj(g.num_key_heads, g.key_head_dim, g.value_heads_per_key,
                          g.value_head_dim)


def gdn_conv1d(config: ModelConfig, params: NativeParams) -> RowBlocks:
    """RowBlocks of the conv1d channels: [q_all; k_all; v_all]."""
    g = gdn_sizes(config.hf)
    return RowBlocks((g.key_dim, g.key_dim, g.value_dim))


def gated_qkv(config: ModelConfig, params: NativeParams) -> InterleaveGatedQKV:
    """InterleaveGatedQKV of the config's heads."""
    return InterleaveGatedQKV(config.num_key_value_heads, config.heads_per_group,
                              config.head_dim)


_LINEAR = "linear_attention_layer"
_FULL = "full_attention_layer"

_LINEAR_ROWS: tuple[Row, ...] = (
    Row(A + "in_proj.layer_norm_weight", one(H + "input_layernorm.weight"), when=_LINEAR),
    Row(A + "in_proj.weight",
        {"qkvz": LIN + "in_proj_qkvz.weight", "ba": LIN + "in_proj_ba.weight"},
        gdn_in_proj, Partition.BLOCKS, when=_LINEAR),
    Row(A + "conv1d.weight", one(LIN + "conv1d.weight"), gdn_conv1d, Partition.BLOCKS,
        when=_LINEAR),
    Row(A + "A_log", one(LIN + "A_log"), partition=Partition.COLUMN, when=_LINEAR),
    Row(A + "dt_bias", one(LIN + "dt_bias"), partition=Partition.COLUMN, when=_LINEAR),
    Row(A + "out_norm.weight", one(LIN + "norm.weight"), ZeroCentre(), when=_LINEAR),
    Row(A + "out_proj.weight", one(LIN + "out_proj.weight"), partition=Partition.ROW,
        when=_LINEAR),
)

_FULL_ROWS: tuple[Row, ...] = (
    Row(A + "linear_qkv.layer_norm_weight", one(H + "input_layernorm.weight"), when=_FULL),
    Row(A + "linear_qkv.weight",
        {"q": ATT + "q_proj.weight", "k": ATT + "k_proj.weight", "v": ATT + "v_proj.weight"},
        gated_qkv, Partition.QKV, when=_FULL),
    Row(A + "q_layernorm.weight", one(ATT + "q_norm.weight"), when=_FULL),
    Row(A + "k_layernorm.weight", one(ATT + "k_norm.weight"), when=_FULL),
    Row(A + "linear_proj.weight", one(ATT + "o_proj.weight"), partition=Partition.ROW,
        when=_FULL),
)

_MLP_ROWS: tuple[Row, ...] = (
    # The TE spec: the post-attention norm is fused into a dense layer's linear_fc1 and is
    # pre_mlp_layernorm before a routed MLP.
    Row(L + "mlp.linear_fc1.layer_norm_weight", one(H + "post_attention_layernorm.weight"),
        when="dense_layer"),
    Row(L + "pre_mlp_layernorm.weight", one(H + "post_attention_layernorm.weight"),
        when="moe_layer"),
    *dense_mlp_rows(),
    *moe_mlp_rows(NAMES),
)


def _as_mtp(row: Row) -> Row:
    """A full-attention decoder-layer row moved to MTP layer ``{mtp}``'s ``transformer_layer``
    (megatron-core 0.16.1's name; Megatron-Bridge's table says ``mtp_model_layer``)."""
    return dataclasses.replace(
        row, native=row.native.replace(L, "mtp.layers.{mtp}.transformer_layer."),
        ir={role: n.replace(H, "mtp.layers.{mtp}.") for role, n in row.ir.items()},
        when=tuple(c for c in row.conditions if c != _FULL) or None)


M = "mtp.layers.{mtp}."

QWEN3_NEXT_MCORE_ROWS: tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", one("model.embed_tokens.weight"), pad_vocab,
        Partition.VOCAB),
    *_LINEAR_ROWS,
    *_FULL_ROWS,
    *_MLP_ROWS,
    Row("decoder.final_layernorm.weight", one("model.norm.weight")),
    Row(M + "enorm.weight", one("mtp.pre_fc_norm_embedding.weight")),
    Row(M + "hnorm.weight", one("mtp.pre_fc_norm_hidden.weight")),
    Row(M + "eh_proj.weight", one("mtp.fc.weight"), partition=Partition.COLUMN),
    *map(_as_mtp, _FULL_ROWS + _MLP_ROWS),
    Row(M + "final_layernorm.weight", one("mtp.norm.weight")),
    Row("output_layer.weight", one("lm_head.weight"), pad_vocab, Partition.VOCAB,
        when="is_untied"),
    VALUE_HEAD_ROW,
)


# -- Megatron-Core config ----------------------------------------------------------------------

def _megatron(config: ModelConfig, notes: list[str]) -> dict[str, Any]:
    """TransformerConfig fields of Megatron-Bridge's Qwen3-Next provider (§5.4): softmax
    routing over the top k, GDN sizes, the gated attention, zero-centred norms."""
    hf, g = config.hf, gdn_sizes(config.hf)
    tc: dict[str, Any] = {
        "experimental_attention_variant": "gated_delta_net",
        # megatron-core's pattern: 1 = linear (GDN), 0 = full attention.
        "linear_attention_freq": [int(i in config.linear_attention_layers)
                                  for i in range(config.num_layers)],
        "linear_conv_kernel_dim": g.conv_kernel,
        "linear_key_head_dim": g.key_head_dim,
        "linear_value_head_dim": g.value_head_dim,
        "linear_num_key_heads": g.num_key_heads,
        "linear_num_value_heads": g.num_value_heads,
        "attention_output_gate": True,
        "layernorm_zero_centered_gamma": True,
        "qk_layernorm": True,
        "moe_shared_expert_gate": True,
        "hetereogenous_dist_checkpoint": True,
    }
    if not hf.get("norm_topk_prob", True):
        tc["moe_router_pre_softmax"] = True
    if config.num_mtp_layers:
        tc["mtp_num_layers"] = config.num_mtp_layers
    notes.append("qwen3_next builds only with the TE layer spec and flash-linear-attention "
                 "(get_transformer_block_with_experimental_attention_variant_spec)")
    return tc


def _from_megatron(args: Mapping[str, Any], moe: MegatronMoe) -> dict[str, Any]:
    layers = len(moe.pattern)
    freq = megatron_arg(args, "linear_attention_freq", default=4)
    if isinstance(freq, int) and not isinstance(freq, bool) and freq >= 1:
        linear = [int((i + 1) % freq != 0) for i in range(layers)]
    elif isinstance(freq, (list, tuple)) and len(freq) == layers and all(
            v in (0, 1) for v in freq):
        linear = [int(v) for v in freq]
    else:
        raise FormatError(f"linear_attention_freq {freq!r} is not an int or a 0/1 list of "
                          f"{layers} layers")
    out: dict[str, Any] = {
        "num_experts": moe.experts, "num_experts_per_tok": moe.topk,
        "moe_intermediate_size": moe.ffn, "shared_expert_intermediate_size": moe.shared,
        "mlp_only_layers": moe.dense, "decoder_sparse_step": 1,
        "norm_topk_prob": not moe.pre_softmax,
        "layer_types": ["linear_attention" if v else "full_attention" for v in linear],
        "num_nextn_predict_layers": int(megatron_arg(args, "mtp_num_layers", default=0) or 0),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(megatron_arg(args, "rotary_base", default=1e7)),
            "partial_rotary_factor": float(megatron_arg(args, "rotary_percent", default=0.25))},
    }
    for name, default in (("linear_conv_kernel_dim", 4), ("linear_key_head_dim", 128),
                          ("linear_value_head_dim", 128), ("linear_num_key_heads", 16),
                          ("linear_num_value_heads", 32)):
        out[name] = int(megatron_arg(args, name, default=default))
    return out


QWEN3_NEXT = Architecture(
    "qwen3_next", "Qwen3Next",
    {"mcore": QWEN3_NEXT_MCORE_ROWS, "hf": fused_hf_rows(NAMES)},
    moe=NAMES, schema=schema, hf_fields=_hf_fields, qk_norm=True, check_moe=_check,
    megatron_moe=_megatron, hf_moe_from_megatron=_from_megatron,
    megatron_guess=(-1, ("linear_attention_freq",)))
