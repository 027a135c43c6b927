"""The Qwen vision-language family: Qwen2.5-VL (``qwen2_5_vl``), Qwen3-VL (``qwen3_vl``) and
Qwen3-VL-MoE (``qwen3_vl_moe``).

Each is a text family's language model (qwen2, qwen3, qwen3_moe: their IR names and rows,
see :mod:`ckpt_ir.architectures.vision`) plus a vision tower with its patch merger. Names and
shapes: /work/shared/reference/architectures-wave2.md §3 (transformers 5.23 ``save_pretrained``
and the published Qwen3-VL-30B-A3B list; Megatron-Bridge ``qwen_vl/qwen25_vl_bridge.py`` and
``qwen3_vl_bridge.py`` @067f987d).

On disk (``hf``):

* qwen2_5_vl: transformers 5.23 holds ``model.language_model.*`` / ``model.visual.*`` in memory
  but writes the legacy names ``model.layers.*`` / ``visual.*``: the IR names, as they are.
* qwen3_vl(_moe): ``model.language_model.*`` (hf prefix rows) and ``model.visual.*`` (IR).
  Experts are always fused, in two orientations: the hub's ``[E, H, 2F]`` / ``[E, F, H]`` and
  the transpose transformers 5 saves (``[E, 2F, H]`` / ``[E, H, F]``); the reader tells them
  apart by shape (:func:`hf_expert_layout`), the writer writes transformers 5's.

In Megatron (``mcore``), as Megatron-Bridge's models name their parameters:

* the language model under ``language_model.`` (GPTModel names: ``language_model.decoder.
  layers.{layer}.…``);
* Qwen2.5-VL's tower is transformers' own module at ``visual.`` (``ReplicatedMapping
  "visual.**"``): same names, no transform, whole on every TP rank;
* Qwen3-VL's is a Megatron vision model at ``vision_model.``: a TransformerBlock
  (``decoder.layers.{block}``, LayerNorm fused into ``linear_qkv`` / ``linear_fc1``, per-head
  QKV interleave with one head per group, non-gated GELU MLP with biases), ``patch_embed``,
  ``pos_embed``, ``merger`` (``patch_norm``, ``linear_fc1``, ``linear_fc2``) and
  ``decoder.deepstack_merger_list.{j}``. Its linear layers split across TP like the language
  model's (QKV by heads, fc1 by rows, proj / fc2 by columns); norms, patch and position
  embeddings are replicated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.dense import DENSE_MCORE_ROWS
from ckpt_ir.architectures.moe import moe_mcore_rows
from ckpt_ir.architectures.qwen_moe import QWEN3_MOE_NAMES
from ckpt_ir.architectures.qwen_moe import _hf_fields as _qwen_moe_fields
from ckpt_ir.architectures.record import MAX_LAYER_EXPERTS, Architecture, hf_int, hf_int_list
from ckpt_ir.architectures.schema import decoder_schema
from ckpt_ir.architectures.vision import (
    HubStackExperts,
    InterleaveHeads,
    ModelPart,
    lm_prefix_rows,
    prefixed,
    text_config_of,
    vision_config_of,
)
from ckpt_ir.errors import FormatError
from ckpt_ir.layout import Partition
from ckpt_ir.table_engine import NativeParams, Row, one
from ckpt_ir.transforms import TENSOR, StackExperts

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig, Shape

__all__ = ["QWEN2_5_VL", "QWEN3_VL", "QWEN3_VL_MOE", "VisionSizes", "hf_expert_layout",
           "vision_sizes"]


class VisionSizes:
    """The vision tower's sizes, read from ``vision_config`` (integers only)."""

    def __init__(self, v: Mapping[str, Any], *, deepstack: bool) -> None:
        self.depth = hf_int(v, "depth")
        self.hidden = hf_int(v, "hidden_size")
        self.heads = hf_int(v, "num_heads")
        self.ffn = hf_int(v, "intermediate_size")
        self.channels = hf_int(v, "in_channels", default=3)
        self.patch = hf_int(v, "patch_size")
        self.temporal = hf_int(v, "temporal_patch_size")
        self.merge = hf_int(v, "spatial_merge_size")
        self.out = hf_int(v, "out_hidden_size")
        self.positions = hf_int(v, "num_position_embeddings", default=0)
        self.deepstack = len(hf_int_list(v, "deepstack_visual_indexes")) if deepstack else 0
        sizes = (self.depth, self.hidden, self.heads, self.ffn, self.channels, self.patch,
                 self.temporal, self.merge, self.out)
        if min(sizes) <= 0 or self.positions < 0:
            raise ValueError("vision_config sizes must be positive")
        if self.depth > MAX_LAYER_EXPERTS or self.hidden % self.heads:
            raise ValueError(f"vision_config: depth={self.depth}, hidden_size={self.hidden} "
                             f"over num_heads={self.heads} is not a vision tower")
        if self.deepstack > self.depth:
            raise ValueError("vision_config lists more deepstack taps than blocks")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def merged(self) -> int:
        """The patch merger's width: ``spatial_merge_size²`` patches side by side."""
        return self.merge * self.merge * self.hidden


