"""Reading ahead of the executor: the kernel is asked for the next units' source bytes while
the current one is transformed and written.

The kernel's own readahead follows one file's sequential reads. It does not know that a fresh
``ckpt-ir convert`` spends its first 1.3-1.9 s importing torch with the disk idle, nor where
the next unit's tensors lie when a unit jumps between files or between records of a
``.distcp`` file. A reader that can say where a tensor's bytes are (:class:`RangeReader`)
lets a background thread issue ``posix_fadvise(POSIX_FADV_WILLNEED)`` for the plan's units in
the order they will run: the reads start asynchronously, and the executor later finds the pages
in the page cache. The thread stays at most ``window`` bytes ahead of the executor, so what it
fetched is not evicted before it is used, and a conversion's page-cache footprint stays bounded.

Advice only: nothing here reads data into this process, holds memory or fails a conversion (an
``OSError`` ends the readahead, not the run). Implemented here rather than with a library
because it is one system call in a loop; no torch, so it can start before torch is imported.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from ckpt_ir.capabilities import RangeReader
from ckpt_ir.planner import Unit

__all__ = ["WINDOW", "Readahead", "unit_ranges"]

log = logging.getLogger(__name__)

WINDOW = 1 << 30
"""Bytes the readahead may be ahead of the executor: more than a disk reads while torch is
imported (1.3-1.9 s at under 0.6 GB/s here), well below the RAM of a machine that converts."""

ByteRange = tuple[Path, int, int]


def unit_ranges(reader: RangeReader, units: Iterable[Unit]) -> list[tuple[ByteRange, ...]]:
    """The source byte ranges of each unit, merged where they touch, in the units' order."""
    out = []
    for unit in units:
        ranges: list[ByteRange] = []
        for b in unit.sources:
            ranges.extend(reader.byte_ranges(b.native))
        out.append(_merged(ranges))
    return out


def _merged(ranges: Sequence[ByteRange]) -> tuple[ByteRange, ...]:
    out: list[ByteRange] = []
    for path, start, length in sorted(ranges):
        if out and out[-1][0] == path and start <= out[-1][1] + out[-1][2]:
            p, s, n = out[-1]
            out[-1] = (p, s, max(s + n, start + length) - s)
        else:
            out.append((path, start, length))
    return tuple(out)


class Readahead:
    """Advise the kernel of ``units`` (each a sequence of byte ranges) in order, at most
    ``window`` bytes ahead of the units reported done with :meth:`unit_done`.

    Use as a context manager (``with Readahead(...) as ahead:``) or :meth:`start` /
    :meth:`close`; a unit larger than the window is advised alone when its turn comes.
    """

    def __init__(self, units: Sequence[Sequence[ByteRange]], window: int = WINDOW) -> None:
        self._units = units
        # _before[i]: the bytes of the units before unit i.
        self._before = [0]
        for ranges in units:
            self._before.append(self._before[-1] + sum(n for _, _, n in ranges))
        self._window = window
        self._done = 0  # units the executor finished
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_units(cls, reader: object, units: Iterable[Unit]) -> Readahead:
        """A readahead of ``units``' sources, or an idle one for a reader that cannot say
        where its bytes are (not a :class:`RangeReader`)."""
        return cls(unit_ranges(reader, units) if isinstance(reader, RangeReader) else ())

    def start(self) -> Readahead:
        if self._thread is None and self._units:
            self._thread = threading.Thread(target=self._run, name="ckpt-ir-readahead",
                                            daemon=True)
            self._thread.start()
        return self

    def unit_done(self) -> None:
        """The executor finished its next unit (units finish in the order given)."""
        with self._cond:
            self._done += 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Readahead:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _advise(fd: int, start: int, length: int) -> None:
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)

    def _may_advise(self, i: int) -> bool:
        """Unit ``i`` is the executor's current one, or fits in the window ahead of it."""
        done = self._done
        return self._closed or i <= done \
            or self._before[i + 1] - self._before[done] <= self._window

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        try:
            for i, ranges in enumerate(self._units):
                with self._cond:
                    self._cond.wait_for(lambda i=i: self._may_advise(i))
                    if self._closed:
                        return
                    if i < self._done:  # the executor is past it
                        continue
                for path, start, length in ranges:
                    fd = fds.get(path)
                    if fd is None:
                        fd = fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    self._advise(fd, start, length)
        except OSError as e:  # advice only: the executor reads (and reports) for itself
            log.debug("readahead stopped: %s", e)
        finally:
            for fd in fds.values():
                os.close(fd)
