"""The table engine: rows (data) instantiated into tables for one model, indexed both ways.

Which rows an architecture has lives in its record (:mod:`ckpt_ir.architectures`); the
``mcore-lora`` rows in :mod:`ckpt_ir.tables.lora`; :func:`ckpt_ir.tables.build_table` picks
the rows and calls this engine. The engine knows no architecture.

A :class:`Row` is data: a native name pattern, the IR name pattern of each role it is built
from, a transform (or a factory that configures one from the model's numbers), the TP
partition rule, and an optional condition naming features of the model (``has_qkv_bias``) or of
the layer (``moe_layer``). Patterns use named placeholders whose ranges come from the config, so
both directions resolve alike:

* ``{layer}``: decoder layers ``0 .. num_layers-1``;
* ``{expert}``: routed experts ``0 .. num_experts-1`` (only inside a layer);
* ``{mtp}`` / ``{mtp_layer}``: multi-token-prediction layer ``k`` and its HF layer index
  ``num_layers + k`` (megatron-core ``mtp.layers.{mtp}`` <-> HF ``model.layers.{mtp_layer}``).
* ``{block}`` / ``{deepstack}``: blocks ``0 .. vision_blocks-1`` of a vision tower and its
  deepstack mergers ``0 .. deepstack_mergers-1`` (Qwen VL). Their bindings belong to no decoder
  layer: like the embedding they live on the first pipeline stage, where Megatron places the
  vision model.

A row may *stack* a placeholder that only its IR patterns use (``stack="expert"``): one native
tensor then holds that tensor of every expert (transformers 5's fused ``mlp.experts.gate_up_proj``);
its roles are ``<role>[<index>]``.

Five namings exist:

* ``"hf"``: Hugging Face transformers names; the IR names *are* HF names, so this table is
  the identity over :meth:`ModelConfig.schema`, except where an architecture registers ``hf``
  rows for a variant (``fused_experts``: the experts of a layer in two stacked tensors).
* ``"mcore"``: Megatron-Core GPTModel parameter names, one tensor per layer with the *global*
  layer index and the *unsharded* (TP-invariant) layout. Storage formats then add their own
  physical layer: torch_dist stacks layers into ``decoder.layers.<param>`` keys, per-rank
  formats cut TP shards by the row's partition and renumber layers per pipeline stage.
* ``"verl-native"``: verl's own Megatron models of March 2025 (era A of ``verl-legacy``):
  ``model.layers.{layer}.self_attn.qkv_proj`` as plain ``[q; k; v]``, ``mlp.gate_up_proj``;
  read-only, registered for the architectures verl had then.
* ``"mcore-lora"``: Megatron-Bridge LoRA adapter names over an adapter's IR tensors
  (:mod:`ckpt_ir.tables.lora`), configured by ``NativeParams.lora``. An adapter targets some
  modules only, so its rows are *partial*: a binding keeps the roles whose IR tensor the
  adapter holds, and its transform is configured from those concrete names.
* ``"torchtitan"``: torchtitan's model FQNs (``tok_embeddings.weight``,
  ``layers.{layer}.attention.qkv_linear.wq.weight``, stacked routed experts), the keys of its
  ``step-N/`` DCP checkpoints (:mod:`ckpt_ir.architectures.torchtitan`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ckpt_ir.errors import InternalError
from ckpt_ir.layout import Partition
from ckpt_ir.transforms import TENSOR, Identity, Transform

if TYPE_CHECKING:
    # Typing only: ModelConfig looks its architecture record up, and the records are built
    # from rows, so the engine must not need ir.py to be imported first.
    from ckpt_ir.ir import ModelConfig

__all__ = [
    "LAYER_FEATURES",
    "NAMINGS",
    "PIPELINE_TAIL",
    "Binding",
    "Features",
    "NativeParams",
    "PartialFactory",
    "Row",
    "Table",
    "TransformFactory",
    "describe_rows",
    "expand_table",
    "hf_table",
    "one",
]

NAMINGS = ("hf", "mcore", "verl-native", "mcore-lora", "torchtitan")

PIPELINE_TAIL = ("decoder.final", "output_layer", "model.norm", "lm_head", "score.", "mtp.",
                 "language_model.decoder.final", "language_model.output_layer",
                 "model.language_model.norm")
"""Name prefixes of the non-layer tensors that follow the layers: the last pipeline stage holds
them (the others, the embedding, live on the first stage). The ``language_model.`` names are
a vision-language model's (Megatron-Bridge's ``Qwen3VLModel.language_model``, transformers'
``model.language_model``)."""


@dataclass(frozen=True, slots=True)
class NativeParams:
    """Physical choices of one side of a conversion that the model config does not fix."""

    padded_vocab_size: int | None = None  # None: no padding
    # "te": norms under linear_qkv.layer_norm_weight (torch_dist, TE spec); "local": input_layernorm
    # (the local spec's parameter names); "local-dist": what the local spec's sharded_state_dict
    # writes to torch_dist (TE-style keys for standard attention, MoE layers included; its own
    # names for MLA, which has no key map).
    norm_style: str = "te"
    # The mcore-lora naming's ckpt_ir.adapters.LoraLayout (shared or rank-stacked A, rank, alpha).
    lora: Any = None
    # hf naming: "per-expert" (what transformers writes) or "fused" (gate_up_proj / down_proj).
    hf_experts: str = "per-expert"


@dataclass(frozen=True, slots=True)
class Features:
    """The named conditions a row's ``when`` may refer to."""

    has_qkv_bias: bool
    has_qk_norm: bool
    is_untied: bool
    is_value_model: bool
    no_score_bias: bool
    te_norms: bool
    local_norms: bool
    local_dist_norms: bool
    has_shared_experts: bool
    has_shared_expert_gate: bool
    has_expert_bias: bool
    has_q_lora: bool
    no_q_lora: bool
    fused_experts: bool
    # The LoRA style of the mcore-lora naming (NativeParams.lora): one adapter per fused
    # Megatron layer, or one per HF module (CanonicalLoRA).
    fused_lora: bool
    canonical_lora: bool
    # Gemma 3's tower in the hub's spelling (vision_tower.vision_model.*), not transformers 5's.
    hub_vision_tower: bool = False

    @classmethod
    def of(cls, config: ModelConfig, params: NativeParams) -> Features:
        names = config.moe_names
        lora_style = params.lora.style if params.lora is not None else None
        return cls(has_qkv_bias=config.has_qkv_bias, has_qk_norm=config.has_qk_norm,
                   is_untied=not config.tie_word_embeddings and not config.is_value_model,
                   is_value_model=config.is_value_model,
                   no_score_bias=not config.has_score_bias,
                   te_norms=params.norm_style == "te", local_norms=params.norm_style == "local",
                   local_dist_norms=params.norm_style == "local-dist",
                   has_shared_experts=config.shared_expert_intermediate_size > 0,
                   has_shared_expert_gate=bool(names and names.shared_gate),
                   has_expert_bias=bool(names and names.expert_bias),
                   has_q_lora=config.q_lora_rank > 0, no_q_lora=config.q_lora_rank == 0,
                   fused_experts=params.hf_experts == "fused",
                   fused_lora=lora_style == "fused", canonical_lora=lora_style == "canonical",
                   hub_vision_tower=params.hf_experts == "vision-model")


