"""Structural config fields must be integers, counts are bounded before anything loops over
them, and ``run_config.yaml`` is safe-loaded within bounds: exit 2, never 1, never a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt_ir
from ckpt_ir.errors import CheckpointError, FormatError
from tests.hostile import bounded, copy_seed, siblings

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckpt_ir", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def edit_config(ckpt: Path, **fields: object) -> None:
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(("fields", "says"), [
    ({"hidden_size": 32.5}, "hidden_size must be an integer, not 32.5"),
    ({"num_attention_heads": "4"}, "num_attention_heads must be an integer, not '4'"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer, not True"),
    ({"intermediate_size": 128.0}, "intermediate_size must be an integer, not 128.0"),
    ({"num_hidden_layers": 10**12}, "num_hidden_layers=1000000000000 is beyond any real model"),
    # qwen2_moe lists its routed layers by looping over them: bounded first.
    ({"model_type": "qwen2_moe", "num_hidden_layers": 10**9, "num_experts": 2,
      "num_experts_per_tok": 1, "moe_intermediate_size": 8,
      "shared_expert_intermediate_size": 8}, "num_hidden_layers=1000000000 is beyond"),
    ({"model_type": "qwen2_moe", "num_experts": 2, "num_experts_per_tok": 1,
      "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8,
      "mlp_only_layers": [0.5]}, "mlp_only_layers must be a list of integers"),
])
def test_non_integer_and_absurd_structural_fields_are_refused(
        fields: dict[str, object], says: str, tmp_path: Path) -> None:
    ckpt = copy_seed("hf", tmp_path / "ckpt")
    edit_config(ckpt, **fields)
    out = tmp_path / "out"
    with bounded(seconds=20), pytest.raises(FormatError, match="malformed field") as info:
        ckpt_ir.convert(ckpt, out, to="mcore-dist")
    assert says in str(info.value)
    assert siblings(out) == []


def test_cli_refuses_a_fractional_hidden_size_instead_of_copying_it(tmp_path: Path) -> None:
    ckpt = copy_seed("hf", tmp_path / "ckpt")
    edit_config(ckpt, hidden_size=32.5)
    run = cli("convert", ckpt, tmp_path / "out", "--to", "mcore-dist", "--no-progress")
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.splitlines()
    assert "hidden_size must be an integer, not 32.5" in line
    assert not (tmp_path / "out").exists()


def _nested(depth: int) -> bytes:
    return b"model:\n" + b"".join(b"  " * (i + 1) + b"a:\n" for i in range(depth)) + \
        b"  " * (depth + 1) + b"b: 1\n"


# Ten levels of ten references each: 10**10 leaves for whatever walks the loaded value.
LAUGHS = b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n".encode()
    for i in range(9)) + b"model: [" + b", ".join([b"*j"] * 1000) + b"]\n"


@pytest.mark.parametrize(("content", "says"), [
    (b"model:\n  hidden_size: \xff\xfe\n", "run_config.yaml is not UTF-8 text (byte 22)"),
    (_nested(1000), "run_config.yaml nests more than 64 levels"),
    (b"[" * 100_000, "run_config.yaml nests more than 64 levels"),
    (LAUGHS, "run_config.yaml has more than 1000 aliases"),
    (b"model: !!python/object/apply:os.system ['true']\n", "run_config.yaml is not valid YAML"),
    (b"model: {a: 2020-13-45}\n", "run_config.yaml is not valid YAML"),
    (b"model: [\n", "run_config.yaml is not valid YAML"),
    (b"x" * (4 * 2**20 + 1), "has 4194305 bytes; at most 4194304 are accepted"),
], ids=["non-utf8", "deep-mapping", "deep-flow", "aliases", "python-tag", "bad-date",
        "truncated", "huge"])
def test_run_config_yaml_is_loaded_within_bounds(content: bytes, says: str,
                                                 tmp_path: Path) -> None:
    # Megatron-LM torch_dist without an HF config: run_config.yaml is read for the model.
    ckpt = copy_seed("megatron-lm", tmp_path / "ckpt")
    (ckpt / "run_config.yaml").write_bytes(content)
    with bounded(seconds=20), pytest.raises(CheckpointError) as info:
        ckpt_ir.convert(ckpt, tmp_path / "out", to="hf")
    assert says in str(info.value)


def test_cli_exits_2_on_a_deeply_nested_run_config(tmp_path: Path) -> None:
    ckpt = copy_seed("megatron-lm", tmp_path / "ckpt")
    (ckpt / "run_config.yaml").write_bytes(_nested(1000))
    run = cli("inspect", ckpt)
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.splitlines()
    assert "run_config.yaml nests more than 64 levels" in line


@pytest.mark.parametrize("seed", ["hf", "hf-peft", "hf-peft-bin"])
def test_layer_counts_are_bounded_by_the_tensors_before_planning(seed: str,
                                                                 tmp_path: Path) -> None:
    # 200,000 layers over a LoRA adapter of 28 tensors took 4.9 GB and 65 s to be refused.
    ckpt = copy_seed(seed, tmp_path / "ckpt")
    edit_config(ckpt, num_hidden_layers=200_000)
    with bounded(seconds=20, peak_bytes=64 * 2**20), pytest.raises(CheckpointError) as info:
        ckpt_ir.convert(ckpt, tmp_path / "out", to="mcore-dist")
    assert "the model config declares 200000 layers but the checkpoint holds only" in str(
        info.value)
