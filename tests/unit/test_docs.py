"""docs/architectures.md is generated from the tables and must not go stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_architecture_doc_matches_tables():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "gen_docs.py"), "--check"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
