"""What ckpt-ir knows about one architecture family, in one record.

An :class:`Architecture` gathers, for one HF ``model_type``: the transformers class name, its
logical tensors (the schema), how its HF config reads (attention biases, QK norm, the MoE / MLA
fields and their spellings), the family's own checks, where its MoE tensors live
(:class:`MoeNames`), its Megatron-Core config mapping both ways, and its mapping-table rows per
naming. ``ModelConfig``, ``megatron_config`` and the tables consult the record; none of them
branches on an architecture string.

This module sits below :mod:`ckpt_ir.ir` (which looks records up), so it needs ``ModelConfig``
for typing only; the HF config helpers here are the ones ``ir.py`` uses too.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.schema import decoder_schema
from ckpt_ir.table_engine import Row

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig, Shape

__all__ = ["MAX_LAYER_EXPERTS", "Architecture", "MegatronExtra", "MegatronMoe", "MoeNames",
           "hf_int", "hf_int_list", "megatron_arg"]

MAX_LAYER_EXPERTS = 1 << 18
"""Refused above this many (layers + MTP layers) x experts: a hostile config, not a model."""


@dataclass(frozen=True, slots=True)
class MoeNames:
    """Where one MoE family keeps its MLP tensors, relative to ``model.layers.{layer}.``.

    These are the names transformers *writes* (``save_pretrained``): one tensor per expert.
    transformers 5 holds the experts fused in memory (``mlp.experts.gate_up_proj``); that layout
    is a naming of the same IR (``NativeParams.hf_experts="fused"``), not the IR.
    """

    router: str           # [E, H]
    expert: str           # prefix of expert {expert}'s three projections
    gate: str
    up: str
    down: str
    shared: str | None = None        # prefix of the shared expert MLP (gate/up/down_proj)
    shared_gate: str | None = None   # [1, H] sigmoid gate on the shared expert (qwen2_moe)
    expert_bias: str | None = None   # [E] routing-only score correction (deepseek_v3)
    # transformers' fused ``gate_up_proj`` interleaves gate and up (column 2j gate j, 2j + 1
    # up j: gpt-oss) instead of stacking ``[gate; up]``; peft's ParamWrapper B rows follow.
    gate_up_interleaved: bool = False


def no_qkv_bias(hf: Mapping[str, Any]) -> bool:
    """No q/k/v biases (Megatron's add_qkv_bias off)."""
    return False


# (HF config dict, layer count) -> extra ModelConfig fields (experts, MoE layers, MLA, MTP).
HfFields = Callable[[Mapping[str, Any], int], dict[str, Any]]
# (ModelConfig, notes to append to) -> extra TransformerConfig fields.
MegatronFields = Callable[["ModelConfig", list[str]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class MegatronMoe:
    """The MoE arguments every family reads back from Megatron arguments."""

    experts: int
    topk: int
    ffn: int
    shared: int
    pattern: list[int]   # 0/1 per decoder layer (megatron-core's moe_layer_freq)
    pre_softmax: bool

    @property
    def dense(self) -> list[int]:
        return [i for i, v in enumerate(self.pattern) if not v]


# (Megatron arguments, their MoE part) -> the HF config's MoE fields.
HfFromMegatron = Callable[[Mapping[str, Any], MegatronMoe], dict[str, Any]]


@dataclass(frozen=True)
class MegatronExtra:
    """A family's Megatron-Core settings beyond what every supported model shares (SwiGLU with
    SiLU, no linear biases besides q/k/v, plain rope): gpt-oss's biases, attention sinks,
    sliding window, clamped activation and YaRN; phi3's partial rotary; Gemma's zero-centred
    norms, windows and softmax scale. ``megatron_args`` applies them last."""

    # TransformerConfig fields, overriding the shared ones (``add_bias_linear``).
    transformer_config: Mapping[str, Any] = field(default_factory=dict)
    # GPTModel keyword arguments (``position_embedding_type``).
    gpt_model: Mapping[str, Any] = field(default_factory=dict)
    # Attributes megatron-core reads with getattr from the config but TransformerConfig does
    # not declare (``yarn_*``): set them on the config object before building the GPTModel.
    config_attributes: Mapping[str, Any] = field(default_factory=dict)
    # The activation function's name when it depends on the config (gpt-oss's clamped
    # ``quick_gelu``); None: the record's ``megatron_activation``.
    activation: str | None = None


# (ModelConfig, notes to append to) -> the family's extra Megatron settings.
MegatronExtraFields = Callable[["ModelConfig", list[str]], MegatronExtra]


@dataclass(frozen=True)
class Architecture:
    """One architecture family (an HF ``model_type``): config reading, checks, Megatron mapping
    and table rows. Families that share rows share the tuples (docs/architectures.md then
    says "same rows as")."""

    name: str
    # transformers class prefix: ``{hf_class}ForCausalLM`` / ``ForTokenClassification``.
    hf_class: str
    # naming -> rows. "hf" rows, when present, are a variant of the identity (fused experts).
    tables: Mapping[str, tuple[Row, ...]]
    # Mixture of experts: where the expert tensors live; None for a dense family.
    moe: MoeNames | None = None
    # The model's logical IR tensors (ModelConfig.schema).
    schema: Callable[[ModelConfig], dict[str, Shape]] = decoder_schema
    # The MoE / MLA / MTP fields of the HF config (None: a dense family).
    hf_fields: HfFields | None = None
    # Whether the config has q/k/v biases. Families that spell it ``attention_bias`` also get
    # an o_proj bias that Megatron's add_qkv_bias cannot express, so they answer False and
    # ``attention_bias_refused`` refuses the config (seed_oss's attention_bias is q/k/v only:
    # ``attention_bias_is_qkv_bias``).
    qkv_bias: Callable[[Mapping[str, Any]], bool] = no_qkv_bias
    attention_bias_refused: bool = True
    # The transformers config has an ``attention_bias`` field (qwen2's has none): an HF config
    # built from Megatron arguments sets it to False.
    spells_attention_bias: bool = True
    # ``attention_bias`` is exactly the q/k/v bias (seed_oss, whose o_proj bias is a field of
    # its own): an HF config built from Megatron arguments sets it from add_qkv_bias instead.
    attention_bias_is_qkv_bias: bool = False
    # Per-head q/k RMSNorm: always (qwen3), or as the config says (glm4_moe's use_qk_norm).
    qk_norm: bool | Callable[[Mapping[str, Any]], bool] = False
    # The gated MLP's activation: the HF config fields that name it (the first present wins;
    # Gemma spells it hidden_activation), the values the family's rows stand for (the first is
    # transformers' default), and megatron-core's name for it (MegatronModelArgs.activation).
    activation_fields: tuple[str, ...] = ("hidden_act",)
    activations: tuple[str, ...] = ("silu", "swish")
    megatron_activation: str = "silu"
    # Megatron arguments alone describe the model. False for families whose forward depends on
    # HF fields no Megatron argument holds (Gemma's softcaps, embedding scale, dual RoPE
    # bases): hf_config_from_megatron then asks for the HF config rather than guess.
    megatron_args_suffice: bool = True
    # Multi-latent attention: the kv_lora_rank / qk_*_head_dim / v_head_dim fields are required.
    mla: bool = False
    # Family checks of an MoE config, after the generic ones (raise FormatError).
    check_moe: Callable[[ModelConfig], None] | None = None
    # TransformerConfig fields of the family's router (HF -> megatron-core).
    megatron_moe: MegatronFields | None = None
    # Their inverse: the HF MoE fields from Megatron arguments.
    hf_moe_from_megatron: HfFromMegatron | None = None
    # Guessing the family from Megatron arguments that name none: (precedence, the arguments
    # that must all be set and true). Families with experts compete among themselves, dense
    # ones too; lower precedence is tried first, () matches anything (the fallback). None:
    # never guessed (to Megatron, mistral is llama).
    megatron_guess: tuple[int, tuple[str, ...]] | None = None
    # Megatron-Core settings of a family beyond the shared ones (gpt-oss); None: none.
    megatron_extra: MegatronExtraFields | None = None
    # Routed experts carry linear biases (gpt-oss): megatron-core 0.16.1 builds such experts
    # only with expert TP 1 ("Bias in Moe is only supported when ETP==1").
    expert_biases: bool = False
    # The rotary fraction transformers assumes when the config names none (glm4_moe: 0.5);
    # the config's own ``partial_rotary_factor`` (``rope_parameters`` first) wins.
    partial_rotary_default: float = 1.0

    # A vision-language model's language-model config as a flat HF text config (its
    # ``text_config`` with the top-level fields that override it): what the LM fields, the
    # generic checks and the Megatron mapping read. None: the config is the LM's.
    text_config: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    # Megatron module prefix of the language model in the model's own names
    # (Megatron-Bridge's VL models: ``language_model.``); "" for a GPTModel.
    mcore_prefix: str = ""
    # Which ``hf`` expert layout (``NativeParams.hf_experts``) a file's tensor shapes show, for
    # families whose fused experts come in more than one orientation (qwen3_vl_moe). gemma3
    # uses it for its tower's two spellings (vl_passthrough.HUB_TOWER: hub_vision_tower rows).
    hf_expert_layout: Callable[[ModelConfig, Mapping[str, Shape]], str] | None = None
    # The parts of a multi-part model (a VL model's vision tower, merger, deepstack mergers)
    # for ``inspect``: :class:`ckpt_ir.architectures.vision.ModelPart` each.
    parts: Callable[[ModelConfig], list[Any]] | None = None
    # Where transformers' module tree holds the language model in memory, in place of the
    # IR's ``model.`` (a VL model's ``model.language_model.``): the names PEFT adapters use.
    hf_module_prefix: str = ""

    def has_qk_norm(self, hf: Mapping[str, Any]) -> bool:
        """Whether the HF config ``hf`` of this family has the per-head q/k norms."""
        return self.qk_norm(hf) if callable(self.qk_norm) else self.qk_norm

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def causal_lm_class(self) -> str:
        return f"{self.hf_class}ForCausalLM"

    def activation(self, hf: Mapping[str, Any]) -> tuple[str, Any]:
        """(the field, its value) of the config's MLP activation."""
        for name in self.activation_fields:
            if hf.get(name) is not None:
                return name, hf[name]
        return self.activation_fields[0], self.activations[0]


def hf_int(hf: Mapping[str, Any], *names: str, default: int | None = None) -> int:
    """The first of ``names`` present (and not null) in ``hf``: a JSON integer, nothing else.

    ``int()`` would turn ``hidden_size: 32.5`` into 32 (and ``"64"`` or ``true`` into numbers)
    while the config copied to the destination still says 32.5: structural fields are refused
    unless they are integers already.
    """
    for n in names:
        value = hf.get(n)
        if value is not None:
            if type(value) is not int:
                raise ValueError(f"{n} must be an integer, not {reprlib.repr(value)}")
            return value
    if default is None:
        raise KeyError(names[0])
    return default


def hf_int_list(hf: Mapping[str, Any], name: str) -> list[int]:
    value = hf.get(name) or []
    if type(value) is not list or len(value) > MAX_LAYER_EXPERTS or any(
            type(i) is not int for i in value):
        raise ValueError(f"{name} must be a list of integers")
    return value


def megatron_arg(args: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """The first of ``names`` set (not None) in Megatron arguments, else ``default``."""
    for n in names:
        if n in args and args[n] is not None:
            return args[n]
    return default
