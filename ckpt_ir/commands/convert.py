"""``ckpt-ir convert SRC DST --to FMT``: plan, validate, stream, commit atomically."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ckpt_ir.commands import add_common, human_bytes, print_dropped

NAME = "convert"
HELP = "convert a checkpoint into another format"
WRITABLE_FORMATS = ("hf", "mcore-dist")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=WRITABLE_FORMATS)
    p.add_argument("--from", dest="source_format",
                   choices=("hf", "hf-peft", "mcore-dist", "verl-legacy", "megatron-legacy"),
                   help="source format (default: detected)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="cast floating-point weights (default: keep the source dtypes)")
    p.add_argument("--pad-vocab-to-multiple", type=int, metavar="N",
                   help="pad the vocabulary with zero rows to a multiple of N (mcore-dist)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard when writing hf (default 5GB)")
    p.add_argument("--mcore-spec", choices=("any", "local", "te"), default="any",
                   help="which layer spec's _extra_state objects to write (default: both)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--dry-run", action="store_true", help="plan and print, write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ckpt_ir.api import convert

    bar = None
    progress = None
    if not args.no_progress and not args.dry_run:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                   desc="converting", disable=None, leave=False)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
    try:
        report = convert(args.src, args.dst, to=args.to, source_format=args.source_format,
                         hf_config=args.hf_config, dtype=args.dtype,
                         pad_vocab_to_multiple=args.pad_vocab_to_multiple,
                         max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                         dry_run=args.dry_run, trust_pickles=args.trust_pickles,
                         mcore_spec=args.mcore_spec, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    return report.to_dict()


def show(r: dict[str, Any]) -> None:
    verb = "would write" if r["dry_run"] else "wrote"
    print(f"{r['source']} ({r['source_format']}, {r['source_layout']}) -> {r['destination']} "
          f"({r['dest_format']})")
    print(f"  {r['architecture']}: {verb} {r['tensors_written']} tensors, "
          f"{human_bytes(r['bytes_written'])} (read {human_bytes(r['bytes_read'])}); "
          f"peak unit {human_bytes(r['peak_bytes_estimate'])}; {r['seconds']:.2f} s")
    for note in r["notes"]:
        print(f"  note: {note}")
    print_dropped(r["dropped"])
