"""Pure, invertible tensor transforms between IR parts and one native (physical) tensor.

A transform takes named IR parts (``roles``) to one native tensor (``apply``) and back
(``inverse``); ``shapes`` is its metadata-only twin, used by the planner before any byte is read.
Every transform is a frozen value object configured with the numbers it needs, so
``inverse`` never has to guess; ``inverse(apply(parts)) == parts`` bit for bit is a
property test in ``tests/properties/test_transforms.py``.

Transforms avoid copies where they can: ``Identity`` returns its input, ``ConcatGateUp.inverse``
returns views, and the planner sizes memory by the unit of work, not the model.

``slabs`` is ``apply`` without building the result: the native tensor's bytes as a sequence of
row-major pieces (views of the parts where possible). A writer that streams (``write_slabs``)
puts them on disk one after another, so a fused QKV or ``[gate; up]`` never exists in memory;
``torch.cat([s.reshape(-1) for s in slabs(parts)])`` equals ``apply(parts).reshape(-1)`` bit
for bit, a property test beside the inverse one.

torch is imported inside the methods that touch tensors, not here: the architecture records
are built from transforms, and planning (``shapes``; ``ckpt-ir inspect``) must not pay for
``import torch`` (tests/cli/test_startup_imports.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckpt_ir.errors import FormatError, InternalError

if TYPE_CHECKING:
    # Typing only: ir.py imports the architecture records, which are built from transforms.
    import torch

    from ckpt_ir.ir import Shape

__all__ = [
    "TENSOR",
    "ConcatGateUp",
    "ConcatQKV",
    "GroupGDNInProj",
    "Identity",
    "InterleaveExperts",
    "InterleaveFusedQKV",
    "InterleaveGatedQKV",
    "InterleaveQKV",
    "MergeLora",
    "PadRows",
    "RankColumns",
    "RopeInterleave",
    "RowBlocks",
    "StackExperts",
    "StackRanks",
    "Transform",
    "ZeroCentre",
    "join_rows",
    "lora_roles",
    "rows_shape",
    "same_bits",
]

TENSOR = "tensor"
"""The role name of a transform with a single part."""


def join_rows(rows: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Row blocks (:meth:`Transform.inverse_rows`) as one tensor; a single block as it is."""
    import torch

    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def rows_shape(rows: tuple[torch.Tensor, ...]) -> Shape:
    """The shape of :func:`join_rows` ``(rows)``, without joining."""
    if len(rows) == 1:
        return tuple(rows[0].shape)
    return (sum(t.shape[0] for t in rows), *rows[0].shape[1:])


