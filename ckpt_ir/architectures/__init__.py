"""The architecture records, by HF ``model_type``: the one list of supported architectures.

Adding an architecture = one module here with its :class:`Architecture` record (reusing the
row builders of a related family), one line in :data:`REGISTRY`, and its tests. Order matters
only for documentation (docs/architectures.md follows it).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ckpt_ir.architectures.deepseek_v3 import DEEPSEEK_V3
from ckpt_ir.architectures.dense import LLAMA, MISTRAL, QWEN2, QWEN3
from ckpt_ir.architectures.dsa import DEEPSEEK_V32, GLM_MOE_DSA
from ckpt_ir.architectures.gemma import GEMMA2, GEMMA3_TEXT
from ckpt_ir.architectures.glm4_moe import GLM4_MOE, GLM4_MOE_LITE
from ckpt_ir.architectures.gpt_oss import GPT_OSS
from ckpt_ir.architectures.ministral3 import MINISTRAL3
from ckpt_ir.architectures.mixtral import MIXTRAL
from ckpt_ir.architectures.olmo2 import OLMO2
from ckpt_ir.architectures.phi3 import PHI3
from ckpt_ir.architectures.qwen3_next import QWEN3_NEXT
from ckpt_ir.architectures.qwen_moe import QWEN2_MOE, QWEN3_MOE
from ckpt_ir.architectures.qwen_vl import QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE
from ckpt_ir.architectures.record import Architecture, MoeNames, megatron_arg
from ckpt_ir.architectures.seed_oss import SEED_OSS
from ckpt_ir.architectures.vl_passthrough import GEMMA3, MISTRAL3
from ckpt_ir.errors import FormatError

__all__ = ["ARCHITECTURES", "MOE_NAMES", "REGISTRY", "TABLES", "Architecture", "MoeNames",
           "architecture", "guess_from_megatron", "lookup"]


def _registry(*records: Architecture) -> Mapping[str, Architecture]:
    out: dict[str, Architecture] = {}
    for r in records:
        if r.name in out:
            raise ValueError(f"architecture {r.name!r} registered twice")
        out[r.name] = r
    return MappingProxyType(out)


REGISTRY: Mapping[str, Architecture] = _registry(
    LLAMA, MISTRAL, QWEN2, QWEN3, MIXTRAL, QWEN2_MOE, QWEN3_MOE, DEEPSEEK_V3, SEED_OSS,
    GLM4_MOE, GLM4_MOE_LITE, DEEPSEEK_V32, GLM_MOE_DSA,
    GPT_OSS, QWEN3_NEXT,
    PHI3, OLMO2, GEMMA2, GEMMA3_TEXT, MINISTRAL3,
    QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE,
    GEMMA3, MISTRAL3)

ARCHITECTURES: tuple[str, ...] = tuple(REGISTRY)

TABLES: Mapping[str, Mapping[str, tuple]] = MappingProxyType(
    {name: r.tables for name, r in REGISTRY.items()})
"""Architecture string -> naming -> rows (the records' tables)."""

MOE_NAMES: Mapping[str, MoeNames] = MappingProxyType(
    {name: r.moe for name, r in REGISTRY.items() if r.moe is not None})
"""Where each MoE family keeps its expert tensors."""


_GUESSES = tuple(sorted((r for r in REGISTRY.values() if r.megatron_guess is not None),
                        key=lambda r: (r.megatron_guess or (0,))[0]))


def guess_from_megatron(args: Mapping[str, Any], *, moe: bool) -> str:
    """The family Megatron arguments that name none describe (records' ``megatron_guess``):
    with experts, MLA means deepseek_v3, a shared expert qwen2_moe, QK norm qwen3_moe,
    otherwise mixtral; dense, QK norm means qwen3, a QKV bias qwen2, otherwise llama."""
    for r in _GUESSES:
        if r.is_moe == moe and all(megatron_arg(args, a, default=False)
                                   for a in (r.megatron_guess or (0, ()))[1]):
            return r.name
    raise FormatError("the Megatron arguments match no architecture; name one")


def lookup(name: object) -> Architecture | None:
    """The record of ``name`` (an HF ``model_type``), or None."""
    return REGISTRY.get(name) if isinstance(name, str) else None


# Checkpoints whose language model has a record but which hold more (a vision tower and its
# projector): refused with what is supported instead (docs/architecture.md). None today:
# gemma3 and mistral3 have records (vl_passthrough).
UNSUPPORTED_HINTS: Mapping[str, str] = MappingProxyType({})


def architecture(name: object) -> Architecture:
    """The record of ``name``; FormatError naming the supported ones otherwise."""
    record = lookup(name)
    if record is None:
        hint = UNSUPPORTED_HINTS.get(name) if isinstance(name, str) else None
        raise FormatError(
            f"unsupported architecture {name!r}; supported: {', '.join(ARCHITECTURES)}"
            + (f" ({hint})" if hint else ""))
    return record
