"""Execute a validated plan: stream units from a reader through transforms into a writer.

Memory holds one unit at a time (the plan's ``peak_bytes``); tensors read from mmap-backed
files stay views until a transform needs a copy. Output goes to a temporary sibling directory
that replaces the destination only after the writer has fsynced everything.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from ckpt_ir.errors import (
    CheckpointError,
    DestinationError,
    DestinationExistsError,
    InternalError,
)
from ckpt_ir.ir import TensorSpec
from ckpt_ir.planner import Plan, Unit
from ckpt_ir.slabs import FileSlab
from ckpt_ir.transforms import join_rows, rows_shape

__all__ = ["TEMP_MARKER", "atomic_directory", "execute", "fsync_dir", "write_checkpoint"]

log = logging.getLogger(__name__)

TEMP_MARKER = ".ckpt-ir-tmp-"
"""Temporary output directories are named ``.<dest name>.ckpt-ir-tmp-<pid>-<id>``."""


def execute(plan: Plan, reader, writer, *,
            on_progress: Callable[[int], None] | None = None,
            units: Iterable[Unit] | None = None, begin: bool = True) -> None:
    """Run the units of ``plan``: read sources, invert their transforms, apply the targets'.

    ``units`` restricts the run to a subset (one rank's share in a distributed conversion,
    whose writer was begun by the caller: ``begin=False``).
    """
    specs = {s.name: s for s in plan.dest_specs}
    # Writers that stream take a destination tensor as the row-major slabs of its transform
    # (a fused QKV as its q/k/v row blocks), so it is never built here.
    write_slabs = getattr(writer, "write_slabs", None)
    # Slabs that are byte ranges of a mapped source file go to such writers as FileSlabs,
    # copied by the kernel (ckpt_ir.slabs).
    locate = getattr(reader, "locate", None) \
        if getattr(writer, "accepts_file_slabs", False) else None
    if begin:
        writer.begin(plan.dest_specs)
    with _SourceFiles() as files:
        for unit in plan.units if units is None else units:
            _run_unit(unit, reader, writer, specs, write_slabs,
                      None if locate is None else lambda t: files.slab(t, locate))
            if on_progress is not None:
                on_progress(unit.bytes_written)


def _run_unit(unit: Unit, reader, writer, specs: dict[str, TensorSpec], write_slabs,
              file_slab: Callable[[torch.Tensor], FileSlab | None] | None) -> None:
    """Read a unit's sources, invert their transforms, write every destination tensor."""
    # IR tensors as row blocks: views of the source where a part is strided in it (q/k/v of a
    # fused QKV), joined only for a target that needs the whole tensor.
    ir: dict[str, tuple[torch.Tensor, ...]] = {}
    for b in unit.sources:
        native = reader.read(b.native)
        for role, rows in b.transform.inverse_rows(native).items():
            ir[b.ir[role]] = rows
    for b in unit.targets:
        blocks = {role: ir[name] for role, name in b.ir.items()}
        spec = specs[b.native]
        if write_slabs is not None:
            shape = b.transform.shapes({role: rows_shape(rows) for role, rows in blocks.items()})
            if tuple(shape) != spec.shape:
                raise InternalError(f"{b.native}: parts make shape {tuple(shape)}, "
                                    f"planned {spec.shape}")
            slabs = _cast(b.transform.row_slabs(blocks), spec.dtype)
            if file_slab is not None:
                slabs = (file_slab(t) or t for t in slabs)
            write_slabs(b.native, slabs)
            continue
        out = b.transform.apply({role: join_rows(rows) for role, rows in blocks.items()})
        if out.dtype != spec.dtype:
            out = out.to(spec.dtype)
        if tuple(out.shape) != spec.shape:
            raise InternalError(f"{b.native}: produced shape {tuple(out.shape)}, "
                                f"planned {spec.shape}")
        writer.write(b.native, out)
    del ir
    reader.release()