class Transform(ABC):
    """IR parts (by role) <-> one native tensor."""

    roles: tuple[str, ...] = (TENSOR,)
    # The transform computes new values (ZeroCentre's w - 1), not only moves them: the executor
    # gives it its parts already cast to a wider destination dtype (``--dtype fp32``), where the
    # arithmetic may be exact when it is not in the source's.
    arithmetic: bool = False

    @abstractmethod
    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """IR parts -> native tensor."""

    @abstractmethod
    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        """Native tensor -> IR parts."""

    @abstractmethod
    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        """Native shape from part shapes, without data."""

    def slabs(self, parts: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        """The bytes of ``apply(parts)``, in order, as row-major pieces (default: the whole)."""
        yield self.apply(parts)

    def inverse_rows(self, native: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        """``inverse(native)`` with each part as row blocks that, joined along dim 0, are the
        part: views of ``native`` where ``inverse`` would have to copy (default: one block)."""
        return {role: (t,) for role, t in self.inverse(native).items()}

    def row_slabs(self, blocks: Mapping[str, tuple[torch.Tensor, ...]]
                  ) -> Iterator[torch.Tensor]:
        """:meth:`slabs` of parts given as row blocks (default: joined first)."""
        yield from self.slabs({role: join_rows(rows) for role, rows in blocks.items()})

    def describe(self) -> str:
        return type(self).__name__

    def tp_blocks(self, parts: Mapping[str, Shape]) -> tuple[int, ...]:
        """Rows of each block of the native tensor's global layout, for the ``BLOCKS`` TP
        partition (a rank holds ``[b0_t; b1_t; ...]``); default: one block per role, in role
        order, as big as that part."""
        return tuple(parts[r][0] for r in self.roles)

    # Memory accounting for the planner's peak estimate: a transform that returns views of its
    # input costs nothing beyond the input. Conservative default: it allocates.
    def copies_on_apply(self) -> bool:
        return True

    def copies_on_inverse(self) -> bool:
        return True

    def copies_in_slabs(self) -> bool:
        """Whether ``slabs`` builds the native tensor (the default) or yields views."""
        return self.copies_on_apply()


@dataclass(frozen=True, slots=True)
class Identity(Transform):
    """The native tensor is the IR tensor."""

    roles = (TENSOR,)

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return parts[TENSOR]

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        return {TENSOR: native}

    def slabs(self, parts: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        yield parts[TENSOR]

    def row_slabs(self, blocks: Mapping[str, tuple[torch.Tensor, ...]]
                  ) -> Iterator[torch.Tensor]:
        # The blocks are the tensor's bytes in order: written as they are, never joined (a q
        # of a fused QKV goes to its file group by group, each a range of the source file).
        yield from blocks[TENSOR]

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
        import torch

        return torch.cat((parts["gate"], parts["up"]), dim=0)

    def slabs(self, parts: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        yield parts["gate"]
        yield parts["up"]

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

    def copies_in_slabs(self) -> bool:
        return False


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
        import torch

        return torch.cat((parts["q"], parts["k"], parts["v"]), dim=0)

    def slabs(self, parts: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        yield from (parts["q"], parts["k"], parts["v"])

    def copies_in_slabs(self) -> bool:
        return False

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
        import torch

        g, n, d = self.num_groups, self.heads_per_group, self.head_dim
        q, k, v = parts["q"], parts["k"], parts["v"]
        rest = tuple(q.shape[1:])
        fused = torch.cat((q.reshape(g, n * d, *rest), k.reshape(g, d, *rest),
                           v.reshape(g, d, *rest)), dim=1)
        return fused.reshape(g * (n + 2) * d, *rest)

    def slabs(self, parts: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        # Group i's rows are q[i*n*d : (i+1)*n*d], k[i*d : (i+1)*d], v[i*d : (i+1)*d]: row
        # slices, contiguous whenever the parts are.
        nd, d = self.heads_per_group * self.head_dim, self.head_dim
        q, k, v = parts["q"], parts["k"], parts["v"]
        for i in range(self.num_groups):
            yield q[i * nd:(i + 1) * nd]
            yield k[i * d:(i + 1) * d]
            yield v[i * d:(i + 1) * d]

    def copies_in_slabs(self) -> bool:
        return False

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

    def inverse_rows(self, native: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        # q, k and v are strided across the groups (inverse copies them: 60% of an attention
        # layer's bytes); group by group each is a contiguous row range of the fused tensor.
        g, n, d = self.num_groups, self.heads_per_group, self.head_dim
        if native.shape[0] != g * (n + 2) * d:
            raise InternalError(f"fused QKV has {native.shape[0]} rows, expected {g * (n + 2) * d}")
        block, nd = (n + 2) * d, n * d
        return {"q": tuple(native[i * block: i * block + nd] for i in range(g)),
                "k": tuple(native[i * block + nd: i * block + nd + d] for i in range(g)),
                "v": tuple(native[i * block + nd + d: (i + 1) * block] for i in range(g))}

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
        import torch

        t = parts[TENSOR]
        if self.padded_rows == self.rows:
            return t
        pad = t.new_zeros((self.padded_rows - self.rows, *t.shape[1:]))
        return torch.cat((t, pad), dim=0)

    def slabs(self, parts: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        t = parts[TENSOR]
        yield t
        if self.padded_rows > self.rows:
            yield t.new_zeros((self.padded_rows - self.rows, *t.shape[1:]))

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

    def copies_in_slabs(self) -> bool:
        return False  # only the padding rows are new



# --------------------------------------------------------------------------------------------
# LoRA adapters (Megatron-Bridge's fused and canonical LoRA <-> HF PEFT per-module A and B)
# --------------------------------------------------------------------------------------------


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN payloads and -0.0 count), unlike ``torch.equal``."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _times(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t * factor`` computed in at least fp32, back in ``t``'s dtype (exact for powers of 2)."""
    import torch

    wide = torch.promote_types(t.dtype, torch.float32)
    return (t.to(wide) * factor).to(t.dtype)


@dataclass(frozen=True, slots=True)
class StackRanks(Transform):
    """LoRA A matrices (``[r, in]``) stacked on the rank axis into one Megatron ``linear_in``.

    ``blocks`` lists, in order, the roles that share a block and the block's rows; ``total`` is
    the Megatron rank (the rest is zero padding)::

        fused, shared A (Megatron origin)    rank-stacked (HF PEFT origin)
        rows 0 .. r-1      A_q = A_k = A_v    rows 0 .. r_q-1              A_q
        rows r .. total-1  zeros              rows r_q .. r_q+r_k-1        A_k
                                              rows r_q+r_k .. +r_v-1       A_v
                                              rows .. total-1              zeros

    ``inverse`` gives every role of a shared block the same rows: Megatron-Bridge's
    ``save_hf_adapter`` copies the fused A to q/k/v (gate/up) the same way.
    """

    blocks: tuple[tuple[tuple[str, ...], int], ...]
    total: int

    def __post_init__(self) -> None:
        roles = [r for rs, _ in self.blocks for r in rs]
        if not roles or len(set(roles)) != len(roles) or any(not rs for rs, _ in self.blocks):
            raise InternalError(f"StackRanks needs distinct roles in non-empty blocks: "
                                f"{self.blocks}")
        if any(rows <= 0 for _, rows in self.blocks) or \
                sum(rows for _, rows in self.blocks) > self.total:
            raise InternalError(f"StackRanks blocks {self.blocks} do not fit {self.total} rows")

    @property
    def roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(r for rs, _ in self.blocks for r in rs)

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        pieces = []
        for roles, rows in self.blocks:
            first = parts[roles[0]]
            if first.shape[0] != rows:
                raise InternalError(f"LoRA A of {roles[0]} has {first.shape[0]} rows, the block "
                                    f"{rows}")
            for other in roles[1:]:
                # The planner chose a shared block because these were bit-identical.
                if not same_bits(parts[other], first):
                    raise InternalError(f"LoRA A of {other} differs from {roles[0]}'s; they "
                                        "cannot share one Megatron A")
            pieces.append(first)
        pad = self.total - sum(rows for _, rows in self.blocks)
        if pad:
            pieces.append(pieces[0].new_zeros((pad, *pieces[0].shape[1:])))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        if native.shape[0] != self.total:
            raise InternalError(f"Megatron LoRA A has {native.shape[0]} rows, expected "
                                f"{self.total}")
        out: dict[str, torch.Tensor] = {}
        start = 0
        for roles, rows in self.blocks:
            piece = native[start:start + rows]
            out.update((r, piece) for r in roles)
            start += rows
        return out

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        first = parts[self.blocks[0][0][0]]
        return (self.total, *first[1:])

    def describe(self) -> str:
        blocks = " | ".join(f"{'='.join(rs)}:{rows}" for rs, rows in self.blocks)
        return f"StackRanks({blocks} -> {self.total})"

    def copies_on_inverse(self) -> bool:
        return False  # row slices


@dataclass(frozen=True, slots=True)
class RankColumns(Transform):
    """LoRA B matrices (``[out, r]``) put in their rank columns of a wider B, then fused.

    ``columns`` gives each role's first column and width in a B of ``total`` columns (the
    Megatron rank); ``inner`` then fuses the widened parts the way the base weight is fused
    (``InterleaveQKV`` for ``linear_qkv``, ``ConcatGateUp`` for ``linear_fc1``, ``Identity``).
    With a rank-stacked A, B_q sits in columns ``[0, r_q)``, B_k in ``[r_q, r_q + r_k)``, ...,
    so ``B @ A`` reproduces every ``B_m @ A_m`` and nothing else::

        B (rows interleaved like the base)    A
        q rows: [ B_q  0    0   0 ]           [ A_q ]
        k rows: [ 0    B_k  0   0 ]     @     [ A_k ]
        v rows: [ 0    0    B_v 0 ]           [ A_v ]
                                              [  0  ]

    With a shared A every role starts at column 0. ``fill`` names inner roles without an adapter
    (k when only q and v are targeted) and their rows: zero in the fused B, dropped by
    ``inverse``. ``factors`` multiply a role's B (its scaling relative to Megatron's single
    ``alpha / rank``); ``inverse`` divides again, exactly when the factor is a power of two.
    """

    inner: Transform
    columns: tuple[tuple[str, int, int], ...]
    total: int
    fill: tuple[tuple[str, int], ...] = ()
    factors: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        roles = [c[0] for c in self.columns] + [f[0] for f in self.fill]
        if not self.columns or sorted(roles) != sorted(self.inner.roles):
            raise InternalError(f"RankColumns roles {roles} do not cover "
                                f"{self.inner.describe()}{self.inner.roles}")
        for role, start, width in self.columns:
            if start < 0 or width <= 0 or start + width > self.total:
                raise InternalError(f"RankColumns: {role} columns [{start}, {start + width}) "
                                    f"outside {self.total}")
        if any(f == 0 for _, f in self.factors):
            raise InternalError("RankColumns: a zero factor cannot be inverted")

    @property
    def roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(c[0] for c in self.columns)

    def _factor(self, role: str) -> float:
        return next((f for r, f in self.factors if r == role), 1.0)

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        wide: dict[str, torch.Tensor] = {}
        for role, start, width in self.columns:
            b = parts[role]
            if b.shape[-1] != width:
                raise InternalError(f"LoRA B of {role} has {b.shape[-1]} columns, expected "
                                    f"{width}")
            factor = self._factor(role)
            if factor != 1.0:
                b = _times(b, factor)
            if start == 0 and width == self.total:
                wide[role] = b
            else:
                w = b.new_zeros((b.shape[0], self.total))
                w[:, start:start + width] = b
                wide[role] = w
        like = next(iter(wide.values()))
        for role, rows in self.fill:
            wide[role] = like.new_zeros((rows, self.total))
        return self.inner.apply(wide)

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = self.inner.inverse(native)
        out: dict[str, torch.Tensor] = {}
        for role, start, width in self.columns:
            b = parts[role][:, start:start + width]
            factor = self._factor(role)
            out[role] = _times(b, 1.0 / factor) if factor != 1.0 else b
        return out

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        wide = {role: (parts[role][0], self.total) for role, _, _ in self.columns}
        wide.update((role, (rows, self.total)) for role, rows in self.fill)
        return self.inner.shapes(wide)

    def describe(self) -> str:
        cols = ", ".join(f"{r}:[{s},{s + w})" for r, s, w in self.columns)
        return f"RankColumns({self.inner.describe()}; {cols} of {self.total})"


def lora_roles(role: str) -> tuple[str, str]:
    """The roles of a merged role's LoRA A and B in :class:`MergeLora`."""
    return f"{role}.lora_A", f"{role}.lora_B"


@dataclass(frozen=True, slots=True)
class MergeLora(Transform):
    """Base weights with their LoRA update merged in, then fused by ``inner``. One-way.

    For each role in ``merges`` (with its scaling), ``W' = W + scaling · (B @ A)`` computed in
    fp32 (fp64 stays fp64) and cast back to W's dtype, as PEFT's ``merge_and_unload`` and
    Megatron-Bridge's ``merge_adapter_weights`` do; other roles pass through. The A and B of a
    role are the parts named by :func:`lora_roles`. There is no inverse: a merged weight does not
    remember its adapter.
    """

    inner: Transform
    merges: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        unknown = {r for r, _ in self.merges} - set(self.inner.roles)
        if unknown or not self.merges:
            raise InternalError(f"MergeLora merges {sorted(unknown)} which "
                                f"{self.inner.describe()} does not have")

    @property
    def roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return (*self.inner.roles, *(x for r, _ in self.merges for x in lora_roles(r)))

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        merged = {r: parts[r] for r in self.inner.roles}
        for role, scaling in self.merges:
            w = parts[role]
            a_role, b_role = lora_roles(role)
            wide = torch.promote_types(w.dtype, torch.float32)
            delta = (parts[b_role].to(wide) @ parts[a_role].to(wide)) * scaling
            merged[role] = (w.to(wide) + delta).to(w.dtype)
        return self.inner.apply(merged)

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        raise InternalError("a merged weight cannot be split back into base and adapter")

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        return self.inner.shapes({r: parts[r] for r in self.inner.roles})

    def describe(self) -> str:
        return f"MergeLora({', '.join(r for r, _ in self.merges)}; {self.inner.describe()})"


@dataclass(frozen=True, slots=True)
class StackExperts(Transform):
    """The experts of one layer in one tensor, expert-major (transformers 5's fused layout).

    Each expert contributes its ``parts`` concatenated on dim 0; the experts are stacked on a
    new dim 0. With ``parts=("gate", "up")`` this is ``mlp.experts.gate_up_proj``::

        [e, 0 .. F-1,  :]   gate_proj of expert e
        [e, F .. 2F-1, :]   up_proj of expert e          shape [E, 2F, H]

    and with ``parts=("tensor",)`` ``mlp.experts.down_proj`` ([E, H, F]). Roles are
    ``<part>[<expert>]``. ``inverse`` returns views.
    """

    num_experts: int
    parts: tuple[str, ...] = (TENSOR,)

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not self.parts or len(set(self.parts)) != len(self.parts):
            raise InternalError(f"StackExperts needs experts and distinct parts: {self}")

    @property
    def roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(f"{p}[{e}]" for e in range(self.num_experts) for p in self.parts)

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        experts = []
        for e in range(self.num_experts):
            pieces = [parts[f"{p}[{e}]"] for p in self.parts]
            experts.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0))
        return torch.stack(experts, dim=0)

    def slabs(self, parts: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        for e in range(self.num_experts):
            for p in self.parts:
                yield parts[f"{p}[{e}]"]

    def copies_in_slabs(self) -> bool:
        return False

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        if native.dim() < 2 or native.shape[0] != self.num_experts:
            raise InternalError(f"stacked experts have shape {tuple(native.shape)}, expected "
                                f"{self.num_experts} experts on dim 0")
        rows = native.shape[1]
        if rows % len(self.parts):
            raise InternalError(f"{rows} rows per expert do not split into {self.parts}")
        out: dict[str, torch.Tensor] = {}
        for e in range(self.num_experts):
            for p, piece in zip(self.parts, native[e].tensor_split(len(self.parts), dim=0),
                                strict=True):
                out[f"{p}[{e}]"] = piece
        return out

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        first = [parts[f"{p}[0]"] for p in self.parts]
        return (self.num_experts, sum(s[0] for s in first), *first[0][1:])

    def describe(self) -> str:
        return f"StackExperts({self.num_experts} experts of [{'; '.join(self.parts)}])"


@dataclass(frozen=True, slots=True)
class InterleaveExperts(Transform):
    """The experts of one layer in one tensor with their parts interleaved row by row and,
    for 2-D parts, stored input-major (gpt-oss's ``mlp.experts.gate_up_proj``).

    Each expert's parts (``[out, in]``, as ``nn.Linear`` holds them) are interleaved on the
    output axis, then transposed when ``input_major``; the experts are stacked on a new dim 0.
    With ``parts=("gate", "up")`` that is gpt-oss's ``gate_up_proj`` ``[E, H, 2F]``, column
    ``2j`` = gate row ``j``, ``2j + 1`` = up row ``j``; its bias ``gate_up_proj_bias``
    ``[E, 2F]`` is the same interleave of 1-D parts (nothing to transpose). With one part,
    ``down_proj`` ``[E, F, H]`` (each expert's ``[H, F]`` transposed). Roles are
    ``<part>[<expert>]``, as for :class:`StackExperts`.

    The orientation is fixed by the transform, never inferred from shapes: gpt-oss's
    ``down_proj`` is square (F = H) in both releases, which is how Megatron-Bridge stored it
    transposed without noticing (#3743).
    """

    num_experts: int
    parts: tuple[str, ...] = (TENSOR,)
    input_major: bool = True

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not self.parts or len(set(self.parts)) != len(self.parts):
            raise InternalError(f"InterleaveExperts needs experts and distinct parts: {self}")

    @property
    def roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(f"{p}[{e}]" for e in range(self.num_experts) for p in self.parts)

    def _expert(self, parts: Mapping[str, torch.Tensor], e: int) -> torch.Tensor:
        import torch

        pieces = [parts[f"{p}[{e}]"] for p in self.parts]
        w = pieces[0] if len(pieces) == 1 else \
            torch.stack(pieces, dim=1).reshape(-1, *pieces[0].shape[1:])
        return w.t() if self.input_major and w.dim() == 2 else w

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.stack([self._expert(parts, e) for e in range(self.num_experts)], dim=0)

    def slabs(self, parts: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        # Expert by expert: one expert's block is built at a time, never the whole stack.
        for e in range(self.num_experts):
            yield self._expert(parts, e).contiguous()

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        if native.dim() not in (2, 3) or native.shape[0] != self.num_experts:
            raise InternalError(f"interleaved experts have shape {tuple(native.shape)}, "
                                f"expected {self.num_experts} experts on dim 0")
        n = len(self.parts)
        out: dict[str, torch.Tensor] = {}
        for e in range(self.num_experts):
            w = native[e].t() if self.input_major and native.dim() == 3 else native[e]
            if w.shape[0] % n:
                raise InternalError(f"{w.shape[0]} rows per expert do not split into "
                                    f"{self.parts}")
            for i, p in enumerate(self.parts):
                # Every n-th row of a (transposed) block: copied, so each part is an ordinary
                # row-major tensor for whatever consumes it (a safetensors writer, a byte
                # view). ``contiguous()`` would keep a one-element part's stride.
                out[f"{p}[{e}]"] = w[i::n].clone(memory_format=torch.contiguous_format)
        return out

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        first = parts[f"{self.parts[0]}[0]"]
        rows = (first[0] * len(self.parts), *first[1:])
        if self.input_major and len(rows) == 2:
            rows = (rows[1], rows[0])
        return (self.num_experts, *rows)

    def describe(self) -> str:
        layout = "input-major" if self.input_major else "output-major"
        return (f"InterleaveExperts({self.num_experts} experts of "
                f"[{'; '.join(self.parts)}] interleaved, {layout})")


# --------------------------------------------------------------------------------------------
# Qwen3-Next: Gated DeltaNet in_proj / conv1d, gated-query QKV, zero-centred output norm
# (Megatron-Bridge's GDNLinearMapping, GDNConv1dMapping, QKVMapping with attention_output_gate
# and RMSNorm2ZeroCenteredRMSNormMapping; /work/shared/reference/architectures-wave2.md §5.3)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowBlocks(Transform):
    """The native tensor is the IR tensor, made of row blocks that TP splits one by one.

    ``blocks`` are the rows of each block in the global layout; a TP rank holds
    ``[b0_t; b1_t; ...]`` (the ``BLOCKS`` partition). Qwen3-Next's ``conv1d.weight`` is
    ``[q_all; k_all; v_all]`` channels in both HF and Megatron, but a rank's local conv1d is
    ``[q_t; k_t; v_t]``, not a contiguous row range.
    """

    blocks: tuple[int, ...]
    roles = (TENSOR,)

    def __post_init__(self) -> None:
        if not self.blocks or any(b <= 0 for b in self.blocks):
            raise InternalError(f"RowBlocks needs positive block sizes: {self.blocks}")

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        t = parts[TENSOR]
        if t.shape[0] != sum(self.blocks):
            raise InternalError(f"tensor has {t.shape[0]} rows, blocks {self.blocks}")
        return t

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        if native.shape[0] != sum(self.blocks):
            raise InternalError(f"tensor has {native.shape[0]} rows, blocks {self.blocks}")
        return {TENSOR: native}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        return tuple(parts[TENSOR])

    def tp_blocks(self, parts: Mapping[str, Shape]) -> tuple[int, ...]:
        return self.blocks

    def describe(self) -> str:
        return f"RowBlocks({' | '.join(map(str, self.blocks))})"

    def copies_on_apply(self) -> bool:
        return False

    def copies_on_inverse(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class GroupGDNInProj(Transform):
    """Qwen3-Next's Gated DeltaNet input projections regrouped from per key head to per
    component (Megatron ``self_attention.in_proj.weight``).

    HF holds, for each key head ``g`` (``r = num_value_heads / num_key_heads`` value heads
    per key head)::

        in_proj_qkvz  [q_g (dk) ; k_g (dk) ; v_g (r*dv) ; z_g (r*dv)]  for g = 0 .. nk-1
        in_proj_ba    [b_g (r)  ; a_g (r)]                             for g = 0 .. nk-1

    Megatron holds ``[q_all; k_all; v_all; z_all; b_all; a_all]`` (each head-major), and a TP
    rank ``[q_t; k_t; v_t; z_t; b_t; a_t]`` for its key heads (:meth:`tp_blocks`): since
    value head ``j`` belongs to key head ``j // r``, a rank's key heads own a contiguous range
    of every component.
    """

    num_key_heads: int
    key_head_dim: int
    value_heads_per_key: int
    value_head_dim: int
    roles = ("qkvz", "ba")

    def __post_init__(self) -> None:
        if min(self.num_key_heads, self.key_head_dim, self.value_heads_per_key,
               self.value_head_dim) < 1:
            raise InternalError(f"GroupGDNInProj needs positive sizes: {self}")

    @property
    def _per_head(self) -> tuple[int, int, int, int]:
        dk, rv = self.key_head_dim, self.value_heads_per_key * self.value_head_dim
        return dk, dk, rv, rv

    def tp_blocks(self, parts: Mapping[str, Shape] | None = None) -> tuple[int, ...]:
        nk, r = self.num_key_heads, self.value_heads_per_key
        return (*(nk * s for s in self._per_head), nk * r, nk * r)

    def _check(self, qkvz_rows: int, ba_rows: int) -> None:
        nk = self.num_key_heads
        if qkvz_rows != nk * sum(self._per_head) or ba_rows != 2 * nk * self.value_heads_per_key:
            raise InternalError(f"in_proj_qkvz / in_proj_ba have {qkvz_rows} / {ba_rows} rows, "
                                f"expected {nk * sum(self._per_head)} / "
                                f"{2 * nk * self.value_heads_per_key}")

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        qkvz, ba = parts["qkvz"], parts["ba"]
        self._check(qkvz.shape[0], ba.shape[0])
        nk, rest = self.num_key_heads, tuple(qkvz.shape[1:])
        per_head = qkvz.reshape(nk, sum(self._per_head), *rest).split(self._per_head, dim=1)
        b, a = ba.reshape(nk, 2 * self.value_heads_per_key, *rest).tensor_split(2, dim=1)
        return torch.cat([c.reshape(-1, *rest) for c in (*per_head, b, a)], dim=0)

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        blocks = self.tp_blocks()
        if native.shape[0] != sum(blocks):
            raise InternalError(f"GDN in_proj has {native.shape[0]} rows, expected "
                                f"{sum(blocks)}")
        nk, rest = self.num_key_heads, tuple(native.shape[1:])
        q, k, v, z, b, a = (c.reshape(nk, -1, *rest) for c in native.split(blocks, dim=0))
        return {"qkvz": torch.cat((q, k, v, z), dim=1).reshape(-1, *rest),
                "ba": torch.cat((b, a), dim=1).reshape(-1, *rest)}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        qkvz, ba = parts["qkvz"], parts["ba"]
        self._check(qkvz[0], ba[0])
        return (qkvz[0] + ba[0], *qkvz[1:])

    def describe(self) -> str:
        return (f"GroupGDNInProj(key_heads={self.num_key_heads}, key_dim={self.key_head_dim}, "
                f"value_heads/key={self.value_heads_per_key}, value_dim={self.value_head_dim})")


@dataclass(frozen=True, slots=True)
class InterleaveGatedQKV(Transform):
    """Megatron's fused QKV with an attention output gate (``attention_output_gate``).

    HF ``q_proj`` holds ``2 * d`` rows per query head, ``[q_h (d); gate_h (d)]``. Megatron's
    ``linear_qkv`` holds, per KV group of ``n`` query heads::

        group i: q of heads i*n .. i*n+n-1 (n*d) | their gates (n*d) | k_i (d) | v_i (d)

    A TP rank holds whole groups (the ``QKV`` partition), as for :class:`InterleaveQKV`.
    """

    num_groups: int
    heads_per_group: int
    head_dim: int
    roles = ("q", "k", "v")

    def _rows(self) -> int:
        return self.num_groups * (2 * self.heads_per_group + 2) * self.head_dim

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        g, n, d = self.num_groups, self.heads_per_group, self.head_dim
        q, k, v = parts["q"], parts["k"], parts["v"]
        rest = tuple(q.shape[1:])
        if q.shape[0] != 2 * g * n * d:
            raise InternalError(f"gated q_proj has {q.shape[0]} rows, expected {2 * g * n * d}")
        heads = q.reshape(g, n, 2, d, *rest)
        fused = torch.cat((heads[:, :, 0].reshape(g, n * d, *rest),
                           heads[:, :, 1].reshape(g, n * d, *rest),
                           k.reshape(g, d, *rest), v.reshape(g, d, *rest)), dim=1)
        return fused.reshape(self._rows(), *rest)

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        g, n, d = self.num_groups, self.heads_per_group, self.head_dim
        rest = tuple(native.shape[1:])
        if native.shape[0] != self._rows():
            raise InternalError(f"gated QKV has {native.shape[0]} rows, expected {self._rows()}")
        grouped = native.reshape(g, (2 * n + 2) * d, *rest)
        q = grouped[:, : n * d].reshape(g, n, 1, d, *rest)
        gate = grouped[:, n * d: 2 * n * d].reshape(g, n, 1, d, *rest)
        return {"q": torch.cat((q, gate), dim=2).reshape(2 * g * n * d, *rest),
                "k": grouped[:, 2 * n * d: (2 * n + 1) * d].reshape(g * d, *rest),
                "v": grouped[:, (2 * n + 1) * d:].reshape(g * d, *rest)}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        q, k, v = parts["q"], parts["k"], parts["v"]
        return (q[0] + k[0] + v[0], *q[1:])

    def describe(self) -> str:
        return (f"InterleaveGatedQKV(groups={self.num_groups}, "
                f"heads/group={self.heads_per_group}, head_dim={self.head_dim})")


@dataclass(frozen=True, slots=True)
class ZeroCentre(Transform):
    """A plain RMSNorm weight ``w`` stored zero-centred, ``w - 1`` (Megatron-Bridge's
    ``RMSNorm2ZeroCenteredRMSNormMapping`` for Qwen3-Next's GDN ``out_norm``: megatron-core
    builds every norm of the model with ``layernorm_zero_centered_gamma`` and scales by
    ``1 + weight``).

    Both directions compute in fp32 (fp64 stays fp64) and round to the tensor's dtype.
    ``w - 1`` is exact for ``0.5 <= w <= 2`` (Sterbenz) and for most larger values, not for
    smaller ones in bf16 / fp16; ``apply`` checks that ``inverse`` gives ``w`` back bit for
    bit and raises :class:`ckpt_ir.errors.FormatError` otherwise (convert with
    ``--dtype fp32``), so a round trip is exact or refused, never silently rounded.
    """

    roles = (TENSOR,)
    arithmetic = True

    @staticmethod
    def _shift(t: torch.Tensor, by: float) -> torch.Tensor:
        import torch

        wide = torch.promote_types(t.dtype, torch.float32)
        return (t.to(wide) + by).to(t.dtype)

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = parts[TENSOR]
        out = self._shift(w, -1.0)
        if not same_bits(self._shift(out, 1.0), w):
            bad = int((self._shift(out, 1.0) != w).sum())
            raise FormatError(f"{bad} norm weight(s) w are not exactly w - 1 + 1 in {w.dtype} "
                              "(Megatron's zero-centred out_norm stores w - 1); convert with "
                              "--dtype fp32 to keep them exact")
        return out

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        return {TENSOR: self._shift(native, 1.0)}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        return tuple(parts[TENSOR])

    def describe(self) -> str:
        return "ZeroCentre(w - 1)"


@dataclass(frozen=True, slots=True)
class InterleaveFusedQKV(Transform):
    """An HF fused ``qkv_proj`` (Phi-3: plain ``[Q_all; K_all; V_all]`` rows) <-> Megatron's
    group-interleaved ``linear_qkv``: split the rows by the head counts, then
    :class:`InterleaveQKV`.

    ::

        HF   rows 0 .. G*n*d-1            q (all query heads, head-major)
             rows G*n*d .. G*(n+1)*d-1     k
             rows G*(n+1)*d .. end         v
        Megatron, per group g:  q heads g*n .. (g+1)*n-1 | k head g | v head g

    One IR tensor in, one native tensor out, so the HF checkpoint's own name stays the IR
    name. Not the identity unless ``G = n = 1``. ``slabs`` and ``inverse_rows`` yield views.
    """

    num_groups: int
    heads_per_group: int
    head_dim: int
    roles = (TENSOR,)

    @property
    def _inner(self) -> InterleaveQKV:
        return InterleaveQKV(self.num_groups, self.heads_per_group, self.head_dim)

    @property
    def _rows(self) -> tuple[int, int, int]:
        kv = self.num_groups * self.head_dim
        return (kv * self.heads_per_group, kv, kv)

    def _split(self, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        if fused.shape[0] != sum(self._rows):
            raise InternalError(f"fused qkv_proj has {fused.shape[0]} rows, expected "
                                f"{sum(self._rows)} ({'+'.join(map(str, self._rows))})")
        q, k, v = fused.split(self._rows, dim=0)
        return {"q": q, "k": k, "v": v}

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._inner.apply(self._split(parts[TENSOR]))

    def slabs(self, parts: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        yield from self._inner.slabs(self._split(parts[TENSOR]))

    def copies_in_slabs(self) -> bool:
        return False

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        parts = self._inner.inverse(native)
        return {TENSOR: torch.cat((parts["q"], parts["k"], parts["v"]), dim=0)}

    def inverse_rows(self, native: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        # [Q_all; K_all; V_all] is the q blocks of every group, then the k blocks, then the v
        # blocks: views of the fused tensor, joined only by whoever needs one tensor.
        rows = self._inner.inverse_rows(native)
        return {TENSOR: (*rows["q"], *rows["k"], *rows["v"])}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        return tuple(parts[TENSOR])

    def describe(self) -> str:
        return (f"InterleaveFusedQKV(groups={self.num_groups}, "
                f"heads/group={self.heads_per_group}, head_dim={self.head_dim})")




@dataclass(frozen=True, slots=True)
class RopeInterleave(Transform):
    """Rows of a q or k projection from HF's half-split RoPE order to Meta's interleaved one.

    HF Llama rotates dimension ``i`` of a head with ``i + head_dim/2`` (``rotate_half``);
    Meta's original code, and torchtitan's llama3, rotate the pairs ``(2i, 2i+1)``. torchtitan's
    ``Llama3StateDictAdapter`` converts with ``_reverse_permute`` (HF -> torchtitan, ``apply``
    here) and ``_permute`` (torchtitan -> HF, ``inverse``)::

        apply:   w.view(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)
        inverse: w.view(heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    A pure row permutation: bits are kept, only rows move.
    """

    heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.heads < 1 or self.head_dim < 2 or self.head_dim % 2:
            raise InternalError(f"RoPE interleaving needs an even head_dim: {self}")

    def _permute(self, t: torch.Tensor, split: tuple[int, int]) -> torch.Tensor:
        rows = self.heads * self.head_dim
        if t.dim() < 1 or t.shape[0] != rows:
            raise InternalError(f"RoPE rows: shape {tuple(t.shape)}, expected {rows} rows")
        rest = tuple(t.shape[1:])
        return t.reshape(self.heads, *split, *rest).transpose(1, 2).reshape(rows, *rest)

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._permute(parts[TENSOR], (2, self.head_dim // 2))

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        return {TENSOR: self._permute(native, (self.head_dim // 2, 2))}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        return tuple(parts[TENSOR])

    def describe(self) -> str:
        return f"RopeInterleave({self.heads} heads of {self.head_dim})"
