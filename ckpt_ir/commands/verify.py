"""``ckpt-ir verify A B``: are two checkpoints (any formats, any layouts) the same model?

Exit 0 when they are equal within tolerance (bit-identical by default), 1 when they differ,
2 when either cannot be read. ``ckpt-ir verify --roundtrip SRC --via FORMAT`` converts SRC to
FORMAT and back in a temporary directory and checks both results against SRC.
"""

from __future__ import annotations

import argparse
from typing import Any

from ckpt_ir.commands import add_common, add_layout_options, layout_fields
from ckpt_ir.errors import CheckpointError

NAME = "verify"
HELP = "compare two checkpoints tensor by tensor (exit 0 equal, 1 different, 2 bad input)"

# Options of `convert` that a round trip passes to the conversion into --via: the flags, help
# and choices are taken from the convert command itself. The parallel layout (--tp, --pp, ...)
# comes with add_layout_options.
ROUNDTRIP_OPTIONS = ("pad_vocab_to_multiple", "max_shard_size", "mcore_spec")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ckpt_ir.commands import convert

    p.add_argument("paths", nargs="*", metavar="A B",
                   help="the reference checkpoint A and the checkpoint B to compare with it")
    p.add_argument("--atol", type=float, default=0.0,
                   help="absolute tolerance (default 0: bit-identical)")
    p.add_argument("--rtol", type=float, default=0.0,
                   help="relative tolerance, of |A| (default 0: bit-identical)")
    p.add_argument("--ignore-dtype", action="store_true",
                   help="a dtype difference alone is not a mismatch (values still compared)")
    p.add_argument("--lora-alpha", type=float, metavar="A",
                   help="LoRA alpha of an adapter side that does not record it (verl's adapter "
                        "files, torch_dist adapters without run_config.yaml)")
    rt = p.add_argument_group("round trip")
    rt.add_argument("--roundtrip", metavar="SRC",
                    help="convert SRC to --via and back to SRC's format, and verify both")
    rt.add_argument("--via", choices=convert.WRITABLE_FORMATS, metavar="FORMAT",
                    help=f"the format to go through ({', '.join(convert.WRITABLE_FORMATS)})")
    rt.add_argument("--workdir", metavar="DIR",
                    help="where the temporary conversions go (default: the system temp dir)")
    probe = argparse.ArgumentParser(add_help=False)
    convert.add_arguments(probe)
    for action in probe._actions:
        if action.dest in ROUNDTRIP_OPTIONS:
            rt._add_action(action)
    add_layout_options(p, what="layout of a per-rank --via format (verl-legacy, "
                       "megatron-legacy)")
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ckpt_ir.verify import roundtrip, verify

    if args.roundtrip is not None:
        if args.paths:
            raise CheckpointError("verify --roundtrip SRC takes no other checkpoint paths")
        if args.via is None:
            raise CheckpointError("verify --roundtrip SRC needs --via FORMAT")
        options = {name: getattr(args, name) for name in ROUNDTRIP_OPTIONS
                   if getattr(args, name, None) is not None}
        options["layout"] = layout_fields(args) or None
        options["source_ep"] = args.source_ep
        report = roundtrip(args.roundtrip, args.via, atol=args.atol, rtol=args.rtol,
                           workdir=args.workdir, hf_config=args.hf_config,
                           trust_pickles=args.trust_pickles, **options)
    else:
        if len(args.paths) != 2:
            raise CheckpointError("verify takes two checkpoints A B, or --roundtrip SRC --via "
                                  "FORMAT")
        report = verify(args.paths[0], args.paths[1], atol=args.atol, rtol=args.rtol,
                        hf_config=args.hf_config, trust_pickles=args.trust_pickles,
                        check_dtype=not args.ignore_dtype, lora_alpha=args.lora_alpha,
                        source_ep=args.source_ep)
    return report.to_dict()


def show(result: dict[str, Any]) -> None:
    from ckpt_ir.verify import render

    print(render(result))


def exit_code(result: dict[str, Any]) -> int:
    return 0 if result["equal"] else 1
