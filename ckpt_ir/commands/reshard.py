"""``ckpt-ir reshard SRC DST --tp N --pp N ...``: rewrite a per-rank checkpoint at a new layout.

The destination is in the source's own format (verl-legacy era A is rewritten as era B, the
only era verl's loader still reads). Flags not given keep the source's values; a new ``--pp``
resets ``--vpp`` to 1 and the stages to even unless those are given too. The vocabulary keeps
the source's padding (``--pad-vocab-to-multiple`` changes it). torch_dist (``mcore-dist``)
checkpoints are layout-free: megatron-core reshards them on load, so there is nothing to do.
"""

from __future__ import annotations

import argparse
from typing import Any

from ckpt_ir.commands import add_common, add_layout_options, layout_fields
from ckpt_ir.commands.convert import add_run_options, convert_with_progress
from ckpt_ir.commands.convert import show as show_conversion
from ckpt_ir.errors import FormatError

NAME = "reshard"
HELP = "rewrite a per-rank checkpoint (verl-legacy, megatron-legacy) at another parallel layout"

LAYOUT_FREE = ("SRC is a torch_dist (mcore-dist) checkpoint: its tensors are stored whole and "
               "megatron-core reshards them on load for any TP/PP/VPP/EP, so there is nothing "
               "to reshard. Nothing was written.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="cast floating-point weights (default: keep the source dtypes)")
    p.add_argument("--pad-vocab-to-multiple", type=int, metavar="N",
                   help="pad the vocabulary to a multiple of N (default: keep the source's "
                        "padded vocabulary; 1 removes the padding)")
    p.add_argument("--mcore-spec", choices=("any", "local", "te"), default="any",
                   help="layer spec whose norm names and _extra_state keys to write (default: "
                        "the source's)")
    add_run_options(p)
    add_layout_options(p, what="the new layout")
    add_common(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ckpt_ir.detect import resolve
    from ckpt_ir.formats import PER_RANK_FORMATS

    resolved = resolve(args.src)
    if resolved.format == "mcore-dist":
        return {"source": args.src, "source_format": "mcore-dist", "resharded": False,
                "message": LAYOUT_FREE.replace("SRC", args.src)}
    if resolved.format not in PER_RANK_FORMATS:
        raise FormatError(
            f"{args.src} is {resolved.format}, which has no parallel layout; write a per-rank "
            f"checkpoint with `ckpt-ir convert SRC DST --to verl-legacy|megatron-legacy --tp N "
            f"--pp N`", path=args.src)
    if not layout_fields(args):
        raise FormatError("nothing to reshard: give the new layout (--tp, --pp, --vpp, --ep, "
                          "--etp, --first-stage-layers, --last-stage-layers)")
    result = convert_with_progress(args, to=resolved.format)
    result["resharded"] = True
    return result


def show(r: dict[str, Any]) -> None:
    if not r["resharded"]:
        print(r["message"])
        return
    show_conversion(r)
