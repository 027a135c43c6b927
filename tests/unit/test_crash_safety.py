"""Crash safety of ``ckpt-ir convert``: killed runs, read-only and full destinations.

* SIGKILL at seeded random moments of a running conversion (both directions, fresh and
  ``--overwrite`` destinations): the destination is absent or complete and verifies against the
  source, the source's bytes never change, and the next run removes what the killed one left.
* A read-only destination (a read-only bind mount), a full one (a tiny tmpfs) and a file-size
  limit (``RLIMIT_FSIZE``): exit 2, one line, nothing left behind. We run as root, for whom
  permission bits stop nothing, so the mounts live in a private mount namespace of the child
  (``unshare --mount``): real ``EROFS`` / ``ENOSPC`` from the kernel, gone with the process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import ckpt_ir
from ckpt_ir import executor
from ckpt_ir.executor import TEMP_MARKER
from tests.fixtures import TINY_LLAMA, write_hf

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-m", "ckpt_ir"]

# ~210 MB of bf16: a conversion runs ~2.5 s here, ~0.5 s of it writing the destination (the
# rest is starting Python and torch, planning and exiting).
BIG = dict(TINY_LLAMA, num_hidden_layers=8, hidden_size=1024, num_attention_heads=16,
           num_key_value_heads=4, head_dim=64, intermediate_size=2816, vocab_size=8000)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def temps(dest: Path) -> list[Path]:
    """Temporary directories of runs writing ``dest`` (live or left behind)."""
    return sorted(dest.parent.glob(f".{dest.name}{TEMP_MARKER}*"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crash")
    write_hf(root / "hf", BIG, shards=3)
    ckpt_ir.convert(root / "hf", root / "mcore-dist", to="mcore-dist")
    return {"hf": root / "hf", "mcore-dist": root / "mcore-dist"}


# --------------------------------------------------------------------------------------------
# SIGKILL


def start(src: Path, dest: Path, to: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "convert", str(src), str(dest), "--to", to, "--overwrite",
                             "--no-progress", "--max-shard-size", "20MB"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], limit: float = 60.0) -> float:
    """Poll until ``ready()`` or the run ends; returns when that was (monotonic seconds)."""
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.002)
    return time.monotonic()


def writing(dest: Path, before: list[Path]) -> Callable[[], bool]:
    """Whether a new run has made its temporary directory for ``dest``: it is writing."""
    return lambda: any(p not in before for p in temps(dest))


def check_destination(src: Path, dest: Path) -> str:
    if not dest.exists():
        return "absent"
    report = ckpt_ir.verify(src, dest)
    assert report.equal, report.summary()
    return "complete"


def written(directory: Path) -> int:
    """Bytes allocated under ``directory`` (safetensors shards are pre-sized sparse files, so
    their apparent size says nothing about progress)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):  # the run renames things as we look
                total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def progressed(dest: Path, left: list[Path], target: float) -> bool:
    """Whether the run writing ``dest`` has written ``target`` bytes; past the total, whether
    it has put its output in place (its temp dir is gone, the destination there)."""
    mine = [p for p in temps(dest) if p not in left]
    if mine:
        return written(mine[0]) >= target
    return dest.exists()


def kill_at_random_moments(src: Path, dest: Path, to: str, seed: int, kills: int
                           ) -> list[tuple[float, int, str]]:
    """``kills`` runs of one direction, each killed once a random fraction of the output is
    written (past 1: after the destination appeared); then an API run to the same place."""
    rng = random.Random(seed)
    total = written(src)
    # Stratified, so that early, late and after-the-rename moments all occur.
    fractions = [(k + rng.random()) * 1.15 / kills for k in range(kills)]
    rng.shuffle(fractions)
    outcomes = []
    for i, fraction in enumerate(fractions):
        # Every other run writes a fresh destination; the others --overwrite a complete one.
        if i % 2 == 0:
            subprocess.run(["rm", "-rf", str(dest)], check=True)
        elif not dest.exists():
            ckpt_ir.convert(src, dest, to=to)
        left = temps(dest)
        proc = start(src, dest, to)
        wait_for(proc, writing(dest, left))
        wait_for(proc, functools.partial(progressed, dest, left, fraction * total))
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read()
        outcomes.append((round(fraction, 3), code, check_destination(src, dest)))
        # The killed run had started writing, so it had already removed its predecessor's
        # leftovers, and said so.
        assert not set(left) & set(temps(dest)), (left, temps(dest))
        if left:
            assert "left behind by an interrupted run" in stderr, stderr
    ckpt_ir.convert(src, dest, to=to, overwrite=True)  # the next run cleans up too
    assert temps(dest) == []
    assert check_destination(src, dest) == "complete"
    return outcomes


def test_sigkill_at_random_moments_leaves_old_new_or_nothing(sources: dict[str, Path],
                                                             tmp_path: Path) -> None:
    hashes = {name: tree_hash(path) for name, path in sources.items()}
    # The two directions run side by side: most of a run is starting Python and torch.
    with ThreadPoolExecutor(2) as pool:
        runs = {to: pool.submit(kill_at_random_moments, sources[src], tmp_path / f"to-{to}",
                                to, seed, 6)
                for seed, (src, to) in enumerate([("hf", "mcore-dist"), ("mcore-dist", "hf")])}
        outcomes = {to: run.result() for to, run in runs.items()}
    kills = [o for runs in outcomes.values() for o in runs if o[1] == -signal.SIGKILL]
    assert len(kills) >= 10, outcomes
    assert {o[2] for o in kills} == {"absent", "complete"}, outcomes  # both moments were hit
    assert {name: tree_hash(path) for name, path in sources.items()} == hashes