LAYER_FEATURES = ("moe_layer", "dense_layer", "linear_attention_layer", "full_attention_layer")
"""Conditions evaluated per layer (``ModelConfig.is_moe_layer``,
``ModelConfig.is_linear_attention_layer``), not per model."""

# Placeholder -> the axis it ranges over; {mtp} and {mtp_layer} name one axis two ways.
_PLACEHOLDER_AXIS = {"layer": "layer", "expert": "expert", "mtp": "mtp", "mtp_layer": "mtp",
                     "block": "block", "deepstack": "deepstack"}
# Axes of tensors outside the decoder layers (a vision tower): expanded like non-layer rows.
_TOWER_AXES = frozenset({"block", "deepstack"})
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _placeholders(pattern: str) -> set[str]:
    return set(_PLACEHOLDER.findall(pattern))


def _fill(pattern: str, values: Mapping[str, int]) -> str:
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), pattern)


TransformFactory = Callable[["ModelConfig", NativeParams], Transform]
# A partial row's factory: (config, params, {role: concrete IR name} of one binding).
PartialFactory = Callable[["ModelConfig", NativeParams, Mapping[str, str]], Transform]


@dataclass(frozen=True, slots=True)
class Row:
    """One mapping rule: ``native`` is built from the IR tensors in ``ir`` by ``transform``."""

    native: str
    ir: Mapping[str, str]
    transform: Transform | TransformFactory | PartialFactory = field(default_factory=Identity)
    partition: Partition = Partition.REPLICATED
    # A feature name, or a tuple of names that must all hold.
    when: str | tuple[str, ...] | None = None
    # A placeholder used only in ``ir`` whose every value goes into the one native tensor.
    stack: str | None = None
    # Bind only the roles whose IR tensor the table's schema holds (none: no binding), with
    # ``transform`` a PartialFactory called per binding: LoRA adapters target some modules.
    partial: bool = False
    # A second native tensor holding an IR tensor that another row already maps (an MTP
    # layer's copy of the embedding): written like any row, never a reader's source for it.
    copy: bool = False

    def __post_init__(self) -> None:
        for cond in self.conditions:
            if cond not in Features.__dataclass_fields__ and cond not in LAYER_FEATURES:
                raise InternalError(f"row {self.native}: unknown condition {cond!r}")
        names = _placeholders(self.native).union(*map(_placeholders, self.ir.values()))
        unknown = names - set(_PLACEHOLDER_AXIS)
        if unknown:
            raise InternalError(f"row {self.native}: unknown placeholders {sorted(unknown)}")
        if self.stack is not None and (self.stack not in names
                                       or self.stack in _placeholders(self.native)):
            raise InternalError(f"row {self.native}: stacked placeholder {self.stack!r} must "
                                "appear in the IR patterns only")
        if self.partial and (isinstance(self.transform, Transform) or self.stack is not None
                             or "layer" not in self.axes):
            raise InternalError(f"row {self.native}: a partial row needs a factory and a "
                                "{layer} placeholder, and stacks nothing")
        if (isinstance(self.transform, Transform) and self.stack is None
                and set(self.ir) != set(self.transform.roles)):
            raise InternalError(f"row {self.native}: roles {sorted(self.ir)} do not match "
                                f"{type(self.transform).__name__}{self.transform.roles}")

    @property
    def conditions(self) -> tuple[str, ...]:
        if self.when is None:
            return ()
        return (self.when,) if isinstance(self.when, str) else tuple(self.when)

    @property
    def axes(self) -> frozenset[str]:
        names = _placeholders(self.native).union(*map(_placeholders, self.ir.values()))
        return frozenset(_PLACEHOLDER_AXIS[n] for n in names)


