"""Saves and loads from inside a running Megatron-Core job, through the IR mapping tables.

:class:`CheckpointManager` (one per rank) writes ``model`` (torch_dist, reshardable),
``hf_model`` (HF safetensors, assembled one tensor at a time at the owner of its file, never on
one rank), ``optimizer`` and ``extra`` (megatron-core sharded state dicts, passed through to
torch_dist), in verl's v2 tree or a plain one, with a commit protocol that makes a save count
only once every rank's data is durable. See ``docs/checkpoint-manager.md``.
"""

from __future__ import annotations

from ckpt_ir.manager.core import CheckpointManager, Loaded
from ckpt_ir.manager.disk import (
    CONTENTS,
    MANIFEST,
    TRACKER,
    DiskLayout,
    committed_steps,
    latest_step,
)
from ckpt_ir.manager.live import RankCoords, megatron_coords

__all__ = [
    "CONTENTS",
    "MANIFEST",
    "TRACKER",
    "CheckpointManager",
    "DiskLayout",
    "Loaded",
    "RankCoords",
    "committed_steps",
    "latest_step",
    "megatron_coords",
]
