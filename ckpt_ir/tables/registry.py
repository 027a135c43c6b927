"""Architecture string -> naming -> rows. Aliases share one tuple (mistral reuses llama's)."""

from __future__ import annotations

from collections.abc import Mapping

from ckpt_ir.tables import Row
from ckpt_ir.tables.dense import DENSE_MCORE_ROWS

__all__ = ["TABLES"]

_DENSE: Mapping[str, tuple[Row, ...]] = {"mcore": DENSE_MCORE_ROWS}

TABLES: Mapping[str, Mapping[str, tuple[Row, ...]]] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
}
