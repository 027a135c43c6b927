"""Benchmark conversions spread over processes against one process and the copy floor.

    python tools/bench_scale.py --gib 8 --runs 3 --procs 1,2,4,8            # I/O-bound, both ways
    python tools/bench_scale.py --gib 4 --src-dtype fp32 --cast bf16 --procs 1,2,4,8   # casts
    python tools/bench_scale.py --gib 2 --src-dtype fp8 --procs 1,2 --directions hf->hf  # FP8
    python tools/bench_scale.py --launch-costs 8 --runs 5          # torchrun's fixed costs

Methods, alternated run by run (A B C ... A B C ...) so machine drift hits all alike, each a
fresh command followed by ``sync`` inside the timed span (what a user waits for):

* ``copy``: ``cp -r SRC DST && sync`` of the source (the floor of an I/O-bound conversion);
* ``workers N``: ``ckpt-ir convert ... --workers N`` (N = 1 is the single process);
* ``torchrun N``: ``torchrun --standalone --nproc-per-node N -m ckpt_ir convert ...``.

Reported per method: median wall seconds (min-max), the ratio to one process, and the peak
RSS of the largest process (GNU time's ``%M``: the maximum over the process and the children it
waited for). ``--taskset 0,1`` pins every command to those CPUs (to emulate a smaller machine).
The machine is named in the output (``os.cpu_count()``, ``platform``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.make_synthetic import llama_config, write  # noqa: E402


def _timed(cmd: str, env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds of ``cmd && sync`` and the peak RSS (KiB) GNU time saw."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", "sh", "-c", f"{cmd} && sync"],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}")
    return wall, int(r.stderr.strip().splitlines()[-1])


def _methods(args) -> list[tuple[str, str]]:
    py = sys.executable
    conv = f"{py} -m ckpt_ir convert {{src}} {{dst}} --to {{to}} --no-progress"
    if args.cast:
        conv += f" --dtype {args.cast}"
    out = [("copy", "cp -r {src} {dst}")]
    out += [(f"workers {n}", f"{conv} --workers {n}") for n in args.procs]
    out += [(f"torchrun {n}", conv.replace(f"{py} -m ckpt_ir",
                                           f"{py} -m torch.distributed.run --standalone "
                                           f"--nproc-per-node {n} -m ckpt_ir"))
            for n in args.torchrun]
    return out


def bench(src: Path, to: str, work: Path, args, env: dict[str, str]) -> dict[str, dict]:
    methods = _methods(args)
    times: dict[str, list[float]] = {m: [] for m, _ in methods}
    rss: dict[str, list[int]] = {m: [] for m, _ in methods}
    for run in range(args.runs + 1):  # run 0 warms the page cache and is not counted
        for name, template in methods:
            dst = work / "out"
            shutil.rmtree(dst, ignore_errors=True)
            subprocess.run("sync", shell=True, check=True)
            cmd = template.format(src=src, dst=dst, to=to)
            if args.taskset:
                cmd = f"taskset -c {args.taskset} {cmd}"
            wall, peak = _timed(cmd, env)
            if run:
                times[name].append(wall)
                rss[name].append(peak)
            print(f"  {to:10s} run {run} {name:12s} {wall:7.2f} s  {peak / 1024:7.0f} MiB",
                  flush=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    one = statistics.median(times["workers 1"]) if "workers 1" in times else None
    return {m: {"median": statistics.median(t), "min": min(t), "max": max(t),
                "vs_one": statistics.median(t) / one if one else None,
                "peak_rss_mib": max(rss[m]) / 1024} for m, t in times.items()}


def cpu_rates(mib: int = 256, repeat: int = 5) -> dict[str, float]:
    """Single-thread throughput (GB/s of output) of the per-tensor CPU work a conversion does:
    a bf16 copy, an fp32 -> bf16 cast, and block-FP8 (e4m3, 128 x 128 scales) -> bf16
    dequantization, by the releases' formula (``w.float() * scale`` over each block, what
    ckpt-ir did until 2026-12-07) and by ckpt-ir's ``dequantize_fp8`` (same bits)."""
    import torch

    from ckpt_ir.quantization import dequantize_fp8

    torch.set_num_threads(1)
    rows = mib * 2**20 // (2 * 4096)
    rows -= rows % 128
    src32 = torch.randn(rows, 4096)
    src16 = src32.to(torch.bfloat16)
    fp8 = src32.to(torch.float8_e4m3fn)
    scale = torch.rand(rows // 128, 4096 // 128) + 0.5

    def reference() -> torch.Tensor:
        blocks = fp8.view(rows // 128, 128, 32, 128).float() * scale[:, None, :, None]
        return blocks.view(rows, 4096).to(torch.bfloat16)

    work = {"copy bf16": lambda: src16.clone(), "cast fp32->bf16": lambda: src32.to(torch.bfloat16),
            "dequant fp8->bf16 (reference formula)": reference,
            "dequant fp8->bf16 (ckpt-ir)": lambda: dequantize_fp8(fp8, scale,
                                                                  dtype=torch.bfloat16)}
    assert torch.equal(reference().view(torch.int16), work["dequant fp8->bf16 (ckpt-ir)"]()
                       .view(torch.int16))
    out = {}
    for name, fn in work.items():
        fn()
        best = min(_once(fn) for _ in range(repeat))
        out[name] = rows * 4096 * 2 / best / 1e9
    return out


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


RANK_NOOP = ("import torch, torch.distributed as dist; dist.init_process_group('gloo'); "
             "dist.barrier(); dist.destroy_process_group()")


def launch_costs(n: int, runs: int, env: dict[str, str]) -> dict[str, dict]:
    """What torchrun costs before a conversion does any work, in steps (alternated, medians):
    an interpreter importing torch; the launcher alone starting N no-op commands; the launcher
    starting N interpreters that import torch, join a gloo group and pass one barrier."""
    py = sys.executable
    run = f"{py} -m torch.distributed.run --standalone --nproc-per-node {n}"
    steps = [("python -c 'import torch'", f"{py} -c 'import torch'"),
             (f"torchrun {n}: launcher, no-op ranks", f"{run} --no-python true"),
             (f"torchrun {n}: + import torch, gloo, barrier",
              f"{run} --no-python {py} -c \"{RANK_NOOP}\"")]
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    for i in range(runs + 1):
        for name, cmd in steps:
            wall, _ = _timed(cmd, env)
            if i:
                times[name].append(wall)
    return {name: {"median": statistics.median(t), "min": min(t), "max": max(t)}
            for name, t in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--src-dtype", choices=("bf16", "fp32", "fp8"), default="bf16",
                   help="fp8: a block-FP8 release layout (tools/make_synthetic_fp8.py), read "
                        "dequantized: the CPU-bound case")
    p.add_argument("--cast", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--procs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--torchrun", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--directions", default="hf->mcore-dist,mcore-dist->hf")
    p.add_argument("--work", type=Path, default=REPO / ".bench-scale")
    p.add_argument("--taskset", help="CPU list for taskset -c (emulate a smaller machine)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--rates", action="store_true",
                   help="only print single-thread CPU rates (copy, cast, FP8 dequantization)")
    p.add_argument("--launch-costs", type=int, metavar="N",
                   help="only time torchrun's fixed costs with N ranks (launcher, interpreters "
                        "importing torch, gloo rendezvous and a barrier)")
    args = p.parse_args()
    if args.launch_costs:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for name, r in launch_costs(args.launch_costs, args.runs, env).items():
            print(f"{name:42s} {r['median']:6.2f} s ({r['min']:.2f}-{r['max']:.2f})", flush=True)
        return 0
    if args.rates:
        for name, rate in cpu_rates().items():
            print(f"{name:20s} {rate:6.2f} GB/s of bf16 output, one thread", flush=True)
        return 0
    if 1 not in args.procs:
        args.procs = [1, *args.procs]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # A byte-code cache, as an installed package has (see tools/bench.py).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(args.work / "pycache")
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hf = work / "hf"
    if args.src_dtype == "fp8":
        from tools.make_synthetic_fp8 import write_fp8

        # The bf16 layout's size in FP8 bytes: about half, as a release is.
        total = write_fp8(hf, llama_config(int(args.gib * 2**30 * 2)))
    else:
        total = write(hf, llama_config(int(args.gib * 2**30), dtype=args.src_dtype))
    cpus = f"taskset {args.taskset} of {os.cpu_count()}" if args.taskset else os.cpu_count()
    machine = (f"{platform.node()}: {cpus} CPUs, {platform.machine()}, "
               f"Python {platform.python_version()}")
    print(f"{machine}; source {total / 2**30:.2f} GiB {args.src_dtype}"
          + (f", cast to {args.cast}" if args.cast else ""), flush=True)
    results: dict[str, dict] = {"machine": machine, "gib": total / 2**30,
                                "src_dtype": args.src_dtype, "cast": args.cast}
    for direction in args.directions.split(","):
        frm, to = direction.split("->")
        src = hf
        if frm != "hf":
            src = work / frm
            subprocess.run([sys.executable, "-m", "ckpt_ir", "convert", str(hf), str(src),
                            "--to", frm, "--no-progress"], check=True, env=env,
                           capture_output=True)
        results[direction] = bench(src, to, work, args, env)
        for m, r in results[direction].items():
            ratio = f"{r['vs_one']:.2f} x one" if r["vs_one"] else ""
            print(f"{direction:18s} {m:12s} {r['median']:7.2f} s ({r['min']:.2f}-{r['max']:.2f})"
                  f"  {ratio:12s} peak {r['peak_rss_mib']:.0f} MiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
