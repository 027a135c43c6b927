"""``verl-fsdp``: verl's FSDP checkpoints (``FSDPCheckpointManager``) and SkyRL's variant.

A role directory (``global_step_N/actor``)::

    model_world_size_{W}_rank_{r}.pt        torch.save(model.state_dict()) of rank r, r < W
    optim_world_size_{W}_rank_{r}.pt        optimizer state (listed, not converted)
    extra_state_world_size_{W}_rank_{r}.pt  LR scheduler and RNG state (listed, not converted)
    fsdp_config.json                        {"FSDP_version": 1|2, "world_size": W}
                                            (SkyRL: {"fsdp_strategy": ..., "world_size": W})
    lora_train_meta.json                    {"r", "lora_alpha", "task_type"} for LoRA runs
    huggingface/                            config, tokenizer (+ full weights with hf_model)

Keys are the HF module's ``state_dict()`` names. Sharded parameters are DTensors (FSDP2, and
FSDP1 given a device mesh, which verl always passes): this rank's ``_local_tensor`` plus a
spec whose placements say how the global tensor was cut over the device mesh; ``Shard(d)``
cuts by the ``torch.chunk`` rule (``ceil(n/k)`` rows per coordinate, the last ones short or
empty), ``Replicate`` copies (HSDP's ``("ddp", "fsdp")`` mesh: only the first replica is
read). Buffers and 1-GPU saves hold plain tensors (rank 0's copy is read). Files are parsed by
the restricted unpickler (DTensors become :class:`~ckpt_ir.safety.unpickler.dtensor.DTensorRecord`
data) over a private mmap: a tensor's bytes are touched only when it is read. See
docs/formats/verl-fsdp.md and /work/shared/reference/fsdp-dcp-formats.md §3.

The writer writes FSDP2 files at any world size (``WriteOptions.fsdp_world_size``): every
parameter a DTensor ``[Shard(0)]`` on a ``("fsdp",)`` mesh of that size, cut by
``torch.chunk`` as ``fully_shard`` cuts it, each rank's rows streamed into its file as the
tensor arrives; buffers as plain tensors; tied embeddings as two DTensors over one storage,
as FSDP2 saves them. verl 0.9.1's ``load_checkpoint`` at that world size loads the files.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import pickle
import re
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ckpt_ir import dtypes
from ckpt_ir.adapters import AdapterConfig
from ckpt_ir.converters.base import SourceFiles, WriteOptions
from ckpt_ir.converters.storage.hf_files import (
    carried_source_files,
    check_layer_count,
    load_hf_config,
)
from ckpt_ir.converters.storage.torch_zip import TensorRef, TorchZipWriter, _Pickler
from ckpt_ir.durable import write_json
from ckpt_ir.errors import (
    CheckpointError,
    CorruptCheckpointError,
    FormatError,
    InternalError,
    MissingConfigError,
)
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.safety.files import read_text
from ckpt_ir.safety.unpickler import load_torch, load_torch_buffer, map_file
from ckpt_ir.safety.unpickler.dtensor import (
    DeviceMesh,
    DTensorRecord,
    Partial,
    Replicate,
    Shard,
    StridedShard,
)
from ckpt_ir.safety.unpickler.sharded_tensor import ShardedTensorRecord
from ckpt_ir.slabs import mapping_address, offset_in_mapping
from ckpt_ir.tables import NativeParams, drop_absent_mtp

__all__ = ["FSDP_CONFIG", "HF_DIR", "LORA_META", "MODEL_FILE", "VerlFsdpAdapterReader",
           "VerlFsdpReader", "VerlFsdpWriter", "model_file_name", "scan_model_files"]

MODEL_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$", re.ASCII)
"""A model file: ``model_world_size_{W}_rank_{r}.pt`` (verl since #222, SkyRL)."""
FSDP_CONFIG = "fsdp_config.json"
LORA_META = "lora_train_meta.json"
HF_DIR = "huggingface"
_NOT_WEIGHTS = (
    (re.compile(r"^optim_world_size_(\d+)_rank_(\d+)\.pt$", re.ASCII),
     "optimizer state (not converted: FSDP1 keeps flat-parameter slices, FSDP2 per-parameter "
     "DTensors keyed by parameter index; resume with load_contents=['model'])"),
    (re.compile(r"^extra_state_world_size_(\d+)_rank_(\d+)\.pt$", re.ASCII),
     "LR scheduler and RNG state (not converted)"),
)
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(.+)\.(lora_A|lora_B)\.([A-Za-z0-9_]+)\.weight$")
"""PEFT's ``<module>.lora_A.<adapter name>.weight`` (verl trains one adapter, ``default``)."""
_MAX_DATA_PKL = 1 << 28
_BUFFER_SUFFIXES = (".e_score_correction_bias",)
"""IR tensors that are module *buffers* in transformers (FSDP never shards them): written as
plain tensors, as ``state_dict()`` holds them."""


def model_file_name(world_size: int, rank: int) -> str:
    return f"model_world_size_{world_size}_rank_{rank}.pt"


def scan_model_files(directory: Path) -> dict[tuple[int, int], Path]:
    """``(world_size, rank) -> path`` of every model file in ``directory``."""
    try:
        entries = list(directory.iterdir())
    except OSError as e:
        raise CorruptCheckpointError(f"cannot list {directory}: {e}", path=directory) from e
    found = {}
    for p in entries:
        m = MODEL_FILE.match(p.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = p
    return found


def read_fsdp_config(directory: Path) -> dict[str, Any] | None:
    """``fsdp_config.json``, checked: ``world_size`` a positive int; None when absent (verl
    saves before 2025-06-25 have none)."""
    path = directory / FSDP_CONFIG
    if not path.is_file():
        return None
    try:
        # Regular files of bounded size only (docs/safety.md), like every small file read.
        data = json.loads(read_text(path, FSDP_CONFIG))
    except ValueError as e:
        raise CorruptCheckpointError(f"{FSDP_CONFIG} is not valid JSON: {e}", path=path) from e
    world = data.get("world_size") if isinstance(data, dict) else None
    if type(world) is not int or world < 1:
        raise CorruptCheckpointError(f"{FSDP_CONFIG} has no positive integer world_size",
                                     path=path)
    return data


def chunk_box(n: int, parts: int, index: int) -> tuple[int, int]:
    """``(start, length)`` of chunk ``index`` of ``n`` rows cut in ``parts`` by the
    ``torch.chunk`` rule FSDP uses: ``ceil(n/parts)`` each, the last ones short or empty."""
    size = -(-n // parts) if parts else n
    start = min(n, index * size)
    return start, max(0, min(n, start + size) - start)


def _mesh_shape(mesh: Any, world: int) -> tuple[int, ...]:
    """The device mesh's shape: torch >= 2.10 pickles ``_layout`` (one flat layout per axis),
    older torch a ``mesh`` rank tensor; a mesh without either spans the world in one axis."""
    layout = getattr(mesh, "_layout", None)
    axes = getattr(layout, "axes", None)
    if isinstance(axes, tuple) and axes:
        shape = []
        for axis in axes:
            dims = getattr(axis, "shape", None)
            if not isinstance(dims, tuple) or not all(type(d) is int and d > 0 for d in dims):
                raise ValueError("a mesh axis without a valid shape")
            shape.append(math.prod(dims))
        return tuple(shape)
    ranks = getattr(mesh, "mesh", None)
    if isinstance(ranks, torch.Tensor) and ranks.dim() >= 1:
        return tuple(int(s) for s in ranks.shape)
    return (world,)


def _coordinates(rank: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    coords = []
    for size in reversed(shape):
        coords.append(rank % size)
        rank //= size
    return tuple(reversed(coords))


@dataclass(frozen=True, slots=True)
class _Piece:
    """Where one rank's local tensor goes in the global tensor: start and size per dim."""

    rank: int
    start: tuple[int, ...]
    size: tuple[int, ...]


class VerlFsdpReader:
    """Reads a verl FSDP role directory (``model_world_size_W_rank_r.pt`` files) as HF tensors.

    Only the rank files whose shards are needed are parsed (HSDP replicas are not); each is
    mapped privately and parsed by the restricted unpickler, so only ``data.pkl`` is read up
    front. :meth:`read` assembles one global tensor from its shards.
    """

    format: ClassVar[str] = "verl-fsdp"
    naming: ClassVar[str] = "hf"
    # The adapter reader (VerlFsdpAdapterReader) reads the LoRA tensors instead of the model.
    _ADAPTER: ClassVar[bool] = False

    def __init__(self, path: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                 trust_pickles: bool = False, config_candidates: Sequence[Path] = (),
                 base_config: ModelConfig | None = None) -> None:
        self.path = Path(path)
        self._trust = trust_pickles
        self._dropped: dict[str, str] = {}
        self._notes: list[str] = []
        self._maps: dict[int, mmap.mmap] = {}
        self._addresses: dict[int, int] = {}  # rank -> address of its mapping (locate)
        self._states: dict[int, Mapping[str, Any]] = {}
        self._touched: set[int] = set()
        self.world_size, self._files, self.fsdp_config = self._rank_files()
        first = self._state(0)
        self.lora = any(k.startswith(_PEFT_PREFIX) for k in first)
        if base_config is not None:
            self._config_dir: Path | None = None
            self.config = base_config
        else:
            self._config_dir = self._find_config(hf_config, config_candidates)
            self.config = ModelConfig.from_hf(load_hf_config(self._config_dir))
        self._specs: dict[str, TensorSpec] = {}
        self._pieces: dict[str, tuple[str, list[_Piece]]] = {}  # name -> (file key, pieces)
        self._plain: set[str] = set()
        self._sharded: set[str] = set()  # keys of FSDP1 ShardedTensors (no device mesh)
        self.mesh_names: tuple[str, ...] = ()
        self.mesh_shape: tuple[int, ...] = (self.world_size,)
        self._index(first)
        self._check_shards()
        self.params = NativeParams()
        if self._ADAPTER:
            return
        check_layer_count(self.config, len(self._specs), self.path / FSDP_CONFIG
                          if self._config_dir is None else self._config_dir / "config.json")
        if any(n.endswith(".mlp.experts.gate_up_proj") for n in self._specs):
            # transformers 5 holds experts fused in memory, and FSDP saves the live module.
            self.params = NativeParams(hf_experts="fused")
        self.config = drop_absent_mtp(self.config, self.naming, self.params, self._specs)
        for pattern, why in _NOT_WEIGHTS:
            names = sorted(p.name for p in self.path.iterdir() if pattern.match(p.name))
            if names:
                self._dropped[f"{pattern.pattern[1:].split('_world')[0]}_world_size_"
                              f"{self.world_size}_rank_*.pt ({len(names)} files)"] = why

    # ---- files ----

    def _rank_files(self) -> tuple[int, dict[int, Path], dict[str, Any] | None]:
        found = scan_model_files(self.path)
        config = read_fsdp_config(self.path)
        if not found:
            raise FormatError(f"{self.path} holds no model_world_size_W_rank_R.pt files",
                              path=self.path)
        sizes = sorted({w for w, _ in found})
        if config is not None:
            world = config["world_size"]
            other = [p.name for (w, _), p in sorted(found.items()) if w != world]
            if other:
                raise CorruptCheckpointError(
                    f"{other[0]} is from world size {int(MODEL_FILE.match(other[0]).group(1))} "
                    f"but {FSDP_CONFIG} says world_size {world}", path=self.path / other[0])
        elif len(sizes) > 1:
            raise CorruptCheckpointError(
                f"{self.path} mixes model files of world sizes {sizes} and has no "
                f"{FSDP_CONFIG} to say which is current", path=self.path)
        else:
            world = sizes[0]
            self._notes.append(f"no {FSDP_CONFIG} (a verl save before 2025-06-25): world "
                               f"size {world} from the file names")
        files = {r: p for (w, r), p in found.items() if w == world}
        for r in range(world):
            if r not in files:
                raise CorruptCheckpointError(
                    f"rank file {model_file_name(world, r)} is missing (world size {world})",
                    path=self.path / model_file_name(world, r))
        extra = sorted(r for r in files if r >= world)
        if extra:
            raise CorruptCheckpointError(
                f"{model_file_name(world, extra[0])} names rank {extra[0]} of a world of "
                f"{world}", path=files[extra[0]])
        return world, files, config

    def _state(self, rank: int) -> Mapping[str, Any]:
        state = self._states.get(rank)
        if state is not None:
            return state
        path = self._files[rank]
        if self._trust:
            if _names_sharded_tensors(path):
                # torch's ShardedTensor.__setstate__ raises outside a process group of the
                # saved rank and size; the restricted unpickler reads the same bytes as data.
                raise FormatError(
                    f"{path.name} holds FSDP1 ShardedTensors, which torch's own unpickler "
                    "(--trust-pickles) rebuilds only inside a process group of the saved rank "
                    "and world size; ckpt-ir reads them through its restricted unpickler: run "
                    "without --trust-pickles", path=path)
            obj = load_torch(path, trust=True)
        else:
            buffer = map_file(path)
            obj = load_torch_buffer(buffer, path=str(path))
            self._maps[rank] = buffer
            self._addresses[rank] = mapping_address(buffer)
        if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
            raise CorruptCheckpointError(f"{path.name} does not hold a state dict", path=path)
        if self._trust and any(type(v).__module__.startswith("torch.distributed")
                               for v in obj.values()):
            # torch's own unpickler rebuilds real DTensors / ShardedTensors, whose shards this
            # reader does not take apart; the restricted one reads every class verl writes.
            raise FormatError(
                f"{path.name} holds distributed tensors, which ckpt-ir reads through its "
                "restricted unpickler only: run without --trust-pickles", path=path)
        self._states[rank] = obj
        return obj

    def _find_config(self, explicit: str | os.PathLike | None,
                     candidates: Sequence[Path]) -> Path:
        if explicit is not None:
            return Path(explicit)
        for d in (self.path / HF_DIR, *candidates):
            if (d / "config.json").is_file():
                return d
        raise MissingConfigError(f"{self.path} has no {HF_DIR}/config.json; pass --hf-config "
                                 "DIR (the model's HF config)", path=self.path)

    # ---- index ----

    def _name(self, key: str) -> str | None:
        """The HF name of a state-dict key; None for what the other reader reads: LoRA
        tensors (model reader) or base weights (adapter reader)."""
        if not self.lora:
            return None if self._ADAPTER else key
        if not key.startswith(_PEFT_PREFIX):
            raise CorruptCheckpointError(f"{key!r} lacks the PEFT prefix the other keys have",
                                         path=self._files[0], tensor=key)
        name = key[len(_PEFT_PREFIX):]
        m = _LORA_KEY.match(name)
        if self._ADAPTER:
            # PEFT's names without the adapter name: module.lora_A.weight.
            return f"{m.group(1)}.{m.group(2)}.weight" if m else None
        if m or ".lora_" in name or ".adapter_" in name:
            return None
        return name.replace(".base_layer.", ".")

    def _index(self, first: Mapping[str, Any]) -> None:
        adapters = 0
        for key, value in first.items():
            name = self._name(key)
            if name is None:
                adapters += 1
                continue
            if isinstance(value, DTensorRecord):
                self._specs[name] = TensorSpec(name, value.shape, dtypes.from_torch(value.dtype))
                self._pieces[name] = (key, self._layout(key, value))
            elif isinstance(value, ShardedTensorRecord):
                self._specs[name] = TensorSpec(name, value.shape, dtypes.from_torch(value.dtype))
                self._pieces[name] = (key, self._sharded_layout(key, value))
                self._sharded.add(key)
            elif isinstance(value, torch.Tensor):
                self._specs[name] = TensorSpec(name, tuple(value.shape), dtypes.of(value))
                self._pieces[name] = (key, [_Piece(0, (0,) * value.dim(), tuple(value.shape))])
                self._plain.add(name)
            else:
                self._dropped[key] = f"not a tensor ({type(value).__name__})"
        if self._ADAPTER:
            if not self._specs:
                raise FormatError(f"{self.path} holds no LoRA adapter tensors", path=self.path)
            if adapters:
                self._dropped[f"{adapters} base model tensors"] = (
                    "base weights, not the adapter: convert / merge-adapter read them")
            return
        if adapters:
            if not self._specs:
                raise FormatError(
                    f"{self.path} holds only LoRA adapter tensors (verl's save_lora_only), no "
                    "base weights; use extract-adapter, or merge-adapter BASE "
                    f"{self.path} DST with the base model", path=self.path)
            self._dropped[f"{adapters} LoRA adapter tensors (lora_A / lora_B)"] = (
                "adapter weights, not base weights: extract-adapter or merge-adapter reads them")
            self._notes.append("a PEFT LoRA save: base weights read from the base_layer "
                               "tensors")
        if self.config.shares_output_with_embedding and "lm_head.weight" in self._specs \
                and "lm_head.weight" not in self.config.schema():
            del self._specs["lm_head.weight"]
            self._sharded.discard(self._pieces.pop("lm_head.weight")[0])
            self._dropped["lm_head.weight"] = "tied to model.embed_tokens.weight"

    def _layout(self, key: str, value: DTensorRecord) -> list[_Piece]:
        """The pieces that tile a DTensor: one rank per distinct box, replicas skipped."""
        spec = value.spec
        placements = getattr(spec, "placements", None)
        where = self._files[0]
        if not isinstance(placements, tuple) or not placements:
            raise CorruptCheckpointError(f"DTensor {key} has no placements", path=where,
                                         tensor=key)
        mesh = getattr(spec, "mesh", None)
        if not isinstance(mesh, DeviceMesh):
            raise CorruptCheckpointError(f"DTensor {key} has no device mesh", path=where,
                                         tensor=key)
        try:
            shape = _mesh_shape(mesh, self.world_size)
        except ValueError as e:
            raise CorruptCheckpointError(f"DTensor {key}: {e}", path=where, tensor=key) from e
        names = getattr(mesh, "_mesh_dim_names", None) or ()
        if len(placements) != len(shape) or math.prod(shape) != self.world_size:
            raise CorruptCheckpointError(
                f"DTensor {key} is placed on a mesh of shape {shape} with {len(placements)} "
                f"placements, in a world of {self.world_size} ranks", path=where, tensor=key)
        if not self.mesh_names:
            self.mesh_names, self.mesh_shape = tuple(str(n) for n in names), shape
        dims = len(value.shape)
        boxes: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        for rank in range(self.world_size):
            start, size = [0] * dims, list(value.shape)
            for axis, (p, c) in enumerate(zip(placements, _coordinates(rank, shape),
                                              strict=True)):
                if isinstance(p, Replicate):
                    continue
                if isinstance(p, Shard) and type(getattr(p, "dim", None)) is int \
                        and 0 <= p.dim < dims:
                    s, n = chunk_box(size[p.dim], shape[axis], c)
                    start[p.dim] += s
                    size[p.dim] = n
                    continue
                kind = "a strided shard (_StridedShard)" if isinstance(p, StridedShard) else \
                    "a pending reduction (Partial)" if isinstance(p, Partial) else repr(p)
                raise FormatError(f"DTensor {key} is placed as {kind} on mesh dimension "
                                  f"{axis}; ckpt-ir reads Shard and Replicate placements",
                                  path=where, tensor=key)
            boxes.setdefault((tuple(start), tuple(size)), rank)
        pieces = [_Piece(r, s, n) for (s, n), r in sorted(boxes.items(), key=lambda b: b[1])]
        if sum(math.prod(p.size) for p in pieces) != math.prod(value.shape):
            raise CorruptCheckpointError(f"the shards of {key} do not tile its shape "
                                         f"{value.shape}", path=where, tensor=key)
        return pieces

    def _sharded_layout(self, key: str, value: ShardedTensorRecord) -> list[_Piece]:
        """The pieces of an FSDP1 ShardedTensor: its metadata's shards (global offsets, sizes
        and rank), checked to tile the tensor exactly; empty shards are not read."""
        # The DCP reader's tiling check; imported here, its package costs 10-30 ms to import
        # and only ShardedTensor files need it.
        from ckpt_ir.converters.storage.dcp_files.regions import _coverage_problem

        where = self._files[0]
        self._check_process_group(0, key, value)
        meta = value.metadata
        if tuple(meta.size) != value.shape or meta.tensor_properties.dtype != value.dtype:
            raise CorruptCheckpointError(
                f"ShardedTensor {key} is {value.shape} {value.dtype} but its metadata says "
                f"{tuple(meta.size)} {meta.tensor_properties.dtype}", path=where, tensor=key)
        boxes, pieces = [], []
        for shard in meta.shards_metadata:
            rank = shard.placement._rank if shard.placement is not None else None
            if rank is None or rank >= self.world_size:
                raise CorruptCheckpointError(
                    f"ShardedTensor {key} places a shard on "
                    f"{'no rank' if rank is None else f'rank {rank}'} of a world of "
                    f"{self.world_size} ranks", path=where, tensor=key)
            box = (tuple(shard.shard_offsets), tuple(shard.shard_sizes))
            boxes.append(box)
            if math.prod(box[1]):
                pieces.append(_Piece(rank, *box))
        problem = _coverage_problem(value.shape, boxes)
        if problem is not None:
            raise CorruptCheckpointError(f"the shards of {key} do not tile its shape "
                                         f"{value.shape}: it {problem}", path=where, tensor=key)
        return sorted(pieces, key=lambda p: (p.rank, p.start))

    def _check_process_group(self, rank: int, key: str, value: ShardedTensorRecord) -> None:
        """The file was saved by its own rank of this world. Its sharding group may be part
        of the world (FSDP1 hybrid sharding: each group holds a replica); shard placements
        name global ranks either way, so rank 0's metadata places the first replica."""
        group, path = value.process_group, self._files[rank]
        if (group.global_rank, group.global_world_size) != (rank, self.world_size):
            raise CorruptCheckpointError(
                f"{path.name} holds ShardedTensor {key} saved by rank {group.global_rank} of a "
                f"world of {group.global_world_size}, not rank {rank} of {self.world_size}",
                path=path, tensor=key)
        if not group.local_rank < group.local_world_size <= self.world_size:
            raise CorruptCheckpointError(
                f"{path.name} holds ShardedTensor {key} saved by rank {group.local_rank} of a "
                f"process group of {group.local_world_size} in a world of {self.world_size}",
                path=path, tensor=key)

    def _check_sharded(self, key: str, spec: TensorSpec, pieces: list[_Piece]) -> None:
        """Each needed rank's file holds ``key`` as a ShardedTensor with rank 0's shape,
        dtype and shard metadata, saved by that rank, whose local shards are exactly the
        (non-empty) shards the metadata places on it, each a tensor of the shard's sizes and
        the tensor's dtype (its view already checked against its storage's bytes)."""
        boxes = _shard_boxes(self._state(0)[key])
        for rank in sorted({p.rank for p in pieces}):
            path = self._files[rank]
            value = self._state(rank).get(key)
            if not isinstance(value, ShardedTensorRecord):
                raise CorruptCheckpointError(
                    f"{path.name} has no ShardedTensor {key} (rank 0 has one)", path=path,
                    tensor=key)
            if value.shape != spec.shape or value.dtype != spec.dtype.torch:
                raise CorruptCheckpointError(
                    f"{path.name} says {key} is {value.shape} {value.dtype}, rank 0 says "
                    f"{spec.shape} {spec.dtype}", path=path, tensor=key)
            self._check_process_group(rank, key, value)
            if _shard_boxes(value) != boxes:
                raise CorruptCheckpointError(
                    f"{path.name} and rank 0 describe the shards of {key} differently",
                    path=path, tensor=key)
            held = []
            for shard in value.local_shards:
                sizes = tuple(shard.metadata.shard_sizes)
                if tuple(shard.tensor.shape) != sizes or shard.tensor.dtype != spec.dtype.torch:
                    raise CorruptCheckpointError(
                        f"{path.name} holds a {tuple(shard.tensor.shape)} {shard.tensor.dtype} "
                        f"shard of {key} whose metadata says {sizes} {spec.dtype}", path=path,
                        tensor=key)
                if math.prod(sizes):
                    held.append((tuple(shard.metadata.shard_offsets), sizes))
            placed = [(p.start, p.size) for p in pieces if p.rank == rank]
            if sorted(held) != placed:
                raise CorruptCheckpointError(
                    f"{path.name} holds the shards of {key} at offsets "
                    f"{[o for o, _ in sorted(held)]}, its metadata places "
                    f"{[o for o, _ in placed]} on rank {rank}", path=path, tensor=key)

    def _check_shards(self) -> None:
        """Every needed rank file holds each DTensor with rank 0's global shape and dtype and
        a local shard of the size the ``torch.chunk`` rule gives (each ShardedTensor: the
        shards its metadata places on that rank): checked on the pickles alone, before a byte
        of tensor data is read."""
        for name, (key, pieces) in self._pieces.items():
            if name in self._plain:
                continue
            spec = self._specs[name]
            if key in self._sharded:
                self._check_sharded(key, spec, pieces)
                continue
            for piece in pieces:
                local = self._local(piece, key, spec)
                if tuple(local.shape) != piece.size:
                    raise CorruptCheckpointError(
                        f"the shards of {key} do not tile it: rank {piece.rank} holds "
                        f"{tuple(local.shape)}, the torch.chunk rule gives {piece.size} for "
                        f"{spec.shape} on mesh {self.mesh_shape}",
                        path=self._files[piece.rank], tensor=key)
        self._touched.clear()

    # ---- Reader protocol ----

    def tensors(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def dropped(self) -> Mapping[str, str]:
        return self._dropped

    def read(self, name: str) -> torch.Tensor:
        entry = self._pieces.get(name)
        if entry is None:
            raise FormatError(f"tensor {name!r} is not in {self.path}", tensor=name)
        key, pieces = entry
        spec = self._specs[name]
        if name in self._plain:
            self._touched.add(0)
            return self._state(0)[key]
        out = torch.empty(spec.shape, dtype=spec.dtype.torch)
        for piece in pieces:
            local = self._local(piece, key, spec)
            if local.numel():
                out[tuple(slice(s, s + n) for s, n in zip(piece.start, piece.size,
                                                          strict=True))] = local
        return out

    def read_rows(self, name: str) -> tuple[torch.Tensor, ...] | None:
        """``name`` as its FSDP shards in row order, each the rank's local tensor (a view of
        its file's mapping, so the writer can copy its bytes file to file), when every shard
        is a full-width row block (``Shard(0)``, HSDP replicas skipped) and there are more
        than one; None otherwise (read it whole: plain tensors, shards of other dims)."""
        entry = self._pieces.get(name)
        if entry is None or name in self._plain:
            return None
        key, pieces = entry
        spec = self._specs[name]
        rows = sorted((p for p in pieces if math.prod(p.size)), key=lambda p: p.start)
        if not spec.shape or len(rows) < 2 or any(
                p.size[1:] != spec.shape[1:] or any(p.start[1:]) for p in rows):
            return None
        # _layout checked that the boxes tile the tensor, so sorted by row they are its rows.
        return tuple(self._local(p, key, spec) for p in rows)

    def locate(self, tensor: torch.Tensor) -> tuple[Path, int] | None:
        """The rank file and offset holding ``tensor``'s bytes, if it is a contiguous view
        of one of this reader's mappings (a local shard or plain tensor as stored: a
        ``torch.save`` zip stores each storage uncompressed, so its bytes are a file range).
        None under ``trust_pickles``: nothing is mapped."""
        for rank, address in self._addresses.items():
            offset = offset_in_mapping(tensor, address, len(self._maps[rank]))
            if offset is not None:
                return self._files[rank], offset
        return None

    def _local(self, piece: _Piece, key: str, spec: TensorSpec) -> torch.Tensor:
        rank = piece.rank
        state = self._state(rank)
        value = state.get(key)
        path = self._files[rank]
        if key in self._sharded:
            # _check_sharded matched this rank's local shards to the pieces placed on it.
            for shard in value.local_shards:
                if tuple(shard.metadata.shard_offsets) == piece.start:
                    self._touched.add(rank)
                    return shard.tensor
            raise InternalError(f"{path.name} lost its shard of {key} at {piece.start}")
        if not isinstance(value, DTensorRecord):
            raise CorruptCheckpointError(f"{path.name} has no DTensor {key} (rank 0 has one)",
                                         path=path, tensor=key)
        if value.shape != spec.shape or value.dtype != spec.dtype.torch:
            raise CorruptCheckpointError(
                f"{path.name} says {key} is {value.shape} {value.dtype}, rank 0 says "
                f"{spec.shape} {spec.dtype}", path=path, tensor=key)
        self._touched.add(rank)
        return value.local

    def source_files(self) -> SourceFiles:
        return carried_source_files([self._config_dir] if self._config_dir else [])

    def describe(self) -> dict[str, Any]:
        version = (self.fsdp_config or {}).get("FSDP_version")
        strategy = (self.fsdp_config or {}).get("fsdp_strategy")
        held = sorted({str(s.dtype).removeprefix("torch.") for s in self._specs.values()})
        mesh = "x".join(str(n) for n in self.mesh_shape)
        names = (", ".join(self.mesh_names) if self.mesh_names
                 else "ShardedTensor, no device mesh" if self._sharded
                 else "no DTensors (plain)")
        return {
            "world_size": self.world_size,
            "fsdp": (f"FSDP{version}" if version in (1, 2) else "not wrapped" if version == 0
                     else f"SkyRL {strategy}" if strategy else "unknown (no fsdp_config.json)"),
            "mesh": f"{mesh} ({names})",
            "rank_files_read": sorted({p.rank for _, ps in self._pieces.values() for p in ps}),
            "dtype": ", ".join(held),
            "lora": self._lora_text(),
            "config_from": str(self._config_dir or "the base model"),
            **({"notes": list(self._notes)} if self._notes else {}),
        }

    def _lora_text(self) -> str:
        if not self.lora:
            return "no"
        meta = self.path / LORA_META
        if meta.is_file():
            try:
                data = json.loads(read_text(meta, LORA_META))
                return f"yes (r={data.get('r')}, lora_alpha={data.get('lora_alpha')})"
            except (CheckpointError, ValueError, AttributeError):
                pass  # the adapter reader reports a bad lora_train_meta.json
        return "yes"

    def release(self) -> None:
        for rank in self._touched:
            buffer = self._maps.get(rank)
            if buffer is not None:
                buffer.madvise(mmap.MADV_DONTNEED)
        self._touched.clear()

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        self._addresses = {}
        self._states = {}
        for buffer in maps.values():
            try:
                buffer.close()
            except BufferError:
                pass  # a returned tensor still uses it; unmapped when that tensor dies


def _shard_boxes(value: ShardedTensorRecord) -> list[tuple[Any, ...]]:
    """A ShardedTensor's shards as ``(offsets, sizes, rank)``, in metadata order."""
    return [(tuple(m.shard_offsets), tuple(m.shard_sizes),
             None if m.placement is None else m.placement._rank)
            for m in value.metadata.shards_metadata]


def _names_sharded_tensors(path: Path) -> bool:
    """Whether a rank file's ``data.pkl`` names torch's ShardedTensor class: read as stored
    bytes (``torch.save`` zips are uncompressed), nothing unpickled. Used under
    ``trust_pickles`` only, before ``torch.load`` would fail on such a file."""
    try:
        with zipfile.ZipFile(path) as z:
            pickles = [i for i in z.infolist() if i.filename.endswith("/data.pkl")]
            if len(pickles) != 1 or pickles[0].file_size > _MAX_DATA_PKL:
                return False  # torch.load says what is wrong with it
            raw = z.read(pickles[0])
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return b"torch.distributed._shard.sharded_tensor.api" in raw


class VerlFsdpAdapterReader(VerlFsdpReader):
    """The PEFT LoRA adapter of a verl FSDP save (full or ``save_lora_only``), as HF PEFT
    tensors (``model.layers.0.self_attn.q_proj.lora_A.weight``, IR names of the adapter
    schema), assembled from their FSDP shards like the model's. Rank and alpha come from
    ``lora_train_meta.json`` (verl writes it since #5326), the targeted modules from the keys.
    """

    _ADAPTER: ClassVar[bool] = True

    def __init__(self, path: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                 trust_pickles: bool = False, config_candidates: Sequence[Path] = (),
                 lora_alpha: float | None = None, base_config: ModelConfig | None = None,
                 peft_export: Path | None = None) -> None:
        del peft_export  # only torch_dist adapters have an HF PEFT export beside them
        super().__init__(path, hf_config=hf_config, trust_pickles=trust_pickles,
                         config_candidates=config_candidates, base_config=base_config)
        meta = self._lora_meta()
        ranks = {s.shape[0] for n, s in self._specs.items() if n.endswith(".lora_A.weight")}
        r = meta.get("r") if isinstance(meta.get("r"), int) else None
        if r is None:
            if len(ranks) != 1:
                raise MissingConfigError(f"{self.path} has no {LORA_META} and its lora_A "
                                         f"tensors have ranks {sorted(ranks)}", path=self.path)
            r = ranks.pop()
        alpha = meta.get("lora_alpha")
        if lora_alpha is not None:
            alpha = lora_alpha
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise MissingConfigError(
                f"{self.path} has no {LORA_META} saying lora_alpha; pass --lora-alpha (the "
                "training's lora_alpha)", path=self.path)
        leaves = sorted({n.removesuffix(".lora_A.weight").rsplit(".", 1)[-1]
                         for n in self._specs if n.endswith(".lora_A.weight")})
        self.adapter = AdapterConfig.create(self.config, r=r, lora_alpha=alpha, leaves=leaves)

    def _lora_meta(self) -> dict[str, Any]:
        path = self.path / LORA_META
        if not path.is_file():
            return {}
        try:
            data = json.loads(read_text(path, LORA_META))
        except ValueError as e:
            raise CorruptCheckpointError(f"{LORA_META} is not valid JSON: {e}",
                                         path=path) from e
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"{LORA_META} is not a JSON object", path=path)
        return data

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "adapter": self.adapter.summary()}


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _DTensorRef:
    """A DTensor whose local shard is already in the archive: pickled as torch pickles a
    DTensor (``_rebuild_from_type_v2(_rebuild_wrapper_subclass, DTensor, args, state)``)."""

    ref: TensorRef
    spec: Any  # torch's DTensorSpec
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


class _DTensorPickler(_Pickler):
    def __init__(self, file: Any, archive: TorchZipWriter) -> None:
        super().__init__(file, protocol=2)
        self._archive = archive

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _DTensorRef):
            from torch.distributed.tensor import DTensor

            args = (DTensor, obj.dtype, obj.shape, obj.stride, 0, torch.strided,
                    torch.device("cpu"), False)
            state = (None, {"_local_tensor": obj.ref, "_spec": obj.spec})
            return (torch._tensor._rebuild_from_type_v2,
                    (torch._utils._rebuild_wrapper_subclass, DTensor, args, state))
        if type(obj) is torch.Tensor:
            # The device mesh's small rank map (pickled once per file): into the archive too.
            return super().reducer_override(self._archive.add_tensor(obj.contiguous()))
        return super().reducer_override(obj)


class _DTensorZipWriter(TorchZipWriter):
    """TorchZipWriter whose ``data.pkl`` pickles DTensor references as torch does."""

    def _pickler(self, file: io.BytesIO) -> pickle.Pickler:
        return _DTensorPickler(file, self)


class VerlFsdpWriter:
    """Writes ``model_world_size_{W}_rank_{r}.pt`` for every r < W (FSDP2 layout), plus
    ``fsdp_config.json`` and ``huggingface/`` (config, tokenizer)."""

    format: ClassVar[str] = "verl-fsdp"
    naming: ClassVar[str] = "hf"

    def __init__(self, directory: Path, config: ModelConfig, options: WriteOptions,
                 params: NativeParams | None = None) -> None:
        self.directory = Path(directory)
        self.config = config
        self.options = options
        self.params = params if params is not None else self.params_for(config, options)
        self.world_size = options.fsdp_world_size or 1
        if self.world_size < 1:
            raise FormatError(f"world size must be at least 1, not {self.world_size}")
        self._archives: list[_DTensorZipWriter] = []
        self._entries: list[OrderedDict[str, Any]] = []
        self._meshes: list[Any] = []
        self._order: list[str] = []
        self._pending: set[str] = set()

    @classmethod
    def params_for(cls, config: ModelConfig, options: WriteOptions) -> NativeParams:
        """HF names as the live module's ``state_dict()`` holds them, which is what FSDP saves
        and verl loads: transformers 5 keeps MoE experts fused in memory."""
        del config, options
        return NativeParams(hf_experts="fused")

    def begin(self, specs: Sequence[TensorSpec]) -> None:
        from torch.distributed.device_mesh import DeviceMesh as TorchMesh

        self._order = [s.name for s in specs]
        self._pending = set(self._order)
        self.directory.mkdir(parents=True, exist_ok=True)
        for r in range(self.world_size):
            # A mesh built without process groups (_init_backend=False): only pickled.
            self._meshes.append(TorchMesh("cpu", torch.arange(self.world_size),
                                          mesh_dim_names=("fsdp",), _init_backend=False,
                                          _rank=r))
            self._archives.append(_DTensorZipWriter(
                self.directory / model_file_name(self.world_size, r)))
            self._entries.append(OrderedDict())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._pending:
            raise InternalError(f"verl-fsdp writer was not told about {name} (or got it twice)")
        self._pending.discard(name)
        tensor = tensor.contiguous()
        plain = tensor.dim() == 0 or name.endswith(_BUFFER_SUFFIXES)
        for r, archive in enumerate(self._archives):
            if plain:
                self._entries[r][name] = archive.add_tensor(tensor)
                continue
            start, n = chunk_box(tensor.shape[0], self.world_size, r)
            local = tensor[start:start + n]
            ref = archive.add_tensor(local)
            self._entries[r][name] = _DTensorRef(ref, self._spec(r, local, tensor),
                                                 tuple(tensor.shape), tuple(tensor.stride()),
                                                 tensor.dtype)
        if not self._pending:
            self._close()

    def _spec(self, rank: int, local: torch.Tensor, full: torch.Tensor) -> Any:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor import Shard as TorchShard

        return DTensor.from_local(local, self._meshes[rank], [TorchShard(0)], run_check=False,
                                  shape=full.shape, stride=full.stride())._spec

    def _close(self) -> None:
        tied = self.config.shares_output_with_embedding and "lm_head.weight" not in self._order
        for r, archive in enumerate(self._archives):
            entries = self._entries[r]
            ordered: OrderedDict[str, Any] = OrderedDict()
            for name in self._order:
                ordered[name] = entries[name]
                if tied and name == "model.embed_tokens.weight":
                    # FSDP2 saves a tied output layer as its own DTensor over the embedding's
                    # storage, and verl loads strictly: both keys, one storage.
                    ordered["lm_head.weight"] = entries[name]
            archive.close(ordered)
        self._archives = []

    def finish(self, source: Any) -> None:
        if self._pending:
            raise InternalError(f"verl-fsdp writer finished with {len(self._pending)} "
                                "unwritten tensors")
        if self._archives:
            self._close()
        write_json(self.directory / FSDP_CONFIG, {"FSDP_version": 2,
                                                  "world_size": self.world_size})
        hf = self.directory / HF_DIR
        hf.mkdir(exist_ok=True)
        write_json(hf / "config.json", self.config.to_hf_dict(dtype=self.options.dtype))
        for name, path in source.source_files().files.items():
            if name != "config.json":
                shutil.copyfile(path, hf / name)

    def abort(self) -> None:
        for archive in self._archives:
            archive.abort()
        self._archives = []
