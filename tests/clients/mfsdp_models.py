"""Megatron-FSDP ``fsdp_dtensor`` checkpoints for tests, written by torch's own ``dcp.save``.

What Megatron-LM's ``preprocess_fsdp_dtensor_state_dict`` + ``dcp.save`` produce from a
GPTModel's ``state_dict()`` (reference fsdp-dcp-formats.md §6.2, §6.3):

* every model key under ``model.module.``;
* grouped experts re-keyed ``…mlp.experts.linear_fc1.weight{e}`` (global expert id; the live
  state dict of a grouped-GEMM MoE), or left as ``…local_experts.{e}.…`` (SequentialMLP);
* SwiGLU fc1 optionally split into ``…weight_w`` (gate) and ``…weight_v`` (up);
* each tensor stored as the uneven ``Shard(0)`` row boxes of ``dp`` data-parallel ranks
  (contiguous flat ranges viewed as rows, some empty), recorded through the same
  ``__create_write_items__`` / ``__create_chunk_list__`` / ``__get_tensor_shard__`` hooks
  Megatron attaches to its local tensors (``preprocess_state_dict_for_uneven_dtensor``);
* optimizer moments ``optimizer.state.module.module.module.<path>.exp_avg``, param-group
  metadata, RNG state, ``checkpoint_version`` and ``iteration`` beside the model.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["from_mcore_natives", "fsdp_dtensor_state_dict", "save_fsdp_dtensor", "uneven_rows"]

PREFIX = "model.module."
OPTIM_PREFIX = "optimizer.state.module.module.module."
_LOCAL_EXPERT = re.compile(
    r"^(.*\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")


def uneven_rows(name: str, rows: int, dp: int = 3) -> list[int]:
    """Row counts of ``dp`` ranks' contiguous shards of a ``rows``-row tensor: uneven, and
    for some tensors one rank empty (a flat-buffer boundary falling elsewhere)."""
    h = zlib.crc32(name.encode())
    first = rows * (3 + h % 3) // 8
    middle = 0 if h % 2 else (rows - first) // 3
    counts = [first, middle, rows - first - middle]
    return counts[:dp] if dp == 3 else [rows]


def _sharded(name: str, t: torch.Tensor, dp: int) -> torch.Tensor:
    """``t`` carrying the DCP hooks that record its uneven row boxes (one process writes all
    ranks' boxes, so the files hold exactly what a ``dp``-rank save would)."""
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    t = t.detach().clone().contiguous()
    if t.dim() == 0:
        return t
    boxes, start = [], 0
    for n in uneven_rows(name, t.shape[0], dp):
        boxes.append((start, n))
        start += n
    rest = (0,) * (t.dim() - 1)

    def chunk(o: int, n: int) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size((o, *rest)),
                                    sizes=torch.Size((n, *t.shape[1:])))

    def write_items(fqn: str, _obj: Any) -> list:
        return [WriteItem(index=MetadataIndex(fqn, (o, *rest)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=chunk(o, n), properties=TensorProperties.create_from_tensor(t),
                              size=t.size()))
                for o, n in boxes]

    def shard(index: MetadataIndex) -> torch.Tensor:
        # An empty box shares its offset with the next one; the writer asks for the data one.
        o = index.offset[0]
        n = max(n for s, n in boxes if s == o)
        return t.narrow(0, o, n)

    t.__create_write_items__ = write_items
    t.__create_chunk_list__ = lambda: [chunk(o, n) for o, n in boxes]
    t.__get_tensor_shard__ = shard
    return t


def fsdp_dtensor_state_dict(model: Mapping[str, Any], *, grouped_experts: bool = True,
                            split_swiglu: bool = True, dp: int = 3) -> dict[str, Any]:
    """The fsdp_dtensor state dict of a GPTModel ``state_dict()`` (live megatron-core names)."""
    out: dict[str, Any] = {}
    for name, value in model.items():
        if not isinstance(value, torch.Tensor):
            out[PREFIX + name] = value  # _extra_state objects, saved as bytes
            continue
        if "_extra_state" in name:
            out[PREFIX + name] = value
            continue
        m = _LOCAL_EXPERT.match(name)
        if m and grouped_experts:
            name = f"{m.group(1)}.{m.group(3)}.{m.group(4)}{m.group(2)}"
        parts = {name: value}
        if split_swiglu and re.search(r"linear_fc1\.weight\d*$", name):
            gate, up = value.chunk(2, dim=0)
            parts = {name + "_w": gate, name + "_v": up}
        for key, t in parts.items():
            out[PREFIX + key] = _sharded(key, t, dp)
    # Beside the model, as Megatron-LM saves them: passed over by a model reader.
    first = next(k for k, v in model.items() if isinstance(v, torch.Tensor) and v.dim() == 2)
    out[f"{OPTIM_PREFIX}{first}.exp_avg"] = _sharded(first, torch.zeros_like(model[first]), dp)
    out[f"optimizer.param_to_group_meta.module.module.module.{first}"] = {"lr": 1e-4}
    out["rng_state"] = {"(0, 0)": [{"random_rng_state": (3, (1, 2), None)}]}
    out["checkpoint_version"] = 3.0
    out["iteration"] = 7
    return out


def save_fsdp_dtensor(state_dict: Mapping[str, Any], directory: Path, *,
                      no_dist: bool = True) -> Path:
    """``dcp.save`` into ``directory`` (FileSystemWriter, ``.metadata`` last)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(dict(state_dict), checkpoint_id=str(directory), no_dist=no_dist)
    return directory


def from_mcore_natives(natives: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Live GPTModel names of ckpt-ir's ``mcore`` natives: routed experts
    ``mlp.experts.experts.{e}.`` are SequentialMLP's ``mlp.experts.local_experts.{e}.``."""
    return {re.sub(r"\.mlp\.experts\.experts\.(\d+)\.", r".mlp.experts.local_experts.\1.", k): v
            for k, v in natives.items()}
