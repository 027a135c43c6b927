"""``tools/setup.sh`` says what it does, and the package metadata builds without warnings.

The set-up script is run in a copy of the repository whose ``.venv`` is already set up (its
stamp matches), so nothing is installed; the build check reads what setuptools reads.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_setup_prints_one_line_per_step(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / "tools" / "setup.sh", tmp_path / "tools" / "setup.sh")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()
                            + (REPO / "constraints.txt").read_bytes()).hexdigest()[:16]
    (tmp_path / ".venv" / ".ckpt-ir-setup").write_text(f"{digest} torch==2.13.0\n")
    r = subprocess.run(["bash", "tools/setup.sh"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["setup: .venv is up to date"] and r.stderr == ""


def test_license_is_an_spdx_expression_setuptools_accepts() -> None:
    """A TOML-table ``license`` makes setuptools >= 77 warn on every build; the SPDX string
    needs setuptools >= 77 in the isolated build environment."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]
    assert not any(c.startswith("License ::") for c in project["project"].get("classifiers", []))
