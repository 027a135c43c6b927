"""Vision-language models whose tower and projector are carried as they are: Gemma 3
(``gemma3``, ``Gemma3ForConditionalGeneration``: SigLIP tower, Gemma 3 projector,
``gemma3_text`` language model) and Mistral 3 / Ministral 3 (``mistral3``,
``Mistral3ForConditionalGeneration``: Pixtral tower, patch merger and projector, ``ministral3``
language model).

The language model keeps its text family's IR names and rows (:mod:`ckpt_ir.architectures.
gemma`, :mod:`ckpt_ir.architectures.ministral3`), named per format as for the Qwen VL family
(:mod:`ckpt_ir.architectures.vision`):

* ``hf``: ``language_model.model.*`` and ``language_model.lm_head.weight``, what the hub files
  hold and transformers 5.23 ``save_pretrained`` writes (in memory it is
  ``model.language_model.*``, the PEFT names);
* ``mcore``: Megatron-Bridge's ``language_model.`` + GPTModel names.

The tower and projector have no Megatron module in megatron-core or any peer: Megatron-Bridge
keeps transformers' modules inside its VL model (``ReplicatedMapping``), whole on every TP
rank of the first pipeline stage. Their IR names are transformers 5.23's on-disk names
(``vision_tower.*``, ``multi_modal_projector.*``); in Megatron they keep those names, with one
exception Megatron-Bridge's ``Gemma3VLModel`` makes: Gemma 3's projection
``mm_input_projection_weight`` ``[Hv, H]`` (a raw parameter used as ``x @ W``) is its
``multi_modal_projector.proj.weight`` ``[H, Hv]`` (a Linear: the transpose), and
``mm_soft_emb_norm`` is ``mm_soft_embed_norm``.

Gemma 3's tower has two on-disk spellings: the hub's ``vision_tower.vision_model.*`` and
transformers 5.23's ``vision_tower.*`` (it writes the latter, reads both). Reading tells them
apart by name (:func:`gemma3_tower_spelling`); writing writes transformers 5.23's.

Facts: /work/shared/reference/architectures-wave2.md section 6.6 (Gemma 3 multimodal;
Megatron-Bridge ``gemma_vl/gemma3_vl_bridge.py``) and 7.4 (Mistral 3; Megatron-Bridge
``ministral3/ministral3_bridge.py``), and transformers 5.23 saves of both (docs/vision-language.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.dense import DENSE_MCORE_ROWS
from ckpt_ir.architectures.gemma import GEMMA3_TEXT, GEMMA_MCORE_ROWS, gemma_schema
from ckpt_ir.architectures.ministral3 import MINISTRAL3
from ckpt_ir.architectures.record import (
    MAX_LAYER_EXPERTS,
    Architecture,
    MegatronExtra,
    hf_int,
)
from ckpt_ir.architectures.schema import decoder_schema
from ckpt_ir.architectures.vision import (
    LM_LAYER_SUFFIXES,
    ModelPart,
    lm_prefix_rows,
    prefixed,
    text_config_of,
    vision_config_of,
)
from ckpt_ir.errors import FormatError, InternalError
from ckpt_ir.table_engine import Row, one
from ckpt_ir.transforms import TENSOR, Transform

if TYPE_CHECKING:
    import torch

    from ckpt_ir.ir import ModelConfig, Shape

__all__ = ["GEMMA3", "HUB_TOWER", "MISTRAL3", "Transpose", "gemma3_tower_spelling"]

LM = "language_model."
TOWER = "vision_tower."
PROJ = "multi_modal_projector."
# NativeParams.hf_experts value of a Gemma 3 file in the hub's spelling (the table engine's
# ``hub_vision_tower`` condition): the hook that picks an ``hf`` variant from a file's names.
HUB_TOWER = "vision-model"


@dataclass(frozen=True, slots=True)
class Transpose(Transform):
    """A 2-D tensor stored transposed: Gemma 3's projection as a raw ``x @ W`` parameter
    (transformers) and as a Linear's ``W x`` weight (Megatron-Bridge)."""

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        t = parts[TENSOR]
        if t.dim() != 2:
            raise InternalError(f"Transpose of a {t.dim()}-D tensor")
        return t.t().contiguous()

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        if native.dim() != 2:
            raise InternalError(f"Transpose of a {native.dim()}-D tensor")
        return {TENSOR: native.t().contiguous()}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        rows, cols = parts[TENSOR]
        return (cols, rows)


