"""Typed writer options: what a conversion asks of the destination beyond the plan.

Every writer takes one :class:`WriteOptions`. Its fields are typed and checked once, when the
options are built, so a writer reads ``options.layout`` or ``options.adapter.lora_layout``
without re-checking what it got. The choices that name a variant (layer spec, expert layout)
are string literals because they are what users type (``--mcore-spec te``); the tuples below are
the only lists of their values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ckpt_ir.adapters import AdapterConfig, LoraLayout
from ckpt_ir.dtypes import DType
from ckpt_ir.errors import FormatError, InternalError
from ckpt_ir.layout import ParallelLayout
from ckpt_ir.tables import NativeParams

__all__ = ["EXPERT_LAYOUTS", "HF_EXPERT_LAYOUTS", "MCORE_SPECS", "QUANTIZE_METHODS",
           "AdapterTarget", "ExpertLayout", "HfExperts", "McoreSpec", "Quantize", "VerlTree",
           "WriteOptions"]

McoreSpec = Literal["te", "local", "any"]
MCORE_SPECS: tuple[McoreSpec, ...] = ("te", "local", "any")
"""Megatron-Core layer spec whose norm names and ``_extra_state`` keys a writer uses; ``any``
keeps the source's (per-rank) or writes both (torch_dist)."""

HfExperts = Literal["per-expert", "fused"]
HF_EXPERT_LAYOUTS: tuple[HfExperts, ...] = ("per-expert", "fused")
"""``hf_experts``: what transformers writes, or its in-memory stacked layout."""

Quantize = Literal["fp8"]
QUANTIZE_METHODS: tuple[Quantize, ...] = ("fp8",)
"""``quantize``: what the hf writer re-quantizes to (block FP8 e4m3, the releases' format)."""

ExpertLayout = Literal["sequential", "grouped"]
EXPERT_LAYOUTS: tuple[ExpertLayout, ...] = ("sequential", "grouped")
"""``mcore_experts``: SequentialMLP (``local_experts.{k}.linear_fc1.weight``) or TEGroupedMLP
(``linear_fc1.weight{k}``)."""


@dataclass(frozen=True, slots=True)
class VerlTree:
    """An ``mcore-dist`` destination that is a verl 0.9.1 role directory
    (``global_step_N/actor``): its role and the step its parent directory names."""

    role: str = "actor"
    step: int | None = None


@dataclass(frozen=True, slots=True)
class AdapterTarget:
    """What an adapter writer writes: the IR adapter, and for Megatron namings (``mcore-lora``)
    the Megatron LoRA layout its A/B matrices take (shared or rank-stacked A, rank, alpha)."""

    adapter: AdapterConfig
    lora_layout: LoraLayout | None = None

    def require_lora_layout(self, writer: str) -> LoraLayout:
        """The Megatron layout, which the orchestration always plans for ``mcore-lora``
        destinations; its absence is a ckpt-ir bug, not bad input."""
        if self.lora_layout is None:
            raise InternalError(f"the {writer} writer needs a Megatron LoRA layout")
        return self.lora_layout


@dataclass(frozen=True)
class WriteOptions:
    """Options a writer takes; each field applies to the writers its comment names and is
    ignored by the others.

    The variant fields are validated here, once, so that a bad value is refused before any
    reader is opened.
    """

    dtype: DType | None = None
    pad_vocab_to_multiple: int | None = None
    max_shard_bytes: int = 5 * 1000**3
    trust_pickles: bool = False
    # Several processes writing one checkpoint (torchrun): this process's place among them.
    rank: int = 0
    world_size: int = 1
    # Per-rank writers: the destination's parallel layout (None: TP=1, PP=1).
    layout: ParallelLayout | None = None
    # Megatron writers (mcore-dist, per-rank).
    mcore_spec: McoreSpec = "any"
    # hf writer, MoE models.
    hf_experts: HfExperts = "per-expert"
    # Per-rank writers, MoE models; None: grouped for the TE spec, sequential for the local one.
    mcore_experts: ExpertLayout | None = None
    # The source's physical choices (padded vocabulary, layer spec), which per-rank writers
    # keep unless told otherwise.
    source_params: NativeParams | None = None
    # mcore-dist writer: write a verl role directory around the torch_dist files.
    verl_tree: VerlTree | None = None
    # Adapter writers (hf-peft, mcore-dist and verl-legacy adapters).
    adapter: AdapterTarget | None = None
    # torch-dcp writer: torchtitan's checkpointer layout (step-0/ with torchtitan FQNs)
    # instead of a DCP directory of HF names.
    torchtitan: bool = False
    # verl-fsdp writer: how many model_world_size_W_rank_r.pt files (the FSDP world size of
    # the job that will load them); None: 1.
    fsdp_world_size: int | None = None
    # hf writer: "fp8" re-quantizes linear weights to block FP8 (docs/quantized.md).
    quantize: Quantize | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_METHODS:
            raise FormatError(f"quantize must be one of {', '.join(QUANTIZE_METHODS)}, not "
                              f"{self.quantize!r}")
        if self.mcore_spec not in MCORE_SPECS:
            raise FormatError(f"mcore_spec must be one of {', '.join(MCORE_SPECS)}, not "
                              f"{self.mcore_spec!r}")
        if self.hf_experts not in HF_EXPERT_LAYOUTS:
            raise FormatError(f"hf_experts must be one of {', '.join(HF_EXPERT_LAYOUTS)}, "
                              f"not {self.hf_experts!r}")
        if self.mcore_experts is not None and self.mcore_experts not in EXPERT_LAYOUTS:
            raise FormatError(f"mcore_experts must be one of {', '.join(EXPERT_LAYOUTS)}, not "
                              f"{self.mcore_experts!r}")
        if self.fsdp_world_size is not None and (type(self.fsdp_world_size) is not int
                                                 or self.fsdp_world_size < 1):
            raise FormatError(f"world size must be a positive integer, not "
                              f"{self.fsdp_world_size!r}")
        if self.layout is not None and not isinstance(self.layout, ParallelLayout):
            raise InternalError(f"layout option is a {type(self.layout).__name__}, not a "
                                "ParallelLayout")

    @property
    def parallel_layout(self) -> ParallelLayout:
        """The destination layout of a per-rank writer (TP=1, PP=1 when none was given)."""
        return self.layout if self.layout is not None else ParallelLayout()

    def require_adapter(self, writer: str) -> AdapterTarget:
        """The adapter an adapter writer writes; the orchestration always sets it for adapter
        destinations, so its absence is a ckpt-ir bug."""
        if self.adapter is None:
            raise InternalError(f"the {writer} writer needs options.adapter")
        return self.adapter
