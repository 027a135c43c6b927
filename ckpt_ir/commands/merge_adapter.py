"""``ckpt-ir merge-adapter BASE ADAPTER DST [--to hf|mcore-dist]``: merge a LoRA adapter.

Writes BASE with ``W + scaling · B @ A`` for every module ADAPTER targets, computed in fp32 and
cast back to W's dtype, one layer at a time. BASE is any model checkpoint ckpt-ir reads; ADAPTER
anything ``extract-adapter`` reads (the same torch_dist directory as BASE for a base + adapter
training checkpoint).
"""

from __future__ import annotations

import argparse
from typing import Any

from ckpt_ir.commands import add_common, human_bytes, print_dropped

NAME = "merge-adapter"
HELP = "write a model with a LoRA adapter merged into its weights"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("dst")
    p.add_argument("--to", choices=("hf", "mcore-dist"), default="hf",
                   help="format of the merged model (default hf)")
    p.add_argument("--lora-alpha", type=float, metavar="A",
                   help="LoRA alpha, when ADAPTER does not record it (verl's adapter files)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="dtype of the merged weights (default: the base model's)")
    p.add_argument("--pad-vocab-to-multiple", type=int, metavar="N",
                   help="pad the vocabulary with zero rows to a multiple of N (mcore-dist)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard when writing hf (default 5GB)")
    p.add_argument("--mcore-spec", choices=("any", "local", "te"), default="any",
                   help="which layer spec's _extra_state objects to write (mcore-dist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--dry-run", action="store_true", help="plan and print, write nothing")
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ckpt_ir.adapter_api import merge_adapter

    return merge_adapter(args.base, args.adapter, args.dst, to=args.to,
                         hf_config=args.hf_config, lora_alpha=args.lora_alpha, dtype=args.dtype,
                         pad_vocab_to_multiple=args.pad_vocab_to_multiple,
                         max_shard_size=args.max_shard_size, mcore_spec=args.mcore_spec,
                         overwrite=args.overwrite, dry_run=args.dry_run,
                         trust_pickles=args.trust_pickles).to_dict()


def show(r: dict[str, Any]) -> None:
    verb = "would write" if r["dry_run"] else "wrote"
    print(f"{r['source']} -> {r['destination']} ({r['dest_format']})")
    print(f"  {r['architecture']}: {verb} {r['tensors_written']} tensors, "
          f"{human_bytes(r['bytes_written'])} (read {human_bytes(r['bytes_read'])}); "
          f"peak unit {human_bytes(r['peak_bytes_estimate'])}; {r['seconds']:.2f} s")
    for note in r["notes"]:
        print(f"  note: {note}")
    print_dropped(r["dropped"])
