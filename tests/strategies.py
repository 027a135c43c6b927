"""The one source of hypothesis strategies: valid by construction, bounded sizes."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtypes() -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from(FLOAT_DTYPES)


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype | None = None
            ) -> torch.Tensor:
    """Random bits of ``dtype``: NaN payloads, -0.0 and infinities included, so round trips
    are checked on raw bits, not on values."""
    dtype = dtype or draw(dtypes())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    nbytes = max(1, int(torch.Size(shape).numel()) * dtype.itemsize)
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    n = int(torch.Size(shape).numel())
    return raw[: n * dtype.itemsize].view(dtype).reshape(shape)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and raw bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    # reshape(-1): a 0-dim tensor cannot be viewed as bytes directly.
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


@st.composite
def dense_configs(draw: st.DrawFn, *, max_layers: int = 3,
                  archs: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "seed_oss")
                  ) -> dict[str, Any]:
    """Small HF config dicts for llama / mistral / qwen2 / qwen3 / seed_oss, or ``archs``
    among those and the dense long tail (:data:`DENSE_TAIL`).

    KV groups are drawn first and heads as a multiple (MHA, GQA and MQA all occur), head_dim
    independently of hidden/heads, odd vocab sizes, tied and untied embeddings; seed_oss with
    and without its q/k/v biases (``attention_bias``) and with its non-zero dropouts.
    """
    arch = draw(st.sampled_from(archs))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8, 12]))
    hidden = draw(st.sampled_from([16, 24, 32]))
    return {
        "model_type": arch,
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           "seed_oss": "SeedOssForCausalLM"}.get(arch, "")],
        "num_hidden_layers": draw(st.integers(1, max_layers)),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": draw(st.sampled_from([8, 20, 48])),
        "vocab_size": draw(st.integers(5, 67)),
        "tie_word_embeddings": draw(st.booleans()),
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        **({"attention_bias": draw(st.booleans()), "attention_out_bias": False,
            "mlp_bias": False, "attention_dropout": 0.1, "residual_dropout": 0.1}
           if arch == "seed_oss" else {}),
        **DENSE_TAIL.get(arch, {}),
    }


# The dense long tail (issue #16): model_type -> the fields that differ from llama's here
# (phi3's fused qkv_proj / gate_up_proj, olmo2's post-norms and full-width q/k norms, Gemma's
# four norms and GeGLU, ministral3's llama rows).
DENSE_TAIL: dict[str, dict[str, Any]] = {
    "phi3": {"architectures": ["Phi3ForCausalLM"]},
    "olmo2": {"architectures": ["Olmo2ForCausalLM"]},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "hidden_act": "gelu_pytorch_tanh"},
    "gemma3_text": {"architectures": ["Gemma3ForCausalLM"],
                    "hidden_activation": "gelu_pytorch_tanh", "hidden_act": None},
    "ministral3": {"architectures": ["Ministral3ForCausalLM"]},
}


def pipeline_splits(num_layers: int, *, max_pp: int = 4, max_vpp: int = 3
                    ) -> list[tuple[int, int, int | None, int | None]]:
    """Every (pp, vpp, first_stage_layers, last_stage_layers) that places ``num_layers``
    layers as megatron-core allows (enumerated, so layouts are valid by construction)."""
    from ckpt_ir.errors import IncompatibleLayoutError
    from ckpt_ir.layout import ParallelLayout

    found = []
    for pp in range(1, max_pp + 1):
        for vpp in range(1, max_vpp + 1 if pp > 1 else 2):
            uneven = [None, *range(1, num_layers + 1)] if pp > 1 else [None]
            for first in uneven:
                for last in uneven:
                    try:
                        ParallelLayout(1, pp, vpp, first_stage_layers=first,
                                       last_stage_layers=last).placement(num_layers)
                    except IncompatibleLayoutError:
                        continue
                    found.append((pp, vpp, first, last))
    return found


def tp_sizes(config: dict[str, Any], *, max_tp: int = 4) -> list[int]:
    """TP sizes megatron-core accepts for an HF config dict (the vocabulary gets padded)."""
    heads, groups = config["num_attention_heads"], config["num_key_value_heads"]
    rows = (heads + 2 * groups) * config["head_dim"]
    return [tp for tp in range(1, max_tp + 1)
            if heads % tp == 0 and (groups % tp == 0 or tp % groups == 0) and rows % tp == 0
            and config["intermediate_size"] % tp == 0]


@st.composite
def layouts(draw: st.DrawFn, config: dict[str, Any]):
    """A :class:`~ckpt_ir.layout.ParallelLayout` that can hold ``config`` (an HF config dict):
    TP among the sizes that divide heads, KV groups (or a multiple of them), QKV rows and FFN;
    PP, VPP and uneven first/last stages among the placements of its layers."""
    from ckpt_ir.layout import ParallelLayout

    tp = draw(st.sampled_from(tp_sizes(config)))
    pp, vpp, first, last = draw(st.sampled_from(pipeline_splits(config["num_hidden_layers"])))
    return ParallelLayout(tp, pp, vpp, first_stage_layers=first, last_stage_layers=last)


@st.composite
def small_ints(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """Integer values in [-4, 4] as ``dtype``: products and short sums of them are exact, so
    matrix identities (B @ A of stacked LoRA, merged weights) can be checked bit for bit."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=g).to(dtype)


