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

MoE models (:data:`MOE_LORA_ROWS`) add the adapters Bridge puts on each SequentialMLP expert
(``mlp.experts.local_experts.{k}.linear_fc1``), which megatron-core's
``SequentialMLP.sharded_state_dict`` re-keys to the global expert: the ``mcore-lora`` name is
``decoder.layers.{layer}.mlp.experts.experts.{expert}.linear_fc1.adapter.linear_in.weight``
(torch_dist: ``decoder.layers.mlp.experts.experts.linear_fc1.adapter.linear_in.weight``
``[L, E, R, H]``, confirmed with megatron-core 0.16.1), over the family's per-expert HF names
(Mixtral ``block_sparse_moe.experts.{expert}.w1``), and the shared experts'
(``mlp.shared_experts.linear_fc1.adapter``). Expert fc1 ``linear_out`` goes through the SwiGLU
factory like a dense fc1 (Bridge's ``base_linear_name`` holds ``linear_fc1``).

Which rows apply, and how each is configured, depends on the adapter: the targeted modules (the
schema) and the :class:`~ckpt_ir.adapters.LoraLayout` (``NativeParams.lora``): shared or
rank-stacked A, the Megatron rank, the B factors. The rows are the table engine's own, *partial*
(:class:`~ckpt_ir.table_engine.Row`): factories get the concrete IR names of one binding, roles
whose module is not targeted are left out, and the ``fused_lora`` / ``canonical_lora`` features
pick the style's rows. The MoE rows derive from the family's :class:`MoeNames`, so a new MoE
architecture needs no row here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from ckpt_ir.adapters import LORA_LEAVES, LoraLayout, base_modules, module_of
from ckpt_ir.architectures import MOE_NAMES, MoeNames
from ckpt_ir.errors import CorruptCheckpointError, FormatError, InternalError
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.layout import Partition
from ckpt_ir.table_engine import NativeParams, Row, Table, expand_table, one
from ckpt_ir.transforms import (
    ConcatGateUp,
    Identity,
    InterleaveQKV,
    RankColumns,
    StackRanks,
    Transform,
)

__all__ = ["LORA_ROWS", "MOE_LORA_ROWS", "infer_megatron_lora", "lora_partition", "lora_rows",
           "lora_table"]

# (config, params, {role: concrete IR name}) -> transform: the engine's PartialFactory.
LoraFactory = Callable[[ModelConfig, NativeParams, Mapping[str, str]], Transform]

_STYLE_FEATURE = {"fused": "fused_lora", "canonical": "canonical_lora"}


def _layout(params: NativeParams) -> LoraLayout:
    if not isinstance(params.lora, LoraLayout):
        raise InternalError("the mcore-lora naming needs NativeParams.lora (a LoraLayout)")
    return params.lora


def lora_row(native: str, ir: Mapping[str, str], transform: LoraFactory, partition: Partition,
             style: str | None = None) -> Row:
    """A partial row of the ``mcore-lora`` naming; ``style`` limits it to fused or canonical
    LoRA. Per-expert rows apply to routed layers only."""
    conds = ((_STYLE_FEATURE[style],) if style else ()) + (
        ("moe_layer",) if "{expert}" in native else ())
    return Row(native, ir, transform, partition, when=conds or None, partial=True)


def row_style(row: Row) -> str | None:
    """The LoRA style a row is limited to (None: both name it alike)."""
    return next((s for s, f in _STYLE_FEATURE.items() if f in row.conditions), None)


def _blocks(layout: LoraLayout, ir: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    try:
        return {role: layout.blocks[module_of(name)] for role, name in ir.items()}
    except KeyError as e:
        raise FormatError(f"the LoRA layout has no block for {e.args[0]}") from None


def stack_ranks(config: ModelConfig, params: NativeParams, ir: Mapping[str, str]) -> StackRanks:
    """StackRanks: roles whose A share a block (same start) are stored once."""
    layout = _layout(params)
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
                  ) -> Callable[[ModelConfig, NativeParams, Mapping[str, str]], RankColumns]:
    def factory(config: ModelConfig, params: NativeParams, ir: Mapping[str, str]
                ) -> RankColumns:
        layout = _layout(params)
        blocks = _blocks(layout, ir)
        factors = tuple((role, layout.factor(module_of(name))) for role, name in ir.items()
                        if layout.factor(module_of(name)) != 1.0)
        fill = tuple((role, rows) for role, rows in kv_rows.items() if role not in ir)
        return RankColumns(inner, tuple((r, *blocks[r]) for r in ir), layout.rank, fill,
                           factors)
    return factory


def rank_columns(config: ModelConfig, params: NativeParams, ir: Mapping[str, str]
                 ) -> RankColumns:
    """RankColumns of one module's B (no fusion)."""
    return _rank_columns(Identity(), {})(config, params, ir)


def rank_columns_qkv(config: ModelConfig, params: NativeParams, ir: Mapping[str, str]
                     ) -> RankColumns:
    """RankColumns fused like linear_qkv (InterleaveQKV over the KV groups)."""
    d, g = config.head_dim, config.num_key_value_heads
    rows = {"q": config.num_attention_heads * d, "k": g * d, "v": g * d}
    return _rank_columns(InterleaveQKV(g, config.heads_per_group, d), rows)(config, params, ir)


def _gate_up_columns(ffn: Callable[[ModelConfig], int]) -> LoraFactory:
    def factory(config: ModelConfig, params: NativeParams, ir: Mapping[str, str]
                ) -> RankColumns:
        f = ffn(config)
        return _rank_columns(ConcatGateUp(), {"gate": f, "up": f})(config, params, ir)
    factory.__doc__ = "RankColumns fused like linear_fc1 (``[gate; up]``)."
    return factory


rank_columns_gate_up = _gate_up_columns(lambda c: c.intermediate_size)
rank_columns_expert_gate_up = _gate_up_columns(lambda c: c.moe_intermediate_size)
rank_columns_shared_gate_up = _gate_up_columns(lambda c: c.shared_expert_intermediate_size)


L = "decoder.layers.{layer}."
H = "model.layers.{layer}."


def _ab(module: str) -> tuple[str, str]:
    return H + module + ".lora_A.weight", H + module + ".lora_B.weight"


def _fused(base: str, roles: Mapping[str, str], b_factory: LoraFactory,
           b_partition: Partition, a_partition: Partition) -> tuple[Row, Row]:
    a = {r: _ab(m)[0] for r, m in roles.items()}
    b = {r: _ab(m)[1] for r, m in roles.items()}
    return (lora_row(L + base + ".adapter.linear_in.weight", a, stack_ranks, a_partition,
                     "fused"),
            lora_row(L + base + ".adapter.linear_out.weight", b, b_factory, b_partition,
                     "fused"))


def _single(prefix: str, module: str, a_partition: Partition, style: str | None
            ) -> tuple[Row, Row]:
    a, b = _ab(module)
    return (lora_row(L + prefix + ".linear_in.weight", one(a), stack_ranks, a_partition, style),
            lora_row(L + prefix + ".linear_out.weight", one(b), rank_columns, Partition.COLUMN,
                     style))


def _swiglu_rows(native: str, hf: str, gate: str, up: str, down: str,
                 gate_up: LoraFactory, *, canonical: bool) -> tuple[Row, ...]:
    """The adapters of one SwiGLU MLP: Megatron ``{native}.linear_fc1`` / ``linear_fc2`` over
    HF ``{hf}{gate}`` / ``{up}`` / ``{down}``."""
    return (
        *_fused(f"{native}.linear_fc1", {"gate": hf + gate, "up": hf + up}, gate_up,
                Partition.SWIGLU, Partition.COLUMN),
        *(row for x, m in (("gate", gate), ("up", up)) if canonical for row in _single(
            f"{native}.linear_fc1.adapter.adapter_{x}", hf + m, Partition.COLUMN, "canonical")),
        *_single(f"{native}.linear_fc2.adapter", hf + down, Partition.ROW, None),
    )


LORA_ROWS: tuple[Row, ...] = (
    # LoRA: one adapter per fused base layer; CanonicalLoRA: one per HF module. linear_proj and
    # linear_fc2 hold one HF module each, so both styles name them alike.
    *_fused("self_attention.linear_qkv",
            {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
            rank_columns_qkv, Partition.QKV, Partition.COLUMN),
    *(row for x in "qkv" for row in _single(
        f"self_attention.linear_qkv.adapter.adapter_{x}", f"self_attn.{x}_proj",
        Partition.COLUMN, "canonical")),
    *_single("self_attention.linear_proj.adapter", "self_attn.o_proj", Partition.ROW, None),
    *_swiglu_rows("mlp", "mlp.", "gate_proj", "up_proj", "down_proj", rank_columns_gate_up,
                  canonical=True),
)
"""Rows of dense decoders (and of the attention and dense layers of MoE models)."""


def _moe_rows(names: MoeNames) -> tuple[Row, ...]:
    """Routed experts (SequentialMLP ``mlp.experts.local_experts.{k}``, re-keyed by megatron-core
    to the global expert: the ``mcore`` naming ``mlp.experts.experts.{expert}``) and shared
    experts. Fused LoRA only: CanonicalLoRA on experts is refused by the layout planner."""
    rows = _swiglu_rows("mlp.experts.experts.{expert}", names.expert, names.gate, names.up,
                        names.down, rank_columns_expert_gate_up, canonical=False)
    if names.shared:
        rows += _swiglu_rows("mlp.shared_experts", names.shared, "gate_proj", "up_proj",
                             "down_proj", rank_columns_shared_gate_up, canonical=False)
    return rows


MOE_LORA_ROWS: Mapping[str, tuple[Row, ...]] = MappingProxyType({
    arch: LORA_ROWS + _moe_rows(names) for arch, names in MOE_NAMES.items()})
"""Rows of the MoE families by architecture: the dense rows plus experts and shared experts."""


def lora_rows(config: ModelConfig | None) -> tuple[Row, ...]:
    """The ``mcore-lora`` rows of ``config``'s architecture (dense rows without a config)."""
    if config is None or config.moe_names is None:
        return LORA_ROWS
    return MOE_LORA_ROWS[config.architecture]


def _pattern(native: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(native).replace(re.escape("{layer}"), r"\d+")
                      .replace(re.escape("{expert}"), r"\d+") + "$")


_PARTITIONS = tuple((_pattern(native), partition) for native, partition in {
    r.native: r.partition for rows in (LORA_ROWS, *MOE_LORA_ROWS.values()) for r in rows
}.items())


def lora_partition(native: str) -> Partition | None:
    """The TP partition of a Megatron LoRA tensor name (None: not an adapter tensor)."""
    return next((p for pat, p in _PARTITIONS if pat.match(native)), None)


_ROW_PATTERNS: dict[str | None, tuple[tuple[re.Pattern[str], Row], ...]] = {}


def _row_patterns(config: ModelConfig | None) -> tuple[tuple[re.Pattern[str], Row], ...]:
    key = None if config is None or config.moe_names is None else config.architecture
    if key not in _ROW_PATTERNS:
        _ROW_PATTERNS[key] = tuple((_pattern(r.native), r) for r in lora_rows(config))
    return _ROW_PATTERNS[key]


# HF leaf names in module order (Mixtral's experts: w1 gate, w3 up, w2 down).
_LEAF_ORDER = (*LORA_LEAVES[:6], "w1", "w3", *LORA_LEAVES[6:], "w2")


def infer_megatron_lora(specs: Mapping[str, TensorSpec], *, path: object = None,
                        config: ModelConfig | None = None
                        ) -> tuple[str, tuple[str, ...] | str, int]:
    """``(style, targets, rank)`` of Megatron LoRA tensors, from names and shapes.

    What a checkpoint without ckpt-ir's layout file says about itself: ``LoRA`` or
    ``CanonicalLoRA`` names, the modules they wrap, and the one rank (``dim``) every
    ``linear_in`` has. ``targets`` are the targeted HF leaf names (as Megatron-Bridge's
    ``save_hf_adapter`` writes ``target_modules``), or, when those would name more modules of
    ``config``'s model than carry adapters (Bridge wildcard targets: an MoE model's experts but
    not its shared expert), a PEFT module name pattern naming exactly the adapted sites.
    """
    styles: set[str] = set()
    leaves: set[str] = set()
    sites: set[str] = set()  # IR module patterns of the rows present ({layer}, {expert})
    ranks: dict[int, str] = {}
    patterns = _row_patterns(config)
    for name, spec in specs.items():
        row = next((r for pat, r in patterns if pat.match(name)), None)
        if row is None:
            continue
        style = row_style(row)
        if style is not None:
            styles.add(style)
        leaves.update(module_of(n).rsplit(".", 1)[1] for n in row.ir.values())
        sites.update(module_of(n) for n in row.ir.values())
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
        experts = any(".experts.experts." in n for n in ranks.values())
        raise CorruptCheckpointError(
            "Megatron LoRA adapters share one rank, but linear_in weights have "
            f"{sorted(ranks)} rows (e.g. {', '.join(sorted(ranks.values())[:2])})"
            + ("; expert adapters of another rank (Megatron-Bridge's normalize_moe_lora) are "
               "not supported" if experts else ""), path=path)
    targets: tuple[str, ...] | str = tuple(x for x in _LEAF_ORDER if x in leaves)
    if config is not None and config.is_moe:
        by_leaf = {_site_pattern(m.name) for m in base_modules(config)
                   if m.name.rpartition(".")[2] in leaves}
        if by_leaf != sites:
            targets = "|".join(re.escape(p).replace(re.escape("{layer}"), r"\d+")
                               .replace(re.escape("{expert}"), r"\d+") for p in sorted(sites))
    return styles.pop() if styles else "fused", targets, next(iter(ranks))


def _site_pattern(module: str) -> str:
    """``model.layers.3.mlp.experts.5.gate_proj`` -> ``model.layers.{layer}.mlp.experts.{expert}
    .gate_proj``: the row pattern a module belongs to."""
    module = re.sub(r"^model\.layers\.\d+\.", "model.layers.{layer}.", module)
    return re.sub(r"\.experts\.\d+\.", ".experts.{expert}.", module)


def lora_table(config: ModelConfig, params: NativeParams, schema: Iterable[str] | None) -> Table:
    """The ``mcore-lora`` bindings of the adapter whose IR tensors are ``schema``: each row at
    every layer (and every routed expert of an MoE layer), with the roles the schema has."""
    _layout(params)
    if schema is None:
        raise InternalError("the mcore-lora naming needs the adapter's schema")
    return expand_table("mcore-lora", lora_rows(config), config, params, present=schema)
