"""The checkpoint manager inside real megatron-core 0.16.1 ranks (CPU, gloo), checked by real
clients: transformers for ``hf_model``, megatron-core's ``dist_checkpointing.load`` for
``model`` and ``optimizer``.

One 2-rank job (TP=2) per architecture saves, through :class:`CheckpointManager`, from
GPTModel ranks (see ``manager_jobs``):

- step 1 (sync) and step 2 (async, the weights halved in place as soon as ``save`` returns):
  ``model`` + ``hf_model`` + ``optimizer`` (megatron-core's sharded Adam state) + ``extra``;
- step 3: ``model`` from megatron-core's own ``sharded_state_dict()`` (pass-through).

Then one 1-rank job (TP=1) loads them back, with megatron-core and with the manager. A third
job saves asynchronously back to back and is SIGKILLed at a random moment.
Architectures: llama (GQA, head_dim != hidden/heads, untied), qwen2 (QKV bias, tied).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_ir
from ckpt_ir.manager import MANIFEST, TRACKER, committed_steps, latest_step
from ckpt_ir.manager.disk import CONTENTS
from tests.clients import hf_models
from tests.clients.manager_workers import kill_ranks, start_ranks
from tests.clients.mcore_harness import HarnessError, job_result, launch

pytestmark = pytest.mark.clients

ATOL = 1e-5
VOCAB = hf_models.VOCAB_SIZE
PAD = 128
ARCHS = ("llama", "qwen2")


@dataclass
class Run:
    root: Path
    ids: list[list[int]]
    hf: dict[str, Path] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def out(self, arch: str, name: str) -> Path:
        return self.root / "out" / arch / name

    def run_dir(self, arch: str) -> Path:
        return self.root / "runs" / arch

    def unit(self, arch: str, step: int) -> Path:
        return self.run_dir(arch) / f"global_step_{step}" / "actor"

    def logits(self, arch: str, name: str) -> torch.Tensor:
        if name in self.failures:
            pytest.fail(self.failures[name], pytrace=False)
        try:
            return job_result(self.out(arch, name))[..., :VOCAB]
        except HarnessError as e:
            pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    r = Run(tmp_path_factory.mktemp("manager_client"), hf_models.input_ids())
    saves, loads = [], []
    for i, arch in enumerate(ARCHS):
        r.hf[arch] = hf_models.make_hf_model(arch, r.root / "hf", seed=i)
        cfg = str(r.hf[arch] / "config.json")
        common = {"hf_config": cfg, "pad_vocab_to_multiple": PAD, "input_ids": r.ids,
                  "root": str(r.run_dir(arch))}
        saves.append({**common, "command": "manager-save", "layout": {"tp": 2}, "seed": 7 + i,
                      "out_dir": str(r.out(arch, "")),
                      "logits_out": str(r.out(arch, "logits-before.pt"))})
        for step in (1, 3):
            loads.append({**common, "command": "load-forward", "tp": 1,
                          "ckpt": str(r.unit(arch, step) / "model/dist_ckpt"),
                          "out": str(r.out(arch, f"mcore-load-step{step}.pt"))})
        loads.append({**common, "command": "manager-load", "layout": {"tp": 1}, "step": 1,
                      "source": "model", "optimizer": True,
                      "out": str(r.out(arch, "manager-load-model.pt"))})
        loads.append({**common, "command": "manager-load", "layout": {"tp": 1}, "step": 2,
                      "source": "hf_model", "out": str(r.out(arch, "manager-load-hf.pt"))})
    for name, jobs, world in (("save", saves, 2), ("load", loads, 1)):
        try:
            launch("batch", jobs, world_size=world, timeout=300)
        except HarnessError as e:
            r.failures[name] = str(e)
    return r


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    assert expected.std() > 0.1, f"{what}: reference logits are nearly constant"
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs logit diff {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("step", [1, 2], ids=["sync", "async"])
def test_hf_model_from_tp2_ranks_loads_in_transformers_with_megatron_logits(
        run: Run, arch: str, step: int) -> None:
    """Step 2 was saved async and the weights changed right after save() returned: it must
    hold the weights of that moment, the same as step 1."""
    expected = run.logits(arch, "logits-before.pt")
    hf_dir = run.unit(arch, step) / "model" / "huggingface"
    _close(hf_models.hf_logits(hf_dir, run.ids), expected, f"{arch} step {step} hf_model")
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["vocab_size"] == VOCAB  # padding rows (384) stripped by the IR mapping


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_dist_model_from_tp2_loads_at_tp1_in_megatron_core(run: Run, arch: str) -> None:
    _close(run.logits(arch, "mcore-load-step1.pt"), run.logits(arch, "logits-before.pt"),
           f"{arch} model step 1 via dist_checkpointing.load")


@pytest.mark.parametrize("arch", ARCHS)
def test_passed_through_sharded_state_dict_loads_in_megatron_core(run: Run, arch: str) -> None:
    _close(run.logits(arch, "mcore-load-step3.pt"), run.logits(arch, "logits-after.pt"),
           f"{arch} model step 3 (sharded_state_dict pass-through)")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", ["model", "hf"])
def test_manager_loads_into_megatron_ranks_at_another_tp(run: Run, arch: str,
                                                         source: str) -> None:
    _close(run.logits(arch, f"manager-load-{source}.pt"), run.logits(arch, "logits-before.pt"),
           f"{arch} manager.load from {source} at TP=1")


@pytest.mark.parametrize("arch", ARCHS)
def test_optimizer_and_extra_state_reshard_tp2_to_tp1(run: Run, arch: str) -> None:
    run.logits(arch, "manager-load-model.pt")  # the job ran
    report = json.loads(Path(str(run.out(arch, "manager-load-model.pt")) + ".json")
                        .read_text())
    # exp_avg = 2 w and exp_avg_sq = w² hold at TP=1, and megatron-core's own loader reads
    # the same tensors from the directory the manager wrote.
    assert report["mismatch"] == []
    assert report["extra"] == {"opt_param_scheduler": {"num_steps": 1, "max_lr": 0.001}}
    assert report["groups"][0]["lr"] == 0.001


@pytest.mark.parametrize("arch", ARCHS)
def test_verl_v2_tree_manifest_and_commit_order(run: Run, arch: str) -> None:
    if "save" in run.failures:
        pytest.fail(run.failures["save"], pytrace=False)
    root = run.run_dir(arch)
    assert committed_steps(root) == [1, 2, 3] and latest_step(root) == 3
    assert (root / TRACKER).read_text() == "3"
    tracker = (root / TRACKER).stat().st_mtime_ns
    for step, contents in ((1, ["model", "hf_model", "optimizer", "extra"]),
                           (2, ["model", "hf_model", "optimizer", "extra"]), (3, ["model"])):
        unit = run.unit(arch, step)
        manifest = json.loads((unit / MANIFEST).read_text())
        assert manifest["save_contents"] == contents
        assert manifest["global_step"] == step and manifest["world_size"] == 2
        paths = {c: e["path"] for c, e in manifest["contents"].items()}
        assert {c: p for c, p in paths.items() if c in CONTENTS} == {c: p for c, p in {
            "model": "model/dist_ckpt", "hf_model": "model/huggingface",
            "optimizer": "optimizer/dist_ckpt", "extra": "extra/dist_ckpt"}.items()
            if c in contents}
        # verl's entries beside the contents: the HF config verl's merger reads (also for a
        # model-only save), and the transformer config with 'extra'.
        assert paths["hf_config"] == "model/huggingface"
        assert (unit / "model/huggingface/config.json").is_file()
        assert paths.get("transformer_config") == (
            "transformer_config.json" if "extra" in contents else None)
        assert set(paths) - set(CONTENTS) <= {"hf_config", "tokenizer", "transformer_config",
                                              "lr_scheduler", "rng_state"}
        for d in paths.values():
            assert (unit / d).exists()
        data = max(p.stat().st_mtime_ns for p in unit.rglob("*")
                   if p.is_file() and p.name != MANIFEST)
        assert data <= (unit / MANIFEST).stat().st_mtime_ns <= tracker
    # Any ckpt-ir entry point reads the run root like a verl checkpoint: the latest step.
    assert ckpt_ir.detect(root) == "mcore-dist"


@pytest.mark.parametrize("arch", ARCHS)
def test_run_root_converts_to_hf_with_the_latest_weights(run: Run, arch: str,
                                                         tmp_path: Path) -> None:
    expected = run.logits(arch, "logits-after.pt")
    report: Any = ckpt_ir.convert(run.run_dir(arch), tmp_path / "hf", to="hf")
    assert "global_step_3" in report.source_layout or any(
        "global_step_3" in n for n in report.notes)
    _close(hf_models.hf_logits(tmp_path / "hf", run.ids), expected, f"{arch} convert")


def test_async_saves_of_gptmodel_ranks_killed_at_a_random_moment(run: Run,
                                                                  tmp_path: Path) -> None:
    """The tracker's step after a SIGKILL is complete: both encodings hold the same weights
    and the HF one loads in transformers; nothing newer is trusted."""
    root, progress = tmp_path / "run", tmp_path / "progress"
    progress.touch()
    job = {"hf_config": str(run.hf["llama"] / "config.json"), "layout": {"tp": 2},
           "pad_vocab_to_multiple": PAD, "seed": 11, "root": str(root), "keep_last": 2,
           "progress": str(progress)}
    procs = start_ranks("manager-kill-loop", job, 2, tmp_path / "logs",
                        module="tests.clients.mcore_harness")
    try:
        deadline = time.monotonic() + 240
        while len(progress.read_text().split()) < 2 and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.1)
        assert len(progress.read_text().split()) >= 2, \
            (tmp_path / "logs" / "rank0.log").read_text()[-3000:]
        time.sleep(random.Random(7).uniform(0.0, 1.0))
    finally:
        kill_ranks(procs)
    latest = latest_step(root)
    assert latest is not None and latest >= max(map(int, progress.read_text().split()))
    # keep_last=2, plus one more when the kill fell between the tracker and retention.
    assert committed_steps(root)[-1] == latest and len(committed_steps(root)) <= 3
    unit = root / f"global_step_{latest}" / "actor"
    ckpt_ir.convert(unit / "model" / "dist_ckpt", tmp_path / "from-dist", to="hf")
    hf, from_dist = ckpt_ir.open(unit / "model" / "huggingface"), ckpt_ir.open(
        tmp_path / "from-dist")
    for name in hf.tensors:
        assert torch.equal(hf.read(name), from_dist.read(name)), name
    assert hf_models.hf_logits(unit / "model" / "huggingface", run.ids).std() > 0.1
