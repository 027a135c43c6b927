"""Every file ckpt-ir reads, replaced by a FIFO (``open`` would wait for a writer for ever) or
a symlink to ``/dev/zero`` (reads without end; a ``.metadata`` so linked grew to 7 GB): one
``CheckpointError`` line, at once, in bounded memory; through the CLI, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt_ir
from ckpt_ir.errors import CheckpointError
from ckpt_ir.safety.files import open_fd, read_text
from tests.hostile import UNTRUSTED, Untrusted, bounded, copy_seed, siblings

REPO = Path(__file__).resolve().parents[2]


def fifo(path: Path) -> None:
    os.mkfifo(path)


def dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


SPECIAL = {"fifo": fifo, "dev-zero": dev_zero}
# Files a checkpoint may lack (verl saves before 2025-06-25 have no fsdp_config.json): one that
# is not a regular file is read as absent.
OPTIONAL = {"metadata.json", "ckpt_contents.json", "fsdp_config.json"}


@pytest.mark.parametrize("kind", sorted(SPECIAL))
@pytest.mark.parametrize("row", UNTRUSTED, ids=lambda r: r.id)
def test_special_files_fail_at_once(row: Untrusted, kind: str, tmp_path: Path) -> None:
    ckpt = copy_seed(row.seed, tmp_path / "ckpt")
    target = ckpt / row.file
    target.unlink()
    SPECIAL[kind](target)
    out = tmp_path / "out"
    with bounded(seconds=20):
        try:
            ckpt_ir.convert(ckpt, out, to=row.to)
        except CheckpointError as e:
            assert "\n" not in str(e)
            assert siblings(out) == []
        else:
            # Optional files: a checkpoint without them reads (with a warning), as this one.
            assert row.file in OPTIONAL and out.is_dir()


@pytest.mark.parametrize("kind", sorted(SPECIAL))
def test_cli_exits_2_on_a_special_metadata_file(kind: str, tmp_path: Path) -> None:
    ckpt = copy_seed("mcore-dist", tmp_path / "ckpt")
    (ckpt / ".metadata").unlink()
    SPECIAL[kind](ckpt / ".metadata")
    for command in (["convert", ckpt, tmp_path / "out", "--to", "hf"], ["inspect", ckpt]):
        run = subprocess.run([sys.executable, "-m", "ckpt_ir", *map(str, command)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert run.returncode == 2, run.stderr
        [line] = run.stderr.splitlines()
        assert line.startswith("ckpt-ir: error: ") and ".metadata" in line


@pytest.mark.parametrize(("kind", "says"), [
    ("fifo", "is not a regular file (a FIFO)"),
    ("dev-zero", "is not a regular file (a character device)"),
])
def test_open_fd_checks_the_descriptor_it_returns(kind: str, says: str, tmp_path: Path) -> None:
    path = tmp_path / "f"
    SPECIAL[kind](path)
    with bounded(seconds=5), pytest.raises(CheckpointError) as info:
        open_fd(path, "config")
    assert str(info.value) == f"config {path} {says}; checkpoint files must be"
    with pytest.raises(CheckpointError, match="is not a regular file \\(a directory\\)"):
        open_fd(tmp_path)


def test_text_files_are_bounded_and_utf8(tmp_path: Path) -> None:
    path = tmp_path / "run_config.yaml"
    path.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(CheckpointError) as info:
        read_text(path, "run_config.yaml")
    assert str(info.value) == f"run_config.yaml is not UTF-8 text (byte 7) [{path}]"
    path.write_bytes(b"x" * 101)
    with pytest.raises(CheckpointError, match="has 101 bytes; at most 100 are accepted"):
        read_text(path, limit=100)
