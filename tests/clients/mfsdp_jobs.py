"""megatron-core jobs of the Megatron-FSDP tests (run by ``mcore_harness`` in a gloo worker).

``mfsdp-save``: ``{hf_config, out_dir, logits_out, input_ids, seed, grouped_experts?,
split_swiglu?}``: build the GPTModel (local spec, TP=1), redraw every parameter, save it twice:
``out_dir/torch_dist`` with ``dist_checkpointing.save`` (megatron-core's own torch_dist) and
``out_dir/fsdp_dtensor`` as Megatron-FSDP's ``fsdp_dtensor`` (``dcp.save`` of the model's
``state_dict()`` preprocessed as Megatron does: see ``tests/clients/mfsdp_models.py``); the
forward's logits go to ``logits_out``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def mfsdp_save(job: Mapping[str, Any], rank: int, world: int) -> None:
    import torch
    from megatron.core import dist_checkpointing

    from tests.clients.mcore_harness import (
        _save_rank0,
        build_gpt_model,
        gpt_forward,
        randomize_megatron_,
        set_parallel,
    )
    from tests.clients.mfsdp_models import fsdp_dtensor_state_dict, save_fsdp_dtensor

    set_parallel(1)
    torch.manual_seed(int(job["seed"]))
    model = build_gpt_model(job["hf_config"], 1)
    randomize_megatron_(model, int(job["seed"]), 0)
    out = Path(job["out_dir"])
    (out / "torch_dist").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(out / "torch_dist"))
    sd = fsdp_dtensor_state_dict(model.state_dict(),
                                 grouped_experts=bool(job.get("grouped_experts", True)),
                                 split_swiglu=bool(job.get("split_swiglu", True)))
    # The job's gloo group is the default one; a one-rank save writes every box itself.
    save_fsdp_dtensor(sd, out / "fsdp_dtensor", no_dist=False)
    _save_rank0(gpt_forward(model, job["input_ids"]), job["logits_out"], rank)


COMMANDS = {"mfsdp-save": mfsdp_save}
