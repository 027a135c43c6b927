"""Tiny random GLM-4.5 / GLM-4.5-Air / GLM-4.7-Flash / DeepSeek-V3.2 / GLM-5 models (fp32) for
``tests/clients/test_glm_client.py``.

Each tiny config is the real one shrunk, every structural flag kept (section numbers of
/work/shared/reference/architectures-wave2.md):

- ``glm4_moe`` (GLM-4.5, section 2.1): q/k/v biases without an o_proj bias, per-head q/k
  RMSNorm, ``head_dim`` 24 != hidden / heads 16, GQA 4:2, rotary on half of each head
  (``rope_parameters.partial_rotary_factor`` 0.5, as transformers 5.23 stores it), the first
  layer dense, 6 experts top-2 with sigmoid routing, a random fp32 ``e_score_correction_bias``,
  ``routed_scaling_factor`` 2.5, one shared expert, one MTP layer, untied.
- ``glm4_moe_air`` (GLM-4.5-Air): the same without the q/k norm.
- ``glm4_moe_lite`` (GLM-4.7-Flash, section 2.7): MLA with q-LoRA, interleaved rope, first
  layer dense (``mlp_layer_types``), 6 experts top-2, ``routed_scaling_factor`` 1.8.
- ``deepseek_v32`` (section 8): deepseek_v3 with 2 expert groups (top-1 group) and a DSA
  indexer (2 heads of 16) in every layer.
- ``glm_moe_dsa`` (GLM-5, section 8): MLA over GLM's MoE (one group, scale 2.5) with the
  indexer in every layer (``indexer_types`` all "full").

transformers neither builds nor saves MTP layers; :func:`add_mtp_layer` writes one into a saved
model's safetensors for the MTP round trips.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.clients.hf_models import VOCAB_SIZE, randomize_

__all__ = ["FAMILIES", "MTP_COPIES", "add_mtp_layer", "hf_config", "make_hf_model"]

MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
"""An HF MTP layer's copies of the embedding and the output head (not IR tensors)."""

_COMMON: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "vocab_size": VOCAB_SIZE, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_dropout": 0.0,
    "tie_word_embeddings": False, "n_routed_experts": 6, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
}
_GLM4_MOE: dict[str, Any] = {
    "num_key_value_heads": 2, "head_dim": 24, "attention_bias": True, "use_qk_norm": True,
    "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                        "partial_rotary_factor": 0.5},
}
_MLA: dict[str, Any] = {
    "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 24, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "rope_interleave": True,
    "first_k_dense_replace": 1, "mlp_layer_types": ["dense", "sparse", "sparse"],
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
}
_INDEXER: dict[str, Any] = {"index_n_heads": 2, "index_head_dim": 16, "index_topk": 4}

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "glm4_moe": ("Glm4MoeConfig", _GLM4_MOE),
    "glm4_moe_air": ("Glm4MoeConfig", {**_GLM4_MOE, "use_qk_norm": False,
                                       "routed_scaling_factor": 1.0}),
    # rms_norm_eps 1e-6 (GLM-4.7-Flash: 1e-5): transformers normalises q_a / kv_a with 1e-6
    # whatever the config says, megatron-core with the one layernorm_epsilon; the 1e-5 case
    # is measured on its own in test_glm_client.py.
    "glm4_moe_lite": ("Glm4MoeLiteConfig", {**_MLA, "routed_scaling_factor": 1.8,
                                            "n_group": 1, "topk_group": 1,
                                            "rms_norm_eps": 1e-6}),
    "deepseek_v32": ("DeepseekV32Config", {**_MLA, **_INDEXER, "routed_scaling_factor": 2.5,
                                           "n_group": 2, "topk_group": 1}),
    "glm_moe_dsa": ("GlmMoeDsaConfig", {**_MLA, **_INDEXER, "routed_scaling_factor": 2.5,
                                        "n_group": 1, "topk_group": 1,
                                        "indexer_types": ["full"] * 3}),
}


def hf_config(family: str, **overrides: Any):
    import transformers

    cls_name, fields = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**_COMMON, **fields, **overrides})


def make_hf_model(family: str, root: Path, *, seed: int = 0, name: str | None = None,
                  **overrides: Any) -> Path:
    """Save a random fp32 model of ``family`` under ``root / (name or family)``; return the
    directory."""
    from transformers import AutoModelForCausalLM

    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    out = Path(root) / (name or family)
    model.save_pretrained(out)
    return out


def add_mtp_layer(src: Path, dst: Path, *, seed: int = 0) -> Path:
    """``src`` with MTP layer ``num_hidden_layers`` written into its safetensors, as the hub
    files hold it: ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, a full decoder
    layer shaped like the last one (redrawn), and ``embed_tokens`` / ``shared_head.head``,
    copies of the model's embedding and head (:data:`MTP_COPIES`)."""
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    layers = config["num_hidden_layers"]
    tensors = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    h = config["hidden_size"]
    last, mtp = f"model.layers.{layers - 1}.", f"model.layers.{layers}."

    def draw(shape: tuple[int, ...], norm: bool) -> torch.Tensor:
        noise = torch.randn(shape, generator=gen)
        return 1.0 + 0.3 * noise if norm else 0.1 * noise

    extra = {mtp + "enorm.weight": draw((h,), True), mtp + "hnorm.weight": draw((h,), True),
             mtp + "eh_proj.weight": draw((h, 2 * h), False),
             mtp + "shared_head.norm.weight": draw((h,), True)}
    for name, t in tensors.items():
        if name.startswith(last):
            extra[mtp + name[len(last):]] = draw(tuple(t.shape), "norm" in name).to(t.dtype)
    extra[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    extra[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file({**tensors, **extra}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
