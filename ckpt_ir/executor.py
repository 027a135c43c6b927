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
import signal
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from ckpt_ir.capabilities import FileSlabWriter, LocatingReader, RowsReader, SlabWriter
from ckpt_ir.durable import fsync_dir
from ckpt_ir.errors import (
    CheckpointError,
    DestinationError,
    DestinationExistsError,
    InternalError,
)
from ckpt_ir.ir import TensorSpec
from ckpt_ir.planner import Plan, Unit
from ckpt_ir.readahead import Readahead
from ckpt_ir.safety.files import open_fd
from ckpt_ir.slabs import FileSlab
from ckpt_ir.transforms import TENSOR, Identity, join_rows, rows_shape

__all__ = ["TEMP_MARKER", "atomic_directory", "committed", "destination_path", "execute",
           "fsync_dir", "remove_entry", "write_checkpoint"]

log = logging.getLogger(__name__)

TEMP_MARKER = ".ckpt-ir-tmp-"
"""Temporary output directories are named ``.<dest name>.ckpt-ir-tmp-<pid>-<id>``."""


def execute(plan: Plan, reader, writer, *,
            on_progress: Callable[[int], None] | None = None,
            units: Iterable[Unit] | None = None, begin: bool = True,
            readahead: Readahead | None = None) -> None:
    """Run the units of ``plan``: read sources, invert their transforms, apply the targets'.

    ``units`` restricts the run to a subset (one rank's share in a distributed conversion,
    whose writer was begun by the caller: ``begin=False``). ``readahead``: one the caller
    started for these units (before importing torch); by default a reader that can say where
    its bytes are gets one here (:mod:`ckpt_ir.readahead`).
    """
    todo = list(plan.units if units is None else units)
    if readahead is None:
        with Readahead.for_units(reader, todo) as own:
            _execute(plan, reader, writer, todo, on_progress, begin, own)
    else:
        _execute(plan, reader, writer, todo, on_progress, begin, readahead)


def _execute(plan: Plan, reader, writer, units: list[Unit],
             on_progress: Callable[[int], None] | None, begin: bool,
             readahead: Readahead) -> None:
    specs = {s.name: s for s in plan.dest_specs}
    # Writers that stream take a destination tensor as the row-major slabs of its transform
    # (a fused QKV as its q/k/v row blocks), so it is never built here.
    write_slabs = writer.write_slabs if isinstance(writer, SlabWriter) else None
    # Slabs that are byte ranges of a mapped source file go to such writers as FileSlabs,
    # copied by the kernel (ckpt_ir.slabs).
    locate = reader.locate if isinstance(writer, FileSlabWriter) \
        and isinstance(reader, LocatingReader) else None
    if begin:
        writer.begin(plan.dest_specs)
    with _SourceFiles() as files:
        for unit in units:
            _run_unit(unit, reader, writer, specs, write_slabs,
                      None if locate is None else lambda t: files.slab(t, locate))
            readahead.unit_done()
            if on_progress is not None:
                on_progress(unit.bytes_written)


def _run_unit(unit: Unit, reader, writer, specs: dict[str, TensorSpec], write_slabs,
              file_slab: Callable[[torch.Tensor], FileSlab | None] | None) -> None:
    """Read a unit's sources, invert their transforms, write every destination tensor."""
    # IR tensors as row blocks: views of the source where a part is strided in it (q/k/v of a
    # fused QKV), joined only for a target that needs the whole tensor.
    ir: dict[str, tuple[torch.Tensor, ...]] = {}
    for b in unit.sources:
        # A source stored as row chunks (FSDP2's DCP) goes on as those chunks when nothing
        # transforms it: no assembled copy, and each chunk can be a FileSlab.
        rows = reader.read_rows(b.native) if isinstance(reader, RowsReader) \
            and isinstance(b.transform, Identity) else None
        if rows is not None:
            ir[b.ir[TENSOR]] = rows
            continue
        native = reader.read(b.native)
        for role, rows in b.transform.inverse_rows(native).items():
            ir[b.ir[role]] = rows
    for b in unit.targets:
        blocks = {role: ir[name] for role, name in b.ir.items()}
        spec = specs[b.native]
        dtype = spec.dtype.torch  # planned as a DType; the tensors' side of the boundary
        if b.transform.arithmetic:
            blocks = {role: tuple(_widened(t, dtype) for t in rows)
                      for role, rows in blocks.items()}
        if write_slabs is not None:
            shape = b.transform.shapes({role: rows_shape(rows) for role, rows in blocks.items()})
            if tuple(shape) != spec.shape:
                raise InternalError(f"{b.native}: parts make shape {tuple(shape)}, "
                                    f"planned {spec.shape}")
            slabs = _cast(b.transform.row_slabs(blocks), dtype)
            if file_slab is not None:
                slabs = (file_slab(t) or t for t in slabs)
            write_slabs(b.native, slabs)
            continue
        out = b.transform.apply({role: join_rows(rows) for role, rows in blocks.items()})
        if out.dtype != dtype:
            out = out.to(dtype)
        if tuple(out.shape) != spec.shape:
            raise InternalError(f"{b.native}: produced shape {tuple(out.shape)}, "
                                f"planned {spec.shape}")
        writer.write(b.native, out)
    del ir
    reader.release()


