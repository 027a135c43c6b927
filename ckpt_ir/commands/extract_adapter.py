"""``ckpt-ir extract-adapter SRC DST [--lora-alpha A]``: a checkpoint's LoRA adapter as HF PEFT.

SRC is anything holding an adapter: a Megatron-Bridge or verl torch_dist directory (adapter-only,
or base + adapter: the base weights are skipped), verl's ``adapter_checkpoint/`` files, a verl
run / step / role directory leading to those, or an HF PEFT directory. DST loads with
``peft.PeftModel.from_pretrained``. verl's adapter files record no alpha: pass ``--lora-alpha``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ckpt_ir.commands import add_common, human_bytes, print_dropped

NAME = "extract-adapter"
HELP = "write the LoRA adapter a checkpoint holds as an HF PEFT directory"


def add_lora_options(p: argparse.ArgumentParser) -> None:
    """The options of LoRA adapter sources and Megatron adapter destinations."""
    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--lora-alpha", type=float, metavar="A",
                   help="LoRA alpha of a source that does not record it (verl's adapter files, "
                        "torch_dist adapters without run_config.yaml)")
    g.add_argument("--lora-style", choices=("fused", "canonical"),
                   help="Megatron destinations: Megatron-Bridge LoRA with fused q/k/v and "
                        "gate/up adapters (fused, the default) or CanonicalLoRA (canonical)")


def lora_options(args: argparse.Namespace) -> dict[str, Any]:
    """The LoRA options the user gave, as keyword arguments."""
    return {k: v for k in ("lora_alpha", "lora_style")
            if (v := getattr(args, k, None)) is not None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--lora-alpha", type=float, metavar="A",
                   help="LoRA alpha, when SRC does not record it (verl's adapter files)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="cast the adapter tensors (default: keep their dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--dry-run", action="store_true", help="plan and print, write nothing")
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ckpt_ir.adapter_api import extract_adapter

    return extract_adapter(args.src, args.dst, lora_alpha=args.lora_alpha,
                           hf_config=args.hf_config, dtype=args.dtype,
                           overwrite=args.overwrite, dry_run=args.dry_run,
                           trust_pickles=args.trust_pickles).to_dict()


def show(r: dict[str, Any]) -> None:
    show_adapter(r)


def show_adapter(r: dict[str, Any]) -> None:
    """Rendering of an adapter conversion report (extract-adapter, convert of adapters)."""
    verb = "would write" if r["dry_run"] else "wrote"
    print(f"{r['source']} ({r['source_format']}, {r['source_layout']}) -> {r['destination']} "
          f"({r['dest_format']}{', ' + r['dest_layout'] if r.get('dest_layout') else ''})")
    src = r.get("adapter", {}).get("source", {})
    print(f"  {r['architecture']} LoRA adapter: r={src.get('r')} lora_alpha="
          f"{src.get('lora_alpha')} on {', '.join(src.get('target_modules', []))}; {verb} "
          f"{r['tensors_written']} tensors, {human_bytes(r['bytes_written'])}; "
          f"{r['seconds']:.2f} s")
    mega = r.get("adapter", {}).get("megatron")
    if mega:
        print(f"  Megatron-Bridge {'CanonicalLoRA' if mega['style'] == 'canonical' else 'LoRA'}:"
              f" dim={mega['rank']} alpha={mega['alpha']:g} target_modules="
              f"{mega['target_modules']}")
    for note in r["notes"]:
        print(f"  note: {note}")
    print_dropped(r["dropped"])
    sys.stdout.flush()
