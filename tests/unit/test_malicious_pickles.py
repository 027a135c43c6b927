"""A pickle that would run code, hidden in every place ckpt-ir reads a pickle from, is refused
through the public API (``convert``, ``open``, ``verify``) and never runs.

The places and payloads are the tables in ``tests/hostile.py``; a positive control proves each
planted payload is live: ``trust_pickles=True`` (plain unpickling) does run it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

import ckpt_ir
from ckpt_ir.errors import CheckpointError, UnsafeCheckpointError
from tests.fixtures import tree_bytes
from tests.hostile import PAYLOADS, PICKLE_SITES, PickleSite, copy_seed, seed, siblings


def planted(site: PickleSite, payload: str, tmp_path: Path) -> tuple[Path, Path]:
    cls, _ = PAYLOADS[payload]
    sentinel = tmp_path / "SENTINEL"
    ckpt = copy_seed(site.seed, tmp_path / "ckpt")
    site.plant(ckpt, cls(sentinel))
    return ckpt, sentinel


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("site", PICKLE_SITES, ids=lambda s: s.id)
def test_malicious_pickle_is_refused_and_never_runs(site: PickleSite, payload: str,
                                                    tmp_path: Path) -> None:
    ckpt, sentinel = planted(site, payload, tmp_path)
    before = tree_bytes(ckpt)
    refused = f"refusing to unpickle global '{PAYLOADS[payload][1]}' in "
    out = tmp_path / "out"
    with pytest.raises(UnsafeCheckpointError, match=refused) as info:
        ckpt_ir.convert(ckpt, out, to=site.to)
    assert "\n" not in str(info.value) and info.value.path is not None
    if site.model:  # open and verify take models, not LoRA adapters
        with pytest.raises(UnsafeCheckpointError, match=refused):
            ckpt_ir.open(ckpt)
        with pytest.raises(UnsafeCheckpointError, match=refused):
            ckpt_ir.verify(seed(site.seed), ckpt)
    assert not sentinel.exists()
    assert siblings(out) == []
    assert tree_bytes(ckpt) == before


@pytest.mark.parametrize("site", PICKLE_SITES, ids=lambda s: s.id)
def test_trust_pickles_runs_the_payload(site: PickleSite, tmp_path: Path) -> None:
    # The control: the payload above is real, only the allow-list stops it.
    ckpt, sentinel = planted(site, "open", tmp_path)
    with contextlib.suppress(CheckpointError):
        ckpt_ir.convert(ckpt, tmp_path / "out", to=site.to, trust_pickles=True)
    assert sentinel.exists()
