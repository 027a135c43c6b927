"""Checkpoints damaged in transit (a truncated shard, a shard missing from the index, a DCP
data file cut short, ...) and pickles that would run code: ``ckpt-ir convert`` exits 2 with one
line naming the file, and leaves no destination behind. The cases are ``DAMAGE`` and
``PICKLE_SITES`` in ``tests/hostile.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_ir.cli import main
from tests.hostile import DAMAGE, PAYLOADS, PICKLE_SITES, Damage, copy_seed, siblings

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda d: d.id)
def test_damaged_input_exits_2_naming_the_file(damage: Damage, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = copy_seed(damage.seed, tmp_path / "ckpt")
    damage.apply(ckpt / damage.file)
    out = tmp_path / "out"
    code = main(["convert", str(ckpt), str(out), "--to", damage.to, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    [line] = err.splitlines()
    assert line.startswith("ckpt-ir: error: ") and damage.file in line
    assert siblings(out) == []
    code = main(["verify", str(ckpt), str(ckpt)])
    [line] = capsys.readouterr().err.splitlines()
    assert code == 2 and damage.file in line


def test_damage_and_malicious_pickles_end_to_end(tmp_path: Path) -> None:
    """The same through a real process: exit status, stderr, nothing written, nothing run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    damage = DAMAGE[0]
    cut = copy_seed(damage.seed, tmp_path / "cut")
    damage.apply(cut / damage.file)
    site = PICKLE_SITES[0]
    evil = copy_seed(site.seed, tmp_path / "evil")
    cls, name = PAYLOADS["system"]
    site.plant(evil, cls(tmp_path / "SENTINEL"))
    runs = [subprocess.Popen([sys.executable, "-m", "ckpt_ir", "convert", str(src),
                              str(tmp_path / f"{src.name}-out"), "--to", to],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for src, to in ((cut, damage.to), (evil, site.to))]
    results = [(r.wait(timeout=120), *r.communicate()) for r in runs]
    for code, out, err in results:
        assert (code, out) == (2, ""), err
        assert len(err.splitlines()) == 1 and err.startswith("ckpt-ir: error: ")
    assert damage.file in results[0][2]
    assert f"refusing to unpickle global '{name}' in {evil / '.metadata'}" in results[1][2]
    assert not (tmp_path / "SENTINEL").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "evil"]