def one(name: str) -> Mapping[str, str]:
    """The ``ir`` mapping of a single-part row."""
    return MappingProxyType({TENSOR: name})


@dataclass(frozen=True, slots=True)
class Binding:
    """A row instantiated for one concrete layer: concrete names and a configured transform."""

    native: str
    ir: Mapping[str, str]
    transform: Transform
    partition: Partition
    layer: int | None
    expert: int | None = None  # global expert index of per-expert tensors (EP places them)
    copy: bool = False  # Row.copy: not indexed in Table.by_ir


class Table:
    """The bindings of one naming for one model, indexed both ways."""

    def __init__(self, naming: str, bindings: Iterable[Binding]) -> None:
        self.naming = naming
        self.bindings = tuple(bindings)
        self.by_native: dict[str, Binding] = {}
        self.by_ir: dict[str, tuple[Binding, str]] = {}
        for b in self.bindings:
            if b.native in self.by_native:
                raise InternalError(f"{naming} table maps {b.native} twice")
            self.by_native[b.native] = b
            if b.copy:
                continue
            for role, ir_name in b.ir.items():
                if ir_name in self.by_ir:
                    raise InternalError(f"{naming} table uses IR tensor {ir_name} twice")
                self.by_ir[ir_name] = (b, role)


def _axis_size(config: ModelConfig, axis: str) -> int:
    return {"layer": config.num_layers, "expert": config.num_experts,
            "mtp": config.num_mtp_layers, "block": config.vision_blocks,
            "deepstack": config.deepstack_mergers}[axis]


