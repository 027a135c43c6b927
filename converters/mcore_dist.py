"""``mcore-dist``: Megatron-Core ``dist_checkpointing`` directories with the torch_dist backend.

On disk (measured with megatron-core 0.16.1; see docs/formats/mcore-dist.md)::

    metadata.json        {"sharded_backend": "torch_dist", ...}   written last: the commit mark
    .metadata            pickled DCP Metadata: key -> global shape, dtype, chunks -> byte ranges
    __0_0.distcp         torch.save archives of tensor chunks and objects, back to back
    common.pt            non-sharded state for megatron-core <= 0.18
    (0.19+ keeps that state as the object ``common_state/shard_0_1`` inside the DCP files)

Uniform decoder layers are *stacked*: ``decoder.layers.<param>`` has global shape ``[L, ...]``
and the layer index is a chunk offset on axis 0, so pipeline stages are invisible in keys. This
module maps those keys to per-layer native names ``decoder.layers.{l}.<param>`` (the ``mcore``
naming of :mod:`ckpt_ir.tables`) and back; it writes one chunk per layer, never a stacked
in-memory tensor. The layout is TP-invariant (fused QKV in whole groups, fc1 as
``[gate; up]``), so any TP/PP loads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from ckpt_ir.converters.base import SourceFiles, WriteOptions
from ckpt_ir.converters.storage.dcp_files import DcpDataFile, DcpReader, write_metadata
from ckpt_ir.converters.storage.hf_files import (
    carried_files,
    check_layer_count,
    load_hf_config,
)
from ckpt_ir.detect import read_json_file
from ckpt_ir.errors import (
    CheckpointError,
    CorruptCheckpointError,
    FormatError,
    InternalError,
    MissingConfigError,
)
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.megatron_config import hf_config_from_megatron, padded_vocab_size
from ckpt_ir.safety.unpickler import load_torch
from ckpt_ir.tables import NativeParams

__all__ = ["EXTRA_STATE_MODULES", "HF_CONFIG_DIR", "McoreDistReader", "McoreDistWriter"]

log = logging.getLogger(__name__)

HF_CONFIG_DIR = "hf_config"
"""ckpt-ir stores the HF config and tokenizer files here, beside the torch_dist files."""

_STACKED = re.compile(r"^decoder\.layers\.(?!\d+\.)(.+)$")
_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# `_extra_state` objects a GPTModel requests per layer. The local spec asks for the four linear
# layers; the TE spec also for core attention. Writing the union loads under megatron-core's
# default strictness with either spec (it ignores checkpoint keys the model does not request).
EXTRA_STATE_MODULES: Mapping[str, tuple[str, ...]] = {
    "local": ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
              "mlp.linear_fc2"),
    "te": ("self_attention.linear_qkv", "self_attention.linear_proj",
           "self_attention.core_attention", "mlp.linear_fc1", "mlp.linear_fc2"),
}
EXTRA_STATE_MODULES = {**EXTRA_STATE_MODULES,
                       "any": tuple(dict.fromkeys(EXTRA_STATE_MODULES["local"]
                                                  + EXTRA_STATE_MODULES["te"]))}

# A bare model save has an empty common state (verified with megatron-core 0.16.1).
_COMMON_STATE: dict[str, Any] = {}

METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}


def _blob_reason(fqn: str) -> str:
    if "_extra_state" in fqn:
        return "extra state object (TE FP8 metadata), not a weight"
    if fqn.startswith("common_state"):
        return "common state object (training arguments, iteration)"
    if fqn.startswith("rng_state"):
        return "RNG state"
    if fqn.startswith("optimizer"):
        return "optimizer state"
    return "non-tensor object"


class McoreDistReader:
    """Reads a torch_dist directory chunk by chunk, without megatron-core."""

    format: ClassVar[str] = "mcore-dist"
    naming: ClassVar[str] = "mcore"

    def __init__(self, path: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                 trust_pickles: bool = False,
                 config_candidates: Sequence[Path] = ()) -> None:
        self.path = Path(path)
        self._trust = trust_pickles
        meta = self.path / "metadata.json"
        if meta.is_file():
            backend = read_json_file(meta).get("sharded_backend")
            if backend != "torch_dist":
                raise FormatError(f"sharded_backend {backend!r} is not supported (torch_dist "
                                  "only; zarr was removed in megatron-core 0.16)", path=meta)
        else:
            log.warning("%s has no metadata.json: the save may not have completed", self.path)
        self._dcp = DcpReader(self.path, trust=trust_pickles)
        self._natives: dict[str, tuple[str, int | None]] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._dropped: dict[str, str] = {}
        for fqn, t in self._dcp.index.tensors.items():
            if fqn.startswith("optimizer."):
                self._dropped[fqn] = "optimizer state"
                continue
            m = _STACKED.match(fqn)
            if m and len(t.shape) >= 1:
                # A non-empty stack is bounded by its chunks' bytes (checked by the index); an
                # empty one could claim any number of layers, each becoming a name here.
                if math.prod(t.shape) == 0 and t.shape[0] > max(len(t.chunks), 1):
                    raise CorruptCheckpointError(
                        f"stacked tensor {fqn!r} declares {t.shape[0]} layers of no data",
                        path=self.path / ".metadata", tensor=fqn)
                for layer in range(t.shape[0]):
                    name = f"decoder.layers.{layer}.{m.group(1)}"
                    self._natives[name] = (fqn, layer)
                    self._specs[name] = TensorSpec(name, tuple(t.shape[1:]), t.dtype)
            else:
                self._natives[fqn] = (fqn, None)
                self._specs[fqn] = TensorSpec(fqn, tuple(t.shape), t.dtype)
        for fqn in self._dcp.index.blobs:
            self._dropped[fqn] = _blob_reason(fqn)
        self._config_source, hf = self._find_config(hf_config, config_candidates)
        self.config = ModelConfig.from_hf(hf)
        check_layer_count(self.config, len(self._specs), self._config_source)
        emb = self._specs.get("embedding.word_embeddings.weight")
        padded = emb.shape[0] if emb is not None else None
        self.params = NativeParams(padded_vocab_size=padded, norm_style="te")

    # -- config -------------------------------------------------------------------------------

    def _vocab_rows(self) -> int | None:
        t = self._dcp.index.tensors.get("embedding.word_embeddings.weight")
        return t.shape[0] if t is not None else None

    def _common_state(self) -> Any:
        if (self.path / "common.pt").is_file():
            return load_torch(self.path / "common.pt", trust=self._trust)
        if "common_state/shard_0_1" in self._dcp.index.blobs:
            obj = self._dcp.read_object("common_state/shard_0_1")
            return obj[0] if isinstance(obj, list) and obj else obj
        return None

    def _find_config(self, explicit: str | os.PathLike | None,
                     candidates: Sequence[Path]) -> tuple[str, dict[str, Any]]:
        """HF config from, in order: --hf-config, ckpt-ir's own copy, verl's huggingface/ or
        transformer_config.json, Megatron-Bridge run_config.yaml, Megatron-LM args."""
        if explicit is not None:
            return str(explicit), load_hf_config(Path(explicit))
        own = self.path / HF_CONFIG_DIR
        if (own / "config.json").is_file():
            return str(own), load_hf_config(own)
        for c in candidates:
            if c.is_dir() and (c / "config.json").is_file():
                return str(c), load_hf_config(c)
        for c in candidates:
            if c.is_file() and c.name == "transformer_config.json":
                return str(c), self._from_megatron(read_json_file(c), c)
        run_config = self.path / "run_config.yaml"
        if run_config.is_file():
            try:
                data = yaml.safe_load(run_config.read_text())
            except (OSError, yaml.YAMLError) as e:
                raise CorruptCheckpointError(f"run_config.yaml is not valid YAML: {e}",
                                             path=run_config) from e
            model = data.get("model") if isinstance(data, dict) else None
            if isinstance(model, dict):
                return str(run_config), self._from_megatron(model, run_config)
        common = self._common_state()
        args = common.get("args") if isinstance(common, Mapping) else None
        if args is not None:
            where = self.path / "common.pt" if (self.path / "common.pt").is_file() \
                else self.path / "common_state/shard_0_1"
            if isinstance(args, argparse.Namespace):
                args = vars(args)
            if not isinstance(args, Mapping):
                raise CorruptCheckpointError(
                    f"the Megatron-LM args in {where.name} are a {type(args).__qualname__}, "
                    "not a namespace", path=where)
            return "common state args", self._from_megatron(args, where)
        raise MissingConfigError(
            f"{self.path} carries no model config (no hf_config/, huggingface/config.json, "
            "transformer_config.json, run_config.yaml or Megatron-LM args); pass --hf-config DIR",
            path=self.path)

    def _from_megatron(self, fields: Mapping[str, Any], where: Path) -> dict[str, Any]:
        """An HF config from Megatron arguments read from ``where`` (untrusted values)."""
        try:
            vocab = fields.get("vocab_size") or self._vocab_rows()
            return hf_config_from_megatron(dict(fields), vocab_size=vocab)
        except (TypeError, ValueError, ArithmeticError) as e:
            # int("x"), int(inf), hidden // 0 heads: a malformed argument, not our bug.
            raise CorruptCheckpointError(f"malformed Megatron arguments in {where.name}: {e}",
                                         path=where) from e

    # -- Reader protocol ----------------------------------------------------------------------

    def tensors(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def dropped(self) -> Mapping[str, str]:
        return self._dropped

    def read(self, name: str) -> torch.Tensor:
        try:
            fqn, layer = self._natives[name]
        except KeyError:
            raise FormatError(f"tensor {name!r} is not in {self.path}", tensor=name) from None
        t = self._dcp.index.tensors[fqn]
        if layer is None:
            return self._dcp.read_region(fqn, (0,) * len(t.shape), t.shape)
        region = self._dcp.read_region(fqn, (layer,) + (0,) * (len(t.shape) - 1),
                                       (1, *t.shape[1:]))
        return region[0]

    def source_files(self) -> SourceFiles:
        src = Path(self._config_source)
        if not src.is_dir():
            return SourceFiles({})
        return SourceFiles(carried_files([src]))

    def describe(self) -> dict[str, Any]:
        stacked = sorted({fqn for fqn, layer in self._natives.values() if layer is not None})
        return {
            "config_from": self._config_source,
            "dcp_tensors": len(self._dcp.index.tensors),
            "dcp_objects": len(self._dcp.index.blobs),
            "layer_stacked_keys": len(stacked),
            "padded_vocab_size": self.params.padded_vocab_size,
            "generation": "<=0.18 (common.pt)" if (self.path / "common.pt").is_file()
            else ">=0.19 (common_state object)",
        }

    def release(self) -> None:
        self._dcp.release()

    def close(self) -> None:
        self._dcp.close()


class McoreDistWriter:
    """Writes a torch_dist directory that megatron-core 0.16 - 0.19 GPTModels load."""

    format: ClassVar[str] = "mcore-dist"
    naming: ClassVar[str] = "mcore"

    def __init__(self, directory: Path, config: ModelConfig, options: WriteOptions) -> None:
        self.directory = directory
        self.config = config
        self.options = options
        self.spec = options.extra.get("mcore_spec", "any")
        if self.spec not in EXTRA_STATE_MODULES:
            raise FormatError(f"mcore_spec must be one of {sorted(EXTRA_STATE_MODULES)}, "
                              f"not {self.spec!r}")
        self.params = self.params_for(config, options)
        self._where: dict[str, tuple[str, tuple[int, ...], bool]] = {}
        self._globals: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._data: DcpDataFile | None = None

    @classmethod
    def params_for(cls, config: ModelConfig, options: WriteOptions) -> NativeParams:
        """torch_dist uses TE-style norm keys for both layer specs; vocab padded on request."""
        return NativeParams(
            padded_vocab_size=padded_vocab_size(config.vocab_size, options.pad_vocab_to_multiple),
            norm_style="te")

    def begin(self, specs: Sequence[TensorSpec]) -> None:
        num_layers = self.config.num_layers
        for s in specs:
            m = _PER_LAYER.match(s.name)
            if m:
                key, layer = f"decoder.layers.{m.group(2)}", int(m.group(1))
                shape = (num_layers, *s.shape)
                offsets = (layer,) + (0,) * len(s.shape)
                stacked = True
            else:
                key, shape, offsets, stacked = s.name, s.shape, (0,) * len(s.shape), False
            prev = self._globals.get(key)
            if prev is not None and prev != (shape, s.dtype):
                raise InternalError(f"layers of {key} disagree on shape or dtype")
            self._globals[key] = (shape, s.dtype)
            self._where[s.name] = (key, offsets, stacked)
        # torch DCP names data files __<rank>_<i>.distcp; each process appends to its own.
        self._data = DcpDataFile(self.directory, f"__{self.options.rank}_0.distcp")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._data is None:
            raise InternalError("mcore-dist writer used before begin()")
        key, offsets, stacked = self._where[name]
        self._data.add_tensor(key, offsets, tensor.unsqueeze(0) if stacked else tensor)

    def file_of(self, name: str) -> str | None:
        return None  # every rank appends its chunks to its own data file

    def finish_rank(self) -> list:
        """Close this rank's data file; rank 0 also stores the objects. Returns its records."""
        if self._data is None:
            raise InternalError("mcore-dist writer finished before begin()")
        if self.options.rank == 0:
            num_layers = self.config.num_layers
            for module in EXTRA_STATE_MODULES[self.spec]:
                for layer in range(num_layers):
                    fqn = f"decoder.layers.{module}._extra_state/shard_{layer}_{num_layers}"
                    self._data.add_object(fqn, [None])
            # megatron-core >= 0.19 reads common state from this object; <= 0.18 from
            # common.pt (written in finish_all).
            self._data.add_object("common_state/shard_0_1", [_COMMON_STATE])
        records = self._data.close(fsync=True)
        self._data = None
        return records

    def finish(self, source) -> None:
        self.finish_all(source, [self.finish_rank()])

    def finish_all(self, source, parts: Sequence[list]) -> None:
        """``.metadata`` over every rank's records, then common.pt, hf_config/, metadata.json."""
        records = [r for part in parts for r in part]
        common = _COMMON_STATE
        write_metadata(self.directory, records, self._globals)
        with open(self.directory / "common.pt", "wb") as f:
            torch.save(common, f)
            f.flush()
            os.fsync(f.fileno())
        hf_dir = self.directory / HF_CONFIG_DIR
        hf_dir.mkdir()
        with open(hf_dir / "config.json", "w") as f:
            json.dump(self.config.to_hf_dict(dtype=self.options.dtype), f, indent=2)
            f.write("\n")
        for name, path in source.source_files().files.items():
            shutil.copyfile(path, hf_dir / name)
        # Last: megatron-core treats metadata.json as "this checkpoint is complete".
        with open(self.directory / "metadata.json", "w") as f:
            json.dump(METADATA_JSON, f)
            f.flush()
            os.fsync(f.fileno())

    def abort(self) -> None:
        if self._data is not None:
            try:
                self._data.close(fsync=False)
            except (OSError, CheckpointError):
                pass
            self._data = None
