"""verl 0.9.1's ``FSDPCheckpointManager`` on CPU/gloo, one process per rank (tests only).

The test process never initialises ``torch.distributed``; :func:`launch` starts
``python -m tests.clients.verl_fsdp_harness <command> <json-args>`` once per rank. Commands:

``save``
    ``{hf_dir, out, mode, dtype, lora?, save_lora_only?}``: every rank loads the HF model in
    ``hf_dir`` (so all ranks agree on the weights), casts it to ``dtype``, wraps it as verl's
    FSDP engine does (``mode``: ``fsdp2`` = ``fully_shard`` on a ``("fsdp",)`` mesh; ``hsdp`` =
    ``fully_shard`` on a ``("ddp", "fsdp")`` mesh of shape ``(2, W/2)``; ``fsdp1`` =
    ``FullyShardedDataParallel`` with ``device_mesh``, as verl always passes one), with
    ``lora`` (``{r, alpha, targets}``) first turns it into a PEFT model whose adapter weights
    are redrawn, takes one AdamW step (so the optimizer file holds state), and calls
    ``save_checkpoint(out)`` with ``save_contents=['model', 'optimizer', 'extra']``.
``load``
    ``{hf_dir, ckpt, out, dtype}``: builds the same model with *other* random weights, wraps
    it with FSDP2 at this world size and calls verl's ``load_checkpoint(ckpt)`` with
    ``load_contents=['model']``; rank 0 saves the full state dict (``get_model_state_dict``,
    ``full_state_dict=True``) to ``out`` as safetensors.
``batch``
    A list of ``{"command": ..., **args}`` run in one process start (the ranks' imports cost
    more than a tiny model's save).

The platform shim (tests only, never in ``ckpt_ir``): verl's package ``__init__`` and
``verl.utils.checkpoint``'s ``__init__`` import Ray (the trainer's single controller), which a
checkpoint manager never uses; both packages are registered as bare namespace modules so that
the real ``verl.utils.checkpoint.fsdp_checkpoint_manager`` and everything it imports load
unchanged. gloo is the backend and the device mesh type is ``cpu``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import torch

from tests.clients import mcore_harness

__all__ = ["launch", "verl_importable"]



def verl_importable() -> bool:
    """Whether verl 0.9.1 is installed (tools/setup.sh installs it ``--no-deps``)."""
    return importlib.util.find_spec("verl") is not None


def launch(command: str, args: Any, *, world_size: int, timeout: float = 240.0) -> None:
    """Run ``command`` of this module on ``world_size`` gloo ranks (the shared launcher of
    tests/clients/mcore_harness.py); raise HarnessError on failure."""
    mcore_harness.launch(command, args, world_size=world_size, timeout=timeout, attempts=2,
                         module="tests.clients.verl_fsdp_harness",
                         env={"VERL_USE_EXTERNAL_PLUGINS": "none"})


# --------------------------------------------------------------------------- worker side


def _shim_verl() -> None:
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("verl is not installed (tools/setup.sh installs verl==0.9.1)")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name in ("verl", "verl.utils.checkpoint"):
        module = types.ModuleType(name)
        module.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = module


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _model(job: dict[str, Any], *, random: bool = False) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _DTYPES[job.get("dtype", "float32")]
    if random:
        config = AutoConfig.from_pretrained(job["hf_dir"])
        torch.manual_seed(999)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=dtype)
    lora = job.get("lora")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                 target_modules=lora["targets"],
                                                 task_type="CAUSAL_LM"))
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:  # lora_B starts at zero: a merge would change nothing
                    p.copy_((0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    return model


def _wrap(model: torch.nn.Module, mode: str, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
        return FSDP(model, device_mesh=mesh, device_id=torch.device("cpu"),
                    sync_module_states=False, use_orig_params=False)
    from torch.distributed.fsdp import fully_shard

    if mode == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ddp", "fsdp"))
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    # As verl's apply_fsdp2: each decoder layer, then the root.
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _manager(model: torch.nn.Module, optimizer: Any, contents: dict[str, Any]) -> Any:
    from omegaconf import OmegaConf
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    return FSDPCheckpointManager(model=model, optimizer=optimizer, lr_scheduler=None,
                                 processing_class=None,
                                 checkpoint_config=OmegaConf.create(contents))


def _save(job: dict[str, Any]) -> None:
    world = torch.distributed.get_world_size()
    model = _wrap(_model(job), job["mode"], world)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    # lr 0: one step gives the optimizer file real state without changing any weight.
    ids = torch.arange(8).reshape(1, 8)
    model(input_ids=ids).logits.float().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    contents = {"save_contents": ["model", "optimizer", "extra"],
                "save_lora_only": bool(job.get("save_lora_only"))}
    _manager(model, optimizer, contents).save_checkpoint(job["out"], global_step=1)


def _load(job: dict[str, Any]) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    world = torch.distributed.get_world_size()
    model = _wrap(_model(job, random=True), "fsdp2", world)
    _manager(model, None, {"load_contents": ["model"]}).load_checkpoint(job["ckpt"])
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if torch.distributed.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, job["out"])


def _batch(jobs: list[dict[str, Any]]) -> None:
    for job in jobs:
        _COMMANDS[job["command"]](job)
        torch.distributed.barrier()


_COMMANDS = {"save": _save, "load": _load, "batch": _batch}


def main(argv: list[str]) -> None:
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
