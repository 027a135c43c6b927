"""Light gloo workers for the checkpoint-manager tests: megatron-named TP shards, no megatron-core.

Each rank builds :func:`fake_chunks`: ``torch.nn.Module`` trees whose ``named_parameters()`` are
exactly a Megatron-Core GPTModel's (local layer spec) at a given layout, holding the TP shards of
an HF model cut by ckpt-ir's own table and :func:`ckpt_ir.layout.shard`. A rank starts in about
a second (torch only), so the commit protocol can be killed many times; the real GPTModel tests
live in ``test_manager_client.py`` (through ``mcore_harness``).

``python -m tests.clients.manager_workers <command> <json-args>`` on every rank (see
:func:`start_ranks`); commands: ``save``, ``load``, ``kill-loop``, ``crash-at``, ``memory``.
``<json-args>`` may be a list of jobs, run in order in one start; a job's ``command`` key
overrides the command line's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from tests.clients.mcore_harness import REPO_ROOT, HarnessError, free_port

__all__ = ["fake_chunks", "run_ranks", "start_ranks", "step_value"]


# --------------------------------------------------------------------------- model shards


def fake_chunks(hf_dir: str | Path, layout: Any, coords: Any, *,
                pad_vocab_to_multiple: int | None = None, scale: float = 1.0) -> list:
    """This rank's chunks of the HF model at ``hf_dir`` as a GPTModel (local spec) holds them."""
    import ckpt_ir
    from ckpt_ir.layout import shard
    from ckpt_ir.manager.live import EMBEDDING, OUTPUT_LAYER
    from ckpt_ir.megatron_config import padded_vocab_size
    from ckpt_ir.tables import NativeParams, build_table

    ckpt = ckpt_ir.open(hf_dir)
    config = ckpt.config
    padded = padded_vocab_size(config.vocab_size, pad_vocab_to_multiple)
    table = build_table("mcore", config, NativeParams(padded_vocab_size=padded,
                                                      norm_style="local"))
    placement = layout.placement(config.num_layers)
    chunks = [torch.nn.Module() for _ in range(layout.vpp)]
    last = (layout.pp - 1, layout.vpp - 1)

    def add(chunk: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        *path, leaf = name.split(".")
        module = chunk
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(tensor.clone() * scale,
                                                           requires_grad=False))

    for b in table.bindings:
        if b.layer is not None:
            p, v, local = placement.locate(b.layer)
            name = b.native.replace(f"decoder.layers.{b.layer}.", f"decoder.layers.{local}.")
        elif b.native.startswith(("decoder.final", "output_layer")):
            (p, v), name = last, b.native
        else:
            p, v, name = 0, 0, b.native
        targets = [(p, v, name)]
        if b.native == EMBEDDING and config.tie_word_embeddings and layout.pp > 1:
            targets.append((*last, OUTPUT_LAYER))
        if all(t[0] != coords.pp for t in targets):
            continue
        native = b.transform.apply({r: ckpt.read(n) for r, n in b.ir.items()})
        piece = shard(native, b.partition, layout.tp)[coords.tp]
        for tp_, tv, tname in targets:
            if tp_ == coords.pp:
                add(chunks[tv], tname, piece)
    return chunks


def step_value(step: int) -> float:
    """The scale the kill-loop applies to every weight at ``step`` (tells steps apart)."""
    return 1.0 + step / 64.0


# --------------------------------------------------------------------------- launching


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            # A fixed mmap threshold: glibc then returns every freed tensor to the OS at once,
            # so RSS tracks live memory (its dynamic threshold keeps freed tensors resident).
            "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT),
                                                      os.environ.get("PYTHONPATH")) if p)}


def start_ranks(command: str, args: Any, world: int, log_dir: Path, *,
                module: str = "tests.clients.manager_workers") -> list[subprocess.Popen]:
    """Start ``world`` processes of ``python -m <module> <command> <args>`` in one new process
    group (the job), so one SIGKILL of the group kills every rank at once, as a preempted job
    dies. ``module`` may be ``tests.clients.mcore_harness`` (real GPTModel ranks)."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        group = {"process_group": 0 if rank == 0 else procs[0].pid}
        with open(log_dir / f"rank{rank}.log", "wb") as fh:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", module, command, json.dumps(args)], cwd=REPO_ROOT,
                env=_env(rank, world, port), stdout=fh, stderr=subprocess.STDOUT, **group))
    return procs


def kill_ranks(procs: Sequence[subprocess.Popen]) -> None:
    """SIGKILL the whole job."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(procs[0].pid, signal.SIGKILL)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def run_ranks(command: str, args: Any, world: int, log_dir: Path, *,
              timeout: float = 120.0) -> list[int]:
    """Run the workers to completion; their exit codes. Hangs and crashes carry the logs."""
    procs = start_ranks(command, args, world, log_dir)
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
            break
        time.sleep(0.02)
    hung = any(p.poll() is None for p in procs)
    kill_ranks(procs)
    codes = [p.returncode for p in procs]
    if hung or any(c not in (0, -signal.SIGKILL) for c in codes):
        logs = "\n".join(f"--- rank {r} ---\n{(log_dir / f'rank{r}.log').read_text()[-3000:]}"
                         for r in range(world))
        raise HarnessError(f"manager_workers {command}: exit codes {codes}"
                           f"{' (timed out)' if hung else ''}\n{logs}")
    return codes


