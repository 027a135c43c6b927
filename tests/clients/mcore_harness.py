"""Real megatron-core 0.16.1 on CPU/gloo, one process per TP rank: test-only shims and workers.

The test process never initialises ``torch.distributed``; it calls :func:`launch`, which starts
``python -m tests.clients.mcore_harness <command> <json-args>`` once per rank with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set. Commands:

``load-forward``
    ``{ckpt, hf_config, tp, pad_vocab_to_multiple?, input_ids, out, strict, allow_missing?}``:
    build a GPTModel from :func:`ckpt_ir.megatron_config.megatron_args` (local layer spec), load
    ``ckpt`` with ``dist_checkpointing.load(..., strict=strict)``, run a forward pass; rank 0
    saves the gathered logits [batch, seq, padded_vocab] to ``out``. ``strict="raise_all"``
    with ``allow_missing`` (checkpoint keys the model may leave unrequested) loads with
    ``return_all`` and raises on any other mismatch.
``save-random``
    ``{hf_config, tp, out_dir, logits_out, input_ids, seed, pad_vocab_to_multiple?}``: build the
    GPTModel, redraw every parameter (norms and biases included), save it with
    ``dist_checkpointing.save`` to ``out_dir``, run the forward; rank 0 saves logits.
``batch``
    A list of ``{"command": ..., **args}``: several jobs in one process start (~5 s each saved).

``<json-args>`` of ``load-forward`` / ``save-random`` may also be a list of jobs. A job that
raises writes ``<out>.rank<r>.err`` (its traceback) and the worker goes on with the next job,
so one broken architecture does not hide the others; :func:`job_result` reads either file.

The CPU shims (see /work/shared/reference/measured-here.md) are installed by :func:`main` only,
inside the worker processes, never in the test process and never in ``ckpt_ir``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = ["REPO_ROOT", "HarnessError", "free_port", "job_result", "launch", "main"]


# --------------------------------------------------------------------------- test-process side


class HarnessError(AssertionError):
    """A rank failed, hung or left no result; the message carries each rank's stderr tail."""


def free_port() -> int:
    """A TCP port the OS reports free right now (bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, limit: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-limit:]


_PORT_TAKEN = ("address already in use", "eaddrinuse")


def launch(command: str, args: Any, *, world_size: int, timeout: float = 240.0,
           attempts: int = 3) -> None:
    """Run ``command`` on ``world_size`` gloo ranks; raise :class:`HarnessError` on failure.

    The port from :func:`free_port` can be taken by someone else before rank 0 binds it; such a
    launch is retried on a fresh port.
    """
    for attempt in range(attempts):
        try:
            _launch_once(command, args, world_size=world_size, timeout=timeout)
            return
        except HarnessError as e:
            if attempt + 1 == attempts or not any(m in str(e).lower() for m in _PORT_TAKEN):
                raise


def _launch_once(command: str, args: Any, *, world_size: int, timeout: float) -> None:
    port = free_port()
    payload = json.dumps(args)
    with tempfile.TemporaryDirectory(prefix="mcore-harness-") as logdir:
        procs: list[tuple[subprocess.Popen, Path]] = []
        for rank in range(world_size):
            env = {
                **os.environ,
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                # One intra-op thread per rank: the ranks share a couple of cores.
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
            }
            err = Path(logdir) / f"rank{rank}.log"
            with err.open("wb") as fh:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.clients.mcore_harness", command, payload],
                    cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
            procs.append((proc, err))
        deadline = time.monotonic() + timeout
        failed: list[str] = []
        try:
            # Poll all ranks: one that dies leaves the others blocked in a collective.
            while not failed and any(p.poll() is None for p, _ in procs):
                failed = [f"rank {r} exited {p.returncode}"
                          for r, (p, _) in enumerate(procs) if p.returncode not in (None, 0)]
                if time.monotonic() > deadline:
                    failed.append(f"timed out after {timeout:.0f}s")
                time.sleep(0.05)
            failed = failed or [f"rank {r} exited {p.returncode}"
                                for r, (p, _) in enumerate(procs) if p.returncode != 0]
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if failed:
            tails = "\n".join(f"----- rank {r} output (tail) -----\n{_tail(log)}"
                              for r, (_, log) in enumerate(procs))
            raise HarnessError(f"mcore_harness {command} (world_size={world_size}): "
                               f"{'; '.join(failed)}\n{tails}")


def job_result(out: str | Path) -> torch.Tensor:
    """The tensor a job saved at ``out``, or :class:`HarnessError` with the ranks' tracebacks."""
    out = Path(out)
    if out.exists():
        return torch.load(out, weights_only=True)
    errors = sorted(out.parent.glob(out.name + ".rank*.err"))
    detail = "\n".join(f"----- {e.name} -----\n{_tail(e)}" for e in errors) or "(no error file)"
    raise HarnessError(f"job left no result at {out}\n{detail}")


# --------------------------------------------------------------------------- worker side


def install_cpu_shims() -> None:
    """Let megatron-core 0.16.1 run on a CPU-only torch build (worker processes only)."""
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    with contextlib.suppress(ImportError):
        # 0.16.1 calls te_general_gemm in the MoE router whenever the name exists.
        from megatron.core.transformer.moe import moe_utils

        moe_utils.te_general_gemm = None


