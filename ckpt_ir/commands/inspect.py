"""``ckpt-ir inspect SRC``: what a checkpoint directory holds, and how ckpt-ir reads it.

Prints the format, the directory layout it was found in (verl v1/v2/bridge/legacy trees,
Megatron-LM iterations), the step, what each directory on the way holds, the parallel layout of
per-rank checkpoints, the model config and what would be skipped.
"""

from __future__ import annotations

import argparse
from typing import Any

from ckpt_ir.commands import add_common, human_bytes, print_dropped

NAME = "inspect"
HELP = "say what a checkpoint directory holds"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("--source-ep", type=int, metavar="N",
                   help="expert-parallel size of a per-rank source whose mp_rank_TT_NNN "
                        "directory names could number pipeline or expert ranks")
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ckpt_ir.api import _open_reader
    from ckpt_ir.planner import make_plan

    reader, resolved = _open_reader(args.src, None, hf_config=args.hf_config,
                                    trust_pickles=args.trust_pickles,
                                    source_ep=getattr(args, "source_ep", None))
    try:
        plan = make_plan(source_format=reader.format, source_naming=reader.naming,
                         source_params=reader.params, source_tensors=reader.tensors(),
                         source_dropped=reader.dropped(), config=reader.config,
                         dest_format="ir", dest_naming="hf", dest_params=reader.params)
        cfg = reader.config
        return {
            "path": str(args.src),
            "resolved_path": str(resolved.path),
            "format": reader.format,
            "layout": resolved.layout,
            "step": resolved.step,
            "notes": list(resolved.notes),
            "tree": [{"path": path, "holds": what} for path, what in resolved.tree],
            "architecture": cfg.architecture,
            "config": {
                "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
                "tie_word_embeddings": cfg.tie_word_embeddings,
            },
            "ir_tensors": len(plan.ir_specs),
            "ir_bytes": sum(s.nbytes for s in plan.ir_specs.values()),
            "dtypes": sorted({str(s.dtype).removeprefix("torch.")
                              for s in plan.ir_specs.values()}),
            "dropped": dict(sorted(plan.dropped.items())),
            "details": reader.describe(),
        }
    finally:
        reader.close()


def show(info: dict[str, Any]) -> None:
    print(f"{info['path']}: {info['format']} ({info['layout']})")
    if info["resolved_path"] != info["path"]:
        print(f"  reads from: {info['resolved_path']}")
    if info["step"] is not None:
        print(f"  step: {info['step']}")
    for note in info["notes"]:
        print(f"  note: {note}")
    if info.get("tree"):
        print("  tree:")
        width = max(len(e["path"]) for e in info["tree"])
        for e in info["tree"]:
            print(f"    {e['path']:<{width}}  {e['holds']}")
    c = info["config"]
    print(f"  architecture: {info['architecture']}  layers={c['num_layers']} "
          f"hidden={c['hidden_size']} heads={c['num_attention_heads']}/"
          f"{c['num_key_value_heads']} head_dim={c['head_dim']} ffn={c['intermediate_size']} "
          f"vocab={c['vocab_size']} tied={c['tie_word_embeddings']}")
    print(f"  tensors: {info['ir_tensors']} logical, {human_bytes(info['ir_bytes'])}, "
          f"dtypes {', '.join(info['dtypes'])}")
    for k, v in info["details"].items():
        print(f"  {k}: {v}")
    print_dropped(info["dropped"])
