"""``hf-peft``: a Hugging Face PEFT LoRA adapter directory.

On disk (what ``PeftModel.save_pretrained`` writes)::

    adapter_config.json          LoraConfig: r, lora_alpha, use_rslora, rank_pattern,
                                 alpha_pattern, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in]
                                 base_model.model.<module>.lora_B.weight [out, r]
    (adapter_model.bin           the same as a torch.save state dict, older PEFT)

With ``target_parameters`` (LoRA on transformers 5's fused MoE expert parameters, what peft
0.21 saves for ``target_modules=["w1", "w2", "w3"]`` on Mixtral), each targeted
``model.layers.{l}.mlp.experts.{gate_up_proj,down_proj}`` has one ParamWrapper pair::

    base_model.model.model.layers.{l}.mlp.experts[.base_layer].lora_A.weight   [E·r, in]
    base_model.model.model.layers.{l}.mlp.experts[.base_layer].lora_B.weight   [out, E·r]

    A rows:    [ A_0 ; A_1 ; ... ; A_{E-1} ]       expert-major, r rows each
    B columns: k·E + e  is rank k of expert e       (peft reshapes B as (out, r, E))
    gate_up:   B rows [gate (F); up (F)], one A for both

The reader exposes them as the per-expert IR tensors (gate and up share the expert's A); the
writer packs them back when the adapter's config has ``target_parameters``.

The reader validates ``adapter_config.json`` strictly (:meth:`AdapterConfig.from_peft`) and
exposes the tensors under their IR names (the prefix removed); the naming is ``hf``, the
identity over the adapter's schema. The base model's ``config.json`` comes from ``--hf-config``,
the adapter directory itself (ckpt-ir writes it there), or ``base_model_name_or_path`` when
that is a local directory. The writer streams one ``adapter_model.safetensors`` and writes
``adapter_config.json`` and the base ``config.json`` (with the tokenizer files) beside it; the
directory loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import reprlib
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ckpt_ir import dtypes
from ckpt_ir.adapters import EXPERT_PARAMS, AdapterConfig, parameter_prefix
from ckpt_ir.architectures.vision import ir_name_of_peft, peft_name
from ckpt_ir.converters.base import SourceFiles, WriteOptions
from ckpt_ir.converters.storage.hf_files import (
    carried_source_files,
    check_layer_count,
    load_hf_config,
)
from ckpt_ir.converters.storage.safetensors_file import (
    SafetensorsFile,
    SafetensorsWriter,
    read_header,
)
from ckpt_ir.durable import write_json
from ckpt_ir.errors import CorruptCheckpointError, FormatError, InternalError, MissingConfigError
from ckpt_ir.ir import ModelConfig, TensorSpec
from ckpt_ir.safety.files import read_text
from ckpt_ir.safety.unpickler import load_torch
from ckpt_ir.tables import NativeParams
from ckpt_ir.transforms import same_bits

__all__ = ["ADAPTER_CONFIG", "ADAPTER_SAFETENSORS", "PREFIX", "HfPeftReader", "HfPeftWriter",
           "read_adapter_config"]

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
"""PEFT's prefix of every saved tensor name: PeftModel.base_model (LoraModel).model."""


def read_adapter_config(path: Path) -> dict[str, Any]:
    """Parse ``adapter_config.json``; validation of the fields is AdapterConfig.from_peft's."""
    text = read_text(path, path.name)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError covers decode errors
        raise CorruptCheckpointError(f"{path.name} is not valid JSON: {e}", path=path) from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path.name} is not a JSON object", path=path)
    return data


def _gate_up_interleaved(config: ModelConfig) -> bool:
    """The model's fused gate_up_proj interleaves gate and up by output (gpt-oss)."""
    names = config.moe_names
    return bool(names is not None and names.gate_up_interleaved)


