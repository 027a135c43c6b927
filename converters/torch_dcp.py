"""``torch-dcp``: plain ``torch.distributed.checkpoint`` directories (FSDP2 ``dcp.save``,
torchtitan ``step-N/``, NeMo-RL ``policy/weights/``, verl's torchtitan engine).

On disk (torch 2.x ``FileSystemWriter``; reference fsdp-dcp-formats.md §4)::

    .metadata        pickled Metadata: fqn -> global shape, dtype, chunks -> byte ranges
    __R_I.distcp     torch.save archives of tensor chunks and objects, back to back

Unlike Megatron's torch_dist there is no ``metadata.json`` and the keys are the trainer's:

* HF names, bare (``dcp.save(get_model_state_dict(model))``) or under a prefix
  (``dcp.save({"model": sd, "optimizer": ..., "train_state": ...})`` -> ``model.<HF name>``,
  NeMo-RL v1's ``{"model": ...}``);
* torchtitan's model FQNs at the top level (``tok_embeddings.weight``,
  ``layers.0.attention.qkv_linear.wq.weight``) beside ``optimizer.*``, ``lr_scheduler.*``,
  ``dataloader.*``, ``train_state.*`` (the ``torchtitan`` naming, older spellings renamed).

Which of these a directory holds is decided from its ``.metadata`` alone: each candidate
(naming, prefix) is scored by how many of the model's table names it finds, and the best one is
read. Everything else (optimizer state, scheduler, dataloader, training counters, any tensor
outside the prefix) is listed as dropped with its reason, never silently passed over.

Reading streams: a tensor's chunks are copied from their ``.distcp`` byte ranges into its box
(a tensor stored in one chunk is a zero-copy view), one tensor at a time; ``.metadata`` is
validated first (chunks tile every tensor exactly, records point inside existing files).

Writing produces what ``dcp.load`` reads into a model of any sharding (DCP reshards on load):
one chunk per tensor in ``__R_0.distcp`` per writing process, ``.metadata`` last, the HF
``config.json`` and tokenizer files beside them. With ``WriteOptions.torchtitan`` the
destination is a torchtitan checkpoint folder: ``step-0/`` with torchtitan's FQNs, what its
checkpointer loads model-only (a seed checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ckpt_ir.architectures.torchtitan import ERA_KEY_RENAMES, ERA_RENAMES, EXPERT_BIAS
from ckpt_ir.converters.base import SourceFiles, WriteOptions
from ckpt_ir.converters.hf import FUSED_EXPERTS_SUFFIX
from ckpt_ir.converters.storage.dcp_files import DcpDataFile, DcpReader, write_metadata
from ckpt_ir.converters.storage.hf_files import (
    carried_source_files,
    check_layer_count,
    load_hf_config,
)
from ckpt_ir.dtypes import DType
from ckpt_ir.durable import write_synced
from ckpt_ir.errors import CheckpointError, FormatError, InternalError, MissingConfigError
from ckpt_ir.ir import ModelConfig, TensorSpec, dtype_name
from ckpt_ir.probes import find_config_dir
from ckpt_ir.slabs import FileSlab
from ckpt_ir.tables import NativeParams, build_table, drop_absent_mtp

__all__ = ["TORCHTITAN_STEP", "TorchDcpReader", "TorchDcpWriter"]

log = logging.getLogger(__name__)

TORCHTITAN_STEP = "step-0"
"""The folder a ``torchtitan`` write creates: torchtitan's checkpointer loads the highest
``step-N`` holding ``.metadata``, and a step-0 checkpoint model-only (its seed checkpoints)."""

# Top-level groups trainers save beside the model, and what they are. torchtitan: optimizer,
# lr_scheduler, dataloader, train_state; FSDP2 scripts and NeMo-RL: optim / optimizer, extra.
_NON_MODEL = (
    ("optimizer.", "optimizer state"),
    ("optim.", "optimizer state"),
    ("lr_scheduler.", "learning-rate scheduler state"),
    ("dataloader.", "dataloader state"),
    ("train_state.", "training state (step, tokens seen)"),
    ("extra.", "extra training state"),
)
# torchtitan's MoE keeps load-balancing buffers in the model state dict (older versions the
# token counter too). The bias is a weight where the family has a row for it (deepseek_v3's
# e_score_correction_bias); otherwise both are training state, dropped as torchtitan's to_hf
# drops them. Matched on the key in the current spelling (``expert_bias_E``).
_TORCHTITAN_BUFFERS = ((".moe.tokens_per_expert", "torchtitan MoE token counter buffer"),
                       (".moe.tokens_per_expert_E", "torchtitan MoE token counter buffer"),
                       (".moe.expert_bias_E", "torchtitan MoE load-balancing bias buffer (the "
                        "HF model has no routing bias; torchtitan's to_hf drops it too)"))
_PREFIXES = ("", "model.")
_PARENT_LEVELS = 3


def _group_reason(fqn: str) -> str | None:
    for start, why in _NON_MODEL:
        # A group saved as one object has the bare name (torchtitan without a dataloader
        # saves ``dataloader`` as a pickled None).
        if fqn.startswith(start) or fqn == start[:-1]:
            return why
    return None


def _torchtitan_name(fqn: str, natives: frozenset[str]) -> str:
    """A torchtitan key in the current spelling (older checkpoints' names renamed). A key the
    family's table has is current as it is: deepseek_v3's MLA keeps ``attention.wq``, the
    name llama3 / qwen3 used before #2878."""
    if fqn in natives:
        return fqn
    name = ERA_KEY_RENAMES.get(fqn, fqn)
    for old, new in ERA_RENAMES:
        if old in name and new not in name:
            name = name.replace(old, new)
    return name


class TorchDcpReader:
    """Reads the model entries of a plain DCP directory chunk by chunk, without torch's planner."""

    format: ClassVar[str] = "torch-dcp"
    naming: str = "hf"

    def __init__(self, path: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                 trust_pickles: bool = False, config_candidates: Sequence[Path] = ()) -> None:
        self.path = Path(path)
        self._dcp = DcpReader(self.path, trust=trust_pickles)
        self._config_dir = self._find_config(hf_config, config_candidates)
        self.config = ModelConfig.from_hf(load_hf_config(self._config_dir))
        self.params = NativeParams()
        self._natives: dict[str, str] = {}   # native name -> DCP key
        self._specs: dict[str, TensorSpec] = {}
        self._dropped: dict[str, str] = {}
        self._notes: list[str] = []
        self._table_natives: frozenset[str] = frozenset()
        self.naming, self.prefix = self._choose_keys()
        self._collect()
        # A live transformers 5 MoE model holds its experts fused (gate_up_proj / down_proj),
        # so FSDP2 saves them that way: the hf naming's fused variant, recognised by name.
        if self.naming == "hf" and any(n.endswith(FUSED_EXPERTS_SUFFIX) for n in self._specs):
            self.params = NativeParams(hf_experts="fused")
        check_layer_count(self.config, len(self._specs), self._config_dir / "config.json")
        self.config = drop_absent_mtp(self.config, self.naming, self.params, self._specs)

    # -- what the directory holds --------------------------------------------------------------

    def _find_config(self, explicit: str | os.PathLike | None,
                     candidates: Sequence[Path]) -> Path:
        """``--hf-config``; the config ckpt-ir writes beside the DCP files; what detection
        found; then the nearest ``config.json`` or ``huggingface/config.json`` at most three
        directories up (a run's ``huggingface/`` copy, a torchtitan dump folder)."""
        if explicit is not None:
            return Path(explicit)
        ups = [d for p in list(self.path.parents)[:_PARENT_LEVELS]
               for d in (p, p / "huggingface")]
        found = find_config_dir([self.path, *candidates, *ups])
        if found is None:
            raise MissingConfigError(
                f"{self.path} is a DCP checkpoint without a model config (no config.json here, "
                "in detection's candidates or up to three directories above); pass "
                "--hf-config DIR (the model's config.json)", path=self.path)
        return found

    def _choose_keys(self) -> tuple[str, str]:
        """The (naming, prefix) whose table names the most tensors of ``.metadata``."""
        keys = set(self._dcp.index.tensors)
        best: tuple[int, str, str] = (0, "hf", "")
        tables: dict[str, frozenset[str]] = {}
        for naming in ("hf", "torchtitan"):
            try:
                natives = [b.native for b in build_table(naming, self.config).bindings]
            except CheckpointError:
                continue  # no torchtitan rows for this architecture (or this config of it)
            tables[naming] = frozenset(natives)
            for prefix in _PREFIXES if naming == "hf" else ("",):
                if naming == "torchtitan":
                    present = {_torchtitan_name(k, tables[naming]) for k in keys}
                else:
                    present = {k[len(prefix):] for k in keys if k.startswith(prefix)}
                score = sum(1 for n in natives if n in present)
                if score > best[0]:
                    best = (score, naming, prefix)
        if best[0] == 0:
            sample = ", ".join(sorted(keys)[:3]) or "no tensors"
            raise FormatError(
                f"{self.path}: no tensor of this DCP checkpoint is a {self.config.architecture} "
                f"weight under HF names (bare or under 'model.') or torchtitan's names "
                f"(found {sample}, ...)", path=self.path)
        self._table_natives = tables[best[1]]
        return best[1], best[2]

    def _collect(self) -> None:
        index = self._dcp.index
        for fqn, t in index.tensors.items():
            why = self._skip_reason(fqn)
            if why is not None:
                self._dropped[fqn] = why
                continue
            name = fqn[len(self.prefix):]
            if self.naming == "torchtitan":
                name = _torchtitan_name(name, self._table_natives)
            if name in self._natives:
                raise FormatError(f"{self.path}: keys {self._natives[name]!r} and {fqn!r} are "
                                  f"both {name!r} (two torchtitan key schemes in one checkpoint)",
                                  path=self.path, tensor=fqn)
            self._natives[name] = fqn
            self._specs[name] = TensorSpec(name, t.shape, t.dtype)
        for fqn in index.blobs:
            self._dropped[fqn] = self._skip_reason(fqn) or "non-tensor object"
        if self.prefix:
            self._notes.append(f"model entries are under {self.prefix!r} (a nested state dict); "
                               f"{len(self._dropped)} other entries passed over")

    def _skip_reason(self, fqn: str) -> str | None:
        if self.prefix:
            if not fqn.startswith(self.prefix):
                return _group_reason(fqn) or f"outside the model state dict ({self.prefix!r})"
            return None
        why = _group_reason(fqn)
        if why is None and self.naming == "torchtitan":
            name = _torchtitan_name(fqn, self._table_natives)
            if name not in self._table_natives:
                why = next((w for s, w in _TORCHTITAN_BUFFERS if name.endswith(s)), None)
        return why

    # -- Reader protocol ----------------------------------------------------------------------

    def tensors(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def dropped(self) -> Mapping[str, str]:
        return self._dropped

    def read(self, name: str) -> torch.Tensor:
        fqn = self._natives.get(name)
        if fqn is None:
            raise FormatError(f"tensor {name!r} is not in {self.path}", tensor=name)
        t = self._dcp.index.tensors[fqn]
        return self._dcp.read_region(fqn, (0,) * len(t.shape), t.shape)

    def read_rows(self, name: str) -> tuple[torch.Tensor, ...] | None:
        """``name`` as its row chunks in order, each a zero-copy view of its ``.distcp``
        range, when its chunks are full-width row boxes (FSDP2 ``Shard(0)``: ``torch.chunk``
        boxes) and more than one; None otherwise (read it whole)."""
        fqn = self._natives.get(name)
        return None if fqn is None else self._dcp.read_rows(fqn)

    def source_files(self) -> SourceFiles:
        return carried_source_files([self._config_dir])

    def describe(self) -> dict[str, Any]:
        index = self._dcp.index
        return {
            "keys": "torchtitan FQNs" if self.naming == "torchtitan" else "HF names",
            "prefix": self.prefix or "(none)",
            "dcp_tensors": len(index.tensors),
            "dcp_objects": len(index.blobs),
            "chunks": sum(len(t.chunks) for t in index.tensors.values()),
            "data_files": len({c.file for t in index.tensors.values() for c in t.chunks}),
            "config_from": str(self._config_dir),
            **({"notes": list(self._notes)} if self._notes else {}),
        }

    def locate(self, tensor: torch.Tensor) -> tuple[Path, int] | None:
        return self._dcp.locate(tensor)

    def release(self) -> None:
        self._dcp.release()

    def close(self) -> None:
        self._dcp.close()


class TorchDcpWriter:
    """Writes a DCP directory that ``dcp.load`` reads into a model of any sharding.

    Each tensor is one chunk (the whole tensor), as ``dcp.save`` of an unsharded state dict
    writes it; DCP narrows chunks to each rank's shard on load. Several processes
    (``torchrun``) each append the tensors they own to their own ``__R_0.distcp``; rank 0
    commits ``.metadata`` over every rank's records, last.
    """

    format: ClassVar[str] = "torch-dcp"
    naming: ClassVar[str] = "hf"

    def __init__(self, directory: Path, config: ModelConfig, options: WriteOptions,
                 params: NativeParams | None = None) -> None:
        self.root = Path(directory)
        self.directory = self.root / TORCHTITAN_STEP if options.torchtitan else self.root
        self.config = config
        self.options = options
        self.params = params if params is not None else self.params_for(config, options)
        self._globals: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._data: DcpDataFile | None = None
        self._dtypes: set[DType] = set()
        self._zero_biases = self._torchtitan_zero_biases() if options.torchtitan else ()

    def _torchtitan_zero_biases(self) -> tuple[str, ...]:
        """torchtitan's ``moe.expert_bias_E`` of each MoE layer that the family's table does
        not map (qwen3 MoE): torchtitan's model asks for it when load balancing is on, and
        ``dcp.load`` refuses a missing key; zeros are its initial value and the routing the HF
        model computes. Written once, by the first process."""
        if not self.config.num_experts or self.options.rank != 0:
            return ()
        mapped = {b.native for b in build_table("torchtitan", self.config).bindings}
        names = (EXPERT_BIAS.format(layer=i) for i in range(self.config.num_layers)
                 if self.config.is_moe_layer(i))
        return tuple(n for n in names if n not in mapped)

    @classmethod
    def naming_for(cls, options: WriteOptions) -> str:
        """HF names, or torchtitan's FQNs with ``options.torchtitan``."""
        return "torchtitan" if options.torchtitan else "hf"

    @classmethod
    def params_for(cls, config: ModelConfig, options: WriteOptions) -> NativeParams:
        """HF names with MoE experts per expert (as transformers saves them) or fused
        (``hf_experts="fused"``: what a live transformers 5 model, so ``dcp.load`` into it,
        asks for); torchtitan's names with ``torchtitan``."""
        if options.torchtitan:
            build_table("torchtitan", config)  # refuses an architecture torchtitan lacks
            return NativeParams()
        return NativeParams(hf_experts=options.hf_experts)

    def begin(self, specs: Sequence[TensorSpec]) -> None:
        for s in specs:
            self._globals[s.name] = (tuple(s.shape), s.dtype.torch)
            self._specs[s.name] = s
            self._dtypes.add(s.dtype)
        self.directory.mkdir(parents=True, exist_ok=True)
        # torch names data files __<rank>_<i>.distcp; each process appends to its own.
        self._data = DcpDataFile(self.directory, f"__{self.options.rank}_0.distcp")

    def _file(self) -> DcpDataFile:
        if self._data is None:
            raise InternalError("torch-dcp writer used before begin()")
        return self._data

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._file().add_tensor(name, (0,) * tensor.dim(), tensor)

    accepts_file_slabs: ClassVar[bool] = True

    def write_slabs(self, name: str, slabs: Iterable[torch.Tensor | FileSlab]) -> None:
        """``name`` from row-major pieces (stacked experts, fused parts), never joined."""
        spec = self._specs[name]
        self._file().add_tensor_slabs(name, (0,) * len(spec.shape), spec.shape, spec.dtype.torch,
                                      slabs)

    def file_of(self, name: str) -> str | None:
        return None  # every rank appends its tensors to its own data file

    def finish_rank(self) -> list:
        if self._zero_biases:
            log.info("torchtitan: %d MoE layers get moe.expert_bias_E = zeros (torchtitan's "
                     "initial value; the HF model has no routing bias)", len(self._zero_biases))
        for name in self._zero_biases:
            bias = torch.zeros(self.config.num_experts, dtype=torch.float32)
            self._file().add_tensor(name, (0,), bias)
            self._globals[name] = (tuple(bias.shape), bias.dtype)
        records = self._file().close(fsync=True)
        self._data = None
        return records

    def finish(self, source) -> None:
        self.finish_all(source, [self.finish_rank()])

    def finish_all(self, source, parts: Sequence[list]) -> None:
        """``config.json`` and the tokenizer beside the data, then ``.metadata`` (the commit
        mark a DCP reader and torchtitan's checkpointer look for), last."""
        dtype = self.options.dtype or (next(iter(self._dtypes)) if len(self._dtypes) == 1
                                        else None)
        config = self.config.to_hf_dict(dtype=dtype)
        if dtype is not None:
            config["dtype"] = dtype_name(dtype)
        write_synced(self.directory / "config.json", json.dumps(config, indent=2) + "\n")
        for name, path in source.source_files().files.items():
            shutil.copyfile(path, self.directory / name)
        write_metadata(self.directory, [r for part in parts for r in part], self._globals,
                       flat_planner_data=True)

    def abort(self) -> None:
        if self._data is not None:
            try:
                self._data.close(fsync=False)
            except (OSError, CheckpointError):
                pass
            self._data = None
