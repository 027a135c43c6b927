"""Seed-OSS (ByteDance Seed-OSS-36B): qwen2's tensors, qwen2's rows.

transformers' ``SeedOssForCausalLM`` stores exactly qwen2's tensors: ``q/k/v_proj`` with
biases, ``o_proj`` without, a SwiGLU MLP without biases, untied embeddings. Its ``head_dim``
is a field of its own (128 with 80 heads and hidden 5120: ``nh * d != H``), which the shared
rows already size from ``ModelConfig.head_dim`` (Megatron ``kv_channels``).

Three config flags decide the biases, each named so that none is dropped silently:

* ``attention_bias`` (default true): q/k/v biases, Megatron ``add_qkv_bias``; false gives
  llama's rows.
* ``attention_out_bias`` (default false): an ``o_proj`` bias. Megatron has it only as
  ``add_bias_linear``, which also adds biases to ``linear_fc1`` / ``linear_fc2``, so it is
  refused (FormatError), as ``mlp_bias`` is for every family.
* ``mlp_bias``: refused by ``ModelConfig`` for every family.

The config's ``attention_dropout`` / ``residual_dropout`` (0.1 in the published model) are
training choices: ``megatron_args`` sets megatron-core's dropouts to 0, as for every family,
and says so in its notes (docs/formats/mcore-dist.md).

Facts: /work/shared/reference/architectures-wave2.md section 7.3 (transformers 5.23
``modeling_seed_oss``); no Megatron-Bridge / mbridge / verl mapping exists to compare with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckpt_ir.architectures.dense import DENSE_MCORE_ROWS
from ckpt_ir.architectures.record import Architecture
from ckpt_ir.errors import FormatError

__all__ = ["SEED_OSS"]


def _qkv_bias(hf: Mapping[str, Any]) -> bool:
    """``attention_bias`` means the q/k/v biases here (transformers' default: true)."""
    return bool(hf.get("attention_bias", True))


def _refuse_out_bias(hf: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """No extra ModelConfig fields; refuses an ``o_proj`` bias.

    The record has no config check for dense families (``check_moe`` runs for MoE configs
    only); ``hf_fields`` is what every config read calls, so the refusal lives here.
    """
    if hf.get("attention_out_bias"):
        raise FormatError("seed_oss with attention_out_bias=True (o_proj bias) is not "
                          "supported: Megatron has it only as add_bias_linear, which also "
                          "biases the MLP")
    return {}


# No megatron_guess: bare Megatron arguments of a seed_oss model are qwen2's (add_qkv_bias, an
# explicit kv_channels), so only a named architecture or an HF config makes them seed_oss.
SEED_OSS = Architecture("seed_oss", "SeedOss", {"mcore": DENSE_MCORE_ROWS},
                        hf_fields=_refuse_out_bias, qkv_bias=_qkv_bias,
                        attention_bias_refused=False, attention_bias_is_qkv_bias=True)
