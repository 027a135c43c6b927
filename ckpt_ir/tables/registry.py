"""Architecture string -> naming -> rows. Aliases share one tuple (mistral reuses llama's)."""

from __future__ import annotations

from collections.abc import Mapping

from ckpt_ir.tables import Row
from ckpt_ir.tables.deepseek import DEEPSEEK_V3_MCORE_ROWS
from ckpt_ir.tables.dense import DENSE_MCORE_ROWS
from ckpt_ir.tables.moe import HF_FUSED_ROWS, MOE_MCORE_ROWS
from ckpt_ir.tables.verl_native import VERL_NATIVE_ROWS

__all__ = ["TABLES"]

# verl's era-A models existed for Llama, Mistral and Qwen2 only (Qwen3 came after verl moved to
# megatron-core's GPTModel), so qwen3 has no verl-native rows.
_DENSE: Mapping[str, tuple[Row, ...]] = {"mcore": DENSE_MCORE_ROWS,
                                         "verl-native": VERL_NATIVE_ROWS}
_DENSE_MCORE_ONLY: Mapping[str, tuple[Row, ...]] = {"mcore": DENSE_MCORE_ROWS}

TABLES: Mapping[str, Mapping[str, tuple[Row, ...]]] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE_MCORE_ONLY,
    # MoE: "hf" rows are the fused-experts variant of the hf naming (identity elsewhere).
    "mixtral": {"mcore": MOE_MCORE_ROWS["mixtral"], "hf": HF_FUSED_ROWS["mixtral"]},
    "qwen2_moe": {"mcore": MOE_MCORE_ROWS["qwen2_moe"], "hf": HF_FUSED_ROWS["qwen2_moe"]},
    "qwen3_moe": {"mcore": MOE_MCORE_ROWS["qwen3_moe"], "hf": HF_FUSED_ROWS["qwen3_moe"]},
    "deepseek_v3": {"mcore": DEEPSEEK_V3_MCORE_ROWS, "hf": HF_FUSED_ROWS["deepseek_v3"]},
}
