"""gpt-oss (openai/gpt-oss-20b, gpt-oss-120b), bf16 layout: an MoE family beyond the others.

What sets it apart, and where each piece lives:

* **Biases everywhere.** q/k/v *and* ``o_proj`` biases (``attention_bias``), a router bias,
  and a bias on each expert's gate/up and down projections: Megatron's ``add_qkv_bias`` and
  ``add_bias_linear`` together (``linear_proj.bias``, ``mlp.router.bias``,
  ``mlp.experts.experts.{e}.linear_fc{1,2}.bias``). ``attention_bias=False`` would leave the
  expert and router biases, which ``add_bias_linear`` cannot express without an o_proj bias:
  refused.
* **Attention sinks**: ``self_attn.sinks`` ``[nh]``, one logit per head in the softmax
  denominator; megatron-core's ``softmax_type="learnable"`` keeps them as
  ``self_attention.core_attention.softmax_offset``, split over TP ranks with the heads.
* **Fused, interleaved, input-major experts on disk.** transformers (5.23, as the bf16 hub
  copies) stores ``mlp.experts.gate_up_proj`` ``[E, H, 2F]`` with column ``2j`` = gate ``j`` and
  ``2j + 1`` = up ``j``, ``gate_up_proj_bias`` ``[E, 2F]`` interleaved alike,
  ``down_proj`` ``[E, F, H]`` and ``down_proj_bias`` ``[E, H]``. The IR holds one tensor per
  expert and role in ``nn.Linear`` orientation (``mlp.experts.{e}.gate_proj.weight`` ``[F, H]``,
  ``down_proj.weight`` ``[H, F]``, their biases), so per-rank formats cut experts by EP rank
  and the ``mcore`` rows are the usual ``[gate; up]``; the ``hf`` rows fuse them back with
  :class:`~ckpt_ir.transforms.InterleaveExperts`. The orientation is the transform's, never a
  guess from shapes: ``down_proj`` is square in both releases (F = H = 2880), which is how
  Megatron-Bridge imported it transposed without an error (MB #3743 / #3753). These per-expert
  IR names are not names transformers reads; every ``hf`` write is fused (``--hf-experts``
  does not apply), the only layout ``GptOssForCausalLM`` loads.
* **Clamped SwiGLU**: ``gate = clamp(gate, max=limit)``, ``up = clamp(up, -limit, limit)``,
  ``(up + 1) * gate * sigmoid(1.702 * gate)``: megatron-core's ``quick_gelu`` (α = 1.702 hard
  coded, so another ``swiglu_alpha`` is refused) with ``activation_func_clamp_value`` = limit
  and ``glu_linear_offset`` = 1.
* **Alternating sliding window** (``layer_types``, ``sliding_window`` N): megatron-core's
  ``window_size=(N - 1, 0)`` on the layers ``window_attn_skip_freq`` marks (2 for the
  released sliding/full alternation, else the per-layer list).
* **YaRN rope** (``rope_type: yarn``): ``position_embedding_type="yarn"`` and the ``yarn_*``
  attributes megatron-core reads from the config with getattr (TransformerConfig declares
  none; ``MegatronModelArgs.config_attributes``). No ``mscale`` / ``mscale_all_dim`` in the
  HF config gives both sides the same concentration factor ``0.1 ln(factor) + 1``; ``truncate``
  is ``yarn_correction_range_round_to_int``.

Parallel layouts: megatron-core 0.16.1 builds biased experts only with expert TP 1
(``TransformerConfig`` asserts it), so layouts with expert TP > 1 are refused
(``ModelConfig.has_expert_biases``); per-rank formats default to expert TP 1 for them
(``ParallelLayout.for_model``: whole experts in every TP rank's file) at any TP / PP / EP, and
mcore-dist (TP-invariant) loads at any TP with ``expert_tensor_parallel_size=1``.

LoRA: peft adapts the experts through ``target_parameters`` on the fused parameters, as for the
other families, but ``gate_up_proj``'s ParamWrapper B rows are interleaved like its outputs
(``MoeNames.gate_up_interleaved``, read and written by the hf-peft converter); attention modules
are ordinary. The router is not a LoRA target (as for every family).

Routing: top-k of the router logits (bias included), softmax over the k: megatron-core's
default (``moe_router_pre_softmax=False``). MXFP4 checkpoints (``*_blocks`` / ``*_scales``)
are another reader's business; this record is the bf16 layout they dequantize to. Their blocks
are *output-major* (``[E, 2F, H]`` / ``[E, H, F]`` after dequantization, rows still
interleaved): a reader presents them transposed on dims 1 and 2 as ``gate_up_proj`` /
``down_proj``, by provenance (the ``_blocks`` suffix), not by shape.

Facts: /work/shared/reference/architectures-wave2.md §4 (transformers 5.23
``modeling_gpt_oss``, Megatron-Bridge ``gpt_oss_bridge.py``, megatron-core 0.16.1 local spec
run on CPU), checked here by tests/clients/test_gpt_oss_client.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckpt_ir.architectures.dense import ATTENTION_ROWS, pad_vocab
from ckpt_ir.architectures.moe import expert_fields
from ckpt_ir.architectures.record import (
    Architecture,
    MegatronExtra,
    MegatronMoe,
    MoeNames,
    hf_int,
    megatron_arg,
)
from ckpt_ir.architectures.schema import attention_schema, head_schema
from ckpt_ir.architectures.torchtitan import TORCHTITAN_GPT_OSS_ROWS
from ckpt_ir.errors import FormatError, MissingConfigError
from ckpt_ir.layout import Partition
from ckpt_ir.table_engine import NativeParams, Row, one
from ckpt_ir.transforms import TENSOR, ConcatGateUp, InterleaveExperts, StackExperts

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig, Shape

__all__ = ["GPT_OSS", "MEGATRON_SWIGLU_ALPHA"]

L = "decoder.layers.{layer}."
H = "model.layers.{layer}."
X = H + "mlp.experts.{expert}."   # IR: one expert's tensors
E = L + "mlp.experts.experts.{expert}."

NAMES = MoeNames("mlp.router.weight", "mlp.experts.{expert}.", "gate_proj", "up_proj",
                 "down_proj", gate_up_interleaved=True)

MEGATRON_SWIGLU_ALPHA = 1.702
"""megatron-core's ``quick_gelu`` is ``x * sigmoid(1.702 x)``, with no field for α."""

