"""The public Python API: ``convert``, ``open``, ``detect`` (the issue #2 contract)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckpt_ir.detect import Resolved, resolve
from ckpt_ir.errors import FormatError
from ckpt_ir.executor import atomic_directory, execute
from ckpt_ir.formats import reader_class, writer_class
from ckpt_ir.ir import Checkpoint, parse_dtype
from ckpt_ir.planner import Plan, make_plan
from ckpt_ir.tables import build_table

__all__ = ["Report", "convert", "detect", "open", "plan_conversion"]

log = logging.getLogger(__name__)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_size(value: int | str) -> int:
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


def _open_reader(src: str | os.PathLike, fmt: str | None, *, hf_config=None,
                 trust_pickles: bool = False):
    resolved: Resolved = resolve(src)
    if fmt is not None and fmt != resolved.format:
        raise FormatError(f"{src} looks like {resolved.format} ({resolved.layout}), not {fmt}",
                          path=src)
    cls = reader_class(resolved.format)
    reader = cls(resolved.path, hf_config=hf_config, trust_pickles=trust_pickles,
                 config_candidates=resolved.config_candidates)
    return reader, resolved


def detect(src: str | os.PathLike) -> str:
    """The format of ``src``: one of ``hf``, ``hf-peft``, ``mcore-dist``, ``verl-legacy``,
    ``megatron-legacy``."""
    return resolve(src).format


def open(src: str | os.PathLike, format: str | None = None, *,
         hf_config: str | os.PathLike | None = None, trust_pickles: bool = False) -> Checkpoint:
    """The IR view of a checkpoint: config, logical tensors (HF names), lazy ``read``."""
    reader, resolved = _open_reader(src, format, hf_config=hf_config,
                                    trust_pickles=trust_pickles)
    try:
        plan = make_plan(source_format=reader.format, source_naming=reader.naming,
                         source_params=reader.params, source_tensors=reader.tensors(),
                         source_dropped=reader.dropped(), config=reader.config,
                         dest_format="ir", dest_naming="hf", dest_params=reader.params)
    except BaseException:
        reader.close()
        raise
    table = build_table(reader.naming, reader.config, reader.params)

    def read(name: str) -> torch.Tensor:
        binding, role = table.by_ir[name]
        return binding.transform.inverse(reader.read(binding.native))[role]

    return Checkpoint(format=reader.format, path=str(resolved.path), config=reader.config,
                      tensors=plan.ir_specs, reader=read, close=reader.close)


def plan_conversion(reader, to: str, options) -> tuple[Plan, type]:
    """The validated plan for converting what ``reader`` holds into format ``to``."""
    writer_cls = writer_class(to)
    probe = writer_cls.params_for(reader.config, options)
    plan = make_plan(source_format=reader.format, source_naming=reader.naming,
                     source_params=reader.params, source_tensors=reader.tensors(),
                     source_dropped=reader.dropped(), config=reader.config, dest_format=to,
                     dest_naming=writer_cls.naming, dest_params=probe, dtype=options.dtype)
    return plan, writer_cls


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *,
            source_format: str | None = None, hf_config: str | os.PathLike | None = None,
            dtype: str | torch.dtype | None = None, pad_vocab_to_multiple: int | None = None,
            max_shard_size: int | str = "5GB", overwrite: bool = False, dry_run: bool = False,
            trust_pickles: bool = False, mcore_spec: str = "any",
            progress: Callable[[int, int], None] | None = None, **options: Any) -> Report:
    """Convert the checkpoint at ``src`` into format ``to`` at ``dst``.

    The plan is built and validated from metadata first; then tensors stream through, one
    unit at a time, into a temporary sibling of ``dst`` that is renamed into place only when
    complete. ``dry_run`` stops after planning and writes nothing. ``progress(done, total)``
    receives bytes written.
    """
    from ckpt_ir.converters.base import WriteOptions

    if "from" in options:
        source_format = options.pop("from")
    if options:
        raise FormatError(f"unknown option(s): {', '.join(sorted(options))}")
    started = time.perf_counter()
    wopts = WriteOptions(
        dtype=parse_dtype(dtype) if isinstance(dtype, str) else dtype,
        pad_vocab_to_multiple=pad_vocab_to_multiple,
        max_shard_bytes=_parse_size(max_shard_size),
        trust_pickles=trust_pickles,
        extra={"mcore_spec": mcore_spec},
    )
    reader, resolved = _open_reader(src, source_format, hf_config=hf_config,
                                    trust_pickles=trust_pickles)
    try:
        plan, writer_cls = plan_conversion(reader, to, wopts)
        notes = list(resolved.notes)
        report = Report(
            source=str(src), destination=str(dst), source_format=reader.format, dest_format=to,
            source_layout=resolved.layout, architecture=reader.config.architecture,
            dry_run=dry_run, tensors_written=len(plan.dest_specs), bytes_read=plan.bytes_read,
            bytes_written=plan.bytes_written, peak_bytes_estimate=plan.peak_bytes, seconds=0.0,
            dropped=dict(plan.dropped), notes=notes)
        if dry_run:
            report.seconds = time.perf_counter() - started
            return report
        total = plan.bytes_written
        done = 0

        def on_progress(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        with atomic_directory(dst, overwrite=overwrite,
                              protect=(Path(src), resolved.path)) as tmp:
            writer = writer_cls(tmp, reader.config, wopts)
            try:
                execute(plan, reader, writer, on_progress=on_progress)
                writer.finish(reader)
            except BaseException:
                writer.abort()
                raise
            report.files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    finally:
        reader.close()
    report.seconds = time.perf_counter() - started
    return report