def vision_sizes(config: ModelConfig) -> VisionSizes:
    return VisionSizes(vision_config_of(config.hf), deepstack=config.architecture != "qwen2_5_vl")


# -- config -----------------------------------------------------------------------------------

def _tower_fields(hf: Mapping[str, Any], *, deepstack: bool) -> dict[str, Any]:
    v = VisionSizes(vision_config_of(hf), deepstack=deepstack)
    text = text_config_of(hf)
    if v.out != hf_int(text, "hidden_size"):
        raise FormatError(f"vision_config.out_hidden_size={v.out} is not the language model's "
                          f"hidden_size={hf_int(text, 'hidden_size')}: the merger would not "
                          "feed it")
    # Qwen3-VL's Megatron vision block is split over TP by heads (Qwen2.5-VL's is replicated).
    return {"vision_blocks": v.depth, "deepstack_mergers": v.deepstack,
            "vision_split_heads": v.heads if deepstack else 0}


def _qwen2_5_vl_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    return _tower_fields(hf, deepstack=False)


def _qwen3_vl_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    return _tower_fields(hf, deepstack=True)


def _qwen3_vl_moe_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    return {**_tower_fields(hf, deepstack=True), **_qwen_moe_fields(text_config_of(hf), layers)}


def _qwen2_qkv_bias(hf: Mapping[str, Any]) -> bool:
    """Qwen2.5-VL's language model is qwen2: q/k/v biases always."""
    return True


def _router(config: ModelConfig, notes: list[str]) -> dict[str, Any]:
    """qwen3_moe's router (``norm_topk_prob`` false: megatron-core's pre-softmax)."""
    return {} if config.text_hf.get("norm_topk_prob", False) else {"moe_router_pre_softmax": True}


# -- schema -----------------------------------------------------------------------------------

def _qwen2_5_vl_schema(config: ModelConfig) -> dict[str, Shape]:
    """The tower (``visual.*``, RMSNorms, gated MLP with biases, no patch bias) then the
    qwen2 language model."""
    v = vision_sizes(config)
    h, f, m = v.hidden, v.ffn, v.merged
    out: dict[str, Shape] = {
        "visual.patch_embed.proj.weight": (h, v.channels, v.temporal, v.patch, v.patch)}
    for i in range(v.depth):
        b = f"visual.blocks.{i}."
        out |= {b + "norm1.weight": (h,), b + "norm2.weight": (h,),
                b + "attn.qkv.weight": (3 * h, h), b + "attn.qkv.bias": (3 * h,),
                b + "attn.proj.weight": (h, h), b + "attn.proj.bias": (h,),
                b + "mlp.gate_proj.weight": (f, h), b + "mlp.gate_proj.bias": (f,),
                b + "mlp.up_proj.weight": (f, h), b + "mlp.up_proj.bias": (f,),
                b + "mlp.down_proj.weight": (h, f), b + "mlp.down_proj.bias": (h,)}
    out |= {"visual.merger.ln_q.weight": (h,),
            "visual.merger.mlp.0.weight": (m, m), "visual.merger.mlp.0.bias": (m,),
            "visual.merger.mlp.2.weight": (v.out, m), "visual.merger.mlp.2.bias": (v.out,)}
    return out | decoder_schema(config)


