"""The IR of a LoRA adapter, and the physical choices of Megatron's LoRA layouts.

An adapter in the IR is an :class:`AdapterConfig` (rank, alpha, rsLoRA, rank/alpha patterns and
target modules, after HF PEFT's ``LoraConfig``) over a base :class:`ModelConfig`, plus one pair of
logical tensors per targeted module, named like HF PEFT without the ``base_model.model.``
prefix::

    model.layers.{l}.self_attn.q_proj.lora_A.weight          [r, in]
    model.layers.{l}.self_attn.q_proj.lora_B.weight          [out, r]
    model.layers.{l}.mlp.experts.{e}.gate_proj.lora_A.weight  (MoE: per expert, as PEFT and
                                                              Megatron-Bridge's save_hf_adapter
                                                              name them)

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
from functools import cached_property
from types import MappingProxyType
from typing import Any

from ckpt_ir.architectures.vision import peft_name
from ckpt_ir.errors import CorruptCheckpointError, FormatError
from ckpt_ir.ir import ModelConfig, Shape

__all__ = [
    "ADAPTER_SUFFIXES",
    "EXPERTS_MODULE",
    "EXPERT_PARAMS",
    "LORA_LAYOUT_FILE",
    "LORA_LEAVES",
    "LORA_STYLES",
    "MEGATRON_GROUPS",
    "SITES",
    "AdapterConfig",
    "LoraLayout",
    "LoraModule",
    "base_modules",
    "from_lora_layout_json",
    "lora_layout_json",
    "module_of",
    "parameter_prefix",
    "parse_module",
    "plan_lora_layout",
]

# The linear modules of a decoder layer that LoRA can target, in module order. MoE experts
# and shared experts have the SwiGLU three (Mixtral's w1/w3/w2 are gate/up/down).
LORA_LEAVES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_MLP_LEAVES = ("gate_proj", "up_proj", "down_proj")

# Megatron's fused base layers and the HF modules they hold (Megatron-Bridge's
# MEGATRON_TO_HF_MODULES, verl's megatron_peft_utils).
MEGATRON_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
})
_GROUP_OF = {leaf: g for g, leaves in MEGATRON_GROUPS.items() for leaf in leaves}
# CanonicalLoRA's target names: one adapter per HF module.
CANONICAL_TARGETS: Mapping[str, str] = MappingProxyType({
    "q_proj": "linear_q", "k_proj": "linear_k", "v_proj": "linear_v", "o_proj": "linear_proj",
    "gate_proj": "linear_fc1_gate", "up_proj": "linear_fc1_up", "down_proj": "linear_fc2",
})
LORA_STYLES = ("fused", "canonical")

# Where a targetable module sits in its decoder layer, and the Megatron module prefix Bridge's
# LoRA wraps there (SequentialMLP experts: ``mlp.experts.local_experts.{k}``).
SITES: Mapping[str, str] = MappingProxyType({
    "attention": "self_attention", "mlp": "mlp", "experts": "mlp.experts.experts",
    "shared_experts": "mlp.shared_experts"})

# Megatron-Bridge target wildcards per site (its ModuleMatcher matches a module's full name).
_WILDCARDS = {"attention": "*.self_attention.{}", "mlp": "*.mlp.{}",
              "experts": "*.mlp.experts.*.{}", "shared_experts": "*.mlp.shared_experts.{}"}

# PEFT's LoRA on parameters (``target_parameters``, as peft 0.21 saves expert adapters on
# transformers 5): an MoE layer's routed experts are two 3-D parameters of
# ``model.layers.{l}.mlp.experts`` (Mixtral's too, whose files name them
# ``block_sparse_moe.experts.{e}.w1``), ``gate_up_proj`` [E, 2F, H] holding ``[gate; up]`` rows and
# ``down_proj`` [E, H, F], each adapted by one ParamWrapper whose A stacks the experts' A
# (``[E·r, in]``, expert-major rows) and whose B their B (``[out, E·r]``, column ``k·E + e`` is
# rank k of expert e: peft's ``get_delta_weight`` reshapes B as ``(out, r, E)``). In the IR
# these are the per-expert modules: gate and up share the fused A, B splits at row F.
EXPERT_PARAMS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)})
_PARAM_OF = {leaf: param for param, leaves in EXPERT_PARAMS.items() for leaf in leaves}
EXPERTS_MODULE = "model.layers.{layer}.mlp.experts"
"""transformers 5's module holding an MoE layer's fused expert parameters (every family)."""

ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_MODULE_RE = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.(?:self_attn\.(?P<attn>[qkvo]_proj)"
    r"|(?:mlp|block_sparse_moe)\.(?:experts\.(?P<expert>\d+)\.|(?P<shared>shared_experts?)\.)?"
    r"(?P<leaf>gate_proj|up_proj|down_proj|w[123]))$")
# Mixtral's expert names, as the SwiGLU roles (transformers' MixtralBlockSparseTop2MLP).
_MIXTRAL_LEAVES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# Modules of the model LoRA could name that Megatron-style adapters cannot express.
_OTHER_MODULES = ("lm_head", "model.embed_tokens")
# Multi-latent attention projections (DeepSeek-V3): Megatron-Bridge wraps linear_q_down_proj,
# linear_kv_up_proj, ... there; ckpt-ir has no rows for them.
_MLA_LEAVES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


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
    ("exclude_modules", None, "exclude_modules"),
    ("trainable_token_indices", None, "trainable_token_indices"),
    ("alora_invocation_tokens", None, "activated LoRA (alora_invocation_tokens)"),
    ("use_qalora", False, "QA-LoRA"),
    ("use_bdlora", None, "BD-LoRA"),
    ("kasa_config", None, "KaSA"),
    ("monteclora_config", None, "MonteCLoRA"),
    ("arrow_config", None, "Arrow routing"),
)


@dataclass(frozen=True, slots=True)
class LoraModule:
    """One LoRA-targetable linear module of the base model.

    ``leaf`` is its SwiGLU / attention role (``gate_proj`` for Mixtral's ``w1``); ``site`` is
    ``attention``, ``mlp`` (a dense MLP), ``experts`` (routed expert ``expert``) or
    ``shared_experts``. The modules fused into one Megatron adapter share ``unit``.
    """

    name: str
    layer: int
    site: str
    leaf: str
    expert: int | None = None

    @property
    def group(self) -> str:
        """The Megatron base layer holding it: ``linear_qkv``, ``linear_fc1``, ..."""
        return _GROUP_OF[self.leaf]

    @property
    def unit(self) -> tuple[int, str, int | None, str]:
        return (self.layer, self.site, self.expert, self.group)


def parse_module(module: str) -> LoraModule:
    """``"model.layers.3.mlp.experts.5.gate_proj"`` -> its :class:`LoraModule`."""
    m = _MODULE_RE.match(module)
    if not m:
        raise FormatError(f"{module!r} is not a LoRA-targetable module of a decoder layer")
    layer = int(m.group("layer"))
    if m.group("attn"):
        return LoraModule(module, layer, "attention", m.group("attn"))
    leaf, expert = m.group("leaf"), m.group("expert")
    mixtral = ".block_sparse_moe." in module
    if mixtral != (leaf in _MIXTRAL_LEAVES) or (mixtral and expert is None) or \
            (m.group("shared") and mixtral):
        raise FormatError(f"{module!r} is not a LoRA-targetable module of a decoder layer")
    leaf = _MIXTRAL_LEAVES.get(leaf, leaf)
    if expert is not None:
        return LoraModule(module, layer, "experts", leaf, int(expert))
    return LoraModule(module, layer, "shared_experts" if m.group("shared") else "mlp", leaf)


def parameter_prefix(param: str, targeted: Iterable[str]) -> str:
    """The module path under which PEFT saves the ParamWrapper of fused expert parameter
    ``param`` (``model.layers.3.mlp.experts.gate_up_proj``), given every targeted parameter:
    wrappers of one module nest, the outer one keeps the module's name and each inner one adds
    ``.base_layer``, deeper in the order of the parameter names (with both targeted,
    ``down_proj`` is ``...experts.lora_A`` and ``gate_up_proj`` ``...experts.base_layer.lora_A``,
    as peft 0.21 saves them and Megatron-Bridge's export writes them)."""
    module, _, _ = param.rpartition(".")
    siblings = sorted(t for t in targeted if t.rpartition(".")[0] == module)
    return module + ".base_layer" * siblings.index(param)


def module_name(layer: int, leaf: str) -> str:
    """``(3, "q_proj")`` -> ``"model.layers.3.self_attn.q_proj"`` (attention, dense MLP)."""
    return f"model.layers.{layer}.{_PARENT[leaf]}.{leaf}"


def module_of(ir_name: str) -> str:
    """The module an adapter IR tensor belongs to (``...q_proj.lora_A.weight`` -> ``...q_proj``)."""
    for suffix in ADAPTER_SUFFIXES:
        if ir_name.endswith(suffix):
            return ir_name[: -len(suffix)]
    raise FormatError(f"{ir_name!r} is not a LoRA A/B tensor name")


def split_module(module: str) -> tuple[int, str]:
    """``"model.layers.3.self_attn.q_proj"`` -> ``(3, "q_proj")`` (the leaf as its role)."""
    m = parse_module(module)
    return m.layer, m.leaf


def base_modules(config: ModelConfig) -> tuple[LoraModule, ...]:
    """Every module LoRA can target in ``config``'s decoder layers, layer-major in module order:
    attention (standard attention only), then the dense MLP, or each routed expert and the
    shared expert(s) (names from :data:`ckpt_ir.ir.MOE_NAMES`)."""
    out: list[LoraModule] = []
    names = config.moe_names
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        if not config.has_mla and not config.linear_attention_layers:
            out += [LoraModule(p + f"self_attn.{x}", layer, "attention", x)
                    for x in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if names is None or not config.is_moe_layer(layer):
            out += [LoraModule(p + f"mlp.{x}", layer, "mlp", x) for x in _MLP_LEAVES]
            continue
        for e in range(config.num_experts):
            x = p + names.expert.format(expert=e)
            out += [LoraModule(x + hf, layer, "experts", leaf, e)
                    for hf, leaf in ((names.gate, "gate_proj"), (names.up, "up_proj"),
                                     (names.down, "down_proj"))]
        if names.shared and config.shared_expert_intermediate_size:
            out += [LoraModule(p + names.shared + x, layer, "shared_experts", x)
                    for x in _MLP_LEAVES]
    return tuple(out)


def refused_modules(config: ModelConfig) -> dict[str, str]:
    """Linear modules of ``config`` a LoRA adapter may name but ckpt-ir cannot convert, with
    the reason: the embedding and output layer, the MoE router and shared-expert gate, and
    multi-latent attention."""
    out = {m: "LoRA on embeddings or the output layer is not supported"
           for m in _OTHER_MODULES}
    names = config.moe_names
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        if config.has_mla:
            out.update((p + f"self_attn.{x}", "LoRA on multi-latent attention (DeepSeek-V3 "
                        "q/kv projections, o_proj) is not supported; target the MLP modules")
                       for x in _MLA_LEAVES)
        if config.linear_attention_layers:
            # qwen3_next: a gated q_proj and Gated DeltaNet projections, whose Megatron LoRA
            # layout (Megatron-Bridge's) is not mapped here.
            out.update((p + m, "LoRA on qwen3_next's attention (gated q_proj, Gated DeltaNet "
                        "in_proj / out_proj) is not supported; target the MLP modules")
                       for m in (("linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba",
                                  "linear_attn.out_proj")
                                 if config.is_linear_attention_layer(layer) else
                                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                  "self_attn.o_proj")))
        if names is not None and config.is_moe_layer(layer):
            out[p + names.router.removesuffix(".weight")] = \
                "LoRA on the MoE router is not supported (Megatron-Bridge's LoRATopKRouter)"
            if names.shared_gate:
                out[p + names.shared_gate.removesuffix(".weight")] = \
                    "LoRA on the shared-expert gate is not supported"
    return out


def module_shape(config: ModelConfig, leaf: str, site: str = "mlp") -> tuple[int, int]:
    """``(out, in)`` of a base linear module (``site`` picks the MLP's FFN size)."""
    h = config.hidden_size
    f = {"experts": config.moe_intermediate_size,
         "shared_experts": config.shared_expert_intermediate_size}.get(
        site, config.intermediate_size)
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
    # PEFT target_parameters: fused expert parameters (``gate_up_proj``, ``down_proj``, or
    # longer suffixes of ``model.layers.{l}.mlp.experts.<param>``); see EXPERT_PARAMS.
    target_parameters: tuple[str, ...] = ()

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
        params = data.get("target_parameters") or ()
        if not isinstance(params, (list, tuple)) or not all(
                isinstance(t, str) and t for t in params):
            raise bad(f"target_parameters must be a list of parameter names, got "
                      f"{json.dumps(params)[:80]}")
        for t in params:
            if t.rpartition(".")[2] not in EXPERT_PARAMS:
                raise FormatError(f"{where}: target_parameters {t!r} is not supported (LoRA on "
                                  "parameters: the fused MoE expert parameters gate_up_proj and "
                                  "down_proj only)", path=path)
        if params and not base.is_moe:
            raise FormatError(f"{where}: target_parameters {list(params)} name fused expert "
                              f"parameters, but {base.architecture} has no experts", path=path)
        targets = data.get("target_modules")
        if params and (targets is None or targets == []):
            targets = ()  # LoRA on expert parameters only
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise bad(f"target_modules {targets!r} is not a valid pattern: {e}") from e
            target_modules: tuple[str, ...] | str = targets
        elif isinstance(targets, (list, tuple)) and (targets or params) and all(
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
                  target_modules=target_modules, peft=MappingProxyType(dict(data)),
                  target_parameters=tuple(params))
        cfg._check_targets(path)
        return cfg

    @classmethod
    def create(cls, base: ModelConfig, *, r: int, lora_alpha: float, leaves: Iterable[str] | str,
               use_rslora: bool = False, rank_pattern: Mapping[str, int] | None = None,
               alpha_pattern: Mapping[str, float] | None = None,
               base_model_name_or_path: str | None = None) -> AdapterConfig:
        """A new adapter config, written the way Megatron-Bridge's ``save_hf_adapter`` does:
        ``target_modules`` the sorted leaf names, or ``leaves`` itself when it is a module name
        pattern (adapters on some sites only, e.g. an MoE model's experts but not its shared
        expert)."""
        targets: list[str] | str = leaves if isinstance(leaves, str) else sorted(set(leaves))
        lm = peft_name(base, "model.layers.")
        if isinstance(targets, list) and lm != "model.layers.":
            # A VL model: leaf names alone would also adapt the vision tower's modules of the
            # same name (Qwen2.5-VL's gate_proj / up_proj / down_proj); only the LM's.
            targets = rf"{re.escape(lm)}\d+\..*\.({'|'.join(targets)})"
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
        for other, reason in refused_modules(self.base).items():
            if self._targets(other):
                raise FormatError(f"adapter_config.json targets {other}: {reason}", path=path)
        for t in self.target_parameters:
            if not any(self._targets_parameter(p) for p in self.parameter_groups()):
                raise FormatError(f"adapter_config.json target_parameters {t!r} match no fused "
                                  f"expert parameter of this {self.base.architecture} model",
                                  path=path)
        if not self.modules():
            raise FormatError(f"adapter_config.json target_modules {self.target_modules!r} match "
                              f"no linear module of this {self.base.architecture} model",
                              path=path)

    # -- queries ----------------------------------------------------------------------------------

    def _targets(self, module: str) -> bool:
        """PEFT's ``check_target_module_exists`` for list and regex ``target_modules`` (on the
        module's name in transformers' tree: a VL model's ``model.language_model.…``)."""
        module = peft_name(self.base, module)
        t = self.target_modules
        if isinstance(t, str):
            if t == "all-linear":
                return module not in _OTHER_MODULES
            return re.fullmatch(t, module) is not None
        return module in t or any(module.endswith(f".{key}") for key in t)

    def _targets_parameter(self, key: str) -> bool:
        """PEFT's match of ``target_parameters`` against a parameter's full name."""
        key = peft_name(self.base, key)
        return any(key == t or key.endswith(f".{t}") for t in self.target_parameters)

    def parameter_of(self, m: LoraModule) -> str | None:
        """The fused expert parameter (``model.layers.3.mlp.experts.gate_up_proj``) whose
        ParamWrapper holds routed expert module ``m``'s adapter, when this adapter targets
        parameters; None for modules adapted as modules."""
        if not self.target_parameters or m.site != "experts":
            return None
        return f"{EXPERTS_MODULE.format(layer=m.layer)}.{_PARAM_OF[m.leaf]}"

    def _targets_module(self, m: LoraModule) -> bool:
        # With target_parameters (a model whose experts are fused parameters, transformers 5),
        # routed experts are adapted through their parameters only: target_modules then match
        # real linear modules (attention, shared experts, dense MLPs), as in peft.
        param = self.parameter_of(m)
        return self._targets_parameter(param) if param is not None else self._targets(m.name)

    @cached_property
    def _targeted(self) -> Mapping[str, LoraModule]:
        return MappingProxyType({m.name: m for m in base_modules(self.base)
                                 if self._targets_module(m)})

    def parameter_groups(self) -> dict[str, list[LoraModule]]:
        """Targeted fused expert parameters, each with its modules in expert order (gate, up
        of expert 0, then expert 1, ...): what one ParamWrapper's A and B hold."""
        out: dict[str, list[LoraModule]] = {}
        for m in self._targeted.values():
            param = self.parameter_of(m)
            if param is not None:
                out.setdefault(param, []).append(m)
        for members in out.values():
            members.sort(key=lambda m: (m.expert, LORA_LEAVES.index(m.leaf)))
        return out

    def _pattern_name(self, module: str) -> str:
        """The name PEFT looks rank_pattern / alpha_pattern up with: the module's, or for an
        expert adapted through its fused parameter, the parameter's."""
        m = self._targeted.get(module)
        param = self.parameter_of(m) if m is not None else None
        return peft_name(self.base, param if param is not None else module)

    def modules(self) -> tuple[str, ...]:
        """Targeted module names (``model.layers.{l}.self_attn.q_proj``,
        ``model.layers.{l}.mlp.experts.{e}.gate_proj``), layer-major in module order."""
        return tuple(self._targeted)

    def module(self, name: str) -> LoraModule:
        """The :class:`LoraModule` of a targeted module name."""
        found = self._targeted.get(name)
        if found is None:
            raise FormatError(f"{name!r} is not a module this adapter targets")
        return found

    def rank(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, self._pattern_name(module))
        return self.rank_pattern[key] if key is not None else self.r

    def alpha(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, self._pattern_name(module))
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling(self, module: str) -> float:
        """PEFT's scaling of the module: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r = self.rank(module)
        return self.alpha(module) / (math.sqrt(r) if self.use_rslora else r)

    def schema(self) -> dict[str, Shape]:
        """Every logical adapter tensor with its shape, layer-major in module order."""
        out: dict[str, Shape] = {}
        for name, m in self._targeted.items():
            rows, cols = module_shape(self.base, m.leaf, m.site)
            r = self.rank(name)
            out[name + ".lora_A.weight"] = (r, cols)
            out[name + ".lora_B.weight"] = (rows, r)
        return out

    def units(self) -> dict[tuple[int, str, int | None, str], list[LoraModule]]:
        """Targeted modules by Megatron adapter: one per (layer, site, expert, fused base
        layer), its modules in module order (q, k, v; gate, up)."""
        out: dict[tuple[int, str, int | None, str], list[LoraModule]] = {}
        for m in self._targeted.values():
            out.setdefault(m.unit, []).append(m)
        return out

    def check_uniform(self) -> None:
        """Refuse what Megatron-Bridge's LoRA cannot hold: it wraps a module name in every
        layer and every expert, so each layer of a kind (dense / MoE) and each routed expert of
        a layer must have the same targets (torch_dist stacks them on one key)."""
        per_layer: dict[int, set[tuple[str, str]]] = {}
        per_expert: dict[tuple[int, int], set[str]] = {}
        for m in self._targeted.values():
            per_layer.setdefault(m.layer, set()).add((m.site, m.leaf))
            if m.expert is not None:
                per_expert.setdefault((m.layer, m.expert), set()).add(m.leaf)
        experts_of: dict[int, dict[int, frozenset[str]]] = {}
        for (layer, expert), leaves in per_expert.items():
            experts_of.setdefault(layer, {})[expert] = frozenset(leaves)
        for layer, experts in experts_of.items():
            if len(experts) != self.base.num_experts or len(set(experts.values())) > 1:
                raise FormatError("Megatron LoRA wraps every expert alike; this adapter targets "
                                  f"different modules in the experts of layer {layer}")
        by_kind: dict[bool, set[frozenset[tuple[str, str]]]] = {}
        for layer in range(self.base.num_layers):
            by_kind.setdefault(self.base.is_moe and self.base.is_moe_layer(layer), set()).add(
                frozenset(per_layer.get(layer, ())))
        for kind, signatures in by_kind.items():
            if len(signatures) > 1:
                shown = sorted(sorted(f"{site}.{leaf}" for site, leaf in sig)
                               for sig in signatures)
                what = "MoE layers" if kind else ("dense layers" if self.base.is_moe
                                                  else "layers")
                raise FormatError("Megatron LoRA needs the same target modules in every layer "
                                  f"of a kind; this adapter targets {shown} in different "
                                  f"{what}")

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content."""
        return dict(self.peft)

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for reports and ``inspect``."""
        ranks = sorted({self.rank(m) for m in self.modules()})
        return {"r": self.r, "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
                "ranks": ranks, "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern),
                "target_modules": sorted({m.rpartition(".")[2] for m in self.modules()}),
                "modules": len(self.modules()),
                "target_parameters": sorted({p.rpartition(".")[2]
                                             for p in self.parameter_groups()})}


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

    def targets(self, config: ModelConfig | None = None) -> list[str]:
        """Megatron-Bridge ``target_modules`` of this layout: module names (Bridge wraps every
        module of that name), or, when ``config`` shows that only some of the model's modules of
        a name carry adapters (an MoE model's experts but not its shared expert), Bridge
        wildcards naming the sites (``*.mlp.experts.*.linear_fc1``)."""
        def name(m: LoraModule) -> str:
            return CANONICAL_TARGETS[m.leaf] if self.style == "canonical" else m.group

        order = list(dict.fromkeys(
            CANONICAL_TARGETS[x] if self.style == "canonical" else _GROUP_OF[x]
            for x in LORA_LEAVES))
        have: dict[str, set[str]] = {}
        for module in self.blocks:
            m = parse_module(module)
            have.setdefault(name(m), set()).add(m.site)
        every: dict[str, set[str]] = {}
        for m in base_modules(config) if config is not None else ():
            every.setdefault(name(m), set()).add(m.site)
        out: list[str] = []
        for target in order:
            sites = have.get(target)
            if not sites:
                continue
            if config is None or sites >= every.get(target, set()):
                out.append(target)
            else:
                out += [_WILDCARDS[site].format(target) for site in SITES if site in sites]
        return out

    def to_json(self, config: ModelConfig | None = None) -> dict[str, Any]:
        return {"style": self.style, "rank": self.rank, "alpha": _clean_number(self.alpha),
                "blocks": {m: list(b) for m, b in self.blocks.items()},
                "factors": dict(self.factors),
                "megatron_target_modules": self.targets(config)}

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
    adapter.check_uniform()
    units = adapter.units()
    if style == "canonical" and any(site in ("experts", "shared_experts")
                                    for _, site, _, _ in units):
        raise FormatError("CanonicalLoRA adapters on MoE experts are not supported (their "
                          "Megatron-Bridge layout is not confirmed here); use the fused LoRA "
                          "style")
    blocks: dict[str, tuple[int, int]] = {}
    notes: list[str] = []
    stacked_groups: dict[str, list[int]] = {}
    for (_, _, _, group), members in units.items():
        modules = [m.name for m in members]
        ranks = [adapter.rank(m) for m in modules]
        if style == "canonical" or len(modules) == 1:
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
            "layout": layout.to_json(adapter.base)}


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
