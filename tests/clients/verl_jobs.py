"""Worker jobs for the verl 0.9.1 tree tests (run inside :mod:`tests.clients.mcore_harness`).

verl's Megatron workers build a megatron-core GPTModel per role; the critic's output layer is
replaced by ``LinearForLastLayer(hidden, 1)`` (``verl/utils/megatron/…``: a ``torch.nn.Linear``
without bias, whole on every TP rank, returning ``(logits, None)`` like megatron's linear
layers). A dist-only save (``use_dist_checkpointing=True``) is ``dist_checkpointing.save`` of
``{"model": model.sharded_state_dict()}`` into ``model/dist_ckpt`` plus, from rank 0,
``transformer_config.json`` (the ``TransformerConfig`` as JSON-safe values); no HF config
(verl-formats.md §2.2, §2.4). These jobs do the same with the test's tiny models:

``verl-save``
    ``{hf_config, tp, seed, critic, role, legacy?, logits_out, input_ids}``: build the model
    at TP=``tp`` (local spec), redraw every parameter, save ``role/model/dist_ckpt`` and
    ``role/transformer_config.json`` as verl does; with ``legacy`` also each rank's
    ``state_dict()`` as verl's legacy files (``legacy/model/mp_rank_TT/model.pt``); rank 0
    saves the forward output (logits, or values ``[batch, seq, 1]`` for the critic).
``verl-load``
    ``{hf_config, tp, critic, ckpt, format, out, input_ids}``: build the model, load what
    ckpt-ir wrote (``mcore-dist``: ``dist_checkpointing.load`` with ``return_all``, nothing
    unexpected, then as verl 0.9.1 loads it: ``FullyParallelLoadStrategyWrapper`` over
    ``TorchDistLoadShardedStrategy``, ``load_state_dict(strict=True)``;
    ``verl-legacy``: ``load_state_dict(strict=True)`` of this rank's ``model.pt``), run the
    forward; rank 0 saves the output.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["COMMANDS", "LinearForLastLayer"]


class LinearForLastLayer(torch.nn.Linear):
    """verl's value head: ``nn.Linear(hidden, 1, bias=False)`` in the GPTModel's output slot."""

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__(in_features=input_size, out_features=output_size, bias=False)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        # GPTModel passes the (tied) output weight and a gather flag; the value head has its
        # own weight and is not TP-split.
        return super().forward(input_).float(), None


def _model(job: Mapping[str, Any]):
    from tests.clients.mcore_harness import build_gpt_model, set_parallel

    tp = int(job["tp"])
    set_parallel(tp)
    hf = json.loads(Path(job["hf_config"]).read_text())
    if job.get("critic"):
        # verl builds the critic untied whatever the base model's config says.
        hf = {**hf, "tie_word_embeddings": False}
        # One file per rank: the ranks run this at once.
        path = Path(job["hf_config"]).with_name(
            f"critic-base-config.rank{torch.distributed.get_rank()}.json")
        path.write_text(json.dumps(hf))
        model = build_gpt_model(path, tp)
        model.output_layer = LinearForLastLayer(model.config.hidden_size, 1)
        return model.eval()
    return build_gpt_model(job["hf_config"], tp)


def _json_safe(config: Any) -> dict[str, Any]:
    """verl's ``transformer_config.json``: every TransformerConfig field with a JSON value
    (dtypes as strings; callables, process groups and the like dropped)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, torch.dtype):
            out[f.name] = str(value)
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[f.name] = value
        elif isinstance(value, (list, tuple)) and all(
                isinstance(v, (bool, int, float, str)) for v in value):
            out[f.name] = list(value)
    return out


def verl_save(job: Mapping[str, Any], rank: int, world: int) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    from tests.clients.mcore_harness import _save_rank0, gpt_forward, randomize_megatron_

    model = _model(job)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    randomize_megatron_(model, int(job["seed"]), tp_rank)
    role = Path(job["role"])
    dist_dir = role / "model" / "dist_ckpt"
    if rank == 0:
        dist_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(dist_dir))
    if rank == 0:
        (role / "transformer_config.json").write_text(json.dumps(_json_safe(model.config),
                                                                 indent=2))
    if job.get("legacy"):
        path = Path(job["legacy"]) / "model" / f"mp_rank_{tp_rank:02d}" / "model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save([model.state_dict()], path)
    dist.barrier()
    _save_rank0(gpt_forward(model, job["input_ids"]), job["logits_out"], rank)


def verl_load(job: Mapping[str, Any], rank: int, world: int) -> None:
    from megatron.core import dist_checkpointing, parallel_state

    from tests.clients.mcore_harness import _save_rank0, gpt_forward

    model = _model(job)
    ckpt = Path(job["ckpt"])
    if job["format"] == "mcore-dist":
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelLoadStrategyWrapper,
        )
        from megatron.core.dist_checkpointing.strategies.torch import (
            TorchDistLoadShardedStrategy,
        )

        _, missing, unexpected = dist_checkpointing.load(
            model.sharded_state_dict(), str(ckpt), strict="return_all")
        # "missing": in the checkpoint, not requested. ckpt-ir writes both specs'
        # _extra_state objects (and megatron-core 0.16.1 lists its own common_state);
        # nothing else may be left over or absent.
        if unexpected or any("_extra_state" not in k and k != "common_state" for k in missing):
            raise RuntimeError(f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        # Then what verl 0.9.1's load_checkpoint does: read the content metadata (none here:
        # verl falls back to its defaults), load through load_dist_checkpointing's strategy
        # (verl/utils/megatron/dist_checkpointing.py), load_state_dict(strict=True).
        if dist_checkpointing.load_content_metadata(checkpoint_dir=str(ckpt)) is not None:
            raise RuntimeError("ckpt-ir's torch_dist has no content metadata")
        strategy = FullyParallelLoadStrategyWrapper(
            TorchDistLoadShardedStrategy(),
            parallel_state.get_data_parallel_group(with_context_parallel=True))
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt),
                                         sharded_strategy=strategy)
        model.load_state_dict(loaded, strict=True)
    else:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        states = torch.load(ckpt / "model" / f"mp_rank_{tp_rank:02d}" / "model.pt",
                            weights_only=True)
        model.load_state_dict(states[0], strict=True)
    _save_rank0(gpt_forward(model, job["input_ids"]), job["out"], rank)


COMMANDS = {"verl-save": verl_save, "verl-load": verl_load}
