"""Several processes converting one checkpoint on one machine: ``convert --workers N``.

The same partition as ``torchrun -m ckpt_ir convert`` (:func:`ckpt_ir.distributed.partition_units`:
whole destination files per process, largest groups first onto the least-loaded one) and the
same writer protocol (``begin`` / ``finish_rank`` on every process, ``finish_all`` on the first),
without torchrun. torchrun starts N fresh interpreters that each import torch, open the source
and plan it again, then meet over gloo: on the machine of issue #19 that fixed cost alone made
2-8 processes slower than one on a conversion the disk already bounds. Here the process that
planned forks its workers after planning: they inherit the imported modules, the plan, the open
reader and the temporary directory, so a worker costs a ``fork`` and nothing is planned twice.
Results (each worker's ``finish_rank`` records) and progress come back over pipes. A rank with
nothing to write (fewer destination files than workers) is not forked: its empty record is made
in the first process.

Threads: GNU OpenMP does not survive ``fork`` once the parent has started its thread pool (a
child that enters a parallel region then waits forever for threads that were not copied), the
reason PyTorch's DataLoader sets one thread in its forked workers. Inside a caller's process we
cannot know whether torch ran a parallel region before, so workers run single-threaded and the
first process too while they run (its thread count is restored afterwards): N processes use N
cores. The ``ckpt-ir`` command knows better: it forks before any tensor work of its process
(planning touches metadata only), so it calls :func:`fork_before_threads` and the processes
share torch's threads out instead (``threads // N`` each). Without that, ``--workers 2`` on a
16-CPU host ran a CPU-bound conversion (FP8 dequantization) on 2 threads instead of one
process's 16: 2.1x slower than one process (docs/scale.md).

A worker that fails reports its error; one that dies (killed, out of memory) is noticed by its
closed pipe. Either way the first process raises, the temporary directory is removed and the
destination is left as it was; workers die with their parent (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

from ckpt_ir.capabilities import PartitionedWriter
from ckpt_ir.distributed import partition_units
from ckpt_ir.errors import FormatError, InternalError, portable_error
from ckpt_ir.executor import atomic_directory, execute
from ckpt_ir.planner import Plan

__all__ = ["run_workers"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def run_workers(plan: Plan, reader, writer_cls, options, dst: str | os.PathLike, *,
                workers: int, overwrite: bool, protect: Sequence[Path],
                on_progress: Callable[[int], None] | None = None,
                replaceable: Callable[[Path], bool] | None = None) -> list[str]:
    """Execute ``plan`` with ``workers`` processes (this one and ``workers - 1`` forks); returns
    the files written, relative to ``dst``. ``replaceable``: see
    :func:`ckpt_ir.executor.atomic_directory`."""
    if workers < 1:
        raise FormatError(f"--workers must be at least 1, not {workers}")
    if not issubclass(writer_cls, PartitionedWriter):
        raise FormatError(f"format {writer_cls.format!r} cannot be written by several "
                          "processes yet")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise FormatError("--workers needs fork(), which this platform lacks; use torchrun")
    with atomic_directory(dst, overwrite=overwrite, protect=tuple(protect),
                          replaceable=replaceable) as tmp:
        first = writer_cls(tmp, reader.config, replace(options, rank=0, world_size=workers),
                           plan.dest_params)
        try:
            first.begin(plan.dest_specs)
            shares = partition_units(plan, first.file_of, workers)
            threads = _threads_per_process(workers)
            with _forked(plan, reader, writer_cls, options, tmp, shares, threads) as pool:
                # Threads stay as they are when no worker was forked (every unit in one
                # destination file, say a small model's single HF shard): one process then
                # runs as a plain conversion would, torch's threads included.
                with _threads(threads) if pool.procs else contextlib.nullcontext():
                    execute(plan, reader, first, units=[plan.units[i] for i in shares[0]],
                            begin=False, on_progress=lambda n: pool.progress(n, on_progress))
                outcomes = [first.finish_rank(), *pool.results(on_progress)]
            first.finish_all(reader, outcomes)
        except BaseException:
            first.abort()
            raise
        return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())


class _Pool:
    """The forked workers of one conversion, seen from the first process."""

    def __init__(self) -> None:
        self.procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self.conns: dict[Connection, int] = {}
        self.outcomes: dict[int, Any] = {}

    def progress(self, n: int, on_progress: Callable[[int], None] | None) -> None:
        """The first process's own progress, and whatever the workers reported meanwhile."""
        if on_progress is not None:
            on_progress(n)
        self._drain(on_progress, block=False)

    def results(self, on_progress: Callable[[int], None] | None) -> list[Any]:
        """Every worker's ``finish_rank`` record, in rank order, once all have finished."""
        while self.conns:
            self._drain(on_progress, block=True)
        return [self.outcomes[r] for r in sorted(self.outcomes)]

    def _drain(self, on_progress: Callable[[int], None] | None, *, block: bool) -> None:
        for conn in wait(list(self.conns), timeout=None if block else 0):
            rank = self.conns[conn]
            try:
                kind, value = conn.recv()
            except EOFError:
                proc = self.procs[rank]
                proc.join()
                raise InternalError(f"worker {rank} exited (code {proc.exitcode}) before "
                                    "reporting; the output was not written") from None
            if kind == "progress":
                if on_progress is not None:
                    on_progress(value)
            elif kind == "error":
                raise value
            else:
                self.outcomes[rank] = value
                del self.conns[conn]
                conn.close()


