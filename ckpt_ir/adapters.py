"""The IR of a LoRA adapter, and the physical choices of Megatron's LoRA layouts.

An adapter in the IR is an :class:`AdapterConfig` (rank, alpha, rsLoRA, rank/alpha patterns and
target modules, after HF PEFT's ``LoraConfig``) over a base :class:`ModelConfig`, plus one pair of
logical tensors per targeted module, named like HF PEFT without the ``base_model.model.``
prefix::

    model.layers.{l}.self_attn.q_proj.lora_A.weight   [r, in]
    model.layers.{l}.self_attn.q_proj.lora_B.weight   [out, r]

The module's update is ``scaling · B @ A`` with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA), rank and alpha looked up per module through the patterns exactly as PEFT does.

Megatron-Bridge's LoRA has one rank (``dim``) and one ``alpha`` for every adapter and fuses q/k/v
and gate/up adapters into one per fused base layer. :class:`LoraLayout` is how an IR adapter sits
in that world: where each module's A rows and B columns go in the fused (or canonical) adapter,
the common rank, the common alpha, and the factor each B carries so that every module keeps its
own scaling. :func:`plan_lora_layout` chooses it; whether q/k/v share one A (fused origin) or get
their ranks stacked is a fact about the data, probed by the caller and passed in.

Pure arithmetic and validation: no I/O, no torch.distributed, no converter imports.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ckpt_ir.errors import CorruptCheckpointError, FormatError
from ckpt_ir.ir import DENSE_ARCHITECTURES, ModelConfig, Shape

__all__ = [
    "ADAPTER_SUFFIXES",
    "LORA_LAYOUT_FILE",
    "LORA_LEAVES",
    "LORA_STYLES",
    "MEGATRON_GROUPS",
    "AdapterConfig",
    "LoraLayout",
    "from_lora_layout_json",
    "lora_layout_json",
    "module_of",
    "plan_lora_layout",
]

# The linear modules of a dense decoder layer that LoRA can target, in module order.
LORA_LEAVES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

# Megatron's fused base layers and the HF modules they hold (Megatron-Bridge's
# MEGATRON_TO_HF_MODULES, verl's megatron_peft_utils).
MEGATRON_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
})
# CanonicalLoRA's target names: one adapter per HF module.
CANONICAL_TARGETS: Mapping[str, str] = MappingProxyType({
    "q_proj": "linear_q", "k_proj": "linear_k", "v_proj": "linear_v", "o_proj": "linear_proj",
    "gate_proj": "linear_fc1_gate", "up_proj": "linear_fc1_up", "down_proj": "linear_fc2",
})
LORA_STYLES = ("fused", "canonical")

ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_MODULE_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)$")
# Modules of the model LoRA could name that Megatron-style adapters cannot express.
_OTHER_MODULES = ("lm_head", "model.embed_tokens")

# LoraConfig fields whose non-default values change what the adapter computes; anything else
# (init schemes, dropout, versions, auto_mapping) does not matter to a converter.
_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("use_dora", False, "DoRA"),
    ("bias", "none", "bias training"),
    ("lora_bias", False, "lora_bias"),
    ("fan_in_fan_out", False, "fan_in_fan_out (Conv1D models)"),
    ("modules_to_save", None, "modules_to_save (fully trained extra modules)"),
    ("layers_to_transform", None, "layers_to_transform"),
    ("layer_replication", None, "layer_replication"),
    ("target_parameters", None, "target_parameters (LoRA on parameters)"),
    ("exclude_modules", None, "exclude_modules"),
    ("trainable_token_indices", None, "trainable_token_indices"),
    ("alora_invocation_tokens", None, "activated LoRA (alora_invocation_tokens)"),
    ("use_qalora", False, "QA-LoRA"),
    ("use_bdlora", None, "BD-LoRA"),
    ("kasa_config", None, "KaSA"),
    ("monteclora_config", None, "MonteCLoRA"),
    ("arrow_config", None, "Arrow routing"),
)


def module_name(layer: int, leaf: str) -> str:
    """``(3, "q_proj")`` -> ``"model.layers.3.self_attn.q_proj"``."""
    return f"model.layers.{layer}.{_PARENT[leaf]}.{leaf}"


def module_of(ir_name: str) -> str:
    """The module an adapter IR tensor belongs to (``...q_proj.lora_A.weight`` -> ``...q_proj``)."""
    for suffix in ADAPTER_SUFFIXES:
        if ir_name.endswith(suffix):
            return ir_name[: -len(suffix)]
    raise FormatError(f"{ir_name!r} is not a LoRA A/B tensor name")


def split_module(module: str) -> tuple[int, str]:
    """``"model.layers.3.self_attn.q_proj"`` -> ``(3, "q_proj")``."""
    m = _MODULE_RE.match(module)
    if not m or m.group(3) not in _PARENT:
        raise FormatError(f"{module!r} is not a LoRA-targetable module of a dense decoder")
    return int(m.group(1)), m.group(3)


def module_shape(config: ModelConfig, leaf: str) -> tuple[int, int]:
    """``(out, in)`` of a base linear module."""
    h, f = config.hidden_size, config.intermediate_size
    d = config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}[leaf]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``module``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _clean_number(value: float) -> int | float:
    """Integral floats as ints, the way PEFT configs write alpha."""
    return int(value) if float(value).is_integer() else float(value)


@dataclass(frozen=True, eq=False)
class AdapterConfig:
    """A LoRA adapter: HF PEFT ``LoraConfig`` semantics over a base model.

    ``peft`` is the full ``adapter_config.json`` dictionary, carried verbatim so an hf-peft
    destination keeps every field its source had.
    """

    base: ModelConfig
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    target_modules: tuple[str, ...] | str
    peft: Mapping[str, Any] = field(default_factory=dict, repr=False)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_peft(cls, data: Any, base: ModelConfig, *, path: Any = None) -> AdapterConfig:
        """Validate an ``adapter_config.json`` dictionary strictly.

        Malformed fields raise :class:`CorruptCheckpointError`; well-formed LoRA variants that
        ckpt-ir cannot express (DoRA, bias training, ...) raise :class:`FormatError`.
        """
        where = "adapter_config.json"
        if not isinstance(data, Mapping):
            raise CorruptCheckpointError(f"{where} is not a JSON object", path=path)
        if base.architecture not in DENSE_ARCHITECTURES:
            raise FormatError(f"LoRA adapters of {base.architecture} models are not supported "
                              f"(dense {', '.join(DENSE_ARCHITECTURES)} only)", path=path)

        def bad(message: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"{where}: {message}", path=path)

        peft_type = data.get("peft_type")
        if peft_type != "LORA":
            raise FormatError(f"{where}: peft_type {peft_type!r} is not supported (LORA only)",
                              path=path)
        r = data.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise bad(f"r must be a positive integer, got {r!r}")
        alpha = data.get("lora_alpha", 8)
        if not _number(alpha):
            raise bad(f"lora_alpha must be a finite number, got {alpha!r}")
        rslora = data.get("use_rslora", False)
        if not isinstance(rslora, bool):
            raise bad(f"use_rslora must be true or false, got {rslora!r}")
        rank_pattern = data.get("rank_pattern") or {}
        alpha_pattern = data.get("alpha_pattern") or {}
        for name, pattern, ok, kind in (
                ("rank_pattern", rank_pattern,
                 lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 "positive integers"),
                ("alpha_pattern", alpha_pattern, _number, "finite numbers")):
            if not isinstance(pattern, Mapping) or not all(
                    isinstance(k, str) and ok(v) for k, v in pattern.items()):
                raise bad(f"{name} must map module name patterns to {kind}, got "
                          f"{json.dumps(pattern)[:80]}")
            for key in pattern:
                try:
                    re.compile(rf"(.*\.)?({key})$")  # as _pattern_key uses it
                except re.error as e:
                    raise bad(f"{name} key {key!r} is not a valid pattern: {e}") from e
        targets = data.get("target_modules")
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise bad(f"target_modules {targets!r} is not a valid pattern: {e}") from e
            target_modules: tuple[str, ...] | str = targets
        elif isinstance(targets, (list, tuple)) and targets and all(
                isinstance(t, str) and t for t in targets):
            target_modules = tuple(targets)
        else:
            raise bad(f"target_modules must be a module name pattern or a non-empty list of "
                      f"module names, got {json.dumps(targets)[:80]}")
        for key, default, what in _UNSUPPORTED:
            value = data.get(key, default)
            unset = value is None or value is False or value == default or (
                isinstance(value, (list, dict)) and not value)
            if not unset:
                shown = json.dumps(value)[:60]
                raise FormatError(f"{where}: {what} is not supported ({key}={shown})", path=path)
        cfg = cls(base=base, r=r, lora_alpha=alpha, use_rslora=rslora,
                  rank_pattern=MappingProxyType(dict(rank_pattern)),
                  alpha_pattern=MappingProxyType(dict(alpha_pattern)),
                  target_modules=target_modules, peft=MappingProxyType(dict(data)))
        cfg._check_targets(path)
        return cfg

    @classmethod
    def create(cls, base: ModelConfig, *, r: int, lora_alpha: float, leaves: Iterable[str],
               use_rslora: bool = False, rank_pattern: Mapping[str, int] | None = None,
               alpha_pattern: Mapping[str, float] | None = None,
               base_model_name_or_path: str | None = None) -> AdapterConfig:
        """A new adapter config, written the way Megatron-Bridge's ``save_hf_adapter`` does."""
        targets = sorted(set(leaves))
        peft = {
            "peft_type": "LORA", "auto_mapping": None,
            "base_model_name_or_path": base_model_name_or_path, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "lora_alpha": _clean_number(lora_alpha), "lora_dropout": 0.0,
            "modules_to_save": None, "r": r, "rank_pattern": dict(rank_pattern or {}),
            "alpha_pattern": {k: _clean_number(v) for k, v in (alpha_pattern or {}).items()},
            "target_modules": targets, "task_type": "CAUSAL_LM", "use_dora": False,
            "use_rslora": use_rslora,
        }
        return cls.from_peft(peft, base)

    def _check_targets(self, path: Any) -> None:
        for other in _OTHER_MODULES:
            if self._targets(other):
                raise FormatError(f"adapter_config.json targets {other}: LoRA on embeddings or "
                                  "the output layer is not supported", path=path)
        if not self.modules():
            raise FormatError(f"adapter_config.json target_modules {self.target_modules!r} match "
                              f"no linear module of this {self.base.architecture} model",
                              path=path)

    # -- queries ----------------------------------------------------------------------------------

    def _targets(self, module: str) -> bool:
        """PEFT's ``check_target_module_exists`` for list and regex ``target_modules``."""
        t = self.target_modules
        if isinstance(t, str):
            if t == "all-linear":
                return module not in _OTHER_MODULES
            return re.fullmatch(t, module) is not None
        return module in t or any(module.endswith(f".{key}") for key in t)

    def modules(self) -> tuple[str, ...]:
        """Targeted module names (``model.layers.{l}.self_attn.q_proj``), layer-major."""
        return tuple(name for layer in range(self.base.num_layers) for leaf in LORA_LEAVES
                     if self._targets(name := module_name(layer, leaf)))

    def rank(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling(self, module: str) -> float:
        """PEFT's scaling of the module: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r = self.rank(module)
        return self.alpha(module) / (math.sqrt(r) if self.use_rslora else r)

    def schema(self) -> dict[str, Shape]:
        """Every logical adapter tensor with its shape, layer-major in module order."""
        out: dict[str, Shape] = {}
        for module in self.modules():
            _, leaf = split_module(module)
            rows, cols = module_shape(self.base, leaf)
            r = self.rank(module)
            out[module + ".lora_A.weight"] = (r, cols)
            out[module + ".lora_B.weight"] = (rows, r)
        return out

    def leaves_by_layer(self) -> list[tuple[str, ...]]:
        """The targeted leaf names of each layer."""
        per: list[list[str]] = [[] for _ in range(self.base.num_layers)]
        for module in self.modules():
            layer, leaf = split_module(module)
            per[layer].append(leaf)
        return [tuple(x) for x in per]

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content."""
        return dict(self.peft)

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for reports and ``inspect``."""
        ranks = sorted({self.rank(m) for m in self.modules()})
        return {"r": self.r, "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
                "ranks": ranks, "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern),
                "target_modules": sorted({split_module(m)[1] for m in self.modules()}),
                "modules": len(self.modules())}


# ------------------------------------------------------------------------------------------------
# Megatron LoRA layouts
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraLayout:
    """How an IR adapter sits in Megatron-Bridge's LoRA (``LoRA`` or ``CanonicalLoRA``).

    ``rank`` and ``alpha`` are Megatron's single ``dim`` and ``alpha``: every adapter computes
    ``(alpha / rank) · B @ A``. ``blocks[module] = (start, width)``: the module's A is rows
    ``[start, start + width)`` of its Megatron A and its B columns ``[start, start + width)`` of
    its Megatron B. Fused q/k/v (gate/up) with one shared A all start at 0; rank-stacked ones
    follow each other; the rest up to ``rank`` is zero padding. ``factors[module]`` multiplies
    the module's B when its own scaling differs from ``alpha / rank``.
    """

    style: str
    rank: int
    alpha: float
    blocks: Mapping[str, tuple[int, int]]
    factors: Mapping[str, float] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def factor(self, module: str) -> float:
        return self.factors.get(module, 1.0)

    def targets(self) -> list[str]:
        """Megatron-Bridge ``target_modules`` of this layout."""
        leaves = {split_module(m)[1] for m in self.blocks}
        if self.style == "canonical":
            return [CANONICAL_TARGETS[leaf] for leaf in LORA_LEAVES if leaf in leaves]
        return [g for g, members in MEGATRON_GROUPS.items() if leaves & set(members)]

    def to_json(self) -> dict[str, Any]:
        return {"style": self.style, "rank": self.rank, "alpha": _clean_number(self.alpha),
                "blocks": {m: list(b) for m, b in self.blocks.items()},
                "factors": dict(self.factors), "megatron_target_modules": self.targets()}

    @classmethod
    def from_json(cls, data: Any, *, path: Any = None) -> LoraLayout:
        def bad(message: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"LoRA layout: {message}", path=path)

        if not isinstance(data, Mapping):
            raise bad("not a JSON object")
        style, rank, alpha = data.get("style"), data.get("rank"), data.get("alpha")
        if style not in LORA_STYLES:
            raise bad(f"style must be one of {LORA_STYLES}, got {style!r}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise bad(f"rank must be a positive integer, got {rank!r}")
        if not _number(alpha):
            raise bad(f"alpha must be a finite number, got {alpha!r}")
        blocks, factors = data.get("blocks"), data.get("factors") or {}
        if not isinstance(blocks, Mapping) or not blocks:
            raise bad("blocks must map module names to [start, width]")
        out: dict[str, tuple[int, int]] = {}
        for module, b in blocks.items():
            if not (isinstance(b, list) and len(b) == 2 and all(
                    isinstance(x, int) and not isinstance(x, bool) for x in b)
                    and b[0] >= 0 and b[1] > 0 and b[0] + b[1] <= rank):
                raise bad(f"block of {module!r} must be [start, width] within the rank {rank}")
            try:
                split_module(module)
            except FormatError as e:
                raise bad(str(e)) from e
            out[module] = (b[0], b[1])
        if not isinstance(factors, Mapping) or not all(
                isinstance(k, str) and k in out and _number(v) and v != 0
                for k, v in factors.items()):
            raise bad("factors must map adapter modules to non-zero numbers")
        return cls(style, rank, float(alpha), MappingProxyType(out),
                   MappingProxyType({k: float(v) for k, v in factors.items()}))

    @classmethod
    def uniform(cls, style: str, modules: Iterable[str], rank: int, alpha: float) -> LoraLayout:
        """Every module at rank ``rank`` with the shared scaling: what Megatron-Bridge trains."""
        return cls(style, rank, float(alpha),
                   MappingProxyType({m: (0, rank) for m in modules}), MappingProxyType({}))


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def plan_lora_layout(adapter: AdapterConfig, *, style: str = "fused",
                     shared_groups: Mapping[str, bool] | None = None,
                     rank_multiple: int = 1) -> tuple[LoraLayout, list[str]]:
    """Place an IR adapter in Megatron's LoRA; returns the layout and notes for the report.

    ``shared_groups["linear_qkv"]`` says whether q/k/v have bit-identical A matrices in every
    layer (the adapter came from a fused Megatron LoRA); then they keep one A, else their ranks
    are stacked: ``A = [A_q; A_k; A_v]``, each B in its own rank columns, which reproduces every
    ``B_m @ A_m`` exactly. Every adapter is zero-padded to the largest rank (rounded up to
    ``rank_multiple``, e.g. the TP size of a per-rank destination), and ``alpha`` becomes
    ``scaling × rank`` so the scaling is unchanged.
    """
    if style not in LORA_STYLES:
        raise FormatError(f"LoRA style must be one of {', '.join(LORA_STYLES)}, not {style!r}")
    shared_groups = shared_groups or {}
    per_layer = adapter.leaves_by_layer()
    if len(set(per_layer)) > 1:
        raise FormatError("Megatron LoRA needs the same target modules in every layer; this "
                          f"adapter targets {sorted(set(per_layer))} in different layers")
    blocks: dict[str, tuple[int, int]] = {}
    notes: list[str] = []
    stacked_groups: dict[str, list[int]] = {}
    for layer, leaves in enumerate(per_layer):
        for group, members in MEGATRON_GROUPS.items():
            present = [leaf for leaf in members if leaf in leaves]
            if not present:
                continue
            modules = [module_name(layer, leaf) for leaf in present]
            ranks = [adapter.rank(m) for m in modules]
            if style == "canonical" or len(present) == 1:
                blocks.update((m, (0, r)) for m, r in zip(modules, ranks, strict=True))
            elif shared_groups.get(group, False) and len(set(ranks)) == 1:
                blocks.update((m, (0, ranks[0])) for m in modules)
            else:
                start = 0
                for m, r in zip(modules, ranks, strict=True):
                    blocks[m] = (start, r)
                    start += r
                stacked_groups.setdefault(group, ranks)
    need = max(start + width for start, width in blocks.values())
    multiple = max(1, rank_multiple)
    rank = -(-need // multiple) * multiple
    for group, ranks in stacked_groups.items():
        notes.append(f"{group}: {'/'.join(MEGATRON_GROUPS[group])} have different A matrices; "
                     f"ranks stacked ({' + '.join(map(str, ranks))} = {sum(ranks)})")
    scalings = {m: adapter.scaling(m) for m in blocks}
    counts = Counter(scalings.values())
    scaling = max(counts, key=lambda s: (counts[s], s))
    alpha = scaling * rank
    factors: dict[str, float] = {}
    for m, s in scalings.items():
        if s != scaling:
            factors[m] = s / scaling
    ranks_in = sorted({adapter.rank(m) for m in blocks})
    if rank != ranks_in[-1] or len(ranks_in) > 1 or alpha != adapter.lora_alpha:
        notes.append(f"Megatron LoRA rank {rank} (adapter ranks {ranks_in}), alpha "
                     f"{_clean_number(alpha)}: scaling alpha/rank = {scaling:g} as before")
    if adapter.use_rslora:
        notes.append("rsLoRA has no Megatron equivalent: alpha chosen so that alpha/rank equals "
                     "the adapter's alpha/sqrt(r)")
    if factors:
        exact = all(_is_power_of_two(f) for f in factors.values())
        kinds = sorted({f"{f:g}" for f in factors.values()})
        notes.append(f"{len(factors)} module(s) have their own scaling; their B carries the ratio "
                     f"({', '.join(kinds)}) to share Megatron's single scaling"
                     + ("" if exact else "; not a power of two, so B is rounded (not bit-exact)"))
    return LoraLayout(style, rank, alpha, MappingProxyType(blocks),
                      MappingProxyType(factors)), notes


# ------------------------------------------------------------------------------------------------
# ckpt-ir's layout file beside Megatron adapters
# ------------------------------------------------------------------------------------------------

LORA_LAYOUT_FILE = "ckpt_ir_lora.json"
"""Written beside Megatron LoRA tensors by ckpt-ir: the IR adapter config and the layout, so
rank-stacked adapters come back exactly as they were. Megatron-Bridge and verl ignore it; its
``layout.rank``, ``layout.alpha`` and ``layout.megatron_target_modules`` are the ``dim``,
``alpha`` and ``target_modules`` to give Bridge's ``LoRA`` / ``CanonicalLoRA``."""
_LAYOUT_FORMAT = "ckpt-ir megatron lora layout"


def lora_layout_json(adapter: AdapterConfig, layout: LoraLayout) -> dict[str, Any]:
    """The content of :data:`LORA_LAYOUT_FILE`."""
    return {"format": _LAYOUT_FORMAT, "version": 1, "peft_config": adapter.to_peft_dict(),
            "layout": layout.to_json()}


def from_lora_layout_json(data: Any, base: ModelConfig, *, path: Any = None
                          ) -> tuple[AdapterConfig, LoraLayout]:
    """Validate :data:`LORA_LAYOUT_FILE` content: the IR adapter config and its layout."""
    if not isinstance(data, Mapping) or data.get("format") != _LAYOUT_FORMAT:
        raise CorruptCheckpointError(f"{LORA_LAYOUT_FILE} is not a ckpt-ir LoRA layout file",
                                     path=path)
    if data.get("version") != 1:
        raise FormatError(f"{LORA_LAYOUT_FILE} version {data.get('version')!r} is not supported "
                          "(1 only)", path=path)
    adapter = AdapterConfig.from_peft(data.get("peft_config"), base, path=path)
    layout = LoraLayout.from_json(data.get("layout"), path=path)
    if set(layout.blocks) != set(adapter.modules()):
        raise CorruptCheckpointError(f"{LORA_LAYOUT_FILE}: the layout's modules are not the "
                                     "adapter's targeted modules", path=path)
    for module, (_, width) in layout.blocks.items():
        if width != adapter.rank(module):
            raise CorruptCheckpointError(f"{LORA_LAYOUT_FILE}: {module} has rank "
                                         f"{adapter.rank(module)}, its block {width}", path=path)
    return adapter, layout
