"""Pure, invertible tensor transforms between IR parts and one native (physical) tensor.

A transform takes named IR parts (``roles``) to one native tensor (``apply``) and back
(``inverse``); ``shapes`` is its metadata-only twin, used by the planner before any byte is read.
Every transform is a frozen value object configured with the numbers it needs, so
``inverse`` never has to guess; ``inverse(apply(parts)) == parts`` bit for bit is a
property test in ``tests/properties/test_transforms.py``.

Transforms avoid copies where they can: ``Identity`` returns its input, ``ConcatGateUp.inverse``
returns views, and the planner sizes memory by the unit of work, not the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ckpt_ir.errors import InternalError
from ckpt_ir.ir import Shape

__all__ = ["TENSOR", "ConcatGateUp", "ConcatQKV", "Identity", "InterleaveQKV", "PadRows",
           "Transform"]

TENSOR = "tensor"
"""The role name of a transform with a single part."""


class Transform(ABC):
    """IR parts (by role) <-> one native tensor."""

    roles: tuple[str, ...] = (TENSOR,)

    @abstractmethod
    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """IR parts -> native tensor."""

    @abstractmethod
    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        """Native tensor -> IR parts."""

    @abstractmethod
    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        """Native shape from part shapes, without data."""

    def describe(self) -> str:
        return type(self).__name__

    # Memory accounting for the planner's peak estimate: a transform that returns views of its
    # input costs nothing beyond the input. Conservative default: it allocates.
    def copies_on_apply(self) -> bool:
        return True

    def copies_on_inverse(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Identity(Transform):
    """The native tensor is the IR tensor."""

    roles = (TENSOR,)

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return parts[TENSOR]

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        return {TENSOR: native}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        return tuple(parts[TENSOR])

    def copies_on_apply(self) -> bool:
        return False

    def copies_on_inverse(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class ConcatGateUp(Transform):
    """SwiGLU gate and up fused as ``[gate; up]`` on dim 0 (Megatron ``linear_fc1``).

    ::

        rows 0 .. F-1   gate_proj
        rows F .. 2F-1  up_proj

    This is the global (TP-invariant) layout of torch_dist; a TP rank's local fc1 is
    ``[gate_t; up_t]``, which the partition rule ``SWIGLU`` handles, not this transform.
    """

    roles = ("gate", "up")

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat((parts["gate"], parts["up"]), dim=0)

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        if native.shape[0] % 2:
            raise InternalError(f"fused gate/up has an odd number of rows: {tuple(native.shape)}")
        gate, up = native.tensor_split(2, dim=0)
        return {"gate": gate, "up": up}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        gate, up = parts["gate"], parts["up"]
        return (gate[0] + up[0], *gate[1:])

    def copies_on_inverse(self) -> bool:
        return False  # tensor_split returns views


@dataclass(frozen=True, slots=True)
class ConcatQKV(Transform):
    """q, k and v fused as plain ``[q; k; v]`` on dim 0 (verl's era-A ``qkv_proj``, not grouped).

    ::

        rows 0 .. q_rows-1                    q_proj (all query heads)
        rows q_rows .. q_rows+kv_rows-1       k_proj
        rows q_rows+kv_rows .. end            v_proj

    A TP rank holds ``[q_t; k_t; v_t]``: the ``BLOCKS`` partition, not this transform.
    """

    q_rows: int
    kv_rows: int
    roles = ("q", "k", "v")

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat((parts["q"], parts["k"], parts["v"]), dim=0)

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        if native.shape[0] != self.q_rows + 2 * self.kv_rows:
            raise InternalError(f"fused [q; k; v] has {native.shape[0]} rows, expected "
                                f"{self.q_rows + 2 * self.kv_rows}")
        q, k, v = native.split((self.q_rows, self.kv_rows, self.kv_rows), dim=0)
        return {"q": q, "k": k, "v": v}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        q, k, v = parts["q"], parts["k"], parts["v"]
        return (q[0] + k[0] + v[0], *q[1:])

    def describe(self) -> str:
        return f"ConcatQKV(q_rows={self.q_rows}, kv_rows={self.kv_rows})"


@dataclass(frozen=True, slots=True)
class InterleaveQKV(Transform):
    """Megatron's group-interleaved fused QKV (weight ``[rows, hidden]`` or bias ``[rows]``).

    With ``G`` KV groups, ``n`` query heads per group and head size ``d``, the fused tensor
    holds ``G * (n + 2) * d`` rows, one block per group::

        group 0: q heads 0..n-1 (n*d rows) | k head 0 (d rows) | v head 0 (d rows)
        group 1: q heads n..2n-1           | k head 1          | v head 1
        ...

    A TP rank holds a contiguous block of whole groups, so the same layout serves every TP size.
    MHA is ``n = 1``; MQA is ``G = 1``.
    """

    num_groups: int
    heads_per_group: int
    head_dim: int
    roles = ("q", "k", "v")

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        g, n, d = self.num_groups, self.heads_per_group, self.head_dim
        q, k, v = parts["q"], parts["k"], parts["v"]
        rest = tuple(q.shape[1:])
        fused = torch.cat((q.reshape(g, n * d, *rest), k.reshape(g, d, *rest),
                           v.reshape(g, d, *rest)), dim=1)
        return fused.reshape(g * (n + 2) * d, *rest)

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        g, n, d = self.num_groups, self.heads_per_group, self.head_dim
        rest = tuple(native.shape[1:])
        if native.shape[0] != g * (n + 2) * d:
            raise InternalError(f"fused QKV has {native.shape[0]} rows, expected {g * (n + 2) * d}")
        grouped = native.reshape(g, (n + 2) * d, *rest)
        q = grouped[:, : n * d].reshape(g * n * d, *rest)
        k = grouped[:, n * d : (n + 1) * d].reshape(g * d, *rest)
        v = grouped[:, (n + 1) * d :].reshape(g * d, *rest)
        return {"q": q, "k": k, "v": v}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        q, k, v = parts["q"], parts["k"], parts["v"]
        return (q[0] + k[0] + v[0], *q[1:])

    def describe(self) -> str:
        return (f"InterleaveQKV(groups={self.num_groups}, heads/group={self.heads_per_group}, "
                f"head_dim={self.head_dim})")


@dataclass(frozen=True, slots=True)
class PadRows(Transform):
    """Zero rows appended to reach a padded vocabulary (``rows`` -> ``padded_rows``).

    ``inverse`` trims back to ``rows``: the IR always carries the HF ``vocab_size``.
    """

    rows: int
    padded_rows: int
    roles = (TENSOR,)

    def __post_init__(self) -> None:
        if self.padded_rows < self.rows:
            raise InternalError(f"padded rows {self.padded_rows} < rows {self.rows}")

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        t = parts[TENSOR]
        if self.padded_rows == self.rows:
            return t
        pad = t.new_zeros((self.padded_rows - self.rows, *t.shape[1:]))
        return torch.cat((t, pad), dim=0)

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        return {TENSOR: native[: self.rows]}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        t = parts[TENSOR]
        return (self.padded_rows, *t[1:])

    def describe(self) -> str:
        return f"PadRows({self.rows} -> {self.padded_rows})"

    def copies_on_apply(self) -> bool:
        return self.padded_rows != self.rows

    def copies_on_inverse(self) -> bool:
        return False  # a slice of the padded rows

