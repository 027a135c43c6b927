"""``ckpt-ir``: the command line. Errors print one line; exit 0 ok, 1 internal, 2 bad input."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ckpt_ir.errors import CheckpointError, PlanError

__all__ = ["main"]

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2
WRITABLE_FORMATS = ("hf", "mcore-dist")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-config", metavar="DIR",
                   help="directory with the HF config.json (and tokenizer) to use")
    p.add_argument("--trust-pickles", action="store_true",
                   help="DANGEROUS: unpickle input files without the allow-list; a malicious "
                        "checkpoint can then run code. Only for files you produced yourself.")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt-ir",
        description="Convert LLM checkpoints between formats through one neutral tensor IR.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="say what a checkpoint directory holds")
    p.add_argument("src")
    _common(p)

    p = sub.add_parser("convert", help="convert a checkpoint into another format")
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
    _common(p)
    return parser


def _inspect(args: argparse.Namespace) -> dict[str, Any]:
    from ckpt_ir.api import _open_reader
    from ckpt_ir.planner import make_plan

    reader, resolved = _open_reader(args.src, None, hf_config=args.hf_config,
                                    trust_pickles=args.trust_pickles)
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


def _print_inspect(info: dict[str, Any]) -> None:
    print(f"{info['path']}: {info['format']} ({info['layout']})")
    if info["resolved_path"] != info["path"]:
        print(f"  reads from: {info['resolved_path']}")
    for note in info["notes"]:
        print(f"  note: {note}")
    c = info["config"]
    print(f"  architecture: {info['architecture']}  layers={c['num_layers']} "
          f"hidden={c['hidden_size']} heads={c['num_attention_heads']}/"
          f"{c['num_key_value_heads']} head_dim={c['head_dim']} ffn={c['intermediate_size']} "
          f"vocab={c['vocab_size']} tied={c['tie_word_embeddings']}")
    print(f"  tensors: {info['ir_tensors']} logical, {_human(info['ir_bytes'])}, "
          f"dtypes {', '.join(info['dtypes'])}")
    for k, v in info["details"].items():
        print(f"  {k}: {v}")
    if info["dropped"]:
        reasons: dict[str, int] = {}
        for why in info["dropped"].values():
            reasons[why] = reasons.get(why, 0) + 1
        for why, n in sorted(reasons.items()):
            print(f"  skipped {n} entr{'y' if n == 1 else 'ies'}: {why}")


def _convert(args: argparse.Namespace) -> dict[str, Any]:
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


def _print_convert(r: dict[str, Any]) -> None:
    verb = "would write" if r["dry_run"] else "wrote"
    print(f"{r['source']} ({r['source_format']}, {r['source_layout']}) -> {r['destination']} "
          f"({r['dest_format']})")
    print(f"  {r['architecture']}: {verb} {r['tensors_written']} tensors, "
          f"{_human(r['bytes_written'])} (read {_human(r['bytes_read'])}); "
          f"peak unit {_human(r['peak_bytes_estimate'])}; {r['seconds']:.2f} s")
    for note in r["notes"]:
        print(f"  note: {note}")
    if r["dropped"]:
        reasons: dict[str, int] = {}
        for why in r["dropped"].values():
            reasons[why] = reasons.get(why, 0) + 1
        for why, n in sorted(reasons.items()):
            print(f"  skipped {n} entr{'y' if n == 1 else 'ies'}: {why}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="ckpt-ir: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "inspect":
            result = _inspect(args)
            printer = _print_inspect
        else:
            result = _convert(args)
            printer = _print_convert
    except CheckpointError as e:
        if args.debug:
            raise
        print(f"ckpt-ir: error: {e}", file=sys.stderr)
        if isinstance(e, PlanError) and len(e.problems) > 1 and not args.json:
            for problem in e.problems[1:20]:
                print(f"ckpt-ir:   also: {problem}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("ckpt-ir: interrupted; the destination was not written", file=sys.stderr)
        return 130
    except Exception as e:  # our bug: one line, traceback with --debug
        if args.debug:
            raise
        print(f"ckpt-ir: internal error: {type(e).__name__}: {e} (rerun with --debug for a "
              "traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    if args.json:
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        printer(result)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
