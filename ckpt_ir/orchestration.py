"""What every public operation does around a plan: find the source, open its reader, choose
the destination's layout, count progress, report.

The public functions (``ckpt_ir.api`` for models, ``ckpt_ir.adapter_api`` for LoRA adapters,
the CLI commands) sit above this module and below nothing else of theirs: this module imports
neither of them, so there is no cycle between them.

This is the layer that knows formats by name (through :mod:`ckpt_ir.formats` and
:mod:`ckpt_ir.detect`): whether a source holds a model or an adapter, which formats are per-rank
(they alone take a parallel layout), which writer to open. The core below it (ir, transforms,
tables, planner, executor, layout) sees namings and physical choices, never a format.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ckpt_ir import dtypes
from ckpt_ir.capabilities import DequantizingReader, LayoutReader, SlabWriter
from ckpt_ir.detect import Resolved, dist_key_kinds, resolve, resolve_adapter
from ckpt_ir.errors import CheckpointError, FormatError
from ckpt_ir.formats import PER_RANK_FORMATS, adapter_reader_class, reader_class, writer_class
from ckpt_ir.ir import TensorSpec
from ckpt_ir.layout import ParallelLayout
from ckpt_ir.options import WriteOptions
from ckpt_ir.planner import DestView, Plan, SourceView, make_plan
from ckpt_ir.probes import verl_fsdp_key_kinds
from ckpt_ir.quantization import is_fp8_linear, target_quantization

__all__ = ["LayoutRequest", "Report", "Source", "adapter_source", "carried_notes", "is_checkpoint",
           "open_adapter_reader", "open_reader", "parse_size", "plan_conversion",
           "progress_counter", "quantization_notes", "resolve_source", "source_layout",
           "target_layout"]


@dataclass
class Report:
    """What a conversion did (or, with ``dry_run``, would do)."""

    source: str
    destination: str
    source_format: str
    dest_format: str
    source_layout: str
    architecture: str
    dry_run: bool
    tensors_written: int
    bytes_read: int
    bytes_written: int
    peak_bytes_estimate: int
    seconds: float
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    dest_layout: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_size(value: int | str) -> int:
    """Bytes of ``5GB``, ``500MiB``, ``1234`` (or an int as it is)."""
    if isinstance(value, int):
        return value
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
             "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4, "B": 1}
    text = value.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * units[unit])
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise FormatError(f"cannot parse size {value!r} (e.g. 5GB, 500MiB)") from None


# ------------------------------------------------------------------------------------------------
# The source: a model or an adapter, resolved once


@dataclass(frozen=True)
class Source:
    """Where the checkpoint of ``src`` is, and whether it is read as a LoRA adapter."""

    resolved: Resolved
    adapter: bool


def _adapter_only(src: str | os.PathLike, resolved: Resolved) -> Resolved | None:
    """The adapter's place when the resolved source holds an adapter and no base model."""
    if resolved.format == "hf-peft":
        return resolve_adapter(src)
    if resolved.format == "mcore-dist":
        model, adapter = dist_key_kinds(resolved.path)
        if adapter and not model:
            return resolve_adapter(src)
    if resolved.format == "verl-fsdp":
        model, adapter = verl_fsdp_key_kinds(resolved.path)
        if adapter and not model:  # checkpoint.save_lora_only
            return resolve_adapter(src)
    return None


def adapter_source(src: str | os.PathLike) -> Resolved | None:
    """Where the LoRA adapter in ``src`` is, when ``src`` holds an adapter and no base model
    (a PEFT directory, an adapter-only torch_dist directory, verl's adapter files or LoRA
    tree); None when ``src`` holds a model (with or without adapters beside it)."""
    try:
        resolved = resolve(src)
    except FormatError as e:
        try:
            return resolve_adapter(src)
        except CheckpointError:
            raise e from None
    return _adapter_only(src, resolved)