def _widened(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` cast up to a wider floating ``dtype`` (exact); otherwise as it is."""
    if t.is_floating_point() and dtype.is_floating_point and dtype.itemsize > t.element_size():
        return t.to(dtype)
    return t


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
            # Opened again by name: the entry must still be a regular file (not a FIFO).
            fd = self._fds[path] = open_fd(path)
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
                     on_progress: Callable[[int], None] | None = None,
                     replaceable: Callable[[Path], bool] | None = None,
                     readahead: Readahead | None = None) -> list[str]:
    """Execute ``plan`` into ``dest`` atomically (temporary sibling, fsync, rename).

    Returns the files written, relative to ``dest``. The writer is aborted and the temporary
    directory removed on any failure; ``dest`` is then left as it was. ``replaceable``: see
    :func:`atomic_directory`; ``readahead``: see :func:`execute`.
    """
    with atomic_directory(dest, overwrite=overwrite, protect=protect,
                          replaceable=replaceable) as tmp:
        writer = writer_cls(tmp, config, options, plan.dest_params)
        try:
            execute(plan, reader, writer, on_progress=on_progress, readahead=readahead)
            writer.finish(reader)
        except BaseException:
            writer.abort()
            raise
        return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())


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


def remove_entry(path: Path) -> None:
    """Delete ``path`` without following it: a symlink or file is unlinked (its target is
    never touched), a real directory removed with its contents. ``shutil.rmtree`` refuses a
    symlink, which ``ignore_errors`` would turn into an entry left behind forever."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_temps(dest: Path) -> list[str]:
    """Remove temp dirs left by killed runs for ``dest`` (their pid is gone); report them."""
    removed = []
    for p in _stale_temps(dest):
        try:
            pid = int(p.name.rsplit(TEMP_MARKER, 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            remove_entry(p)
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


def destination_path(dest: str | os.PathLike) -> Path:
    """``dest`` with every directory above it resolved (symlinks, ``..``), its last component
    kept as given: what the kernel will actually write. ``LINK/out`` with ``LINK`` a symlink to
    the source is ``SRC/out``; ``sib/../SRC/out`` is ``SRC/out`` too (``mkdir -p`` would make
    ``sib`` and then write into ``SRC``). The last component is not followed: a destination
    that is itself a symlink is replaced as a link, its target never written or deleted."""
    path = Path(dest)
    try:
        if path.name in ("", "..") or path.name != os.path.basename(
                os.fspath(dest).rstrip("/")):
            path = path.resolve()  # "/", ".", "x/..": nothing to keep unresolved
        return path.parent.resolve() / path.name
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise DestinationError(f"cannot resolve the destination {dest}: {e}",
                               path=os.fspath(dest)) from e


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or b in a.parents or a in b.parents


def _check_overlap(dest: Path, tmp_name: str, protect: tuple[Path, ...]) -> None:
    """The destination, where it leads if it is a symlink, and the temporary sibling must be
    neither a source nor inside one nor contain one, all compared resolved."""
    try:
        written = (dest, dest.resolve(), dest.parent / tmp_name)
        sources = [Path(src).resolve() for src in protect]
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise DestinationError(f"cannot resolve {dest} or its source: {e}", path=dest) from e
    for src in sources:
        if any(_overlaps(w, src) for w in written):
            raise DestinationExistsError(
                f"destination {dest} overlaps the source {src}; ckpt-ir never writes into "
                "its source", path=dest)


def _existing(dest: Path, overwrite: bool, replaceable: Callable[[Path], bool] | None) -> bool:
    """Whether ``dest`` exists and will be replaced; raises where it must not be.

    An empty directory is taken as it is. ``--overwrite`` replaces a symlink (the link, never
    its target) or a directory ``replaceable`` says holds a checkpoint ckpt-ir recognises
    (without ``replaceable``, none); a directory holding anything else, a file or a special
    file is never deleted.
    """
    try:
        st = dest.lstat()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise _os_error(e, dest) from e
    exists = DestinationExistsError(f"destination {dest} exists (pass --overwrite to replace "
                                    "it)", path=dest)
    if stat.S_ISLNK(st.st_mode):
        if not overwrite:
            raise exists
        return True
    if not stat.S_ISDIR(st.st_mode):
        raise DestinationExistsError(f"destination {dest} exists and is not a directory; "
                                     "ckpt-ir replaces only a checkpoint directory or an empty "
                                     "one", path=dest)
    try:
        entries = sorted(p.name for p in dest.iterdir())
    except OSError as e:
        raise _os_error(e, dest) from e
    if not entries:
        return True
    if replaceable is None or not replaceable(dest):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3
                                          else "")
        raise DestinationExistsError(
            f"destination {dest} holds files that are not a checkpoint ckpt-ir recognises "
            f"({shown}); it replaces only a checkpoint or an empty directory: move them or "
            "choose another destination", path=dest)
    if not overwrite:
        raise exists
    return True


committed: list[Path] = []
"""Destinations this process renamed into place, in order: the CLI tells an interrupt that
came after the rename (the destination is written) from one before it (nothing is)."""

_COMMIT_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the few system calls of the commit, so that an interrupt falls
    before the rename (temporary removed, destination as it was) or after it is recorded in
    :data:`committed`, never in between. A held signal is delivered on leaving."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _COMMIT_SIGNALS)
    except (AttributeError, OSError, ValueError):  # no pthread_sigmask here
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, *, overwrite: bool = False,
                     protect: tuple[Path, ...] = (),
                     replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``dest``; rename it onto ``dest`` on success.

    Paths are compared resolved (:func:`destination_path`): ``protect`` lists source paths the
    destination, its symlink target and the temporary sibling must neither be nor contain nor
    be inside. An existing ``dest`` is replaced only as :func:`_existing` allows:
    ``replaceable(dest)`` decides whether a non-empty directory holds a checkpoint (the caller
    knows the formats; this module does not). On any
    exception (SIGINT and SIGTERM included, see ckpt_ir.cli) the temporary directory is removed
    and ``dest`` is left as it was.
    """
    dest = destination_path(dest)
    tmp_name = f".{dest.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _check_overlap(dest, tmp_name, protect)
    _existing(dest, overwrite, replaceable)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(dest)
        tmp = dest.parent / tmp_name
        tmp.mkdir()
    except OSError as e:
        raise _os_error(e, dest) from e
    try:
        yield tmp
        fsync_dir(tmp)
        with _signals_held():
            # again: it may have appeared meanwhile
            replaced = _existing(dest, overwrite, replaceable)
            if replaced:
                # One atomic swap: at every instant `dest` is the old entry or the new one.
                # Two renames would leave neither there if the process died between them.
                # After the swap `tmp` holds the old entry (a kill before it is removed leaves
                # a stale temp for the next run to clean).
                if not _exchange(tmp, dest):
                    trash = dest.parent / f".{dest.name}{TEMP_MARKER}{os.getpid()}-old"
                    os.replace(dest, trash)
                    try:
                        os.replace(tmp, dest)
                    except BaseException:
                        os.replace(trash, dest)  # put the old one back
                        raise
                    tmp = trash
            else:
                os.replace(tmp, dest)
            committed.append(dest)
        # From here `tmp` is the old entry (replaced) or gone (renamed into place).
        remove_entry(tmp)
        fsync_dir(dest.parent)
    except OSError as e:
        remove_entry(tmp)
        raise _os_error(e, dest) from e
    except BaseException:
        remove_entry(tmp)
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