def _text_view(config: ModelConfig) -> ModelConfig:
    """``config`` with its language model's flat config as ``hf``: the text family's Megatron
    hooks read their fields (softcaps, windows, RoPE) from ``config.hf``."""
    return dataclasses.replace(config, hf=MappingProxyType(dict(config.text_hf)))


def _positive(v: Mapping[str, Any], *names: str, default: int | None = None) -> int:
    n = hf_int(v, *names, default=default)
    if n <= 0:
        raise ValueError(f"vision_config {names[0]} must be positive")
    return n


# -- Gemma 3 (SigLIP) -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SiglipSizes:
    depth: int
    hidden: int
    heads: int
    ffn: int
    channels: int
    patch: int
    positions: int


def siglip_sizes(hf: Mapping[str, Any]) -> SiglipSizes:
    v = vision_config_of(hf)
    if v.get("vision_use_head"):
        # Gemma 3 runs the tower without SigLIP's pooling head; no published file has one.
        raise FormatError("gemma3 with vision_config.vision_use_head=true is not supported "
                          "(Gemma 3 uses no SigLIP pooling head)")
    depth = _positive(v, "num_hidden_layers")
    hidden, heads = _positive(v, "hidden_size"), _positive(v, "num_attention_heads")
    image, patch = _positive(v, "image_size"), _positive(v, "patch_size")
    if depth > MAX_LAYER_EXPERTS or hidden % heads or image % patch:
        raise ValueError(f"vision_config: {depth} layers, hidden_size {hidden} over {heads} "
                         f"heads, image_size {image} over patch_size {patch} is not a tower")
    return SiglipSizes(depth, hidden, heads, _positive(v, "intermediate_size"),
                       _positive(v, "num_channels", default=3), patch, (image // patch) ** 2)


_SIGLIP_LAYER = tuple(
    f"{m}.{p}" for m in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj",
                         "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    for p in ("weight", "bias"))
_SIGLIP_TOP = ("embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
               "embeddings.position_embedding.weight")
_SIGLIP_TAIL = ("post_layernorm.weight", "post_layernorm.bias")
# Tower tensors under vision_tower. (transformers 5.23's spelling), {block} per encoder layer.
_SIGLIP = (*_SIGLIP_TOP, *(f"encoder.layers.{{block}}.{s}" for s in _SIGLIP_LAYER),
           *_SIGLIP_TAIL)


def _gemma3_schema(config: ModelConfig) -> dict[str, Shape]:
    """The SigLIP tower, the projector, then the gemma3_text language model."""
    v = siglip_sizes(config.hf)
    h, f = v.hidden, v.ffn
    t = TOWER + "encoder.layers."
    out: dict[str, Shape] = {
        TOWER + "embeddings.patch_embedding.weight": (h, v.channels, v.patch, v.patch),
        TOWER + "embeddings.patch_embedding.bias": (h,),
        TOWER + "embeddings.position_embedding.weight": (v.positions, h)}
    for i in range(v.depth):
        p = f"{t}{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            out |= {f"{p}{norm}.weight": (h,), f"{p}{norm}.bias": (h,)}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out |= {f"{p}self_attn.{proj}.weight": (h, h), f"{p}self_attn.{proj}.bias": (h,)}
        out |= {p + "mlp.fc1.weight": (f, h), p + "mlp.fc1.bias": (f,),
                p + "mlp.fc2.weight": (h, f), p + "mlp.fc2.bias": (h,)}
    out |= {TOWER + "post_layernorm.weight": (h,), TOWER + "post_layernorm.bias": (h,),
            PROJ + "mm_input_projection_weight": (h, config.hidden_size),
            PROJ + "mm_soft_emb_norm.weight": (h,)}
    return out | gemma_schema(config)


def _gemma3_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    return {"vision_blocks": siglip_sizes(hf).depth}


def gemma3_tower_spelling(config: ModelConfig, shapes: Mapping[str, Shape]) -> str:
    """:data:`HUB_TOWER` when the file spells the tower as the hub does
    (``vision_tower.vision_model.*``), else "per-expert" (transformers 5.23's ``vision_tower.*``;
    the ``hf`` identity)."""
    return HUB_TOWER if any(n.startswith(TOWER + "vision_model.") for n in shapes) \
        else "per-expert"


GEMMA3_HF_ROWS: tuple[Row, ...] = (
    *lm_prefix_rows(LM + "model.", (*LM_LAYER_SUFFIXES, "pre_feedforward_layernorm.weight",
                                    "post_feedforward_layernorm.weight")),
    Row(LM + "lm_head.weight", one("lm_head.weight"), when="is_untied"),
    *(Row(TOWER + "vision_model." + s, one(TOWER + s), when="hub_vision_tower")
      for s in _SIGLIP),
)

GEMMA3_MCORE_ROWS: tuple[Row, ...] = (
    *(Row(TOWER + s, one(TOWER + s)) for s in _SIGLIP),
    Row(PROJ + "proj.weight", one(PROJ + "mm_input_projection_weight"), Transpose()),
    Row(PROJ + "mm_soft_embed_norm.weight", one(PROJ + "mm_soft_emb_norm.weight")),
    *prefixed(GEMMA_MCORE_ROWS, LM),
)


def _text_megatron(text: Architecture) -> Callable[[ModelConfig, list[str]], MegatronExtra]:
    """A VL model's Megatron settings: its language model's record's, on the text config."""

    def megatron(config: ModelConfig, notes: list[str]) -> MegatronExtra:
        extra = text.megatron_extra
        if extra is None:
            raise InternalError(f"{text.name} has no Megatron settings")
        return extra(_text_view(config), notes)

    return megatron


def _gemma3_parts(config: ModelConfig) -> list[ModelPart]:
    v = siglip_sizes(config.hf)
    side = int(v.positions ** 0.5)
    return [
        ModelPart("language model", "model.", LM,
                  f"{config.num_layers} layers (gemma3_text rows)", tower=False),
        ModelPart("vision tower", TOWER, TOWER,
                  f"SigLIP: {v.depth} layers, hidden {v.hidden}, {v.heads} heads, ffn {v.ffn}, "
                  f"{side}x{side} patches of {v.patch} px",
                  note="transformers' module, replicated over TP, first pipeline stage"),
        ModelPart("multi-modal projector", PROJ, PROJ,
                  f"RMSNorm (1 + w) of {v.hidden}, then {v.hidden} -> {config.hidden_size}; "
                  f"{config.hf.get('mm_tokens_per_image')} tokens per image",
                  note="replicated over TP; Megatron-Bridge's proj.weight is the transpose"),
    ]


GEMMA3 = Architecture(
    "gemma3", "Gemma3",
    {"mcore": GEMMA3_MCORE_ROWS, "hf": GEMMA3_HF_ROWS},
    schema=_gemma3_schema, hf_fields=_gemma3_fields, qk_norm=True,
    activation_fields=("hidden_activation", "hidden_act"), activations=("gelu_pytorch_tanh",),
    megatron_activation="fast_gelu", megatron_extra=_text_megatron(GEMMA3_TEXT),
    megatron_args_suffice=False, text_config=text_config_of, mcore_prefix=LM,
    hf_expert_layout=gemma3_tower_spelling, parts=_gemma3_parts,
    hf_module_prefix="model.language_model.")


# -- Mistral 3 (Pixtral) ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PixtralSizes:
    depth: int
    hidden: int
    heads: int
    head_dim: int
    ffn: int
    channels: int
    patch: int
    merge: int


def pixtral_sizes(hf: Mapping[str, Any]) -> PixtralSizes:
    v = vision_config_of(hf)
    depth = _positive(v, "num_hidden_layers")
    hidden, heads = _positive(v, "hidden_size"), _positive(v, "num_attention_heads")
    head_dim = _positive(v, "head_dim", default=hidden // heads)
    if depth > MAX_LAYER_EXPERTS:
        raise ValueError(f"vision_config: {depth} layers is not a tower")
    if hf.get("multimodal_projector_bias", False) is not False:
        # The published Mistral 3 / Ministral 3 configs have none; the Megatron rows list the
        # bias-free projector only.
        raise FormatError("mistral3 with multimodal_projector_bias other than false is not "
                          "supported")
    return PixtralSizes(depth, hidden, heads, head_dim, _positive(v, "intermediate_size"),
                        _positive(v, "num_channels", default=3), _positive(v, "patch_size"),
                        hf_int(hf, "spatial_merge_size", default=2))


_PIXTRAL_LAYER = tuple(
    f"{m}.weight" for m in ("attention_norm", "ffn_norm", "attention.q_proj", "attention.k_proj",
                            "attention.v_proj", "attention.o_proj", "feed_forward.gate_proj",
                            "feed_forward.up_proj", "feed_forward.down_proj"))
_PIXTRAL = ("patch_conv.weight", "ln_pre.weight",
            *(f"transformer.layers.{{block}}.{s}" for s in _PIXTRAL_LAYER))
_MISTRAL3_PROJECTOR = ("norm.weight", "patch_merger.merging_layer.weight", "linear_1.weight",
                       "linear_2.weight")


def _mistral3_schema(config: ModelConfig) -> dict[str, Shape]:
    """The Pixtral tower, the patch merger and projector, then the ministral3 language model."""
    v = pixtral_sizes(config.hf)
    h, f, a, big = v.hidden, v.ffn, v.heads * v.head_dim, config.hidden_size
    if v.merge <= 0:
        raise FormatError("spatial_merge_size must be positive")
    out: dict[str, Shape] = {TOWER + "patch_conv.weight": (h, v.channels, v.patch, v.patch),
                             TOWER + "ln_pre.weight": (h,)}
    for i in range(v.depth):
        p = f"{TOWER}transformer.layers.{i}."
        out |= {p + "attention_norm.weight": (h,), p + "ffn_norm.weight": (h,),
                p + "attention.q_proj.weight": (a, h), p + "attention.k_proj.weight": (a, h),
                p + "attention.v_proj.weight": (a, h), p + "attention.o_proj.weight": (h, a),
                p + "feed_forward.gate_proj.weight": (f, h),
                p + "feed_forward.up_proj.weight": (f, h),
                p + "feed_forward.down_proj.weight": (h, f)}
    out |= {PROJ + "norm.weight": (h,),
            PROJ + "patch_merger.merging_layer.weight": (h, v.merge * v.merge * h),
            PROJ + "linear_1.weight": (big, h), PROJ + "linear_2.weight": (big, big)}
    return out | decoder_schema(config)


def _mistral3_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    return {"vision_blocks": pixtral_sizes(hf).depth}


MISTRAL3_HF_ROWS: tuple[Row, ...] = (
    *lm_prefix_rows(LM + "model."),
    Row(LM + "lm_head.weight", one("lm_head.weight"), when="is_untied"),
)

# Megatron-Bridge's Ministral3Model holds transformers' tower and projector: the same names.
MISTRAL3_MCORE_ROWS: tuple[Row, ...] = (
    *(Row(TOWER + s, one(TOWER + s)) for s in _PIXTRAL),
    *(Row(PROJ + s, one(PROJ + s)) for s in _MISTRAL3_PROJECTOR),
    *prefixed(DENSE_MCORE_ROWS, LM),
)




def _mistral3_parts(config: ModelConfig) -> list[ModelPart]:
    v = pixtral_sizes(config.hf)
    m = v.merge
    return [
        ModelPart("language model", "model.", LM,
                  f"{config.num_layers} layers (ministral3 / llama rows)", tower=False),
        ModelPart("vision tower", TOWER, TOWER,
                  f"Pixtral: {v.depth} layers, hidden {v.hidden}, {v.heads} heads of "
                  f"{v.head_dim}, gated ffn {v.ffn}, patch {v.patch} px, 2-D RoPE",
                  note="transformers' module, replicated over TP, first pipeline stage"),
        ModelPart("multi-modal projector", PROJ, PROJ,
                  f"RMSNorm, {m}x{m} patch merger ({m * m * v.hidden} -> {v.hidden}), "
                  f"{v.hidden} -> {config.hidden_size} -> {config.hidden_size}",
                  note="transformers' module, replicated over TP"),
    ]


MISTRAL3 = Architecture(
    "mistral3", "Mistral3",
    {"mcore": MISTRAL3_MCORE_ROWS, "hf": MISTRAL3_HF_ROWS},
    schema=_mistral3_schema, hf_fields=_mistral3_fields, megatron_extra=_text_megatron(MINISTRAL3),
    megatron_args_suffice=False, text_config=text_config_of, mcore_prefix=LM,
    parts=_mistral3_parts, hf_module_prefix="model.language_model.")