def _merger(p: str, norm: int, m: int, out_size: int) -> dict[str, Shape]:
    return {p + "norm.weight": (norm,), p + "norm.bias": (norm,),
            p + "linear_fc1.weight": (m, m), p + "linear_fc1.bias": (m,),
            p + "linear_fc2.weight": (out_size, m), p + "linear_fc2.bias": (out_size,)}


def _qwen3_vl_schema(config: ModelConfig) -> dict[str, Shape]:
    """The tower (``model.visual.*``: LayerNorms, patch bias, learned positions, GELU MLP,
    merger and deepstack mergers) then the qwen3 / qwen3_moe language model."""
    v = vision_sizes(config)
    h, f, m = v.hidden, v.ffn, v.merged
    p = "model.visual."
    out: dict[str, Shape] = {
        p + "patch_embed.proj.weight": (h, v.channels, v.temporal, v.patch, v.patch),
        p + "patch_embed.proj.bias": (h,),
        p + "pos_embed.weight": (v.positions, h)}
    for i in range(v.depth):
        b = f"{p}blocks.{i}."
        out |= {b + "norm1.weight": (h,), b + "norm1.bias": (h,),
                b + "norm2.weight": (h,), b + "norm2.bias": (h,),
                b + "attn.qkv.weight": (3 * h, h), b + "attn.qkv.bias": (3 * h,),
                b + "attn.proj.weight": (h, h), b + "attn.proj.bias": (h,),
                b + "mlp.linear_fc1.weight": (f, h), b + "mlp.linear_fc1.bias": (f,),
                b + "mlp.linear_fc2.weight": (h, f), b + "mlp.linear_fc2.bias": (h,)}
    # The main merger's norm runs before the 2x2 shuffle (width H), a deepstack merger's after
    # it (width 4H): architectures-wave2 §3.6 trap 5.
    out |= _merger(p + "merger.", h, m, v.out)
    for j in range(v.deepstack):
        out |= _merger(f"{p}deepstack_merger_list.{j}.", m, m, v.out)
    return out | decoder_schema(config)


# -- rows -------------------------------------------------------------------------------------

def _interleave_heads(config: ModelConfig, params: NativeParams) -> InterleaveHeads:
    """InterleaveHeads over the vision tower's heads."""
    v = vision_sizes(config)
    return InterleaveHeads(v.heads, v.head_dim)


# Megatron-Bridge's Qwen25VLModel holds transformers' vision module itself: identical names.
_Q25_TOWER = ("patch_embed.proj.weight",
              *(f"blocks.{{block}}.{s}" for s in (
                  "norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias",
                  "attn.proj.weight", "attn.proj.bias",
                  "mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight",
                  "mlp.up_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")),
              "merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.0.bias",
              "merger.mlp.2.weight", "merger.mlp.2.bias")
QWEN2_5_VL_TOWER_ROWS: tuple[Row, ...] = tuple(
    Row("visual." + s, one("visual." + s)) for s in _Q25_TOWER)

V = "vision_model."
VL = V + "decoder.layers.{block}."
VB = "model.visual.blocks.{block}."
VD = "model.visual.deepstack_merger_list.{deepstack}."


def _merger_rows(native: str, hf: str) -> tuple[Row, ...]:
    return (
        Row(native + "patch_norm.weight", one(hf + "norm.weight")),
        Row(native + "patch_norm.bias", one(hf + "norm.bias")),
        Row(native + "linear_fc1.weight", one(hf + "linear_fc1.weight"),
            partition=Partition.COLUMN),
        Row(native + "linear_fc1.bias", one(hf + "linear_fc1.bias"), partition=Partition.COLUMN),
        Row(native + "linear_fc2.weight", one(hf + "linear_fc2.weight"), partition=Partition.ROW),
        Row(native + "linear_fc2.bias", one(hf + "linear_fc2.bias")),
    )


