"""LoRA adapters in the public API: ``extract_adapter``, ``merge_adapter``, adapter ``convert``.

An adapter conversion is an ordinary plan over the adapter's schema
(:meth:`AdapterConfig.schema`): the source adapter reader's naming (``hf`` for PEFT, ``mcore-lora``
for Megatron-Bridge LoRA in torch_dist or verl's files) to the destination's. Before planning
a Megatron destination, the q/k/v (gate/up) A matrices are compared (they are small): identical
ones stay one fused A, different ones are rank-stacked (:func:`ckpt_ir.adapters.plan_lora_layout`).

Merging is a plan too: its sources are a base model's tensors and an adapter's, its
destination the base model's naming with :class:`~ckpt_ir.transforms.MergeLora` around every
binding that holds a targeted module, so each unit reads one layer's base weight and its adapter
and writes ``W + scaling · B @ A`` (fp32, cast back).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ckpt_ir import dtypes
from ckpt_ir.adapters import (
    LORA_STYLES,
    MEGATRON_GROUPS,
    AdapterConfig,
    LoraLayout,
    plan_lora_layout,
)
from ckpt_ir.capabilities import AlphaSourceReader
from ckpt_ir.detect import Resolved, dist_key_kinds, resolve_adapter
from ckpt_ir.dtypes import DType
from ckpt_ir.errors import CheckpointError, FormatError, PlanError
from ckpt_ir.formats import (
    ADAPTER_FORMATS,
    adapter_reader_class,
    adapter_writer_class,
    spec,
    writer_class,
)
from ckpt_ir.ir import Checkpoint, dtype_name
from ckpt_ir.options import AdapterTarget, WriteOptions
from ckpt_ir.orchestration import (
    Report,
    adapter_source,
    carried_notes,
    is_checkpoint,
    open_adapter_reader,
    open_reader,
    parse_size,
    progress_counter,
    resolve_source,
    target_layout,
)
from ckpt_ir.planner import DestView, Plan, SourceView, ir_view, make_plan
from ckpt_ir.tables import Binding, Table, build_table
from ckpt_ir.transforms import MergeLora, lora_roles, same_bits

if TYPE_CHECKING:
    import torch

__all__ = ["AdapterCheckpoint", "AdapterReport", "adapter_conversion", "adapter_source",
           "convert_adapter",
           "extract_adapter", "merge_adapter", "open_adapter"]

log = logging.getLogger(__name__)


@dataclass
class AdapterReport(Report):
    """A conversion report plus what happened to the adapter (rank, alpha, layout)."""

    adapter: dict[str, Any] = field(default_factory=dict)


class AdapterCheckpoint(Checkpoint):
    """The IR view of an adapter: ``.adapter`` (its config) and its A/B tensors."""

    adapter: AdapterConfig


# ------------------------------------------------------------------------------------------------
# Opening


def _ir_reader(reader: Any, schema: Mapping[str, Any]) -> Callable[[str], torch.Tensor]:
    table = build_table(reader.naming, reader.config, reader.params, schema=schema)

    def read(name: str) -> torch.Tensor:
        binding, role = table.by_ir[name]
        return binding.transform.inverse(reader.read(binding.native))[role]

    return read


def _check_source(reader: Any) -> Plan:
    """Validate the adapter's tensors against its schema (names, shapes) before reading any."""
    source = SourceView.of(reader)
    return make_plan(source, ir_view(source), reader.config, schema=reader.adapter.schema())


def open_adapter(src: str | os.PathLike, format: str | None = None, *,
                 hf_config: str | os.PathLike | None = None, lora_alpha: float | None = None,
                 trust_pickles: bool = False) -> AdapterCheckpoint:
    """The IR view of the adapter in ``src``: ``.adapter``, ``.tensors`` (PEFT names without
    ``base_model.model.``), lazy ``.read(name)``."""
    reader, resolved = open_adapter_reader(src, format, hf_config=hf_config,
                                           lora_alpha=lora_alpha, trust_pickles=trust_pickles)
    try:
        plan = _check_source(reader)
    except BaseException:
        reader.close()
        raise
    ckpt = AdapterCheckpoint(format=reader.format, path=str(resolved.path), config=reader.config,
                             tensors=plan.ir_specs,
                             reader=_ir_reader(reader, reader.adapter.schema()),
                             close=reader.close, release=reader.release)
    ckpt.adapter = reader.adapter
    return ckpt


