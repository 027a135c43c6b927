"""``hf``: a Hugging Face transformers model directory.

Reads ``model.safetensors``, sharded ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``, ``pytorch_model*.bin`` (through the restricted unpickler), or
the per-rank shards torch's ``HuggingFaceStorageWriter`` writes before consolidation
(``DCP_SHARDING_INFO``; :mod:`~ckpt_ir.converters.storage.dcp_safetensors`).
Mixture-of-experts experts may be per expert (what transformers saves) or fused (transformers
5's ``mlp.experts.gate_up_proj`` / ``down_proj``), an ``hf`` naming variant recognised from the
names and written with the ``hf_experts="fused"`` option.
Writes size-capped safetensors shards streamed tensor by tensor into pre-sized files, the index,
``config.json`` and the tokenizer / generation files carried from the source.
"""

from __future__ import annotations

import json
import logging
import os
import reprlib
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ckpt_ir import dtypes
from ckpt_ir.architectures import lookup
from ckpt_ir.converters.base import SourceFiles, WriteOptions
from ckpt_ir.converters.storage.hf_files import (
    carried_source_files,
    check_layer_count,
    load_hf_config,
)
from ckpt_ir.converters.storage.quantized import FP8_SCALE_SUFFIX, DequantizedView
from ckpt_ir.converters.storage.safetensors_file import (
    SafetensorsFile,
    SafetensorsWriter,
    read_header,
)
from ckpt_ir.dtypes import DType
from ckpt_ir.durable import SyncBehind, write_json
from ckpt_ir.errors import CorruptCheckpointError, FormatError, InternalError
from ckpt_ir.ir import ModelConfig, TensorSpec, dtype_name, parse_dtype
from ckpt_ir.probes import is_dcp_sharded_safetensors_dir
from ckpt_ir.quantization import (
    DEQUANTIZED_FROM,
    FP8_DTYPE,
    Quantization,
    fp8_scale_grid,
    is_fp8_linear,
    parse_quantization,
    quantize_fp8,
    target_quantization,
)
from ckpt_ir.safety.files import read_text
from ckpt_ir.slabs import FileSlab
from ckpt_ir.tables import NativeParams, build_table, drop_absent_mtp

if TYPE_CHECKING:
    import torch

    from ckpt_ir.converters.storage.dcp_safetensors import ShardedSafetensors

__all__ = ["HfReader", "HfWriter", "is_hf_dir"]

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
FUSED_EXPERTS_SUFFIX = ".mlp.experts.gate_up_proj"
BIN_INDEX = "pytorch_model.bin.index.json"

def is_hf_dir(path: Path) -> bool:
    """A directory with config.json and HF weight files."""
    if not (path / "config.json").is_file():
        return False
    return any((path / n).is_file() for n in ("model.safetensors", SAFETENSORS_INDEX,
                                               "pytorch_model.bin", BIN_INDEX))


