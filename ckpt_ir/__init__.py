"""ckpt-ir: convert LLM training checkpoints between formats through one neutral tensor IR.

Public names: :func:`convert`, :func:`open`, :func:`detect`, :func:`verify`,
:func:`extract_adapter`, :func:`merge_adapter`, :func:`megatron_args`, :class:`Report`,
:class:`VerifyReport`, :class:`Checkpoint`, and the error hierarchy rooted at
:class:`CheckpointError`. Heavy modules load on first use so
``ckpt-ir --help`` is quick. Pytest helpers for users' CI live in :mod:`ckpt_ir.testing`.
"""

from __future__ import annotations

import sys
import types
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
    "ParallelLayout",
    "PlanError",
    "Report",
    "UnsafeCheckpointError",
    "VerifyReport",
    "convert",
    "detect",
    "extract_adapter",
    "megatron_args",
    "merge_adapter",
    "open",
    "verify",
]

_LAZY = {
    "convert": "ckpt_ir.api",
    "open": "ckpt_ir.api",
    "detect": "ckpt_ir.api",
    "Report": "ckpt_ir.api",
    "Checkpoint": "ckpt_ir.ir",
    "megatron_args": "ckpt_ir.megatron_config",
    "ParallelLayout": "ckpt_ir.layout",
    "verify": "ckpt_ir.verify",
    "VerifyReport": "ckpt_ir.verify",
    "extract_adapter": "ckpt_ir.adapter_api",
    "merge_adapter": "ckpt_ir.adapter_api",
}

if TYPE_CHECKING:
    from ckpt_ir.adapter_api import extract_adapter, merge_adapter
    from ckpt_ir.api import Report, convert, detect, open
    from ckpt_ir.ir import Checkpoint
    from ckpt_ir.layout import ParallelLayout
    from ckpt_ir.megatron_config import megatron_args
    from ckpt_ir.verify import VerifyReport, verify


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt_ir' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """This package, keeping public functions from being shadowed by same-named submodules.

    Importing a submodule binds it as an attribute of its package: once anything imported
    ``ckpt_ir.detect`` (the API does) or ``ckpt_ir.verify``, ``ckpt_ir.detect`` and
    ``ckpt_ir.verify`` would be modules instead of the functions. Submodules stay reachable
    through ``sys.modules`` and ``from ckpt_ir.verify import ...``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
