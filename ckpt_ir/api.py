"""The public Python API: ``convert``, ``open``, ``detect`` (the issue #2 contract)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_ir import dtypes
from ckpt_ir.adapter_api import convert_adapter
from ckpt_ir.capabilities import MaybeEmptyReader
from ckpt_ir.detect import resolve
from ckpt_ir.distributed import env_world, run_distributed
from ckpt_ir.dtypes import DType
from ckpt_ir.errors import FormatError
from ckpt_ir.ir import Checkpoint
from ckpt_ir.options import VerlTree, WriteOptions
from ckpt_ir.orchestration import (
    LayoutRequest,
    Report,
    carried_notes,
    is_checkpoint,
    open_reader,
    parse_size,
    plan_conversion,
    progress_counter,
    quantization_notes,
    resolve_source,
    source_layout,
    target_layout,
)
from ckpt_ir.planner import SourceView, ir_view, make_plan
from ckpt_ir.readahead import Readahead
from ckpt_ir.tables import build_table

if TYPE_CHECKING:
    import torch

__all__ = ["LayoutRequest", "Report", "carried_notes", "convert", "detect", "open",
           "plan_conversion", "target_layout"]

log = logging.getLogger(__name__)


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
    reader, resolved = open_reader(src, format, hf_config=hf_config,
                                   trust_pickles=trust_pickles, source_ep=source_ep)
    try:
        source = SourceView.of(reader)
        plan = make_plan(source, ir_view(source), reader.config)
    except BaseException:
        reader.close()
        raise
    table = build_table(reader.naming, reader.config, reader.params)

    def read(name: str) -> torch.Tensor:
        binding, role = table.by_ir[name]
        out = binding.transform.inverse(reader.read(binding.native))[role]
        # In the dtype ``tensors`` lists: a dequantizing reader computes in float32 and leaves
        # the one rounding to its consumer.
        dtype = plan.ir_specs[name].dtype.torch
        return out if out.dtype == dtype else out.to(dtype)

    return Checkpoint(format=reader.format, path=str(resolved.path), config=reader.config,
                      tensors=plan.ir_specs, reader=read, close=reader.close,
                      release=reader.release)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *,
            source_format: str | None = None, hf_config: str | os.PathLike | None = None,
            dtype: str | DType | torch.dtype | None = None,
            pad_vocab_to_multiple: int | None = None,
            max_shard_size: int | str = "5GB", overwrite: bool = False, dry_run: bool = False,
            trust_pickles: bool = False, mcore_spec: str = "any",
            progress: Callable[[int, int], None] | None = None,
            layout: LayoutRequest = None, source_ep: int | None = None,
            hf_experts: str = "per-expert", mcore_experts: str | None = None,
            verl_tree: bool = False, torchtitan: bool = False,
            fsdp_world_size: int | None = None, quantize: str | None = None,
            workers: int = 1, **options: Any) -> Report:
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
    ``torchtitan`` (``torch-dcp`` only): ``dst`` becomes a torchtitan checkpoint folder whose
    ``step-0/`` holds the model under torchtitan's FQNs (llama3, qwen3, qwen3 MoE,
    deepseek_v3, gpt_oss), what torchtitan's checkpointer loads as a model-only seed checkpoint.
    ``fsdp_world_size`` (``verl-fsdp`` only): the number of per-rank model files, the world size
    of the FSDP job that loads them (default 1).
    ``workers``: processes that write the destination on this machine (this one and
    ``workers - 1`` forked after planning, see :mod:`ckpt_ir.workers`); under ``torchrun`` the
    ranks are the workers instead.
    ``quantize`` (``hf`` only): ``"fp8"`` re-quantizes linear weights to block FP8 e4m3 with
    ``weight_scale_inv``, as DeepSeek / Qwen FP8 releases store them (docs/quantized.md).
    """
    if "from" in options:
        source_format = options.pop("from")
    source = resolve_source(src, to=to, source_format=source_format)
    if source.adapter:
        # A LoRA adapter (hf-peft in or out, or a source holding only an adapter); options
        # lora_alpha, lora_style. See ckpt_ir.adapter_api.
        # An adapter is megabytes: one process writes it whatever ``workers`` says.
        return convert_adapter(src, dst, to, source_format=source_format, hf_config=hf_config,
                               dtype=dtype, overwrite=overwrite, dry_run=dry_run,
                               trust_pickles=trust_pickles, layout=layout, progress=progress,
                               pad_vocab_to_multiple=pad_vocab_to_multiple,
                               source_ep=source_ep, resolved=source.resolved, **options)
    if options:
        raise FormatError(f"unknown option(s): {', '.join(sorted(options))}")
    if workers < 1:
        raise FormatError(f"workers must be at least 1, not {workers}")
    if workers > 1 and env_world()[1] > 1:
        raise FormatError("--workers and torchrun both start processes; use one of them")
    tree = None
    if verl_tree:
        if to != "mcore-dist":
            raise FormatError(f"verl_tree (--verl-tree) writes mcore-dist, not {to}")
        step = re.fullmatch(r"global_step_(\d+)", Path(dst).absolute().parent.name)
        tree = VerlTree(role=Path(dst).name if Path(dst).name in ("actor", "critic") else "actor",
                        step=int(step.group(1)) if step else None)
    if torchtitan and to != "torch-dcp":
        raise FormatError(f"torchtitan (--torchtitan) writes torch-dcp, not {to}")
    if quantize is not None and to != "hf":
        raise FormatError(f"quantize (--quantize) writes hf, not {to}")
    started = time.perf_counter()
    wopts = WriteOptions(
        dtype=dtypes.resolve(dtype),
        pad_vocab_to_multiple=pad_vocab_to_multiple,
        max_shard_bytes=parse_size(max_shard_size),
        trust_pickles=trust_pickles, mcore_spec=mcore_spec, hf_experts=hf_experts,
        mcore_experts=mcore_experts, verl_tree=tree, torchtitan=torchtitan,
        fsdp_world_size=fsdp_world_size, quantize=quantize,
    )
    reader, resolved = open_reader(src, source_format, hf_config=hf_config,
                                   trust_pickles=trust_pickles, source_ep=source_ep,
                                   resolved=source.resolved)
    try:
        dest_layout = target_layout(reader, to, layout)
        wopts = dataclasses.replace(wopts, layout=dest_layout, source_params=reader.params)
        plan, writer_cls = plan_conversion(reader, to, wopts)
        notes = [*resolved.notes, *carried_notes(reader), *quantization_notes(reader, plan, wopts)]
        report = Report(
            source=str(src), destination=str(dst), source_format=reader.format, dest_format=to,
            source_layout=source_layout(reader, resolved), architecture=reader.config.architecture,
            dry_run=dry_run, tensors_written=len(plan.dest_specs), bytes_read=plan.bytes_read,
            bytes_written=plan.bytes_written, peak_bytes_estimate=plan.peak_bytes, seconds=0.0,
            dropped=dict(plan.dropped), notes=notes,
            dest_layout=dest_layout.describe() if dest_layout is not None else "")
        if dry_run:
            report.seconds = time.perf_counter() - started
            return report
        if isinstance(reader, MaybeEmptyReader) and not reader.has_data:
            raise FormatError(f"{src} holds a config but no weights; only --dry-run can plan "
                              "it", path=src)
        on_progress = progress_counter(progress, plan.bytes_written)
        if env_world()[1] > 1:
            report.files = run_distributed(plan, reader, writer_cls, wopts, dst,
                                           overwrite=overwrite,
                                           protect=(Path(src), resolved.path),
                                           replaceable=is_checkpoint,
                                           on_progress=on_progress)
            report.notes.append(f"written by {env_world()[1]} processes")
        elif workers > 1:
            from ckpt_ir.workers import run_workers

            report.files = run_workers(plan, reader, writer_cls, wopts, dst, workers=workers,
                                       overwrite=overwrite,
                                       protect=(Path(src), resolved.path),
                                       replaceable=is_checkpoint, on_progress=on_progress)
            report.notes.append(f"written by {workers} processes")
        else:
            # Planned without torch: the first units' source bytes are read ahead while the
            # executor imports it (1.3-1.9 s of a fresh process), then ahead of each unit.
            with Readahead.for_units(reader, plan.units) as ahead:
                from ckpt_ir.executor import write_checkpoint

                report.files = write_checkpoint(plan, reader, writer_cls, reader.config, wopts,
                                                dst, overwrite=overwrite,
                                                protect=(Path(src), resolved.path),
                                                replaceable=is_checkpoint,
                                                on_progress=on_progress, readahead=ahead)
    finally:
        reader.close()
    report.seconds = time.perf_counter() - started
    return report
