"""Plan a conversion from metadata alone, then validate it before any byte is written.

The plan is a list of *units*: the smallest sets of source tensors and destination tensors that
must be in memory together (one layer's fused QKV and its q/k/v, say). Units are the connected
components of the graph source native -> IR tensor -> destination native, so a fused tensor is
read once however many destination tensors it feeds. Peak memory is the largest unit, never the
model. Every problem found is collected and raised together as one :class:`PlanError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpt_ir.architectures import lookup
from ckpt_ir.architectures.vision import part_problem
from ckpt_ir.dtypes import DType
from ckpt_ir.errors import PlanError
from ckpt_ir.ir import ModelConfig, Shape, TensorSpec, dtype_name
from ckpt_ir.tables import Binding, NativeParams, Table, build_table

__all__ = ["DROPPABLE", "IR_VIEW_FORMAT", "DestView", "Plan", "SourceView", "Unit", "ir_view",
           "make_plan"]

# Source tensors that no table maps but that are safe to leave out, with the reason reported.
DROPPABLE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|\.)_extra_state(/|$)"), "extra state (TE FP8 metadata), not a weight"),
    (re.compile(r"^optimizer\."), "optimizer state"),
    (re.compile(r"rotary_emb\.inv_freq$"), "rotary inverse frequencies (derived from the config)"),
    # DeepSeek-V3's HF MTP layer repeats the embedding and the output head; megatron-core's MTP
    # shares the model's, so they are not IR tensors (unmapped elsewhere, they stay errors).
    (re.compile(r"^model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$"),
     "an MTP layer's copy of the shared embedding / output head"),
)
_TIED_COPIES = ("lm_head.weight", "output_layer.weight", "language_model.output_layer.weight")


@dataclass(frozen=True, slots=True)
class Unit:
    """Source tensors read together and the destination tensors made from them."""

    sources: tuple[Binding, ...]
    targets: tuple[Binding, ...]
    bytes_read: int
    bytes_written: int
    peak_bytes: int


@dataclass(frozen=True)
class Plan:
    source_format: str
    dest_format: str
    config: ModelConfig
    units: tuple[Unit, ...]
    dest_specs: tuple[TensorSpec, ...]
    ir_specs: Mapping[str, TensorSpec]
    dropped: Mapping[str, str]
    notes: tuple[str, ...] = field(default=())
    # The destination's physical choices the plan was built with; the writer is constructed
    # with them rather than recomputing them (its params_for runs once).
    dest_params: NativeParams | None = None

    @property
    def bytes_read(self) -> int:
        return sum(u.bytes_read for u in self.units)

    @property
    def bytes_written(self) -> int:
        return sum(u.bytes_written for u in self.units)

    @property
    def peak_bytes(self) -> int:
        return max((u.peak_bytes for u in self.units), default=0)

    def summary(self) -> dict[str, Any]:
        """JSON-able figures for ``--dry-run`` and reports."""
        largest = max(self.units, key=lambda u: u.peak_bytes, default=None)
        return {
            "source_format": self.source_format,
            "dest_format": self.dest_format,
            "architecture": self.config.architecture,
            "num_layers": self.config.num_layers,
            "ir_tensors": len(self.ir_specs),
            "dest_tensors": len(self.dest_specs),
            "units": len(self.units),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "peak_bytes_estimate": self.peak_bytes,
            "largest_unit": [b.native for b in largest.targets] if largest else [],
            "dropped": dict(sorted(self.dropped.items())),
            "dest_dtypes": sorted({dtype_name(s.dtype) for s in self.dest_specs}),
            "notes": list(self.notes),
        }


class _Components:
    """Union-find over source bindings (by native name)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _shape_of(binding: Binding, schema: Mapping[str, Shape]) -> Shape:
    return tuple(binding.transform.shapes({r: schema[n] for r, n in binding.ir.items()}))


def _built_bytes(binding: Binding, spec: TensorSpec, ir_specs: Mapping[str, TensorSpec],
                 streams: bool) -> int:
    """Bytes of destination tensor ``spec`` that exist only because it is built: fused, padded
    or cast rather than passed through as views. Streamed as slabs, at most one cast slab."""
    parts = [ir_specs[n] for n in binding.ir.values()]
    cast = any(p.dtype != spec.dtype for p in parts)
    if streams and not binding.transform.copies_in_slabs():
        return max((p.numel * spec.dtype.itemsize for p in parts), default=0) if cast else 0
    return spec.nbytes if cast or binding.transform.copies_on_apply() else 0


