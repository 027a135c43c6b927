"""``mcore_harness`` commands for the checkpoint manager, run in real megatron-core 0.16.1 ranks.

``manager-save``
    ``{hf_config, layout, pad_vocab_to_multiple, seed, root, input_ids, out_dir}``: build this
    rank's GPTModel chunks, redraw the weights, give Adam a known state (``exp_avg = 2 w``,
    ``exp_avg_sq = w²``) and save through :class:`ckpt_ir.manager.CheckpointManager`:

    * step 1, sync: ``model`` + ``hf_model`` + ``optimizer`` (megatron-core's sharded optimizer
      state) + ``extra`` (a Megatron-LM-style ``rng_state`` ShardedObject, scheduler state);
    * step 2, async: the same contents; right after ``save`` returns the weights are halved
      in place (training goes on), then ``wait()``: step 2 must hold the weights of step 1;
    * step 3, sync: ``model`` from megatron-core's own ``sharded_state_dict()`` (pass-through).

    Writes ``out_dir/logits-before.pt`` (steps 1, 2) and ``logits-after.pt`` (step 3).
``manager-load``
    ``{hf_config, layout, pad_vocab_to_multiple, root, step, source, input_ids, out}``: build
    chunks at ``layout``, ``load`` the step's weights from ``source`` (``model`` or
    ``hf_model``), run the forward (``out``); with ``optimizer`` also load the optimizer state
    at this layout, both through the manager and through ``dist_checkpointing.load``, and check
    them (``out`` + ``.json``).
``manager-kill-loop``
    ``{hf_config, layout, pad_vocab_to_multiple, seed, root, progress}``: async saves back to
    back until SIGKILLed (the test kills the job).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["COMMANDS"]


def _coords() -> Any:
    from megatron.core import parallel_state as ps

    from ckpt_ir.manager import RankCoords

    return RankCoords(tp=ps.get_tensor_model_parallel_rank(),
                      pp=ps.get_pipeline_model_parallel_rank(),
                      dp=ps.get_data_parallel_rank())


def _layout(job: Mapping[str, Any]) -> Any:
    from ckpt_ir.layout import ParallelLayout

    return ParallelLayout(**{k: v for k, v in job["layout"].items() if v is not None})


def _manager(job: Mapping[str, Any]) -> Any:
    from ckpt_ir.manager import CheckpointManager

    return CheckpointManager(job["root"], hf_config=job["hf_config"], layout=_layout(job),
                             coords=_coords(), keep_last=job.get("keep_last"),
                             mcore_spec="local")


def _optimizer(chunks: list, *, known: bool) -> tuple[torch.optim.Optimizer, dict]:
    """Adam over the chunks' parameters and its megatron-core sharded state dict."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    params = [p for c in chunks for p in c.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    with torch.no_grad():
        for p in params:
            opt.state[p] = {"step": torch.tensor(5.0),
                            "exp_avg": p.detach() * 2 if known else torch.zeros_like(p),
                            "exp_avg_sq": p.detach() ** 2 if known else torch.zeros_like(p)}
    state = opt.state_dict()
    model_sd: dict = {}
    for v, c in enumerate(chunks):
        model_sd[f"model{v}"] = c.sharded_state_dict()
    optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model_sd, params),
                                  exclude_keys=("step",))
    return opt, state


