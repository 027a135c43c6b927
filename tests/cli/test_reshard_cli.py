"""``ckpt-ir reshard`` and the layout flags of ``convert`` on the command line.

Most cases call ``ckpt_ir.cli.main`` in-process (a subprocess costs seconds of imports); the
torch_dist case runs the real ``python -m ckpt_ir`` for its exit status and output.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_ir.cli import main
from tests.cli.test_cli import run as run_subprocess
from tests.fixtures import TINY_LLAMA, tree_bytes, write_hf


@pytest.fixture()
def run(capsys):
    """``main(args)`` as a CompletedProcess-like result (returncode, stdout, stderr)."""
    def call(*args: str) -> subprocess.CompletedProcess:
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return call

CONFIG = dict(TINY_LLAMA, num_hidden_layers=4, vocab_size=96)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reshard") / "hf"
    write_hf(path, CONFIG, extra_files={"tokenizer_config.json": "{}"})
    return path


def test_convert_then_reshard_then_back_to_hf(hf_dir, tmp_path, run):
    verl = tmp_path / "verl"
    r = run("convert", str(hf_dir), str(verl), "--to", "verl-legacy", "--tp", "2", "--pp", "2",
            "--vpp", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dest_layout"] == "tp=2 pp=2 vpp=2"
    # --tp only: PP and VPP stay as the source had them.
    r = run("reshard", str(verl), str(tmp_path / "a"), "--tp", "1")
    assert r.returncode == 0, r.stderr
    assert "(verl-legacy, tp=1 pp=2 vpp=2)" in r.stdout
    # --pp: VPP resets to 1 unless given; uneven stages on request.
    r = run("reshard", str(tmp_path / "a"), str(tmp_path / "b"), "--pp", "3",
            "--first-stage-layers", "2", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["dest_layout"] == "tp=1 pp=3 (first stage 2 layers)" and report["resharded"]
    assert sorted(p.name for p in (tmp_path / "b" / "model").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_00_002"]
    r = run("inspect", str(tmp_path / "b"), "--json")
    assert json.loads(r.stdout)["details"]["layers_per_chunk"] == [[2], [1], [1]]
    assert run("convert", str(tmp_path / "b"), str(tmp_path / "hf"), "--to", "hf").returncode \
        == 0
    want, got = load_file(hf_dir / "model.safetensors"), load_file(
        tmp_path / "hf" / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[n].view(torch.uint16), got[n].view(torch.uint16)) for n in want)
    assert (tmp_path / "hf" / "tokenizer_config.json").read_text() == "{}"


def test_reshard_megatron_lm_run(hf_dir, tmp_path, run):
    mlm = tmp_path / "mlm"
    assert run("convert", str(hf_dir), str(mlm), "--to", "megatron-legacy", "--tp", "2",
               "--mcore-spec", "local").returncode == 0
    r = run("reshard", str(mlm), str(tmp_path / "out"), "--tp", "4", "--pp", "2", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["source_format"] == "megatron-legacy"
    assert "release/mp_rank_03_001/model_optim_rng.pt" in report["files"]
    info = json.loads(run("inspect", str(tmp_path / "out"), "--json").stdout)
    assert info["details"]["norm_style"] == "local"  # the source's spec is kept


def test_reshard_of_torch_dist_explains_and_writes_nothing(hf_dir, tmp_path):
    dist = tmp_path / "dist"
    assert run_subprocess("convert", str(hf_dir), str(dist), "--to", "mcore-dist"
                          ).returncode == 0
    before = tree_bytes(tmp_path)
    r = run_subprocess("reshard", str(dist), str(tmp_path / "out"), "--tp", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"{dist} is a torch_dist (mcore-dist) checkpoint: its tensors are stored whole and "
        "megatron-core reshards them on load for any TP/PP/VPP/EP, so there is nothing to "
        "reshard. Nothing was written.")
    assert tree_bytes(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "message"), [
    (("reshard", "{hf}", "{out}", "--tp", "2"),
     "ckpt-ir: error: {hf} is hf, which has no parallel layout; write a per-rank checkpoint "
     "with `ckpt-ir convert SRC DST --to verl-legacy|megatron-legacy --tp N --pp N`"),
    (("convert", "{hf}", "{out}", "--to", "verl-legacy", "--tp", "3"),
     "ckpt-ir: error: TP=3 does not divide the 4 attention heads; TP=3 does not divide the 2 KV "
     "groups (megatron-core also accepts a TP that is a multiple of the groups); TP=3 does not "
     "divide the FFN size 40"),
    (("convert", "{hf}", "{out}", "--to", "megatron-legacy", "--pp", "3"),
     "ckpt-ir: error: PP×VPP = 3×1 does not divide the 4 layers (use --first-stage-layers / "
     "--last-stage-layers for uneven stages)"),
    (("convert", "{hf}", "{out}", "--to", "verl-legacy", "--vpp", "2"),
     "ckpt-ir: error: VPP=2 needs PP > 1 (megatron-core interleaves chunks across pipeline "
     "stages only)"),
    (("convert", "{hf}", "{out}", "--to", "hf", "--tp", "2"),
     "ckpt-ir: error: a parallel layout (--tp, --pp, ...) applies to per-rank formats "
     "(verl-legacy, megatron-legacy), not hf"),
])
def test_bad_layouts_exit_2_with_one_line_and_write_nothing(hf_dir, tmp_path, run, args,
                                                            message):
    fill = {"hf": str(hf_dir), "out": str(tmp_path / "out")}
    r = run(*(a.format(**fill) for a in args))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [message.format(**fill)]
    assert not (tmp_path / "out").exists()


def test_reshard_needs_a_layout(hf_dir, tmp_path, run):
    verl = tmp_path / "verl"
    assert run("convert", str(hf_dir), str(verl), "--to", "verl-legacy").returncode == 0
    r = run("reshard", str(verl), str(tmp_path / "out"))
    assert r.returncode == 2
    assert "nothing to reshard: give the new layout" in r.stderr
