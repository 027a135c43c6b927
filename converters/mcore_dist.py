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
in-memory tensor. Routed experts add a second prepended axis the same way: the native
``decoder.layers.{l}.mlp.experts.experts.{e}.linear_fc1.weight`` is chunk ``(l, e)`` of the key
``decoder.layers.mlp.experts.experts.linear_fc1.weight`` ``[L, E, 2F, H]``, so reads and writes
hold one expert at a time. Models whose layers differ (dense-first DeepSeek layers,
``mlp_only_layers``) keep one key per layer, ``decoder.layers.{l}.<param>`` (experts still
stacked: ``[E, ...]``), as megatron-core does for non-homogeneous stacks; MTP layers
(``mtp.layers.{k}.``) are never layer-stacked. The layout is TP-invariant (fused QKV in whole
groups, fc1 as ``[gate; up]``), so any TP/PP/EP loads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ckpt_ir.adapters import (
    LORA_LAYOUT_FILE,
    AdapterConfig,
    LoraLayout,
    from_lora_layout_json,
    lora_layout_json,
)
from ckpt_ir.architectures import lookup
from ckpt_ir.converters.base import SourceFiles, VerlTree, WriteOptions
from ckpt_ir.converters.per_rank import EXTRA_STATE_MODULES as _SPEC_EXTRA_STATE
from ckpt_ir.converters.storage.dcp_files import DcpDataFile, DcpReader, write_metadata
from ckpt_ir.converters.storage.hf_files import (
    carried_source_files,
    check_layer_count,
    load_hf_config,
)
from ckpt_ir.detect import read_json_file
from ckpt_ir.durable import atomic_write, sync_file, write_synced
from ckpt_ir.errors import (
    CheckpointError,
    CorruptCheckpointError,
    FormatError,
    IncompatibleLayoutError,
    InternalError,
    MissingConfigError,
    PlanError,
)
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.megatron_config import (
    hf_config_from_megatron,
    missing_fields,
    padded_vocab_size,
    plain_arguments,
    transformer_config_json,
)
from ckpt_ir.probes import find_config_dir
from ckpt_ir.safety.files import read_text
from ckpt_ir.safety.unpickler import load_torch
from ckpt_ir.slabs import FileSlab
from ckpt_ir.tables import NativeParams, build_table, drop_absent_mtp
from ckpt_ir.tables.lora import infer_megatron_lora
from ckpt_ir.transforms import Identity

if TYPE_CHECKING:
    import torch

__all__ = ["EXTRA_STATE_MODULES", "HF_CONFIG_DIR", "McoreDistAdapterReader",
           "McoreDistAdapterWriter", "McoreDistReader", "McoreDistWriter"]

log = logging.getLogger(__name__)

HF_CONFIG_DIR = "hf_config"
"""ckpt-ir stores the HF config and tokenizer files here, beside the torch_dist files."""

# A verl 0.9.1 role directory (WriteOptions.verl_tree): where verl's
# MegatronCheckpointManager keeps a dist-only model save and the HF config its merger reads.
VERL_DIST_DIR = "model/dist_ckpt"
VERL_HF_DIR = "model/huggingface"
VERL_MANIFEST = "ckpt_contents.json"

# A VL model's blocks sit under a module prefix (Megatron-Bridge: the language model's
# ``language_model.decoder.layers``, the vision tower's ``vision_model.decoder.layers``); each
# stack is its own key.
_STACK_PREFIX = r"((?:language_model\.|vision_model\.)?)decoder\.layers\."
_STACKED = re.compile(rf"^{_STACK_PREFIX}(?!\d+\.)(.+)$")
_PER_LAYER = re.compile(rf"^{_STACK_PREFIX}(\d+)\.(.+)$")
_VISION_STACK = "vision_model."
# Routed experts: ``.experts.experts.{e}.`` in a native name, ``.experts.experts.`` in a key.
_EXPERTS = ".experts.experts."
_EXPERT = re.compile(r"\.experts\.experts\.(\d+)\.")
# Modules with an `_extra_state` object (megatron-core linear layers; MTP's eh_proj).
_LINEAR_MODULE = re.compile(r"^(linear_\w+|eh_proj)$")
_DUPLICATE_NORM = ("the same norm weight under the other layer spec's key (mcore_spec=any "
                   "writes both)")

# `_extra_state` objects a GPTModel requests per layer, by spec: the one list lives in
# per_rank.py (the per-rank formats write the same modules). Writing the union ("any") loads
# under megatron-core's default strictness with either spec (it ignores checkpoint keys the
# model does not request).
EXTRA_STATE_MODULES: Mapping[str, tuple[str, ...]] = {
    **_SPEC_EXTRA_STATE,
    "any": tuple(dict.fromkeys(_SPEC_EXTRA_STATE["local"] + _SPEC_EXTRA_STATE["te"])),
}

# A bare model save has an empty common state (verified with megatron-core 0.16.1).
_COMMON_STATE: dict[str, Any] = {}

METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}


# Megatron-Bridge LoRA tensors (`<base module>.adapter.linear_in.weight`, ...): the adapter view
# of a checkpoint (McoreDistAdapterReader) reads them, the model view skips them.
ADAPTER_KEY = ".adapter."
ADAPTER_SKIPPED = ("LoRA adapter weight (read by extract-adapter, merge-adapter and convert "
                   "--to hf-peft)")


