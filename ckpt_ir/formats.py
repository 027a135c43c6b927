"""The format registry: one :class:`FormatSpec` per format, the only list of formats.

Every other list derives from :data:`REGISTRY`: :data:`FORMAT_NAMES` (``--from``, error
messages), :data:`WRITABLE_FORMATS` (``convert --to``, ``verify --via``),
:data:`PER_RANK_FORMATS`, :data:`ADAPTER_FORMATS`, and the order in which
:mod:`ckpt_ir.detect` asks the probes what a directory holds.

A spec names its reader and writer classes as strings and its probes are torch-free
(:mod:`ckpt_ir.probes`): ``ckpt-ir --help`` and argument errors read this module without
importing torch (``tests/cli/test_startup_imports.py``); a class is imported when it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckpt_ir.errors import FormatError
from ckpt_ir.probes import (
    RANK_DIR,
    dist_has_adapter,
    dist_key_kinds,
    has_mlm_rank_files,
    has_rank_dirs,
    has_verl_adapter_files,
    is_dcp_sharded_safetensors_dir,
    is_dist_dir,
    is_fsdp_dtensor_dir,
    is_hf_dir,
    is_peft_dir,
    is_plain_dcp_dir,
    verl_fsdp_key_kinds,
    verl_fsdp_layout,
)

__all__ = ["ADAPTER_FORMATS", "FORMATS", "FORMAT_NAMES", "PER_RANK_FORMATS", "REGISTRY",
           "WRITABLE_FORMATS", "FormatSpec", "adapter_reader_class", "adapter_writer_class",
           "reader_class", "spec", "writer_class"]

Probe = Callable[[Path], "str | None"]
"""A model probe: the layout text (shown by ``inspect``) when the directory holds this format
on its own, else None. Names and small files only; nothing unpickled, no torch."""


@dataclass(frozen=True, slots=True)
class FormatSpec:
    """One format: its id, its classes (``module:Class`` strings, imported on use), whether a
    parallel layout cuts it into per-rank files, and its probes."""

    id: str
    module: str | None = None
    reader: str | None = None
    writer: str | None = None
    adapter_module: str | None = None
    adapter_reader: str | None = None
    adapter_writer: str | None = None
    per_rank: bool = False
    probe: Probe | None = None
    adapter_probe: Callable[[Path], bool] | None = None
    # One line on what a directory of this format holds, for ``inspect``'s tree (None: not
    # this format); may say more than the probe (incomplete saves, what a torch_dist holds).
    describe: Probe | None = None
    # What a user is told when the probe finds this format and ckpt-ir has no reader for it.
    unsupported: str = ""

    @property
    def holds(self) -> frozenset[str]:
        """What the format can hold: ``"model"``, ``"adapter"``."""
        return frozenset(k for k, has in (("model", self.reader or self.writer),
                                          ("adapter", self.adapter_reader or self.adapter_writer))
                         if has)

    @property
    def supported(self) -> bool:
        return bool(self.holds)


def _mcore_layout(p: Path) -> str | None:
    if not is_dist_dir(p):
        return None
    return "megatron-bridge iter" if (p / "run_config.yaml").is_file() else "torch_dist directory"


def _hf_layout(p: Path) -> str | None:
    # An adapter directory with base weights beside it is an adapter (hf-peft's probe).
    if is_hf_dir(p) and not is_peft_dir(p):
        return "hf model directory"
    # torch's HuggingFaceStorageWriter(save_distributed=True): per-rank boxes of HF tensors,
    # read as hf by consolidating them (the config may have to come from --hf-config).
    if is_dcp_sharded_safetensors_dir(p):
        return "torch HF sharded safetensors (DCP_SHARDING_INFO)"
    return None


def _per_rank_layout(name: str, megatron_lm: bool) -> Probe:
    def probe(p: Path) -> str | None:
        if has_rank_dirs(p) and has_mlm_rank_files(p) == megatron_lm:
            return f"{name} per-rank files"
        return None
    return probe


def _describe_dist(c: Path) -> str | None:
    if is_plain_dcp_dir(c) or is_fsdp_dtensor_dir(c) \
            or not (is_dist_dir(c) or any(c.glob("*.distcp"))):
        return None
    if not (c / "metadata.json").is_file():
        return "torch_dist, INCOMPLETE (no metadata.json yet)"
    model, adapter = dist_key_kinds(c)
    if adapter:
        return "torch_dist model weights and LoRA adapters" if model else \
            "torch_dist LoRA adapters only (Megatron-Bridge keys), no base weights"
    return "torch_dist model weights" if model else \
        "torch_dist without model weights (optimizer / RNG)"


def _describe_rank_dirs(c: Path) -> str | None:
    if not has_rank_dirs(c):
        return None
    n = sum(1 for d in c.iterdir() if RANK_DIR.match(d.name))
    kind = "model_optim_rng.pt" if has_mlm_rank_files(c) else "model.pt"
    return f"per-rank model files ({n} mp_rank_* directories of {kind})"


REGISTRY: tuple[FormatSpec, ...] = (
    FormatSpec("hf", "ckpt_ir.converters.hf", "HfReader", "HfWriter", probe=_hf_layout,
               describe=lambda p: "HF weights, config and tokenizer" if is_hf_dir(p) else None),
    FormatSpec("hf-peft", adapter_module="ckpt_ir.converters.hf_peft",
               adapter_reader="HfPeftReader", adapter_writer="HfPeftWriter",
               probe=lambda p: "hf peft adapter" if is_peft_dir(p) else None,
               adapter_probe=is_peft_dir,
               describe=lambda p: "HF PEFT adapter" if is_peft_dir(p) else None),
    FormatSpec("mcore-dist", "ckpt_ir.converters.mcore_dist", "McoreDistReader", "McoreDistWriter",
               adapter_module="ckpt_ir.converters.mcore_dist",
               adapter_reader="McoreDistAdapterReader", adapter_writer="McoreDistAdapterWriter",
               probe=_mcore_layout, describe=_describe_dist,
               adapter_probe=lambda p: is_dist_dir(p) and dist_has_adapter(p)),
    FormatSpec("torch-dcp", "ckpt_ir.converters.torch_dcp", "TorchDcpReader", "TorchDcpWriter",
               probe=lambda p: "plain torch DCP directory (.metadata, no metadata.json, no "
                               "Megatron-Core or Megatron-FSDP keys)"
               if is_plain_dcp_dir(p) else None,
               describe=lambda p: "plain PyTorch DCP checkpoint (FSDP2 dcp.save, torchtitan, "
                                  "NeMo-RL)" if is_plain_dcp_dir(p) else None),
    FormatSpec("verl-legacy", "ckpt_ir.converters.verl_legacy", "VerlLegacyReader",
               "VerlLegacyWriter", adapter_module="ckpt_ir.converters.verl_adapter",
               adapter_reader="VerlAdapterReader", adapter_writer="VerlAdapterWriter",
               per_rank=True, probe=_per_rank_layout("verl-legacy", megatron_lm=False),
               adapter_probe=has_verl_adapter_files, describe=_describe_rank_dirs),
    FormatSpec("megatron-legacy", "ckpt_ir.converters.megatron_legacy", "MegatronLegacyReader",
               "MegatronLegacyWriter", per_rank=True,
               probe=_per_rank_layout("megatron-legacy", megatron_lm=True),
               describe=_describe_rank_dirs),
    FormatSpec("verl-fsdp", "ckpt_ir.converters.verl_fsdp", "VerlFsdpReader", "VerlFsdpWriter",
               adapter_module="ckpt_ir.converters.verl_fsdp",
               adapter_reader="VerlFsdpAdapterReader", probe=verl_fsdp_layout,
               adapter_probe=lambda p: verl_fsdp_key_kinds(p)[1], describe=verl_fsdp_layout),
    FormatSpec("megatron-fsdp", "ckpt_ir.converters.megatron_fsdp", "MegatronFsdpReader",
               probe=lambda p: "Megatron-FSDP fsdp_dtensor" if is_fsdp_dtensor_dir(p) else None,
               describe=lambda p: "Megatron-FSDP fsdp_dtensor checkpoint (model.module. keys, "
                                  "read only)" if is_fsdp_dtensor_dir(p) else None),
)

_BY_ID = {s.id: s for s in REGISTRY}

FORMAT_NAMES: tuple[str, ...] = tuple(s.id for s in REGISTRY if s.supported)
"""The formats ckpt-ir reads or writes (``--from``); detection may also name an unsupported
one, which it refuses with the spec's ``unsupported`` text."""

