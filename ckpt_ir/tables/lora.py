"""Megatron-Bridge LoRA rows: HF PEFT adapter names <-> Megatron LoRA adapter names.

The ``mcore-lora`` naming. Megatron-Bridge wraps each targeted base layer in an adapter with
``linear_in`` (A, ``[rank, in]``) and ``linear_out`` (B, ``[out, rank]``), names
``decoder.layers.{layer}.<base module>.adapter.linear_{in,out}.weight``; ``LoRA`` has one
adapter per fused layer (``linear_qkv``, ``linear_fc1``), ``CanonicalLoRA`` one per HF module
(``linear_qkv.adapter.adapter_q``, ``linear_fc1.adapter.adapter_gate``, ...). Names are global-layer
and unsharded, like the ``mcore`` naming; torch_dist stacks layers the same way.

TP partitions, from Bridge's ``ParallelLinearAdapter``: for a column-parallel base (``linear_qkv``,
``linear_fc1``) ``linear_in`` is a ``ColumnParallelLinear(in, rank, gather_output=True)``, split
on the rank, and ``linear_out`` is split like the base rows (whole KV groups; ``[gate_t; up_t]``:
torch_dist saves it through the SwiGLU factory); for a row-parallel base (``linear_proj``,
``linear_fc2``) ``linear_in`` is a ``RowParallelLinear``, split on ``in``, and ``linear_out`` a
``ColumnParallelLinear(rank, out, gather_output=True)``, split on ``out``.

Which rows apply, and how each is configured, depends on the adapter: the targeted modules (the
schema) and the :class:`~ckpt_ir.adapters.LoraLayout` (``NativeParams.lora``): shared or
rank-stacked A, the Megatron rank, the B factors. Factories therefore get the concrete IR names
of one layer's row; roles whose module is not targeted are left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ckpt_ir.adapters import LoraLayout, module_of
from ckpt_ir.errors import CorruptCheckpointError, FormatError, InternalError
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.layout import Partition
from ckpt_ir.tables import Binding, NativeParams, Table, one
from ckpt_ir.transforms import (
    ConcatGateUp,
    Identity,
    InterleaveQKV,
    RankColumns,
    StackRanks,
    Transform,
)

__all__ = ["LORA_ROWS", "LoraRow", "infer_megatron_lora", "lora_partition", "lora_table"]

# (config, layout, {role: concrete IR name}) -> transform
LoraFactory = Callable[[ModelConfig, LoraLayout, Mapping[str, str]], Transform]


@dataclass(frozen=True, slots=True)
class LoraRow:
    """One mapping rule of the ``mcore-lora`` naming; ``style`` limits it to fused or canonical."""

    native: str
    ir: Mapping[str, str]
    transform: LoraFactory
    partition: Partition
    style: str | None = None


def _blocks(layout: LoraLayout, ir: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    try:
        return {role: layout.blocks[module_of(name)] for role, name in ir.items()}
    except KeyError as e:
        raise FormatError(f"the LoRA layout has no block for {e.args[0]}") from None


def stack_ranks(config: ModelConfig, layout: LoraLayout, ir: Mapping[str, str]) -> StackRanks:
    """StackRanks: roles whose A share a block (same start) are stored once."""
    by_start: dict[tuple[int, int], list[str]] = {}
    for role, block in sorted(_blocks(layout, ir).items(), key=lambda kv: kv[1]):
        by_start.setdefault(block, []).append(role)
    end = 0
    for start, width in by_start:
        if start != end:
            raise FormatError(f"the LoRA layout's blocks of {sorted(ir.values())} do not follow "
                              f"each other from row 0 ({sorted(by_start)})")
        end = start + width
    return StackRanks(tuple((tuple(roles), width) for (_, width), roles in by_start.items()),
                      layout.rank)


def _rank_columns(inner: Transform, kv_rows: Mapping[str, int]
                  ) -> Callable[[ModelConfig, LoraLayout, Mapping[str, str]], RankColumns]:
    def factory(config: ModelConfig, layout: LoraLayout, ir: Mapping[str, str]) -> RankColumns:
        blocks = _blocks(layout, ir)
        factors = tuple((role, layout.factor(module_of(name))) for role, name in ir.items()
                        if layout.factor(module_of(name)) != 1.0)
        fill = tuple((role, rows) for role, rows in kv_rows.items() if role not in ir)
        return RankColumns(inner, tuple((r, *blocks[r]) for r in ir), layout.rank, fill,
                           factors)
    return factory


def rank_columns(config: ModelConfig, layout: LoraLayout, ir: Mapping[str, str]) -> RankColumns:
    """RankColumns of one module's B (no fusion)."""
    return _rank_columns(Identity(), {})(config, layout, ir)


def rank_columns_qkv(config: ModelConfig, layout: LoraLayout, ir: Mapping[str, str]
                     ) -> RankColumns:
    """RankColumns fused like linear_qkv (InterleaveQKV over the KV groups)."""
    d, g = config.head_dim, config.num_key_value_heads
    rows = {"q": config.num_attention_heads * d, "k": g * d, "v": g * d}
    return _rank_columns(InterleaveQKV(g, config.heads_per_group, d), rows)(config, layout, ir)


def rank_columns_gate_up(config: ModelConfig, layout: LoraLayout, ir: Mapping[str, str]
                         ) -> RankColumns:
    """RankColumns fused like linear_fc1 (``[gate; up]``)."""
    f = config.intermediate_size
    return _rank_columns(ConcatGateUp(), {"gate": f, "up": f})(config, layout, ir)


L = "decoder.layers.{layer}."
H = "model.layers.{layer}."


def _ab(module: str) -> tuple[str, str]:
    return H + module + ".lora_A.weight", H + module + ".lora_B.weight"