def resolve_source(src: str | os.PathLike, *, to: str | None = None,
                   source_format: str | None = None) -> Source:
    """The one place that decides whether an operation reads a model or a LoRA adapter.

    An adapter when ``hf-peft`` is written or named as the source, or when ``src`` holds an
    adapter and no base model; a model otherwise, including when the adapter probe itself
    fails (the model's reader then says what is wrong with ``src``).
    """
    if to == "hf-peft" or source_format == "hf-peft":
        return Source(resolve_adapter(src), adapter=True)
    try:
        resolved = resolve(src)
    except FormatError as e:
        try:
            return Source(resolve_adapter(src), adapter=True)
        except CheckpointError:
            raise e from None
    try:
        adapter = _adapter_only(src, resolved)
    except CheckpointError:
        adapter = None
    return Source(adapter, adapter=True) if adapter is not None else Source(resolved, False)


# ------------------------------------------------------------------------------------------------
# Readers


def open_reader(src: str | os.PathLike, fmt: str | None, *, hf_config=None,
                trust_pickles: bool = False, source_ep: int | None = None,
                resolved: Resolved | None = None,
                metadata_only: bool = False) -> tuple[Any, Resolved]:
    """The model reader for ``src`` (``resolved``: where :func:`resolve_source` found it).

    ``metadata_only`` (``inspect``): per-rank readers read tensors as records, without torch,
    and cannot ``read``."""
    if resolved is None:
        resolved = resolve(src)
    if fmt is not None and fmt != resolved.format:
        raise FormatError(f"{src} looks like {resolved.format} ({resolved.layout}), not {fmt}",
                          path=src)
    cls = reader_class(resolved.format)
    kwargs: dict[str, Any] = {}
    if source_ep is not None:
        # Only per-rank names (mp_rank_TT_NNN) can leave the expert-parallel size ambiguous.
        if resolved.format not in PER_RANK_FORMATS:
            raise FormatError(f"source_ep applies to per-rank formats, not {resolved.format}",
                              path=src)
        kwargs["source_ep"] = source_ep
    if metadata_only and resolved.format in PER_RANK_FORMATS:
        kwargs["metadata_only"] = True
    reader = cls(resolved.path, hf_config=hf_config, trust_pickles=trust_pickles,
                 config_candidates=resolved.config_candidates, **kwargs)
    return reader, resolved


def open_adapter_reader(src: str | os.PathLike, fmt: str | None = None, *,
                        hf_config: str | os.PathLike | None = None,
                        lora_alpha: float | None = None, trust_pickles: bool = False,
                        resolved: Resolved | None = None) -> tuple[Any, Resolved]:
    """The adapter reader for whatever adapter ``src`` holds (``resolved``: where
    :func:`resolve_source` found it)."""
    if resolved is None:
        resolved = resolve_adapter(src)
    if fmt is not None and fmt != resolved.format:
        raise FormatError(f"{src} holds a {resolved.format} adapter ({resolved.layout}), not "
                          f"{fmt}", path=src)
    cls = adapter_reader_class(resolved.format)
    reader = cls(resolved.path, hf_config=hf_config, trust_pickles=trust_pickles,
                 config_candidates=resolved.config_candidates, lora_alpha=lora_alpha,
                 peft_export=resolved.peft_export)
    return reader, resolved


