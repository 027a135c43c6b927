"""Writing behind the copy: ``SyncBehind`` fsyncs and closes output files behind the writing
of the next ones (a conversion still commits only durable files), and ``start_writeback``
starts the disk on ranges already written."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

import ckpt_ir
from ckpt_ir.converters.storage import safetensors_file
from ckpt_ir.durable import WRITEBACK_MIN, SyncBehind, start_writeback
from ckpt_ir.errors import CheckpointError
from tests.fixtures import TINY_LLAMA, write_hf


def test_finishes_run_in_order_and_drain_waits_for_every_one() -> None:
    done: list[int] = []
    gate = threading.Event()

    def finish(i: int) -> None:
        if i == 0:
            gate.wait(5)  # the first file's fsync is slow: the caller goes on meanwhile
        done.append(i)

    behind = SyncBehind()
    for i in range(4):
        behind.hand_over(lambda i=i: finish(i))
    assert done == []  # nothing finished while the first one is held
    gate.set()
    behind.drain()
    assert done == [0, 1, 2, 3]
    behind.hand_over(lambda: done.append(4))  # usable again after draining
    behind.drain()
    assert done == [0, 1, 2, 3, 4]


def test_drain_raises_the_first_failure_after_finishing_the_rest() -> None:
    finished: list[str] = []

    def fail(what: str) -> None:
        finished.append(what)
        raise OSError(errno.EIO, f"fsync of {what} failed")

    behind = SyncBehind()
    behind.hand_over(lambda: fail("a"))
    behind.hand_over(lambda: fail("b"))
    behind.hand_over(lambda: finished.append("c"))
    with pytest.raises(OSError, match="fsync of a failed"):
        behind.drain()
    assert finished == ["a", "b", "c"]  # every file was still closed
    behind.drain()  # the error was reported once


def test_a_shard_whose_fsync_fails_fails_the_conversion_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    write_hf(src, TINY_LLAMA)
    dst = tmp_path / "out"
    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard's
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    # Small shards so that the conversion writes several files.
    monkeypatch.setattr(safetensors_file.os, "fsync", failing_fsync)
    with pytest.raises(CheckpointError) as info:  # typed: the CLI's one line, exit 2
        ckpt_ir.convert(src, dst, "hf", max_shard_size=64 * 1024)
    assert "Input/output error" in str(info.value)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_start_writeback_is_advice_that_never_fails_or_changes_bytes(tmp_path: Path) -> None:
    data = os.urandom(WRITEBACK_MIN) * 3
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.pwrite(fd, data, 0)
        start_writeback(fd, 0, len(data))
        start_writeback(fd, 100, 10)  # below the minimum: left to the fsync
        start_writeback(fd, len(data), WRITEBACK_MIN)  # past the end: nothing to write
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    r, w = os.pipe()  # not a file: the kernel says ESPIPE, which the advice ignores
    try:
        start_writeback(w, 0, WRITEBACK_MIN)
    finally:
        os.close(r)
        os.close(w)
