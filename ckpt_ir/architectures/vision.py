"""Reusable pieces of vision-language records: the text/vision split of a VL config, the
language-model prefix, and the transforms of vision towers and VL experts.

A VL record (:mod:`ckpt_ir.architectures.qwen_vl`) is a decoder LM plus a *tower*: tensors
outside the decoder layers, in the engine's ``{block}`` / ``{deepstack}`` axes, which Megatron
places on the first pipeline stage. The language model keeps the IR names of its text-only
family (``model.layers.{layer}.…``), so every existing row, adapter table and check applies;
only the names each format gives it change:

* ``hf``: transformers' ``model.language_model.`` prefix (where the family writes it), as
  :func:`lm_prefix_rows`;
* ``mcore``: Megatron-Bridge's ``language_model.`` module prefix, as :func:`prefixed`.

The tower's IR names are what transformers writes (``visual.*`` or ``model.visual.*``); each
family's ``mcore`` rows say where Megatron-Bridge keeps them. Other VL families (Gemma 3,
Mistral 3) can reuse all of this with rows of their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ckpt_ir.errors import InternalError
from ckpt_ir.table_engine import Row, one
from ckpt_ir.transforms import TENSOR, StackExperts, Transform

if TYPE_CHECKING:
    import torch

    from ckpt_ir.ir import ModelConfig, Shape

__all__ = [
    "LM_LAYER_SUFFIXES",
    "HubStackExperts",
    "InterleaveHeads",
    "lm_prefix_rows",
    "prefixed",
    "text_config_of",
    "vision_config_of",
]


def text_config_of(hf: Mapping[str, Any]) -> Mapping[str, Any]:
    """A VL config's ``text_config`` (or, in the hub's flat layout, its top level) with the
    top-level ``tie_word_embeddings``.

    Megatron-Bridge reads ``tie_word_embeddings`` from the top level: transformers gives
    ``text_config`` a default of its own that is wrong for untied models (architectures-wave2
    §3.1, §3.6). A missing or non-object ``text_config`` is a malformed config (ValueError).
    """
    text = hf.get("text_config")
    if text is None:
        # The hub's flat layout (Qwen2.5-VL's published configs): the text fields at the top
        # level, as transformers reads them when text_config is absent.
        text = {k: v for k, v in hf.items() if k != "vision_config"}
    if not isinstance(text, Mapping):
        raise ValueError("text_config must be an object (a vision-language config)")
    out = dict(text)
    if "tie_word_embeddings" in hf:
        out["tie_word_embeddings"] = hf["tie_word_embeddings"]
    return out


def vision_config_of(hf: Mapping[str, Any]) -> Mapping[str, Any]:
    vision = hf.get("vision_config")
    if not isinstance(vision, Mapping):
        raise ValueError("vision_config must be an object (a vision-language config)")
    return vision


@dataclass(frozen=True, slots=True)
class ModelPart:
    """One part of a VL model as ``inspect`` names it: its IR tensors (names starting with
    ``ir``), where Megatron keeps them (``megatron``) and its sizes (``detail``)."""

    name: str
    ir: str
    megatron: str
    detail: str
    # A vision part: a source tensor under its prefixes that the table does not map means the
    # config's sizes are not the part's (the language model's stray tensors are the planner's).
    tower: bool = True
    # How Megatron holds it (replicated, split over TP), for inspect.
    note: str = ""


def part_tensors(parts: Iterable[ModelPart], names: Iterable[str]) -> dict[str, list[str]]:
    """IR tensor names by part, each in the part with the longest matching prefix (the
    language model's ``model.`` holds ``model.visual.`` only when no tower part claims it)."""
    ordered = sorted(parts, key=lambda p: len(p.ir), reverse=True)
    out: dict[str, list[str]] = {p.name: [] for p in parts}
    for n in names:
        part = next((p for p in ordered if n.startswith(p.ir)), None)
        if part is not None:
            out[part.name].append(n)
    return out


def part_problem(config: ModelConfig, parts: Iterable[ModelPart], schema: Mapping[str, Shape],
                 natives: Mapping[str, tuple[str, Shape]], held: Mapping[str, Shape]
                 ) -> str | None:
    """One line on the first part of a multi-part model that a checkpoint lacks entirely, or
    whose tensors disagree with the config's sizes (a VL checkpoint without its vision tower;
    a ``vision_config`` that is not the tower's); None when every part is whole.

    ``natives``: IR name -> (the source's name for it, the shape the config implies there);
    ``held``: the source's tensors and their shapes. The planner then lists every problem;
    this names the cause once.
    """
    parts = list(parts)
    by_part = part_tensors(parts, schema)
    mapped = {native for native, _ in natives.values()}
    for part in parts:
        names = [n for n in by_part[part.name] if n in natives]
        if not names:
            continue
        present = [natives[n] for n in names if natives[n][0] in held]
        if not present:
            return (f"the {config.architecture} checkpoint has no {part.name}: none of its "
                    f"{len(names)} {part.ir}* tensors is there")
        for native, expected in present:
            if tuple(held[native]) != tuple(expected):
                return (f"the config disagrees with the checkpoint's {part.name}: {native} is "
                        f"{list(held[native])}, the config implies {list(expected)} "
                        f"({part.detail})")
        for native in held:
            if part.tower and native not in mapped and native.startswith((part.ir,
                                                                           part.megatron)):
                return (f"the config disagrees with the checkpoint's {part.name}: it holds "
                        f"{native}, which the config's {part.name} ({part.detail}) does not "
                        "have")
    return None


def peft_name(config: ModelConfig, name: str) -> str:
    """IR name -> the name of the same module / tensor in transformers' module tree, which
    PEFT adapters use (a VL model's ``model.language_model.layers.…`` for ``model.layers.…``;
    transformers 5 holds Qwen2.5-VL that way too, though it saves the legacy names)."""
    from ckpt_ir.architectures import lookup

    record = lookup(config.architecture)
    prefix = record.hf_module_prefix if record is not None else ""
    if prefix and name.startswith("model.") and not name.startswith(prefix):
        return prefix + name.removeprefix("model.")
    return name


def ir_name_of_peft(config: ModelConfig, name: str) -> str:
    """The inverse of :func:`peft_name`."""
    from ckpt_ir.architectures import lookup

    record = lookup(config.architecture)
    prefix = record.hf_module_prefix if record is not None else ""
    if prefix and name.startswith(prefix):
        return "model." + name.removeprefix(prefix)
    return name


def prefixed(rows: Iterable[Row], native: str) -> tuple[Row, ...]:
    """``rows`` with ``native`` before each native name (a module prefix, ``language_model.``)."""
    return tuple(replace(r, native=native + r.native) for r in rows)


# Every per-layer tensor of the text families the VL models embed (qwen2, qwen3, qwen3_moe):
# the hf prefix rows list them all; the engine keeps those the model's schema has.
LM_LAYER_SUFFIXES = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight", "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "mlp.gate.weight",
)


