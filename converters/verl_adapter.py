"""verl's per-rank LoRA adapter files (``verl-legacy``, verl #4063 until #5575 removed them).

A verl role directory of that era (``global_step_N/actor``) holds::

    adapter_checkpoint/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]_adapter.pt
        torch.save({"adapter_state_dict": {name: tensor}})   one *file* per model-parallel rank
    huggingface/ (or hf_config_and_tokenizer/)            config.json, tokenizer

Names are the Megatron-Bridge adapter parameters of the first virtual-pipeline chunk with
chunk-local layer indices (``decoder.layers.{i}.self_attention.linear_qkv.adapter.linear_in.
weight``, CanonicalLoRA's ``...adapter.adapter_q.linear_in.weight``), TP-sharded as Bridge's
``ParallelLinearAdapter`` holds them (:mod:`ckpt_ir.tables.lora` has the partitions). verl
saved no LoRA config: the rank comes from the shapes, alpha must be given (``--lora-alpha``, the
training's ``actor_rollout_ref.model.lora.alpha``) unless ckpt-ir wrote the files, in which case
its :data:`~ckpt_ir.adapters.LORA_LAYOUT_FILE` sits beside them. Facts:
/work/shared/reference/verl-formats.md section 7.1.

The reader exposes full tensors with global layer indices (the ``mcore-lora`` naming); the
writer cuts them by TP and PP and streams each rank's file with
:class:`~ckpt_ir.converters.storage.torch_zip.TorchZipWriter`.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import reprlib
import shutil
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ckpt_ir import dtypes
from ckpt_ir.adapters import (
    LORA_LAYOUT_FILE,
    AdapterConfig,
    LoraLayout,
    from_lora_layout_json,
    lora_layout_json,
)
from ckpt_ir.converters.base import SourceFiles, WriteOptions
from ckpt_ir.converters.per_rank import (
    RankKey,
    list_entries,
    load_rank_file,
    parse_rank_dir,
    rank_dir_name,
)
from ckpt_ir.converters.storage.hf_files import carried_source_files, load_hf_config
from ckpt_ir.converters.storage.torch_zip import TensorRef, TorchZipWriter
from ckpt_ir.detect import ADAPTER_DIR, read_json_file
from ckpt_ir.errors import (
    CheckpointError,
    CorruptCheckpointError,
    FormatError,
    IncompatibleLayoutError,
    InternalError,
    MissingConfigError,
)
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.layout import ParallelLayout, Partition, shard, shard_shape, unshard, unshard_shape
from ckpt_ir.probes import find_config_dir
from ckpt_ir.tables import NativeParams
from ckpt_ir.tables.lora import infer_megatron_lora, lora_partition

__all__ = ["VerlAdapterReader", "VerlAdapterWriter", "adapter_file_name"]

STATE_KEY = "adapter_state_dict"
_FILE = re.compile(r"^mp_rank_(\d{2,})(?:_(\d{3,}))?(?:_(\d{3,}))?_adapter\.pt$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
HF_DIR = "huggingface"


def adapter_file_name(key: RankKey, layout: ParallelLayout) -> str:
    """``mp_rank_TT[_PPP][_EEE]_adapter.pt`` (verl: ``rank_path + "_adapter.pt"``)."""
    return rank_dir_name(key, layout) + "_adapter.pt"


def _refuse_moe(config: ModelConfig, path: Path | None) -> None:
    if config.is_moe:
        raise FormatError(f"verl adapter files of {config.architecture} (MoE) models are not "
                          "supported: their experts' adapters sit under per-EP-rank local "
                          "expert names; use mcore-dist (torch_dist) for MoE adapters", path=path)


class VerlAdapterReader:
    """Reads ``adapter_checkpoint/mp_rank_*_adapter.pt`` as full Megatron LoRA tensors."""

    format: ClassVar[str] = "verl-legacy"
    naming: ClassVar[str] = "mcore-lora"

    def __init__(self, path: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                 trust_pickles: bool = False, config_candidates: Sequence[Path] = (),
                 lora_alpha: float | None = None, base_config: ModelConfig | None = None,
                 peft_export: Path | None = None) -> None:
        del peft_export  # only torch_dist adapters have an HF PEFT export beside them
        self.path = Path(path)
        self._trust = trust_pickles
        self._maps: list[mmap.mmap] = []
        self._dropped: dict[str, str] = {}
        states = self._load_files()
        self._config_dir: Path | None = None
        if base_config is not None:
            self.config = base_config
        else:
            self._config_dir = self._find_config(hf_config, config_candidates)
            self.config = ModelConfig.from_hf(load_hf_config(self._config_dir))
        _refuse_moe(self.config, self.path)
        self._index(states)
        sidecar = self.path / LORA_LAYOUT_FILE
        if sidecar.is_file():
            self.adapter, layout = from_lora_layout_json(read_json_file(sidecar), self.config,
                                                         path=sidecar)
        else:
            style, leaves, rank = infer_megatron_lora(self._specs, path=self.path)
            if lora_alpha is None:
                raise MissingConfigError(
                    f"{self.path}: verl saved no LoRA config with its adapter files; the rank "
                    f"({rank}) comes from the shapes but alpha cannot: pass --lora-alpha (the "
                    "training's actor_rollout_ref.model.lora.alpha)", path=self.path)
            self.adapter = AdapterConfig.create(self.config, r=rank, lora_alpha=lora_alpha,
                                                leaves=leaves)
            layout = LoraLayout.uniform(style, self.adapter.modules(), rank, lora_alpha)
        self.params = NativeParams(lora=layout)

    # -- scanning -------------------------------------------------------------------------------

    def _load_files(self) -> dict[RankKey, Mapping[str, torch.Tensor]]:
        states: dict[RankKey, Mapping[str, torch.Tensor]] = {}
        for f in list_entries(self.path):
            numbers = parse_rank_dir(f.name, _FILE)
            if numbers is None:
                continue
            # mp_rank_TT_NNN: a dense model has no expert ranks, so NNN is the pipeline rank.
            if len(numbers) == 3:
                raise FormatError(f"{f.name}: expert-parallel adapter files are not supported "
                                  "(dense models only)", path=f)
            key = RankKey(numbers[0], numbers[1] if len(numbers) == 2 else 0)
            obj, buffer = load_rank_file(f, trust=self._trust)
            if buffer is not None:
                self._maps.append(buffer)
            state = obj.get(STATE_KEY) if isinstance(obj, Mapping) else None
            if not isinstance(state, Mapping):
                raise CorruptCheckpointError(f"{f.name} does not hold {{{STATE_KEY!r}: "
                                             "{name: tensor}}", path=f)
            for name, t in state.items():
                if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                    raise CorruptCheckpointError(f"{f.name}: {STATE_KEY} entry "
                                                 f"{reprlib.repr(name)} is not a named tensor",
                                                 path=f)
                if name.endswith("weight_magnitude"):
                    raise FormatError(f"{f.name}: {name}: DoRA adapters are not supported",
                                      path=f)
            states[key] = state
        if not states:
            raise FormatError(f"no mp_rank_*_adapter.pt files in {self.path}", path=self.path)
        return states

    def _find_config(self, explicit: str | os.PathLike | None,
                     candidates: Sequence[Path]) -> Path:
        if explicit is not None:
            return Path(explicit)
        role = self.path.parent if self.path.name == ADAPTER_DIR else self.path
        found = find_config_dir((*candidates, role / HF_DIR, role / "hf_config_and_tokenizer"))
        if found is not None:
            return found
        raise MissingConfigError(f"{self.path} carries no model config (no huggingface/ or "
                                 "hf_config_and_tokenizer/ beside it); pass --hf-config DIR",
                                 path=self.path)

    def _index(self, states: dict[RankKey, Mapping[str, torch.Tensor]]) -> None:
        tp = 1 + max(k.tp for k in states)
        pp = 1 + max(k.pp for k in states)
        for t in range(tp):
            for p in range(pp):
                if RankKey(t, p) not in states:
                    name = adapter_file_name(RankKey(t, p), ParallelLayout(tp, pp))
                    raise CorruptCheckpointError(f"adapter file {name} is missing (file names "
                                                 f"give TP={tp}, PP={pp})", path=self.path / name)
        sizes = []
        for p in range(pp):
            layers = set()
            for key in states[RankKey(0, p)]:
                m = _LAYER.match(key)
                if m is None:
                    raise CorruptCheckpointError(f"{key!r} is not a decoder layer's adapter "
                                                 "tensor", path=self.path, tensor=key)
                layers.add(int(m.group(1)))
            if layers != set(range(len(layers))):
                raise CorruptCheckpointError(f"pipeline rank {p} holds layers {sorted(layers)}; "
                                             "expected local indices 0..n-1", path=self.path)
            sizes.append([len(layers)])
        try:
            self.layout = ParallelLayout.from_chunk_sizes(sizes, tp=tp)
        except IncompatibleLayoutError as e:
            raise CorruptCheckpointError(f"{self.path}: {e}", path=self.path) from e
        placement = self.layout.placement(sum(s[0] for s in sizes))
        if placement.num_layers != self.config.num_layers:
            raise CorruptCheckpointError(
                f"the adapter files hold {placement.num_layers} layers, the config says "
                f"{self.config.num_layers} (verl saved only the first virtual pipeline chunk "
                "of a VPP > 1 run)", path=self.path)
        self._states = states
        self._tp = tp
        self._where: dict[str, tuple[int, str, Partition]] = {}
        self._specs: dict[str, TensorSpec] = {}
        for p in range(pp):
            first = states[RankKey(0, p)]
            for t in range(1, tp):
                other = states[RankKey(t, p)]
                if set(other) != set(first) or any(
                        tuple(other[k].shape) != tuple(first[k].shape) for k in first):
                    raise CorruptCheckpointError(
                        f"TP ranks 0 and {t} of pipeline rank {p} hold different adapter "
                        "tensors or shapes", path=self.path)
            for local, tensor in first.items():
                m = _LAYER.match(local)
                if m is None:
                    raise InternalError(f"{local!r} passed the layer check above")
                name = f"decoder.layers.{placement.global_layer(p, 0, int(m.group(1)))}." \
                       f"{m.group(2)}"
                partition = lora_partition(name)
                if partition is None:
                    raise CorruptCheckpointError(f"{local!r} is not a Megatron LoRA adapter "
                                                 "tensor", path=self.path, tensor=local)
                try:
                    shape = unshard_shape(tuple(tensor.shape), partition, tp)
                except IncompatibleLayoutError as e:
                    raise CorruptCheckpointError(f"{local}: {e}", path=self.path) from e
                self._where[name] = (p, local, partition)
                self._specs[name] = TensorSpec(name, shape, dtypes.of(tensor))

    # -- Reader protocol ----------------------------------------------------------------------

    def tensors(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def dropped(self) -> Mapping[str, str]:
        return self._dropped

    def read(self, name: str) -> torch.Tensor:
        where = self._where.get(name)
        if where is None:
            raise FormatError(f"tensor {name!r} is not in {self.path}", tensor=name)
        p, local, partition = where
        pieces = [self._states[RankKey(t, p)][local] for t in range(self._tp)]
        return unshard(pieces, partition)

    def source_files(self) -> SourceFiles:
        return carried_source_files([self._config_dir] if self._config_dir else [])

    def describe(self) -> dict[str, Any]:
        layout = self.params.lora
        return {"layout": self.layout.describe(),
                "config_from": str(self._config_dir or "the base model"),
                "adapter": self.adapter.summary(), "lora_style": layout.style,
                "lora_rank": layout.rank, "lora_alpha": layout.alpha}

    def release(self) -> None:
        for m in self._maps:
            m.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._states = {}
        self._maps.clear()


class VerlAdapterWriter:
    """Writes ``adapter_checkpoint/mp_rank_*_adapter.pt`` (+ ``huggingface/config.json``).

    ``options.adapter``: the IR adapter config and its :class:`~ckpt_ir.adapters.LoraLayout`;
    ``options.layout``: the :class:`ParallelLayout` (TP and PP).
    """

    format: ClassVar[str] = "verl-legacy"
    naming: ClassVar[str] = "mcore-lora"

    def __init__(self, directory: Path, config: ModelConfig, options: WriteOptions,
                 params: NativeParams | None = None) -> None:
        adapter = options.require_adapter("verl adapter").adapter
        self.directory = directory
        self.config = config
        self.options = options
        self.adapter = adapter
        # The params the plan was built with (params_for runs once per conversion).
        self.params = params if params is not None else self.params_for(config, options)
        self.layout = self.parallel_layout(options)
        self.layout.placement(config.num_layers)  # raises for a PP that cannot hold the layers
        self._files: dict[RankKey, TorchZipWriter] = {}
        self._refs: dict[RankKey, OrderedDict[str, TensorRef]] = {}
        self._pending: dict[RankKey, int] = {}
        self._where: dict[str, tuple[int, str, Partition]] = {}

    @staticmethod
    def parallel_layout(options: WriteOptions) -> ParallelLayout:
        layout = options.parallel_layout
        if layout.vpp != 1 or layout.ep != 1:
            raise IncompatibleLayoutError("verl adapter files hold one virtual pipeline chunk "
                                          "and no expert ranks: VPP and EP must be 1")
        return layout

    @classmethod
    def params_for(cls, config: ModelConfig, options: WriteOptions) -> NativeParams:
        _refuse_moe(config, None)
        target = options.require_adapter("verl adapter")
        return NativeParams(lora=target.require_lora_layout("verl adapter"))

    def begin(self, specs: Sequence[TensorSpec]) -> None:
        tp = self.layout.tp
        placement = self.layout.placement(self.config.num_layers)
        for s in specs:
            m = _LAYER.match(s.name)
            partition = lora_partition(s.name)
            if m is None or partition is None:
                raise InternalError(f"verl adapter writer got {s.name}, not an adapter tensor")
            p, _, local = placement.locate(int(m.group(1)))
            shard_shape(s.shape, partition, tp)  # IncompatibleLayoutError before any write
            self._where[s.name] = (p, f"decoder.layers.{local}.{m.group(2)}", partition)
            for t in range(tp):
                key = RankKey(t, p)
                self._pending[key] = self._pending.get(key, 0) + 1
        root = self.directory / ADAPTER_DIR
        root.mkdir()
        for key in sorted(self._pending):
            self._files[key] = TorchZipWriter(root / adapter_file_name(key, self.layout))
            self._refs[key] = OrderedDict()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        where = self._where.get(name)
        if where is None:
            raise InternalError(f"verl adapter writer was not told about {name}")
        p, local, partition = where
        for t, piece in enumerate(shard(tensor, partition, self.layout.tp)):
            key = RankKey(t, p)
            self._refs[key][local] = self._files[key].add_tensor(piece)
            self._pending[key] -= 1
            if self._pending[key] == 0:
                self._files.pop(key).close({STATE_KEY: self._refs.pop(key)})

    def finish(self, source: Any) -> None:
        if self._files:
            raise InternalError("verl adapter writer finished with unwritten tensors")
        root = self.directory / ADAPTER_DIR
        with open(root / LORA_LAYOUT_FILE, "w") as f:
            json.dump(lora_layout_json(self.adapter, self.params.lora), f, indent=2)
            f.write("\n")
        hf_dir = self.directory / HF_DIR
        hf_dir.mkdir()
        with open(hf_dir / "config.json", "w") as f:
            json.dump(self.config.to_hf_dict(), f, indent=2)
            f.write("\n")
        for name, path in source.source_files().files.items():
            if name != "config.json":
                shutil.copyfile(path, hf_dir / name)

    def abort(self) -> None:
        for w in self._files.values():
            try:
                w.abort()
            except (OSError, CheckpointError):
                pass
        self._files.clear()
