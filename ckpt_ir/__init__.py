"""ckpt-ir: convert LLM training checkpoints between formats through one neutral tensor IR.

Public names: :func:`convert`, :func:`open`, :func:`detect`, :func:`megatron_args`,
:class:`Report`, :class:`Checkpoint`, and the error hierarchy rooted at
:class:`CheckpointError`. Heavy modules load on first use so ``ckpt-ir --help`` is quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckpt_ir.errors import (
    CheckpointError,
    CorruptCheckpointError,
    DestinationError,
    DestinationExistsError,
    FormatError,
    IncompatibleLayoutError,
    InternalError,
    MissingConfigError,
    PlanError,
    UnsafeCheckpointError,
)

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CorruptCheckpointError",
    "DestinationError",
    "DestinationExistsError",
    "FormatError",
    "IncompatibleLayoutError",
    "InternalError",
    "MissingConfigError",
    "PlanError",
    "Report",
    "UnsafeCheckpointError",
    "convert",
    "detect",
    "megatron_args",
    "open",
]

_LAZY = {
    "convert": "ckpt_ir.api",
    "open": "ckpt_ir.api",
    "detect": "ckpt_ir.api",
    "Report": "ckpt_ir.api",
    "Checkpoint": "ckpt_ir.ir",
    "megatron_args": "ckpt_ir.megatron_config",
}

if TYPE_CHECKING:
    from ckpt_ir.api import Report, convert, detect, open
    from ckpt_ir.ir import Checkpoint
    from ckpt_ir.megatron_config import megatron_args


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt_ir' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