@dataclass(frozen=True)
class SourceView:
    """What the planner needs of a source: its format (for messages), naming family and
    physical choices, its native tensors and what it already dropped. ``table`` replaces the
    naming's table when a source combines several (a base model read with an adapter)."""

    format: str
    naming: str
    params: NativeParams
    tensors: Mapping[str, TensorSpec]
    dropped: Mapping[str, str] = field(default_factory=dict)
    table: Table | None = None

    @classmethod
    def of(cls, reader: Any) -> SourceView:
        """The view of an open reader (:class:`~ckpt_ir.converters.base.Reader`)."""
        return cls(reader.format, reader.naming, reader.params, reader.tensors(),
                   reader.dropped())


@dataclass(frozen=True)
class DestView:
    """What the planner needs of a destination: its format (for messages), naming family and
    physical choices (the writer's ``params_for``); ``table`` as for :class:`SourceView`."""

    format: str
    naming: str
    params: NativeParams
    table: Table | None = None


IR_VIEW_FORMAT = "ir"
"""The format name of a destination that is the IR itself (``open`` plans against it)."""


def ir_view(source: SourceView) -> DestView:
    """The IR as a destination: HF names with the source's physical choices. Planning a source
    against it validates the source (names, shapes) without choosing a writer."""
    return DestView(IR_VIEW_FORMAT, "hf", source.params)


def _check_parts(config: ModelConfig, src: Table, tensors: Mapping[str, TensorSpec],
                 schema: Mapping[str, Shape]) -> None:
    """A multi-part model (a VL model) whose checkpoint lacks a part, or whose config's sizes
    are not the part's: one line naming the part (PlanError), before the per-tensor list."""
    record = lookup(config.architecture)
    if record is None or record.parts is None:
        return
    natives = {ir: (b.native, _shape_of(b, schema)) for ir, (b, _) in src.by_ir.items()
               if ir in schema and len(b.ir) == 1}
    problem = part_problem(config, record.parts(config), schema, natives,
                           {n: s.shape for n, s in tensors.items()})
    if problem is not None:
        raise PlanError([problem])