QWEN3_VL_TOWER_ROWS: tuple[Row, ...] = (
    Row(V + "patch_embed.proj.weight", one("model.visual.patch_embed.proj.weight")),
    Row(V + "patch_embed.proj.bias", one("model.visual.patch_embed.proj.bias")),
    Row(V + "pos_embed.weight", one("model.visual.pos_embed.weight")),
    Row(VL + "self_attention.linear_qkv.layer_norm_weight", one(VB + "norm1.weight")),
    Row(VL + "self_attention.linear_qkv.layer_norm_bias", one(VB + "norm1.bias")),
    Row(VL + "self_attention.linear_qkv.weight", one(VB + "attn.qkv.weight"),
        _interleave_heads, Partition.QKV),
    Row(VL + "self_attention.linear_qkv.bias", one(VB + "attn.qkv.bias"),
        _interleave_heads, Partition.QKV),
    Row(VL + "self_attention.linear_proj.weight", one(VB + "attn.proj.weight"),
        partition=Partition.ROW),
    Row(VL + "self_attention.linear_proj.bias", one(VB + "attn.proj.bias")),
    Row(VL + "mlp.linear_fc1.layer_norm_weight", one(VB + "norm2.weight")),
    Row(VL + "mlp.linear_fc1.layer_norm_bias", one(VB + "norm2.bias")),
    Row(VL + "mlp.linear_fc1.weight", one(VB + "mlp.linear_fc1.weight"),
        partition=Partition.COLUMN),
    Row(VL + "mlp.linear_fc1.bias", one(VB + "mlp.linear_fc1.bias"), partition=Partition.COLUMN),
    Row(VL + "mlp.linear_fc2.weight", one(VB + "mlp.linear_fc2.weight"),
        partition=Partition.ROW),
    Row(VL + "mlp.linear_fc2.bias", one(VB + "mlp.linear_fc2.bias")),
    *_merger_rows(V + "merger.", "model.visual.merger."),
    # Under decoder.: the deepstack mergers belong to Megatron-Bridge's vision block.
    *_merger_rows(V + "decoder.deepstack_merger_list.{deepstack}.", VD),
)

LM = "language_model."


# qwen3_vl_moe's fused experts: hub [E, H, 2F] / [E, F, H] or transformers 5's transpose.
def _gate_up(config: ModelConfig, params: NativeParams) -> StackExperts | HubStackExperts:
    """StackExperts of [gate; up] (transformers 5 save) or HubStackExperts (hub)."""
    cls = HubStackExperts if params.hf_experts == "fused-hub" else StackExperts
    return cls(config.num_experts, ("gate", "up"))


def _down(config: ModelConfig, params: NativeParams) -> StackExperts | HubStackExperts:
    """StackExperts of down_proj (transformers 5 save) or HubStackExperts (hub)."""
    cls = HubStackExperts if params.hf_experts == "fused-hub" else StackExperts
    return cls(config.num_experts)


_X = "model.layers.{layer}.mlp.experts.{expert}."
_MOE_HF_ROWS: tuple[Row, ...] = (
    Row("model.language_model.layers.{layer}.mlp.experts.gate_up_proj",
        {"gate": _X + "gate_proj.weight", "up": _X + "up_proj.weight"}, _gate_up,
        when="moe_layer", stack="expert"),
    Row("model.language_model.layers.{layer}.mlp.experts.down_proj",
        {TENSOR: _X + "down_proj.weight"}, _down, when="moe_layer", stack="expert"),
)


def hf_expert_layout(config: ModelConfig, shapes: Mapping[str, Shape]) -> str:
    """``"fused"`` (transformers 5's ``[E, 2F, H]``) or ``"fused-hub"`` (``[E, H, 2F]``), from
    the first MoE layer's ``gate_up_proj`` shape; when ``H == 2F`` the shape cannot tell, and
    the config's ``transformers_version`` does (4.x wrote the hub layout, 5.x the other)."""
    if not config.is_moe or not config.moe_layers:
        return "per-expert"
    name = f"model.language_model.layers.{config.moe_layers[0]}.mlp.experts.gate_up_proj"
    shape = shapes.get(name)
    if shape is None or len(shape) != 3:
        return "fused"  # the planner reports the missing / misshapen tensor
    h, f2 = config.hidden_size, 2 * config.moe_intermediate_size
    if h != f2:
        return "fused-hub" if tuple(shape[1:]) == (h, f2) else "fused"
    version = str(config.hf.get("transformers_version") or "")
    if not version[:1].isdigit():
        raise FormatError(f"{name} is [{shape[0]}, {h}, {h}]: hidden_size equals twice "
                          "moe_intermediate_size, so only the config's transformers_version "
                          "could tell the hub layout from transformers 5's, and it has none")
    return "fused" if int(version.split(".")[0]) >= 5 else "fused-hub"