def _bindings(row: Row, transform: Transform | None, config: ModelConfig, params: NativeParams,
              values: Mapping[str, int], layer: int, present: frozenset[str] | None
              ) -> list[Binding]:
    """``row`` at one layer (HF index ``layer``), once per expert if it has that axis.

    ``transform`` is None for a partial row: configured per binding from the roles whose IR
    tensor is in ``present``."""
    if ("moe_layer" in row.conditions and not config.is_moe_layer(layer)) or \
            ("dense_layer" in row.conditions and config.is_moe_layer(layer)):
        return []
    if ("linear_attention_layer" in row.conditions
            and not config.is_linear_attention_layer(layer)) or \
            ("full_attention_layer" in row.conditions and config.is_linear_attention_layer(layer)):
        return []
    per_expert = "expert" in row.axes and row.stack != "expert"
    out = []
    for expert in range(config.num_experts) if per_expert else (None,):
        v = dict(values) if expert is None else {**values, "expert": expert}
        if row.stack is None:
            ir = {role: _fill(pattern, v) for role, pattern in row.ir.items()}
        else:
            ir = {f"{role}[{i}]": _fill(pattern, {**v, row.stack: i})
                  for i in range(_axis_size(config, _PLACEHOLDER_AXIS[row.stack]))
                  for role, pattern in row.ir.items()}
        t = transform
        if t is None:
            ir = {role: name for role, name in ir.items() if present is None or name in present}
            if not ir:
                continue
            t = row.transform(config, params, ir)  # type: ignore[call-arg]  # a PartialFactory
        if set(ir) != set(t.roles):
            raise InternalError(f"row {row.native}: roles do not match {t.describe()}")
        out.append(Binding(_fill(row.native, v), MappingProxyType(ir), t,
                           row.partition, None if "mtp" in row.axes else layer, expert,
                           row.copy))
    return out