LORA_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@st.composite
def lora_configs(draw: st.DrawFn) -> dict[str, Any]:
    """``adapter_config.json`` fields of a LoRA adapter: a non-empty subset of the linear
    modules, ranks and alphas (with per-module patterns), rsLoRA or not, and whether q/k/v and
    gate/up share one A matrix (the adapter came from Megatron's fused LoRA; then their ranks
    are equal)."""
    targets = draw(st.lists(st.sampled_from(LORA_LEAVES), min_size=1, max_size=7, unique=True))
    shared = draw(st.booleans())
    r = draw(st.sampled_from([1, 2, 4, 8]))
    alpha = draw(st.sampled_from([1, 2, 8, 16, 3.5]))
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if not shared and draw(st.booleans()):
        rank_pattern = {draw(st.sampled_from(targets)): draw(st.sampled_from([1, 2, 4, 16]))}
    if draw(st.booleans()):
        alpha_pattern = {draw(st.sampled_from(targets)): draw(st.sampled_from([4, 32]))}
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets,
            "use_rslora": draw(st.booleans()), "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "bias": "none", "task_type": "CAUSAL_LM",
            "shared_a": shared}


MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe",
                     "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa")
# deepseek_v3's tensors and config fields under another name (DSA: plus the indexer).
_MLA_FAMILIES = ("deepseek_v3", "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa")


# LoRA targets of an MoE family beyond the attention leaves: its expert leaves (Mixtral's
# w1/w3/w2) and module suffixes naming one site (a shared expert, a dense layer's MLP).
_MOE_LORA_TARGETS = {
    "mixtral": (("w1", "w3", "w2"), ()),
    "qwen2_moe": (("gate_proj", "up_proj", "down_proj"),
                  ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
                   "mlp.down_proj")),
    "qwen3_moe": (("gate_proj", "up_proj", "down_proj"), ("mlp.gate_proj",)),
    "deepseek_v3": (("gate_proj", "up_proj", "down_proj"),
                    ("shared_experts.gate_proj", "shared_experts.down_proj")),
}
_MOE_LORA_TARGETS |= {a: _MOE_LORA_TARGETS["deepseek_v3"]
                      for a in ("glm4_moe", *_MLA_FAMILIES)}


