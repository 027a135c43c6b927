"""Parallel layouts: how native tensors split across TP ranks and layers across pipeline stages.

Pure arithmetic, no communication:

* ``shard`` cuts a global native tensor into the pieces TP ranks hold, ``unshard`` joins them
  back (``shard_shape`` / ``unshard_shape`` are their metadata twins). Mapping rows declare their
  rule as data (a column of the table), never inferred from module class names at run time.
* :class:`ParallelLayout` (tp, pp, vpp, ep, etp, uneven first/last stages) places global layers
  on (pipeline rank, virtual chunk, local index) exactly as megatron-core 0.16 does, and
  validates a layout against a model before anything is written.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckpt_ir.errors import IncompatibleLayoutError

if TYPE_CHECKING:
    import torch

    from ckpt_ir.ir import ModelConfig

__all__ = ["ParallelLayout", "Partition", "Placement", "shard", "shard_shape", "unshard",
           "unshard_shape"]


class Partition(enum.Enum):
    """How a native tensor is split across tensor-parallel ranks."""

    REPLICATED = "replicated"  # every rank holds the whole tensor (norms, routers)
    COLUMN = "column"          # split on dim 0 (output rows)
    ROW = "row"                # split on the last dim (input columns); 1-D tensors replicated
    VOCAB = "vocab"            # split on dim 0 of the (padded) vocabulary
    QKV = "qkv"                # split on dim 0 in whole KV groups (interleaved layout)
    SWIGLU = "swiglu"          # global [gate; up]; rank t holds [gate_t; up_t]
    # Global [a; b; ...], one block per IR part (sizes given as ``blocks``); rank t holds
    # [a_t; b_t; ...]. verl's era-A ``qkv_proj`` is [q; k; v] with unequal blocks.
    BLOCKS = "blocks"


def _check_divisible(size: int, tp: int, what: str) -> None:
    if size % tp:
        raise IncompatibleLayoutError(f"TP={tp} does not divide {what} ({size})")


def _block_sizes(rows: int, partition: Partition, blocks: Sequence[int] | None
                 ) -> tuple[int, ...]:
    if partition is Partition.SWIGLU:
        return (rows // 2, rows - rows // 2)
    if blocks is None or sum(blocks) != rows:
        raise IncompatibleLayoutError(
            f"block partition needs block sizes adding up to {rows} rows, got {blocks}")
    return tuple(blocks)


def shard(tensor: torch.Tensor, partition: Partition, tp: int, *,
          blocks: Sequence[int] | None = None) -> list[torch.Tensor]:
    """The ``tp`` pieces of ``tensor`` under ``partition`` (views where possible).

    ``blocks`` gives the row count of each block of a ``BLOCKS`` tensor (in the global layout).
    """
    import torch

    if tp == 1 or partition is Partition.REPLICATED:
        return [tensor] * tp
    if partition is Partition.ROW:
        if tensor.dim() == 1:
            return [tensor] * tp
        _check_divisible(tensor.shape[-1], tp, "the input dimension")
        return list(tensor.tensor_split(tp, dim=-1))
    if partition in (Partition.SWIGLU, Partition.BLOCKS):
        sizes = _block_sizes(tensor.shape[0], partition, blocks)
        for size in sizes:
            _check_divisible(size, tp, f"the rows of each {partition.value} block")
        parts = [p.tensor_split(tp, dim=0) for p in tensor.split(sizes, dim=0)]
        return [torch.cat([p[t] for p in parts], dim=0) for t in range(tp)]
    _check_divisible(tensor.shape[0], tp, f"the {partition.value}-parallel rows")
    return list(tensor.tensor_split(tp, dim=0))


def unshard(pieces: Sequence[torch.Tensor], partition: Partition, *,
            blocks: Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`shard` (``blocks`` as given to it)."""
    import torch

    tp = len(pieces)
    if tp == 1 or partition is Partition.REPLICATED:
        return pieces[0]
    if partition is Partition.ROW:
        if pieces[0].dim() == 1:
            return pieces[0]
        return torch.cat(tuple(pieces), dim=-1)
    if partition in (Partition.SWIGLU, Partition.BLOCKS):
        sizes = _block_sizes(pieces[0].shape[0] * tp, partition, blocks)
        local = [s // tp for s in sizes]
        split = [p.split(local, dim=0) for p in pieces]
        return torch.cat([s[b] for b in range(len(sizes)) for s in split], dim=0)
    return torch.cat(tuple(pieces), dim=0)


Shape = tuple[int, ...]


def shard_shape(shape: Sequence[int], partition: Partition, tp: int) -> Shape:
    """The shape of each piece :func:`shard` makes of a ``shape`` tensor (metadata only)."""
    shape = tuple(shape)
    if tp == 1 or partition is Partition.REPLICATED or not shape:
        return shape
    if partition is Partition.ROW:
        if len(shape) == 1:
            return shape
        _check_divisible(shape[-1], tp, "the input dimension")
        return (*shape[:-1], shape[-1] // tp)
    _check_divisible(shape[0], tp, f"the {partition.value}-parallel rows")
    return (shape[0] // tp, *shape[1:])


def unshard_shape(shape: Sequence[int], partition: Partition, tp: int) -> Shape:
    """The global shape :func:`unshard` makes of ``tp`` pieces of shape ``shape``."""
    shape = tuple(shape)
    if tp == 1 or partition is Partition.REPLICATED or not shape:
        return shape
    if partition is Partition.ROW:
        return shape if len(shape) == 1 else (*shape[:-1], shape[-1] * tp)
    return (shape[0] * tp, *shape[1:])


# --------------------------------------------------------------------------------------------
# Pipeline placement
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    """Where every layer of an ``num_layers`` model lives under one layout.

    ``chunks[p][v]`` is the ``range`` of global layers held by pipeline rank ``p``, virtual
    chunk ``v``; local index ``i`` in that chunk is global layer ``chunks[p][v][i]``.
    """

    num_layers: int
    chunks: tuple[tuple[range, ...], ...]

    def locate(self, layer: int) -> tuple[int, int, int]:
        """Global layer -> (pipeline rank, virtual chunk, local index)."""
        for p, row in enumerate(self.chunks):
            for v, layers in enumerate(row):
                if layer in layers:
                    return p, v, layer - layers.start
        raise IncompatibleLayoutError(f"layer {layer} is outside the {self.num_layers} layers")

    def global_layer(self, p: int, v: int, local: int) -> int:
        """(pipeline rank, virtual chunk, local index) -> global layer."""
        layers = self.chunks[p][v]
        if not 0 <= local < len(layers):
            raise IncompatibleLayoutError(
                f"pipeline rank {p} chunk {v} holds {len(layers)} layers; there is no local "
                f"layer {local}")
        return layers.start + local


@dataclass(frozen=True, slots=True)
class ParallelLayout:
    """A Megatron parallel layout: what a per-rank checkpoint is cut by.

    ``vpp`` is the number of virtual pipeline chunks per pipeline rank (1: not interleaved).
    ``etp`` is the expert tensor-parallel size (None: same as ``tp``, megatron-core's default).
    ``first_stage_layers`` / ``last_stage_layers`` make the first / last pipeline stage uneven
    (Megatron-LM ``--decoder-first-pipeline-num-layers`` / ``--decoder-last-...``); the other
    stages share the remaining layers equally.

    Layers are placed as megatron-core 0.16 does (``get_transformer_layer_offset``): the model is
    cut into ``pp * vpp`` chunks taken virtual-chunk-major, so with 8 layers, PP=2, VPP=2::

        pipeline rank 0: chunk 0 = layers 0, 1   chunk 1 = layers 4, 5
        pipeline rank 1: chunk 0 = layers 2, 3   chunk 1 = layers 6, 7
    """

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int | None = None
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "vpp", "ep"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise IncompatibleLayoutError(f"{name} must be a positive integer, not {value!r}")
        if self.etp is not None and (type(self.etp) is not int or self.etp < 1):
            raise IncompatibleLayoutError(f"etp must be a positive integer, not {self.etp!r}")
        for name in ("first_stage_layers", "last_stage_layers"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise IncompatibleLayoutError(
                    f"{name} must be a positive integer, not {value!r}")
        if self.vpp > 1 and self.pp == 1:
            raise IncompatibleLayoutError(
                f"VPP={self.vpp} needs PP > 1 (megatron-core interleaves chunks across "
                "pipeline stages only)")
        if self.pp == 1 and (self.first_stage_layers or self.last_stage_layers):
            raise IncompatibleLayoutError("uneven first/last pipeline stages need PP > 1")

    def describe(self) -> str:
        """``tp=2 pp=2 vpp=2 (first stage 4 layers)``: for reports and messages."""
        text = f"tp={self.tp} pp={self.pp}"
        if self.vpp > 1:
            text += f" vpp={self.vpp}"
        if self.ep > 1:
            text += f" ep={self.ep}"
        if self.etp is not None and self.etp != self.tp:
            text += f" etp={self.etp}"
        uneven = [f"{which} stage {n} layers" for which, n in
                  (("first", self.first_stage_layers), ("last", self.last_stage_layers)) if n]
        return text + (f" ({', '.join(uneven)})" if uneven else "")

    @property
    def expert_tp(self) -> int:
        """The size routed experts are cut by: ``etp``, else ``tp`` (megatron-core's default)."""
        return self.etp if self.etp is not None else self.tp

    def for_model(self, config: ModelConfig) -> ParallelLayout:
        """This layout with the expert TP ``config`` needs when none was asked for: 1 for
        biased experts (gpt-oss), which megatron-core 0.16.1 builds only with expert TP 1,
        so ``--tp 2`` alone gives a layout megatron-core can load."""
        if self.etp is None and self.tp > 1 and config.has_expert_biases:
            return dataclasses.replace(self, etp=1)
        return self

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layers per pipeline stage; raises :class:`IncompatibleLayoutError` if they do not
        partition ``num_layers`` as megatron-core requires."""
        pp, first, last = self.pp, self.first_stage_layers, self.last_stage_layers
        if first is None and last is None:
            if num_layers % (pp * self.vpp):
                raise IncompatibleLayoutError(
                    f"PP×VPP = {pp}×{self.vpp} does not divide the {num_layers} layers "
                    "(use --first-stage-layers / --last-stage-layers for uneven stages)")
            return (num_layers // pp,) * pp
        middle = num_layers - (first or 0) - (last or 0)
        middle_stages = pp - (first is not None) - (last is not None)
        if middle < 0 or (middle_stages == 0 and middle != 0):
            raise IncompatibleLayoutError(
                f"first/last pipeline stages of {first or 0}+{last or 0} layers do not add up "
                f"to the {num_layers} layers over PP={pp}")
        if middle_stages and (middle == 0 or middle % middle_stages):
            raise IncompatibleLayoutError(
                f"the {middle} layers left after the uneven first/last stages do not split "
                f"evenly over the {middle_stages} other pipeline stage(s)")
        per = middle // middle_stages if middle_stages else 0
        stages = [per] * pp
        if first is not None:
            stages[0] = first
        if last is not None:
            stages[-1] = last
        for p, n in enumerate(stages):
            if n % self.vpp:
                raise IncompatibleLayoutError(
                    f"pipeline stage {p} holds {n} layers, which VPP={self.vpp} does not divide")
        return tuple(stages)

    def placement(self, num_layers: int) -> Placement:
        """Every layer's (pipeline rank, virtual chunk, local index), megatron-core's way."""
        if num_layers < 1:
            raise IncompatibleLayoutError("a model needs at least one layer")
        sizes = [n // self.vpp for n in self.stage_layers(num_layers)]
        if 0 in sizes:
            p = sizes.index(0)
            raise IncompatibleLayoutError(
                f"pipeline stage {p} would hold no layer in some virtual chunk: "
                f"{num_layers} layers over PP={self.pp}, VPP={self.vpp}")
        chunks: list[list[range]] = [[] for _ in range(self.pp)]
        start = 0
        # Virtual-chunk-major: chunk (p, v) is global chunk v * pp + p.
        for _ in range(self.vpp):
            for p in range(self.pp):
                chunks[p].append(range(start, start + sizes[p]))
                start += sizes[p]
        return Placement(num_layers, tuple(tuple(row) for row in chunks))

    def canonical(self, num_layers: int) -> ParallelLayout:
        """The same placement with the fewest uneven-stage fields set.

        megatron-core 0.16 divides by the number of middle stages when both fields are set with
        VPP, so PP=2 with both is rewritten as ``first_stage_layers`` alone.
        """
        stages = self.stage_layers(num_layers)
        candidates = [(None, None), (stages[0], None), (None, stages[-1]),
                      (stages[0], stages[-1])]
        for first, last in candidates:
            layout = ParallelLayout(self.tp, self.pp, self.vpp, self.ep, self.etp, first, last)
            try:
                if layout.stage_layers(num_layers) == stages:
                    return layout
            except IncompatibleLayoutError:
                continue
        return self

    @classmethod
    def from_chunk_sizes(cls, sizes: Sequence[Sequence[int]], *, tp: int = 1, ep: int = 1,
                         etp: int | None = None) -> ParallelLayout:
        """The layout whose chunks hold ``sizes[p][v]`` layers (what per-rank files show).

        Raises :class:`IncompatibleLayoutError` when no megatron-core layout places layers so.
        """
        pp, vpp = len(sizes), len(sizes[0]) if sizes else 0
        if pp == 0 or vpp == 0 or any(len(row) != vpp for row in sizes):
            raise IncompatibleLayoutError("every pipeline rank must hold the same number of "
                                          "virtual chunks")
        stages = [sum(row) for row in sizes]
        num_layers = sum(stages)
        observed = [list(row) for row in sizes]
        try:
            if pp == 1:
                layout = cls(tp, pp, vpp, ep, etp)
            else:
                layout = cls(tp, pp, vpp, ep, etp, stages[0], stages[-1]).canonical(num_layers)
            found = layout.placement(num_layers)
        except IncompatibleLayoutError as e:
            raise IncompatibleLayoutError(
                f"layers per pipeline chunk {observed} do not follow megatron-core's placement "
                f"({e})") from e
        if [[len(r) for r in row] for row in found.chunks] != observed:
            raise IncompatibleLayoutError(
                f"layers per pipeline chunk {observed} do not follow megatron-core's placement "
                "(equal chunks within a stage, equal middle stages)")
        return layout

    def check_model(self, config: ModelConfig, padded_vocab_size: int | None = None) -> None:
        """Raise :class:`IncompatibleLayoutError` unless this layout can hold ``config``."""
        tp, groups = self.tp, config.num_key_value_heads
        problems = []
        if config.num_attention_heads % tp:
            problems.append(f"TP={tp} does not divide the {config.num_attention_heads} "
                            "attention heads")
        if groups % tp and tp % groups:
            problems.append(f"TP={tp} does not divide the {groups} KV groups (megatron-core "
                            "also accepts a TP that is a multiple of the groups)")
        elif (groups * (config.heads_per_group + 2) * config.head_dim) % tp:
            problems.append(f"TP={tp} does not divide the fused QKV rows")
        if config.intermediate_size % tp:
            problems.append(f"TP={tp} does not divide the FFN size {config.intermediate_size}")
        if config.vision_split_heads % tp:
            # Qwen3-VL's Megatron vision block splits its QKV by heads, like the LM's.
            problems.append(f"TP={tp} does not divide the vision tower's "
                            f"{config.vision_split_heads} attention heads")
        vocab = padded_vocab_size or config.vocab_size
        if vocab % tp:
            problems.append(f"TP={tp} does not divide the vocabulary ({vocab} rows); pad it "
                            f"with --pad-vocab-to-multiple (e.g. {128 * tp})")
        if config.linear_attention_layers and tp > 1:
            # qwen3_next: a rank holds whole KV groups of the gated QKV (megatron-core's
            # KV-head replication for TP > groups is not mapped for it) and whole GDN key heads
            # with their value heads.
            key_heads = config.hf.get("linear_num_key_heads", 16)  # transformers' default
            if groups % tp:
                problems.append(f"TP={tp} does not divide the {groups} KV groups of the gated "
                                "attention")
            if not isinstance(key_heads, int) or key_heads % tp:
                problems.append(f"TP={tp} does not divide the {key_heads} linear-attention "
                                "key heads")
        experts = config.num_experts
        if self.ep > 1 and not experts:
            problems.append(f"EP={self.ep} needs a mixture-of-experts model; "
                            f"{config.architecture} is dense")
        elif experts % self.ep:
            problems.append(f"EP={self.ep} does not divide the {experts} experts")
        if experts:
            # Experts (and a shared expert) are cut like a dense MLP, by the expert TP size.
            etp = self.expert_tp
            for what, rows in (("expert FFN size", config.moe_intermediate_size),
                               ("shared-expert FFN size", config.shared_expert_intermediate_size)):
                if rows % etp:
                    problems.append(f"expert TP={etp} does not divide the {what} {rows}")
            if etp > 1 and config.has_expert_biases:
                # A file megatron-core cannot build a model for is refused, not written.
                problems.append(f"expert TP={etp}: {config.architecture}'s experts have biases, "
                                "which megatron-core supports only with expert TP 1 (set "
                                "etp=1, --etp 1)")
        if problems:
            raise IncompatibleLayoutError("; ".join(problems))
        self.placement(config.num_layers)
