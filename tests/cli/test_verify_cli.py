"""``ckpt-ir verify``: exit 0 equal, 1 different, 2 bad input; text and --json; --roundtrip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt_ir
from ckpt_ir.cli import main
from ckpt_ir.converters.storage.safetensors_file import read_header
from tests.fixtures import write_hf

REPO = Path(__file__).resolve().parents[2]
NAME = "model.layers.0.self_attn.v_proj.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify-cli")
    write_hf(root / "hf")
    ckpt_ir.convert(root / "hf", root / "dist", to="mcore-dist", pad_vocab_to_multiple=32)
    shutil.copytree(root / "hf", root / "flipped")
    path = root / "flipped" / "model.safetensors"
    header = read_header(path)
    entry = header.entries[NAME]
    raw = bytearray(path.read_bytes())
    raw[header.data_offset + entry.start + 2 * 37] ^= 0x01  # element 37: [1, 5] of [24, 32]
    path.write_bytes(raw)
    return {"hf": root / "hf", "dist": root / "dist", "flipped": root / "flipped"}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["verify", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_equal_checkpoints_exit_0(ckpts: dict[str, Path], capsys) -> None:
    code, out, err = cli(capsys, str(ckpts["hf"]), str(ckpts["dist"]))
    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith(f"{ckpts['hf']} (hf) vs {ckpts['dist']} (mcore-dist): "
                                          "EQUAL (21 tensors, 0 differing; bit-exact)")


def test_one_flipped_bit_exits_1_and_names_the_tensor(ckpts: dict[str, Path], capsys) -> None:
    code, out, _ = cli(capsys, str(ckpts["dist"]), str(ckpts["flipped"]))
    assert code == 1
    assert out.splitlines() == [
        f"{ckpts['dist']} (mcore-dist) vs {ckpts['flipped']} (hf): DIFFERENT (21 tensors, "
        "1 differing; bit-exact)",
        f"  {NAME}: 1 of 768 elements differ (max abs "
        + out.split("(max abs ", 1)[1].split(")", 1)[0] + "), first at [1, 5]"]
    code, out, _ = cli(capsys, str(ckpts["dist"]), str(ckpts["flipped"]), "--json")
    report = json.loads(out)
    assert code == 1 and report["equal"] is False and report["differing"] == 1
    [diff] = [t for t in report["tensors"] if t["status"] != "equal"]
    assert diff["name"] == NAME and diff["mismatched"] == 1 and diff["first_index"] == [1, 5]
    code, _, _ = cli(capsys, str(ckpts["dist"]), str(ckpts["flipped"]), "--atol", "1")
    assert code == 0


def test_input_errors_exit_2_with_one_line(ckpts: dict[str, Path], tmp_path: Path,
                                           capsys) -> None:
    code, out, err = cli(capsys, str(ckpts["hf"]), str(tmp_path / "missing"))
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"ckpt-ir: error: {tmp_path / 'missing'} does not exist"]
    code, _, err = cli(capsys, str(ckpts["hf"]))
    assert code == 2 and err.splitlines() == [
        "ckpt-ir: error: verify takes two checkpoints A B, or --roundtrip SRC --via FORMAT"]
    code, _, err = cli(capsys, "--roundtrip", str(ckpts["hf"]))
    assert code == 2 and err.splitlines() == [
        "ckpt-ir: error: verify --roundtrip SRC needs --via FORMAT"]
    shutil.copytree(ckpts["hf"], tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = cli(capsys, str(ckpts["hf"]), str(tmp_path / "cut"))
    assert code == 2 and len(err.splitlines()) == 1 and str(weights) in err


def test_roundtrip(ckpts: dict[str, Path], tmp_path: Path, capsys) -> None:
    code, out, err = cli(capsys, "--roundtrip", str(ckpts["hf"]), "--via", "mcore-dist",
                         "--pad-vocab-to-multiple", "64", "--workdir", str(tmp_path))
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"round trip {ckpts['hf']} -> mcore-dist -> hf: IDENTICAL"
    assert list(tmp_path.iterdir()) == []
    code, out, _ = cli(capsys, "--roundtrip", str(ckpts["dist"]), "--via", "hf", "--json")
    report = json.loads(out)
    assert code == 0 and report["equal"] and report["back_format"] == "mcore-dist"
    assert report["there"]["format_b"] == "hf" and report["back"]["format_b"] == "mcore-dist"


def test_exit_codes_end_to_end(ckpts: dict[str, Path]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen([sys.executable, "-m", "ckpt_ir", "verify", *map(str, args)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            for args in ((ckpts["hf"], ckpts["dist"]), (ckpts["hf"], ckpts["flipped"]),
                         (ckpts["hf"], ckpts["hf"] / "nothing"))]
    assert [r.wait(timeout=120) for r in runs] == [0, 1, 2]
