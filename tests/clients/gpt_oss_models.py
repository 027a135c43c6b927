"""A tiny random ``GptOssForCausalLM`` (transformers 5.23, fp32) for the gpt-oss client tests.

The config is gpt-oss-20b's (tests/unit/test_gpt_oss.py, ``GPT_OSS_20B``) shrunk, every
structural flag kept: q/k/v and o_proj biases (``attention_bias``), attention sinks, router and
expert biases, untied embeddings, ``head_dim`` (24) != hidden / heads (16), GQA (4:2 here,
64:8 there), ``layer_types`` alternating from ``sliding_attention``, YaRN rope with
``truncate: false``, the clamped SwiGLU. Sizes are chosen so that each feature shows:

- ``intermediate_size`` 48 != ``hidden_size`` 64: a transposed ``down_proj`` changes shapes
  (in the releases F = H, and only the values tell, as in MB #3743);
- ``sliding_window`` 4 on a 16-token prompt: the sliding layers see fewer keys than the full
  ones;
- ``swiglu_limit`` 1.5 (7.0 in the releases): the clamps engage on the tiny model's activations
  (with 7.0 they never would), so a limit that is lost or applied to the wrong half shows;
- YaRN ``factor`` 32 over ``original_max_position_embeddings`` 16 (4096 in the releases) with
  ``max_position_embeddings`` 512 = 16 x 32, the relation the releases keep.

Every parameter is redrawn from a seeded generator: weights ~ N(0, 0.1), norm weights
~ 1 + N(0, 0.3), biases ~ N(0, 0.3), sinks ~ N(0, 1) (a sink of 0 weight would be invisible).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["SEQ_LEN", "VOCAB_SIZE", "gpt_oss_config", "input_ids", "make_gpt_oss"]

VOCAB_SIZE = 301  # odd: no TP size or padding multiple divides it
SEQ_LEN = 16

TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "vocab_size": VOCAB_SIZE,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "swiglu_limit": 1.5,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 512,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                        "beta_fast": 32.0, "beta_slow": 1.0,
                        "original_max_position_embeddings": 16, "truncate": False},
    "router_aux_loss_coef": 0.9,
    "attention_dropout": 0.0,
}


def gpt_oss_config(**overrides: Any):
    """transformers' ``GptOssConfig`` with the tiny sizes above."""
    from transformers import GptOssConfig

    return GptOssConfig(**{**TINY, **overrides})


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.copy_(1.0 + 0.3 * noise)
        elif name.endswith("bias"):  # .bias, gate_up_proj_bias, down_proj_bias
            p.copy_(0.3 * noise)
        elif name.endswith("sinks"):
            p.copy_(noise)
        else:
            p.copy_(0.1 * noise)


def make_gpt_oss(directory: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Save a random fp32 tiny gpt-oss under ``directory``; return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(gpt_oss_config(**overrides), dtype=torch.float32)
    randomize_(model, seed)
    model.save_pretrained(directory)
    return directory


def input_ids() -> list[list[int]]:
    """One 16-token sequence touching the first and the last vocabulary rows."""
    gen = torch.Generator().manual_seed(4321)
    ids = torch.randint(0, VOCAB_SIZE, (1, SEQ_LEN), generator=gen)
    ids[0, 0], ids[0, -1] = 0, VOCAB_SIZE - 1
    return ids.tolist()