def lm_prefix_rows(hf_prefix: str, suffixes: Iterable[str] = LM_LAYER_SUFFIXES) -> tuple[Row, ...]:
    """``hf`` variant rows: the language model under ``hf_prefix`` (``model.language_model.``)
    on disk, under the text family's IR names (``model.``) in the IR."""
    layer = "layers.{layer}."
    return (
        Row(hf_prefix + "embed_tokens.weight", one("model.embed_tokens.weight")),
        *(Row(hf_prefix + layer + s, one("model." + layer + s)) for s in suffixes),
        Row(hf_prefix + "norm.weight", one("model.norm.weight")),
    )


@dataclass(frozen=True, slots=True)
class HubStackExperts(Transform):
    """:class:`StackExperts` with each expert transposed: the Qwen3-VL-MoE hub layout.

    The published Qwen3-VL-MoE files (transformers 4.57's parameters) hold
    ``mlp.experts.gate_up_proj`` as ``[E, H, 2F]`` (last dim: gate then up) and ``down_proj``
    as ``[E, F, H]``: the experts as ``x @ W``, not ``W @ x``. transformers 5 saves the
    transpose (:class:`StackExperts`); it loads both.
    """

    num_experts: int
    parts: tuple[str, ...] = (TENSOR,)

    @property
    def _stack(self) -> StackExperts:
        return StackExperts(self.num_experts, self.parts)

    @property
    def roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return self._stack.roles

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._stack.apply(parts).transpose(1, 2).contiguous()

    def slabs(self, parts: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        yield self.apply(parts)

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        if native.dim() != 3:
            raise InternalError(f"hub-layout experts have shape {tuple(native.shape)}, "
                                "expected [experts, in, out]")
        out = self._stack.inverse(native.transpose(1, 2))
        return {role: t.contiguous() for role, t in out.items()}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        e, rows, cols = self._stack.shapes(parts)
        return (e, cols, rows)

    def describe(self) -> str:
        return (f"HubStackExperts({self.num_experts} experts of [{'; '.join(self.parts)}], "
                "each transposed)")


@dataclass(frozen=True, slots=True)
class InterleaveHeads(Transform):
    """A vision tower's fused ``qkv`` ``[Q_all; K_all; V_all]`` (HF) as Megatron's per-head
    ``[q_h; k_h; v_h]`` rows (``linear_qkv`` of an attention with one head per group).

    Megatron-Bridge's ``ConcatenatedQKVMapping``: split the HF rows in three, then the QKV
    interleave with ``num_query_groups = num_attention_heads``. Weight ``[3·n·d, H]`` or
    bias ``[3·n·d]``.
    """

    heads: int
    head_dim: int

    def _check(self, t: torch.Tensor) -> None:
        if t.dim() < 1 or t.shape[0] != 3 * self.heads * self.head_dim:
            raise InternalError(f"fused qkv has shape {tuple(t.shape)}, expected "
                                f"{3 * self.heads * self.head_dim} rows")

    def apply(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        t = parts[TENSOR]
        self._check(t)
        return t.reshape(3, self.heads, self.head_dim, *t.shape[1:]).transpose(0, 1) \
            .reshape(t.shape)

    def inverse(self, native: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check(native)
        return {TENSOR: native.reshape(self.heads, 3, self.head_dim, *native.shape[1:])
                .transpose(0, 1).reshape(native.shape)}

    def shapes(self, parts: Mapping[str, Shape]) -> Shape:
        return tuple(parts[TENSOR])

    def describe(self) -> str:
        return f"InterleaveHeads({self.heads} heads of {self.head_dim})"
