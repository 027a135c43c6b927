"""The public entry points: load a pickle, a ``torch.save`` file or a range of one, restricted
by default, trusted (logged) on request.

Part of :mod:`ckpt_ir.safety.unpickler`; its docstring states the trust model."""

from __future__ import annotations

import io
import logging
import mmap
import os
import pickle
from typing import Any, BinaryIO

from ckpt_ir import dcp_types
from ckpt_ir.errors import CorruptCheckpointError
from ckpt_ir.safety.files import open_regular
from ckpt_ir.safety.unpickler.allow_list import _NeedsTorch
from ckpt_ir.safety.unpickler.archive import _Archive, _where
from ckpt_ir.safety.unpickler.machine import _unpickle

logger = logging.getLogger(__name__)

_WARNED: set[str] = set()


def _warn_trusted(where: str, path: str | None = None) -> None:
    # Once per file: a DCP reader with trust loads hundreds of archives from one .distcp.
    key = where if path is None else path
    if key in _WARNED:
        return
    if len(_WARNED) < 4096:
        _WARNED.add(key)
    logger.warning("trust_pickles: unpickling %s without restrictions; code in it will run",
                   where)


def load_pickle(data: bytes | bytearray | memoryview | BinaryIO, *, path: str | None = None,
                trust: bool = False, torch_free: bool = False) -> Any:
    """Unpickle a plain pickle (DCP ``.metadata``) through the allow-list.

    Args:
        data: the pickle bytes, or a binary file positioned at its start.
        path: shown in error messages and stored on raised errors.
        trust: use plain :func:`pickle.loads` (runs code from the file; logs a warning).
        torch_free: metadata mode, for a pickle read only as metadata: ``torch.Size``,
            ``torch.<dtype>`` and the strided layout come back as tuples,
            :class:`~ckpt_ir.dtypes.DType` and :data:`~ckpt_ir.safety.unpickler.allow_list.
            STRIDED`; a pickle naming any other torch global is loaded in the default mode
            instead (importing torch; see :class:`RestrictedUnpickler`). Ignored with ``trust``.

    Raises:
        UnsafeCheckpointError: a global outside the allow-list; nothing was executed.
        CorruptCheckpointError: truncated or malformed pickle data.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = data.read()
    where = "<memory>" if path is None else path
    if trust:
        _warn_trusted(where)
        return _TrustingUnpickler(io.BytesIO(data)).load()
    if torch_free:
        try:
            return _unpickle(data, where, path, torch_free=True)
        except _NeedsTorch:
            pass  # names a torch global metadata mode has no rule for: the default's rules
    return _unpickle(data, where, path)


class _TrustingUnpickler(pickle.Unpickler):
    """Plain unpickling (anything goes), with DCP's metadata classes built as ckpt-ir's
    mirrors, so trusted and restricted loads return the same types."""

    def find_class(self, module: str, name: str) -> Any:
        mirror = _DCP_MIRRORS.get((module, name))
        return mirror if mirror is not None else super().find_class(module, name)


_DCP_MIRRORS = {real: cls for cls, real in dcp_types.DCP_CLASSES.items()}


def load_torch(path: str | os.PathLike[str], *, offset: int = 0, length: int | None = None,
               trust: bool = False) -> Any:
    """Load a ``torch.save`` archive: a whole file or the one at ``[offset, offset + length)``.

    Tensors are zero-copy views of a private mmap of the file (in-place edits never reach the
    file). Works for every dtype, views sharing a storage and nested containers.

    Raises:
        UnsafeCheckpointError: a global outside the allow-list; nothing was executed.
        CorruptCheckpointError: truncated archive, bad records, malformed pickle.
        FormatError: a pre-1.6 (non-zip) torch file or a big-endian archive.
    """
    name = os.fspath(path)
    if trust:
        with open_regular(name) as file:
            size = os.fstat(file.fileno()).st_size
        length = size - offset if length is None else length
        _check_range(name, size, offset, length)
        _warn_trusted(_where(name, offset, length, offset == 0 and length == size), name)
        import torch

        if offset == 0 and length == size:
            return torch.load(name, map_location="cpu", weights_only=False, mmap=True)
        with open_regular(name) as file:
            file.seek(offset)
            return torch.load(io.BytesIO(file.read(length)), map_location="cpu",
                              weights_only=False)
    return load_torch_buffer(map_file(name), offset=offset, length=length, path=name)


def map_file(path: str | os.PathLike[str]) -> mmap.mmap:
    """A private, copy-on-write mmap of a whole file, as :func:`load_torch_buffer` wants it.

    Readers that take many archives from one file (DCP ``.distcp``) map it once. Never close
    the map while tensors from it are alive: tensors hold a buffer export, so ``close`` then
    raises ``BufferError``; dropping the reference is enough.
    """
    name = os.fspath(path)
    try:
        with open_regular(name) as file:
            if os.fstat(file.fileno()).st_size == 0:
                raise CorruptCheckpointError(f"{name} is empty", path=name)
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read {name}: {exc}", path=name) from exc


def load_torch_buffer(buffer: mmap.mmap | bytearray, *, offset: int = 0,
                      length: int | None = None, path: str | None = None,
                      metadata_only: bool = False) -> Any:
    """Restricted load of the ``torch.save`` archive at ``buffer[offset:offset + length]``.

    Tensors are views of ``buffer`` (keep it writable-private: :func:`map_file` or a
    ``bytearray``). ``path`` names the file in errors. ``metadata_only``: tensors come back
    as :class:`~ckpt_ir.safety.unpickler.records.TensorRecord` (shape, stride, ``DType``,
    where the bytes are), after the same checks, without importing torch; an archive whose
    pickle names a torch global metadata mode has no rule for is loaded as tensors instead.
    """
    size = len(buffer)
    length = size - offset if length is None else length
    name = "<memory>" if path is None else path
    _check_range(name, size, offset, length)
    where = _where(path, offset, length, offset == 0 and length == size)
    if length == 0:
        raise CorruptCheckpointError(f"{where} is empty", path=path)
    return _Archive(buffer, offset, length, where, path).load(metadata_only=metadata_only)


def _check_range(name: str, size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise CorruptCheckpointError(
            f"bytes [{offset}, {offset + length}) lie outside {name} ({size} bytes)", path=name)


def load_torch_bytes(data: bytes | bytearray | memoryview, *, path: str | None = None,
                     trust: bool = False) -> Any:
    """:func:`load_torch` for an archive held in memory (small DCP byte objects).

    The data is copied once into a private buffer that the returned tensors share.
    """
    where = "<memory>" if path is None else path
    if trust:
        _warn_trusted(where)
        import torch

        return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=False)
    return load_torch_buffer(bytearray(data), path=path)
