"""Mapping tables: per architecture, how IR tensors map onto a format family's native tensors.

A :class:`Row` is data: a native name pattern, the IR name pattern of each role it is built
from, a transform (or a factory that configures one from the model's numbers), the TP
partition rule, and an optional condition naming a feature of the model (``has_qkv_bias``).
Patterns use the named placeholder ``{layer}``; both directions resolve alike.

Three namings exist:

* ``"hf"``: Hugging Face transformers names; the IR names *are* HF names, so this table is
  the identity over :meth:`ModelConfig.schema`.
* ``"mcore"``: Megatron-Core GPTModel parameter names, one tensor per layer with the *global*
  layer index and the *unsharded* (TP-invariant) layout. Storage formats then add their own
  physical layer: torch_dist stacks layers into ``decoder.layers.<param>`` keys, per-rank
  formats cut TP shards by the row's partition and renumber layers per pipeline stage.
* ``"verl-native"``: verl's own Megatron models of March 2025 (era A of ``verl-legacy``):
  ``model.layers.{layer}.self_attn.qkv_proj`` as plain ``[q; k; v]``, ``mlp.gate_up_proj``;
  read-only, registered for the architectures verl had then.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ckpt_ir.errors import FormatError, InternalError
from ckpt_ir.ir import ModelConfig
from ckpt_ir.layout import Partition
from ckpt_ir.transforms import TENSOR, Identity, Transform

__all__ = [
    "NAMINGS",
    "PIPELINE_TAIL",
    "Binding",
    "NativeParams",
    "Row",
    "Table",
    "build_table",
    "describe_rows",
]

NAMINGS = ("hf", "mcore", "verl-native")

PIPELINE_TAIL = ("decoder.final", "output_layer", "model.norm", "lm_head")
"""Name prefixes of the non-layer tensors that follow the layers: the last pipeline stage holds
them (the others, the embedding, live on the first stage)."""


@dataclass(frozen=True, slots=True)
class NativeParams:
    """Physical choices of one side of a conversion that the model config does not fix."""

    padded_vocab_size: int | None = None  # None: no padding
    # "te": norms under linear_qkv.layer_norm_weight (torch_dist, TE spec); "local": input_layernorm
    norm_style: str = "te"


@dataclass(frozen=True, slots=True)
class Features:
    """The named conditions a row's ``when`` may refer to."""

    has_qkv_bias: bool
    has_qk_norm: bool
    is_untied: bool
    te_norms: bool
    local_norms: bool

    @classmethod
    def of(cls, config: ModelConfig, params: NativeParams) -> Features:
        return cls(has_qkv_bias=config.has_qkv_bias, has_qk_norm=config.has_qk_norm,
                   is_untied=not config.tie_word_embeddings,
                   te_norms=params.norm_style == "te", local_norms=params.norm_style == "local")


TransformFactory = Callable[[ModelConfig, NativeParams], Transform]


@dataclass(frozen=True, slots=True)
class Row:
    """One mapping rule: ``native`` is built from the IR tensors in ``ir`` by ``transform``."""

    native: str
    ir: Mapping[str, str]
    transform: Transform | TransformFactory = field(default_factory=Identity)
    partition: Partition = Partition.REPLICATED
    when: str | None = None

    def __post_init__(self) -> None:
        if self.when is not None and self.when not in Features.__dataclass_fields__:
            raise InternalError(f"row {self.native}: unknown condition {self.when!r}")
        if isinstance(self.transform, Transform) and set(self.ir) != set(self.transform.roles):
            raise InternalError(f"row {self.native}: roles {sorted(self.ir)} do not match "
                                f"{type(self.transform).__name__}{self.transform.roles}")


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
            for role, ir_name in b.ir.items():
                if ir_name in self.by_ir:
                    raise InternalError(f"{naming} table uses IR tensor {ir_name} twice")
                self.by_ir[ir_name] = (b, role)


_LAYER = "{layer}"


def _expand(rows: Iterable[Row], config: ModelConfig, params: NativeParams) -> list[Binding]:
    feats = Features.of(config, params)
    out: list[Binding] = []
    per_layer: list[tuple[Row, Transform]] = []
    for row in rows:
        if row.when is not None and not getattr(feats, row.when):
            continue
        transform = row.transform if isinstance(row.transform, Transform) \
            else row.transform(config, params)
        if set(row.ir) != set(transform.roles):
            raise InternalError(f"row {row.native}: roles do not match {transform.describe()}")
        if _LAYER in row.native:
            per_layer.append((row, transform))
        else:
            out.append(Binding(row.native, MappingProxyType(dict(row.ir)), transform,
                               row.partition, None))
    # Layer-major order: the executor streams one layer's tensors at a time.
    layered = [
        Binding(row.native.replace(_LAYER, str(i)),
                MappingProxyType({r: n.replace(_LAYER, str(i)) for r, n in row.ir.items()}),
                t, row.partition, i)
        for i in range(config.num_layers) for row, t in per_layer
    ]
    head = [b for b in out if not b.native.startswith(PIPELINE_TAIL)]
    tail = [b for b in out if b not in head]
    return head + layered + tail


def _identity_table(names: Iterable[str]) -> Table:
    layer_re = re.compile(r"^model\.layers\.(\d+)\.")
    bindings = []
    for name in names:
        m = layer_re.match(name)
        bindings.append(Binding(name, one(name), Identity(), Partition.REPLICATED,
                                int(m.group(1)) if m else None))
    return Table("hf", bindings)


def rows_for(config: ModelConfig, naming: str) -> tuple[Row, ...]:
    """The rows of ``naming`` registered for the config's architecture."""
    from ckpt_ir.tables.registry import TABLES

    arch = TABLES.get(config.architecture)
    if arch is None:
        raise FormatError(f"no mapping table for architecture {config.architecture!r}")
    if naming not in arch:
        raise FormatError(f"no {naming!r} mapping for architecture {config.architecture!r}")
    return arch[naming]


def build_table(naming: str, config: ModelConfig, params: NativeParams | None = None, *,
                schema: Iterable[str] | None = None) -> Table:
    """Instantiate the ``naming`` table for ``config`` (every layer, every enabled row).

    The ``hf`` naming is the identity over ``schema`` (default: the model's own schema).
    """
    if naming not in NAMINGS:
        raise InternalError(f"unknown naming {naming!r}")
    if naming == "hf":
        return _identity_table(config.schema() if schema is None else schema)
    return Table(naming, _expand(rows_for(config, naming), config, params or NativeParams()))


def describe_rows(rows: Iterable[Row]) -> str:
    """A markdown table of rows, for docs generated from the code."""
    lines = ["| native | IR parts | transform | TP partition | when |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        parts = ", ".join(f"{role}: `{n}`" if role != TENSOR else f"`{n}`"
                          for role, n in r.ir.items())
        t = r.transform
        tname = t.describe() if isinstance(t, Transform) else (t.__doc__ or t.__name__)
        lines.append(f"| `{r.native}` | {parts} | {tname.strip().splitlines()[0]} | "
                     f"{r.partition.value} | {r.when or ''} |")
    return "\n".join(lines)