_LAYER_TYPES = ("sliding_attention", "full_attention")


# --------------------------------------------------------------------------- schema


def gpt_oss_schema(config: ModelConfig) -> dict[str, Shape]:
    """Every IR tensor: attention with q/k/v/o biases and sinks, the biased router, and each
    expert's gate / up / down weights and biases in ``nn.Linear`` orientation."""
    h, f = config.hidden_size, config.moe_intermediate_size
    out: dict[str, Shape] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        attention_schema(config, p, out)
        out[p + "self_attn.o_proj.bias"] = (h,)
        out[p + "self_attn.sinks"] = (config.num_attention_heads,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.router.weight"] = (config.num_experts, h)
        out[p + "mlp.router.bias"] = (config.num_experts,)
        for e in range(config.num_experts):
            x = f"{p}mlp.experts.{e}."
            for role in ("gate_proj", "up_proj"):
                out[x + role + ".weight"] = (f, h)
                out[x + role + ".bias"] = (f,)
            out[x + "down_proj.weight"] = (h, f)
            out[x + "down_proj.bias"] = (h,)
    out["model.norm.weight"] = (h,)
    head_schema(config, out)
    return out


# --------------------------------------------------------------------------- rows


def _gate_up(config: ModelConfig, params: NativeParams) -> InterleaveExperts:
    """gate_up_proj: gate and up interleaved by column, input-major ([E, H, 2F])."""
    return InterleaveExperts(config.num_experts, ("gate", "up"))


def _gate_up_bias(config: ModelConfig, params: NativeParams) -> InterleaveExperts:
    """gate_up_proj_bias: gate and up interleaved ([E, 2F])."""
    return InterleaveExperts(config.num_experts, ("gate", "up"), input_major=False)


def _down(config: ModelConfig, params: NativeParams) -> InterleaveExperts:
    """down_proj: each expert's [H, F] transposed ([E, F, H])."""
    return InterleaveExperts(config.num_experts)


def _down_bias(config: ModelConfig, params: NativeParams) -> StackExperts:
    """down_proj_bias: stacked over experts ([E, H])."""
    return StackExperts(config.num_experts)


_POST = one(H + "post_attention_layernorm.weight")

MCORE_ROWS: tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", one("model.embed_tokens.weight"),
        pad_vocab, Partition.VOCAB),
    *ATTENTION_ROWS,
    # A row-parallel layer's bias is whole on every TP rank.
    Row(L + "self_attention.linear_proj.bias", one(H + "self_attn.o_proj.bias")),
    Row(L + "self_attention.core_attention.softmax_offset", one(H + "self_attn.sinks"),
        partition=Partition.COLUMN),
    # Every layer is routed: the MoE layer's norm names (see moe.py's table).
    Row(L + "pre_mlp_layernorm.weight", _POST, when="te_norms"),
    Row(L + "pre_mlp_layernorm.weight", _POST, when="local_norms"),
    Row(L + "mlp.linear_fc1.layer_norm_weight", _POST, when="local_dist_norms"),
    Row(L + "mlp.router.weight", one(H + "mlp.router.weight")),
    Row(L + "mlp.router.bias", one(H + "mlp.router.bias")),
    Row(E + "linear_fc1.weight", {"gate": X + "gate_proj.weight", "up": X + "up_proj.weight"},
        ConcatGateUp(), Partition.SWIGLU),
    Row(E + "linear_fc1.bias", {"gate": X + "gate_proj.bias", "up": X + "up_proj.bias"},
        ConcatGateUp(), Partition.SWIGLU),
    Row(E + "linear_fc2.weight", one(X + "down_proj.weight"), partition=Partition.ROW),
    Row(E + "linear_fc2.bias", one(X + "down_proj.bias")),
    Row("decoder.final_layernorm.weight", one("model.norm.weight")),
    Row("output_layer.weight", one("lm_head.weight"), pad_vocab, Partition.VOCAB,
        when="is_untied"),
)

