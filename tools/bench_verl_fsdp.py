"""``tools/bench.py --mode verl-fsdp``: verl FSDP (W=4) -> hf, ckpt-ir vs a durable copy vs
verl 0.9.1's own merger.

    python tools/bench.py --mode verl-fsdp --gib 2 --runs 3

A Llama-shaped synthetic HF checkpoint of ``--gib`` GiB (``tools/make_synthetic.py``) is
written as ``verl-fsdp`` at world size 4 by ckpt-ir (the files verl's ``load_checkpoint``
accepts, ``tests/clients/test_verl_fsdp_client.py``), with a small tokenizer in
``huggingface/`` (verl's merger saves one and fails without it). Then, alternating A B C so
machine drift hits each method alike:

* ``copy``: ``cp -r`` of the role directory and ``sync``: the same bytes made durable;
* ``ckpt-ir``: a fresh process's ``ckpt_ir.convert(role, out, "hf")`` + ``os.sync()`` (import
  excluded), wall, CPU and peak RSS (``VmHWM``), as ``tools/bench.py``'s ``cold``;
* ``verl merger``: ``python -m verl.model_merger merge --backend fsdp --local_dir ROLE
  --target_dir OUT`` (with the tests' import shim: verl's package ``__init__`` imports Ray), its
  wall and peak RSS through ``/usr/bin/time``. It loads every rank file and writes bf16.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
from pathlib import Path

from tools.bench import REPO, Worker, _rm, _span, _time_cmd, child_env, durable_copy
from tools.make_synthetic import llama_config, write

WORLD = 4

MERGER = r'''
import importlib.util, os, runpy, sys, types
spec = importlib.util.find_spec("verl")
root = next(iter(spec.submodule_search_locations))
for name in ("verl", "verl.utils.checkpoint"):
    m = types.ModuleType(name)
    m.__path__ = [os.path.join(root, *name.split(".")[1:])]
    sys.modules[name] = m
sys.argv = ["verl.model_merger", *sys.argv[1:]]
runpy.run_module("verl.model_merger", run_name="__main__", alter_sys=True)
'''


def _tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)


def prepare(work: Path, gib: float) -> tuple[Path, int]:
    import ckpt_ir

    src, role = work / "hf", work / "global_step_1" / "actor"
    if not (src / "config.json").is_file():
        _rm(work)
        work.mkdir(parents=True)
        write(src, llama_config(int(gib * 2**30)))
    if not (role / "fsdp_config.json").is_file():
        _rm(role)
        ckpt_ir.convert(src, role, "verl-fsdp", fsdp_world_size=WORLD)
        _tokenizer(role / "huggingface")
    from ckpt_ir.converters.storage.safetensors_file import read_header

    largest = max(math.prod(e.shape) * e.dtype.itemsize for f in src.glob("*.safetensors")
                  for e in read_header(f).entries.values())
    return role, largest


def merger(role: Path, out: Path) -> tuple[float, int]:
    return _time_cmd([sys.executable, "-c", MERGER, "merge", "--backend", "fsdp",
                      "--local_dir", str(role), "--target_dir", str(out)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work", type=Path, default=REPO / ".bench")
    p.add_argument("--no-merger", action="store_true", help="skip verl's merger")
    args = p.parse_args(argv)
    work = args.work / f"verl-fsdp-{args.gib:g}gib"
    role, largest = prepare(work, args.gib)
    size = sum(f.stat().st_size for f in role.glob("model_world_size_*"))
    env = child_env(work)
    out = work / "out"
    r: dict[str, list[float]] = {}
    for _ in range(args.runs):
        _rm(out)
        r.setdefault("copy", []).append(durable_copy(role, out))
        _rm(out)
        w = Worker(env)
        try:
            m = w.convert(role, out, "hf")
        finally:
            w.close()
        r.setdefault("ckpt", []).append(m["wall"])
        r.setdefault("ckpt_cpu", []).append(m["cpu"])
        r.setdefault("ckpt_rss", []).append(m["rss"] / 1024)
        _rm(out)
        if not args.no_merger:
            wall, rss = merger(role, out)
            r.setdefault("merger", []).append(wall)
            r.setdefault("merger_rss", []).append(rss / 1024)
            _rm(out)
        print({k: round(v[-1], 2) for k, v in r.items()}, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    med = statistics.median
    copy = med(r["copy"])
    lines = [
        f"verl FSDP2 checkpoint, W={WORLD}, {size / 2**30:.2f} GiB of model files, largest "
        f"tensor {largest / 2**20:.0f} MiB (RSS bound: + 512 MiB = {largest / 2**20 + 512:.0f} "
        f"MiB); medians (min-max) of {args.runs} alternating runs.",
        "",
        "| method | wall | × copy | peak RSS |",
        "| --- | --- | --- | --- |",
        f"| durable copy (`cp -r` + `sync`) | {_span(r['copy'])} | 1.00 | |",
        f"| ckpt-ir `convert --to hf` (in-process, fresh process) | {_span(r['ckpt'])} | "
        f"{med(r['ckpt']) / copy:.2f} | {max(r['ckpt_rss']):.0f} MiB |",
    ]
    if "merger" in r:
        lines.append(f"| verl 0.9.1 `model_merger merge --backend fsdp` (writes bf16) | "
                     f"{_span(r['merger'])} | {med(r['merger']) / copy:.2f} | "
                     f"{max(r['merger_rss']):.0f} MiB |")
    print("\n".join(lines))
    return 0
