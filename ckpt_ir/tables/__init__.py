"""Mapping tables: per architecture, how IR tensors map onto a format family's native tensors.

The engine (rows, bindings, tables, features) is :mod:`ckpt_ir.table_engine`; the rows of each
architecture are in its record (:mod:`ckpt_ir.architectures`); the ``mcore-lora`` rows of
adapters are in :mod:`ckpt_ir.tables.lora`. This module picks the rows for a naming and a model
and re-exports the engine's names, the import path the rest of ckpt-ir uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ckpt_ir.architectures import TABLES
from ckpt_ir.errors import FormatError, InternalError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.table_engine import (
    LAYER_FEATURES,
    NAMINGS,
    PIPELINE_TAIL,
    Binding,
    Features,
    NativeParams,
    Row,
    Table,
    TransformFactory,
    describe_rows,
    expand_table,
    hf_table,
    one,
)
from ckpt_ir.tables.lora import lora_table

__all__ = [
    "LAYER_FEATURES",
    "NAMINGS",
    "PIPELINE_TAIL",
    "Binding",
    "Features",
    "NativeParams",
    "Row",
    "Table",
    "TransformFactory",
    "build_table",
    "describe_rows",
    "drop_absent_mtp",
    "one",
    "rows_for",
]


def rows_for(config: ModelConfig, naming: str, *, required: bool = True) -> tuple[Row, ...]:
    """The rows of ``naming`` registered for the config's architecture (``()`` when not
    ``required`` and none are)."""
    arch = TABLES.get(config.architecture)
    if arch is None:
        raise FormatError(f"no mapping table for architecture {config.architecture!r}")
    if naming not in arch:
        if not required:
            return ()
        raise FormatError(f"no {naming!r} mapping for architecture {config.architecture!r}")
    return arch[naming]


def build_table(naming: str, config: ModelConfig, params: NativeParams | None = None, *,
                schema: Iterable[str] | None = None) -> Table:
    """Instantiate the ``naming`` table for ``config`` (every layer, every enabled row).

    The ``hf`` naming is the identity over ``schema`` (default: the model's own schema).
    """
    if naming not in NAMINGS:
        raise InternalError(f"unknown naming {naming!r}")
    params = params or NativeParams()
    if naming == "hf":
        return hf_table(config, rows_for(config, "hf", required=False), params, schema)
    if naming == "mcore-lora":
        return lora_table(config, params, schema)
    return expand_table(naming, rows_for(config, naming), config, params)


def drop_absent_mtp(config: ModelConfig, naming: str, params: NativeParams,
                    names: Iterable[str]) -> ModelConfig:
    """``config`` without its MTP layers when a checkpoint holds none of their tensors.

    DeepSeek-V3 configs announce ``num_nextn_predict_layers`` whether or not the weights were
    kept: transformers neither builds nor saves MTP layers, and fine-tuned exports drop them.
    A checkpoint with *some* MTP tensors keeps them, so the planner reports the missing ones.
    """
    if not config.num_mtp_layers:
        return config
    if naming == "mcore-lora":
        # LoRA adapters cover the decoder layers (AdapterConfig.schema); MTP layers have none.
        return config.without_mtp()
    present = set(names)
    table = build_table(naming, config, params)
    mtp = [b.native for b in table.bindings
           if any(_is_later_layer(n, config.num_layers) for n in b.ir.values())]
    return config if any(n in present for n in mtp) else config.without_mtp()


def _is_later_layer(name: str, num_layers: int) -> bool:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    # qwen3_next keeps its MTP layer under its own prefix, ``mtp.``.
    return (m is not None and int(m.group(1)) >= num_layers) or name.startswith("mtp.")
