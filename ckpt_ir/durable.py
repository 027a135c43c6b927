"""Durable writes: the one home for fsync-a-file, fsync-a-directory and write-then-rename.

A checkpoint counts only once its bytes and its directory entries are on disk, so every writer
(the executor's rename, the DCP ``.metadata`` commit, the manager's manifest and tracker, the
small JSON side files) goes through these few helpers instead of each repeating the
open/flush/fsync/replace dance. The core may import this module; it imports nothing of ckpt-ir.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["SyncBehind", "atomic_write", "close_file", "fsync_dir", "fsync_tree",
           "start_writeback", "sync_file", "write_json", "write_synced"]

WRITEBACK_MIN = 1 << 20
"""Ranges smaller than this are left to the file's final fsync (one syscall per small tensor
would cost more than it overlaps)."""


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``: the data writers fsync their own files,
    but small side files (copied tokenizer, configs) and new directory entries must be durable
    too before a manifest vouches for them. Cheap for files already fsynced."""
    for d, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(d) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(d))


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` of ``fd`` from ``offset`` to disk now,
    without waiting: ``sync_file_range(SYNC_FILE_RANGE_WRITE)``.

    A converter writes a destination file front to back and fsyncs it at the end; left alone,
    the kernel keeps those pages dirty until the fsync (a few GB stay under its background
    threshold), so the fsync then waits for the whole file. Started per written range, the
    disk writes while the next ranges are copied, and the fsync finds little left (2 GiB here:
    the final fsync 0.9-1.2 s -> 0.03 s). Advice only: the fsync still makes the file durable
    and reports any error, so a failure here is ignored, as where the call does not exist.
    """
    if nbytes < WRITEBACK_MIN:
        return
    sync_range = _sync_file_range()
    if sync_range is not None:
        sync_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2
_SYNC_RANGE: list[Any] = []


def _sync_file_range() -> Any:
    # Python's os module has no sync_file_range; glibc has had it since 2.6 (Linux 2.6.17).
    # ctypes releases the GIL around the call, like os.fsync.
    if not _SYNC_RANGE:
        fn = None
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):  # not Linux/glibc: the fsync does all the work
            fn = None
        _SYNC_RANGE.append(fn)
    return _SYNC_RANGE[0]


def sync_file(file: IO[Any]) -> None:
    """Flush Python's buffer and fsync the file's data."""
    file.flush()
    os.fsync(file.fileno())


def close_file(file: IO[Any], *, fsync: bool = True) -> None:
    """Flush, fsync (unless ``fsync=False``: an aborted write) and close ``file``; it is
    closed even when the flush or the fsync fails."""
    try:
        file.flush()
        if fsync:
            os.fsync(file.fileno())
    finally:
        file.close()


def write_synced(path: Path, data: str | bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` and fsync the file (not its directory: the caller's commit
    step, a rename or a later :func:`fsync_tree`, makes the entry durable)."""
    mode = ("x" if exclusive else "w") + ("b" if isinstance(data, bytes) else "")
    with open(path, mode) as f:
        f.write(data)
        sync_file(f)


def write_json(path: Path, data: Any, *, sort_keys: bool = False) -> None:
    """``data`` as indented JSON with a final newline, fsynced (see :func:`write_synced`)."""
    write_synced(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def atomic_write(path: Path, data: str | bytes, *, tmp: Path) -> None:
    """Write ``path`` so a reader sees the old content or the new, never a torn file: the
    temporary sibling ``tmp`` (created exclusively, removed on failure), fsync, ``os.replace``,
    fsync of the directory. The caller names ``tmp`` because its clean-up code recognises its
    own temporary names."""
    try:
        write_synced(tmp, data, exclusive=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class SyncBehind:
    """Finish files (fsync, close) on one background thread while the caller fills the next.

    A writer that closes each output file as it completes would otherwise wait for the disk
    file by file: with the fsync behind it, the kernel writes one file back while the next
    one is being copied, as a single ``sync`` after ``cp -r`` lets it. ``drain`` waits for
    every handed-over finish and raises the first error, so a commit (rename, index) that
    comes after ``drain`` still finds every file durable. The thread is started on first use,
    in the process that writes (never before a fork), and exits when idle.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None

    def hand_over(self, finish: Callable[[], None]) -> None:
        """Run ``finish`` (a file's fsync and close) behind the caller, in hand-over order."""
        with self._lock:
            self._queue.append(finish)
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ckpt-ir-sync",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    self._idle.set()
                    return
                finish = self._queue.pop(0)
            try:
                finish()
            except BaseException as exc:  # reported by drain(), on the caller's thread
                with self._lock:
                    if self._error is None:
                        self._error = exc

    def drain(self) -> None:
        """Wait until every handed-over file is finished; raise the first failure."""
        self._idle.wait()
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error
