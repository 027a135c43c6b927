"""A save in flight (:class:`SaveJob`) and the small helpers every phase of
:class:`~ckpt_ir.manager.core.CheckpointManager` shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_ir.converters.base import SourceFiles
from ckpt_ir.converters.storage.hf_files import carried_files
from ckpt_ir.errors import DestinationError
from ckpt_ir.ir import TensorSpec
from ckpt_ir.manager import sharded
from ckpt_ir.manager.plan import HfItem, ModelPlan


def typed_error(e: Exception, what: str, path: Path) -> Exception:
    """OS errors (disk full, permissions) as the public :class:`DestinationError`."""
    if isinstance(e, OSError):
        err = DestinationError(f"{what}: {e.strerror or e}", path=path)
        err.__cause__ = e
        return err
    return e


def as_chunks(model: Any) -> list[Any] | None:
    """Model chunks (a module or a list of them), or None for a sharded state dict."""
    if model is None or isinstance(model, Mapping):
        return None
    if isinstance(model, (list, tuple)):
        return list(model)
    return [model]


class CarriedFiles:
    """What HF/torch_dist writers ask a reader for: the files a model directory carries."""

    def __init__(self, tokenizer: Path | None) -> None:
        self._files = carried_files([tokenizer]) if tokenizer is not None else {}

    def source_files(self) -> SourceFiles:
        return SourceFiles(self._files)


@dataclass
class SaveJob:
    """One save in flight on one rank: what it writes where, and what the phases hand on."""

    step: int
    contents: tuple[str, ...]
    unit: Path                          # staged unit directory
    dirs: dict[str, Path]               # content -> directory inside the unit
    model_plan: ModelPlan | None = None
    hf_items: list[HfItem] = field(default_factory=list)
    hf_specs: list[TensorSpec] = field(default_factory=list)
    dist_specs: list[TensorSpec] = field(default_factory=list)
    dist_names: dict[str, str] = field(default_factory=dict)  # live native -> torch_dist native
    snapshots: dict[str, sharded.ShardedSnapshot] = field(default_factory=dict)
    writers: dict[str, Any] = field(default_factory=dict)
    copy_data: bool = False             # async: this rank's tensors are private CPU copies
    started: float = 0.0
    # Top-level keys of the optimizer / extra states (verl's manifest names lr_scheduler and
    # rng_state entries), and verl's transformer_config.json content (rank 0, verl layout).
    state_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    transformer_config: dict[str, Any] | None = None


