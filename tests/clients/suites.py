"""The shared state of a client suite that converts one tiny HF model several ways and runs
megatron-core on the results (one launch per rank count), used by the per-family clients."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_ir
from tests.clients.mcore_harness import HarnessError, job_result
from tests.fixtures import Outcome


@dataclass
class MegatronSuite:
    """``hf``: the tiny model; ``ref``: transformers' logits on ``ids``; ``written``: each
    conversion's outcome by key; ``launches``: each megatron-core launch's by rank count, which
    leaves ``root/logits/<key>.pt``."""

    root: Path
    hf: Path
    ids: list[list[int]]
    ref: torch.Tensor
    written: dict[str, Outcome] = field(default_factory=dict)
    launches: dict[int, Outcome] = field(default_factory=dict)

    def saved(self, name: str) -> Path:
        return self.root / "saved" / name

    def logits(self, key: str, ranks: int) -> torch.Tensor:
        """megatron-core's logits from output ``key``; a failed conversion or launch fails the
        test with its own message."""
        if key in self.written:
            self.written[key].get(f"ckpt_ir.convert(hf -> {key})")
        self.launches[ranks].get(f"the megatron-core launch on {ranks} rank(s)")
        try:
            return job_result(self.root / "logits" / f"{key}.pt")
        except HarnessError as e:
            pytest.fail(str(e), pytrace=False)


def convert_to(src: Path, dst: Path, **kwargs: Any) -> Path:
    """``ckpt_ir.convert(src, dst, ...)``, returning ``dst`` (for ``attempt``)."""
    ckpt_ir.convert(src, dst, **kwargs)
    return dst