WRITABLE_FORMATS: tuple[str, ...] = (tuple(s.id for s in REGISTRY if s.writer)
                                     + tuple(s.id for s in REGISTRY
                                             if s.adapter_writer and not s.writer))
"""Destinations of ``convert --to`` and ``verify --via``: the model formats, then those that
hold only an adapter."""

PER_RANK_FORMATS: tuple[str, ...] = tuple(s.id for s in REGISTRY if s.per_rank)
"""Formats cut by a parallel layout (one file per model-parallel rank)."""

ADAPTER_FORMATS: tuple[str, ...] = tuple(s.id for s in REGISTRY if "adapter" in s.holds)
"""Formats that hold LoRA adapters, with their adapter reader and writer (ckpt_ir.adapter_api)."""

FORMATS: tuple[str, ...] = tuple(s.id for s in REGISTRY if "model" in s.holds)
"""Formats that hold a model."""


def spec(name: str) -> FormatSpec:
    """The spec of a known format (supported or not); FormatError for an unknown name."""
    found = _BY_ID.get(name)
    if found is None:
        raise FormatError(f"unknown format {name!r}; expected one of {', '.join(FORMAT_NAMES)}")
    return found


def _load(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


def adapter_reader_class(name: str) -> type:
    s = _BY_ID.get(name)
    if s is None or s.adapter_reader is None or s.adapter_module is None:
        raise FormatError(f"format {name!r} holds no LoRA adapters ckpt-ir can read; adapter "
                          f"formats: {', '.join(ADAPTER_FORMATS)}")
    return _load(s.adapter_module, s.adapter_reader)


def adapter_writer_class(name: str) -> type:
    s = _BY_ID.get(name)
    if s is None or s.adapter_writer is None or s.adapter_module is None:
        raise FormatError(f"format {name!r} cannot hold LoRA adapters; adapter formats: "
                          f"{', '.join(ADAPTER_FORMATS)}")
    return _load(s.adapter_module, s.adapter_writer)


def _model_spec(name: str) -> FormatSpec:
    known = _BY_ID.get(name)
    if known is not None and not known.supported:
        raise FormatError(f"format {name!r} is {known.unsupported}")
    if name not in FORMAT_NAMES:
        raise FormatError(f"unknown format {name!r}; expected one of {', '.join(FORMAT_NAMES)}")
    s = _BY_ID[name]
    if "model" not in s.holds and "adapter" in s.holds:
        raise FormatError(f"format {name!r} holds a LoRA adapter, not a model: use "
                          "extract-adapter, merge-adapter or convert --to hf-peft")
    return s


def reader_class(name: str) -> type:
    s = _model_spec(name)
    if s.reader is None or s.module is None:
        raise FormatError(f"format {name!r} cannot be read")
    return _load(s.module, s.reader)


def writer_class(name: str) -> type:
    s = _model_spec(name)
    if s.writer is None or s.module is None:
        raise FormatError(f"format {name!r} cannot be written")
    return _load(s.module, s.writer)