@st.composite
def moe_lora_configs(draw: st.DrawFn, hf: dict[str, Any]) -> dict[str, Any]:
    """:func:`lora_configs` for the MoE config ``hf``: expert leaves always among the targets,
    attention leaves except on DeepSeek-V3 (multi-latent attention is refused), sometimes a
    site-specific suffix (a shared expert, dense layers), patterns keyed by a target."""
    arch = hf["model_type"]
    mlp, sites = _MOE_LORA_TARGETS[arch]
    attention = () if arch in _MLA_FAMILIES else LORA_LEAVES[:4]
    targets = draw(st.lists(st.sampled_from(mlp), min_size=1, max_size=3, unique=True))
    targets += draw(st.lists(st.sampled_from(attention), max_size=4, unique=True)) \
        if attention else []
    targets += draw(st.lists(st.sampled_from(sites), max_size=2, unique=True)) if sites else []
    shared = draw(st.booleans())
    r = draw(st.sampled_from([1, 2, 4]))
    alpha = draw(st.sampled_from([1, 2, 8, 3.5]))
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if not shared and draw(st.booleans()):
        rank_pattern = {draw(st.sampled_from(targets)): draw(st.sampled_from([1, 2, 8]))}
    if draw(st.booleans()):
        alpha_pattern = {draw(st.sampled_from(targets)): draw(st.sampled_from([4, 32]))}
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets,
            "use_rslora": draw(st.booleans()), "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "bias": "none", "task_type": "CAUSAL_LM",
            "shared_a": shared}


@st.composite
def moe_configs(draw: st.DrawFn, *, max_layers: int = 3, max_experts: int = 6,
                archs: tuple[str, ...] = MOE_ARCHITECTURES) -> dict[str, Any]:
    """Small HF config dicts for mixtral / qwen2_moe / qwen3_moe / deepseek_v3 / glm4_moe and
    deepseek_v3's relatives (glm4_moe_lite, deepseek_v32, glm_moe_dsa).

    Valid by construction: top-k drawn within the expert count, DeepSeek's expert groups among
    the divisors of the expert count. Drawn: shared experts (and their size), dense layers
    (Qwen ``mlp_only_layers`` / ``decoder_sparse_step``, DeepSeek ``first_k_dense_replace``,
    so stacks are homogeneous or not), DeepSeek with and without q-LoRA and with 0 or 1 MTP
    layer, Qwen2-MoE with and without q/k/v biases, GLM-4.5 with and without q/k/v biases and
    QK norm (0 or 1 MTP layer), tied and untied embeddings. ``archs``: the families drawn from.
    """
    arch = draw(st.sampled_from(archs))
    layers = draw(st.integers(1, max_layers))
    experts = draw(st.integers(1, max_experts))
    hidden = draw(st.sampled_from([16, 24]))
    cfg: dict[str, Any] = {
        "model_type": arch,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": 4,
        "num_experts_per_tok": draw(st.integers(1, experts)),
        "vocab_size": draw(st.integers(5, 41)),
        "tie_word_embeddings": draw(st.booleans()),
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
    }
    ffn = draw(st.sampled_from([4, 8, 12]))
    if arch == "mixtral":
        cfg.update(num_local_experts=experts, intermediate_size=ffn,
                   num_key_value_heads=draw(st.sampled_from([1, 2, 4])))
    elif arch in ("qwen2_moe", "qwen3_moe"):
        cfg.update(moe_intermediate_size=ffn, intermediate_size=draw(st.sampled_from([8, 20])),
                   num_key_value_heads=draw(st.sampled_from([1, 2, 4])),
                   head_dim=draw(st.sampled_from([4, 8])),
                   decoder_sparse_step=draw(st.sampled_from([1, 1, 2])),
                   mlp_only_layers=draw(st.lists(st.integers(0, layers - 1), unique=True,
                                                 max_size=layers)),
                   norm_topk_prob=draw(st.booleans()))
        if arch == "qwen2_moe":
            cfg.update(num_experts=experts, qkv_bias=draw(st.booleans()),
                       shared_expert_intermediate_size=draw(st.sampled_from([4, 12])))
        else:
            cfg["num_local_experts"] = experts
    elif arch == "glm4_moe":
        cfg.update(n_routed_experts=experts, moe_intermediate_size=ffn,
                   intermediate_size=draw(st.sampled_from([8, 20])),
                   num_key_value_heads=draw(st.sampled_from([1, 2, 4])),
                   head_dim=draw(st.sampled_from([4, 8])),
                   attention_bias=draw(st.booleans()), use_qk_norm=draw(st.booleans()),
                   n_shared_experts=draw(st.integers(1, 2)),
                   first_k_dense_replace=draw(st.integers(0, layers)),
                   num_nextn_predict_layers=draw(st.integers(0, 1)),
                   routed_scaling_factor=2.5,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                    "partial_rotary_factor": 0.5})
    else:
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if experts % g == 0]))
        cfg.update(n_routed_experts=experts, moe_intermediate_size=ffn,
                   intermediate_size=draw(st.sampled_from([8, 20])), num_key_value_heads=4,
                   n_shared_experts=draw(st.integers(1, 2)), n_group=groups,
                   topk_group=draw(st.integers(1, groups)),
                   first_k_dense_replace=draw(st.integers(0, layers)),
                   q_lora_rank=draw(st.sampled_from([None, 8])), kv_lora_rank=6,
                   qk_nope_head_dim=draw(st.sampled_from([4, 8])), qk_rope_head_dim=4,
                   v_head_dim=draw(st.sampled_from([4, 6])),
                   num_nextn_predict_layers=draw(st.integers(0, 1)),
                   routed_scaling_factor=2.5, rope_interleave=True)
        if arch in ("deepseek_v32", "glm_moe_dsa"):
            # The indexer's wq_b reads the q-LoRA activations: DSA always has them.
            cfg.update(q_lora_rank=8, index_n_heads=draw(st.sampled_from([1, 2])),
                       index_head_dim=draw(st.sampled_from([4, 8])), index_topk=4)
    return cfg


