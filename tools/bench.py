"""Benchmark ckpt-ir against the copy floor and a naive load-everything converter.

    python tools/bench.py --gib 2 --runs 3            # hf <-> mcore-dist on a 2 GiB Llama
    python tools/bench.py --gib 8 --runs 1 --no-naive # memory figure for a larger model
    python tools/bench.py ... --write-docs            # put the table into docs/performance.md

For each direction (hf -> mcore-dist, mcore-dist -> hf) it runs, alternating A B C A B C so
machine drift hits every method alike:

* ``copy``: ``cp -r SRC DST && sync``, the floor: the same bytes made durable;
* ``ckpt-ir``: ``ckpt_ir.convert(...)`` in this process (outputs fsynced, import excluded);
* ``cli``: the ``ckpt-ir convert`` command end to end, with its peak RSS (``/usr/bin/time``);
* ``naive``: load every tensor into memory, transform, save (what today's converters do:
  safetensors ``load_file`` + ``torch.distributed.checkpoint.save``, or ``dcp.load`` of the
  whole state dict + ``save_file``), with its peak RSS.

Medians over ``--runs`` are reported. Source files are read from the page cache after the first
run in every method (the machine has far more RAM than the model), so the comparison is about
the work each method does, not about the disk's read speed.
"""

from __future__ import annotations

import argparse
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


def cli(src: Path, dst: Path, to: str) -> tuple[float, int]:
    exe = shutil.which("ckpt-ir") or str(Path(sys.executable).parent / "ckpt-ir")
    return _time_cmd([exe, "convert", str(src), str(dst), "--to", to, "--no-progress"])


def startup_overhead(*tiny: Path) -> list[float]:
    """Median wall times of `import torch` and of `ckpt-ir inspect` on each tiny checkpoint."""
    exe = shutil.which("ckpt-ir") or str(Path(sys.executable).parent / "ckpt-ir")
    times: list[list[float]] = [[] for _ in range(len(tiny) + 1)]
    for _ in range(5):
        times[0].append(_time_cmd([sys.executable, "-c", "import torch"])[0])
        for t, path in zip(times[1:], tiny, strict=True):
            t.append(_time_cmd([exe, "inspect", str(path)])[0])
    return [statistics.median(t) for t in times]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work", type=Path, default=REPO / ".bench")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()

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

    results: dict[str, dict[str, list]] = {}
    directions = (("hf -> mcore-dist", src, "mcore-dist"), ("mcore-dist -> hf", dist, "hf"))
    for _ in range(args.runs):
        for label, source, to in directions:
            r = results.setdefault(label, {})
            out = work / "out"
            _rm(out)
            r.setdefault("copy", []).append(durable_copy(source, out))
            _rm(out)
            r.setdefault("ckpt-ir", []).append(in_process(source, out, to))
            _rm(out)
            wall, rss = cli(source, out, to)
            r.setdefault("cli", []).append(wall)
            r.setdefault("cli_rss", []).append(rss)
            _rm(out)
            if not args.no_naive:
                wall, rss = naive(source, out, to)
                r.setdefault("naive", []).append(wall)
                r.setdefault("naive_rss", []).append(rss)
                _rm(out)
            print(label, {k: round(v[-1], 2) for k, v in r.items()}, flush=True)

    tiny, tiny_dist = work / "tiny", work / "tiny-dist"
    if not tiny.is_dir():
        from tests.fixtures import write_hf
        write_hf(tiny)
    if not (tiny_dist / "metadata.json").is_file():
        _rm(tiny_dist)
        in_process(tiny, tiny_dist, "mcore-dist")
    t_torch, t_cli, t_cli_dist = startup_overhead(tiny, tiny_dist)

    largest = max(math.prod(shape) for shape in _shapes(src)) * 2  # bf16
    lines = _table(results, size, largest, args)
    lines.append("")
    lines.append(f"CLI start-up: `python -c 'import torch'` {t_torch:.2f} s; `ckpt-ir inspect` on "
                 f"a tiny hf checkpoint {t_cli:.2f} s (overhead {t_cli - t_torch:.2f} s), on a "
                 f"tiny mcore-dist one {t_cli_dist:.2f} s (overhead {t_cli_dist - t_torch:.2f} "
                 "s).")
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        _write_docs(text, f"{args.gib:g}")
    return 0


def _shapes(src: Path) -> list[tuple[int, ...]]:
    from ckpt_ir.converters.storage.safetensors_file import read_header

    return [tuple(e.shape) for f in src.glob("*.safetensors")
            for e in read_header(f).entries.values()]


def _table(results: dict, size: int, largest: int, args) -> list[str]:
    med = statistics.median
    machine = f"{platform.machine()}, {os.cpu_count()} cores, " \
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    lines = [
        f"Llama-shaped bf16 checkpoint, {size / 2**30:.2f} GiB, largest tensor "
        f"{largest / 2**20:.0f} MiB; {machine}; medians of {args.runs} alternating runs "
        f"({time.strftime('%Y-%m-%d')}).",
        "",
        "| direction | durable copy | ckpt-ir in-process | × copy | ckpt-ir CLI | CLI peak RSS "
        "| naive | naive peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in results.items():
        copy, ours = med(r["copy"]), med(r["ckpt-ir"])
        naive_t = f"{med(r['naive']):.2f} s" if "naive" in r else "not run"
        naive_m = f"{med(r['naive_rss']) / 2**20:.2f} GiB" if "naive_rss" in r else "not run"
        lines.append(f"| {label} | {copy:.2f} s | {ours:.2f} s | {ours / copy:.2f} | "
                     f"{med(r['cli']):.2f} s | {med(r['cli_rss']) / 1024:.0f} MiB | {naive_t} | "
                     f"{naive_m} |")
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
