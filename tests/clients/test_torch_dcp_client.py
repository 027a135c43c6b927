"""torch-dcp against torch FSDP2 itself (CPU, gloo, real ``fully_shard`` models).

A tiny HF Llama and a Qwen3-MoE are sharded with ``fully_shard`` over 2 ranks and saved with
``dcp.save(get_model_state_dict(model))``, as a nested ``{"model", "optimizer",
"train_state"}`` dict, and (Llama) with ``HuggingFaceStorageWriter`` without consolidation.
``ckpt-ir convert --to hf`` of each must give the model's weights bit for bit and transformers'
logits; ckpt-ir's own ``torch-dcp`` output must ``dcp.load`` into an FSDP2 model at another world
size (3 ranks) bit for bit. See tests/clients/dcp_jobs.py for the jobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_ir.api import convert
from ckpt_ir.detect import resolve
from ckpt_ir.transforms import same_bits
from tests.clients.dcp_jobs import launch
from tests.clients.hf_models import hf_logits, input_ids, make_hf_model

pytestmark = [pytest.mark.clients, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(got)
    different = [k for k in expected if not same_bits(expected[k], got[k])]
    assert not different, different


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp2")
    models = {"llama": make_hf_model("llama", root), "qwen3_moe": make_hf_model("qwen3_moe", root)}
    launch("save", {"models": [
        {"hf": str(models["llama"]), "out": str(root / "llama"), "nested": True,
         "hf_sharded": True},
        {"hf": str(models["qwen3_moe"]), "out": str(root / "qwen3_moe")}]}, world_size=2)
    return {"root": root, **models}


@pytest.mark.parametrize("arch,kind", [("llama", "plain"), ("llama", "nested"),
                                       ("llama", "hf_sharded"), ("qwen3_moe", "plain")])
def test_fsdp2_saves_convert_to_hf_bit_exact(saved: dict[str, Path], arch: str, kind: str,
                                             tmp_path: Path) -> None:
    src, hf = saved["root"] / arch / kind, saved[arch]
    expected_format = "hf" if kind == "hf_sharded" else "torch-dcp"
    assert resolve(src).format == expected_format
    report = convert(src, tmp_path / "hf", "hf", hf_config=hf)
    _assert_same(_weights(hf), _weights(tmp_path / "hf"))
    if kind == "nested":
        # Optimizer moments, param groups and the training state are listed, never silent.
        assert any(k.startswith("optimizer.state.") for k in report.dropped)
        assert report.dropped["train_state.step"] == "training state (step, tokens seen)"
    ids = input_ids()
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), hf_logits(hf, ids),
                               rtol=0, atol=0)


def test_ckpt_ir_dcp_loads_into_fsdp2_at_another_world_size(saved: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """hf -> ckpt-ir torch-dcp (one chunk per tensor) -> dcp.load into 3 FSDP2 ranks (the
    source was saved by 2): DCP reshards on load, and every weight arrives bit for bit."""
    jobs = []
    for arch in ("llama", "qwen3_moe"):
        # A live transformers 5 MoE model holds its experts fused; dcp.load asks for those.
        convert(saved["root"] / arch / "plain", tmp_path / arch, "torch-dcp",
                hf_config=saved[arch],
                hf_experts="fused" if arch == "qwen3_moe" else "per-expert")
        jobs.append({"config": str(saved[arch]), "ckpt": str(tmp_path / arch),
                     "out": str(tmp_path / f"{arch}.safetensors")})
    launch("load", {"models": jobs}, world_size=3)
    for arch in ("llama", "qwen3_moe"):
        loaded = load_file(tmp_path / f"{arch}.safetensors")
        # The live MoE holds fused experts: compare against a dcp_to_torch_save of the
        # FSDP2 save, which has the live names too.
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(saved["root"] / arch / "plain", tmp_path / f"{arch}.pt")
        _assert_same(torch.load(tmp_path / f"{arch}.pt", weights_only=True), loaded)


def test_cli_inspect_explains_a_nested_fsdp2_save(saved: dict[str, Path]) -> None:
    run = subprocess.run([sys.executable, "-m", "ckpt_ir", "inspect",
                          str(saved["root"] / "llama" / "nested"),
                          "--hf-config", str(saved["llama"])],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert "torch-dcp (plain torch DCP directory (.metadata, no metadata.json" in run.stdout
    assert "prefix: model." in run.stdout and "skipped" in run.stdout