def describe_adapter(reader: Any) -> dict[str, Any]:
    """JSON-able facts about an open adapter reader: the adapter (rank, alpha, targets,
    patterns), its Megatron layout when it has one, and where alpha came from."""
    adapter: AdapterConfig = reader.adapter
    out: dict[str, Any] = adapter.summary()
    lora: LoraLayout | None = reader.params.lora
    if lora is not None:
        out["megatron"] = {"style": lora.style, "rank": lora.rank, "alpha": lora.alpha,
                           "target_modules": lora.targets(reader.config)}
    if isinstance(reader, AlphaSourceReader) and reader.alpha_from is not None:
        out["alpha_from"] = reader.alpha_from
    return out


def inspect_adapter(src: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                    lora_alpha: float | None = None, trust_pickles: bool = False
                    ) -> dict[str, Any]:
    """What ``ckpt-ir inspect`` says about a source holding a LoRA adapter: where it is, its
    layout, the adapter's rank, alpha and targets, and its tensors."""
    reader, resolved = open_adapter_reader(src, hf_config=hf_config, lora_alpha=lora_alpha,
                                           trust_pickles=trust_pickles)
    try:
        plan = _check_source(reader)
        cfg = reader.config
        return {
            "kind": "adapter", "path": str(src), "resolved_path": str(resolved.path),
            "format": reader.format, "layout": resolved.layout, "step": resolved.step,
            "notes": list(resolved.notes),
            "tree": [{"path": path, "holds": what} for path, what in resolved.tree],
            "architecture": cfg.architecture, "config": _config_summary(cfg),
            "ir_tensors": len(plan.ir_specs),
            "ir_bytes": sum(s.nbytes for s in plan.ir_specs.values()),
            "dtypes": sorted({dtype_name(s.dtype) for s in plan.ir_specs.values()}),
            "dropped": dict(sorted(plan.dropped.items())),
            "adapter": describe_adapter(reader),
            # the reader's own facts (parallel layout of verl's files, where the config came
            # from, ...), less what "adapter" says already
            "details": {k: v for k, v in reader.describe().items()
                        if k not in ("adapter", "lora_style", "lora_rank", "lora_alpha",
                                     "alpha_from")},
        }
    finally:
        reader.close()


def _config_summary(cfg: Any) -> dict[str, Any]:
    return {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_word_embeddings}


def adapter_beside_model(path: Path, config: Any, *, lora_alpha: float | None = None,
                         trust_pickles: bool = False) -> dict[str, Any] | None:
    """The adapter of a base + adapter torch_dist directory (None when it has none), read
    against the model's config. What keeps it from being read (no alpha recorded, a variant
    ckpt-ir refuses) is reported, not raised: the model is what is being inspected."""
    model, adapter = dist_key_kinds(path)
    if not (model and adapter):
        return None
    try:
        resolved = resolve_adapter(path)
        reader = adapter_reader_class(resolved.format)(
            resolved.path, trust_pickles=trust_pickles, lora_alpha=lora_alpha,
            base_config=config, peft_export=resolved.peft_export)
    except CheckpointError as e:
        return {"error": str(e)}
    try:
        _check_source(reader)
        return describe_adapter(reader)
    except CheckpointError as e:
        return {"error": str(e)}
    finally:
        reader.close()


def probe_shared_groups(reader: Any) -> dict[str, bool]:
    """For each fused Megatron layer, whether its modules' A matrices are bit-identical in
    every adapter of that layer (every layer; every routed expert, shared expert and dense MLP
    of an MoE model): then one fused A holds them, else their ranks are stacked."""
    adapter: AdapterConfig = reader.adapter
    read = _ir_reader(reader, adapter.schema())
    units = adapter.units()
    shared: dict[str, bool] = {}
    for group, leaves in MEGATRON_GROUPS.items():
        if len(leaves) < 2:
            continue
        same = True
        for (_, _, _, g), members in units.items():
            if g != group or len(members) < 2:
                continue
            first = read(members[0].name + ".lora_A.weight")
            if any(not same_bits(read(m.name + ".lora_A.weight"), first) for m in members[1:]):
                same = False
                break
        shared[group] = same
        reader.release()
    return shared


# ------------------------------------------------------------------------------------------------
# Conversions