def _parts(config: ModelConfig) -> list[ModelPart]:
    """The language model, the vision tower, its merger and deepstack mergers."""
    v = vision_sizes(config)
    q25 = config.architecture == "qwen2_5_vl"
    tower, native = ("visual.", "visual.") if q25 else ("model.visual.", V)
    vc = vision_config_of(config.hf)
    attention = (f", window {vc.get('window_size')} px, full attention in blocks "
                 f"{vc.get('fullatt_block_indexes')}" if q25 else "")
    out = [
        ModelPart("language model", "model.", LM,
                  f"{config.num_layers} layers ({'qwen2' if q25 else 'qwen3'} "
                  f"{'MoE ' if config.is_moe else ''}rows), mrope", tower=False),
        ModelPart("vision tower", tower + "blocks.",
                  native + ("blocks." if q25 else "decoder.layers."),
                  f"{v.depth} blocks, hidden {v.hidden}, {v.heads} heads, ffn {v.ffn}, patch "
                  f"{v.temporal}x{v.patch}x{v.patch} from {v.channels} channels{attention}",
                  note="transformers' module, replicated over TP" if q25 else
                  "QKV interleaved per head, linear layers split over TP"),
        ModelPart("patch merger", tower + "merger.", native + "merger.",
                  f"{v.merge}x{v.merge} patches ({v.merged}) -> {v.out}",
                  note="replicated over TP" if q25 else "fc1 split by rows, fc2 by columns"),
    ]
    out.append(ModelPart("patch embedding", tower + "patch_embed.", native + "patch_embed.",
                         f"Conv3d {'without' if q25 else 'with'} bias", note="replicated"))
    if not q25:
        out.append(ModelPart("position embedding", tower + "pos_embed.", native + "pos_embed.",
                             f"{v.positions} x {v.hidden}, bilinearly interpolated",
                             note="replicated"))
    if v.deepstack:
        taps = vision_config_of(config.hf).get("deepstack_visual_indexes")
        out.append(ModelPart("deepstack mergers", tower + "deepstack_merger_list.",
                             V + "decoder.deepstack_merger_list.",
                             f"{v.deepstack}, after vision blocks {taps}, added to the "
                             f"language model after its layers 0..{v.deepstack - 1}",
                             note="fc1 split by rows, fc2 by columns"))
    return out


QWEN2_5_VL = Architecture(
    "qwen2_5_vl", "Qwen2_5_VL",
    {"mcore": (*QWEN2_5_VL_TOWER_ROWS, *prefixed(DENSE_MCORE_ROWS, LM))},
    schema=_qwen2_5_vl_schema, hf_fields=_qwen2_5_vl_fields, qkv_bias=_qwen2_qkv_bias,
    attention_bias_refused=False, spells_attention_bias=False, text_config=text_config_of,
    mcore_prefix=LM, parts=_parts,
    hf_module_prefix="model.language_model.")

QWEN3_VL = Architecture(
    "qwen3_vl", "Qwen3VL",
    {"mcore": (*QWEN3_VL_TOWER_ROWS, *prefixed(DENSE_MCORE_ROWS, LM)),
     "hf": lm_prefix_rows("model.language_model.")},
    schema=_qwen3_vl_schema, hf_fields=_qwen3_vl_fields, qk_norm=True,
    text_config=text_config_of, mcore_prefix=LM, parts=_parts,
    hf_module_prefix="model.language_model.")

QWEN3_VL_MOE = Architecture(
    "qwen3_vl_moe", "Qwen3VLMoe",
    {"mcore": (*QWEN3_VL_TOWER_ROWS, *prefixed(moe_mcore_rows(QWEN3_MOE_NAMES), LM)),
     "hf": (*lm_prefix_rows("model.language_model."), *_MOE_HF_ROWS)},
    moe=QWEN3_MOE_NAMES, schema=_qwen3_vl_schema, hf_fields=_qwen3_vl_moe_fields, qk_norm=True,
    megatron_moe=_router, text_config=text_config_of, mcore_prefix=LM,
    hf_expert_layout=hf_expert_layout, parts=_parts,
    hf_module_prefix="model.language_model.")
