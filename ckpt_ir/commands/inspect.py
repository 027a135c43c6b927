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
    p.add_argument("--lora-alpha", type=float, metavar="A",
                   help="LoRA alpha of an adapter whose checkpoint does not record it (verl's "
                        "adapter files, torch_dist adapters without run_config.yaml)")
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ckpt_ir.adapter_api import _config_summary, adapter_beside_model, inspect_adapter
    from ckpt_ir.orchestration import adapter_source, open_reader
    from ckpt_ir.planner import SourceView, ir_view, make_plan

    lora_alpha = getattr(args, "lora_alpha", None)
    if adapter_source(args.src) is not None:
        # A PEFT directory, an adapter-only torch_dist, verl's adapter files or LoRA tree.
        return inspect_adapter(args.src, hf_config=args.hf_config, lora_alpha=lora_alpha,
                               trust_pickles=args.trust_pickles)
    reader, resolved = open_reader(args.src, None, hf_config=args.hf_config,
                                   trust_pickles=args.trust_pickles,
                                   source_ep=getattr(args, "source_ep", None),
                                   metadata_only=True)
    try:
        source = SourceView.of(reader)
        plan = make_plan(source, ir_view(source), reader.config)
        cfg = reader.config
        info = {
            "kind": "model",
            "path": str(args.src),
            "resolved_path": str(resolved.path),
            "format": reader.format,
            "layout": resolved.layout,
            "step": resolved.step,
            "notes": list(resolved.notes),
            "tree": [{"path": path, "holds": what} for path, what in resolved.tree],
            "architecture": cfg.architecture,
            "config": _config_summary(cfg),
            "ir_tensors": len(plan.ir_specs),
            "ir_bytes": sum(s.nbytes for s in plan.ir_specs.values()),
            "dtypes": sorted({s.dtype.name for s in plan.ir_specs.values()}),
            "dropped": dict(sorted(plan.dropped.items())),
            "details": reader.describe(),
            "parts": _parts(cfg, plan.ir_specs),
        }
    finally:
        reader.close()
    if resolved.format == "mcore-dist":
        # A base + adapter training checkpoint (Megatron-Bridge, verl with dist_ckpt): the
        # model is what is read; the adapter beside it is described too.
        beside = adapter_beside_model(resolved.path, cfg, lora_alpha=lora_alpha,
                                      trust_pickles=args.trust_pickles)
        if beside is not None:
            info["adapter"] = beside
    return info


def _parts(cfg: Any, specs: Any) -> list[dict[str, Any]]:
    """A multi-part model's parts (a VL model's vision tower, merger...) with their tensors."""
    from ckpt_ir.architectures import lookup
    from ckpt_ir.architectures.vision import part_tensors

    record = lookup(cfg.architecture)
    if record is None or record.parts is None:
        return []
    parts = record.parts(cfg)
    held = part_tensors(parts, specs)
    return [{"part": p.name, "ir": p.ir + "*", "megatron": p.megatron + "*",
             "detail": p.detail, "megatron_note": p.note, "tensors": len(held[p.name]),
             "bytes": sum(specs[n].nbytes for n in held[p.name])} for p in parts]


def show(info: dict[str, Any]) -> None:
    what = "LoRA adapter, " if info.get("kind") == "adapter" else ""
    print(f"{info['path']}: {info['format']} ({what}{info['layout']})")
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
    base = "base model: " if info.get("kind") == "adapter" else ""
    print(f"  {base}architecture: {info['architecture']}  layers={c['num_layers']} "
          f"hidden={c['hidden_size']} heads={c['num_attention_heads']}/"
          f"{c['num_key_value_heads']} head_dim={c['head_dim']} ffn={c['intermediate_size']} "
          f"vocab={c['vocab_size']} tied={c['tie_word_embeddings']}")
    print(f"  tensors: {info['ir_tensors']} logical, {human_bytes(info['ir_bytes'])}, "
          f"dtypes {', '.join(info['dtypes'])}")
    if info.get("parts"):
        print("  parts:")
        for p in info["parts"]:
            note = f"; {p['megatron_note']}" if p["megatron_note"] else ""
            print(f"    {p['part']}: {p['ir']} -> Megatron {p['megatron']} ({p['tensors']} "
                  f"tensors, {human_bytes(p['bytes'])}): {p['detail']}{note}")
    if "adapter" in info:
        show_adapter_facts(info["adapter"])
    for k, v in info["details"].items():
        if k != "adapter":
            print(f"  {k}: {v}")
    print_dropped(info["dropped"])


def show_adapter_facts(a: dict[str, Any]) -> None:
    """The adapter lines of ``inspect``: rank, alpha, targets, Megatron layout."""
    if "error" in a:
        print(f"  LoRA adapter: {a['error']}")
        return
    ranks = a["ranks"]
    print(f"  LoRA adapter: r={a['r']} lora_alpha={a['lora_alpha']:g}"
          f"{' (rsLoRA)' if a['use_rslora'] else ''} on {a['modules']} modules: "
          f"{', '.join(a['target_modules'])}"
          + (f"; ranks {ranks}" if len(ranks) > 1 else ""))
    for key in ("rank_pattern", "alpha_pattern"):
        if a.get(key):
            print(f"    {key}: {a[key]}")
    if a.get("target_parameters"):
        print(f"    target_parameters: {a['target_parameters']} (PEFT LoRA on fused expert "
              "parameters)")
    mega = a.get("megatron")
    if mega:
        print(f"    Megatron-Bridge {'CanonicalLoRA' if mega['style'] == 'canonical' else 'LoRA'}:"
              f" dim={mega['rank']} alpha={mega['alpha']:g} target_modules="
              f"{mega['target_modules']}")
    if a.get("alpha_from"):
        print(f"    alpha from: {a['alpha_from']}")