# --------------------------------------------------------------------------- worker side


def _init() -> tuple[int, int]:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
    return rank, world


def _layout(job: Mapping[str, Any]) -> Any:
    from ckpt_ir.layout import ParallelLayout

    return ParallelLayout(**job.get("layout", {}))


def _manager(job: Mapping[str, Any], layout: Any, **overrides: Any) -> Any:
    from ckpt_ir.manager import CheckpointManager

    kwargs = {"hf_config": job["hf"], "layout": layout,
              "disk_layout": job.get("disk_layout", "verl"),
              "keep_last": job.get("keep_last"), "max_shard_size": job.get("max_shard_size",
                                                                           5 * 1000**3),
              "tokenizer": job.get("tokenizer"), "model_format": job.get("model_format",
                                                                         "torch_dist")}
    kwargs.update(overrides)
    return CheckpointManager(job["root"], **kwargs)


def _extra_state(rank: int, step: int) -> dict[str, Any]:
    """A Megatron-LM-like RNG ShardedObject stand-in and common scheduler state."""
    from tests.clients.sharded_stubs import ShardedObject

    world = int(os.environ["WORLD_SIZE"])
    return {"rng_state": ShardedObject("rng_state", {"seed": step * 100 + rank,
                                                     "torch": torch.full((3,), float(rank))},
                                       (world,), (rank,), replica_id=0),
            "scheduler": {"num_steps": step, "lr": 0.5 / (step + 1)}}


def cmd_save(job: Mapping[str, Any], rank: int, world: int) -> None:
    """Save each step of ``steps`` (weights scaled by :func:`step_value`), optionally async and
    with the weights mutated right after ``save`` returns; record mtimes per step."""
    from ckpt_ir.manager import megatron_coords

    layout = _layout(job)
    coords = megatron_coords(rank, world, layout)
    mgr = _manager(job, layout)
    report: dict[str, Any] = {}
    for step in job["steps"]:
        chunks = fake_chunks(job["hf"], layout, coords,
                             pad_vocab_to_multiple=job.get("pad"), scale=step_value(step))
        mgr.save(step, chunks, contents=job["contents"],
                 extra=_extra_state(rank, step) if "extra" in job["contents"] else None,
                 async_=job.get("async", False))
        if job.get("async") and job.get("mutate"):
            # Training goes on while the background thread writes: the save must hold the
            # values of the moment save() returned.
            with torch.no_grad():
                for c in chunks:
                    for p in c.parameters():
                        p.add_(1000.0)
        report[str(step)] = {"pending": mgr.pending}
        mgr.wait()
        if rank == 0:
            report[str(step)].update(_mtimes(Path(job["root"]), mgr, step))
    mgr.close()
    if rank == 0 and job.get("out"):
        Path(job["out"]).write_text(json.dumps(report))


def _mtimes(root: Path, mgr: Any, step: int) -> dict[str, int]:
    """Right after ``step`` committed: the newest data file, the manifest, the tracker."""
    from ckpt_ir.manager import MANIFEST, TRACKER

    unit = mgr.disk.unit(mgr.disk.step_dir(root, step))
    files = [p for p in unit.rglob("*") if p.is_file() and p.name != MANIFEST]
    return {"data": max(p.stat().st_mtime_ns for p in files),
            "manifest": (unit / MANIFEST).stat().st_mtime_ns,
            "tracker": (root / TRACKER).stat().st_mtime_ns,
            "tracker_step": int((root / TRACKER).read_text())}


def cmd_load(job: Mapping[str, Any], rank: int, world: int) -> None:
    """Load ``source`` at ``layout`` into fresh chunks; save every parameter of this rank to
    ``out/rank<r>.pt`` with the expected one (the HF model cut at this layout)."""
    from ckpt_ir.manager import megatron_coords

    layout = _layout(job)
    coords = megatron_coords(rank, world, layout)
    mgr = _manager(job, layout)
    expected = fake_chunks(job["expect_hf"], layout, coords, pad_vocab_to_multiple=job.get("pad"),
                           scale=job.get("expect_scale", 1.0))
    chunks = fake_chunks(job["expect_hf"], layout, coords, pad_vocab_to_multiple=job.get("pad"),
                         scale=0.0)
    for c in chunks:
        for p in c.parameters():
            p.data.fill_(float("nan"))
    loaded = mgr.load(job.get("source", "latest"), chunks,
                      contents=job.get("load_contents"),
                      extra={} if job.get("extra") else None, trust_pickles=True)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"step": None if loaded is None else loaded.step,
                "extra": None if loaded is None else loaded.extra,
                "got": {f"{v}.{n}": p.detach().clone() for v, c in enumerate(chunks)
                        for n, p in c.named_parameters()},
                "want": {f"{v}.{n}": p.detach().clone() for v, c in enumerate(expected)
                         for n, p in c.named_parameters()}}, out / f"rank{rank}.pt")