# The hf naming: the identity except the four fused expert tensors of each layer. No
# ``fused_experts`` condition: transformers reads gpt-oss experts in this layout only.
HF_ROWS: tuple[Row, ...] = (
    Row(H + "mlp.experts.gate_up_proj",
        {"gate": X + "gate_proj.weight", "up": X + "up_proj.weight"}, _gate_up,
        stack="expert"),
    Row(H + "mlp.experts.gate_up_proj_bias",
        {"gate": X + "gate_proj.bias", "up": X + "up_proj.bias"}, _gate_up_bias,
        stack="expert"),
    Row(H + "mlp.experts.down_proj", {TENSOR: X + "down_proj.weight"}, _down, stack="expert"),
    Row(H + "mlp.experts.down_proj_bias", {TENSOR: X + "down_proj.bias"}, _down_bias,
        stack="expert"),
)


# --------------------------------------------------------------------------- config


def _hf_fields(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    # The expert FFN size is intermediate_size (there is no dense MLP); every layer is routed.
    return {**expert_fields(hf), "moe_intermediate_size": hf_int(hf, "intermediate_size"),
            "moe_layers": tuple(range(layers))}


def _qkv_bias(hf: Mapping[str, Any]) -> bool:
    """``attention_bias`` (transformers' default: true) biases q, k, v and o."""
    return bool(hf.get("attention_bias", True))


def _number(hf: Mapping[str, Any], name: str, default: float) -> float:
    value = hf.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise FormatError(f"gpt_oss {name} must be a finite number, not {value!r}")
    return float(value)


def sliding_layers(config: ModelConfig) -> list[bool]:
    """Per decoder layer: whether it attends through the sliding window (``layer_types``)."""
    types = config.hf.get("layer_types")
    if types is None:
        # transformers' default: sliding first, alternating.
        return [i % 2 == 0 for i in range(config.num_layers)]
    return [t == "sliding_attention" for t in types]


def _check(config: ModelConfig) -> None:
    hf = config.hf
    if not config.has_qkv_bias:
        raise FormatError("gpt_oss with attention_bias=False is not supported: its router and "
                          "expert biases need Megatron's add_bias_linear, which also biases "
                          "o_proj")
    if config.shared_expert_intermediate_size:
        raise FormatError("gpt_oss has no shared experts")
    types = hf.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != config.num_layers
                              or any(t not in _LAYER_TYPES for t in types)):
        raise FormatError(f"gpt_oss layer_types must list {' or '.join(_LAYER_TYPES)} for each "
                          f"of the {config.num_layers} layers")
    if any(sliding_layers(config)):
        window = hf.get("sliding_window")
        if type(window) is not int or window < 1:
            raise FormatError(f"gpt_oss sliding_window must be a positive integer, not "
                              f"{window!r}")
    alpha = _number(hf, "swiglu_alpha", MEGATRON_SWIGLU_ALPHA)
    if alpha != MEGATRON_SWIGLU_ALPHA:
        raise FormatError(f"gpt_oss swiglu_alpha={alpha} is not supported: megatron-core's "
                          f"quick_gelu has alpha {MEGATRON_SWIGLU_ALPHA} built in")
    if _number(hf, "swiglu_limit", 7.0) <= 0:
        raise FormatError("gpt_oss swiglu_limit must be positive")
    rope = _rope_parameters(hf)
    if (rope.get("rope_type") or rope.get("type")) == "yarn":
        # Checked here, with the config: megatron_args (and the transformer_config.json an
        # mcore-dist write carries) must not meet a malformed value later.
        for name, default in (("factor", None), ("beta_fast", 32.0), ("beta_slow", 1.0)):
            value = rope.get(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise FormatError(f"gpt_oss YaRN {name} must be a positive number, not "
                                  f"{value!r}")
        original = rope.get("original_max_position_embeddings")
        if original is not None and (type(original) is not int or original < 1):
            raise FormatError(f"gpt_oss YaRN original_max_position_embeddings must be a "
                              f"positive integer, not {original!r}")


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    # transformers 5 writes rope_parameters; the hub's configs (4.55) say rope_scaling.
    return {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}


def _yarn(hf: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """megatron-core's ``yarn_*`` config attributes for an HF YaRN rope, or {}."""
    rope = _rope_parameters(hf)
    if (rope.get("rope_type") or rope.get("type")) != "yarn":
        return {}
    if rope.get("attention_factor") is not None:
        notes.append("rope attention_factor has no megatron-core field: YaRN's concentration "
                     "factor is computed from the scaling factor; the attention will differ")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    both = bool(mscale) and bool(mscale_all_dim)  # transformers uses them only together
    return {
        "yarn_rotary_scaling_factor": float(rope["factor"]),
        "yarn_original_max_position_embeddings": int(
            rope.get("original_max_position_embeddings")
            or hf.get("max_position_embeddings") or 4096),
        "yarn_beta_fast": float(rope.get("beta_fast", 32.0)),
        "yarn_beta_slow": float(rope.get("beta_slow", 1.0)),
        "yarn_mscale": float(mscale) if both else None,
        "yarn_mscale_all_dim": float(mscale_all_dim) if both else None,
        "yarn_correction_range_round_to_int": bool(rope.get("truncate", True)),
    }


def _megatron(config: ModelConfig, notes: list[str]) -> MegatronExtra:
    hf = config.hf
    tc: dict[str, Any] = {
        "add_bias_linear": True,
        "softmax_type": "learnable",
        "activation_func_clamp_value": _number(hf, "swiglu_limit", 7.0),
        "glu_linear_offset": 1.0,
    }
    sliding = sliding_layers(config)
    if any(sliding):
        tc["window_size"] = (hf["sliding_window"] - 1, 0)
        if all(sliding):
            tc["window_attn_skip_freq"] = None
        elif sliding == [i % 2 == 0 for i in range(config.num_layers)]:
            # Megatron-Bridge's setting: 1-indexed layer n slides unless n % 2 == 0.
            tc["window_attn_skip_freq"] = 2
        else:
            tc["window_attn_skip_freq"] = [int(s) for s in sliding]
    yarn = _yarn(hf, notes)
    # The shared rope mapping noted that it has no GPTModel equivalent for YaRN; this has.
    notes[:] = [n for n in notes if not (yarn and "'yarn'" in n)]
    return MegatronExtra(transformer_config=tc,
                         gpt_model={"position_embedding_type": "yarn"} if yarn else {},
                         config_attributes=yarn, activation="quick_gelu")


def _from_megatron(args: Mapping[str, Any], moe: MegatronMoe) -> dict[str, Any]:
    """The gpt-oss fields of an HF config from Megatron arguments named gpt_oss (the inverse of
    :func:`_megatron`; Megatron-Bridge's GPT-OSS provider records the same fields, ``yarn_*``
    included). What the arguments cannot say is refused, not guessed."""
    if moe.dense:
        raise FormatError(f"gpt_oss has no dense layers; moe_layer_freq marks {moe.dense}")
    if megatron_arg(args, "softmax_type") != "learnable":
        raise FormatError("gpt_oss Megatron arguments need softmax_type='learnable' (the "
                          "attention sinks)")
    if not megatron_arg(args, "add_qkv_bias", default=False):
        raise FormatError("gpt_oss Megatron arguments need add_qkv_bias=True")
    limit = megatron_arg(args, "activation_func_clamp_value")
    if limit is None or float(megatron_arg(args, "glu_linear_offset", default=0.0)) != 1.0:
        raise FormatError("gpt_oss Megatron arguments need activation_func_clamp_value and "
                          "glu_linear_offset=1 (the clamped SwiGLU)")
    layers = len(moe.pattern)
    window = megatron_arg(args, "window_size")
    if window is None:
        sliding, size = [False] * layers, None
    else:
        if len(window) != 2 or window[1] != 0:
            raise FormatError(f"gpt_oss window_size {window!r} must be (N - 1, 0)")
        size = int(window[0]) + 1
        freq = megatron_arg(args, "window_attn_skip_freq")
        if freq is None:
            sliding = [True] * layers
        elif isinstance(freq, int) and not isinstance(freq, bool) and freq > 0:
            sliding = [(i + 1) % freq != 0 for i in range(layers)]
        elif isinstance(freq, (list, tuple)) and len(freq) == layers:
            sliding = [bool(v) for v in freq]
        else:
            raise FormatError(f"gpt_oss window_attn_skip_freq {freq!r} is not an int or a "
                              f"list for {layers} layers")
    out: dict[str, Any] = {
        "num_local_experts": moe.experts, "num_experts_per_tok": moe.topk,
        "intermediate_size": moe.ffn, "attention_bias": True,
        "swiglu_limit": float(limit), "sliding_window": size,
        "layer_types": [_LAYER_TYPES[0] if s else _LAYER_TYPES[1] for s in sliding],
    }
    if megatron_arg(args, "position_embedding_type") == "yarn":
        factor = megatron_arg(args, "yarn_rotary_scaling_factor")
        if factor is None:
            raise MissingConfigError("gpt_oss Megatron arguments use YaRN but carry no "
                                     "yarn_rotary_scaling_factor; pass the HF config")
        theta = megatron_arg(args, "rotary_base")
        mscale = megatron_arg(args, "yarn_mscale")
        mscale_all_dim = megatron_arg(args, "yarn_mscale_all_dim")
        out["rope_parameters"] = {
            "rope_type": "yarn", **({"rope_theta": float(theta)} if theta is not None else {}),
            "factor": float(factor),
            "original_max_position_embeddings": int(megatron_arg(
                args, "yarn_original_max_position_embeddings", default=4096)),
            "beta_fast": float(megatron_arg(args, "yarn_beta_fast", default=32.0)),
            "beta_slow": float(megatron_arg(args, "yarn_beta_slow", default=1.0)),
            "truncate": bool(megatron_arg(args, "yarn_correction_range_round_to_int",
                                          default=True)),
            **({"mscale": float(mscale), "mscale_all_dim": float(mscale_all_dim)}
               if mscale is not None and mscale_all_dim is not None else {})}
    return out


# No megatron_guess: bare Megatron arguments with add_bias_linear are refused (they name no
# family); arguments named gpt_oss read back through hf_moe_from_megatron.
GPT_OSS = Architecture(
    "gpt_oss", "GptOss",
    {"mcore": MCORE_ROWS, "hf": HF_ROWS, "torchtitan": TORCHTITAN_GPT_OSS_ROWS}, moe=NAMES,
    schema=gpt_oss_schema, hf_fields=_hf_fields, qkv_bias=_qkv_bias,
    attention_bias_refused=False, check_moe=_check, megatron_extra=_megatron,
    hf_moe_from_megatron=_from_megatron, expert_biases=True)