class HfPeftReader:
    """Lazy reader of a PEFT LoRA adapter directory (IR names, zero-copy tensors)."""

    format: ClassVar[str] = "hf-peft"
    naming: ClassVar[str] = "hf"

    def __init__(self, path: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                 trust_pickles: bool = False, config_candidates: Sequence[Path] = (),
                 lora_alpha: float | None = None, base_config: ModelConfig | None = None,
                 peft_export: Path | None = None) -> None:
        del peft_export  # only torch_dist adapters have an HF PEFT export beside them
        self.path = Path(path)
        self._trust = trust_pickles
        peft = read_adapter_config(self.path / ADAPTER_CONFIG)
        if base_config is not None:
            self._config_dir: Path | None = None
            self.config = base_config
        else:
            self._config_dir = self._find_config_dir(hf_config, peft, config_candidates)
            self.config = ModelConfig.from_hf(load_hf_config(self._config_dir))
        self.params = NativeParams()
        self._specs: dict[str, TensorSpec] = {}
        self._raw: dict[str, str] = {}
        self._file: SafetensorsFile | None = None
        self._bin: dict[str, torch.Tensor] = {}
        self._dropped: dict[str, str] = {}
        # IR name -> (raw packed name, lora_A or lora_B, expert, rank, part, parts)
        self._packed: dict[str, tuple[str, str, int, int, int, int]] = {}
        self._kind = self._scan()
        # Every layer has its own LoRA tensors (layers_to_transform is refused): a config
        # declaring more layers than the adapter has tensors would size the adapter's targets
        # and the plan by the claim (200,000 layers took 4.9 GB and a minute to be refused for
        # the missing tensors). Checked before anything is built per layer.
        check_layer_count(self.config, len(self._specs),
                          self.path / ADAPTER_CONFIG if self._config_dir is None
                          else self._config_dir / "config.json")
        self.adapter = AdapterConfig.from_peft(peft, self.config, path=self.path / ADAPTER_CONFIG)
        if lora_alpha is not None and float(lora_alpha) != float(self.adapter.lora_alpha):
            log.warning("--lora-alpha %s ignored: %s says lora_alpha=%s", lora_alpha,
                        ADAPTER_CONFIG, self.adapter.lora_alpha)
        self._unpack_expert_parameters()

    def _find_config_dir(self, explicit: str | os.PathLike | None, peft: Mapping[str, Any],
                         candidates: Sequence[Path]) -> Path:
        if explicit is not None:
            return Path(explicit)
        if (self.path / "config.json").is_file():
            return self.path
        for c in candidates:
            if c.is_dir() and (c / "config.json").is_file():
                return c
        base = peft.get("base_model_name_or_path")
        if isinstance(base, str) and base:
            # A local path as PEFT recorded it at training time (absolute, or relative to where
            # training ran); a hub id is not looked up.
            for p in (Path(base), self.path / base):
                if (p / "config.json").is_file():
                    return p
        raise MissingConfigError(
            f"{self.path} does not say which model it adapts (no config.json, and "
            f"base_model_name_or_path {peft.get('base_model_name_or_path')!r} is not a local "
            "model directory); pass --hf-config DIR", path=self.path)

    def _scan(self) -> str:
        p = self.path
        if (p / ADAPTER_SAFETENSORS).is_file():
            header = read_header(p / ADAPTER_SAFETENSORS)
            entries = {n: (tuple(e.shape), e.dtype) for n, e in header.entries.items()}
            kind = ADAPTER_SAFETENSORS
        elif (p / ADAPTER_BIN).is_file():
            state = load_torch(p / ADAPTER_BIN, trust=self._trust)
            if not isinstance(state, Mapping):
                raise CorruptCheckpointError(f"{ADAPTER_BIN} does not hold a state dict",
                                             path=p / ADAPTER_BIN)
            entries = {}
            for name, t in state.items():
                if not isinstance(name, str):
                    raise CorruptCheckpointError(f"{ADAPTER_BIN} holds a state dict with a "
                                                 f"non-string key {reprlib.repr(name)}",
                                                 path=p / ADAPTER_BIN)
                if not isinstance(t, torch.Tensor):
                    self._dropped[str(name)] = f"non-tensor entry ({type(t).__name__})"
                    continue
                entries[name] = (tuple(t.shape), dtypes.of(t))
                self._bin[name] = t
            kind = ADAPTER_BIN
        else:
            raise CorruptCheckpointError(f"{p} has {ADAPTER_CONFIG} but no {ADAPTER_SAFETENSORS} "
                                         f"or {ADAPTER_BIN}", path=p)
        for raw, (shape, dtype) in entries.items():
            # PEFT saves base_model.model.<module>; a name without it is left as it is, so the
            # plan reports it as unmapped instead of guessing.
            name = ir_name_of_peft(self.config, raw[len(PREFIX):]) if raw.startswith(PREFIX) \
                else raw
            if name in self._specs:
                raise CorruptCheckpointError(f"tensor {name} appears twice", path=p, tensor=name)
            self._specs[name] = TensorSpec(name, shape, dtype)
            self._raw[name] = raw
        return kind

    def _unpack_expert_parameters(self) -> None:
        """target_parameters: each fused expert parameter's ParamWrapper A and B, as the
        per-expert IR tensors they hold (shapes checked here; names by the plan)."""
        groups = self.adapter.parameter_groups()
        experts = self.config.num_experts
        for param, members in groups.items():
            prefix = parameter_prefix(param, groups)
            leaves = EXPERT_PARAMS[param.rpartition(".")[2]]
            for kind in ("lora_A", "lora_B"):
                packed = f"{prefix}.{kind}.weight"
                spec = self._specs.pop(packed, None)
                if spec is None:
                    continue  # the plan names every IR tensor then missing
                raw = self._raw.pop(packed)
                stacked = 0 if kind == "lora_A" else 1
                if len(spec.shape) != 2 or spec.shape[stacked] % experts or \
                        (kind == "lora_B" and spec.shape[0] % len(leaves)):
                    raise CorruptCheckpointError(
                        f"{raw} has shape {list(spec.shape)}, not the [E·r, in] / [out, E·r] of "
                        f"a ParamWrapper over {experts} experts", path=self.path, tensor=raw)
                rank = spec.shape[stacked] // experts
                for m in members:
                    part = leaves.index(m.leaf)
                    shape = (rank, spec.shape[1]) if kind == "lora_A" else \
                        (spec.shape[0] // len(leaves), rank)
                    name = f"{m.name}.{kind}.weight"
                    self._specs[name] = TensorSpec(name, shape, spec.dtype)
                    self._packed[name] = (raw, kind, m.expert or 0, rank, part, len(leaves),
                                          _gate_up_interleaved(self.config))

    def _read_raw(self, raw: str) -> torch.Tensor:
        if self._kind == ADAPTER_BIN:
            return self._bin[raw]
        if self._file is None:
            self._file = SafetensorsFile(self.path / ADAPTER_SAFETENSORS)
        return self._file.get(raw)

    # -- Reader protocol --------------------------------------------------------------------------

    def tensors(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def dropped(self) -> Mapping[str, str]:
        return self._dropped

    def read(self, name: str) -> torch.Tensor:
        packed = self._packed.get(name)
        if packed is not None:
            raw, kind, expert, rank, part, parts, interleaved = packed
            t = self._read_raw(raw)
            if kind == "lora_A":
                return t[expert * rank:(expert + 1) * rank]  # a view: contiguous rows
            rows = t.shape[0] // parts
            experts = t.shape[1] // rank
            # B's rows are the fused parameter's outputs: [gate; up], or gpt-oss's
            # interleave (row 2j gate j, 2j + 1 up j).
            picked = slice(part, None, parts) if interleaved else \
                slice(part * rows, (part + 1) * rows)
            return t.reshape(t.shape[0], rank, experts)[picked, :, expert].clone(
                memory_format=torch.contiguous_format)
        raw = self._raw.get(name)
        if raw is None:
            raise FormatError(f"tensor {name!r} is not in {self.path}", tensor=name)
        return self._read_raw(raw)

    def source_files(self) -> SourceFiles:
        dirs = [d for d in (self._config_dir, self.path) if d is not None]
        return carried_source_files(dirs)

    def describe(self) -> dict[str, Any]:
        return {"weights": self._kind, "config_from": str(self._config_dir or "base model"),
                "adapter": self.adapter.summary()}

    def release(self) -> None:
        if self._file is not None:
            self._file.release()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._bin.clear()


class HfPeftWriter:
    """Streams ``adapter_model.safetensors``; ``adapter_config.json`` and config.json last.

    ``options.adapter.adapter`` is the :class:`AdapterConfig` of the tensors written.
    """

    format: ClassVar[str] = "hf-peft"
    naming: ClassVar[str] = "hf"

    def __init__(self, directory: Path, config: ModelConfig, options: WriteOptions,
                 params: NativeParams | None = None) -> None:
        adapter = options.require_adapter("hf-peft").adapter
        if _gate_up_interleaved(config) and not adapter.target_parameters and any(
                adapter.module(m).site == "experts" for m in adapter.modules()):
            # An adapter created from Megatron LoRA (no adapter_config.json carried) names
            # experts as modules; gpt-oss has none, so peft could not load what would be written.
            raise FormatError(f"a peft adapter of {config.architecture}'s experts must target "
                              "their fused parameters (target_parameters gate_up_proj / "
                              "down_proj); writing one from Megatron LoRA alone is not "
                              "supported")
        self.directory = directory
        self.config = config
        self.options = options
        self.adapter = adapter
        # The params the plan was built with (params_for runs once per conversion).
        self.params = params if params is not None else self.params_for(config, options)
        self._writer: SafetensorsWriter | None = None
        self._pending = 0
        # target_parameters: IR name -> packed name, and each packed tensor's pieces so far
        self._pack_of: dict[str, str] = {}
        self._packs: dict[str, dict[str, torch.Tensor | None]] = {}

    @classmethod
    def params_for(cls, config: ModelConfig, options: WriteOptions) -> NativeParams:
        """PEFT names are the IR names (plus a prefix); no physical choices."""
        return NativeParams()

    def _packed_specs(self, specs: Mapping[str, TensorSpec]) -> list[TensorSpec]:
        """target_parameters: the ParamWrapper tensors holding the per-expert IR tensors."""
        groups = self.adapter.parameter_groups()
        experts = self.config.num_experts
        out: list[TensorSpec] = []
        for param, members in groups.items():
            prefix = parameter_prefix(param, groups)
            for kind in ("lora_A", "lora_B"):
                names = [f"{m.name}.{kind}.weight" for m in members]
                parts = [specs[n] for n in names]
                if len({p.dtype for p in parts}) != 1:
                    raise FormatError(f"the adapters packed into {param} mix dtypes")
                leaves = EXPERT_PARAMS[param.rpartition(".")[2]]
                per_expert = parts[:len(leaves)]
                if kind == "lora_A":
                    shape = (experts * per_expert[0].shape[0], per_expert[0].shape[1])
                else:
                    shape = (sum(p.shape[0] for p in per_expert), experts * per_expert[0].shape[1])
                packed = f"{prefix}.{kind}.weight"
                out.append(TensorSpec(packed, shape, parts[0].dtype))
                self._packs[packed] = dict.fromkeys(names)
                self._pack_of.update(dict.fromkeys(names, packed))
        return out

    def begin(self, specs: Sequence[TensorSpec]) -> None:
        by_name = {s.name: s for s in specs}
        packed = self._packed_specs(by_name)
        files = [s for s in specs if s.name not in self._pack_of] + packed
        # Widest dtypes first keeps every tensor aligned for zero-copy reads.
        ordered = sorted(files, key=lambda s: -s.dtype.itemsize)
        entries = [(PREFIX + peft_name(self.config, s.name), s.dtype, s.shape) for s in ordered]
        self._writer = SafetensorsWriter(self.directory / ADAPTER_SAFETENSORS, entries,
                                         {"format": "pt"})
        self._pending = len(specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None:
            raise InternalError("hf-peft writer used before begin()")
        packed = self._pack_of.get(name)
        if packed is None:
            self._writer.write(PREFIX + peft_name(self.config, name), tensor)
        else:
            # Held until every expert's piece is here (one layer's expert adapters, small).
            pieces = self._packs[packed]
            pieces[name] = tensor.detach().clone()
            if all(t is not None for t in pieces.values()):
                self._writer.write(PREFIX + peft_name(self.config, packed),
                                   self._pack(packed, pieces))
                del self._packs[packed]
        self._pending -= 1

    def _pack(self, packed: str, pieces: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
        """One ParamWrapper tensor from its per-expert pieces, in the layout of the module
        docstring: A rows expert-major, B column ``k·E + e``."""
        experts = self.config.num_experts
        tensors = [t for t in pieces.values() if t is not None]
        per = len(tensors) // experts  # leaves per expert: gate, up (or down)
        by_expert = [tensors[e * per:(e + 1) * per] for e in range(experts)]
        if packed.endswith(".lora_A.weight"):
            for e, group in enumerate(by_expert):
                if any(not same_bits(group[0], t) for t in group[1:]):
                    raise FormatError(
                        f"expert {e}'s gate and up adapters have different A matrices, which one "
                        f"ParamWrapper ({packed.removesuffix('.lora_A.weight')}) cannot hold; "
                        "write the adapter without target_parameters")
            return torch.cat([group[0] for group in by_expert], dim=0)
        # [out, r] per expert: [gate; up], or gpt-oss's row interleave of gate and up.
        columns = [torch.stack(group, dim=1).reshape(-1, group[0].shape[1])
                   if _gate_up_interleaved(self.config) and per > 1 else torch.cat(group, dim=0)
                   for group in by_expert]
        return torch.stack(columns, dim=-1).reshape(columns[0].shape[0], -1)

    def finish(self, source: Any) -> None:
        if self._writer is None or self._pending:
            raise InternalError("hf-peft writer finished with unwritten tensors")
        self._writer.close(fsync=True)
        self._writer = None
        write_json(self.directory / ADAPTER_CONFIG, self.adapter.to_peft_dict())
        write_json(self.directory / "config.json", self.config.to_hf_dict())
        for name, path in source.source_files().files.items():
            if name != "config.json":
                shutil.copyfile(path, self.directory / name)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
