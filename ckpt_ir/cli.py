"""``ckpt-ir``: the command line. Errors print one line; exit 0 ok, 1 internal, 2 bad input.

Subcommands live in :mod:`ckpt_ir.commands` (one module each) and are imported when parsing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import NoReturn

from ckpt_ir.commands import COMMANDS
from ckpt_ir.errors import CheckpointError, PlanError

__all__ = ["main"]

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2
EXIT_SIGPIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool killed by SIGPIPE
PLAN_PROBLEMS_SHOWN = 10
"""Further plan problems listed after the first; the rest are counted."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's pre-emption), raised like Ctrl-C so every ``finally`` and
    ``except BaseException`` that removes a temporary directory runs."""


class _ArgumentParser(argparse.ArgumentParser):
    """Argument errors as one line (argparse prints the whole usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"ckpt-ir: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_INPUT)


def _modules() -> dict[str, ModuleType]:
    return {name: importlib.import_module(f"ckpt_ir.commands.{name.replace('-', '_')}")
            for name in COMMANDS}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = _ArgumentParser(
        prog="ckpt-ir",
        description="Convert LLM checkpoints between formats through one neutral tensor IR.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = _modules()
    for name, module in modules.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP,
                                            description=module.__doc__))
    return parser, modules


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise (KeyboardInterrupt, _Terminated) from here on; the first one
    also makes further ones wait, so the clean-up it starts is not cut short. The previous
    handlers are restored on leaving (``main`` may run inside a longer-lived process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _committed() -> list:
    executor = sys.modules.get("ckpt_ir.executor")  # not imported: nothing was written
    return list(executor.committed) if executor is not None else []


def _interrupted(e: KeyboardInterrupt, before: int) -> int:
    name, code = ("SIGTERM", 128 + signal.SIGTERM) if isinstance(e, _Terminated) \
        else ("SIGINT", 128 + signal.SIGINT)
    written = _committed()[before:]
    if written:
        print(f"ckpt-ir: interrupted by {name} after {written[-1]} was written",
              file=sys.stderr)
    else:
        print(f"ckpt-ir: interrupted by {name}; nothing was written (temporary files "
              "removed)", file=sys.stderr)
    return code


def _stdout_gone() -> int:
    """The reader of stdout went away (``ckpt-ir ... | head``): stop quietly, as cat does.
    Later writes, and the interpreter's final flush, go to /dev/null instead of raising."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    before = len(_committed())
    with _interruptible():
        try:
            return _main(argv)
        except KeyboardInterrupt as e:  # start-up (importing torch) included
            return _interrupted(e, before)
        except BrokenPipeError:
            return _stdout_gone()


def _print_error(e: CheckpointError) -> None:
    print(f"ckpt-ir: error: {e}", file=sys.stderr)
    if isinstance(e, PlanError) and len(e.problems) > 1:
        further = e.problems[1:]
        for problem in further[:PLAN_PROBLEMS_SHOWN]:
            print(f"ckpt-ir:   also: {problem}", file=sys.stderr)
        if len(further) > PLAN_PROBLEMS_SHOWN:
            print(f"ckpt-ir:   ... and {len(further) - PLAN_PROBLEMS_SHOWN} more "
                  f"({len(e.problems)} problems in all)", file=sys.stderr)


def _main(argv: Sequence[str] | None) -> int:
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
        _print_error(e)
        return EXIT_INPUT
    except (KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception as e:  # our bug: one line, traceback with --debug
        if args.debug:
            raise
        print(f"ckpt-ir: internal error: {type(e).__name__}: {e} (rerun with --debug for a "
              "traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    from ckpt_ir.distributed import env_world

    exit_code = getattr(module, "exit_code", None)
    code = exit_code(result) if exit_code is not None else EXIT_OK
    if env_world()[0] != 0:
        return code  # under torchrun only rank 0 reports
    if args.json:
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        module.show(result)
    sys.stdout.flush()  # a closed pipe shows here, inside main, not at interpreter exit
    return code


if __name__ == "__main__":
    sys.exit(main())
