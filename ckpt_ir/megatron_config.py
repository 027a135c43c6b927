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

from ckpt_ir.architectures import guess_from_megatron, lookup
from ckpt_ir.architectures.record import Architecture, MegatronMoe, megatron_arg
from ckpt_ir.errors import CorruptCheckpointError, FormatError, MissingConfigError
from ckpt_ir.ir import ModelConfig

__all__ = ["UNRECORDED_FIELDS", "MegatronModelArgs", "hf_config_from_megatron", "json_safe_fields",
           "megatron_args", "missing_fields", "padded_vocab_size", "plain_arguments",
           "transformer_config_json"]


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
    mapping stays JSON-serialisable: ``"silu"`` (SwiGLU) for every architecture but gpt-oss,
    whose ``"quick_gelu"`` is ``megatron.core.fusions.fused_bias_geglu.quick_gelu`` (clamped
    by ``activation_func_clamp_value``, offset by ``glu_linear_offset``).

    ``config_attributes`` (gpt-oss's YaRN ``yarn_*``) are read by megatron-core with getattr
    but are not TransformerConfig fields: set each on the config object
    (``setattr(config, k, v)``) before building the GPTModel.

    Mixture of experts and DeepSeek-V3 add three choices, each named here:

    * ``config_class``: ``"MLATransformerConfig"`` for multi-latent attention (DeepSeek-V3),
      else ``"TransformerConfig"``;
    * ``decoder_block_spec``: the layers differ (``moe_layer_freq`` is a list: dense-first
      DeepSeek layers, Qwen ``mlp_only_layers``), so build the decoder with
      ``get_gpt_decoder_block_spec(config, use_transformer_engine=..., normalization="RMSNorm")``
      rather than one layer spec;
    * ``mtp``: the model has MTP layers; pass
      ``mtp_block_spec=get_gpt_mtp_block_spec(config, spec, use_transformer_engine=...)``.

    MoE runtime choices stay with the caller: ``moe_grouped_gemm`` (False: SequentialMLP),
    ``moe_token_dispatcher_type``, ``moe_aux_loss_coeff``, expert parallel sizes.
    """

    transformer_config: dict[str, Any]
    gpt_model: dict[str, Any]
    layer_spec: dict[str, Any]
    activation: str = "silu"
    notes: tuple[str, ...] = field(default=())
    config_class: str = "TransformerConfig"
    decoder_block_spec: bool = False
    mtp: bool = False
    config_attributes: dict[str, Any] = field(default_factory=dict)


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


def _moe_args(cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
    """TransformerConfig fields of the experts and their router.

    Routing, HF -> megatron-core, is the family's (its record's ``megatron_moe``; verified by
    logits on CPU for mixtral, qwen2_moe, qwen3_moe).
    """
    tc: dict[str, Any] = {
        "num_moe_experts": cfg.num_experts,
        "moe_router_topk": cfg.num_experts_per_tok,
        "moe_ffn_hidden_size": cfg.moe_intermediate_size,
    }
    if not cfg.has_uniform_layers:
        tc["moe_layer_freq"] = [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)]
    if cfg.shared_expert_intermediate_size:
        tc["moe_shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    names = cfg.moe_names
    if names is not None and names.shared_gate:
        tc["moe_shared_expert_gate"] = True
    # The family's router (Qwen's pre-softmax, DeepSeek's grouped sigmoid routing).
    record = lookup(cfg.architecture)
    if record is not None and record.megatron_moe is not None:
        tc.update(record.megatron_moe(cfg, notes))
    return tc


def _mla_args(cfg: ModelConfig, theta: float, notes: list[str]) -> dict[str, Any]:
    """MLATransformerConfig fields of DeepSeek's multi-latent attention (and its rope)."""
    hf = cfg.hf
    tc: dict[str, Any] = {
        "multi_latent_attention": True,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_head_dim": cfg.qk_nope_head_dim,
        "qk_pos_emb_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        # q_a_layernorm / kv_a_layernorm
        "qk_layernorm": True,
        "rotary_base": theta,
        "rope_type": "rope",
    }
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if (params.get("rope_type") or params.get("type")) == "yarn":
        tc.update({"rope_type": "yarn",
                   "rotary_scaling_factor": float(params["factor"]),
                   "original_max_position_embeddings": int(
                       params.get("original_max_position_embeddings") or 4096),
                   "beta_fast": float(params.get("beta_fast", 32.0)),
                   "beta_slow": float(params.get("beta_slow", 1.0)),
                   "mscale": float(params.get("mscale", 1.0)),
                   "mscale_all_dim": float(params.get("mscale_all_dim", 0.0))})
    if not hf.get("rope_interleave", True):
        notes.append("rope_interleave=false: megatron-core's MLA always applies the rotary "
                     "embedding to interleaved pairs; the attention will differ")
    if cfg.num_mtp_layers:
        tc["mtp_num_layers"] = cfg.num_mtp_layers
    return tc


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
        # Dropouts are training choices, not part of the model: 0 reproduces the HF forward.
        # Copying attention_dropout alone (HF's residual_dropout has no Megatron field of its
        # own) would half-configure training; the note names what the HF config asked for.
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }
    dropouts = {k: v for k, v in hf.items()
                if k.endswith("dropout") and type(v) in (int, float) and v}
    if dropouts:
        notes.append("HF config dropouts " + ", ".join(f"{k}={v}" for k, v in dropouts.items())
                     + " not carried: hidden_dropout and attention_dropout are 0 (parity with "
                     "the HF forward); set them for training")
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
    record = lookup(cfg.architecture)
    if cfg.is_moe:
        tc.update(_moe_args(cfg, notes))
        spec["num_experts"] = cfg.num_experts
    if cfg.has_mla:
        # MLA sizes its heads itself; kv_channels / num_query_groups do not apply.
        for unused in ("num_query_groups", "kv_channels"):
            tc.pop(unused)
        tc.update(_mla_args(cfg, theta, notes))
        spec.update(multi_latent_attention=True, qk_layernorm=True)
        notes[:] = [n for n in notes if "yarn" not in n]
    # A family beyond the shared settings (gpt-oss): its record's own, applied last.
    extra = record.megatron_extra(cfg, notes) \
        if record is not None and record.megatron_extra is not None else None
    if extra is not None:
        tc.update(extra.transformer_config)
        gpt.update(extra.gpt_model)
    return MegatronModelArgs(tc, gpt, spec, notes=tuple(notes),
                             activation=(extra.activation or "silu") if extra else "silu",
                             config_class="MLATransformerConfig" if cfg.has_mla
                             else "TransformerConfig",
                             decoder_block_spec=not cfg.has_uniform_layers,
                             mtp=cfg.num_mtp_layers > 0,
                             config_attributes=dict(extra.config_attributes) if extra else {})


