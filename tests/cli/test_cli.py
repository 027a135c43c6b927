"""The ckpt-ir command line: exit codes, --json, --dry-run, refusals, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures import tree_bytes, write_hf

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ckpt_ir", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, env=env, timeout=120)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "hf"
    write_hf(path, extra_files={"tokenizer_config.json": "{}"})
    return path


def test_convert_json_report_and_round_trip(hf_dir, tmp_path):
    dist = tmp_path / "dist"
    r = run("convert", str(hf_dir), str(dist), "--to", "mcore-dist", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["source_format"] == "hf" and report["dest_format"] == "mcore-dist"
    assert report["tensors_written"] > 0 and "metadata.json" in report["files"]
    back = tmp_path / "back"
    r = run("convert", str(dist), str(back), "--to", "hf")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    assert (back / "tokenizer_config.json").read_text() == "{}"
    want, got = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[n].view(torch.uint16), got[n].view(torch.uint16)) for n in want)


def test_dry_run_writes_nothing(hf_dir, tmp_path):
    dst = tmp_path / "dist"
    r = run("convert", str(hf_dir), str(dst), "--to", "mcore-dist", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["bytes_written"] > 0
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_is_refused(hf_dir, tmp_path):
    dst = tmp_path / "dist"
    assert run("convert", str(hf_dir), str(dst), "--to", "mcore-dist").returncode == 0
    (dst / "keep").write_text("x")
    r = run("convert", str(hf_dir), str(dst), "--to", "mcore-dist")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"ckpt-ir: error: destination {dst} exists (pass --overwrite to replace it)"]
    assert (dst / "keep").read_text() == "x"
    # A checkpoint ckpt-ir recognises is replaced with --overwrite, files beside it included.
    r = run("convert", str(hf_dir), str(dst), "--to", "mcore-dist", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (dst / "keep").exists() and (dst / "metadata.json").is_file()


def test_source_is_never_modified(hf_dir, tmp_path):
    before = tree_bytes(hf_dir)
    run("convert", str(hf_dir), str(tmp_path / "d"), "--to", "mcore-dist")
    r = run("convert", str(hf_dir), str(hf_dir / "inside"), "--to", "mcore-dist")
    assert r.returncode == 2 and "overlaps the source" in r.stderr
    assert tree_bytes(hf_dir) == before


@pytest.mark.parametrize("args,message", [
    (("inspect", "/nonexistent/ckpt"), "ckpt-ir: error: /nonexistent/ckpt does not exist"),
    (("convert", "/nonexistent/ckpt", "/tmp/x", "--to", "hf"),
     "ckpt-ir: error: /nonexistent/ckpt does not exist"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [message]


def test_unknown_directory_is_a_format_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    r = run("inspect", str(tmp_path))
    assert r.returncode == 2
    assert "cannot tell what checkpoint format" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_inspect_text_and_json(hf_dir, tmp_path):
    r = run("inspect", str(hf_dir))
    assert r.returncode == 0, r.stderr
    assert "hf (hf model directory)" in r.stdout and "architecture: llama" in r.stdout
    dist = tmp_path / "dist"
    assert run("convert", str(hf_dir), str(dist), "--to", "mcore-dist").returncode == 0
    r = run("inspect", str(dist), "--json")
    info = json.loads(r.stdout)
    assert info["format"] == "mcore-dist" and info["architecture"] == "llama"
    assert info["details"]["config_from"].endswith("hf_config")
    assert any("extra state" in why for why in info["dropped"].values())


def test_missing_config_is_one_clear_line(hf_dir, tmp_path):
    dist = tmp_path / "dist"
    assert run("convert", str(hf_dir), str(dist), "--to", "mcore-dist").returncode == 0
    import shutil

    shutil.rmtree(dist / "hf_config")
    r = run("convert", str(dist), str(tmp_path / "out"), "--to", "hf")
    assert r.returncode == 2
    assert "carries no model config" in r.stderr and "--hf-config" in r.stderr
    r = run("convert", str(dist), str(tmp_path / "out"), "--to", "hf", "--hf-config",
            str(hf_dir))
    assert r.returncode == 0, r.stderr
