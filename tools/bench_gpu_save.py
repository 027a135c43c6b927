"""Saves from a GPU rank: ckpt-ir's CheckpointManager against megatron-core and transformers.

Run on a CUDA machine (one GPU, NCCL default group) with megatron-core on PYTHONPATH:

    python tools/bench_gpu_save.py OUTDIR [--runs 5] [--json results.json]

Builds one Llama-shaped bf16 GPTModel (local layer spec, from ``ckpt_ir.megatron_args``; 1.1 B
parameters by default: TinyLlama's shape) with its weights on the GPU, then alternates, run after
run so that drift in the disk hits all alike:

* ``mcore``: ``dist_checkpointing.save(model.sharded_state_dict(), dir)`` (torch_dist);
* ``manager``: ``CheckpointManager.save(step, model, contents=["model"])``;
* ``manager async``: the same with ``async_=True``: the time to return, and to commit (``wait``);
* ``d2h``: copying every parameter into a pinned host buffer (the bus time, the floor of an
  async return);
* ``hf``: ``CheckpointManager.save(contents=["hf_model"])`` against transformers'
  ``save_pretrained`` of the same weights in a ``LlamaForCausalLM`` on the GPU.

Every save is made durable by the method itself (megatron-core and ckpt-ir fsync their files;
``save_pretrained`` does not, so a ``sync`` is added to it and reported separately); each
output is deleted, with a ``sync``, before the next run. Prints one JSON object and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def _clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build_model():
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ckpt_ir.megatron_config import megatron_args

    args = megatron_args(HF_CONFIG)
    config = TransformerConfig(**args.transformer_config, activation_func=F.silu,
                               params_dtype=torch.bfloat16, bf16=True)
    model = GPTModel(config=config,
                     transformer_layer_spec=get_gpt_layer_local_spec(**args.layer_spec),
                     parallel_output=False, **args.gpt_model).cuda()
    return model


def check_loads(model, directory: Path, what: str) -> None:
    """megatron-core's own loader reads the manager's output back bit for bit."""
    from megatron.core import dist_checkpointing

    want = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    model.load_state_dict(state)
    got = model.state_dict()
    bad = [k for k, v in want.items() if not torch.equal(v, got[k])]
    if bad:
        raise SystemExit(f"{what}: megatron-core loaded different values for {bad[:5]}")
    print(f"{what}: megatron-core {directory} loads bit for bit ({len(want)} tensors)",
          flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.add_argument("--no-hf", action="store_true")
    args = p.parse_args()

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.package_info import __version__ as mcore_version

    from ckpt_ir.manager import CheckpointManager

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29544")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_model()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()
                 if isinstance(t, torch.Tensor))
    nparams = sum(t.numel() for t in model.parameters())
    out = args.out
    _clean(out)
    out.mkdir(parents=True)
    times: dict[str, list[float]] = {}
    first: dict[str, float] = {}  # run 0, not counted: first-save costs

    def record(name: str, value: float) -> None:
        times.setdefault(name, []).append(value)

    mgr = CheckpointManager(out / "mgr", hf_config=HF_CONFIG, disk_layout="plain",
                            keep_last=1, mcore_spec="local")
    params = list(model.parameters())
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in params]

    def d2h_pinned() -> None:
        for src, dst in zip(params, pinned, strict=True):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    def d2h_pageable() -> None:
        for src in params:
            src.to("cpu")

    hf_model = None
    if not args.no_hf:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("cuda"):
            hf_model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG)).to(torch.bfloat16)

    step = 0
    for run in range(args.runs + 1):  # run 0 warms every path up and is not counted
        keep = run > 0
        d = out / "mcore"
        d.mkdir()
        t = _timed(lambda d=d: dist_checkpointing.save(model.sharded_state_dict(), str(d)))
        if keep:
            record("mcore", t)
        else:
            first["mcore, first save"] = t
        _clean(d)

        step += 1
        t = _timed(lambda s=step: mgr.save(s, model, contents=["model"]))
        if keep:
            record("manager", t)
        else:
            first["manager, first save"] = t
            check_loads(model, out / "mgr" / f"iter_{step:07d}" / "model", "sync save")
        _clean(out / "mgr" / f"iter_{step:07d}")

        step += 1
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        mgr.save(step, model, contents=["model"], async_=True)
        t_return = time.perf_counter() - t0
        mgr.wait()
        t_commit = time.perf_counter() - t0
        if keep:
            record("manager async return", t_return)
            record("manager async commit", t_commit)
        else:
            # The first async save also pins the manager's host buffer (kept afterwards).
            first["manager async return, first save"] = t_return
            first["manager async commit, first save"] = t_commit
            check_loads(model, out / "mgr" / f"iter_{step:07d}" / "model", "async save")
        _clean(out / "mgr" / f"iter_{step:07d}")

        t, t2 = _timed(d2h_pinned), _timed(d2h_pageable)
        if keep:
            record("d2h pinned", t)
            record("d2h pageable", t2)

        if hf_model is not None:
            step += 1
            t = _timed(lambda s=step: mgr.save(s, model, contents=["hf_model"]))
            if keep:
                record("manager hf_model", t)
            _clean(out / "mgr" / f"iter_{step:07d}")
            d = out / "hf"
            t = _timed(lambda d=d: hf_model.save_pretrained(d))
            t_sync = _timed(os.sync)
            if keep:
                record("save_pretrained", t)
                record("save_pretrained + sync", t + t_sync)
            _clean(d)
        print(f"run {run}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()),
              flush=True)

    mgr.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "megatron_core": mcore_version, "params": nparams, "bytes": nbytes,
        "runs": args.runs, "times": times, "median": med, "first": first,
    }
    print(json.dumps(result))
    gb = nbytes / 1e9
    print(f"\n{result['gpu']}, torch {torch.__version__}, megatron-core {mcore_version}; "
          f"{nparams / 1e9:.2f} B parameters, {gb:.2f} GB bf16; medians of {args.runs} "
          "alternating runs (min-max)\n")
    print("| save | median | min-max | GB/s |")
    print("| --- | --- | --- | --- |")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.2f} s | {min(v):.2f}-{max(v):.2f} s | {gb / med[k]:.2f} |")
    print("\nFirst saves of the process (run 0, not in the table): " + ", ".join(
        f"{k} {v:.2f} s" for k, v in first.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    _clean(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
