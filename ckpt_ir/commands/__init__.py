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

__all__ = ["COMMANDS", "add_common", "human_bytes", "print_dropped"]

# Module names under ckpt_ir.commands, in the order `ckpt-ir --help` lists them.
COMMANDS = ("inspect", "convert")


def add_common(p: argparse.ArgumentParser) -> None:
    """Options every command takes."""
    p.add_argument("--hf-config", metavar="DIR",
                   help="directory with the HF config.json (and tokenizer) to use")
    p.add_argument("--trust-pickles", action="store_true",
                   help="DANGEROUS: unpickle input files without the allow-list; a malicious "
                        "checkpoint can then run code. Only for files you produced yourself.")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


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
