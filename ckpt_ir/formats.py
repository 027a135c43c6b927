"""Format name -> reader and writer classes, imported lazily so the CLI starts fast."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ckpt_ir.detect import FORMAT_NAMES
from ckpt_ir.errors import FormatError

__all__ = ["ADAPTER_FORMATS", "FORMATS", "PER_RANK_FORMATS", "adapter_reader_class",
           "adapter_writer_class", "reader_class", "writer_class"]


@dataclass(frozen=True, slots=True)
class FormatEntry:
    module: str
    reader: str | None
    writer: str | None


FORMATS: dict[str, FormatEntry] = {
    "hf": FormatEntry("ckpt_ir.converters.hf", "HfReader", "HfWriter"),
    "mcore-dist": FormatEntry("ckpt_ir.converters.mcore_dist", "McoreDistReader",
                              "McoreDistWriter"),
    "verl-legacy": FormatEntry("ckpt_ir.converters.verl_legacy", "VerlLegacyReader",
                               "VerlLegacyWriter"),
    "megatron-legacy": FormatEntry("ckpt_ir.converters.megatron_legacy",
                                   "MegatronLegacyReader", "MegatronLegacyWriter"),
}

PER_RANK_FORMATS = ("verl-legacy", "megatron-legacy")
"""Formats cut by a parallel layout (one file per model-parallel rank)."""

ADAPTER_FORMATS: dict[str, FormatEntry] = {
    "hf-peft": FormatEntry("ckpt_ir.converters.hf_peft", "HfPeftReader", "HfPeftWriter"),
    "mcore-dist": FormatEntry("ckpt_ir.converters.mcore_dist", "McoreDistAdapterReader",
                              "McoreDistAdapterWriter"),
    "verl-legacy": FormatEntry("ckpt_ir.converters.verl_adapter", "VerlAdapterReader",
                               "VerlAdapterWriter"),
}
"""Formats that hold LoRA adapters, with their adapter reader and writer (ckpt_ir.adapter_api)."""


def adapter_reader_class(name: str) -> type:
    entry = ADAPTER_FORMATS.get(name)
    if entry is None or entry.reader is None:
        raise FormatError(f"format {name!r} holds no LoRA adapters ckpt-ir can read; adapter "
                          f"formats: {', '.join(ADAPTER_FORMATS)}")
    return getattr(importlib.import_module(entry.module), entry.reader)


def adapter_writer_class(name: str) -> type:
    entry = ADAPTER_FORMATS.get(name)
    if entry is None or entry.writer is None:
        raise FormatError(f"format {name!r} cannot hold LoRA adapters; adapter formats: "
                          f"{', '.join(ADAPTER_FORMATS)}")
    return getattr(importlib.import_module(entry.module), entry.writer)


def _entry(name: str) -> FormatEntry:
    if name not in FORMAT_NAMES:
        raise FormatError(f"unknown format {name!r}; expected one of {', '.join(FORMAT_NAMES)}")
    entry = FORMATS.get(name)
    if entry is None and name in ADAPTER_FORMATS:
        raise FormatError(f"format {name!r} holds a LoRA adapter, not a model: use "
                          "extract-adapter, merge-adapter or convert --to hf-peft")
    if entry is None:
        raise FormatError(f"format {name!r} is not supported by this version of ckpt-ir yet")
    return entry


def reader_class(name: str) -> type:
    entry = _entry(name)
    if entry.reader is None:
        raise FormatError(f"format {name!r} cannot be read")
    return getattr(importlib.import_module(entry.module), entry.reader)


def writer_class(name: str) -> type:
    entry = _entry(name)
    if entry.writer is None:
        raise FormatError(f"format {name!r} cannot be written")
    return getattr(importlib.import_module(entry.module), entry.writer)
