"""The adapter commands: convert --to hf-peft / mcore-dist, extract-adapter, merge-adapter."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.test_cli import run
from tests.fixtures import write_hf
from tests.unit.test_adapters import lora, write_adapter


def test_adapter_commands(tmp_path: Path):
    write_adapter(tmp_path / "ad", lora(rank_pattern={"q_proj": 8}))
    r = run("convert", str(tmp_path / "ad"), str(tmp_path / "verl"), "--to", "verl-legacy",
            "--tp", "2", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["adapter"]["megatron"] == {
        "style": "fused", "rank": 16, "alpha": 32.0,
        "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
    assert "adapter_checkpoint/mp_rank_01_adapter.pt" in report["files"]
    (tmp_path / "verl" / "adapter_checkpoint" / "ckpt_ir_lora.json").unlink()
    r = run("extract-adapter", str(tmp_path / "verl"), str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.startswith("ckpt-ir: error: ") and r.stderr.count("\n") == 1
    assert "pass --lora-alpha" in r.stderr and not (tmp_path / "x").exists()
    r = run("extract-adapter", str(tmp_path / "verl"), str(tmp_path / "x"), "--lora-alpha",
            "32")
    assert r.returncode == 0, r.stderr
    assert "LoRA adapter: r=16 lora_alpha=32" in r.stdout
    assert (tmp_path / "x" / "adapter_model.safetensors").is_file()


def test_merge_adapter_dry_run_writes_nothing(tmp_path: Path):
    write_hf(tmp_path / "hf")
    write_adapter(tmp_path / "ad")
    r = run("merge-adapter", str(tmp_path / "hf"), str(tmp_path / "ad"), str(tmp_path / "m"),
            "--to", "mcore-dist", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["dry_run"] and report["dest_format"] == "mcore-dist"
    assert "8 destination tensors carry a merged LoRA update (14 modules), computed in fp32" \
        in report["notes"]
    assert not (tmp_path / "m").exists()