def make_plan(source: SourceView, dest: DestView, config: ModelConfig, *,
              dtype: DType | None = None, schema: Mapping[str, Shape] | None = None,
              streams: bool = False, notes: tuple[str, ...] = ()) -> Plan:
    """Build and validate the plan; raises :class:`PlanError` listing every problem.

    ``dtype``: the destination's floating-point dtype (default: each tensor keeps its own).
    ``streams``: the destination writer takes tensors as slabs (``write_slabs``), so fused
    destination tensors are not built in memory; the peak estimate counts that.

    ``schema`` is the set of logical IR tensors to move (default: the model's
    :meth:`ModelConfig.schema`); checkpoints that hold something else, such as adapters, pass
    their own.
    """
    schema = dict(config.schema() if schema is None else schema)
    source_format, source_naming, source_tensors = source.format, source.naming, source.tensors
    dest_format, dest_naming = dest.format, dest.naming
    src: Table = source.table or build_table(source.naming, config, source.params,
                                             schema=schema)
    dst: Table = dest.table or build_table(dest.naming, config, dest.params, schema=schema)
    problems: list[str] = []
    dropped: dict[str, str] = dict(source.dropped)
    _check_parts(config, src, source_tensors, schema)

    # 1. Every source tensor is mapped (with the shape the config implies) or dropped.
    for name, spec in source_tensors.items():
        binding = src.by_native.get(name)
        if binding is None:
            if name in _TIED_COPIES and config.shares_output_with_embedding:
                dropped[name] = "tied to the input embedding (tie_word_embeddings=true)"
                continue
            reason = next((why for pat, why in DROPPABLE if pat.search(name)), None)
            if reason is None:
                problems.append(f"source tensor {name} {list(spec.shape)} is not mapped by the "
                                f"{config.architecture} {source_naming} table")
            else:
                dropped[name] = reason
            continue
        expected = _shape_of(binding, schema)
        if tuple(spec.shape) != expected:
            problems.append(f"source tensor {name} has shape {list(spec.shape)}, but the config "
                            f"implies {list(expected)}")
        elif binding.copy:
            # A second copy of a mapped IR tensor (DeepSeek's MTP embedding / head): the
            # original is read; the table writes the copy back where the destination has one.
            dropped[name] = next((why for pat, why in DROPPABLE if pat.search(name)),
                                 f"a copy of {', '.join(binding.ir.values())}")

    # 2. Every IR tensor has a source, and gets the dtype of the native tensor it comes from.
    ir_specs: dict[str, TensorSpec] = {}
    for ir_name, shape in schema.items():
        hit = src.by_ir.get(ir_name)
        if hit is None or hit[0].native not in source_tensors:
            native = hit[0].native if hit else "?"
            problems.append(f"IR tensor {ir_name} has no source (expected {native})")
            continue
        ir_specs[ir_name] = TensorSpec(ir_name, shape, source_tensors[hit[0].native].dtype)
    if problems:
        raise PlanError(problems)

    # Every IR tensor has a place in the destination: a tensor the destination's table cannot
    # hold (a token-classification score bias in Megatron) is refused, never dropped.
    placed = {n for b in dst.bindings for n in b.ir.values()}
    problems.extend(f"IR tensor {n} has no place in the {config.architecture} {dest_naming} "
                    f"table of {dest_format}" for n in ir_specs if n not in placed)
    if problems:
        raise PlanError(problems)

    # 3. Destination tensors, their dtype, and units = connected components over sources.
    comps = _Components()
    dest_specs: list[TensorSpec] = []
    dest_sources: list[list[Binding]] = []
    for b in dst.bindings:
        parts = [ir_specs[n] for n in b.ir.values()]
        dtypes = {p.dtype for p in parts}
        if dtype is not None:
            out_dtype = dtype if all(p.dtype.is_floating_point for p in parts) else parts[0].dtype
        elif len(dtypes) == 1:
            out_dtype = parts[0].dtype
        else:
            problems.append(f"destination tensor {b.native} fuses parts of different dtypes "
                            f"{sorted(dtype_name(d) for d in dtypes)}; pass an explicit dtype")
            continue
        dest_specs.append(TensorSpec(b.native, _shape_of(b, schema), out_dtype))
        sources = list({src.by_ir[n][0].native: src.by_ir[n][0] for n in b.ir.values()}.values())
        dest_sources.append(sources)
        for s in sources[1:]:
            comps.union(sources[0].native, s.native)
    if problems:
        raise PlanError(problems)

    groups: dict[str, tuple[list[Binding], list[int]]] = {}
    for i, sources in enumerate(dest_sources):
        root = comps.find(sources[0].native)
        srcs, targets = groups.setdefault(root, ([], []))
        for s in sources:
            if s not in srcs:
                srcs.append(s)
        targets.append(i)

    units: list[Unit] = []
    written: set[str] = set()
    for srcs, target_idx in groups.values():
        targets = tuple(dst.bindings[i] for i in target_idx)
        read = sum(source_tensors[s.native].nbytes for s in srcs)
        out = sum(dest_specs[i].nbytes for i in target_idx)
        # Held at once: the sources, the IR parts their inverses copy, and the destination
        # tensors that are built (fused, padded or cast) rather than passed through as views.
        ir_copies = sum(ir_specs[n].nbytes for s in srcs if s.transform.copies_on_inverse()
                        for n in s.ir.values())
        built = sum(_built_bytes(dst.bindings[i], dest_specs[i], ir_specs, streams)
                    for i in target_idx)
        units.append(Unit(tuple(srcs), targets, read, out, read + ir_copies + built))
        for t in targets:
            if t.native in written:
                problems.append(f"destination tensor {t.native} would be written twice")
            written.add(t.native)
    if written != {s.name for s in dest_specs}:
        problems.append("some destination tensors are not produced by any unit")
    if problems:
        raise PlanError(problems)

    # Units run in destination order, so writers see tensors in the order they were declared.
    order = {s.name: i for i, s in enumerate(dest_specs)}
    units.sort(key=lambda u: order[u.targets[0].native])
    rank = {t.native: i for i, u in enumerate(units) for t in u.targets}
    ordered_specs = tuple(sorted(dest_specs, key=lambda s: rank[s.name]))
    return Plan(source_format, dest_format, config, tuple(units), ordered_specs,
                ir_specs, dropped, notes, dest.params)