def _init_distributed() -> tuple[int, int]:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # A short timeout turns a rank that died mid-collective into an error, not a hang.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    # model_parallel_cuda_manual_seed needs CUDA; the inference tracker forks no CUDA RNG.
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return rank, world


def build_gpt_model(hf_config: str | Path, tp: int, pad_vocab_to_multiple: int | None = None):
    """A GPTModel for an HF ``config.json`` built only from ckpt-ir's public ``megatron_args``."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ckpt_ir.megatron_config import megatron_args

    hf = json.loads(Path(hf_config).read_text())
    args = megatron_args(hf, pad_vocab_to_multiple=pad_vocab_to_multiple)
    config = TransformerConfig(
        **args.transformer_config, activation_func=F.silu, tensor_model_parallel_size=tp,
        use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    model = GPTModel(config=config,
                     transformer_layer_spec=get_gpt_layer_local_spec(**args.layer_spec),
                     **args.gpt_model, parallel_output=False)
    return model.eval()


@torch.no_grad()
def gpt_forward(model, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Gathered logits [batch, seq, vocab] with explicit positions and a boolean causal mask."""
    input_ids = torch.tensor(ids, dtype=torch.long)
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(batch, seq)
    # True = masked out; the fused/flash paths that build it implicitly need CUDA.
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask).float()


def _save_rank0(obj: Any, path: str | Path, rank: int) -> None:
    if rank == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)


def load_forward(job: Mapping[str, Any], rank: int, world: int) -> None:
    from megatron.core import dist_checkpointing

    _check_tp(job, world)
    model = build_gpt_model(job["hf_config"], job["tp"], job.get("pad_vocab_to_multiple"))
    strict = job.get("strict", "assume_ok_unexpected")
    allow_missing = set(job.get("allow_missing") or ())
    if strict != "raise_all" or not allow_missing:
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(job["ckpt"]),
                                         strict=strict)
    else:
        # raise_all with named exceptions: megatron's "missing" = in the checkpoint but not
        # requested by the model; "unexpected" = requested but absent from the checkpoint.
        loaded, missing, unexpected = dist_checkpointing.load(
            model.sharded_state_dict(), str(job["ckpt"]), strict="return_all")
        if unexpected or set(missing) - allow_missing:
            raise RuntimeError(f"raise_all (allowing missing {sorted(allow_missing)}) failed: "
                               f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.load_state_dict(loaded)
    _save_rank0(gpt_forward(model, job["input_ids"]), job["out"], rank)


@torch.no_grad()
def randomize_megatron_(model, seed: int, tp_rank: int) -> None:
    """Redraw every parameter: replicated ones identically on all ranks, TP shards per rank.

    Same distributions as ``hf_models.randomize_``. Each TP shard gets its own draw so that,
    say, the two KV groups of a TP=2 ``linear_qkv`` differ and a group swap would show.
    """
    for name, p in model.named_parameters():
        split = bool(getattr(p, "tensor_model_parallel", False))
        key = zlib.crc32(name.encode()) ^ (seed * 1_000_003) ^ ((tp_rank + 1) * 7919 if split
                                                                  else 0)
        gen = torch.Generator().manual_seed(key)
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + 0.3 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.3 * noise)
        else:
            p.copy_(0.1 * noise)


def save_random(job: Mapping[str, Any], rank: int, world: int) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    _check_tp(job, world)
    torch.manual_seed(int(job["seed"]))
    model = build_gpt_model(job["hf_config"], job["tp"], job.get("pad_vocab_to_multiple"))
    randomize_megatron_(model, int(job["seed"]),
                        parallel_state.get_tensor_model_parallel_rank())
    out_dir = Path(job["out_dir"])
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(out_dir))
    dist.barrier()
    _save_rank0(gpt_forward(model, job["input_ids"]), job["logits_out"], rank)


def _check_tp(job: Mapping[str, Any], world: int) -> None:
    if int(job["tp"]) != world:
        raise ValueError(f"job asks for tp={job['tp']} but the launch has {world} ranks")


_COMMANDS = {"load-forward": load_forward, "save-random": save_random}


def _jobs(command: str, args: Any) -> list[tuple[str, Mapping[str, Any]]]:
    items = args if isinstance(args, list) else [args]
    if command == "batch":
        return [(item["command"], item) for item in items]
    return [(item.get("command", command), item) for item in items]


def main(argv: Sequence[str]) -> int:
    install_cpu_shims()
    command, args = argv[0], json.loads(argv[1])
    if command not in (*_COMMANDS, "batch"):
        raise SystemExit(f"unknown command {command!r}; expected one of "
                         f"{', '.join((*_COMMANDS, 'batch'))}")
    import torch.distributed as dist

    rank, world = _init_distributed()
    for name, job in _jobs(command, args):
        result = job.get("out") or job.get("logits_out")
        try:
            _COMMANDS[name](job, rank, world)
        except Exception:
            tb = traceback.format_exc()
            print(f"[rank {rank}] job {name} {result} failed:\n{tb}", file=sys.stderr)
            if result:
                err = Path(f"{result}.rank{rank}.err")
                err.parent.mkdir(parents=True, exist_ok=True)
                err.write_text(tb)
    dist.barrier()
    dist.destroy_process_group()
    # Failed jobs are reported through their .err files; the launch itself succeeded.
    return 0


if __name__ == "__main__":  # dist_checkpointing.save spawns processes that re-import __main__
    sys.exit(main(sys.argv[1:]))
