"""Benchmark ckpt-ir against the copy floor, cold and warm, and a naive load-everything converter.

    python tools/bench.py --gib 2 --runs 5            # hf <-> mcore-dist on a 2 GiB Llama
    python tools/bench.py --gib 8 --runs 1 --no-naive # memory figure for a larger model
    python tools/bench.py ... --write-docs            # put the table into docs/performance.md
    python tools/bench.py --mode verl-fsdp --gib 2    # verl FSDP (W=4) -> hf vs verl's merger
    python tools/bench.py dcp --size 2G --runs 3      # FSDP2 DCP (W=4) -> hf (tools/bench_dcp.py)
    python tools/bench.py --fp8 --gib 2 --runs 3      # block-FP8 hf -> bf16 hf (quantized.md)

For each direction (hf -> mcore-dist, mcore-dist -> hf) it runs, alternating A B C D A B C D so
machine drift hits every method alike:

* ``copy``: ``cp -r SRC DST && sync``, the floor: the same bytes made durable;
* ``cold``: a fresh Python process per run imports ckpt_ir (not timed), then times its first
  ``ckpt_ir.convert(...)`` and an ``os.sync()``, with its CPU time and peak RSS: what a user's
  conversion costs (the default, and what the targets are about);
* ``warm``: one long-lived process converts once untimed, then times each later conversion the
  same way (what the previous benchmark measured);
* ``cli``: the ``ckpt-ir convert`` command end to end, with its peak RSS (``/usr/bin/time``);
* ``naive``: load every tensor into memory, transform, save (what today's converters do:
  safetensors ``load_file`` + ``torch.distributed.checkpoint.save``, or ``dcp.load`` of the
  whole state dict + ``save_file``), with its peak RSS.

Medians and min-max over ``--runs`` are reported. Child processes get a byte-code cache
(``PYTHONPYCACHEPREFIX`` under the work directory, ``PYTHONDONTWRITEBYTECODE`` cleared), as an
installed package has: without one every fresh process compiles ckpt-ir's modules again (0.2 s
of the first conversion). Source files are read from the page cache after the first run in every
method (the machine has far more RAM than the model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.make_synthetic import llama_config, write  # noqa: E402

MARK_BEGIN = "<!-- bench:begin -->"
MARK_END = "<!-- bench:end -->"


def _rm(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def evict(tree: Path) -> None:
    """Drop ``tree``'s pages from the page cache (``POSIX_FADV_DONTNEED`` after a ``sync``; no
    root needed): the next reader finds every byte on disk, whatever ran before it."""
    os.sync()
    for f in tree.rglob("*"):
        if f.is_file() and not f.is_symlink():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _time_cmd(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a command, via GNU time."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True,
                       env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {r.stderr[-2000:]}")
    rss = int(r.stderr.strip().splitlines()[-1])
    return wall, rss


def durable_copy(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(f"cp -r '{src}' '{dst}' && sync", shell=True, check=True)
    return time.perf_counter() - t0


def in_process(src: Path, dst: Path, to: str) -> float:
    import ckpt_ir

    t0 = time.perf_counter()
    ckpt_ir.convert(src, dst, to=to)
    return time.perf_counter() - t0


# One conversion per line of stdin ("SRC DST TO"), timed after ckpt_ir is imported; one JSON
# line out per conversion: wall and CPU seconds of convert + os.sync(), the process's peak RSS
# so far (KiB).
WORKER = r'''
import json, os, resource, sys, time
import torch  # untimed: the conversion imports it only when it first needs it
import ckpt_ir
ckpt_ir.convert  # the lazy attribute: ckpt_ir.api is imported here, untimed
print("ready", flush=True)
for line in sys.stdin:
    src, dst, to = line.split()
    c0, t0 = time.process_time(), time.perf_counter()
    ckpt_ir.convert(src, dst, to=to)
    os.sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child of a
    # parent that once held 1 GB would report 1 GB whatever it used itself.
    try:
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall": wall, "cpu": cpu, "rss": rss}), flush=True)
'''


def child_env(work: Path) -> dict[str, str]:
    """The environment of measured child processes: a byte-code cache, as installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    env["PYTHONPATH"] = str(REPO)
    return env


