"""``megatron-fsdp``: Megatron-FSDP ``fsdp_dtensor`` checkpoints (read only).

Megatron-LM (``--use-megatron-fsdp --ckpt-format fsdp_dtensor``), Megatron-Bridge
(``save_fsdp_dtensor_checkpoint``) and verl (``use_megatron_fsdp``, into
``global_step_N/{actor,critic}/model/dist_ckpt/``) save the live model's state dict with plain
``torch.distributed.checkpoint`` (reference fsdp-dcp-formats.md §6)::

    .metadata        pickled DCP Metadata (no metadata.json, no common.pt)
    __R_I.distcp     torch.save archives of tensor chunks and objects

Unlike torch_dist the keys are the wrapped module's, one per layer, never layer-stacked:

* ``model.module.decoder.layers.{l}.self_attention.linear_qkv.weight`` (global layer index),
  ``model.module.embedding.word_embeddings.weight``, ``model.module.output_layer.weight``;
* SwiGLU fc1 may be split by Megatron's preprocessing into ``…linear_fc1.weight_w`` (gate) and
  ``…weight_v`` (up), each the whole half; they are read back as ``[gate; up]``;
* grouped experts are ``…mlp.experts.linear_fc1.weight{e}`` (``…weight{e}_w`` / ``_v``) and
  ``…linear_fc2.weight{e}`` with the global expert id ``e``; sequential experts are
  ``…mlp.experts.local_experts.{e}.linear_fc1.weight``;
* GatedDeltaNet's fused projections are row-block sub-keys (``in_proj.weight.query`` …), as in
  torch_dist; MTP layers are ``mtp.layers.{k}.transformer_layer.`` or, as
  ``convert-torch-dist-to-fsdp-dtensor`` writes them, ``…mtp_model_layer.``;
* optimizer state (``optimizer.state.module.…``), param groups, RNG, ``rerun_state_machine``,
  ``args``/``iteration``/``checkpoint_version`` and megatron-core's ``_extra_state`` objects
  sit beside the model and are passed over, each listed with its reason.

Every one of these maps onto the ``mcore`` naming of the architecture tables
(``decoder.layers.{l}.…``, experts ``decoder.layers.{l}.mlp.experts.experts.{e}.…``), so the
rest (config checks, norm spec, padded vocabulary) is :class:`McoreDistReader`'s. Parameters
are DTensors sharded ``Shard(0)`` over the data-parallel ranks in *contiguous flat ranges*:
uneven row boxes, some empty. ``.metadata`` records those boxes; the index check refuses any set
that does not tile its tensor, and a tensor of several row boxes is streamed box by box
(:meth:`read_rows`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ckpt_ir.converters.mcore_dist import SPLIT_KEYS, McoreDistReader
from ckpt_ir.converters.storage.dcp_files import DcpReader
from ckpt_ir.errors import CorruptCheckpointError, FormatError
from ckpt_ir.ir import TensorSpec
from ckpt_ir.tables import NativeParams, build_table

__all__ = ["MegatronFsdpReader", "mcore_name"]

# `model.` then one `module.` per DDP/FSDP wrapper (Megatron-LM: `model.module.`; the
# optimizer's keys carry three); taken from the keys, not assumed.
_PREFIX = re.compile(r"^(model\.(?:module\.)*)(?=decoder\.|embedding\.|output_layer\.|mtp\.|"
                     r"language_model\.|vision_model\.)")
# Grouped experts: `mlp.experts.linear_fc1.weight{e}` -> per-expert native names.
_GROUPED = re.compile(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.(weight|bias)(\d+)$")
_SEQUENTIAL = re.compile(r"^(.*\.mlp\.experts)\.local_experts\.(\d+)\.(.+)$")
# Megatron's SwiGLU split: the gate (`_w`) and up (`_v`) halves of fc1, stored apart.
_SWIGLU = re.compile(r"^(.*linear_fc1\.(?:weight|bias)\d*)_([wv])$")
_SPLIT = re.compile(r"^(.+\.(?:" + "|".join(re.escape(k) for k in SPLIT_KEYS) + r"))\.(\w+)$")
_MTP_LIVE = ".mtp_model_layer."

_BESIDE = (
    ("optimizer.", "optimizer state"),
    ("rng_state", "RNG state"),
    ("rerun_state_machine", "rerun state machine"),
    ("opt_param_scheduler", "learning-rate scheduler state"),
    ("lr_scheduler", "learning-rate scheduler state"),
    ("args", "training arguments"),
    ("iteration", "training iteration"),
    ("checkpoint_version", "checkpoint version"),
    ("num_floating_point_operations_so_far", "training counter"),
)


def _beside_reason(fqn: str) -> str:
    if "_extra_state" in fqn:
        return "megatron-core _extra_state object (TE FP8 metadata), not a weight"
    return next((why for start, why in _BESIDE if fqn.startswith(start)),
                "outside the model state dict")


def mcore_name(key: str) -> tuple[str, str | None]:
    """The ``mcore`` native name of a model key (prefix already removed), and which part of a
    split native it is (``"w"``/``"v"`` for SwiGLU halves, a GDN sub-key name), else None."""
    part: str | None = None
    m = _SWIGLU.match(key)
    if m:
        key, part = m.group(1), m.group(2)
    else:
        m = _SPLIT.match(key)
        if m and m.group(2) in next(v for k, v in SPLIT_KEYS.items() if m.group(1).endswith(k)):
            key, part = m.group(1), m.group(2)
    m = _GROUPED.match(key)
    if m:
        key = f"{m.group(1)}.experts.{m.group(4)}.{m.group(2)}.{m.group(3)}"
    m = _SEQUENTIAL.match(key)
    if m:
        key = f"{m.group(1)}.experts.{m.group(2)}.{m.group(3)}"
    if key.startswith("mtp.") and _MTP_LIVE in key:
        key = key.replace(_MTP_LIVE, ".transformer_layer.", 1)
    return key, part


class MegatronFsdpReader(McoreDistReader):
    """Reads an ``fsdp_dtensor`` directory under the ``mcore`` naming, chunk by chunk."""

    format: ClassVar[str] = "megatron-fsdp"
    naming: ClassVar[str] = "mcore"

    def __init__(self, path: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                 trust_pickles: bool = False,
                 config_candidates: Sequence[Path] = ()) -> None:
        self.path = Path(path)
        self._trust = trust_pickles
        self._dcp = DcpReader(self.path, trust=trust_pickles)
        self._natives: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._dropped: dict[str, str] = {}
        # McoreDistReader.read consults _joined (torch_dist sub-keys); here split natives are
        # _parts, read by this class.
        self._joined: dict[str, tuple[str, ...]] = {}
        self._parts: dict[str, tuple[str, ...]] = {}   # native -> its keys, rows in order
        self._notes: list[str] = []
        index = self._dcp.index
        prefixes = Counter(m.group(1) for k in index.tensors if (m := _PREFIX.match(k)))
        if not prefixes:
            sample = ", ".join(sorted(index.tensors)[:3]) or "no tensors"
            raise FormatError(f"{self.path}: no Megatron-Core model key under 'model.' "
                              f"(found {sample}, ...)", path=self.path)
        self.prefix = prefixes.most_common(1)[0][0]
        split: dict[str, dict[str, str]] = {}
        for fqn, t in index.tensors.items():
            if not fqn.startswith(self.prefix) or "_extra_state" in fqn:
                self._dropped[fqn] = _beside_reason(fqn)
                continue
            name, part = mcore_name(fqn[len(self.prefix):])
            if part is not None:
                split.setdefault(name, {})[part] = fqn
                continue
            self._add(name, fqn)
            self._specs[name] = TensorSpec(name, tuple(t.shape), t.dtype)
        for name, parts in split.items():
            self._join_parts(name, parts)
        for fqn in index.blobs:
            self._dropped[fqn] = _beside_reason(fqn)
        self._notes.append(f"model entries under {self.prefix!r}; {len(self._dropped)} other "
                           "entries (optimizer, RNG, training state, extra state) passed over")
        self._settle_config(hf_config, self._candidates(config_candidates))

    def _add(self, name: str, fqn: str) -> None:
        if name in self._natives or name in self._parts:
            raise FormatError(f"{self.path}: {fqn!r} and another key are both {name!r}",
                              path=self.path, tensor=fqn)
        self._natives[name] = (fqn, ())

    def _join_parts(self, name: str, parts: dict[str, str]) -> None:
        """A native stored as row blocks (SwiGLU halves, GDN sub-keys): all blocks present,
        agreeing on trailing shape and dtype."""
        order = ("w", "v") if set(parts) <= {"w", "v"} else next(
            v for k, v in SPLIT_KEYS.items() if name.endswith(k))
        missing = [p for p in order if p not in parts]
        if missing:
            raise CorruptCheckpointError(
                f"{name} is stored split but lacks its {', '.join(missing)} part(s)",
                path=self.path / ".metadata", tensor=name)
        tensors = self._dcp.index.tensors
        keys = tuple(parts[p] for p in order)
        shapes = [tensors[k].shape for k in keys]
        dtypes = {tensors[k].dtype for k in keys}
        if any(len(s) < 1 or tuple(s[1:]) != tuple(shapes[0][1:]) for s in shapes) \
                or len(dtypes) != 1:
            raise CorruptCheckpointError(f"the parts of {name} disagree on shape or dtype",
                                         path=self.path / ".metadata", tensor=name)
        if name in self._natives or name in self._parts:
            raise FormatError(f"{self.path}: {name!r} is stored both whole and split",
                              path=self.path, tensor=name)
        self._parts[name] = keys
        self._specs[name] = TensorSpec(
            name, (sum(s[0] for s in shapes), *shapes[0][1:]), dtypes.pop())

    def _candidates(self, given: Sequence[Path]) -> list[Path]:
        """Detection's candidates, this directory (a config.json beside the DCP files), then
        verl's HF copies around ``model/dist_ckpt`` (``model/huggingface``, the role's
        ``huggingface``), for a path given below the role directory."""
        near = [self.path, self.path.parent / "huggingface",
                self.path.parent.parent / "huggingface"]
        return [*given, *(d for d in near if d.is_dir())]

    def _config_tensors(self) -> Mapping[str, Any]:
        """Config checks (tied embeddings, vocabulary rows) look tensors up by their mcore
        names, which here are the keys without the prefix."""
        return self._specs

    def _norm_style(self) -> str:
        """The layer spec whose *parameter* names the keys use: Megatron-FSDP saves the live
        ``state_dict()``, not ``sharded_state_dict()``, so a local-spec model's norms are
        ``input_layernorm`` / ``pre_mlp_layernorm`` (``local``), a TE-spec model's are fused
        into ``linear_qkv`` / ``linear_fc1`` (``te``), for dense and MoE layers alike."""
        present = set(self._specs)
        natives = {style: {b.native for b in build_table(
                       self.naming, self.config, NativeParams(norm_style=style)).bindings}
                   for style in ("te", "local")}
        return next((s for s, names in natives.items() if names <= present),
                    max(natives, key=lambda s: len(natives[s] & present)))

    # -- Reader protocol (the rest is McoreDistReader's) -------------------------------------

    def read(self, name: str) -> torch.Tensor:
        keys = self._parts.get(name)
        if keys is None:
            return super().read(name)
        tensors = self._dcp.index.tensors
        return torch.cat([self._dcp.read_region(k, (0,) * len(tensors[k].shape),
                                                tensors[k].shape) for k in keys], dim=0)

    def read_rows(self, name: str) -> tuple[torch.Tensor, ...] | None:
        """``name`` as its row chunks in order (views of the ``.distcp`` ranges) when stored
        in several ``Shard(0)`` boxes, split parts one after another; None: read it whole."""
        keys = self._parts.get(name) or ((self._natives[name][0],) if name in self._natives
                                         else ())
        rows: list[torch.Tensor] = []
        for k in keys:
            got = self._dcp.read_rows(k)
            if got is None:
                t = self._dcp.index.tensors[k]
                got = (self._dcp.read_region(k, (0,) * len(t.shape), t.shape),)
            rows.extend(got)
        return tuple(rows) if len(rows) > 1 else None

    def describe(self) -> dict[str, Any]:
        index = self._dcp.index
        return {
            "config_from": self._config_source,
            "prefix": self.prefix,
            "dcp_tensors": len(index.tensors),
            "dcp_objects": len(index.blobs),
            "chunks": sum(len(t.chunks) for t in index.tensors.values()),
            "split_tensors": len(self._parts),
            "padded_vocab_size": self.params.padded_vocab_size,
            **({"notes": list(self._notes)} if self._notes else {}),
        }
