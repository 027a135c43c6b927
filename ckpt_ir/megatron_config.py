"""Model config both ways: HF ``config.json`` <-> Megatron-Core ``TransformerConfig``, ``GPTModel``.

Users need :func:`megatron_args` to build the GPTModel that will load a checkpoint ckpt-ir
wrote; ckpt-ir needs :func:`hf_config_from_megatron` to name and shape tensors of a Megatron
checkpoint that carries only Megatron arguments (Megatron-LM ``args``, Megatron-Bridge
``run_config.yaml``, verl ``transformer_config.json``). Nothing here imports megatron-core.

Only model-defining fields are produced. Runtime choices (parallel sizes, fusions, precision,
CPU initialisation) stay with the caller, who adds them to ``transformer_config``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpt_ir.errors import FormatError, MissingConfigError
from ckpt_ir.ir import ModelConfig

__all__ = ["MegatronModelArgs", "hf_config_from_megatron", "megatron_args", "padded_vocab_size"]


@dataclass(frozen=True)
class MegatronModelArgs:
    """Keyword arguments for megatron-core, split by where they go.

    Example (CPU, local spec)::

        import torch.nn.functional as F
        from megatron.core.transformer.transformer_config import TransformerConfig
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        args = megatron_args(json.load(open("hf/config.json")))
        config = TransformerConfig(**args.transformer_config, activation_func=F.silu,
                                   tensor_model_parallel_size=2)
        model = GPTModel(config=config,
                         transformer_layer_spec=get_gpt_layer_local_spec(**args.layer_spec),
                         **args.gpt_model)

    ``activation_func`` is named in ``activation`` rather than passed as a callable so the
    mapping stays JSON-serialisable; every supported architecture uses SiLU (SwiGLU).
    """

    transformer_config: dict[str, Any]
    gpt_model: dict[str, Any]
    layer_spec: dict[str, Any]
    activation: str = "silu"
    notes: tuple[str, ...] = field(default=())


def padded_vocab_size(vocab_size: int, multiple: int | None) -> int:
    """Megatron's padding: the smallest multiple of ``multiple`` that holds the vocabulary."""
    if not multiple or multiple <= 1:
        return vocab_size
    return math.ceil(vocab_size / multiple) * multiple


def _rope(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any], list[str]]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") \
        or "default"
    extra: dict[str, Any] = {}
    notes: list[str] = []
    if rope_type == "llama3":
        factor = params.get("factor", scaling.get("factor"))
        extra = {"rope_scaling": True, "rope_scaling_factor": float(factor)}
    elif rope_type == "linear":
        factor = params.get("factor", scaling.get("factor"))
        extra = {"seq_len_interpolation_factor": float(factor)}
    elif rope_type != "default":
        notes.append(f"rope_type {rope_type!r} has no GPTModel equivalent here; set it yourself")
    return float(theta), extra, notes


def megatron_args(hf_config: Mapping[str, Any] | ModelConfig, *,
                  pad_vocab_to_multiple: int | None = None) -> MegatronModelArgs:
    """Megatron-Core ``TransformerConfig`` / ``GPTModel`` / layer-spec kwargs for an HF config."""
    cfg = hf_config if isinstance(hf_config, ModelConfig) else ModelConfig.from_hf(hf_config)
    hf = cfg.hf
    theta, rope_extra, notes = _rope(hf)
    tc = {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_key_value_heads,
        "kv_channels": cfg.head_dim,
        "ffn_hidden_size": cfg.intermediate_size,
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "add_qkv_bias": cfg.has_qkv_bias,
        "qk_layernorm": cfg.has_qk_norm,
        "hidden_dropout": 0.0,
        "attention_dropout": float(hf.get("attention_dropout", 0.0) or 0.0),
    }
    gpt = {
        "vocab_size": padded_vocab_size(cfg.vocab_size, pad_vocab_to_multiple),
        "max_sequence_length": int(hf.get("max_position_embeddings", 4096)),
        "position_embedding_type": "rope",
        "rotary_base": theta,
        "rotary_percent": 1.0,
        "share_embeddings_and_output_weights": cfg.tie_word_embeddings,
        **rope_extra,
    }
    spec = {"normalization": "RMSNorm", "qk_layernorm": cfg.has_qk_norm}
    return MegatronModelArgs(tc, gpt, spec, notes=tuple(notes))


def _get(args: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if n in args and args[n] is not None:
            return args[n]
    return default


def hf_config_from_megatron(args: Mapping[str, Any], *, vocab_size: int | None = None,
                            architecture: str | None = None) -> dict[str, Any]:
    """An HF ``config.json`` dict from Megatron argument names.

    Accepts Megatron-LM ``args`` (``untie_embeddings_and_output_weights``, ``norm_epsilon``,
    ``padded_vocab_size``), TransformerConfig / Megatron-Bridge names
    (``share_embeddings_and_output_weights``, ``layernorm_epsilon``) and verl's
    ``transformer_config.json``. The architecture is inferred when not given: qk-norm means
    qwen3, a QKV bias qwen2, otherwise llama.
    """
    try:
        layers = int(_get(args, "num_layers"))
        hidden = int(_get(args, "hidden_size"))
        heads = int(_get(args, "num_attention_heads"))
    except (TypeError, ValueError) as e:
        raise MissingConfigError("Megatron arguments lack num_layers / hidden_size / "
                                 "num_attention_heads") from e
    gqa = _get(args, "group_query_attention", default=None)
    groups = _get(args, "num_query_groups", default=None)
    kv_heads = int(groups) if groups and gqa is not False else heads
    head_dim = int(_get(args, "kv_channels", default=hidden // heads))
    ffn = _get(args, "ffn_hidden_size")
    if ffn is None:
        raise MissingConfigError("Megatron arguments lack ffn_hidden_size")
    vocab = vocab_size or _get(args, "vocab_size", "padded_vocab_size")
    if vocab is None:
        raise MissingConfigError("Megatron arguments carry no vocabulary size")
    untie = _get(args, "untie_embeddings_and_output_weights", default=None)
    share = _get(args, "share_embeddings_and_output_weights", default=None)
    tied = (not untie) if untie is not None else bool(share) if share is not None else False
    qk_norm = bool(_get(args, "qk_layernorm", default=False))
    qkv_bias = bool(_get(args, "add_qkv_bias", default=False))
    if _get(args, "add_bias_linear", default=False):
        raise FormatError("Megatron models with add_bias_linear=True have no HF equivalent here")
    arch = architecture or ("qwen3" if qk_norm else "qwen2" if qkv_bias else "llama")
    norm = _get(args, "normalization", default="RMSNorm")
    if norm != "RMSNorm":
        raise FormatError(f"Megatron normalization {norm!r} is not supported (RMSNorm only)")
    theta = float(_get(args, "rotary_base", default=10000.0))
    archs = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    return {
        "architectures": [archs.get(arch, arch)],
        "model_type": arch,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": int(ffn),
        "vocab_size": int(vocab),
        "tie_word_embeddings": tied,
        "rms_norm_eps": float(_get(args, "norm_epsilon", "layernorm_epsilon", default=1e-6)),
        "max_position_embeddings": int(_get(args, "max_position_embeddings", "seq_length",
                                            "max_sequence_length", default=4096)),
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "hidden_act": "silu",
        **({"attention_bias": False} if arch != "qwen2" else {}),
    }
