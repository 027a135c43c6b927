"""torch FSDP2 jobs on CPU/gloo for the torch-dcp tests: real ``fully_shard`` models saving
and loading DCP checkpoints, run as separate processes (one per rank).

``python -m tests.clients.dcp_jobs <command> <json args>`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` / ``MASTER_PORT`` set; :func:`launch` starts the ranks and waits for them.

Each command runs its ``args["models"]`` jobs in turn (one process start for all of them).

* ``save``: every rank builds the HF model saved at ``job["hf"]`` (transformers), shards each
  decoder layer and the root with ``fully_shard``, and saves it three ways: ``plain/``
  (``dcp.save(get_model_state_dict(model))``), ``nested/`` (``{"model", "optimizer",
  "train_state"}``, the optimizer state made by one AdamW step at lr 0, which leaves the
  weights as they were) and ``hf_sharded/`` (``HuggingFaceStorageWriter``,
  ``save_distributed=True``, consolidation off).
* ``load``: every rank builds the model from its config with other random weights, shards it,
  ``dcp.load``s ``job["ckpt"]`` into its shards and ``set_model_state_dict``s them; rank 0
  writes the gathered full state dict to ``job["out"]`` (safetensors) for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def launch(command: str, args: dict[str, Any], *, world_size: int, timeout: float = 240.0
           ) -> None:
    """Run ``command`` of this module on ``world_size`` gloo ranks (the shared launcher of
    tests/clients/mcore_harness.py); HarnessError, an AssertionError, with the logs on failure."""
    from tests.clients.mcore_harness import launch as launch_ranks

    launch_ranks(command, args, world_size=world_size, timeout=timeout,
                 module="tests.clients.dcp_jobs")


def _sharded_model(config_or_path: str, *, pretrained: bool, seed: int = 0):
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if pretrained:
        model = AutoModelForCausalLM.from_pretrained(config_or_path, dtype=torch.float32)
    else:
        config = AutoConfig.from_pretrained(config_or_path)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def save(args: dict[str, Any]) -> None:
    for job in args["models"]:
        _save_one(job)


def _save_one(args: dict[str, Any]) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    out = Path(args["out"])
    model = _sharded_model(args["hf"], pretrained=True)
    dcp.save(get_model_state_dict(model), checkpoint_id=str(out / "plain"))
    if args.get("nested"):
        optim = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
        model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        optim.step()  # lr 0: moments filled, weights unchanged
        dcp.save({"model": get_model_state_dict(model),
                  "optimizer": get_optimizer_state_dict(model, optim),
                  "train_state": {"step": 3, "tokens_seen": 12}},
                 checkpoint_id=str(out / "nested"))
    if args.get("hf_sharded"):
        writer = HuggingFaceStorageWriter(path=str(out / "hf_sharded"), save_distributed=True,
                                          enable_consolidation=False)
        dcp.save(get_model_state_dict(model), storage_writer=writer)


def load(args: dict[str, Any]) -> None:
    for job in args["models"]:
        _load_one(job)


def _load_one(args: dict[str, Any]) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    model = _sharded_model(args["config"], pretrained=False, seed=1234)
    state = get_model_state_dict(model)
    dcp.load(state, checkpoint_id=args["ckpt"])
    set_model_state_dict(model, state)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, args["out"])


def main() -> None:
    import torch.distributed as dist

    command, payload = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    try:
        {"save": save, "load": load}[command](payload)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
