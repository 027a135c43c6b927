"""``ckpt-ir``: the command line. Errors print one line; exit 0 ok, 1 internal, 2 bad input.

Subcommands live in :mod:`ckpt_ir.commands` (one module each) and are imported when parsing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from ckpt_ir.commands import COMMANDS
from ckpt_ir.distributed import env_world
from ckpt_ir.errors import CheckpointError, PlanError

__all__ = ["main"]

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2


def _modules() -> dict[str, ModuleType]:
    return {name: importlib.import_module(f"ckpt_ir.commands.{name.replace('-', '_')}")
            for name in COMMANDS}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(
        prog="ckpt-ir",
        description="Convert LLM checkpoints between formats through one neutral tensor IR.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = _modules()
    for name, module in modules.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP,
                                            description=module.__doc__))
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="ckpt-ir: %(levelname)s: %(message)s", stream=sys.stderr)
    module = modules[args.command]
    try:
        result = module.run(args)
    except CheckpointError as e:
        if args.debug:
            raise
        print(f"ckpt-ir: error: {e}", file=sys.stderr)
        if isinstance(e, PlanError) and len(e.problems) > 1:
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
    exit_code = getattr(module, "exit_code", None)
    code = exit_code(result) if exit_code is not None else EXIT_OK
    if env_world()[0] != 0:
        return code  # under torchrun only rank 0 reports
    if args.json:
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        module.show(result)
    return code


if __name__ == "__main__":
    sys.exit(main())