def adapter_conversion(src: str | os.PathLike, to: str, source_format: str | None = None
                       ) -> bool:
    """Whether ``convert(src, ..., to)`` converts an adapter: writing ``hf-peft``, or reading a
    source that holds an adapter and no base model (see
    :func:`ckpt_ir.orchestration.resolve_source`, which decides)."""
    try:
        return resolve_source(src, to=to, source_format=source_format).adapter
    except CheckpointError:
        return False


def convert_adapter(src: str | os.PathLike, dst: str | os.PathLike, to: str, *,
                    source_format: str | None = None,
                    hf_config: str | os.PathLike | None = None,
                    dtype: str | DType | torch.dtype | None = None, overwrite: bool = False,
                    dry_run: bool = False, trust_pickles: bool = False,
                    lora_alpha: float | None = None, lora_style: str | None = None,
                    layout: Any = None, progress: Callable[[int, int], None] | None = None,
                    pad_vocab_to_multiple: int | None = None, source_ep: int | None = None,
                    resolved: Resolved | None = None, **options: Any) -> AdapterReport:
    """Convert the LoRA adapter in ``src`` into adapter format ``to`` (``hf-peft``,
    ``mcore-dist``, ``verl-legacy``) at ``dst``.

    ``lora_alpha``: the alpha of adapters whose checkpoint does not record it (verl's files,
    torch_dist without run_config.yaml). ``lora_style`` (Megatron destinations): ``fused``
    (Bridge's ``LoRA``; the default unless the source is CanonicalLoRA) or ``canonical``.
    ``layout``: TP/PP of a ``verl-legacy`` destination (as for :func:`ckpt_ir.convert`).
    ``resolved``: where :func:`ckpt_ir.orchestration.resolve_source` found the adapter, so
    ``src`` is not resolved again.
    """
    from ckpt_ir.executor import write_checkpoint

    started = time.perf_counter()
    if options:
        raise FormatError(f"unknown option(s): {', '.join(sorted(options))}")
    model_only = [name for name, value in (("pad_vocab_to_multiple", pad_vocab_to_multiple),
                                           ("source_ep", source_ep)) if value is not None]
    if model_only:
        raise FormatError(f"{', '.join(model_only)} do(es) not apply to LoRA adapters")
    # Formats that only read adapters (verl-fsdp) are not destinations.
    writable = tuple(f for f in ADAPTER_FORMATS if spec(f).adapter_writer)
    if to not in writable:
        raise FormatError(f"{src} holds a LoRA adapter, which converts to "
                          f"{', '.join(writable)}, not {to!r}; merge-adapter writes a "
                          "base model with the adapter merged in")
    if lora_style is not None and lora_style not in LORA_STYLES:
        raise FormatError(f"lora_style must be one of {', '.join(LORA_STYLES)}, not "
                          f"{lora_style!r}")
    reader, resolved = open_adapter_reader(src, source_format, hf_config=hf_config,
                                           lora_alpha=lora_alpha, trust_pickles=trust_pickles,
                                           resolved=resolved)
    try:
        source_plan = _check_source(reader)
        adapter: AdapterConfig = reader.adapter
        writer_cls = adapter_writer_class(to)
        dest_layout = target_layout(reader, to, layout)
        lora: LoraLayout | None = None
        notes = [*resolved.notes, *carried_notes(reader)]
        source_lora: LoraLayout | None = reader.params.lora
        if writer_cls.naming == "mcore-lora":
            style = lora_style or (source_lora.style if source_lora is not None else "fused")
            multiple = dest_layout.tp if dest_layout is not None else 1
            if source_lora is not None and source_lora.style == style \
                    and source_lora.rank % multiple == 0:
                lora = source_lora
            else:
                shared = probe_shared_groups(reader) if style == "fused" else {}
                lora, lora_notes = plan_lora_layout(adapter, style=style, shared_groups=shared,
                                                    rank_multiple=multiple)
                notes.extend(lora_notes)
        wopts = WriteOptions(dtype=dtypes.resolve(dtype),
                             trust_pickles=trust_pickles, layout=dest_layout,
                             adapter=AdapterTarget(adapter, lora))
        source = dataclasses.replace(SourceView.of(reader), dropped=source_plan.dropped)
        dest = DestView(to, writer_cls.naming, writer_cls.params_for(reader.config, wopts))
        plan = make_plan(source, dest, reader.config, dtype=wopts.dtype,
                         schema=adapter.schema())
        summary = {"source": adapter.summary()}
        if lora is not None:
            summary["megatron"] = {"style": lora.style, "rank": lora.rank, "alpha": lora.alpha,
                                   "target_modules": lora.targets(reader.config)}
        if source_lora is not None:
            summary["source_megatron"] = {"style": source_lora.style, "rank": source_lora.rank,
                                          "alpha": source_lora.alpha}
        report = AdapterReport(
            source=str(src), destination=str(dst), source_format=reader.format, dest_format=to,
            source_layout=resolved.layout, architecture=reader.config.architecture,
            dry_run=dry_run, tensors_written=len(plan.dest_specs), bytes_read=plan.bytes_read,
            bytes_written=plan.bytes_written, peak_bytes_estimate=plan.peak_bytes, seconds=0.0,
            dropped=dict(plan.dropped), notes=notes,
            dest_layout=dest_layout.describe() if dest_layout is not None else "",
            adapter=summary)
        if not dry_run:
            report.files = write_checkpoint(
                plan, reader, writer_cls, reader.config, wopts, dst, overwrite=overwrite,
                protect=(Path(src), resolved.path), replaceable=is_checkpoint,
                on_progress=progress_counter(progress, plan.bytes_written))
    finally:
        reader.close()
    report.seconds = time.perf_counter() - started
    return report