_SKIP = object()


def _json_value(value: Any) -> Any:
    """One field as verl's ``_to_json_safe_config_value`` writes it: plain values as they are,
    dtypes and enums as strings, lists and dicts of those; ``_SKIP`` for anything else
    (callables, process groups)."""
    import enum

    import torch

    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (torch.dtype, enum.Enum)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [v for v in map(_json_value, value) if v is not _SKIP]
    if isinstance(value, Mapping):
        return {str(k): v for k, v in ((k, _json_value(v)) for k, v in value.items())
                if v is not _SKIP}
    return _SKIP


def json_safe_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` (a TransformerConfig's, say) as verl writes ``transformer_config.json``:
    JSON values kept, dtypes and enums as strings, callables and other objects dropped."""
    return {k: v for k, v in ((k, _json_value(v)) for k, v in fields.items()) if v is not _SKIP}


def transformer_config_json(config: ModelConfig, *, tp: int = 1, pp: int = 1, vpp: int = 1,
                            ep: int = 1, etp: int | None = None,
                            first_stage_layers: int | None = None,
                            last_stage_layers: int | None = None) -> dict[str, Any]:
    """verl's ``transformer_config.json`` for a model ckpt-ir writes without a live
    ``TransformerConfig``: the model-defining fields of :func:`megatron_args` and the
    parallel sizes (the fields readers take back: :func:`hf_config_from_megatron`)."""
    return json_safe_fields({
        **megatron_args(config).transformer_config,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": vpp if vpp > 1 else None,
        "num_layers_in_first_pipeline_stage": first_stage_layers,
        "num_layers_in_last_pipeline_stage": last_stage_layers,
        "expert_model_parallel_size": ep, "expert_tensor_parallel_size": etp or tp})


_get = megatron_arg


def plain_arguments(args: Mapping[Any, Any]) -> dict[str, Any]:
    """The entries of ``args`` that can be Megatron model arguments: string keys with plain
    values (None, bool, int, float, str, or lists and tuples of those).

    Arguments come from checkpoints (``common.pt``, rank files, ``run_config.yaml``); anything
    else there (a tensor, an unpickled stand-in) would be truth-tested or converted by code
    that expects numbers.
    """
    scalars = (type(None), bool, int, float, str)

    def plain(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(type(v) in scalars for v in value)
        return type(value) in scalars

    return {k: v for k, v in args.items() if isinstance(k, str) and plain(v)}


UNRECORDED_FIELDS = ("max_position_embeddings", "rope_theta", "rms_norm_eps")
"""HF config fields that change the forward pass and that some Megatron argument sets do not
record (megatron-core's ``TransformerConfig``, hence verl's ``transformer_config.json``, has
no rotary base and no sequence length: they are ``GPTModel`` arguments).
:func:`hf_config_from_megatron` leaves them out when absent rather than guess; see
:func:`missing_fields`."""


def missing_fields(hf: Mapping[str, Any]) -> list[str]:
    """The :data:`UNRECORDED_FIELDS` an HF config dict built from Megatron arguments lacks."""
    rope = hf.get("rope_parameters")
    present = {"max_position_embeddings": "max_position_embeddings" in hf,
               "rope_theta": isinstance(rope, Mapping) and "rope_theta" in rope,
               "rms_norm_eps": "rms_norm_eps" in hf}
    return [f for f in UNRECORDED_FIELDS if not present[f]]


def hf_config_from_megatron(args: Mapping[str, Any], *, vocab_size: int | None = None,
                            architecture: str | None = None,
                            tied: bool | None = None) -> dict[str, Any]:
    """An HF ``config.json`` dict from Megatron argument names (see
    :func:`_hf_config_from_megatron`), read from a checkpoint.

    Raises:
        CorruptCheckpointError: an argument has a value no Megatron run could have
            (``kv_channels="x"``, ``num_attention_heads=0``, an infinite size).
        MissingConfigError, FormatError: as :func:`_hf_config_from_megatron`.
    """
    try:
        return _hf_config_from_megatron(plain_arguments(args), vocab_size=vocab_size,
                                        architecture=architecture, tied=tied)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CorruptCheckpointError(f"malformed Megatron arguments: {e}") from e


def _hf_config_from_megatron(args: Mapping[str, Any], *, vocab_size: int | None,
                             architecture: str | None, tied: bool | None) -> dict[str, Any]:
    """An HF ``config.json`` dict from Megatron argument names.

    Accepts Megatron-LM ``args`` (``untie_embeddings_and_output_weights``, ``norm_epsilon``,
    ``padded_vocab_size``), TransformerConfig / Megatron-Bridge names
    (``share_embeddings_and_output_weights``, ``layernorm_epsilon``) and verl's
    ``transformer_config.json``. The architecture is guessed when not given (the records'
    ``megatron_guess``): qk-norm means qwen3, a QKV bias qwen2, otherwise llama; with
    ``num_moe_experts``, multi-latent attention means deepseek_v3, a shared expert qwen2_moe,
    qk-norm qwen3_moe, otherwise mixtral.

    ``tied`` is what the checkpoint itself says (a torch_dist save of a tied model holds no
    ``output_layer.weight``); it decides when the arguments do not (``TransformerConfig`` has no
    tying field). Values the arguments do not hold are left out, never guessed (see
    :data:`UNRECORDED_FIELDS`).
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
    if untie is not None:
        tied = not untie
    elif share is not None:
        tied = bool(share)
    elif tied is None:
        raise MissingConfigError("Megatron arguments do not say whether the embeddings are "
                                 "tied to the output layer")
    # TransformerConfig / Megatron-Bridge say num_moe_experts, Megatron-LM args num_experts.
    experts = int(_get(args, "num_moe_experts", "num_experts", default=0) or 0)
    arch = architecture or guess_from_megatron(args, moe=bool(experts))
    if _get(args, "add_bias_linear", default=False) and not (
            (bias_record := lookup(arch)) is not None and bias_record.expert_biases):
        # Only a named family with linear biases (gpt_oss) has an HF equivalent.
        raise FormatError("Megatron models with add_bias_linear=True have no HF equivalent here")
    norm = _get(args, "normalization", default="RMSNorm")
    if norm != "RMSNorm":
        raise FormatError(f"Megatron normalization {norm!r} is not supported (RMSNorm only)")
    theta = _get(args, "rotary_base")
    eps = _get(args, "norm_epsilon", "layernorm_epsilon")
    positions = _get(args, "max_position_embeddings", "seq_length", "max_sequence_length")
    record = lookup(arch)
    out = {
        "architectures": [record.causal_lm_class if record is not None else arch],
        "model_type": arch,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": int(ffn),
        "vocab_size": int(vocab),
        "tie_word_embeddings": tied,
        **({"rms_norm_eps": float(eps)} if eps is not None else {}),
        **({"max_position_embeddings": int(positions)} if positions is not None else {}),
        "rope_parameters": {"rope_type": "default",
                            **({"rope_theta": float(theta)} if theta is not None else {})},
        "hidden_act": "silu",
        **_attention_bias(record, bool(_get(args, "add_qkv_bias", default=False))),
    }
    if experts:
        out.update(_moe_hf(args, arch, experts, layers))
    return out


def _attention_bias(record: Architecture | None, qkv_bias: bool) -> dict[str, Any]:
    """The HF ``attention_bias`` field for Megatron's ``add_qkv_bias`` (none where the family's
    config has no such field)."""
    if record is not None and not record.spells_attention_bias:
        return {}
    return {"attention_bias": record is not None and record.attention_bias_is_qkv_bias
            and qkv_bias}


def _moe_layer_pattern(args: Mapping[str, Any], layers: int) -> list[int]:
    """megatron-core's ``moe_layer_freq`` as 0/1 per layer (int N: every N-th, from layer 0)."""
    freq = _get(args, "moe_layer_freq", default=1)
    if isinstance(freq, bool) or not isinstance(freq, (int, list, tuple)):
        raise FormatError(f"moe_layer_freq {freq!r} is not an int or a list of 0/1")
    if isinstance(freq, int):
        if freq < 1:
            raise FormatError(f"moe_layer_freq {freq} must be >= 1")
        return [int(i % freq == 0) for i in range(layers)]
    if len(freq) != layers or any(v not in (0, 1) for v in freq):
        raise FormatError(f"moe_layer_freq {freq!r} must list 0 or 1 for each of {layers} "
                          "layers")
    return [int(v) for v in freq]


def _moe_hf(args: Mapping[str, Any], arch: str, experts: int, layers: int) -> dict[str, Any]:
    """The MoE / MLA fields of the HF config (inverse of ``_moe_args`` / ``_mla_args``)."""
    topk = int(_get(args, "moe_router_topk", default=2))
    ffn = int(_get(args, "moe_ffn_hidden_size", "ffn_hidden_size"))
    shared = int(_get(args, "moe_shared_expert_intermediate_size", default=0) or 0)
    pattern = _moe_layer_pattern(args, layers)
    moe = MegatronMoe(experts, topk, ffn, shared, pattern,
                      bool(_get(args, "moe_router_pre_softmax", default=False)))
    record = lookup(arch)
    if record is None or record.hf_moe_from_megatron is None:
        raise FormatError(f"{arch} is not a mixture-of-experts architecture")
    return record.hf_moe_from_megatron(args, moe)
