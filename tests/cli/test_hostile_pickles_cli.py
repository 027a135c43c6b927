"""Pickles shaped to crash or hang whatever touches the result (a 1,000,000-deep tuple used as
a dict key, lists sharing references 60 levels deep): in every place ckpt-ir reads a pickle,
``ckpt-ir`` exits 2 with one line, in a real process (a segfault would be exit 139)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt_ir
from ckpt_ir.errors import CorruptCheckpointError
from tests.fixtures import tree_bytes
from tests.hostile import (
    MEGATRON_RANK,
    PICKLE_SITES,
    SHAPES,
    PickleSite,
    bounded,
    copy_seed,
    plant_opcodes,
    shared_lists,
    siblings,
)

REPO = Path(__file__).resolve().parents[2]
# A .distcp holds many archives at offsets .metadata records; the others are whole files.
SITES = [s for s in PICKLE_SITES if s.id != "distcp-object"]


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckpt_ir", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("site", SITES, ids=lambda s: s.id)
def test_deep_tuple_key_exits_2_at_every_pickle_site(site: PickleSite, tmp_path: Path) -> None:
    ckpt = copy_seed(site.seed, tmp_path / "ckpt")
    plant_opcodes(site, ckpt, SHAPES["deep-key"])
    before = tree_bytes(ckpt)
    out = tmp_path / "out"
    run = cli("convert", ckpt, out, "--to", site.to, "--no-progress")
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.splitlines()
    assert line.startswith("ckpt-ir: error: cannot unpickle ") and (
        "nested more than 200 levels deep" in line)
    assert siblings(out) == [] and tree_bytes(ckpt) == before


@pytest.mark.parametrize("shape", ["deep-list", "shared-lists", "shared-key"])
@pytest.mark.parametrize("site", SITES, ids=lambda s: s.id)
def test_nesting_and_reference_bombs_are_corrupt(site: PickleSite, shape: str,
                                                 tmp_path: Path) -> None:
    ckpt = copy_seed(site.seed, tmp_path / "ckpt")
    plant_opcodes(site, ckpt, SHAPES[shape])
    with bounded(seconds=30), pytest.raises(CorruptCheckpointError, match="cannot unpickle"):
        ckpt_ir.convert(ckpt, tmp_path / "out", to=site.to)
    assert siblings(tmp_path / "out") == []


@pytest.mark.parametrize("value", [pickle.EMPTY_LIST, shared_lists(18)],
                         ids=["list", "shared-lists-18"])
def test_inspect_prints_no_raw_unpickled_value(value: bytes, tmp_path: Path) -> None:
    # Megatron-LM's 'iteration', shown by inspect: an object there (here lists sharing
    # references, 2**18 nodes when printed) is refused, not printed.
    site = next(s for s in SITES if s.id == "megatron-rank.pt")
    ckpt = copy_seed(site.seed, tmp_path / "ckpt")

    def plant(d: Path, payload: object) -> None:
        import torch

        obj = torch.load(d / MEGATRON_RANK, weights_only=False)  # our own file: trusted
        obj["iteration"] = payload
        torch.save(obj, d / MEGATRON_RANK)

    plant_opcodes(PickleSite("iteration", site.seed, plant, site.to), ckpt, value)
    run = cli("inspect", ckpt)
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.splitlines()
    assert "'iteration' is not a non-negative integer" in line and len(run.stdout) < 1000


def _keyed_planter(file: str, inner: str | None) -> object:
    def plant(d: Path, key: object) -> None:
        import torch

        obj = torch.load(d / file, weights_only=False)  # our own file: trusted
        target = obj[0] if isinstance(obj, list) else obj
        target = target[inner] if inner else target
        target[key] = torch.zeros(2)
        torch.save(obj, d / file)

    return plant


@pytest.mark.parametrize("key", [None, 5, (1, 2), b"x", 1.5], ids=repr)
@pytest.mark.parametrize(("seed", "file", "inner", "to"), [
    ("hf-bin", "pytorch_model.bin", None, "mcore-dist"),
    ("hf-peft-bin", "adapter_model.bin", None, "mcore-dist"),
    ("megatron-legacy", MEGATRON_RANK, None, "hf"),
    ("megatron-legacy", MEGATRON_RANK, "model", "hf"),
    ("verl-legacy", "model/mp_rank_01/model.pt", None, "hf"),
], ids=["bin", "adapter-bin", "megatron-top", "megatron-model", "verl-rank"])
def test_state_dict_keys_that_are_not_strings_are_corrupt(
        seed: str, file: str, inner: str | None, to: str, key: object, tmp_path: Path) -> None:
    # They ended in AttributeError ('int' object has no attribute 'startswith'): exit 1.
    ckpt = copy_seed(seed, tmp_path / "ckpt")
    _keyed_planter(file, inner)(ckpt, key)
    with pytest.raises(CorruptCheckpointError, match="non-string key"):
        ckpt_ir.convert(ckpt, tmp_path / "out", to=to)