def _extra(step: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    rng = {"random_rng_state": [step, pp, tp], "torch_rng_state": torch.get_rng_state()}
    return {"rng_state": ShardedObject("rng_state", rng,
                                       (ps.get_pipeline_model_parallel_world_size(),
                                        ps.get_tensor_model_parallel_world_size()),
                                       (pp, tp), replica_id=ps.get_data_parallel_rank()),
            "opt_param_scheduler": {"num_steps": step, "max_lr": 1e-3}}


def _save_logits(logits: torch.Tensor | None, path: Path) -> None:
    from megatron.core import parallel_state as ps

    if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(logits, path)


def manager_save(job: Mapping[str, Any], rank: int, world: int) -> None:
    from tests.clients.mcore_harness import build_gpt_chunks, pipeline_forward, randomize_chunks_

    hf = json.loads(Path(job["hf_config"]).read_text())
    chunks = build_gpt_chunks(job, world)
    randomize_chunks_(chunks, int(job["seed"]), tied=bool(hf.get("tie_word_embeddings")))
    out = Path(job["out_dir"])
    _save_logits(pipeline_forward(chunks, job["input_ids"]), out / "logits-before.pt")
    mgr = _manager(job)
    everything = ["model", "hf_model", "optimizer", "extra"]
    _, opt_state = _optimizer(chunks, known=True)
    mgr.save(1, chunks, contents=everything, optimizer=opt_state, extra=_extra(1))
    _, opt_state = _optimizer(chunks, known=True)
    mgr.save(2, chunks, contents=everything, optimizer=opt_state, extra=_extra(2),
             async_=True)
    with torch.no_grad():  # the next training step, while step 2 is being written
        for c in chunks:
            for p in c.parameters():
                p.mul_(0.5)
    mgr.wait()
    _save_logits(pipeline_forward(chunks, job["input_ids"]), out / "logits-after.pt")
    model_sd: dict = {}
    for v, c in enumerate(chunks):
        model_sd.update(c.sharded_state_dict() if len(chunks) == 1
                        else {f"model{v}": c.sharded_state_dict()})
    mgr.save(3, model_sd, contents=["model"])
    mgr.close()


def manager_load(job: Mapping[str, Any], rank: int, world: int) -> None:
    from megatron.core import dist_checkpointing

    from tests.clients.mcore_harness import build_gpt_chunks, pipeline_forward

    chunks = build_gpt_chunks(job, world)
    mgr = _manager(job)
    loaded = mgr.load(job["step"], chunks, contents=[job["source"]])
    _save_logits(pipeline_forward(chunks, job["input_ids"]), Path(job["out"]))
    if not job.get("optimizer"):
        return
    _, request = _optimizer(chunks, known=False)
    _, request_mcore = _optimizer(chunks, known=False)
    ours = mgr.load(job["step"], contents=["optimizer", "extra"], optimizer=request,
                    extra={"opt_param_scheduler": None}, trust_pickles=True)
    theirs = dist_checkpointing.load(request_mcore,
                                     str(loaded.path / loaded.manifest["contents"]
                                         ["optimizer"]["path"]))
    params = [p for c in chunks for p in c.parameters()]
    report: dict[str, Any] = {"extra": ours.extra, "mismatch": [],
                              "groups": ours.optimizer["param_groups"]}
    for pid, p in enumerate(params):
        state = ours.optimizer["state"][pid]
        if not (torch.equal(state["exp_avg"], p.detach() * 2)
                and torch.equal(state["exp_avg_sq"], p.detach() ** 2)):
            report["mismatch"].append(f"state {pid} {list(p.shape)} is not (2 w, w²)")
    for pid, st in ours.optimizer["state"].items():
        for k, t in st.items():
            if not torch.equal(t, theirs["state"][pid][k]):
                report["mismatch"].append(f"megatron-core reads state {pid}.{k} differently")
    if rank == 0:
        Path(job["out"] + ".json").write_text(json.dumps(report, default=str))


def manager_kill_loop(job: Mapping[str, Any], rank: int, world: int) -> None:
    """Async saves (``model`` + ``hf_model``) of steps 1, 2, ... back to back while "training"
    (the weights shrink by 1% per step) until the job is killed; rank 0 appends each step it
    knows committed to ``progress``."""
    from tests.clients.mcore_harness import build_gpt_chunks, randomize_chunks_

    hf = json.loads(Path(job["hf_config"]).read_text())
    chunks = build_gpt_chunks(job, world)
    randomize_chunks_(chunks, int(job["seed"]), tied=bool(hf.get("tie_word_embeddings")))
    mgr = _manager(job)
    step = 1
    while True:
        mgr.save(step, chunks, contents=["model", "hf_model"], async_=True)  # joins step - 1
        if rank == 0 and step > 1:
            with open(job["progress"], "a") as f:
                f.write(f"{step - 1}\n")
        with torch.no_grad():
            for c in chunks:
                for p in c.parameters():
                    p.mul_(0.99)
        step += 1


COMMANDS = {"manager-save": manager_save, "manager-load": manager_load,
            "manager-kill-loop": manager_kill_loop}
