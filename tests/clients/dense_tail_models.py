"""Tiny random models of the dense long tail (issue #16): phi3, olmo2, gemma2, gemma3_text,
ministral3.

Each is its published config shrunk to the sizes of ``hf_models`` (hidden 64, 4 heads,
vocabulary 301) with every structural flag of the real model kept:

- ``phi3``: Phi-3-mini-4k's plain RoPE (megatron-core can reproduce it) with Phi-4-mini's
  GQA (4:2 here, 24:8 there) and ``partial_rotary_factor`` 0.75; untied. For the megatron-core
  logit test.
- ``phi4_mini``: Phi-4-mini: GQA, partial rotary 0.75, LongRoPE short/long factors (one per
  rotary pair), tied embeddings. For the round trips (megatron-core has no LongRoPE).
- ``phi3_5_mini``: Phi-3.5-mini: MHA (32:32 there, 4:4 here), LongRoPE with factors != 1,
  untied.
- ``olmo2``: OLMo-2 with OLMo-2-32B's GQA (so ``k_norm`` is ``G*d`` wide, ``q_norm`` ``nh*d``),
  post-attention and post-MLP norms and no input norm, untied.
- ``gemma2``: Gemma-2-9B: ``head_dim`` 24 != hidden / heads, GQA, ``query_pre_attn_scalar``
  != head_dim (Gemma-2-27B), attention and final softcapping, sliding window 4 (shorter than
  the 7-token test input, so it masks) on alternating layers, tied, gelu_pytorch_tanh.
- ``ministral3``: Ministral-3-3B's language model: GQA, ``head_dim`` 24 != hidden / heads,
  YaRN (factor 16 over 16384 positions) with the Llama-4 query temperature, tied.
- ``gemma3_text``: Gemma-3-4B's text model: q/k norms, 5 sliding : 1 full shrunk to every
  third layer global over 4 layers, dual RoPE bases with a linear factor on the global layers,
  sliding window 4, tied.

Parameters are redrawn by ``hf_models.randomize_`` (norm weights ~ 1 + N(0, 0.3): a Gemma
``(1 + w)`` norm loaded as ``w`` or ``w + 1`` changes the logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.clients import hf_models

__all__ = ["TAIL", "make_model"]

_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _longrope(theta: float, pairs: int, short: float, long: float) -> dict[str, Any]:
    return {"rope_type": "longrope", "rope_theta": theta, "partial_rotary_factor": 1.0,
            "short_factor": [short + 0.1 * i for i in range(pairs)],
            "long_factor": [long + 0.1 * i for i in range(pairs)]}


TAIL: dict[str, tuple[str, dict[str, Any]]] = {
    "phi3": ("Phi3Config", {
        "num_key_value_heads": 2, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.75}}),
    # head_dim 16, rotary dims 12: 6 factors per list.
    "phi4_mini": ("Phi3Config", {
        "num_key_value_heads": 2, "tie_word_embeddings": True,
        "original_max_position_embeddings": 16,
        "rope_parameters": {**_longrope(10000.0, 6, 1.0, 2.0), "partial_rotary_factor": 0.75}}),
    "phi3_5_mini": ("Phi3Config", {
        "num_key_value_heads": 4, "tie_word_embeddings": False,
        "original_max_position_embeddings": 16,
        "rope_parameters": _longrope(10000.0, 8, 1.2, 3.0)}),
    "olmo2": ("Olmo2Config", {
        "num_key_value_heads": 2, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    "gemma2": ("Gemma2Config", {
        "num_key_value_heads": 2, "head_dim": 24, "query_pre_attn_scalar": 20,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "gemma3_text": ("Gemma3TextConfig", {
        "num_hidden_layers": 4, "num_key_value_heads": 2, "head_dim": 24,
        "query_pre_attn_scalar": 24, "sliding_window": 4,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
                        "sliding_attention"],
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}),
    "ministral3": ("Ministral3Config", {
        "num_key_value_heads": 2, "head_dim": 24, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                            "original_max_position_embeddings": 16384, "beta_fast": 32.0,
                            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "llama_4_scaling_beta": 0.1}}),
}


def tail_config(name: str, **overrides: Any):
    """The transformers config object of ``name``."""
    import transformers

    cls_name, fields = TAIL[name]
    return getattr(transformers, cls_name)(**{**hf_models._COMMON, **_TOKENS, **fields,
                                              **overrides})


def make_model(name: str, tmp_path: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Save a random fp32 ``name`` model under ``tmp_path / name``; return the directory."""
    from transformers import AutoModelForCausalLM

    config = tail_config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf_models.randomize_(model, seed)
    out = Path(tmp_path) / name
    model.save_pretrained(out)
    return out