def source_layout(reader: Any, resolved: Resolved) -> str:
    """The report's ``source_layout``: the tree it was found in, plus its parallel layout."""
    if isinstance(reader, LayoutReader):
        return f"{resolved.layout}, {reader.layout.describe()}"
    return resolved.layout


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint ckpt-ir recognises: what ``--overwrite`` may
    replace (the executor's ``replaceable``)."""
    try:
        resolve(path)
    except Exception:  # whatever stops detection, the directory is not ours to delete
        return False
    return True


def carried_notes(reader) -> list[str]:
    """Report notes for tokenizer/generation files the destination will not carry, and why
    (a symlink leading out of the checkpoint, not a regular file)."""
    skipped = reader.source_files().skipped
    return [f"not copied: {path}: {why}" for path, why in sorted(skipped.items())]


def quantization_notes(reader, plan, options) -> list[str]:
    """Report notes for quantized checkpoints: what a quantized source holds and becomes, what
    ``--quantize`` writes, and the MTP copies of the embedding and head an hf destination
    gets (docs/quantized.md)."""
    notes: list[str] = []
    described = getattr(reader, "quantization", None)
    if described:
        notes.append(described)
    if options.quantize == "fp8":
        quant = target_quantization(plan.config.hf)
        fp8 = [s for s in plan.dest_specs
               if s.dtype.is_floating_point and is_fp8_linear(s.name, s.shape, quant)]
        notes.append(f"destination is {quant.describe()}: {len(fp8)} linear weights "
                     "re-quantized (scale = block amax / 448), the rest as planned")
    copies = [s.name for s in plan.dest_specs if _MTP_COPY.match(s.name)]
    if copies:
        notes.append(f"MTP layers get copies of the shared embedding / output head: "
                     f"{', '.join(copies)}")
    return notes


_MTP_COPY = re.compile(r"^model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")


# ------------------------------------------------------------------------------------------------
# The destination


LayoutRequest = ParallelLayout | Mapping[str, int | None] | None
"""A full destination layout, or layout fields overriding the source's (or the default)."""


def target_layout(reader, to: str, layout: LayoutRequest) -> ParallelLayout | None:
    """The parallel layout a per-rank destination gets; None for layout-free formats.

    A :class:`ParallelLayout` is taken as it is. A mapping of fields (``{"tp": 4}``) overrides
    those of the source's layout when the source is per-rank, else of TP=1/PP=1; fields set to
    None are left alone. A new ``pp`` resets ``vpp`` to 1, and a new ``pp`` or ``vpp`` makes the
    stages even, unless those fields are given too. This is the one place a layout request is
    checked; writers take the result as it is.
    """
    fields = dict(layout) if isinstance(layout, Mapping) else {}
    given = {k: v for k, v in fields.items() if v is not None}
    if to not in PER_RANK_FORMATS:
        if isinstance(layout, ParallelLayout) or given:
            raise FormatError(f"a parallel layout (--tp, --pp, ...) applies to per-rank formats "
                              f"({', '.join(PER_RANK_FORMATS)}), not {to}")
        return None
    if isinstance(layout, ParallelLayout):
        return layout
    unknown = set(fields) - set(ParallelLayout.__dataclass_fields__)
    if unknown:
        raise FormatError(f"unknown layout field(s): {', '.join(sorted(unknown))}")
    base = reader.layout if isinstance(reader, LayoutReader) else ParallelLayout()
    # The pipeline split is one decision: a new PP starts from VPP=1 and even stages, a new
    # VPP from even stages, unless those are given too.
    if "pp" in given:
        base = dataclasses.replace(base, vpp=1)
    if {"pp", "vpp"} & given.keys():
        base = dataclasses.replace(base, first_stage_layers=None, last_stage_layers=None)
    return dataclasses.replace(base, **given)


def plan_conversion(reader, to: str, options: WriteOptions) -> tuple[Plan, type]:
    """The validated plan for converting what ``reader`` holds into format ``to``."""
    writer_cls = writer_class(to)
    # A writer whose naming depends on its options (torch-dcp: HF names or torchtitan's)
    # says which through naming_for.
    naming_for = getattr(writer_cls, "naming_for", None)
    naming = naming_for(options) if naming_for is not None else writer_cls.naming
    dest = DestView(to, naming, writer_cls.params_for(reader.config, options))
    plan = make_plan(SourceView.of(reader), dest, reader.config, dtype=options.dtype,
                     streams=issubclass(writer_cls, SlabWriter))
    if options.quantize == "fp8":
        # The weights to re-quantize reach the writer in float32 (a widening, or the
        # dequantized values as read): --dtype applies to the tensors that stay unquantized,
        # and a block's amax and scale come from the values before any rounding.
        quant = target_quantization(reader.config.hf)
        plan = dataclasses.replace(plan, dest_specs=tuple(
            TensorSpec(s.name, s.shape, dtypes.FLOAT32)
            if s.dtype.is_floating_point and is_fp8_linear(s.name, s.shape, quant) else s
            for s in plan.dest_specs))
    elif isinstance(reader, DequantizingReader):
        # Dequantized weights arrive in the destination's dtype, as the plan counted them.
        reader.dequantize_to(options.dtype)
    return plan, writer_cls


def progress_counter(progress: Callable[[int, int], None] | None, total: int
                     ) -> Callable[[int], None]:
    """The executor's ``on_progress(bytes)`` as calls of ``progress(done, total)``."""
    done = 0

    def on_progress(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    return on_progress
