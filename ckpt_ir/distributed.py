"""Several processes converting one checkpoint: ``torchrun --nproc-per-node N -m ckpt_ir convert``.

The validated plan is partitioned by destination file: every file is written by exactly one
rank, and tensors whose format gives each rank a file of its own (torch_dist data files) are
balanced freely. Every rank reads only the sources of its own units, writes only its own files
into a temporary directory rank 0 created on the shared filesystem; after a barrier rank 0
writes the index / ``.metadata`` / ``metadata.json`` last and renames the directory into place.
HF output is byte-identical to a single-process run (same shard packing); torch_dist output
holds identical tensors, spread over ``__<rank>_0.distcp`` data files.

Collectives run over gloo (CPU); a shared filesystem is assumed across nodes.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_ir.errors import CheckpointError, FormatError, InternalError, portable_error

if TYPE_CHECKING:
    from ckpt_ir.planner import Plan

__all__ = ["env_world", "partition_units", "run_distributed"]

log = logging.getLogger(__name__)


def env_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise FormatError(f"RANK / WORLD_SIZE are not integers: {e}") from e


def partition_units(plan: Plan, file_of: Callable[[str], str | None],
                    world_size: int) -> list[list[int]]:
    """Unit indices per rank. Units sharing a destination file stay on one rank; groups are
    assigned largest first to the least-loaded rank (bytes written), deterministically."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner_of_file: dict[str, int] = {}
    for i, unit in enumerate(plan.units):
        find(i)
        for target in unit.targets:
            f = file_of(target.native)
            if f is None:
                continue
            if f in owner_of_file:
                parent[find(i)] = find(owner_of_file[f])
            else:
                owner_of_file[f] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(plan.units)):
        groups.setdefault(find(i), []).append(i)
    ordered = sorted(groups.values(),
                     key=lambda g: (-sum(plan.units[i].bytes_written for i in g), g[0]))
    heap = [(0, r) for r in range(world_size)]
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for group in ordered:
        load, rank = heapq.heappop(heap)
        shares[rank].extend(group)
        heapq.heappush(heap, (load + sum(plan.units[i].bytes_written for i in group), rank))
    return [sorted(s) for s in shares]


@contextlib.contextmanager
def _process_group() -> Iterator[Any]:
    """``torch.distributed``, with the default process group initialised (gloo) if the caller
    has none; a group created here is destroyed on leaving. Without that, gloo's worker threads
    outlive the interpreter's finalisation and a rank can die with SIGABRT ("terminate called
    without an active exception") after a successful conversion (pytorch #179291, #190489)."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    try:
        yield dist
    finally:
        if created:
            dist.destroy_process_group()


def run_distributed(plan: Plan, reader, writer_cls, options, dst: str | os.PathLike, *,
                    overwrite: bool, protect: Sequence[Path],
                    on_progress: Callable[[int], None] | None = None,
                    replaceable: Callable[[Path], bool] | None = None) -> list[str]:
    """Execute ``plan`` on this rank's share; returns the output files (rank 0) or [].
    ``replaceable``: see :func:`ckpt_ir.executor.atomic_directory`."""
    with _process_group() as dist:
        return _run(dist, plan, reader, writer_cls, options, dst, overwrite=overwrite,
                    protect=protect, on_progress=on_progress, replaceable=replaceable)


def _run(dist: Any, plan: Plan, reader, writer_cls, options, dst: str | os.PathLike, *,
         overwrite: bool, protect: Sequence[Path], on_progress: Callable[[int], None] | None,
         replaceable: Callable[[Path], bool] | None) -> list[str]:
    # Here, not at the top: the CLI imports this module for env_world(), and `ckpt-ir --help`
    # must not import torch (the executor does).
    from ckpt_ir.capabilities import PartitionedWriter
    from ckpt_ir.executor import atomic_directory, execute

    rank, world = dist.get_rank(), dist.get_world_size()
    if not issubclass(writer_cls, PartitionedWriter):
        raise FormatError(f"format {writer_cls.format!r} cannot be written by several "
                          "processes yet")
    with contextlib.ExitStack() as stack:
        # Rank 0 owns the destination: it checks it, creates the temporary sibling and tells
        # the others where it is (or why there is none).
        message: list[Any] = [None]
        if rank == 0:
            try:
                message[0] = str(stack.enter_context(
                    atomic_directory(dst, overwrite=overwrite, protect=tuple(protect),
                                     replaceable=replaceable)))
            except CheckpointError as e:
                message[0] = e
        dist.broadcast_object_list(message, src=0)
        if isinstance(message[0], BaseException):
            raise message[0]
        tmp = Path(message[0])
        opts = replace(options, rank=rank, world_size=world)
        writer = writer_cls(tmp, reader.config, opts, plan.dest_params)
        outcome: Any
        try:
            writer.begin(plan.dest_specs)
            share = partition_units(plan, writer.file_of, world)[rank]
            execute(plan, reader, writer, units=[plan.units[i] for i in share], begin=False,
                    on_progress=on_progress)
            outcome = ("ok", writer.finish_rank())
        except Exception as e:  # reported to rank 0, which aborts the whole output
            writer.abort()
            outcome = ("error", portable_error(e))
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(outcome, gathered, dst=0)
        failure: list[Any] = [None]
        if rank == 0:
            assert gathered is not None
            errors = [(r, o[1]) for r, o in enumerate(gathered) if o[0] == "error"]
            if errors:
                failure[0] = errors[0][1]
            else:
                try:
                    writer.finish_all(reader, [o[1] for o in gathered])
                except Exception as e:
                    failure[0] = portable_error(e)
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            # Leaving the ExitStack with an exception makes rank 0 remove the temp directory.
            err = failure[0]
            raise err if isinstance(err, BaseException) else InternalError(str(err))
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) \
            if rank == 0 else []
    dist.barrier()  # the rename on rank 0 is done before anyone reports success
    return files