# megatron-core's GatedDeltaNet.sharded_state_dict (qwen3_next) stores these fused tensors as
# TP-invariant row blocks under sub-keys (``_split_tensor_factory``): ``in_proj.weight.query``
# ... ``.alpha``, ``conv1d.weight.query`` / ``.key`` / ``.value``. The native name is the fused
# tensor; its blocks are the binding's ``tp_blocks``, in this order.
SPLIT_KEYS: Mapping[str, tuple[str, ...]] = {
    "self_attention.in_proj.weight": ("query", "key", "value", "z", "beta", "alpha"),
    "self_attention.conv1d.weight": ("query", "key", "value"),
}
_SPLIT_KEY = re.compile(r"^(.+\.(?:" + "|".join(re.escape(k) for k in SPLIT_KEYS) + r"))\.(\w+)$")


def _split_native(name: str) -> tuple[str, ...] | None:
    """The sub-key names of a native tensor megatron-core stores split, else None."""
    return next((subs for suffix, subs in SPLIT_KEYS.items() if name.endswith("." + suffix)),
                None)


def _split_slabs(slabs: Iterable[torch.Tensor | FileSlab], cuts: Sequence[int]
                 ) -> list[list[torch.Tensor | FileSlab]]:
    """Row-major pieces cut at the byte offsets ``cuts`` (ascending, the last the total): the
    pieces of each range, as views and sub-ranges of file slabs (nothing is copied)."""
    out: list[list[torch.Tensor | FileSlab]] = [[] for _ in cuts]
    part, pos = 0, 0
    for slab in slabs:
        size = slab.nbytes if isinstance(slab, FileSlab) else slab.numel() * slab.element_size()
        start = 0
        while start < size:
            while pos + start >= cuts[part]:
                part += 1
            take = min(size - start, cuts[part] - pos - start)
            if isinstance(slab, FileSlab):
                out[part].append(dataclasses.replace(slab, offset=slab.offset + start,
                                                     nbytes=take))
            else:
                item = slab.element_size()
                out[part].append(slab.reshape(-1)[start // item:(start + take) // item])
            start += take
        pos += size
    return out


def _native_name(key: str, axes: tuple[str, ...], index: tuple[int, ...]) -> str:
    """The native name of chunk ``index`` of a stacked key (inverse of the writer's locate)."""
    name = key
    for axis, i in zip(axes, index, strict=True):
        if axis == "layer":
            m = _STACKED.match(name)
            assert m is not None  # a layer axis only on stacked keys
            name = f"{m.group(1)}decoder.layers.{i}.{m.group(2)}"
        else:
            at = name.index(_EXPERTS) + len(_EXPERTS)
            name = f"{name[:at]}{i}.{name[at:]}"
    return name


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
        # native name -> (DCP key, index on the key's prepended axes: layer and/or expert)
        self._natives: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._dropped: dict[str, str] = {}
        # fused native name -> its sub-keys (megatron-core's GDN split tensors)
        self._joined: dict[str, tuple[str, ...]] = {}
        for fqn, t in self._dcp.index.tensors.items():
            skip = self._skip_reason(fqn)
            if skip is not None:
                self._dropped[fqn] = skip
                continue
            split = _SPLIT_KEY.match(fqn)
            if split and split.group(2) in SPLIT_KEYS[next(
                    k for k in SPLIT_KEYS if split.group(1).endswith(k))]:
                self._joined.setdefault(split.group(1), ())
                continue
            m = _STACKED.match(fqn)
            axes = ("layer",) if m else ()
            if _EXPERTS in fqn:
                axes += ("expert",)
            if axes and len(t.shape) >= len(axes):
                # A non-empty stack is bounded by its chunks' bytes (checked by the index); an
                # empty one could claim any number of layers, each becoming a name here.
                if math.prod(t.shape) == 0 and math.prod(t.shape[:len(axes)]) > \
                        max(len(t.chunks), 1):
                    raise CorruptCheckpointError(
                        f"stacked tensor {fqn!r} declares {list(t.shape[:len(axes)])} "
                        "layers/experts of no data", path=self.path / ".metadata", tensor=fqn)
                for index in itertools.product(*(range(n) for n in t.shape[:len(axes)])):
                    name = _native_name(fqn, axes, index)
                    self._natives[name] = (fqn, index)
                    self._specs[name] = TensorSpec(name, tuple(t.shape[len(axes):]), t.dtype)
            else:
                self._natives[fqn] = (fqn, ())
                self._specs[fqn] = TensorSpec(fqn, tuple(t.shape), t.dtype)
        for name in self._joined:
            self._join(name)
        for fqn in self._dcp.index.blobs:
            self._dropped[fqn] = _blob_reason(fqn)
        self._notes: list[str] = []
        self._settle_config(hf_config, config_candidates)

    def _settle_config(self, hf_config: str | os.PathLike | None,
                       config_candidates: Sequence[Path]) -> None:
        """The model config, checked against the tensors found (also Megatron-FSDP's reader,
        whose keys name the same per-layer tensors)."""
        self._config_source, hf = self._find_config(hf_config, config_candidates)
        self.config = ModelConfig.from_hf(hf)
        lm = self.config_prefix
        head = self._specs.get(lm + "output_layer.weight")
        if head is not None and len(head.shape) == 2 and head.shape[0] == 1 \
                and self.config.vocab_size > 1 and not self.config.is_value_model:
            # verl's critic: megatron-core's output layer replaced by LinearForLastLayer(H, 1).
            self.config = self.config.as_value_model(1)
            self._notes.append("output_layer.weight has one row: a value head (verl critic), "
                               "read as score.weight of a token-classification model")
        check_layer_count(self.config, len(self._specs), self._config_source)
        emb = self._specs.get(lm + "embedding.word_embeddings.weight")
        padded = emb.shape[0] if emb is not None else None
        if padded is not None and padded < self.config.vocab_size:
            # Padding only adds rows; fewer means the config is not this model's.
            raise PlanError([f"{lm}embedding.word_embeddings.weight has {padded} rows, fewer than "
                             f"the config's vocab_size {self.config.vocab_size}"],
                            path=self._config_source)
        self.config = drop_absent_mtp(self.config, self.naming, NativeParams(), self._specs)
        self.params = NativeParams(padded_vocab_size=padded, norm_style=self._norm_style())

    def _join(self, name: str) -> None:
        """The native tensor of a split key: its sub-keys' rows, one after another."""
        subs = _split_native(name) or ()
        tensors = self._dcp.index.tensors
        keys = tuple(f"{name}.{sub}" for sub in subs)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CorruptCheckpointError(f"{name} is stored split but lacks {missing}",
                                         path=self.path / ".metadata", tensor=name)
        parts = [tensors[k] for k in keys]
        rest, dtype = tuple(parts[0].shape[1:]), parts[0].dtype
        if any(len(p.shape) < 1 or tuple(p.shape[1:]) != rest or p.dtype != dtype
               for p in parts):
            raise CorruptCheckpointError(f"the sub-keys of {name} disagree on shape or dtype",
                                         path=self.path / ".metadata", tensor=name)
        self._joined[name] = keys
        self._specs[name] = TensorSpec(name, (sum(p.shape[0] for p in parts), *rest), dtype)

    @property
    def config_prefix(self) -> str:
        """The language model's module prefix in this model's names (a VL model's)."""
        record = lookup(self.config.architecture)
        return record.mcore_prefix if record is not None else ""

    def _norm_style(self) -> str:
        """The layer spec whose norm keys this checkpoint uses (dense models: one set).

        MoE and MLA norms sit under different keys for the TE and the local spec (see
        :mod:`ckpt_ir.tables.moe`); ckpt-ir's ``mcore_spec="any"`` output has both, and the
        copies of the style not chosen are dropped with a reason.
        """
        if not (self.config.is_moe or self.config.has_mla):
            return "te"
        present = set(self._specs)
        natives = {style: {b.native for b in build_table(
                       self.naming, self.config, NativeParams(norm_style=style)).bindings}
                   for style in ("local-dist", "te")}
        chosen = next((s for s, names in natives.items() if names <= present),
                      max(natives, key=lambda s: len(natives[s] & present)))
        for other, names in natives.items():
            for name in (names - natives[chosen]) & present if other != chosen else ():
                del self._specs[name], self._natives[name]
                self._dropped[name] = _DUPLICATE_NORM
        return chosen

    def _skip_reason(self, fqn: str) -> str | None:
        """Why a tensor is not one this reader exposes (None: it is one)."""
        if fqn.startswith("optimizer."):
            return "optimizer state"
        if ADAPTER_KEY in fqn:
            return ADAPTER_SKIPPED
        return None

    # -- config -------------------------------------------------------------------------------

    def _config_tensors(self) -> Mapping[str, Any]:
        """The tensors, by the names the config checks below look for (``embedding.…``,
        ``output_layer.weight``): the torch_dist keys; a subclass's natives."""
        return self._dcp.index.tensors

    def _vocab_rows(self) -> int | None:
        t = self._config_tensors().get("embedding.word_embeddings.weight")
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
        found = find_config_dir([self.path / HF_CONFIG_DIR, *candidates])
        if found is not None:
            return str(found), load_hf_config(found)
        for c in candidates:
            if c.is_file() and c.name == "transformer_config.json":
                return str(c), self._from_megatron(read_json_file(c), c)
        run_config = self.path / "run_config.yaml"
        if run_config.is_file():
            data = read_yaml(run_config)
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
        """An HF config from Megatron arguments read from ``where`` (untrusted values).

        Whether the embeddings are tied is read from the checkpoint when the arguments do not
        say (verl's ``transformer_config.json`` never does): torch_dist stores a tied model's
        embedding once, with no ``output_layer.weight``. Values recorded nowhere (a rotary base
        or a sequence length in ``transformer_config.json``) are refused, not guessed.
        """
        tensors = self._config_tensors()
        if any(k.startswith(("language_model.", "vision_model.", "visual.")) for k in tensors):
            # Megatron-Bridge's VL models: the arguments describe the language model only.
            raise MissingConfigError(
                f"{self.path} holds a vision-language model, whose vision tower {where.name} "
                "does not describe; pass --hf-config DIR (the model's config.json)", path=where)
        fields = plain_arguments(fields)  # vocab_size may be anything before this
        # Only a checkpoint with the embedding says anything by lacking an output layer (an
        # adapter-only one lacks both).
        tied = "output_layer.weight" not in tensors \
            if "embedding.word_embeddings.weight" in tensors else None
        try:
            hf = hf_config_from_megatron(
                fields, vocab_size=fields.get("vocab_size") or self._vocab_rows(), tied=tied)
        except CheckpointError as e:
            e.path = e.path or str(where)
            raise
        missing = missing_fields(hf)
        if missing:
            raise MissingConfigError(
                f"{where.name} does not record {', '.join(missing)}; pass --hf-config DIR (the "
                "model's config.json)", path=where)
        return hf

    # -- Reader protocol ----------------------------------------------------------------------

    def tensors(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def dropped(self) -> Mapping[str, str]:
        return self._dropped

    def read(self, name: str) -> torch.Tensor:
        import torch

        if name in self._joined:
            tensors = self._dcp.index.tensors
            return torch.cat([self._dcp.read_region(k, (0,) * len(tensors[k].shape),
                                                    tensors[k].shape)
                              for k in self._joined[name]], dim=0)
        try:
            fqn, index = self._natives[name]
        except KeyError:
            raise FormatError(f"tensor {name!r} is not in {self.path}", tensor=name) from None
        t = self._dcp.index.tensors[fqn]
        if not index:
            return self._dcp.read_region(fqn, (0,) * len(t.shape), t.shape)
        # One layer (and expert) of a stacked key: only that chunk region is read.
        n = len(index)
        region = self._dcp.read_region(fqn, index + (0,) * (len(t.shape) - n),
                                       (1,) * n + tuple(t.shape[n:]))
        return region.reshape(t.shape[n:])

    def byte_ranges(self, name: str) -> list[tuple[Path, int, int]]:
        if name in self._joined:
            return [r for k in self._joined[name] for r in self._dcp.byte_ranges(k)]
        where = self._natives.get(name)
        if where is None:
            return []
        fqn, index = where
        if not index:
            return self._dcp.byte_ranges(fqn)
        shape = self._dcp.index.tensors[fqn].shape
        n = len(index)
        return self._dcp.byte_ranges(fqn, index + (0,) * (len(shape) - n),
                                     (1,) * n + tuple(shape[n:]))

    def source_files(self) -> SourceFiles:
        src = Path(self._config_source)
        if not src.is_dir():
            return SourceFiles({})
        return carried_source_files([src])

    def describe(self) -> dict[str, Any]:
        stacked = sorted({fqn for fqn, index in self._natives.values() if index})
        return {
            "config_from": self._config_source,
            "dcp_tensors": len(self._dcp.index.tensors),
            "dcp_objects": len(self._dcp.index.blobs),
            "layer_stacked_keys": len(stacked),
            "padded_vocab_size": self.params.padded_vocab_size,
            "generation": "<=0.18 (common.pt)" if (self.path / "common.pt").is_file()
            else ">=0.19 (common_state object)",
            **({"notes": list(self._notes)} if self._notes else {}),
        }

    def locate(self, tensor: torch.Tensor) -> tuple[Path, int] | None:
        return self._dcp.locate(tensor)

    def release(self) -> None:
        self._dcp.release()

    def close(self) -> None:
        self._dcp.close()


class McoreDistWriter:
    """Writes a torch_dist directory that megatron-core 0.16 - 0.19 GPTModels load."""

    format: ClassVar[str] = "mcore-dist"
    naming: ClassVar[str] = "mcore"

    def __init__(self, directory: Path, config: ModelConfig, options: WriteOptions,
                 params: NativeParams | None = None) -> None:
        # verl_tree: the destination is a verl 0.9.1 role directory and the torch_dist files
        # go to its model/dist_ckpt (see _finish_verl_tree).
        self.verl_tree: VerlTree | None = options.verl_tree
        self.root = Path(directory)
        self.directory = self.root / VERL_DIST_DIR if self.verl_tree else self.root
        self.config = config
        self.options = options
        self.spec = options.mcore_spec
        # The params the plan was built with (params_for runs once per conversion).
        self.params = params if params is not None else self.params_for(config, options)
        # native -> [(key, chunk offsets, number of prepended axes)]; two with mcore_spec=any
        # norm copies.
        self._where: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._objects: list[str] = []
        self._globals: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._data: DcpDataFile | None = None
        # native -> [(sub-key, first row, rows)] of the tensors megatron-core stores split
        self._split: dict[str, list[tuple[str, int, int]]] = {}

    @classmethod
    def params_for(cls, config: ModelConfig, options: WriteOptions) -> NativeParams:
        """Norm keys of the requested layer spec (dense models: the same for both; MoE and
        MLA: the local spec's torch_dist keys unless ``mcore_spec="te"``, and ``"any"`` adds
        the TE keys as copies); vocab padded on request."""
        style = ("local-dist" if (config.is_moe or config.has_mla) and options.mcore_spec != "te"
                 else "te")
        return NativeParams(
            padded_vocab_size=padded_vocab_size(config.vocab_size, options.pad_vocab_to_multiple),
            norm_style=style)

    def _locate(self, name: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
        """torch_dist key of native ``name``, its index on the key's prepended axes (layer if
        layers are stacked, then expert) and the sizes of those axes."""
        key, index, sizes = name, (), ()
        m = _PER_LAYER.match(name)
        if m and m.group(1) == _VISION_STACK:
            # A vision tower's blocks are alike: always stacked, over its depth.
            key, index, sizes = f"{m.group(1)}decoder.layers.{m.group(3)}", \
                (int(m.group(2)),), (self.config.vision_blocks,)
        elif m and self.config.has_uniform_layers:
            key, index, sizes = f"{m.group(1)}decoder.layers.{m.group(3)}", \
                (int(m.group(2)),), (self.config.num_layers,)
        e = _EXPERT.search(key)
        if e:
            key = key[:e.start()] + _EXPERTS + key[e.end():]
            index, sizes = (*index, int(e.group(1))), (*sizes, self.config.num_experts)
        return key, index, sizes

    def _norm_copies(self) -> dict[str, list[str]]:
        """``mcore_spec="any"`` for MoE / MLA: native -> the TE spec's key for the same norm."""
        if self.spec != "any" or self.params.norm_style == "te":
            return {}
        ours = build_table(self.naming, self.config, self.params)
        te = build_table(self.naming, self.config,
                         dataclasses.replace(self.params, norm_style="te"))
        copies: dict[str, list[str]] = {}
        for b in ours.bindings:
            other = te.by_ir[next(iter(b.ir.values()))][0]
            if other.native != b.native and other.native not in ours.by_native and \
                    isinstance(b.transform, Identity) and isinstance(other.transform, Identity):
                copies.setdefault(b.native, []).append(other.native)
        return copies

    def begin(self, specs: Sequence[TensorSpec]) -> None:
        copies = self._norm_copies()
        self._specs = {s.name: s for s in specs}
        self._split = self._split_keys(specs)
        for s in specs:
            if s.name in self._split:
                for key, _, rows in self._split[s.name]:
                    self._globals[key] = ((rows, *s.shape[1:]), s.dtype.torch)
                continue
            for name in (s.name, *copies.get(s.name, ())):
                key, index, sizes = self._locate(name)
                shape = (*sizes, *s.shape)
                prev = self._globals.get(key)
                if prev is not None and prev != (shape, s.dtype.torch):
                    raise InternalError(f"layers of {key} disagree on shape or dtype")
                self._globals[key] = (shape, s.dtype.torch)
                self._where.setdefault(s.name, []).append(
                    (key, index + (0,) * len(s.shape), len(index)))
        self._objects = self._extra_state_objects([s.name for s in specs])
        # torch DCP names data files __<rank>_<i>.distcp; each process appends to its own.
        self.directory.mkdir(parents=True, exist_ok=True)
        self._data = DcpDataFile(self.directory, f"__{self.options.rank}_0.distcp")

    def _split_keys(self, specs: Sequence[TensorSpec]) -> dict[str, list[tuple[str, int, int]]]:
        """The sub-keys, first rows and row counts of the natives stored split
        (:data:`SPLIT_KEYS`), from their bindings' TP blocks."""
        out: dict[str, list[tuple[str, int, int]]] = {}
        split = [s for s in specs if _split_native(s.name)]
        if not split:
            return out
        table = build_table(self.naming, self.config, self.params)
        schema = self.config.schema()
        for s in split:
            subs = _split_native(s.name) or ()
            b = table.by_native[s.name]
            blocks = b.transform.tp_blocks({r: schema[b.ir[r]] for r in b.transform.roles})
            if len(blocks) != len(subs) or sum(blocks) != s.shape[0]:
                raise InternalError(f"{s.name}: blocks {blocks} do not match the sub-keys "
                                    f"{subs} of {s.shape[0]} rows")
            starts = itertools.accumulate(blocks, initial=0)
            out[s.name] = [(f"{s.name}.{sub}", start, rows)
                           for sub, start, rows in zip(subs, starts, blocks, strict=False)]
        return out

    def _extra_state_objects(self, names: Sequence[str]) -> list[str]:
        """The ``_extra_state`` objects a GPTModel of this spec requests, named as
        megatron-core does: ``<key>._extra_state/shard_<index>_<sizes>`` over the prepended
        axes (``shard_3_8``: layer 3 of 8; ``shard_3.5_8.16``: layer 3, expert 5; ``shard_0_1``
        when the key has no prepended axis). Known modules keep the order of
        :data:`EXTRA_STATE_MODULES` (dense output unchanged); experts, shared experts, MLA and
        MTP modules follow in the order their weights come."""
        wanted = self._extra_state_modules()
        if not wanted:
            return []
        groups: dict[str, dict[str, None]] = {}
        for name in names:
            module, _, param = name.rpartition(".")
            leaf = module.rpartition(".")[2]
            # A linear layer's own weight or bias (not a norm fused into it, as in
            # linear_fc1.layer_norm_weight of an MoE layer, whose fc1 is the experts').
            if param not in ("weight", "bias") or not _LINEAR_MODULE.match(leaf):
                continue
            found = [module]
            if leaf == "linear_proj" and "self_attention.core_attention" in wanted:
                found.append(module[: -len(leaf)] + "core_attention")
            for mod in found:
                key, index, sizes = self._locate(mod + "._extra_state")
                shard = (f"{'.'.join(map(str, index))}_{'.'.join(map(str, sizes))}" if index
                         else "0_1")
                groups.setdefault(key, {})[f"{key}/shard_{shard}"] = None
        rank = {f"decoder.layers.{m}._extra_state": i for i, m in enumerate(wanted)}
        ordered = sorted(enumerate(groups), key=lambda p: (rank.get(p[1], len(rank)), p[0]))
        return [fqn for _, key in ordered for fqn in groups[key]]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._data is None:
            raise InternalError("mcore-dist writer used before begin()")
        if name in self._split:
            for key, start, rows in self._split[name]:
                self._data.add_tensor(key, (0,) * tensor.dim(), tensor[start:start + rows])
            return
        for key, offsets, prepended in self._where[name]:
            self._data.add_tensor(key, offsets, tensor[(None,) * prepended])

    accepts_file_slabs: ClassVar[bool] = True

    def write_slabs(self, name: str, slabs: Iterable[torch.Tensor | FileSlab]) -> None:
        """Native ``name`` from row-major pieces, streamed into its chunk's archive: a fused
        QKV or fc1 goes from the HF parts to the file without being built."""
        if self._data is None:
            raise InternalError("mcore-dist writer used before begin()")
        spec = self._specs[name]
        if name in self._split:
            row = math.prod(spec.shape[1:]) * spec.dtype.itemsize
            split = self._split[name]
            cuts = [(start + rows) * row for _, start, rows in split]
            for (key, _, rows), pieces in zip(split, _split_slabs(slabs, cuts), strict=True):
                self._data.add_tensor_slabs(key, (0,) * len(spec.shape),
                                            (rows, *spec.shape[1:]), spec.dtype.torch, pieces)
            return
        where = self._where[name]
        if len(where) > 1:
            slabs = list(slabs)  # a norm written under two keys (small)
        for key, offsets, prepended in where:
            self._data.add_tensor_slabs(key, offsets, (1,) * prepended + tuple(spec.shape),
                                        spec.dtype.torch, slabs)

    def write_chunk(self, name: str, offsets: Sequence[int], tensor: torch.Tensor) -> None:
        """The box of native ``name`` that starts at ``offsets``: a TP shard written by the
        live rank holding it (:mod:`ckpt_ir.manager`), never gathered. ``.metadata``
        checks at commit that every rank's boxes tile each tensor exactly."""
        self.write_chunk_slabs(name, offsets, tuple(tensor.shape), tensor.dtype, (tensor,))

    def write_chunk_slabs(self, name: str, offsets: Sequence[int], shape: Sequence[int],
                          dtype: torch.dtype, slabs: Iterable[torch.Tensor]) -> None:
        """:meth:`write_chunk` of a ``shape`` box given as row-major pieces, written as they
        come (a GPU rank's host pieces, :class:`ckpt_ir.manager.staging.HostStream`)."""
        if self._data is None:
            raise InternalError("mcore-dist writer used before begin()")
        if name in self._split:
            # A TP shard of a split tensor is [q_t; k_t; ...]: a box in every sub-key.
            raise IncompatibleLayoutError(f"{name} is stored as sub-keys by megatron-core; "
                                          "writing it shard by shard from live ranks is not "
                                          "supported")
        where = self._where[name]
        if len(where) > 1:
            # A norm written under two keys (small); pieces may be reused buffers.
            slabs = [s.clone() for s in slabs]
        for key, base, prepended in where:
            self._data.add_tensor_slabs(key, (*base[:prepended], *offsets),
                                        (1,) * prepended + tuple(shape), dtype, slabs)

    def file_of(self, name: str) -> str | None:
        return None  # every rank appends its chunks to its own data file

    def finish_rank(self) -> list:
        """Close this rank's data file; rank 0 also stores the objects. Returns its records."""
        if self._data is None:
            raise InternalError("mcore-dist writer finished before begin()")
        if self.options.rank == 0:
            for fqn in self._objects:
                self._data.add_object(fqn, [None])
            # megatron-core >= 0.19 reads common state from this object; <= 0.18 from
            # common.pt (written in finish_all).
            self._data.add_object("common_state/shard_0_1", [_COMMON_STATE])
        records = self._data.close(fsync=True)
        self._data = None
        return records

    def _extra_state_modules(self) -> tuple[str, ...]:
        return EXTRA_STATE_MODULES[self.spec]

    def finish(self, source) -> None:
        self.finish_all(source, [self.finish_rank()])

    def finish_all(self, source, parts: Sequence[list]) -> None:
        """``.metadata`` over every rank's records, then common.pt, hf_config/, metadata.json."""
        import torch

        records = [r for part in parts for r in part]
        common = _COMMON_STATE
        write_metadata(self.directory, records, self._globals)
        with open(self.directory / "common.pt", "wb") as f:
            torch.save(common, f)
            sync_file(f)
        # ckpt-ir's own copy of the HF config; a verl tree keeps it where verl does.
        hf_dir = self.root / VERL_HF_DIR if self.verl_tree else self.directory / HF_CONFIG_DIR
        hf_dir.mkdir(parents=True)
        with open(hf_dir / "config.json", "w") as f:
            json.dump(self.config.to_hf_dict(dtype=self.options.dtype), f, indent=2)
            f.write("\n")
        carried = source.source_files().files
        for name, path in carried.items():
            shutil.copyfile(path, hf_dir / name)
        # Last: megatron-core treats metadata.json as "this checkpoint is complete".
        write_synced(self.directory / "metadata.json", json.dumps(METADATA_JSON))
        if self.verl_tree:
            self._finish_verl_tree(has_tokenizer=any(n != "config.json" for n in carried))

    def _finish_verl_tree(self, *, has_tokenizer: bool) -> None:
        """``transformer_config.json`` and, last, ``ckpt_contents.json`` with the entries
        verl 0.9.1's ``MegatronCheckpointManager`` writes for a dist-only model save."""
        info = self.verl_tree or VerlTree()
        with open(self.root / "transformer_config.json", "w") as f:
            json.dump(transformer_config_json(self.config), f, indent=2)
            f.write("\n")
        hf_entry = {"path": VERL_HF_DIR, "format": "huggingface",
                    "note": "config.json, tokenizer, and optional generation_config.json"}
        contents: dict[str, Any] = {
            "model": {"path": VERL_DIST_DIR, "format": "megatron_dist_checkpoint",
                      "backend": "dist_checkpointing"},
            "transformer_config": {"path": "transformer_config.json", "format": "json"},
            "hf_config": hf_entry,
        }
        if has_tokenizer:
            contents["tokenizer"] = {"path": VERL_HF_DIR, "format": "huggingface"}
        archs = self.config.hf.get("architectures") or [self.config.architecture]
        manifest = {
            "schema_version": 2, "framework": "megatron", "role": info.role,
            "arch": archs[0], "global_step": int(info.step or 0),
            "world_size": self.options.world_size,
            "backend": {"has_bridge": False, "use_dist_checkpointing": True, "peft": False},
            "save_contents": ["model"], "contents": contents,
            "directories": {VERL_DIST_DIR: "Megatron dist_checkpointing shards for model "
                                           "weights (written by ckpt-ir)",
                            VERL_HF_DIR: "config.json and tokenizer files"},
            "saved_any_dist_ckpt": True,
        }
        # verl writes it last (temp file + rename): its presence means the save completed.
        atomic_write(self.root / VERL_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True),
                     tmp=self.root / f"{VERL_MANIFEST}.tmp")

    def abort(self) -> None:
        if self._data is not None:
            try:
                self._data.close(fsync=False)
            except (OSError, CheckpointError):
                pass
            self._data = None


# --------------------------------------------------------------------------------------------
# Megatron-Bridge LoRA adapters in torch_dist
# --------------------------------------------------------------------------------------------


_MAX_YAML_BYTES = 4 * 2**20  # a Bridge run_config.yaml is ~20 KB
_MAX_YAML_NESTING = 64
_MAX_YAML_ALIASES = 1000


def read_yaml(path: Path) -> Any:
    """Safe-load a YAML file (``run_config.yaml``), bounded in size, nesting and aliases.

    The events are checked first (the parser is iterative; the constructor recurses per level,
    and aliases repeat whole subtrees for whatever walks the result), then safe-loaded: tags
    that name Python objects are refused by ``safe_load`` itself.
    """
    import yaml  # only a Megatron-Bridge run_config.yaml needs it (25 ms of every import)

    text = read_text(path, path.name, limit=_MAX_YAML_BYTES)
    try:
        depth = aliases = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > _MAX_YAML_NESTING:
                    raise CorruptCheckpointError(f"{path.name} nests more than "
                                                 f"{_MAX_YAML_NESTING} levels", path=path)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > _MAX_YAML_ALIASES:
                    raise CorruptCheckpointError(f"{path.name} has more than "
                                                 f"{_MAX_YAML_ALIASES} aliases", path=path)
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, OverflowError) as e:
        # ValueError/OverflowError: timestamps and numbers the constructor cannot build.
        reason = str(e).replace("\n", " ")
        raise CorruptCheckpointError(f"{path.name} is not valid YAML: {reason[:200]}",
                                     path=path) from e


def _bridge_peft(path: Path) -> Mapping[str, Any]:
    """The ``peft`` section of a Megatron-Bridge ``run_config.yaml`` beside the checkpoint."""
    run_config = path / "run_config.yaml"
    if not run_config.is_file():
        return {}
    data = read_yaml(run_config)
    peft = data.get("peft") if isinstance(data, dict) else None
    return peft if isinstance(peft, dict) else {}


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


PEFT_CONFIG = "adapter_config.json"
"""The PEFT config file name (as hf_peft's; converters do not import each other)."""


def _exported_adapter(export: Path, config: ModelConfig, style: str,
                      leaves: tuple[str, ...] | str, rank: int) -> AdapterConfig:
    """The adapter config of Megatron-Bridge's HF PEFT export beside a torch_dist adapter
    directory (verl's ``model/huggingface/adapter/``), checked against the tensors: it must
    describe the same adapter (rank, targeted modules, one alpha), since it is taken for the
    alpha those tensors do not record."""
    where = export / PEFT_CONFIG
    data = read_json_file(where)
    exported = AdapterConfig.from_peft(data, config, path=where)
    inferred = AdapterConfig.create(config, r=rank, lora_alpha=exported.lora_alpha,
                                    leaves=leaves)
    problems = []
    if exported.r != rank:
        problems.append(f"r={exported.r}, the tensors have rank {rank}")
    if exported.rank_pattern or exported.alpha_pattern or exported.use_rslora:
        problems.append("rank_pattern / alpha_pattern / rsLoRA, which Megatron LoRA (one dim, "
                        "one alpha) cannot have")
    if set(exported.modules()) != set(inferred.modules()):
        def shown(targets: tuple[str, ...] | str) -> str:
            return repr(targets if isinstance(targets, str) else sorted(targets))

        problems.append(f"target_modules {shown(exported.target_modules)} are not the "
                        f"{style} LoRA tensors' modules ({shown(inferred.target_modules)})")
    if problems:
        raise CorruptCheckpointError(f"{where} does not describe the torch_dist adapter beside "
                                     f"it: {'; '.join(problems)}", path=where)
    return exported


# The adapter of a TEGroupedMLP linear (`mlp.experts.linear_fc1.adapter.`); SequentialMLP expert
# adapters are re-keyed per global expert (`mlp.experts.experts.linear_fc1.adapter.`).
_GROUPED_EXPERT_ADAPTER = ".mlp.experts.linear_fc"


class McoreDistAdapterReader(McoreDistReader):
    """The LoRA adapter of a torch_dist checkpoint: adapter-only (Bridge's PEFT filter, verl's
    ``lora.adapter_path``) or base + adapter (the base weights are skipped here).

    Rank and alpha come from ckpt-ir's :data:`~ckpt_ir.adapters.LORA_LAYOUT_FILE` (exact round
    trips of rank-stacked adapters), else from Bridge's ``run_config.yaml`` ``peft`` section
    (``dim``, ``alpha``), else the rank from the shapes and alpha from ``lora_alpha``.
    """

    naming: ClassVar[str] = "mcore-lora"

    def __init__(self, path: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                 trust_pickles: bool = False, config_candidates: Sequence[Path] = (),
                 lora_alpha: float | None = None, base_config: ModelConfig | None = None,
                 peft_export: Path | None = None) -> None:
        self._base_config = base_config
        super().__init__(path, hf_config=hf_config, trust_pickles=trust_pickles,
                         config_candidates=config_candidates)
        sidecar = self.path / LORA_LAYOUT_FILE
        if sidecar.is_file():
            self.adapter, layout = from_lora_layout_json(read_json_file(sidecar), self.config,
                                                         path=sidecar)
            self._alpha_from = str(sidecar)
        else:
            style, leaves, rank = infer_megatron_lora(self._specs, path=self.path,
                                                      config=self.config)
            peft = _bridge_peft(self.path)
            dim = peft.get("dim")
            if dim is not None and dim != rank:
                raise CorruptCheckpointError(f"run_config.yaml says dim={dim!r} but the adapter "
                                             f"tensors have rank {rank}",
                                             path=self.path / "run_config.yaml")
            alpha = _number_or_none(peft.get("alpha"))
            self._alpha_from = "run_config.yaml"
            exported = None
            if alpha is None and peft_export is not None:
                exported = _exported_adapter(peft_export, self.config, style, leaves, rank)
                alpha, self._alpha_from = exported.lora_alpha, str(peft_export / PEFT_CONFIG)
            if alpha is None:
                alpha, self._alpha_from = lora_alpha, "--lora-alpha"
            elif lora_alpha is not None and float(lora_alpha) != float(alpha):
                log.warning("--lora-alpha %s ignored: %s says alpha=%s", lora_alpha,
                            self._alpha_from, alpha)
            if alpha is None:
                raise MissingConfigError(
                    f"{self.path} holds LoRA adapters of rank {rank} but not their alpha (no "
                    f"{LORA_LAYOUT_FILE}, no run_config.yaml peft section, no HF PEFT export "
                    "beside it); pass --lora-alpha", path=self.path)
            self.adapter = exported if exported is not None else AdapterConfig.create(
                self.config, r=rank, lora_alpha=alpha, leaves=leaves)
            layout = LoraLayout.uniform(style, self.adapter.modules(), rank, alpha)
        self.params = NativeParams(lora=layout)

    @property
    def alpha_from(self) -> str:
        """Where the adapter's alpha came from (layout file, run_config.yaml, HF PEFT export,
        --lora-alpha)."""
        return self._alpha_from

    def _norm_style(self) -> str:
        return "te"  # adapters have no norms; the adapter rows do not depend on the spec

    def _find_config(self, explicit: str | os.PathLike | None,
                     candidates: Sequence[Path]) -> tuple[str, dict[str, Any]]:
        if self._base_config is not None:
            return "the base model's config", dict(self._base_config.hf)
        return super()._find_config(explicit, candidates)

    def _skip_reason(self, fqn: str) -> str | None:
        if fqn.startswith("optimizer."):
            return "optimizer state"
        if ADAPTER_KEY not in fqn:
            return "base model weight (not part of the adapter)"
        if "weight_magnitude" in fqn:
            raise FormatError(f"{fqn}: DoRA adapters are not supported", path=self.path)
        if _GROUPED_EXPERT_ADAPTER in fqn:
            raise FormatError(
                f"{fqn}: Megatron-Bridge adapters of grouped experts (TEGroupedMLP: one adapter "
                "shared by an EP rank's experts, or GroupedExpertLinearAdapter) are not "
                "supported; per-expert adapters of SequentialMLP experts "
                "(mlp.experts.experts.linear_fc1.adapter...) are", path=self.path)
        return None

    def describe(self) -> dict[str, Any]:
        layout = self.params.lora
        return {**super().describe(), "adapter": self.adapter.summary(),
                "lora_style": layout.style, "lora_rank": layout.rank,
                "lora_alpha": layout.alpha, "alpha_from": self._alpha_from}


class McoreDistAdapterWriter(McoreDistWriter):
    """An adapter-only torch_dist directory, as Megatron-Bridge's PEFT checkpoints hold.

    ``options.adapter`` holds the IR adapter config and the
    :class:`~ckpt_ir.adapters.LoraLayout`; both go to :data:`LORA_LAYOUT_FILE`. No
    ``_extra_state`` objects: Bridge's adapter filter drops them.
    """

    naming: ClassVar[str] = "mcore-lora"

    def __init__(self, directory: Path, config: ModelConfig, options: WriteOptions,
                 params: NativeParams | None = None) -> None:
        super().__init__(directory, config, options, params)
        self.adapter = options.require_adapter("mcore-dist adapter").adapter

    @classmethod
    def params_for(cls, config: ModelConfig, options: WriteOptions) -> NativeParams:
        target = options.require_adapter("mcore-dist adapter")
        return NativeParams(lora=target.require_lora_layout("mcore-dist adapter"))

    def _extra_state_modules(self) -> tuple[str, ...]:
        return ()

    def finish_all(self, source, parts: Sequence[list]) -> None:
        with open(self.directory / LORA_LAYOUT_FILE, "w") as f:
            json.dump(lora_layout_json(self.adapter, self.params.lora), f, indent=2)
            f.write("\n")
        super().finish_all(source, parts)
