"""Format name -> reader and writer classes, imported lazily so the CLI starts fast."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ckpt_ir.detect import FORMAT_NAMES
from ckpt_ir.errors import FormatError

__all__ = ["FORMATS", "reader_class", "writer_class"]


@dataclass(frozen=True, slots=True)
class FormatEntry:
    module: str
    reader: str | None
    writer: str | None


FORMATS: dict[str, FormatEntry] = {
    "hf": FormatEntry("ckpt_ir.converters.hf", "HfReader", "HfWriter"),
    "mcore-dist": FormatEntry("ckpt_ir.converters.mcore_dist", "McoreDistReader",
                              "McoreDistWriter"),
}


def _entry(name: str) -> FormatEntry:
    if name not in FORMAT_NAMES:
        raise FormatError(f"unknown format {name!r}; expected one of {', '.join(FORMAT_NAMES)}")
    entry = FORMATS.get(name)
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
