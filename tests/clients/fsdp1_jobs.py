"""FSDP1 without a device mesh on CPU/gloo, one process per rank (tests only): the saves that
hold ``ShardedTensor``s.

The test process never initialises ``torch.distributed``; :func:`launch` starts ``python -m
tests.clients.fsdp1_jobs <command> <json-args>`` once per rank (the shared launcher of
``tests/clients/mcore_harness.py``). Commands:

``save``
    ``{hf_dir, out, how, dtype}``: every rank loads the HF model in ``hf_dir`` (so all ranks
    agree on the weights), casts it to ``dtype`` and wraps it in
    ``FullyShardedDataParallel(model, device_id=torch.device("cpu"))`` with no
    ``device_mesh`` (FSDP1 then saves ``SHARDED_STATE_DICT`` as ShardedTensors, not DTensors).
    ``how`` = ``torch``: ``torch.save(model.state_dict())`` under
    ``FSDP.state_dict_type(model, SHARDED_STATE_DICT)`` to
    ``out/model_world_size_{W}_rank_{r}.pt`` (a hand-rolled FSDP1 trainer's save; with
    ``hybrid: k``, ``HYBRID_SHARD`` over groups of k consecutive ranks); ``verl``:
    verl 0.9.1's ``FSDPCheckpointManager.save_checkpoint(out)`` after one AdamW step at lr 0
    (optimizer state in the optimizer file, weights unchanged), with
    ``save_contents=['model', 'optimizer', 'extra']``: verl passes a mesh itself, but its
    manager takes any FSDP1 model (fsdp-dcp-formats.md Appendix A, ``fsdp1_nomesh``).
``batch``
    A list of ``{"command": ..., **args}`` run in one process start.

verl's platform shim is tests/clients/verl_fsdp_harness.py's (bare namespace packages for the
Ray-importing ``__init__``s); gloo is the backend.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from tests.clients import mcore_harness

__all__ = ["launch"]


def launch(command: str, args: Any, *, world_size: int, timeout: float = 300.0) -> None:
    """Run ``command`` on ``world_size`` gloo ranks; raise HarnessError on failure."""
    mcore_harness.launch(command, args, world_size=world_size, timeout=timeout, attempts=2,
                         module="tests.clients.fsdp1_jobs",
                         env={"VERL_USE_EXTERNAL_PLUGINS": "none"})


# --------------------------------------------------------------------------- worker side


def _wrap(job: dict[str, Any]) -> torch.nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    from tests.clients.verl_fsdp_harness import _model

    # No device_mesh: FSDP1 keeps its process group and saves ShardedTensors.
    group = job.get("hybrid")
    if not group:
        return FSDP(_model(job), device_id=torch.device("cpu"), sync_module_states=False,
                    use_orig_params=False)
    # HYBRID_SHARD over groups of `group` consecutive ranks, replicated across the groups
    # (FSDP's own group split needs CUDA's device count; on CPU the groups are passed in).
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    shard_groups = [dist.new_group(list(range(s, s + group))) for s in range(0, world, group)]
    replica_groups = [dist.new_group(list(range(i, world, group))) for i in range(group)]
    return FSDP(_model(job), device_id=torch.device("cpu"), sync_module_states=False,
                use_orig_params=False, sharding_strategy=ShardingStrategy.HYBRID_SHARD,
                process_group=(shard_groups[rank // group], replica_groups[rank % group]))


def _save(job: dict[str, Any]) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    model = _wrap(job)
    out = Path(job["out"])
    if job["how"] == "torch":
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            state = model.state_dict()
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / f"model_world_size_{world}_rank_{rank}.pt")
        return
    from tests.clients.verl_fsdp_harness import _manager

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    model(input_ids=torch.arange(8).reshape(1, 8)).logits.float().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    _manager(model, optimizer, {"save_contents": ["model", "optimizer", "extra"]}
             ).save_checkpoint(str(out), global_step=1)


def _batch(jobs: list[dict[str, Any]]) -> None:
    for job in jobs:
        _COMMANDS[job["command"]](job)
        torch.distributed.barrier()


_COMMANDS = {"save": _save, "batch": _batch}


def main(argv: list[str]) -> None:
    from tests.clients.verl_fsdp_harness import _shim_verl

    command, payload = argv[1], json.loads(argv[2])
    _shim_verl()
    torch.distributed.init_process_group("gloo")
    try:
        _COMMANDS[command](payload)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv)
