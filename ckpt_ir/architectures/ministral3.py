"""Ministral 3 text (``ministral3``: the language model of Ministral-3-3B / 8B / 14B-2512).

transformers' ``Ministral3ForCausalLM`` stores llama's tensors (GQA, an explicit ``head_dim``,
no biases, SwiGLU), so the rows are llama's. What differs is the position encoding, carried in
the HF config every format keeps:

* YaRN (``rope_parameters``: factor 16 over ``original_max_position_embeddings`` 16384,
  ``beta_fast`` 32, ``beta_slow`` 1, ``mscale`` / ``mscale_all_dim`` 1). megatron-core 0.16.1's
  GPTModel has a ``yarn`` position embedding, but reads its ``yarn_*`` fields as attributes a
  plain ``TransformerConfig`` does not declare, so ``megatron_args`` keeps ``rope`` and lists the
  values in its notes;
* a Llama-4-style query temperature ``q * (1 + beta * ln(1 + floor(pos / orig_max)))``
  (``llama_4_scaling_beta`` 0.1): exactly 1 below 16384 positions, and in no megatron-core
  module (Megatron-Bridge has it only in its TE attention).

The vision-language checkpoint (``mistral3``: Pixtral tower, patch merger, projector under
``vision_tower.`` / ``multi_modal_projector.``, the language model under
``language_model.model.``) is the ``mistral3`` record of
:mod:`ckpt_ir.architectures.vl_passthrough`, over these rows.

Facts: /work/shared/reference/architectures-wave2.md section 7.4 (transformers 5.23
``modeling_ministral3``; Megatron-Bridge ``ministral3/ministral3_bridge.py``: llama rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckpt_ir.architectures.dense import DENSE_MCORE_ROWS
from ckpt_ir.architectures.record import Architecture, MegatronExtra

if TYPE_CHECKING:
    from ckpt_ir.ir import ModelConfig

__all__ = ["MINISTRAL3"]

_YARN = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
         "mscale_all_dim")


def _megatron(config: ModelConfig, notes: list[str]) -> MegatronExtra:
    rope = {**(config.hf.get("rope_scaling") or {}), **(config.hf.get("rope_parameters") or {})}
    if (rope.get("rope_type") or rope.get("type")) == "yarn":
        values = ", ".join(f"{k}={rope[k]}" for k in _YARN if k in rope)
        notes.append(f"ministral3 YaRN ({values}): megatron-core's GPTModel "
                     "position_embedding_type='yarn' reads these as yarn_* attributes that "
                     "TransformerConfig does not declare; set them on the config yourself")
    beta = rope.get("llama_4_scaling_beta")
    if beta:
        notes.append(f"ministral3 query temperature (llama_4_scaling_beta={beta}) has no "
                     "megatron-core module: exact below original_max_position_embeddings "
                     "positions only")
    return MegatronExtra()


MINISTRAL3 = Architecture("ministral3", "Ministral3", {"mcore": DENSE_MCORE_ROWS},
                          megatron_extra=_megatron)
