"""Opening checkpoint files: regular files only, checked on the open descriptor.

Every file ckpt-ir reads from a checkpoint goes through :func:`open_fd` (or the helpers built
on it). A name can be anything a directory entry can be: a FIFO blocks ``open`` until a
writer appears (for ever), a symlink to ``/dev/zero`` reads without end, a socket or a
directory fails in ways no reader expects. The check is ``fstat`` on the descriptor that is
then read, not ``stat`` on the name first, so the entry cannot be swapped in between (no
TOCTOU). ``O_NONBLOCK`` keeps the ``open`` itself from blocking on a FIFO; it changes nothing
for regular files.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from ckpt_ir.errors import CorruptCheckpointError

__all__ = ["MAX_TEXT_BYTES", "open_fd", "open_regular", "read_bytes", "read_text"]

MAX_TEXT_BYTES = 64 * 2**20
"""Cap for JSON, YAML and tracker files: real ones are kilobytes (an index of 100,000 tensors
is ~10 MB); the cap keeps a hostile one from sizing a parse by whatever the file holds."""

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def open_fd(path: str | os.PathLike[str], what: str = "") -> int:
    """A read-only descriptor of ``path``, which must be a regular file.

    Args:
        path: the file.
        what: how to name it in errors (``"safetensors file"``); the path is always named.

    Raises:
        CorruptCheckpointError: the file cannot be opened or is not a regular file.
    """
    name = os.fspath(path)
    label = f"{what} {name}" if what else name
    try:
        fd = os.open(name, _FLAGS)
    except OSError as e:
        raise CorruptCheckpointError(f"cannot open {label}: {e.strerror or e}",
                                     path=name) from e
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise CorruptCheckpointError(f"cannot open {label}: {e.strerror or e}",
                                     path=name) from e
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((k for test, k in _KINDS if test(mode)), "not a plain file")
        raise CorruptCheckpointError(f"{label} is not a regular file ({kind}); checkpoint "
                                     f"files must be", path=name)
    return fd


def open_regular(path: str | os.PathLike[str], what: str = "") -> BinaryIO:
    """:func:`open_fd` as a binary file object (closes the descriptor when closed)."""
    return os.fdopen(open_fd(path, what), "rb")


def read_bytes(path: str | os.PathLike[str], what: str = "", *,
               limit: int | None = None) -> bytes:
    """The whole of a regular file; more than ``limit`` bytes is a CorruptCheckpointError."""
    name = os.fspath(path)
    with open_regular(name, what) as file:
        size = os.fstat(file.fileno()).st_size
        if limit is not None and size > limit:
            label = f"{what} {name}" if what else name
            raise CorruptCheckpointError(f"{label} has {size} bytes; at most {limit} are "
                                         f"accepted for this kind of file", path=name)
        try:
            # Read no further than the size seen: a file growing while read is not believed.
            data = file.read(size)
        except OSError as e:
            raise CorruptCheckpointError(f"cannot read {name}: {e.strerror or e}",
                                         path=name) from e
    return data


def read_text(path: str | os.PathLike[str], what: str = "", *,
              limit: int = MAX_TEXT_BYTES) -> str:
    """A small UTF-8 text file (JSON, YAML, tracker); bad UTF-8 is a CorruptCheckpointError."""
    data = read_bytes(path, what, limit=limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        name = os.fspath(path)
        raise CorruptCheckpointError(f"{what or name} is not UTF-8 text (byte {e.start})",
                                     path=name) from e