def extract_adapter(src: str | os.PathLike, dst: str | os.PathLike, *,
                    lora_alpha: float | None = None, hf_config: str | os.PathLike | None = None,
                    dtype: str | DType | torch.dtype | None = None, overwrite: bool = False,
                    dry_run: bool = False, trust_pickles: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> AdapterReport:
    """Write the LoRA adapter held by ``src`` (any checkpoint with adapters: a PEFT directory,
    a Megatron-Bridge / verl torch_dist directory with or without the base weights, verl's
    ``adapter_checkpoint/`` files) as an HF PEFT directory at ``dst``.

    Example::

        report = ckpt_ir.extract_adapter("ckpts/global_step_50/actor", "adapter-hf",
                                         lora_alpha=32)
        peft.PeftModel.from_pretrained(base_model, "adapter-hf")
    """
    return convert_adapter(src, dst, "hf-peft", hf_config=hf_config, dtype=dtype,
                           overwrite=overwrite, dry_run=dry_run, trust_pickles=trust_pickles,
                           lora_alpha=lora_alpha, progress=progress)


# ------------------------------------------------------------------------------------------------
# Merging


class _MergeSource:
    """A base model's reader and an adapter's reader, read as one source."""

    format = "merge"
    naming = "merge"

    def __init__(self, base: Any, adapter: Any) -> None:
        self.base, self.adapter = base, adapter
        self.config = base.config
        self._adapter_names = set(adapter.tensors())
        clash = self._adapter_names & set(base.tensors())
        if clash:
            raise FormatError(f"the base model and the adapter both hold {sorted(clash)[:3]}")

    def read(self, name: str) -> torch.Tensor:
        return (self.adapter if name in self._adapter_names else self.base).read(name)

    def source_files(self) -> Any:
        return self.base.source_files()

    def release(self) -> None:
        self.base.release()
        self.adapter.release()

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


def merged_table(dest: Table, adapter: AdapterConfig) -> Table:
    """``dest``'s bindings with every targeted module's LoRA update merged in (MergeLora)."""
    weight_of = {m + ".weight": m for m in adapter.modules()}
    bindings: list[Binding] = []
    for b in dest.bindings:
        merges = tuple((role, adapter.scaling(weight_of[name])) for role, name in b.ir.items()
                       if name in weight_of)
        if not merges:
            bindings.append(b)
            continue
        ir = dict(b.ir)
        for role, _ in merges:
            module = weight_of[b.ir[role]]
            a_role, b_role = lora_roles(role)
            ir[a_role], ir[b_role] = module + ".lora_A.weight", module + ".lora_B.weight"
        bindings.append(Binding(b.native, MappingProxyType(ir), MergeLora(b.transform, merges),
                                b.partition, b.layer, b.expert))
    return Table(dest.naming, bindings)


def _union(*tables: Table) -> Table:
    return Table("+".join(t.naming for t in tables), [b for t in tables for b in t.bindings])


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, dst: str | os.PathLike,
                  *, to: str = "hf", hf_config: str | os.PathLike | None = None,
                  lora_alpha: float | None = None, dtype: str | DType | torch.dtype | None = None,
                  pad_vocab_to_multiple: int | None = None, max_shard_size: int | str = "5GB",
                  mcore_spec: str = "any", overwrite: bool = False, dry_run: bool = False,
                  trust_pickles: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> Report:
    """Write the model ``base`` with the LoRA adapter of ``adapter`` merged in, in format ``to``
    (``hf`` or ``mcore-dist``): ``W + scaling · B @ A`` per targeted module, computed in fp32
    and cast back to W's dtype, one layer at a time. ``base`` and ``adapter`` may be the same
    torch_dist directory (base + adapter training checkpoint). The adapter is read against the
    base model's config.

    Example::

        ckpt_ir.merge_adapter("Qwen3-8B", "adapter-hf", "merged", to="hf")
    """
    from ckpt_ir.executor import write_checkpoint

    started = time.perf_counter()
    if to not in ("hf", "mcore-dist"):
        raise FormatError(f"merge-adapter writes hf or mcore-dist, not {to!r}")
    base_reader, base_resolved = open_reader(base, None, hf_config=hf_config,
                                             trust_pickles=trust_pickles)
    ad_reader = None
    try:
        ad_resolved = resolve_adapter(adapter)
        config = base_reader.config
        # The adapter is read against the base model's config: a mismatch in any module's
        # shape is then a plan problem naming the tensor.
        ad_reader = adapter_reader_class(ad_resolved.format)(
            ad_resolved.path, trust_pickles=trust_pickles, lora_alpha=lora_alpha,
            base_config=config, peft_export=ad_resolved.peft_export)
        ad_config: AdapterConfig = ad_reader.adapter
        if dtype is None:
            floats = {s.dtype for s in base_reader.tensors().values()
                      if s.dtype.is_floating_point}
            if len(floats) != 1:
                raise PlanError([f"the base model mixes dtypes {sorted(map(dtype_name, floats))}; "
                                 "pass dtype (--dtype) for the merged weights"])
            out_dtype = floats.pop()
        else:
            out_dtype = dtypes.resolve(dtype)
        wopts = WriteOptions(dtype=out_dtype, pad_vocab_to_multiple=pad_vocab_to_multiple,
                             max_shard_bytes=parse_size(max_shard_size),
                             trust_pickles=trust_pickles, mcore_spec=mcore_spec)
        writer_cls = writer_class(to)
        dest_params = writer_cls.params_for(config, wopts)
        ad_schema = ad_config.schema()
        source = _MergeSource(base_reader, ad_reader)
        src_table = _union(build_table(base_reader.naming, config, base_reader.params),
                           build_table(ad_reader.naming, config, ad_reader.params,
                                       schema=ad_schema))
        dst_table = merged_table(build_table(writer_cls.naming, config, dest_params), ad_config)
        merged_source = SourceView(
            f"{base_reader.format} + {ad_reader.format} adapter", "merge", base_reader.params,
            {**base_reader.tensors(), **ad_reader.tensors()},
            {**base_reader.dropped(), **ad_reader.dropped()}, table=src_table)
        plan = make_plan(merged_source, DestView(to, writer_cls.naming, dest_params, dst_table),
                         config, dtype=out_dtype, schema={**config.schema(), **ad_schema})
        merged = sum(1 for b in dst_table.bindings if isinstance(b.transform, MergeLora))
        report = AdapterReport(
            source=f"{base} + {adapter}", destination=str(dst),
            source_format=f"{base_reader.format} + {ad_reader.format}", dest_format=to,
            source_layout=f"{base_resolved.layout}; adapter: {ad_resolved.layout}",
            architecture=config.architecture, dry_run=dry_run,
            tensors_written=len(plan.dest_specs), bytes_read=plan.bytes_read,
            bytes_written=plan.bytes_written, peak_bytes_estimate=plan.peak_bytes,
            seconds=0.0, dropped=dict(plan.dropped),
            notes=[*base_resolved.notes, *ad_resolved.notes, *carried_notes(source),
                   f"{merged} destination tensors carry a merged LoRA update "
                   f"({len(ad_config.modules())} modules), computed in fp32"],
            adapter={"source": ad_config.summary()})
        if not dry_run:
            report.files = write_checkpoint(
                plan, source, writer_cls, config, wopts, dst, overwrite=overwrite,
                protect=(Path(base), base_resolved.path, Path(adapter), ad_resolved.path),
                replaceable=is_checkpoint,
                on_progress=progress_counter(progress, plan.bytes_written))
    finally:
        base_reader.close()
        if ad_reader is not None:
            ad_reader.close()
    report.seconds = time.perf_counter() - started
    return report