class Worker:
    """A Python process that imported ckpt_ir and converts on request (see WORKER)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        if self.proc.stdout is None or self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("benchmark worker did not start")

    def convert(self, src: Path, dst: Path, to: str) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{src} {dst} {to}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker died converting {src}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def cold(src: Path, dst: Path, to: str, env: dict[str, str]) -> dict[str, float]:
    """The first conversion of a fresh process (import excluded)."""
    w = Worker(env)
    try:
        return w.convert(src, dst, to)
    finally:
        w.close()


NAIVE = r'''
import sys, json, torch, glob, os
from pathlib import Path
src, dst, to = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
from ckpt_ir.ir import ModelConfig
from ckpt_ir.tables import build_table, NativeParams
if to == "mcore-dist":
    from safetensors.torch import load_file
    import torch.distributed.checkpoint as dcp
    cfg = ModelConfig.from_hf(json.loads((src / "config.json").read_text()))
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    table = build_table("mcore", cfg, NativeParams())
    out, stacks = {}, {}
    for b in table.bindings:
        t = b.transform.apply({r: state[n] for r, n in b.ir.items()})
        if b.layer is None:
            out[b.native] = t
        else:
            key = b.native.replace(f"decoder.layers.{b.layer}.", "decoder.layers.")
            stacks.setdefault(key, []).append(t)
    del state
    for k, ts in stacks.items():
        out[k] = torch.stack(ts)
    del stacks
    dst.mkdir()
    dcp.save(out, checkpoint_id=str(dst), no_dist=True)
else:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from safetensors.torch import save_file
    reader = FileSystemReader(str(src))
    md = reader.read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype)
          for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
    dcp.load(sd, storage_reader=reader, no_dist=True)
    cfg = ModelConfig.from_hf(json.loads((src / "hf_config" / "config.json").read_text()))
    vocab = sd["embedding.word_embeddings.weight"].shape[0]
    table = build_table("mcore", cfg, NativeParams(padded_vocab_size=vocab))
    hf = {}
    for b in table.bindings:
        if b.layer is None:
            t = sd[b.native]
        else:
            t = sd[b.native.replace(f"decoder.layers.{b.layer}.", "decoder.layers.")][b.layer]
        for role, part in b.transform.inverse(t).items():
            hf[b.ir[role]] = part.contiguous()
    del sd
    dst.mkdir()
    save_file(hf, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in (dst / "model.safetensors",):
        fd = os.open(f, os.O_RDONLY); os.fsync(fd); os.close(fd)
'''


def naive(src: Path, dst: Path, to: str) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return _time_cmd([sys.executable, "-c", NAIVE, str(src), str(dst), to], env=env)


def cli(src: Path, dst: Path, to: str, env: dict[str, str]) -> tuple[float, int]:
    exe = shutil.which("ckpt-ir") or str(Path(sys.executable).parent / "ckpt-ir")
    return _time_cmd([exe, "convert", str(src), str(dst), "--to", to, "--no-progress"],
                     env=env)


def cli_baseline(src: Path, dst: Path, to: str, env: dict[str, str], tree: Path
                 ) -> tuple[float, int]:
    """``python -m ckpt_ir convert`` from another checkout of ckpt-ir (``--baseline``)."""
    env = {**env, "PYTHONPATH": str(tree),
           "PYTHONPYCACHEPREFIX": env["PYTHONPYCACHEPREFIX"] + "-baseline"}
    return _time_cmd([sys.executable, "-m", "ckpt_ir", "convert", str(src), str(dst), "--to",
                      to, "--no-progress"], env=env)


def startup_overhead(env: dict[str, str], *tiny: Path) -> list[list[float]]:
    """Wall times of `import torch`, `ckpt-ir --help`, and `ckpt-ir inspect` of each tiny
    checkpoint, 5 alternating runs."""
    exe = shutil.which("ckpt-ir") or str(Path(sys.executable).parent / "ckpt-ir")
    cmds = [[sys.executable, "-c", "import torch"], [exe, "--help"],
            *([exe, "inspect", str(path)] for path in tiny)]
    times: list[list[float]] = [[] for _ in cmds]
    for _ in range(5):
        for t, cmd in zip(times, cmds, strict=True):
            t.append(_time_cmd(cmd, env=env)[0])
    return times


def main() -> int:
    if sys.argv[1:2] == ["dcp"]:
        from tools.bench_dcp import main as dcp_main

        return dcp_main(sys.argv[2:])
    if "--mode" in sys.argv:
        # --mode verl-fsdp: tools/bench_verl_fsdp.py (its own options).
        i = sys.argv.index("--mode")
        mode, rest = sys.argv[i + 1:i + 2], sys.argv[1:i] + sys.argv[i + 2:]
        if mode == ["verl-fsdp"]:
            from tools.bench_verl_fsdp import main as verl_fsdp_main

            return verl_fsdp_main(rest)
        if mode != ["formats"]:
            sys.exit("tools/bench.py: --mode is formats (default) or verl-fsdp")
        sys.argv[1:] = rest
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work", type=Path, default=REPO / ".bench")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--baseline", type=Path, metavar="TREE",
                   help="also time the CLI of another checkout (e.g. a `git worktree` of the "
                        "previous commit), alternated with the others: an A/B of a change. "
                        "The tree must import on its own: `ln -s ../converters "
                        "TREE/ckpt_ir/converters` (converters/ ships as ckpt_ir.converters)")
    p.add_argument("--cold-cache", action="store_true",
                   help="evict the source from the page cache before every timed run, so "
                        "every method reads it from disk (the spread of a model larger than "
                        "RAM otherwise depends on what the previous run left cached)")
    p.add_argument("--fp8", action="store_true",
                   help="dequantize a synthetic block-FP8 checkpoint of --gib GiB to bf16 hf, "
                        "against a durable copy of the output's bytes")
    args = p.parse_args()
    if args.fp8:
        return fp8_bench(args)

    work = args.work / f"llama-{args.gib:g}gib"
    src = work / "hf"
    if not (src / "config.json").is_file():
        _rm(work)
        work.mkdir(parents=True)
        write(src, llama_config(int(args.gib * 2**30)))
    size = sum(f.stat().st_size for f in src.iterdir())
    dist = work / "dist"
    if not (dist / "metadata.json").is_file():
        _rm(dist)
        in_process(src, dist, "mcore-dist")

    env = child_env(work)
    out = work / "out"
    warm_workers = {}
    directions = (("hf -> mcore-dist", src, "mcore-dist"), ("mcore-dist -> hf", dist, "hf"))
    for label, source, to in directions:
        # Fills the byte-code cache (first run only) and warms the worker, untimed.
        _rm(out)
        warm_workers[label] = Worker(env)
        warm_workers[label].convert(source, out, to)
        _rm(out)
    results: dict[str, dict[str, list]] = {}

    def fresh(source: Path) -> None:
        _rm(out)
        if args.cold_cache:
            evict(source)

    for _ in range(args.runs):
        for label, source, to in directions:
            r = results.setdefault(label, {})
            fresh(source)
            r.setdefault("copy", []).append(durable_copy(source, out))
            fresh(source)
            m = cold(source, out, to, env)
            r.setdefault("cold", []).append(m["wall"])
            r.setdefault("cold_cpu", []).append(m["cpu"])
            r.setdefault("cold_rss", []).append(m["rss"])
            fresh(source)
            m = warm_workers[label].convert(source, out, to)
            r.setdefault("warm", []).append(m["wall"])
            r.setdefault("warm_cpu", []).append(m["cpu"])
            r.setdefault("warm_rss", []).append(m["rss"])
            fresh(source)
            wall, rss = cli(source, out, to, env)
            r.setdefault("cli", []).append(wall)
            r.setdefault("cli_rss", []).append(rss)
            if args.baseline:
                fresh(source)
                wall, rss = cli_baseline(source, out, to, env, args.baseline.resolve())
                r.setdefault("cli_base", []).append(wall)
                r.setdefault("cli_base_rss", []).append(rss)
            fresh(source)
            if not args.no_naive:
                wall, rss = naive(source, out, to)
                r.setdefault("naive", []).append(wall)
                r.setdefault("naive_rss", []).append(rss)
                _rm(out)
            print(label, {k: round(v[-1], 2) for k, v in r.items()}, flush=True)
    for w in warm_workers.values():
        w.close()

    tiny, tiny_dist = work / "tiny", work / "tiny-dist"
    if not tiny.is_dir():
        from tests.fixtures import write_hf
        write_hf(tiny)
    if not (tiny_dist / "metadata.json").is_file():
        _rm(tiny_dist)
        in_process(tiny, tiny_dist, "mcore-dist")
    t_torch, t_help, t_cli, t_cli_dist = startup_overhead(env, tiny, tiny_dist)

    largest = max(math.prod(shape) for shape in _shapes(src)) * 2  # bf16
    lines = _table(results, size, largest, args)
    lines.append("")
    lines.append(f"CLI start-up (medians of 5): `python -c 'import torch'` "
                 f"{_span(t_torch)}; `ckpt-ir --help` {_span(t_help)}; `ckpt-ir inspect` of a "
                 f"tiny hf checkpoint {_span(t_cli)}, of a tiny mcore-dist one "
                 f"{_span(t_cli_dist)}.")
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        _write_docs(text, f"{args.gib:g}")
    return 0


def fp8_bench(args: argparse.Namespace) -> int:
    """FP8 -> bf16 ``hf``: a fresh process's conversion (wall, CPU, peak RSS) against ``cp -r``
    + ``sync`` of the bf16 output it writes (the floor: those bytes made durable)."""
    from tools.make_synthetic_fp8 import write_fp8

    work = args.work / f"llama-fp8-{args.gib:g}gib"
    src = work / "fp8"
    if not (src / "config.json").is_file():
        _rm(work)
        work.mkdir(parents=True)
        # llama_config sizes bf16 weights; the FP8 linear weights take half of that.
        write_fp8(src, llama_config(int(2 * args.gib * 2**30)))
    env = child_env(work)
    ref, out = work / "bf16", work / "out"
    _rm(ref)
    cold(src, ref, "hf", env)  # untimed: fills the byte-code cache, gives the copy's bytes
    results: dict[str, list[float]] = {}
    for _ in range(args.runs):
        _rm(out)
        results.setdefault("copy", []).append(durable_copy(ref, out))
        _rm(out)
        m = cold(src, out, "hf", env)
        for k in ("wall", "cpu", "rss"):
            results.setdefault(k, []).append(m[k])
        _rm(out)
        print({k: round(v[-1], 2) for k, v in results.items()}, flush=True)
    size = sum(f.stat().st_size for f in src.iterdir())
    out_size = sum(f.stat().st_size for f in ref.iterdir())
    largest = max(math.prod(shape) for shape in _shapes(ref)) * 2  # bf16, as dequantized
    med = statistics.median
    print(f"block FP8 -> bf16 hf, {size / 2**30:.2f} GiB in, {out_size / 2**30:.2f} GiB out, "
          f"{args.runs} runs (medians, min-max): durable copy of the output "
          f"{_span(results['copy'])}; ckpt-ir cold {_span(results['wall'])} "
          f"({med(results['wall']) / med(results['copy']):.2f}x the copy), CPU "
          f"{_span(results['cpu'])}, peak RSS {_span(results['rss'], ' MiB', 1024, '.0f')} "
          f"(bound: the largest tensor, {largest / 2**20:.0f} MiB in bf16, + 512 MiB)")
    return 0


def _shapes(src: Path) -> list[tuple[int, ...]]:
    from ckpt_ir.converters.storage.safetensors_file import read_header

    return [tuple(e.shape) for f in src.glob("*.safetensors")
            for e in read_header(f).entries.values()]


def _span(values: list[float], unit: str = " s", scale: float = 1.0, fmt: str = ".2f") -> str:
    med = statistics.median(values) / scale
    return (f"{med:{fmt}}{unit} ({min(values) / scale:{fmt}}-{max(values) / scale:{fmt}})")


def _table(results: dict, size: int, largest: int, args) -> list[str]:
    med = statistics.median
    machine = f"{platform.machine()}, {os.cpu_count()} cores, " \
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    bound = largest / 2**20 + 512
    lines = [
        f"Llama-shaped bf16 checkpoint, {size / 2**30:.2f} GiB, largest tensor "
        f"{largest / 2**20:.0f} MiB; {machine}; medians (min-max) of {args.runs} alternating "
        f"runs ({time.strftime('%Y-%m-%d')}). Cold: a fresh process's first conversion, import "
        "excluded; warm: a later conversion in one process; × copy: median over the durable "
        "copy's median.",
        "",
        "| direction | durable copy | cold | × copy | cold CPU | warm | × copy | warm CPU "
        "| CLI end to end | × copy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in results.items():
        copy = med(r["copy"])
        lines.append(
            f"| {label} | {_span(r['copy'])} | {_span(r['cold'])} | {med(r['cold']) / copy:.2f} "
            f"| {_span(r['cold_cpu'])} | {_span(r['warm'])} | {med(r['warm']) / copy:.2f} | "
            f"{_span(r['warm_cpu'])} | {_span(r['cli'])} | {med(r['cli']) / copy:.2f} |")
    if args.baseline:
        lines += ["", f"CLI of the baseline checkout ({args.baseline}), alternated with the rest:",
                  ""]
        for label, r in results.items():
            lines.append(f"* {label}: {_span(r['cli_base'])}, "
                         f"{med(r['cli_base']) / med(r['copy']):.2f} × copy (this checkout's "
                         f"CLI {med(r['cli']) / med(r['copy']):.2f} ×)")
    lines += [
        "",
        f"Peak RSS (bound: largest tensor + 512 MiB = {bound:.0f} MiB):",
        "",
        "| direction | cold in-process | warm in-process (after all runs) | CLI | naive | "
        "naive time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in results.items():
        naive_t = _span(r["naive"]) if "naive" in r else "not run"
        naive_m = f"{med(r['naive_rss']) / 2**20:.2f} GiB" if "naive_rss" in r else "not run"
        lines.append(f"| {label} | {max(r['cold_rss']) / 1024:.0f} MiB | "
                     f"{max(r['warm_rss']) / 1024:.0f} MiB | {max(r['cli_rss']) / 1024:.0f} MiB "
                     f"| {naive_m} | {naive_t} |")
    return lines


def _write_docs(text: str, tag: str) -> None:
    path = REPO / "docs" / "performance.md"
    doc = path.read_text()
    begin, end = f"<!-- bench:{tag}:begin -->", f"<!-- bench:{tag}:end -->"
    block = f"{begin}\n{text}\n{end}"
    if begin in doc:
        doc = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, doc,
                     flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)
    print(f"updated {path}")


if __name__ == "__main__":
    sys.exit(main())