def test_stale_temp_dirs_are_removed_only_when_their_process_is_gone(
        sources: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dest = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out{TEMP_MARKER}{dead.pid}-deadbeef"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    live = tmp_path / f".out{TEMP_MARKER}{os.getpid()}-cafecafe"
    live.mkdir()
    ckpt_ir.convert(sources["mcore-dist"], dest, to="hf")
    assert not stale.exists()
    assert live.exists()  # another run (here: this process) may still be writing it
    assert f"removed {stale} left behind by an interrupted run" in caplog.text
    assert f"left {live} alone: process {os.getpid()}" in caplog.text


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces_the_destination_in_one_swap(tiny: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        exchange: bool) -> None:
    dest = tmp_path / "out"
    ckpt_ir.convert(tiny["mcore-dist"], dest, to="hf")
    (dest / "old-marker").write_text("old")
    swaps: list[bool] = []
    real = executor._exchange

    def spy(a: Path, b: Path) -> bool:
        swaps.append(real(a, b) if exchange else False)
        return swaps[-1]

    monkeypatch.setattr(executor, "_exchange", spy)
    ckpt_ir.convert(tiny["mcore-dist"], dest, to="hf", overwrite=True)
    # Here (Linux, ext4 or tmpfs) the swap is atomic: no instant without a destination.
    assert swaps == [exchange]
    assert not (dest / "old-marker").exists() and temps(dest) == []
    assert ckpt_ir.verify(tiny["mcore-dist"], dest).equal


# --------------------------------------------------------------------------------------------
# Read-only, full, size-limited destinations


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    write_hf(root / "hf")
    ckpt_ir.convert(root / "hf", root / "mcore-dist", to="mcore-dist")
    return {"hf": root / "hf", "mcore-dist": root / "mcore-dist"}


DIRECTIONS = [("hf", "mcore-dist"), ("mcore-dist", "hf")]


def convert_both_ways(tiny: dict[str, Path], parent: Path) -> tuple[list[str], list[Path]]:
    """A command converting each source of ``tiny`` into ``parent``, through the CLI's
    ``main`` in one interpreter (one start of Python and torch, not one per direction); it
    prints each exit status."""
    dests = [parent / f"to-{to}" for _, to in DIRECTIONS]
    runs = [["convert", str(tiny[src]), str(dest), "--to", to, "--no-progress"]
            for (src, to), dest in zip(DIRECTIONS, dests, strict=True)]
    code = ("from ckpt_ir.cli import main\n"
            f"for args in {runs!r}:\n    print('EXIT', main(args), flush=True)\n")
    return [sys.executable, "-c", code], dests


def in_mount_namespace(setup: str, command: list[str], listing: Path
                       ) -> subprocess.CompletedProcess:
    """Run ``command`` after ``setup`` (mount commands) in a private mount namespace, then
    list ``listing`` from inside it (a tmpfs and its contents vanish with the namespace)."""
    script = (f"{setup} || exit 99; {shlex.join(command)}; "
              f"echo LISTING; ls -A {shlex.quote(str(listing))}")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], env=ENV, capture_output=True, text=True, timeout=120)


def test_read_only_destination_is_one_line_and_leaves_nothing(
        tiny: dict[str, Path], tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    command, dests = convert_both_ways(tiny, parent)
    p = shlex.quote(str(parent))
    r = in_mount_namespace(f"mount --bind {p} {p} && mount -o remount,bind,ro {p}", command,
                           parent)
    assert r.stdout == "EXIT 2\nEXIT 2\nLISTING\n", (r.stdout, r.stderr)
    assert r.stderr.splitlines() == [
        f"ckpt-ir: error: cannot write {dest}: Read-only file system" for dest in dests]
    assert list(parent.iterdir()) == []


def test_full_destination_is_one_line_and_leaves_nothing(
        tiny: dict[str, Path], tmp_path: Path) -> None:
    parent = tmp_path / "full"
    parent.mkdir()
    command, dests = convert_both_ways(tiny, parent)
    # 48 KiB holds the directories and part of the ~95 KiB of weights: ENOSPC mid-write. The
    # listing comes from inside the namespace: the partial temp dirs must be gone.
    r = in_mount_namespace(f"mount -t tmpfs -o size=48k tmpfs {shlex.quote(str(parent))}",
                           command, parent)
    assert r.stdout == "EXIT 2\nEXIT 2\nLISTING\n", (r.stdout, r.stderr)
    assert r.stderr.splitlines() == [
        f"ckpt-ir: error: no space left on the device holding {dest}" for dest in dests]


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (40 * 1024, 40 * 1024))


def test_file_size_limit_is_one_line_and_leaves_nothing(tiny: dict[str, Path],
                                                        tmp_path: Path) -> None:
    command, dests = convert_both_ways(tiny, tmp_path)
    r = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120,
                       preexec_fn=_limit_file_size)
    assert r.stdout == "EXIT 2\nEXIT 2\n", (r.stdout, r.stderr)
    assert r.stderr.splitlines() == [
        f"ckpt-ir: error: cannot write {dest}: a file reached the size limit (ulimit -f) or "
        "the filesystem's largest file" for dest in dests]
    assert list(tmp_path.iterdir()) == []