@contextlib.contextmanager
def _forked(plan: Plan, reader, writer_cls, options, tmp: Path,
            shares: list[list[int]], threads: int) -> Iterator[_Pool]:
    ctx = multiprocessing.get_context("fork")
    pool = _Pool()
    try:
        for rank in range(1, len(shares)):
            if not shares[rank]:
                # Nothing to write (fewer destination files than workers): the rank's empty
                # record is made here rather than by a process forked for it.
                idle = writer_cls(tmp, reader.config,
                                  replace(options, rank=rank, world_size=len(shares)),
                                  plan.dest_params)
                idle.begin(plan.dest_specs)
                pool.outcomes[rank] = idle.finish_rank()
                continue
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, name=f"ckpt-ir-worker-{rank}", daemon=True,
                               args=(plan, reader, writer_cls, options, tmp, rank, len(shares),
                                     shares[rank], threads, send))
            proc.start()
            send.close()
            pool.procs[rank] = proc
            pool.conns[receive] = rank
        yield pool
    finally:
        # After success every worker has reported and is exiting; after a failure those still
        # running are stopped before the temporary directory they write into is removed.
        pending = set(pool.conns.values())
        for rank, proc in pool.procs.items():
            if rank in pending:
                proc.kill()
        for proc in pool.procs.values():
            proc.join()
        for conn in pool.conns:
            conn.close()


def _worker(plan: Plan, reader, writer_cls, options, tmp: Path, rank: int, world: int,
            share: list[int], threads: int, send: Connection) -> None:
    """One forked worker: its writer, its share of the units, its ``finish_rank`` record.
    Results travel over a pipe to the process that forked it (our own objects, pickled by
    ``multiprocessing``; nothing read from a checkpoint is unpickled here)."""
    _die_with_parent()
    # The parent's SIGINT/SIGTERM handlers (ckpt_ir.cli) clean up the parent's temporary
    # directory; a worker just stops, and the parent, seeing it gone, cleans up.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(threads)  # 1 unless the parent never started OpenMP's pool
    writer = writer_cls(tmp, reader.config, replace(options, rank=rank, world_size=world),
                        plan.dest_params)
    try:
        writer.begin(plan.dest_specs)
        execute(plan, reader, writer, units=[plan.units[i] for i in share], begin=False,
                on_progress=lambda n: send.send(("progress", n)))
        send.send(("ok", writer.finish_rank()))
    except BaseException as e:  # reported to the first process, which removes the output
        writer.abort()
        send.send(("error", portable_error(e)))
    finally:
        send.close()


def _die_with_parent() -> None:
    """Linux: a worker is killed when the process that forked it dies, even by SIGKILL, so
    none outlives an aborted conversion writing into a removed directory. Elsewhere the
    daemon flag covers a normal exit only."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_FORK_BEFORE_THREADS = [False]


def fork_before_threads() -> None:
    """Declare that this process has run no torch parallel region and will not before it
    forks its workers (the ``ckpt-ir`` command, before it plans): workers may then use
    torch's threads, ``threads // workers`` each (see the module docstring)."""
    _FORK_BEFORE_THREADS[0] = True


def _threads_per_process(procs: int) -> int:
    # get_num_threads reads the setting; it starts no thread pool.
    if not _FORK_BEFORE_THREADS[0]:
        return 1
    return max(1, torch.get_num_threads() // procs)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