def _expand(rows: Iterable[Row], config: ModelConfig, params: NativeParams,
            present: frozenset[str] | None = None) -> list[Binding]:
    feats = Features.of(config, params)
    out: list[Binding] = []
    per_layer: list[tuple[Row, Transform | None]] = []
    per_mtp: list[tuple[Row, Transform | None]] = []
    for row in rows:
        if not all(getattr(feats, c) for c in row.conditions if c not in LAYER_FEATURES):
            continue
        transform = row.transform if isinstance(row.transform, Transform) \
            else None if row.partial else row.transform(config, params)  # type: ignore[call-arg]
        axes = row.axes
        if "layer" in axes:
            per_layer.append((row, transform))
        elif "mtp" in axes:
            per_mtp.append((row, transform))
        elif axes and axes <= _TOWER_AXES:
            if transform is None or len(axes) != 1:
                raise InternalError(f"row {row.native}: a tower row ranges over one axis and "
                                    "is not partial")
            (axis,) = axes
            for i in range(_axis_size(config, axis)):
                values = {name: i for name, a in _PLACEHOLDER_AXIS.items() if a == axis}
                out.append(Binding(_fill(row.native, values), MappingProxyType(
                    {role: _fill(p, values) for role, p in row.ir.items()}), transform,
                    row.partition, None))
        elif axes:
            raise InternalError(f"row {row.native}: {{expert}} needs a layer placeholder")
        else:
            if transform is None or set(row.ir) != set(transform.roles):
                raise InternalError(f"row {row.native}: roles do not match "
                                    f"{transform.describe() if transform else 'a partial row'}")
            out.append(Binding(row.native, MappingProxyType(dict(row.ir)), transform,
                               row.partition, None, copy=row.copy))
    # Layer-major order: the executor streams one layer's tensors at a time, and within a layer
    # one expert's (each expert is its own unit of work).
    layers = config.num_layers
    layered = [b for i in range(layers) for row, t in per_layer
               for b in _bindings(row, t, config, params, {"layer": i}, i, present)]
    mtp = [b for k in range(config.num_mtp_layers) for row, t in per_mtp
           for b in _bindings(row, t, config, params, {"mtp": k, "mtp_layer": layers + k},
                              layers + k, present)]
    head = [b for b in out if not b.native.startswith(PIPELINE_TAIL)]
    tail = [b for b in out if b not in head]
    return head + layered + mtp + tail


def _identity_table(names: Iterable[str]) -> Table:
    layer_re = re.compile(r"^model\.layers\.(\d+)\.")
    bindings = []
    for name in names:
        m = layer_re.match(name)
        bindings.append(Binding(name, one(name), Identity(), Partition.REPLICATED,
                                int(m.group(1)) if m else None))
    return Table("hf", bindings)


def expand_table(naming: str, rows: Iterable[Row], config: ModelConfig, params: NativeParams,
                 *, present: Iterable[str] | None = None) -> Table:
    """The ``naming`` table of ``config``: every enabled row at every layer (and expert).

    ``present``: the IR tensors a partial row may bind (an adapter's schema)."""
    return Table(naming, _expand(rows, config, params,
                                 None if present is None else frozenset(present)))


def hf_table(config: ModelConfig, variant_rows: Iterable[Row], params: NativeParams,
             schema: Iterable[str] | None = None) -> Table:
    """The ``hf`` table: the identity over ``schema`` (default: the model's own schema), except
    for the IR tensors that enabled ``variant_rows`` cover (fused experts)."""
    names = list(config.schema() if schema is None else schema)
    order = {n: i for i, n in enumerate(names)}
    variant = [b for b in _expand(variant_rows, config, params)
               if all(n in order for n in b.ir.values())]
    if not variant:
        return _identity_table(names)
    # Variant rows replace the identity for the IR tensors they cover, in schema order.
    covered = {n for b in variant for n in b.ir.values()}
    rest = _identity_table(n for n in names if n not in covered).bindings
    placed = [(order[b.native], b) for b in rest]
    placed += [(min(order[n] for n in b.ir.values()), b) for b in variant]
    return Table("hf", [b for _, b in sorted(placed, key=lambda p: p[0])])


def describe_rows(rows: Iterable[Row]) -> str:
    """A markdown table of rows, for docs generated from the code."""
    lines = ["| native | IR parts | transform | TP partition | when |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        parts = ", ".join(f"{role}: `{n}`" if role != TENSOR else f"`{n}`"
                          for role, n in r.ir.items())
        t = r.transform
        tname = t.describe() if isinstance(t, Transform) else (t.__doc__ or t.__name__)
        tname = tname.strip().splitlines()[0]
        if r.stack is not None:
            tname += f" (every `{{{r.stack}}}` in one tensor)"
        if r.copy:
            tname += " (a copy, written only)"
        lines.append(f"| `{r.native}` | {parts} | {tname} | "
                     f"{r.partition.value} | {', '.join(r.conditions)} |")
    return "\n".join(lines)