def _fused(base: str, roles: Mapping[str, str], b_factory: LoraFactory,
           b_partition: Partition, a_partition: Partition) -> tuple[LoraRow, LoraRow]:
    a = {r: _ab(m)[0] for r, m in roles.items()}
    b = {r: _ab(m)[1] for r, m in roles.items()}
    return (LoraRow(L + base + ".adapter.linear_in.weight", a, stack_ranks, a_partition,
                    "fused"),
            LoraRow(L + base + ".adapter.linear_out.weight", b, b_factory, b_partition,
                    "fused"))


def _single(prefix: str, module: str, a_partition: Partition, style: str | None
            ) -> tuple[LoraRow, LoraRow]:
    a, b = _ab(module)
    return (LoraRow(L + prefix + ".linear_in.weight", one(a), stack_ranks, a_partition, style),
            LoraRow(L + prefix + ".linear_out.weight", one(b), rank_columns, Partition.COLUMN,
                    style))


LORA_ROWS: tuple[LoraRow, ...] = (
    # LoRA: one adapter per fused base layer; CanonicalLoRA: one per HF module. linear_proj and
    # linear_fc2 hold one HF module each, so both styles name them alike.
    *_fused("self_attention.linear_qkv",
            {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
            rank_columns_qkv, Partition.QKV, Partition.COLUMN),
    *(row for x in "qkv" for row in _single(
        f"self_attention.linear_qkv.adapter.adapter_{x}", f"self_attn.{x}_proj",
        Partition.COLUMN, "canonical")),
    *_single("self_attention.linear_proj.adapter", "self_attn.o_proj", Partition.ROW, None),
    *_fused("mlp.linear_fc1", {"gate": "mlp.gate_proj", "up": "mlp.up_proj"},
            rank_columns_gate_up, Partition.SWIGLU, Partition.COLUMN),
    *(row for x in ("gate", "up") for row in _single(
        f"mlp.linear_fc1.adapter.adapter_{x}", f"mlp.{x}_proj", Partition.COLUMN,
        "canonical")),
    *_single("mlp.linear_fc2.adapter", "mlp.down_proj", Partition.ROW, None),
)


def _pattern(native: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(native).replace(re.escape("{layer}"), r"\d+") + "$")


_PARTITIONS = tuple((_pattern(r.native), r.partition) for r in LORA_ROWS)


def lora_partition(native: str) -> Partition | None:
    """The TP partition of a Megatron LoRA tensor name (None: not an adapter tensor)."""
    return next((p for pat, p in _PARTITIONS if pat.match(native)), None)


_ROW_PATTERNS = tuple((_pattern(r.native), r) for r in LORA_ROWS)


def infer_megatron_lora(specs: Mapping[str, TensorSpec], *, path: object = None
                        ) -> tuple[str, tuple[str, ...], int]:
    """``(style, targeted HF leaves, rank)`` of Megatron LoRA tensors, from names and shapes.

    What a checkpoint without ckpt-ir's layout file says about itself: ``LoRA`` or
    ``CanonicalLoRA`` names, the modules they wrap, and the one rank (``dim``) every
    ``linear_in`` has.
    """
    styles: set[str] = set()
    leaves: set[str] = set()
    ranks: dict[int, str] = {}
    for name, spec in specs.items():
        row = next((r for pat, r in _ROW_PATTERNS if pat.match(name)), None)
        if row is None:
            continue
        if row.style is not None:
            styles.add(row.style)
        leaves.update(module_of(n).rsplit(".", 1)[1] for n in row.ir.values())
        if name.endswith(".linear_in.weight") and len(spec.shape) == 2:
            ranks.setdefault(spec.shape[0], name)
    if not leaves:
        raise FormatError("no Megatron LoRA adapter tensors (...adapter.linear_in.weight) found",
                          path=path)
    if len(styles) > 1:
        raise CorruptCheckpointError("the checkpoint mixes LoRA (linear_qkv.adapter.linear_in) "
                                     "and CanonicalLoRA (linear_qkv.adapter.adapter_q) names",
                                     path=path)
    if len(ranks) != 1:
        raise CorruptCheckpointError(
            "Megatron LoRA adapters share one rank, but linear_in weights have "
            f"{sorted(ranks)} rows (e.g. {', '.join(sorted(ranks.values())[:2])})", path=path)
    order = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return (styles.pop() if styles else "fused", tuple(x for x in order if x in leaves),
            next(iter(ranks)))


def lora_table(config: ModelConfig, params: NativeParams, schema: Iterable[str] | None) -> Table:
    """The ``mcore-lora`` bindings of the adapter whose IR tensors are ``schema``."""
    layout = getattr(params, "lora", None)
    if not isinstance(layout, LoraLayout):
        raise InternalError("the mcore-lora naming needs NativeParams.lora (a LoraLayout)")
    if schema is None:
        raise InternalError("the mcore-lora naming needs the adapter's schema")
    names = set(schema)
    bindings: list[Binding] = []
    for layer in range(config.num_layers):
        for row in LORA_ROWS:
            if row.style not in (None, layout.style):
                continue
            ir = {role: pat.replace("{layer}", str(layer)) for role, pat in row.ir.items()}
            ir = {role: name for role, name in ir.items() if name in names}
            if not ir:
                continue
            transform = row.transform(config, layout, ir)
            if set(transform.roles) != set(ir):
                raise InternalError(f"row {row.native}: roles do not match "
                                    f"{transform.describe()}")
            bindings.append(Binding(row.native.replace("{layer}", str(layer)),
                                    MappingProxyType(ir), transform, row.partition, layer))
    return Table("mcore-lora", bindings)