class _SourceFiles:
    """Read-only descriptors of the source files that FileSlabs point into, closed at the end."""

    _SMALL = 1 << 20  # below this a slab is cheaper to write from memory than to locate

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def slab(self, tensor: torch.Tensor,
             locate: Callable[[torch.Tensor], tuple[Path, int] | None]) -> FileSlab | None:
        """``tensor`` as a range of the source file holding it, if it is one and large."""
        nbytes = tensor.numel() * tensor.element_size()
        where = locate(tensor) if nbytes >= self._SMALL else None
        if where is None:
            return None
        path, offset = where
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return FileSlab(fd, offset, nbytes, tensor.dtype)

    def __enter__(self) -> _SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def _cast(slabs: Iterable[torch.Tensor], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Each slab in ``dtype``, one at a time (a cast never holds more than one slab)."""
    for slab in slabs:
        yield slab if slab.dtype == dtype else slab.to(dtype)


def write_checkpoint(plan: Plan, reader, writer_cls, config, options,
                     dest: str | os.PathLike, *, overwrite: bool, protect: tuple[Path, ...],
                     on_progress: Callable[[int], None] | None = None) -> list[str]:
    """Execute ``plan`` into ``dest`` atomically (temporary sibling, fsync, rename).

    Returns the files written, relative to ``dest``. The writer is aborted and the temporary
    directory removed on any failure; ``dest`` is then left as it was.
    """
    with atomic_directory(dest, overwrite=overwrite, protect=protect) as tmp:
        writer = writer_cls(tmp, config, options)
        try:
            execute(plan, reader, writer, on_progress=on_progress)
            writer.finish(reader)
        except BaseException:
            writer.abort()
            raise
        return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stale_temps(dest: Path) -> list[Path]:
    prefix = f".{dest.name}{TEMP_MARKER}"
    if not dest.parent.is_dir():
        return []
    return [p for p in dest.parent.iterdir() if p.name.startswith(prefix)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(dest: Path) -> list[str]:
    """Remove temp dirs left by killed runs for ``dest`` (their pid is gone); report them."""
    removed = []
    for p in _stale_temps(dest):
        try:
            pid = int(p.name.rsplit(TEMP_MARKER, 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
            log.warning("removed %s left behind by an interrupted run", p)
        else:
            log.warning("left %s alone: process %d, which is writing it, is still running",
                        p, pid)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or filesystem cannot (the caller falls back to two
    renames); other failures raise OSError.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, *, overwrite: bool = False,
                     protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``dest``; rename it onto ``dest`` on success.

    ``protect`` lists source paths the destination must neither be nor contain nor be inside.
    On any exception the temporary directory is removed and ``dest`` is left as it was.
    """
    dest = Path(dest).absolute()
    for src in protect:
        src = src.resolve()
        d = dest.resolve() if dest.exists() else dest
        if d == src or src in d.parents or d in src.parents:
            raise DestinationExistsError(
                f"destination {dest} overlaps the source {src}; ckpt-ir never writes into "
                "its source", path=dest)
    if dest.exists() and not overwrite:
        raise DestinationExistsError(f"destination {dest} exists (pass --overwrite to replace "
                                     "it)", path=dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(dest)
        tmp = dest.parent / f".{dest.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise _os_error(e, dest) from e
    try:
        yield tmp
        fsync_dir(tmp)
        if dest.exists():
            # One atomic swap: at every instant `dest` is the old checkpoint or the new one.
            # Two renames would leave neither there if the process died between them. After
            # the swap `tmp` holds the old one (a kill before it is removed leaves a stale
            # temp dir for the next run to clean).
            if _exchange(tmp, dest):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                trash = dest.parent / f".{dest.name}{TEMP_MARKER}{os.getpid()}-old"
                os.replace(dest, trash)
                os.replace(tmp, dest)
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(e, dest) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _os_error(e: OSError, dest: Path) -> CheckpointError:
    if e.errno == errno.ENOSPC:
        return DestinationError(f"no space left on the device holding {dest}", path=dest)
    if e.errno == errno.EFBIG:
        return DestinationError(f"cannot write {dest}: a file reached the size limit "
                                f"(ulimit -f) or the filesystem's largest file", path=dest)
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DestinationError(f"cannot write {dest}: {os.strerror(e.errno)}", path=dest)
    return DestinationError(f"cannot write {dest}: {e.strerror or e}", path=dest)