def moe_tp_sizes(config: dict[str, Any], *, max_tp: int = 4) -> list[int]:
    """TP sizes (expert TP = TP) that cut every tensor of an MoE HF config dict evenly under the
    local spec, MLA's column-parallel down projections included."""
    from ckpt_ir.ir import ModelConfig

    cfg = ModelConfig.from_hf(config)
    sizes = [cfg.num_attention_heads, cfg.hidden_size, cfg.moe_intermediate_size,
             cfg.intermediate_size]
    if cfg.shared_expert_intermediate_size:
        sizes.append(cfg.shared_expert_intermediate_size)
    if cfg.has_mla:
        sizes += [cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.q_lora_rank or cfg.hidden_size]
    else:
        groups = cfg.num_key_value_heads
        sizes.append((cfg.num_attention_heads + 2 * groups) * cfg.head_dim)
    return [tp for tp in range(1, max_tp + 1) if all(s % tp == 0 for s in sizes)
            and (cfg.has_mla or cfg.num_key_value_heads % tp == 0
                 or tp % cfg.num_key_value_heads == 0)]


@st.composite
def moe_layouts(draw: st.DrawFn, config: dict[str, Any]):
    """A per-rank :class:`~ckpt_ir.layout.ParallelLayout` for an MoE HF config dict: TP among
    :func:`moe_tp_sizes`, EP among the divisors of the expert count (up to 4), and a pipeline
    split of its layers."""
    from ckpt_ir.ir import ModelConfig
    from ckpt_ir.layout import ParallelLayout

    experts = ModelConfig.from_hf(config).num_experts
    tp = draw(st.sampled_from(moe_tp_sizes(config)))
    ep = draw(st.sampled_from([e for e in (1, 2, 3, 4) if experts % e == 0]))
    pp, vpp, first, last = draw(st.sampled_from(
        pipeline_splits(config["num_hidden_layers"], max_pp=2, max_vpp=2)))
    return ParallelLayout(tp, pp, vpp, ep, first_stage_layers=first, last_stage_layers=last)
