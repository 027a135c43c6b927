"""One module per ``ckpt-ir`` subcommand.

Each module defines ``NAME``, ``HELP``, ``add_arguments(parser)``, ``run(args) -> dict`` (the
JSON-able result; raise :class:`ckpt_ir.errors.CheckpointError` for bad input) and
``show(result)`` (the human-readable rendering). Optionally ``exit_code(result) -> int`` for
commands whose success is not binary (``verify`` exits 1 when checkpoints differ).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

__all__ = ["COMMANDS", "LAYOUT_FIELDS", "add_common", "add_layout_options", "human_bytes",
           "layout_fields", "print_dropped"]

# Module names under ckpt_ir.commands, in the order `ckpt-ir --help` lists them.
COMMANDS = ("inspect", "convert", "reshard", "verify", "extract-adapter", "merge-adapter")

# --flag -> ParallelLayout field
LAYOUT_FIELDS = {"tp": "tp", "pp": "pp", "vpp": "vpp", "ep": "ep", "etp": "etp",
                 "first_stage_layers": "first_stage_layers",
                 "last_stage_layers": "last_stage_layers"}


def add_common(p: argparse.ArgumentParser) -> None:
    """Options every command takes."""
    p.add_argument("--hf-config", metavar="DIR",
                   help="directory with the HF config.json (and tokenizer) to use")
    p.add_argument("--trust-pickles", action="store_true",
                   help="DANGEROUS: unpickle input files without the allow-list; a malicious "
                        "checkpoint can then run code. Only for files you produced yourself.")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def add_layout_options(p: argparse.ArgumentParser, *, what: str) -> None:
    """The parallel-layout flags of per-rank destinations (verl-legacy, megatron-legacy)."""
    g = p.add_argument_group("parallel layout", f"{what}; flags not given keep the source's "
                             "value for per-rank sources (a new --pp resets --vpp to 1 and the "
                             "stages to even), else 1")
    g.add_argument("--tp", type=int, metavar="N", help="tensor-parallel size")
    g.add_argument("--pp", type=int, metavar="N", help="pipeline-parallel size")
    g.add_argument("--vpp", type=int, metavar="N",
                   help="virtual pipeline chunks per pipeline rank (interleaved schedule)")
    g.add_argument("--ep", type=int, metavar="N", help="expert-parallel size (MoE models)")
    g.add_argument("--etp", type=int, metavar="N",
                   help="expert tensor-parallel size (default: the TP size; 1 for biased "
                        "experts, gpt-oss)")
    g.add_argument("--first-stage-layers", type=int, metavar="N",
                   help="layers on the first pipeline stage (uneven pipeline)")
    g.add_argument("--last-stage-layers", type=int, metavar="N",
                   help="layers on the last pipeline stage (uneven pipeline)")
    p.add_argument("--source-ep", type=int, metavar="N",
                   help="expert-parallel size of a per-rank source whose mp_rank_TT_NNN "
                        "directory names could number pipeline or expert ranks")


def layout_fields(args: argparse.Namespace) -> dict[str, int]:
    """The layout flags the user gave, as ParallelLayout fields."""
    return {field: getattr(args, flag) for flag, field in LAYOUT_FIELDS.items()
            if getattr(args, flag, None) is not None}


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def print_dropped(dropped: Mapping[str, Any]) -> None:
    reasons: dict[str, int] = {}
    for why in dropped.values():
        reasons[why] = reasons.get(why, 0) + 1
    for why, n in sorted(reasons.items()):
        print(f"  skipped {n} entr{'y' if n == 1 else 'ies'}: {why}")