def _read_index(path: Path) -> dict[str, str]:
    text = read_text(path, path.name)
    try:
        data = json.loads(text)
        weight_map = data["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as e:
        # ValueError: JSONDecodeError, and integers past Python's 4300-digit limit, which
        # json raises as a plain ValueError; RecursionError: absurdly nested arrays.
        raise CorruptCheckpointError(f"{path.name} is not a valid weight index: {e}",
                                     path=path) from e
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CorruptCheckpointError(f"{path.name}: weight_map must map names to file names",
                                     path=path)
    for file in set(weight_map.values()):
        if Path(file).name != file:
            raise CorruptCheckpointError(f"{path.name} lists {file!r}, which is not a file in "
                                         "the checkpoint directory", path=path)
        if not (path.parent / file).is_file():
            raise CorruptCheckpointError(f"shard {file} listed in {path.name} is missing",
                                         path=path.parent / file)
    return weight_map


class HfReader:
    """Lazy reader of an HF model directory; tensors are zero-copy mmap views."""

    format: ClassVar[str] = "hf"
    naming: ClassVar[str] = "hf"

    def __init__(self, path: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                 trust_pickles: bool = False, config_candidates: Sequence[Path] = ()) -> None:
        self.path = Path(path)
        self._config_dir = Path(hf_config) if hf_config else self.path
        self.config = ModelConfig.from_hf(load_hf_config(self._config_dir))
        self.params = NativeParams()
        self._specs: dict[str, TensorSpec] = {}
        self._where: dict[str, str] = {}
        self._ranges: dict[str, tuple[Path, int, int]] = {}  # safetensors bytes, for readahead
        self._open: dict[str, SafetensorsFile] = {}
        self._bin: dict[str, torch.Tensor] = {}
        self._sharded: ShardedSafetensors | None = None
        self._trust = trust_pickles
        self.has_data = True
        self._kind = self._scan()
        # Quantized weights (block FP8, MXFP4) are presented dequantized: the scales are
        # consumed here, so the tables and the planner see the model's own tensors.
        self._view = DequantizedView(parse_quantization(self.config.hf), self._specs,
                                     self._read_raw)
        self._specs = dict(self._view.specs)
        check_layer_count(self.config, len(self._specs), self._config_dir / "config.json")
        # transformers 5 can hold experts fused (gate_up_proj / down_proj): the same IR under
        # another hf naming variant, recognised by its names.
        if any(n.endswith(FUSED_EXPERTS_SUFFIX) for n in self._specs):
            self.params = NativeParams(hf_experts="fused")
        # Families whose fused experts come in two orientations say which one these are.
        record = lookup(self.config.architecture)
        if record is not None and record.hf_expert_layout is not None and self.has_data:
            self.params = NativeParams(hf_experts=record.hf_expert_layout(
                self.config, {n: s.shape for n, s in self._specs.items()}))
        self.config = drop_absent_mtp(self.config, self.naming, self.params, self._specs)

    def _scan(self) -> str:
        p = self.path
        expected: dict[str, str] | None = None
        if (p / SAFETENSORS_INDEX).is_file():
            expected = _read_index(p / SAFETENSORS_INDEX)
            files = sorted(set(expected.values()))
        elif (p / "model.safetensors").is_file():
            files = ["model.safetensors"]
        elif (p / BIN_INDEX).is_file() or (p / "pytorch_model.bin").is_file():
            self._scan_bin()
            return "pytorch_model.bin"
        elif is_dcp_sharded_safetensors_dir(p):
            # Imported here: its DCP reader needs torch, and a plain HF directory does not.
            from ckpt_ir.converters.storage.dcp_safetensors import ShardedSafetensors

            self._sharded = ShardedSafetensors(p)
            self._specs.update(self._sharded.specs)
            return "torch HF sharded safetensors (DCP_SHARDING_INFO), consolidated on read"
        else:
            self._scan_config_only()
            return "config only"
        for file in files:
            header = read_header(p / file)
            for name, entry in header.entries.items():
                if name in self._specs:
                    raise CorruptCheckpointError(f"tensor {name} appears in two shards",
                                                 path=p / file, tensor=name)
                self._specs[name] = TensorSpec(name, tuple(entry.shape), entry.dtype)
                self._where[name] = file
                self._ranges[name] = (p / file, header.data_offset + entry.start, entry.nbytes)
        if expected is not None:
            for name, file in expected.items():
                if self._where.get(name) != file:
                    raise CorruptCheckpointError(
                        f"{SAFETENSORS_INDEX} lists {name} in {file}, but that shard does not "
                        "hold it", path=p / file, tensor=name)
        return "safetensors"

    def _scan_config_only(self) -> None:
        """Shape-only tensors from the config (dtype from its ``dtype`` / ``torch_dtype``):
        plans and dry runs work; reading data does not."""
        name = self.config.hf.get("dtype") or self.config.hf.get("torch_dtype") or "bfloat16"
        dtype = parse_dtype(str(name))
        # The names this family writes (the hf table: a VL model's model.language_model.*, its
        # fused experts), shaped from the schema.
        schema = self.config.schema()
        for b in build_table("hf", self.config, self.params).bindings:
            shape = b.transform.shapes({role: schema[ir] for role, ir in b.ir.items()})
            self._specs[b.native] = TensorSpec(b.native, tuple(shape), dtype)
        self.has_data = False

    def _scan_bin(self) -> None:
        import torch

        from ckpt_ir.safety.unpickler import load_torch

        p = self.path
        files = sorted(set(_read_index(p / BIN_INDEX).values())) if (p / BIN_INDEX).is_file() \
            else ["pytorch_model.bin"]
        for file in files:
            state = load_torch(p / file, trust=self._trust)
            if not isinstance(state, Mapping):
                raise CorruptCheckpointError(f"{file} does not hold a state dict", path=p / file)
            for name, t in state.items():
                if not isinstance(name, str):
                    raise CorruptCheckpointError(f"{file} holds a state dict with a non-string "
                                                 f"key {reprlib.repr(name)}", path=p / file)
                if not isinstance(t, torch.Tensor):
                    continue
                self._bin[name] = t
                self._specs[name] = TensorSpec(name, tuple(t.shape), dtypes.of(t))
                self._where[name] = file

    def tensors(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def dropped(self) -> Mapping[str, str]:
        return {}

    @property
    def quantization(self) -> str | None:
        """What a quantized source holds and becomes (plans and ``--dry-run`` print it)."""
        return self._view.describe()

    def read(self, name: str) -> torch.Tensor:
        return self._view.read(name)

    def dequantize_to(self, dtype: DType | None) -> None:
        self._view.dequantize_to(dtype)

    def byte_ranges(self, name: str) -> tuple[tuple[Path, int, int], ...]:
        return tuple(self._ranges[raw] for raw in self._view.raw_names(name)
                     if raw in self._ranges)

    def _read_raw(self, name: str) -> torch.Tensor:
        if not self.has_data:
            raise FormatError(f"{self.path} holds a config but no weights; only --dry-run can "
                              "plan it", path=self.path)
        if name in self._bin:
            return self._bin[name]
        if self._sharded is not None:
            return self._sharded.read(name)
        file = self._where.get(name)
        if file is None:
            raise FormatError(f"tensor {name!r} is not in {self.path}", tensor=name)
        handle = self._open.get(file)
        if handle is None:
            handle = self._open[file] = SafetensorsFile(self.path / file)
        return handle.get(name)

    def source_files(self) -> SourceFiles:
        return carried_source_files((self.path, self._config_dir))

    def describe(self) -> dict[str, Any]:
        files = self._sharded.files if self._sharded is not None \
            else sorted(set(self._where.values()))
        out = {"weights": self._kind, "files": files, "config_from": str(self._config_dir)}
        if self._view.quant is not None:
            out["quantization"] = self._view.describe()
        return out

    def locate(self, tensor: torch.Tensor) -> tuple[Path, int] | None:
        """The file and offset of ``tensor``'s bytes, if it is a zero-copy view of one of the
        open safetensors files."""
        for handle in self._open.values():
            offset = handle.locate(tensor)
            if offset is not None:
                return Path(handle.path), offset
        return self._sharded.locate(tensor) if self._sharded is not None else None

    def release(self) -> None:
        for f in self._open.values():
            f.release()
        if self._sharded is not None:
            self._sharded.release()

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
        if self._sharded is not None:
            self._sharded.close()
        self._bin.clear()


def _read_file_slab(slab: FileSlab) -> torch.Tensor:
    """A FileSlab's bytes as a tensor (a writer that must compute on them, not copy them)."""
    import torch

    data = bytearray(slab.nbytes)
    view, done = memoryview(data), 0
    while done < slab.nbytes:
        n = os.preadv(slab.fd, [view[done:]], slab.offset + done)
        if n == 0:
            raise InternalError("source file ended inside a located slab")
        done += n
    return torch.frombuffer(data, dtype=slab.dtype) if data else torch.empty(0, dtype=slab.dtype)


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class HfWriter:
    """Streams tensors into pre-sized safetensors shards of at most ``max_shard_bytes``."""

    format: ClassVar[str] = "hf"
    naming: ClassVar[str] = "hf"

    def __init__(self, directory: Path, config: ModelConfig, options: WriteOptions,
                 params: NativeParams | None = None) -> None:
        self.directory = directory
        self.config = config
        self.options = options
        # The params the plan was built with (params_for runs once per conversion).
        self.params = params if params is not None else self.params_for(config, options)
        self._shard_of: dict[str, int] = {}
        self._entries: list[list[tuple[str, DType, tuple[int, ...]]]] = []
        self._pending: list[int] = []
        self._writers: dict[int, SafetensorsWriter] = {}
        # Complete shards are fsynced and closed behind the copying of the next ones.
        self._sync_behind = SyncBehind()
        self._names: list[str] = []
        self._dtypes: set[DType] = set()
        self._total = 0
        # --quantize fp8: 2-D linear weights are written as block FP8 with their scales, in
        # the source's block format when its config had one (the round trip keeps it).
        self._quant: Quantization | None = None
        self._fp8: set[str] = set()
        if options.quantize == "fp8":
            self._quant = target_quantization(config.hf)

    @classmethod
    def params_for(cls, config: ModelConfig, options: WriteOptions) -> NativeParams:
        """HF names carry no padding; MoE experts per expert (default) or fused."""
        return NativeParams(hf_experts=options.hf_experts)

    def begin(self, specs: Sequence[TensorSpec]) -> None:
        if self._quant is not None:
            specs = self._quantized_specs(specs, self._quant)
        cap = self.options.max_shard_bytes
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            # A tensor larger than the cap gets a shard of its own, as transformers does. An
            # FP8 weight's scale stays in its shard: the weight's file is the one a process
            # writing it owns (torchrun splits work by file).
            scale = self._quant is not None and s.name.endswith(FP8_SCALE_SUFFIX)
            if shards[-1] and size + s.nbytes > cap and not scale:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += s.nbytes
        self._names = _shard_names(len(shards))
        for i, shard in enumerate(shards):
            # Widest dtypes first keeps every tensor aligned to its item size in the file
            # (zero-copy reads); the writer accepts tensors in any order.
            ordered = sorted(shard, key=lambda s: -s.dtype.itemsize)
            self._entries.append([(s.name, s.dtype, s.shape) for s in ordered])
            self._pending.append(len(shard))
            for s in shard:
                self._shard_of[s.name] = i
                # An FP8 export's dtype is that of its unquantized tensors (the releases say
                # bfloat16), not its FP8 weights' or their scales'.
                if s.name not in self._fp8 and not s.name.endswith(FP8_SCALE_SUFFIX):
                    self._dtypes.add(s.dtype)
                self._total += s.nbytes

    def _quantized_specs(self, specs: Sequence[TensorSpec],
                         quant: Quantization) -> list[TensorSpec]:
        """Each weight the releases quantize as ``float8_e4m3fn`` followed by its float32
        ``weight_scale_inv``; the rest as planned."""

        out: list[TensorSpec] = []
        for s in specs:
            if not (s.dtype.is_floating_point and is_fp8_linear(s.name, s.shape, quant)):
                out.append(s)
                continue
            self._fp8.add(s.name)
            out.append(TensorSpec(s.name, s.shape, FP8_DTYPE))
            grid = fp8_scale_grid(s.shape, quant.block)
            out.append(TensorSpec(s.name + FP8_SCALE_SUFFIX, grid, dtypes.FLOAT32))
        return out

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._fp8:
            self._write_fp8(name, tensor)
            return
        i, w = self._shard(name)
        w.write(name, tensor)
        self._written(i)

    def _write_fp8(self, name: str, tensor: torch.Tensor) -> None:
        assert self._quant is not None
        q, scale = quantize_fp8(tensor, self._quant.block, ue8m0=self._quant.ue8m0)
        for n, t in ((name, q), (name + FP8_SCALE_SUFFIX, scale)):
            i, w = self._shard(n)
            w.write(n, t)
            self._written(i)

    accepts_file_slabs: ClassVar[bool] = True

    def write_slabs(self, name: str, slabs: Iterable[torch.Tensor | FileSlab]) -> None:
        """Write ``name`` from row-major pieces (fused experts, padded rows: never joined)."""
        import torch

        if name in self._fp8:
            # Block amax spans rows of every slab: quantizing needs the whole weight, which
            # is the one tensor this writer holds.
            parts = [_read_file_slab(s) if isinstance(s, FileSlab) else s for s in slabs]
            shape = next(sp for n, _, sp in self._entries[self._shard_of[name]] if n == name)
            self._write_fp8(name, torch.cat([p.reshape(-1) for p in parts]).reshape(shape))
            return
        i, w = self._shard(name)
        w.write_slabs(name, slabs)
        self._written(i)

    def _shard(self, name: str) -> tuple[int, SafetensorsWriter]:
        i = self._shard_of.get(name)
        if i is None:
            raise InternalError(f"hf writer was not told about {name}")
        w = self._writers.get(i)
        if w is None:
            w = self._writers[i] = SafetensorsWriter(self.directory / self._names[i],
                                                     self._entries[i], {"format": "pt"})
        return i, w

    def _written(self, i: int) -> None:
        """One more tensor of shard ``i`` is down; the last one hands the shard over to be
        fsynced and closed (:class:`SyncBehind`; ``finish_rank`` waits for it)."""
        self._pending[i] -= 1
        if self._pending[i] == 0:
            self._sync_behind.hand_over(self._writers.pop(i).close)

    def file_of(self, name: str) -> str | None:
        return self._names[self._shard_of[name]]

    def finish_rank(self) -> None:
        """Every shard this process started is complete and durable (shards close as they
        fill, their fsyncs run behind the writing)."""
        self._sync_behind.drain()
        if self._writers:
            open_shards = sorted(self._names[i] for i in self._writers)
            raise InternalError(f"hf writer finished with incomplete shards {open_shards}")

    def finish(self, source) -> None:
        self.finish_rank()
        if any(self._pending):
            raise InternalError("hf writer finished with unwritten tensors")
        self.finish_all(source, [None])

    def finish_all(self, source, parts: Sequence[object]) -> None:
        """Index, config and carried files: rank 0, after every shard is durable."""
        if len(self._names) > 1:
            write_json(self.directory / SAFETENSORS_INDEX, {
                "metadata": {"total_size": self._total},
                "weight_map": {n: self._names[i] for n, i in sorted(self._shard_of.items())},
            })
        dtypes = self._dtypes
        dtype = self.options.dtype or (next(iter(dtypes)) if len(dtypes) == 1 else None)
        config = self.config.to_hf_dict(dtype=dtype)
        if dtype is not None:
            config["dtype"] = dtype_name(dtype)
        if self._quant is not None:
            config.pop(DEQUANTIZED_FROM, None)
            config["quantization_config"] = self._quant.to_hf()
        write_json(self.directory / "config.json", config)
        for name, path in source.source_files().files.items():
            shutil.copyfile(path, self.directory / name)

    def abort(self) -> None:
        for w in self._writers.values():
            w.abort()
        self._writers.clear()
        try:  # closes the handed-over shards' files before the caller removes them
            self._sync_behind.drain()
        except Exception:
            pass  # already failing: the first error is the caller's
