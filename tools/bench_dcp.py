"""Benchmark ``convert --to hf`` of an FSDP2-style DCP checkpoint (``tools/bench.py dcp``).

    python tools/bench.py dcp --size 2G --runs 3            # the issue's figure (>= 2 GB, W=4)
    python tools/bench.py dcp --size 200M --runs 1          # a quick check that it works

Builds (once, under ``--work``) a synthetic Llama-shaped bf16 checkpoint of about ``--size``
bytes as FSDP2 saves it at ``--world-size`` ranks: every tensor cut into ``torch.chunk`` row
boxes (``Shard(0)``), box ``r`` appended to ``__r_0.distcp``, one ``.metadata`` (ckpt-ir's DCP
writer, which torch's ``dcp.load`` reads; tensors generated one at a time). Then times,
alternating A B C A B C so machine drift hits every method alike:

* ``copy``: ``cp -r SRC DST && sync``, the floor: the same bytes made durable;
* ``ckpt-ir``: a fresh process that imported ckpt_ir (not timed) runs ``ckpt_ir.convert(SRC,
  DST, to="hf")`` and ``os.sync()``: wall, CPU and peak RSS;
* ``dcp_to_torch_save``: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` into a
  ``.pt`` file, ``torch.load`` of it, ``safetensors.torch.save_file`` and an fsync (what
  NeMo-RL's and torchtitan's offline converters do): wall and peak RSS (``/usr/bin/time``).

Medians and min-max over ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ckpt_ir.converters.storage.dcp_files import DcpDataFile, write_metadata  # noqa: E402
from ckpt_ir.ir import ModelConfig  # noqa: E402
from tools.bench import _rm, _span, _time_cmd, child_env, cold, durable_copy  # noqa: E402
from tools.make_synthetic import llama_config  # noqa: E402

TORCH_BASELINE = r'''
import os, sys, torch
from pathlib import Path
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from safetensors.torch import save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
dcp_to_torch_save(src, dst / "full.pt")
state = torch.load(dst / "full.pt", weights_only=True)
save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
(dst / "full.pt").unlink()
fd = os.open(dst / "model.safetensors", os.O_RDONLY); os.fsync(fd); os.close(fd)
'''

_UNITS = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


def build(out: Path, size: int, world_size: int, seed: int = 0) -> dict:
    """A Llama-shaped bf16 DCP checkpoint of about ``size`` bytes, as ``world_size`` FSDP2
    ranks save it; returns its config."""
    config = llama_config(size)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    files = [DcpDataFile(out, f"__{r}_0.distcp") for r in range(world_size)]
    specs = {}
    for name, shape in ModelConfig.from_hf(config).schema().items():
        t = torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16)
        row = 0
        # FSDP2 Shard(0): torch.chunk boxes, ranks past the last box hold none.
        for rank, box in enumerate(t.chunk(world_size)):
            files[rank].add_tensor(name, (row, *[0] * (t.dim() - 1)), box)
            row += box.shape[0]
        specs[name] = (tuple(shape), t.dtype)
        del t
    records = [r for f in files for r in f.close()]
    write_metadata(out, records, specs, flat_planner_data=True)
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.py dcp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2G", help="checkpoint size (default 2G)")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work", type=Path, default=REPO / ".bench")
    p.add_argument("--no-torch", action="store_true",
                   help="skip dcp_to_torch_save + save_file (it holds the whole model in RAM)")
    args = p.parse_args(argv)

    size = parse_size(args.size)
    work = args.work / f"dcp-{args.size.lower()}-w{args.world_size}"
    src = work / "dcp"
    if not (src / ".metadata").is_file():
        _rm(work)
        build(src, size, args.world_size)
    total = sum(f.stat().st_size for f in src.iterdir())
    largest = max(math.prod(s) for s in
                  ModelConfig.from_hf(json.loads((src / "config.json").read_text()))
                  .schema().values()) * 2
    env = child_env(work)
    out = work / "out"
    results: dict[str, list[float]] = {}
    for _ in range(args.runs):
        _rm(out)
        results.setdefault("copy", []).append(durable_copy(src, out))
        _rm(out)
        m = cold(src, out, "hf", env)
        results.setdefault("ckpt-ir", []).append(m["wall"])
        results.setdefault("ckpt-ir cpu", []).append(m["cpu"])
        results.setdefault("ckpt-ir rss", []).append(m["rss"] * 1024)
        _rm(out)
        if not args.no_torch:
            wall, rss = _time_cmd([sys.executable, "-c", TORCH_BASELINE, str(src), str(out)],
                                  env=env)
            results.setdefault("torch", []).append(wall)
            results.setdefault("torch rss", []).append(rss * 1024)
            _rm(out)
        print({k: round(v[-1], 2) for k, v in results.items()}, flush=True)

    med = statistics.median
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    copy = med(results["copy"])
    lines = [
        f"FSDP2-style DCP checkpoint (W={args.world_size}, torch.chunk row boxes), bf16 Llama, "
        f"{total / 2**30:.2f} GiB, largest tensor {largest / 2**20:.0f} MiB; {machine}; "
        f"medians (min-max) of {args.runs} alternating runs ({time.strftime('%Y-%m-%d')}).",
        "",
        "| method | wall | × copy | peak RSS |",
        "| --- | --- | --- | --- |",
        f"| durable copy (`cp -r && sync`) | {_span(results['copy'])} | 1.00 | - |",
        f"| ckpt-ir `convert --to hf` (in-process, fresh) | {_span(results['ckpt-ir'])} | "
        f"{med(results['ckpt-ir']) / copy:.2f} | {max(results['ckpt-ir rss']) / 2**20:.0f} MiB |",
    ]
    if "torch" in results:
        lines.append(f"| `dcp_to_torch_save` + `save_file` | {_span(results['torch'])} | "
                     f"{med(results['torch']) / copy:.2f} | "
                     f"{max(results['torch rss']) / 2**20:.0f} MiB |")
    lines += ["", f"Peak RSS bound for ckpt-ir: largest tensor + 512 MiB = "
                  f"{largest / 2**20 + 512:.0f} MiB."]
    print("\n".join(lines))
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
