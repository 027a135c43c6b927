"""The public Python API: ``convert``, ``open``, ``detect`` (the issue #2 contract)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckpt_ir.detect import Resolved, resolve
from ckpt_ir.distributed import env_world, run_distributed
from ckpt_ir.errors import FormatError
from ckpt_ir.executor import write_checkpoint
from ckpt_ir.formats import PER_RANK_FORMATS, reader_class, writer_class
from ckpt_ir.ir import Checkpoint, parse_dtype
from ckpt_ir.layout import ParallelLayout
from ckpt_ir.options import VerlTree, WriteOptions
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
    dest_layout: str = ""

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
                 trust_pickles: bool = False, source_ep: int | None = None):
    resolved: Resolved = resolve(src)
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
    reader = cls(resolved.path, hf_config=hf_config, trust_pickles=trust_pickles,
                 config_candidates=resolved.config_candidates, **kwargs)
    return reader, resolved


LayoutRequest = ParallelLayout | Mapping[str, int | None] | None
"""A full destination layout, or layout fields overriding the source's (or the default)."""


def target_layout(reader, to: str, layout: LayoutRequest) -> ParallelLayout | None:
    """The parallel layout a per-rank destination gets; None for layout-free formats.

    A :class:`ParallelLayout` is taken as it is. A mapping of fields (``{"tp": 4}``) overrides
    those of the source's layout when the source is per-rank, else of TP=1/PP=1; fields set to
    None are left alone. A new ``pp`` resets ``vpp`` to 1, and a new ``pp`` or ``vpp`` makes the
    stages even, unless those fields are given too.
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
    source = getattr(reader, "layout", None)
    base = source if isinstance(source, ParallelLayout) else ParallelLayout()
    # The pipeline split is one decision: a new PP starts from VPP=1 and even stages, a new
    # VPP from even stages, unless those are given too.
    if "pp" in given:
        base = dataclasses.replace(base, vpp=1)
    if {"pp", "vpp"} & given.keys():
        base = dataclasses.replace(base, first_stage_layers=None, last_stage_layers=None)
    return dataclasses.replace(base, **given)


def detect(src: str | os.PathLike) -> str:
    """The format of ``src``: one of ``hf``, ``hf-peft``, ``mcore-dist``, ``verl-legacy``,
    ``megatron-legacy``."""
    return resolve(src).format


def open(src: str | os.PathLike, format: str | None = None, *,
         hf_config: str | os.PathLike | None = None, trust_pickles: bool = False,
         source_ep: int | None = None) -> Checkpoint:
    """The IR view of a checkpoint: config, logical tensors (HF names), lazy ``read``.

    ``source_ep`` (per-rank formats only) overrides what the files say about whether
    ``mp_rank_TT_NNN`` directories number expert or pipeline ranks.
    """
    reader, resolved = _open_reader(src, format, hf_config=hf_config,
                                    trust_pickles=trust_pickles, source_ep=source_ep)
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
                      tensors=plan.ir_specs, reader=read, close=reader.close,
                      release=reader.release)


def carried_notes(reader) -> list[str]:
    """Report notes for tokenizer/generation files the destination will not carry, and why
    (a symlink leading out of the checkpoint, not a regular file)."""
    skipped = getattr(reader.source_files(), "skipped", {})
    return [f"not copied: {path}: {why}" for path, why in sorted(skipped.items())]


def plan_conversion(reader, to: str, options) -> tuple[Plan, type]:
    """The validated plan for converting what ``reader`` holds into format ``to``."""
    writer_cls = writer_class(to)
    probe = writer_cls.params_for(reader.config, options)
    plan = make_plan(source_format=reader.format, source_naming=reader.naming,
                     source_params=reader.params, source_tensors=reader.tensors(),
                     source_dropped=reader.dropped(), config=reader.config, dest_format=to,
                     dest_naming=writer_cls.naming, dest_params=probe, dtype=options.dtype,
                     streams=hasattr(writer_cls, "write_slabs"))
    return plan, writer_cls


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *,
            source_format: str | None = None, hf_config: str | os.PathLike | None = None,
            dtype: str | torch.dtype | None = None, pad_vocab_to_multiple: int | None = None,
            max_shard_size: int | str = "5GB", overwrite: bool = False, dry_run: bool = False,
            trust_pickles: bool = False, mcore_spec: str = "any",
            progress: Callable[[int, int], None] | None = None,
            layout: LayoutRequest = None, source_ep: int | None = None,
            hf_experts: str = "per-expert", mcore_experts: str | None = None,
            verl_tree: bool = False, **options: Any) -> Report:
    """Convert the checkpoint at ``src`` into format ``to`` at ``dst``.

    The plan is built and validated from metadata first; then tensors stream through, one
    unit at a time, into a temporary sibling of ``dst`` that is renamed into place only when
    complete. ``dry_run`` stops after planning and writes nothing. ``progress(done, total)``
    receives bytes written.

    ``layout`` (per-rank destinations ``verl-legacy`` / ``megatron-legacy``): a
    :class:`~ckpt_ir.layout.ParallelLayout`, or fields overriding the source's layout (see
    :func:`target_layout`); by default a per-rank source keeps its layout, others get TP=1, PP=1.
    ``source_ep`` settles whether ``mp_rank_TT_NNN`` source directories number expert ranks.
    ``hf_experts`` (``hf`` destinations of MoE models): ``"per-expert"``, what transformers
    writes, or ``"fused"``, its in-memory ``mlp.experts.gate_up_proj`` / ``down_proj``.
    ``mcore_experts`` (per-rank destinations of MoE models): ``"sequential"``
    (``local_experts.{k}.linear_fc1.weight``) or ``"grouped"`` (``linear_fc1.weight{k}``);
    default grouped for the TE spec, sequential for the local one.
    ``verl_tree`` (``mcore-dist`` only): ``dst`` becomes a verl 0.9.1 role directory
    (``global_step_N/actor``) that verl's ``load_checkpoint`` and model merger open:
    ``model/dist_ckpt``, ``model/huggingface`` (config, tokenizer), ``transformer_config.json``
    and ``ckpt_contents.json``.
    """
    if "from" in options:
        source_format = options.pop("from")
    from ckpt_ir.adapter_api import adapter_conversion, convert_adapter

    if adapter_conversion(src, to, source_format):
        # A LoRA adapter (hf-peft in or out, or a source holding only an adapter); options
        # lora_alpha, lora_style. See ckpt_ir.adapter_api.
        return convert_adapter(src, dst, to, source_format=source_format, hf_config=hf_config,
                               dtype=dtype, overwrite=overwrite, dry_run=dry_run,
                               trust_pickles=trust_pickles, layout=layout, progress=progress,
                               pad_vocab_to_multiple=pad_vocab_to_multiple,
                               source_ep=source_ep, **options)
    if options:
        raise FormatError(f"unknown option(s): {', '.join(sorted(options))}")
    tree = None
    if verl_tree:
        if to != "mcore-dist":
            raise FormatError(f"verl_tree (--verl-tree) writes mcore-dist, not {to}")
        step = re.fullmatch(r"global_step_(\d+)", Path(dst).absolute().parent.name)
        tree = VerlTree(role=Path(dst).name if Path(dst).name in ("actor", "critic") else "actor",
                        step=int(step.group(1)) if step else None)
    started = time.perf_counter()
    wopts = WriteOptions(
        dtype=parse_dtype(dtype) if isinstance(dtype, str) else dtype,
        pad_vocab_to_multiple=pad_vocab_to_multiple,
        max_shard_bytes=_parse_size(max_shard_size),
        trust_pickles=trust_pickles, mcore_spec=mcore_spec, hf_experts=hf_experts,
        mcore_experts=mcore_experts, verl_tree=tree,
    )
    reader, resolved = _open_reader(src, source_format, hf_config=hf_config,
                                    trust_pickles=trust_pickles, source_ep=source_ep)
    try:
        dest_layout = target_layout(reader, to, layout)
        wopts = dataclasses.replace(wopts, layout=dest_layout, source_params=reader.params)
        plan, writer_cls = plan_conversion(reader, to, wopts)
        notes = [*resolved.notes, *carried_notes(reader)]
        source_layout = resolved.layout
        if isinstance(getattr(reader, "layout", None), ParallelLayout):
            source_layout += f", {reader.layout.describe()}"
        report = Report(
            source=str(src), destination=str(dst), source_format=reader.format, dest_format=to,
            source_layout=source_layout, architecture=reader.config.architecture,
            dry_run=dry_run, tensors_written=len(plan.dest_specs), bytes_read=plan.bytes_read,
            bytes_written=plan.bytes_written, peak_bytes_estimate=plan.peak_bytes, seconds=0.0,
            dropped=dict(plan.dropped), notes=notes,
            dest_layout=dest_layout.describe() if dest_layout is not None else "")
        if dry_run:
            report.seconds = time.perf_counter() - started
            return report
        if not getattr(reader, "has_data", True):
            raise FormatError(f"{src} holds a config but no weights; only --dry-run can plan "
                              "it", path=src)
        total = plan.bytes_written
        done = 0

        def on_progress(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        if env_world()[1] > 1:
            report.files = run_distributed(plan, reader, writer_cls, wopts, dst,
                                           overwrite=overwrite,
                                           protect=(Path(src), resolved.path),
                                           on_progress=on_progress)
            report.notes.append(f"written by {env_world()[1]} processes")
        else:
            report.files = write_checkpoint(plan, reader, writer_cls, reader.config, wopts, dst,
                                            overwrite=overwrite,
                                            protect=(Path(src), resolved.path),
                                            on_progress=on_progress)
    finally:
        reader.close()
    report.seconds = time.perf_counter() - started
    return report
