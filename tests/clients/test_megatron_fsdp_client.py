"""megatron-fsdp against megatron-core 0.16.1 itself (CPU, gloo, one rank).

A real GPTModel (local spec) with redrawn weights is saved twice by one job
(tests/clients/mfsdp_jobs.py): with ``dist_checkpointing.save`` (megatron-core's torch_dist) and
as Megatron-FSDP's ``fsdp_dtensor`` (``dcp.save`` of its ``state_dict()`` under
``model.module.``, uneven ``Shard(0)`` boxes of three data-parallel ranks, optimizer / RNG /
counters beside it; tests/clients/mfsdp_models.py). Cases: a dense Llama with fc1 split into
``_w``/``_v``; a Qwen3-MoE with grouped-GEMM expert keys ``linear_fc1.weight{e}_w/_v``; the same
MoE with SequentialMLP keys (``local_experts.{e}``) and fc1 whole.

``convert --to hf`` of the fsdp_dtensor save must equal the conversion of megatron-core's own
torch_dist save bit for bit and give megatron's logits (<= 1e-5 under transformers);
``--to mcore-dist`` must hold every tensor of the direct torch_dist save, bit for bit; verl's
``use_megatron_fsdp`` tree (``global_step_N/actor/model/dist_ckpt``) is found by the run walk and
read with the HF config from the role's ``huggingface/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_ir.api import convert
from ckpt_ir.converters.mcore_dist import McoreDistReader
from ckpt_ir.detect import resolve
from ckpt_ir.transforms import same_bits
from tests.clients import hf_models
from tests.clients.mcore_harness import HarnessError, job_result, launch

pytestmark = [pytest.mark.clients, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-5
VOCAB = hf_models.VOCAB_SIZE
CASES = {
    "llama": ("llama", {"split_swiglu": True}),
    "qwen3_moe-grouped": ("qwen3_moe", {"grouped_experts": True, "split_swiglu": True}),
    "qwen3_moe-sequential": ("qwen3_moe", {"grouped_experts": False, "split_swiglu": False}),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mfsdp")
    jobs = []
    for i, (case, (arch, options)) in enumerate(CASES.items()):
        hf = hf_models.make_hf_model(arch, root / "hf", seed=i, name=case)
        jobs.append({"command": "mfsdp-save", "hf_config": str(hf / "config.json"),
                     "out_dir": str(root / case), "logits_out": str(root / f"{case}.logits.pt"),
                     "input_ids": hf_models.input_ids(), "seed": 11 + i, **options})
    launch("batch", jobs, world_size=1)
    return root


def _logits(saved: Path, case: str) -> torch.Tensor:
    try:
        return job_result(saved / f"{case}.logits.pt")
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_dtensor_to_hf_equals_torch_dist_and_gives_megatron_logits(
        saved: Path, case: str, tmp_path: Path) -> None:
    expected = _logits(saved, case)[..., :VOCAB]
    hf, src = saved / "hf" / case, saved / case / "fsdp_dtensor"
    assert resolve(src).format == "megatron-fsdp"
    report = convert(src, tmp_path / "hf", "hf", hf_config=hf)
    convert(saved / case / "torch_dist", tmp_path / "via-dist", "hf", hf_config=hf)
    got, direct = _weights(tmp_path / "hf"), _weights(tmp_path / "via-dist")
    assert sorted(got) == sorted(direct)
    assert not [k for k in got if not same_bits(got[k], direct[k])]
    # What sits beside the model is listed with its reason, never dropped silently.
    assert report.dropped["checkpoint_version"] == "checkpoint version"
    assert report.dropped["iteration"] == "training iteration"
    assert any(k.startswith("optimizer.state.module.") and v == "optimizer state"
               for k, v in report.dropped.items())
    assert any(k.startswith("rng_state") and v == "RNG state" for k, v in report.dropped.items())
    logits = hf_models.hf_logits(tmp_path / "hf", hf_models.input_ids())
    assert expected.std() > 0.1  # O(1) logits, so the tolerance means something
    diff = (logits - expected).abs().max().item()
    assert diff <= ATOL, f"{case}: max abs logit diff {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("case", ["llama", "qwen3_moe-grouped"])
def test_fsdp_dtensor_to_mcore_dist_equals_the_direct_torch_dist_save(
        saved: Path, case: str, tmp_path: Path) -> None:
    hf = saved / "hf" / case
    convert(saved / case / "fsdp_dtensor", tmp_path / "dist", "mcore-dist", hf_config=hf)
    direct = McoreDistReader(saved / case / "torch_dist", hf_config=hf)
    ours = McoreDistReader(tmp_path / "dist")  # the HF config travels inside
    try:
        assert set(direct.tensors()) <= set(ours.tensors())
        different = [n for n in direct.tensors()
                     if not same_bits(direct.read(n), ours.read(n))]
        assert not different, different
    finally:
        direct.close()
        ours.close()


def test_verls_use_megatron_fsdp_tree_is_found_read_and_inspected(saved: Path,
                                                                  tmp_path: Path) -> None:
    """verl's MegatronCheckpointManager with use_megatron_fsdp: one fsdp_dtensor DCP in
    ``global_step_N/actor/model/dist_ckpt/``, the HF config in ``huggingface/``."""
    run = tmp_path / "run"
    role = run / "global_step_5" / "actor"
    shutil.copytree(saved / "llama" / "fsdp_dtensor", role / "model" / "dist_ckpt")
    (role / "huggingface").mkdir()
    shutil.copy(saved / "hf" / "llama" / "config.json", role / "huggingface" / "config.json")
    (run / "latest_checkpointed_iteration.txt").write_text("5")
    found = resolve(run)
    assert (found.format, found.path, found.step) == ("megatron-fsdp",
                                                      role / "model" / "dist_ckpt", 5)
    convert(run, tmp_path / "hf", "hf")
    convert(saved / "llama" / "torch_dist", tmp_path / "via-dist", "hf",
            hf_config=saved / "hf" / "llama")
    got, direct = _weights(tmp_path / "hf"), _weights(tmp_path / "via-dist")
    assert sorted(got) == sorted(direct)
    assert all(same_bits(got[k], direct[k]) for k in got)
    shown = subprocess.run([sys.executable, "-m", "ckpt_ir", "inspect", str(run)],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert shown.returncode == 0, shown.stderr
    assert "megatron-fsdp" in shown.stdout and "Megatron-FSDP fsdp_dtensor" in shown.stdout
    assert "model.module." in shown.stdout