def cmd_kill_loop(job: Mapping[str, Any], rank: int, world: int) -> None:
    """Async saves of steps ``first, first+1, ...`` back to back until killed; each step's
    weights are the HF model scaled by :func:`step_value`. Rank 0 appends each committed step
    to ``progress`` (after ``wait()``), so the test knows a commit happened."""
    from ckpt_ir.manager import megatron_coords

    layout = _layout(job)
    coords = megatron_coords(rank, world, layout)
    mgr = _manager(job, layout)
    chunks = fake_chunks(job["hf"], layout, coords, pad_vocab_to_multiple=job.get("pad"))
    base = [[p.detach().clone() for p in c.parameters()] for c in chunks]
    step = job["first"]
    progress = Path(job["progress"])
    while True:
        # "Training": new weights while the previous step's save is still being written.
        with torch.no_grad():
            for c, saved in zip(chunks, base, strict=True):
                for p, b in zip(c.parameters(), saved, strict=True):
                    p.copy_(b * step_value(step))
        mgr.save(step, chunks, contents=job["contents"], async_=True)  # joins step - 1
        if rank == 0 and step > job["first"]:
            with open(progress, "a") as f:
                f.write(f"{step - 1}\n")
        step += 1


def _kill_job() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)  # every rank of the job at once


def _crash_before(name: str) -> None:
    """Make the next call of ``ckpt_ir.manager.disk.<name>`` SIGKILL the job instead."""
    from ckpt_ir.manager import disk

    def crash(*a: Any, **k: Any) -> Any:
        _kill_job()

    setattr(disk, name, crash)


def _crash_mid_retention() -> None:
    """SIGKILL once retention has renamed a step out of sight but not yet deleted it."""
    from ckpt_ir.manager import disk

    original = disk.retain

    def retain(*a: Any, **k: Any) -> Any:
        disk.fsync_dir = lambda path: _kill_job()  # the first fsync after the rename
        return original(*a, **k)

    disk.retain = retain


_PHASES = {
    "before-manifest": lambda: _crash_before("write_manifest"),
    "before-publish": lambda: _crash_before("publish"),
    "before-tracker": lambda: _crash_before("write_tracker"),
    "before-retention": lambda: _crash_before("retain"),
    "mid-retention": _crash_mid_retention,
}


def cmd_crash_at(job: Mapping[str, Any], rank: int, world: int) -> None:
    """Commit the steps of ``steps``; rank 0 SIGKILLs the whole job when the commit of the
    last step reaches ``phase`` (the test shim wraps one function of the commit protocol)."""
    from ckpt_ir.manager import megatron_coords

    layout = _layout(job)
    coords = megatron_coords(rank, world, layout)
    mgr = _manager(job, layout)
    steps = job["steps"]
    for step in steps:
        if rank == 0 and step == steps[-1]:
            _PHASES[job["phase"]]()
        chunks = fake_chunks(job["hf"], layout, coords, pad_vocab_to_multiple=job.get("pad"),
                             scale=step_value(step))
        mgr.save(step, chunks, contents=job["contents"], async_=job.get("async", False))
        mgr.wait()


def cmd_memory(job: Mapping[str, Any], rank: int, world: int) -> None:
    """Peak RSS above the baseline while saving ``hf_model`` (Linux VmHWM, reset first)."""
    import gc

    from ckpt_ir.manager import megatron_coords

    layout = _layout(job)
    coords = megatron_coords(rank, world, layout)
    mgr = _manager(job, layout)
    chunks = fake_chunks(job["hf"], layout, coords, pad_vocab_to_multiple=job.get("pad"))
    shard = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    gc.collect()
    # Warm up allocator and gloo buffers with a first save, then measure a second one.
    mgr.save(1, chunks, contents=["hf_model"])
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _status_kb("VmRSS")
    mgr.save(2, chunks, contents=["hf_model"])
    peak = _status_kb("VmHWM")
    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(
        {"shard_bytes": shard, "base_kb": base, "peak_kb": peak}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


_COMMANDS = {"save": cmd_save, "load": cmd_load, "kill-loop": cmd_kill_loop,
             "crash-at": cmd_crash_at, "memory": cmd_memory}


def main(argv: Sequence[str]) -> int:
    command, args = argv[0], json.loads(argv[1])
    rank, world = _init()
    try:
        for job in args if isinstance(args, list) else [args]:
            _COMMANDS[job.get("command", command)](job, rank, world)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(3)  # a rank that failed must not leave the others waiting in a barrier
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
