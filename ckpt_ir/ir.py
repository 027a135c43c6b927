"""The neutral intermediate representation: a model config plus logical tensors.

A checkpoint in the IR is a :class:`ModelConfig` (HF-compatible architecture and sizes) and a set
of logical tensors named like Hugging Face transformers modules, unfused: separate q/k/v, separate
gate/up, one tensor per expert. Each has a global shape and dtype; the data stays in the source
files until a plan asks for it. How a format lays these tensors out physically (fused QKV, stacked
layers, TP shards, padded vocab) is described by the mapping tables in :mod:`ckpt_ir.tables`.

This module imports torch only for dtypes; it does no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from ckpt_ir.errors import FormatError

__all__ = ["Checkpoint", "ModelConfig", "Shape", "TensorSpec", "dtype_name", "parse_dtype"]

Shape = tuple[int, ...]

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``"torch.bfloat16"`` -> ``torch.bfloat16``."""
    key = name.removeprefix("torch.").lower()
    if key not in _DTYPE_NAMES:
        raise FormatError(f"unknown dtype {name!r}; expected one of bf16, fp16, fp32")
    return _DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling HF configs use)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, global shape and dtype of one tensor: metadata only, no data."""

    name: str
    shape: Shape
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# Dense decoder families handled by the dense tables; MoE families register later.
DENSE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


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

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Build from an HF ``config.json`` dict; refuses variants the tables cannot express."""
        hf = dict(hf)
        arch = hf.get("model_type")
        if arch not in DENSE_ARCHITECTURES:
            raise FormatError(
                f"unsupported architecture {arch!r}; supported: {', '.join(DENSE_ARCHITECTURES)}")
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            kv_heads = int(hf.get("num_key_value_heads") or heads)
            head_dim = int(hf.get("head_dim") or hidden // heads)
            cfg = cls(
                architecture=arch,
                num_layers=int(hf["num_hidden_layers"]),
                hidden_size=hidden,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                intermediate_size=int(hf["intermediate_size"]),
                vocab_size=int(hf["vocab_size"]),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases; Llama/Mistral/Qwen3 expose `attention_bias`,
                # which also adds an o_proj bias that Megatron's add_qkv_bias cannot express.
                has_qkv_bias=arch == "qwen2",
                has_qk_norm=arch == "qwen3",
                hf=MappingProxyType(hf),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"HF config is missing or has a malformed field: {e}") from e
        cfg._check_supported()
        return cfg

    def _check_supported(self) -> None:
        hf = self.hf
        if hf.get("attention_bias") and self.architecture != "qwen2":
            raise FormatError(f"{self.architecture} with attention_bias=True (o_proj bias) is not "
                              "supported: Megatron's add_qkv_bias covers q/k/v only")
        if hf.get("mlp_bias"):
            raise FormatError(f"{self.architecture} with mlp_bias=True is not supported")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise FormatError(f"hidden_act {act!r} is not supported (SwiGLU/silu only)")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise FormatError(f"HF config field for {name} must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FormatError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads={self.num_key_value_heads}")

    def schema(self) -> dict[str, Shape]:
        """Every logical IR tensor of this model with its global shape, in a stable order."""
        h, d, f = self.hidden_size, self.head_dim, self.intermediate_size
        q_rows, kv_rows = self.num_attention_heads * d, self.num_key_value_heads * d
        out: dict[str, Shape] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "self_attn.q_proj.weight"] = (q_rows, h)
            out[p + "self_attn.k_proj.weight"] = (kv_rows, h)
            out[p + "self_attn.v_proj.weight"] = (kv_rows, h)
            if self.has_qkv_bias:
                out[p + "self_attn.q_proj.bias"] = (q_rows,)
                out[p + "self_attn.k_proj.bias"] = (kv_rows,)
                out[p + "self_attn.v_proj.bias"] = (kv_rows,)
            if self.has_qk_norm:
                out[p + "self_attn.q_norm.weight"] = (d,)
                out[p + "self_attn.k_norm.weight"] = (d,)
            out[p + "self_attn.o_proj.weight"] = (h, q_rows)
            out[p + "post_attention_layernorm.weight"] = (h,)
            out[p + "mlp.gate_proj.weight"] = (f, h)
            out[p + "mlp.up_proj.weight"] = (f, h)
            out[p + "mlp.down_proj.weight"] = (h, f)
        out["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, h)
        return out

    def to_hf_dict(self, *, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The HF config.json content, with ``dtype`` updated when the weights were cast."""
        out = dict(self.hf)
        if dtype is not None:
            out["dtype"] = dtype_name(dtype)
            out.pop("torch_dtype", None)
        return out


class Checkpoint:
    """The IR view of a checkpoint (what :func:`ckpt_ir.open` returns).

    ``tensors`` maps IR names to :class:`TensorSpec`; ``read(name)`` materialises one logical
    tensor, reading only the source regions it needs.
    """

    def __init__(self, *, format: str, path: str, config: ModelConfig,
                 tensors: Mapping[str, TensorSpec], reader: Callable[[str], torch.Tensor],
                 close: Callable[[], None] | None = None) -> None:
        self.format = format
        self.path = path
        self.config = config
        self.tensors: Mapping[str, TensorSpec] = MappingProxyType(dict(tensors))
        self._read = reader
        self._close = close

    def read(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise FormatError(f"tensor {name!r} is not in this checkpoint", path=self.path)
        return self._read(name)

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
