"""The neutral intermediate representation: a model config plus logical tensors.

A checkpoint in the IR is a :class:`ModelConfig` (HF-compatible architecture and sizes) and a set
of logical tensors named like Hugging Face transformers modules, unfused: separate q/k/v, separate
gate/up, one tensor per expert. Each has a global shape and dtype; the data stays in the source
files until a plan asks for it. How a format lays these tensors out physically (fused QKV, stacked
layers, TP shards, padded vocab) is described by the mapping tables in :mod:`ckpt_ir.tables`.

This module does no I/O and imports no torch: dtypes are :class:`ckpt_ir.dtypes.DType`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ckpt_ir import dtypes
from ckpt_ir.architectures import ARCHITECTURES, MOE_NAMES, architecture, lookup
from ckpt_ir.architectures.record import MAX_LAYER_EXPERTS, MoeNames, hf_int
from ckpt_ir.architectures.schema import decoder_schema
from ckpt_ir.errors import FormatError
from ckpt_ir.quantization import DEQUANTIZED_FROM

if TYPE_CHECKING:
    import torch

# ARCHITECTURES, MOE_NAMES, MoeNames and MAX_LAYER_EXPERTS live with the architecture records
# (ckpt_ir.architectures); they stay importable from here.
__all__ = ["ARCHITECTURES", "MAX_LAYER_EXPERTS", "MOE_NAMES", "Checkpoint", "ModelConfig",
           "MoeNames", "Shape", "TensorSpec", "dtype_name", "parse_dtype"]

Shape = tuple[int, ...]

def parse_dtype(name: str) -> dtypes.DType:
    """``"bf16"`` / ``"bfloat16"`` / ``"torch.bfloat16"`` -> :data:`ckpt_ir.dtypes.BFLOAT16`."""
    return dtypes.parse(name)


def dtype_name(dtype: dtypes.DType) -> str:
    """:data:`~ckpt_ir.dtypes.BFLOAT16` -> ``"bfloat16"`` (the spelling HF configs use)."""
    return dtype.name


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, global shape and dtype of one tensor: metadata only, no data."""

    name: str
    shape: Shape
    dtype: dtypes.DType

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, eq=False)
class ModelConfig:
    """Architecture and sizes of a decoder-only LM, derived from (and carrying) an HF config.

    ``hf`` is the full HF ``config.json`` dictionary: writers emit it unchanged so the
    destination keeps every field the source had (rope scaling, token ids, ...).
    """

    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    has_qkv_bias: bool
    has_qk_norm: bool
    hf: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # Mixture of experts (0 experts: dense). ``moe_layers`` are the decoder layers whose MLP is
    # routed; the others are dense with ``intermediate_size``. Shared-expert size 0: none.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()
    # Multi-head latent attention (DeepSeek): kv_lora_rank 0 means standard attention;
    # q_lora_rank 0 means an unfactored q_proj.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Multi-token prediction layers, stored by HF as model.layers.{num_layers + k}.
    num_mtp_layers: int = 0
    # A token-classification head (``…ForTokenClassification``, ``score.weight``
    # ``[num_labels, H]``) in place of the LM head: verl's critic / value model has one label.
    # 0: a causal LM. ``has_score_bias``: transformers' ``token_classification_bias``.
    num_labels: int = 0
    has_score_bias: bool = False
    # Hybrid stacks (qwen3_next): the decoder layers whose attention is linear (Gated
    # DeltaNet); the others use full attention. Empty: every layer is full attention.
    linear_attention_layers: tuple[int, ...] = ()
    # A vision tower's blocks and deepstack mergers (the table engine's ``{block}`` and
    # ``{deepstack}`` axes); 0 for a text-only model.
    vision_blocks: int = 0
    deepstack_mergers: int = 0
    # The heads of a vision tower whose attention Megatron splits over TP (Qwen3-VL's vision
    # block); 0: none, or a tower replicated on every rank (Qwen2.5-VL's).
    vision_split_heads: int = 0

    @property
    def text_hf(self) -> Mapping[str, Any]:
        """The language model's HF config: ``hf`` itself, or a VL model's flattened
        ``text_config`` (the record's ``text_config``)."""
        record = lookup(self.architecture)
        if record is None or record.text_config is None:
            return self.hf
        return record.text_config(self.hf)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_value_model(self) -> bool:
        """A token-classification head (verl's critic) instead of the LM head."""
        return self.num_labels > 0

    @property
    def shares_output_with_embedding(self) -> bool:
        """The output layer is the input embedding (tied, and an LM head: a value head is
        always its own tensor, whatever ``tie_word_embeddings`` says)."""
        return self.tie_word_embeddings and not self.is_value_model

    @property
    def has_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_names(self) -> MoeNames | None:
        return MOE_NAMES.get(self.architecture) if self.is_moe else None

    @property
    def has_expert_biases(self) -> bool:
        """Routed experts with linear biases (gpt-oss; the record's ``expert_biases``)."""
        record = lookup(self.architecture)
        return self.is_moe and record is not None and record.expert_biases

    @property
    def has_uniform_layers(self) -> bool:
        """Dense, or every decoder layer routed: megatron-core then stacks layers in torch_dist.

        An MoE model with any dense layer needs a per-layer ``moe_layer_freq`` list, and
        megatron-core keeps per-layer keys whenever that is a list (even all zeros).
        """
        return (not self.is_moe or len(self.moe_layers) == self.num_layers) and \
            not self.linear_attention_layers

    def is_linear_attention_layer(self, layer: int) -> bool:
        """Whether HF layer ``layer`` has linear (Gated DeltaNet) attention; MTP layers
        (``layer >= num_layers``) have full attention."""
        return layer < self.num_layers and layer in self.linear_attention_layers

    def is_moe_layer(self, layer: int) -> bool:
        """Whether HF layer ``layer`` routes to experts. MTP layers (``layer >= num_layers``)
        are built like the last decoder layer, as megatron-core's MTP block does."""
        if layer >= self.num_layers:
            layer = self.num_layers - 1
        return layer in self.moe_layers

    def as_value_model(self, num_labels: int = 1) -> ModelConfig:
        """This model with a ``[num_labels, H]`` token-classification head and no LM head:
        what a Megatron checkpoint whose ``output_layer.weight`` has ``num_labels`` rows holds
        (verl's critic, ``LinearForLastLayer(H, 1)``, no bias). ``hf`` becomes the config
        transformers' ``AutoModelForTokenClassification`` builds that model from."""
        hf = dict(self.hf)
        names = [a for a in hf.get("architectures") or () if isinstance(a, str)]
        record = lookup(self.architecture)
        base = names[0] if names else record.hf_class if record is not None else ""
        for suffix in ("ForCausalLM", "ForTokenClassification"):
            base = base.removesuffix(suffix)
        hf["architectures"] = [f"{base}ForTokenClassification"]
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        hf.pop("num_labels", None)
        # Megatron's value head (verl LinearForLastLayer) is a bias-free nn.Linear.
        hf["token_classification_bias"] = False
        return dataclasses.replace(self, num_labels=num_labels, has_score_bias=False,
                                   hf=MappingProxyType(hf))

    def without_mtp(self) -> ModelConfig:
        """This config with no MTP layers (a checkpoint whose config announces MTP layers but
        whose files hold none, as transformers writes DeepSeek-V3); ``hf`` says so too."""
        if not self.num_mtp_layers:
            return self
        hf = dict(self.hf)
        hf["num_nextn_predict_layers"] = 0
        hf.pop("num_mtp_layers", None)
        return dataclasses.replace(self, num_mtp_layers=0, hf=MappingProxyType(hf))

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Build from an HF ``config.json`` dict; refuses variants the tables cannot express."""
        hf = dict(hf)
        record = architecture(hf.get("model_type"))
        try:
            # A VL model's sizes are its language model's (``text_config``).
            lm = record.text_config(hf) if record.text_config else hf
            layers = _layer_count(lm)
            hidden = _int(lm, "hidden_size")
            heads = _int(lm, "num_attention_heads")
            kv_heads = _int(lm, "num_key_value_heads", default=0) or heads
            head_dim = _int(lm, "head_dim", default=0) or hidden // heads
            moe = record.hf_fields(hf, layers) if record.hf_fields else {}
            cfg = cls(
                architecture=record.name,
                num_layers=layers,
                hidden_size=hidden,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                intermediate_size=_int(lm, "intermediate_size"),
                vocab_size=_int(lm, "vocab_size"),
                tie_word_embeddings=bool(lm.get("tie_word_embeddings", False)),
                has_qkv_bias=record.qkv_bias(hf),
                has_qk_norm=record.has_qk_norm(hf),
                hf=MappingProxyType(hf),
                **moe,
                **_head_fields(hf),
            )
        except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError) as e:
            # AttributeError: a VL config whose text_config / vision_config is not an object.
            # ArithmeticError: hidden // 0 heads, int(inf) from a hostile config.
            raise FormatError(f"HF config is missing or has a malformed field: {e}") from e
        cfg._check_supported()
        return cfg

    def _check_supported(self) -> None:
        hf = self.text_hf
        record = architecture(self.architecture)
        if hf.get("attention_bias") and record.attention_bias_refused:
            raise FormatError(f"{self.architecture} with attention_bias=True (o_proj bias) is not "
                              "supported: Megatron's add_qkv_bias covers q/k/v only")
        if hf.get("mlp_bias"):
            raise FormatError(f"{self.architecture} with mlp_bias=True is not supported")
        field_name, act = record.activation(hf)
        if act not in record.activations:
            raise FormatError(f"{field_name} {act!r} is not supported for {self.architecture} "
                              f"({'/'.join(record.activations)} only)")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise FormatError(f"HF config field for {name} must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FormatError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads={self.num_key_value_heads}")
        if self.is_moe:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise FormatError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                                  f"1..{self.num_experts} (the number of experts)")
            if self.moe_intermediate_size <= 0:
                raise FormatError("the expert FFN size must be positive")
            if record.check_moe is not None:
                record.check_moe(self)
        if record.is_moe and not self.is_moe:
            raise FormatError(f"{self.architecture} with no experts is not supported")
        if self.has_mla or record.mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    raise FormatError(f"HF config field {name} must be positive")
        if self.num_mtp_layers < 0 or self.q_lora_rank < 0:
            raise FormatError("num_nextn_predict_layers and q_lora_rank must not be negative")
        # Schemas, tables and plans have entries per layer and per expert: a config (untrusted
        # input) claiming 10**9 of either would cost time and memory in proportion to the claim.
        # The largest real models have a few hundred layers and experts.
        blocks = (self.num_layers + self.num_mtp_layers) * max(self.num_experts, 1)
        if blocks > MAX_LAYER_EXPERTS:
            what = f"{self.num_layers} layers" + (
                f" of {self.num_experts} experts" if self.is_moe else "")
            raise FormatError(f"{what} is beyond any real model (layers x experts must be at "
                              f"most {MAX_LAYER_EXPERTS})")

    def schema(self) -> dict[str, Shape]:
        """Every logical IR tensor of this model with its global shape, in a stable order
        (the record's schema: :func:`ckpt_ir.architectures.schema.decoder_schema` unless the
        family has tensors of its own)."""
        record = lookup(self.architecture)
        return (record.schema if record is not None else decoder_schema)(self)

    def to_hf_dict(self, *, dtype: dtypes.DType | None = None) -> dict[str, Any]:
        """The HF config.json content, with ``dtype`` updated when the weights were cast.

        A source's ``quantization_config`` is renamed ``ckpt_ir_dequantized_from``: ckpt-ir
        writes weights dequantized (a loader must not take them for FP8) unless a writer
        re-quantizes them, and then it writes its own, in the format the source had."""
        out = dict(self.hf)
        quant = out.pop("quantization_config", None)
        if quant is not None:
            out[DEQUANTIZED_FROM] = quant
        if dtype is not None:
            out["dtype"] = dtype_name(dtype)
            out.pop("torch_dtype", None)
        return out


def _head_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """``num_labels`` / ``has_score_bias`` of a ``…ForTokenClassification`` config (as
    transformers reads it: the labels from ``id2label``, else ``num_labels``, else 2; the
    ``score`` bias unless ``token_classification_bias`` is false); nothing for a causal LM."""
    names = hf.get("architectures") or ()
    if not any(isinstance(a, str) and a.endswith("ForTokenClassification") for a in names):
        return {}
    labels = hf.get("id2label")
    count = len(labels) if isinstance(labels, Mapping) and labels else \
        _int(hf, "num_labels", default=2)
    if count < 1:
        raise ValueError("a token-classification head needs at least one label")
    return {"num_labels": count,
            "has_score_bias": hf.get("token_classification_bias", True) is not False}


_int = hf_int


def _layer_count(hf: Mapping[str, Any]) -> int:
    # Checked before anything loops over the layers (MoE layer lists, schemas).
    layers = _int(hf, "num_hidden_layers")
    if layers > MAX_LAYER_EXPERTS:
        raise ValueError(f"num_hidden_layers={layers} is beyond any real model (at most "
                         f"{MAX_LAYER_EXPERTS})")
    return layers


class Checkpoint:
    """The IR view of a checkpoint (what :func:`ckpt_ir.open` returns).

    ``tensors`` maps IR names to :class:`TensorSpec`; ``read(name)`` materialises one logical
    tensor, reading only the source regions it needs.
    """

    def __init__(self, *, format: str, path: str, config: ModelConfig,
                 tensors: Mapping[str, TensorSpec], reader: Callable[[str], torch.Tensor],
                 close: Callable[[], None] | None = None,
                 release: Callable[[], None] | None = None) -> None:
        self.format = format
        self.path = path
        self.config = config
        self.tensors: Mapping[str, TensorSpec] = MappingProxyType(dict(tensors))
        self._read = reader
        self._close = close
        self._release = release

    def read(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise FormatError(f"tensor {name!r} is not in this checkpoint", path=self.path)
        return self._read(name)

    def release(self) -> None:
        """Drop mapped pages of data already read (keeps RSS at what is still referenced)."""
        if self._release is not None:
            self._release()

    def close(self) -> None:
        if self._close is not None:
            self._close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Checkpoint(format={self.format!r}, path={self.path!r}, "
                f"architecture={self.config.architecture!r}, tensors={len(self.tensors)})")
