"""Per-rank formats (``verl-legacy``, ``megatron-legacy``) proven with real megatron-core 0.16.1.

Two layouts, each on two gloo ranks: TP=2 (vocab padded to 384: 301 rows do not split), and
PP=2 with VPP=2 and an uneven first stage (6 layers: the first stage holds 4 in chunks of 2,
the second 2 in chunks of 1), for llama (GQA, untied), qwen2 (QKV bias, tied embeddings: at
PP=2 the last stage holds a copy of the embedding as its output layer) and qwen3 (qk-norm,
MQA: at TP=2 the single KV group is split by rows across the ranks).

- Forward: HF -> ckpt-ir -> per-rank files; each rank builds its GPTModel chunks at that
  layout (local spec), ``load_state_dict(strict=True)`` the file ckpt-ir wrote for it and runs
  the forward (pipelined chunk by chunk for PP); the logits equal the transformers logits.
- Reverse: GPTModels built and randomised by megatron-core at those layouts save their chunks'
  ``state_dict()`` as verl (``model/mp_rank_*/model.pt``, a list per VPP chunk) and Megatron-LM
  (``iter_0000007/mp_rank_*/model_optim_rng.pt`` with args, optimizer, RNG, tracker) would;
  ckpt-ir turns each into HF weights whose transformers logits equal the megatron model's.

All megatron-core jobs run in one launch of two processes (``mcore_harness``), which switches
the model-parallel layout between jobs. Tolerance: fp32, max abs logit difference <= 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_ir
from tests.clients import hf_models
from tests.clients.mcore_harness import HarnessError, job_result, launch
from tests.fixtures import Outcome, attempt

pytestmark = pytest.mark.clients

ATOL = 1e-5
VOCAB = hf_models.VOCAB_SIZE
ARCHS = ("llama", "qwen2", "qwen3")
FORMATS = ("verl-legacy", "megatron-legacy")


@dataclass(frozen=True)
class Layout:
    name: str
    fields: dict[str, int]
    num_layers: int
    pad: int | None  # pad_vocab_to_multiple of the model and of ckpt-ir's output


LAYOUTS = {
    "tp2": Layout("tp2", {"tp": 2, "pp": 1}, 2, 128),
    "pp2vpp2": Layout("pp2vpp2", {"tp": 1, "pp": 2, "vpp": 2, "first_stage_layers": 4}, 6, None),
}
CASES = [(arch, lay) for lay in LAYOUTS for arch in ARCHS]




@dataclass
class Suite:
    root: Path
    ids: list[list[int]]
    hf: dict[tuple[str, str], Path] = field(default_factory=dict)
    ref: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    written: dict[tuple[str, str, str], Outcome] = field(default_factory=dict)
    launch: Outcome = field(default_factory=Outcome)

    def logits(self, key: str) -> torch.Tensor:
        self.launch.get("the megatron-core launch")
        try:
            return job_result(self.root / "logits" / f"{key}.pt")
        except HarnessError as e:
            pytest.fail(str(e), pytrace=False)

    def saved(self, arch: str, lay: str) -> Path:
        return self.root / "saved" / f"{arch}-{lay}"


def _job(suite: Suite, arch: str, lay: str, **extra: Any) -> dict[str, Any]:
    layout = LAYOUTS[lay]
    return {"hf_config": str(suite.hf[arch, lay] / "config.json"), "layout": layout.fields,
            "pad_vocab_to_multiple": layout.pad, "input_ids": suite.ids, **extra}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    s = Suite(root=tmp_path_factory.mktemp("per_rank"), ids=hf_models.input_ids())
    jobs: list[dict[str, Any]] = []
    for i, (arch, lay) in enumerate(CASES):
        layout = LAYOUTS[lay]
        hf = s.hf[arch, lay] = hf_models.make_hf_model(arch, s.root / "hf", seed=i,
                                                       name=f"{arch}-{lay}",
                                                       num_hidden_layers=layout.num_layers)
        s.ref[arch, lay] = hf_models.hf_logits(hf, s.ids)
        for fmt in FORMATS:
            dst = s.root / "written" / f"{arch}-{lay}-{fmt}"
            s.written[arch, lay, fmt] = attempt(lambda hf=hf, dst=dst, fmt=fmt, lay=layout: (
                ckpt_ir.convert(hf, dst, to=fmt, layout=lay.fields, mcore_spec="local",
                                pad_vocab_to_multiple=lay.pad), dst)[1])
            if s.written[arch, lay, fmt].error is None:
                jobs.append(_job(s, arch, lay, command="load-rank-files", ckpt=str(dst),
                                 format=fmt, out=str(s.root / "logits" /
                                                     f"load-{arch}-{lay}-{fmt}.pt")))
        jobs.append(_job(s, arch, lay, command="save-rank-files", seed=100 + i,
                         out_dir=str(s.saved(arch, lay)),
                         logits_out=str(s.root / "logits" / f"saved-{arch}-{lay}.pt")))
    s.launch = attempt(lambda: launch("batch", jobs, world_size=2, timeout=400))
    return s


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert expected.std() > 0.1, f"{what}: reference logits are nearly constant"
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs logit diff {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("arch", "lay"), CASES, ids=[f"{a}-{lay}" for a, lay in CASES])
def test_written_rank_files_load_strictly_and_match_hf_logits(suite: Suite, arch: str, lay: str,
                                                              fmt: str) -> None:
    suite.written[arch, lay, fmt].get(f"ckpt_ir.convert(hf -> {fmt}, {lay})")
    logits = suite.logits(f"load-{arch}-{lay}-{fmt}")
    _assert_logits_close(logits[..., :VOCAB], suite.ref[arch, lay], f"{fmt} {arch} {lay}")


@pytest.mark.parametrize(("arch", "lay"), CASES, ids=[f"{a}-{lay}" for a, lay in CASES])
def test_megatron_saved_verl_layout_to_hf_matches_megatron_logits(
        suite: Suite, arch: str, lay: str, tmp_path: Path) -> None:
    expected = suite.logits(f"saved-{arch}-{lay}")[..., :VOCAB]
    # verl's tree carries hf_config_and_tokenizer/ beside model/: no --hf-config needed.
    report = ckpt_ir.convert(suite.saved(arch, lay) / "verl", tmp_path / "hf", to="hf")
    assert report.source_format == "verl-legacy"
    assert report.source_layout.endswith(ckpt_ir_layout(lay))
    assert "extra state (TE FP8 metadata), not a weight" in report.dropped.values()
    _assert_logits_close(hf_models.hf_logits(tmp_path / "hf", suite.ids), expected,
                         f"verl {arch} {lay}")


@pytest.mark.parametrize(("arch", "lay"), CASES, ids=[f"{a}-{lay}" for a, lay in CASES])
def test_megatron_saved_megatron_lm_layout_to_hf_matches_megatron_logits(
        suite: Suite, arch: str, lay: str, tmp_path: Path) -> None:
    expected = suite.logits(f"saved-{arch}-{lay}")
    padded = LAYOUTS[lay].pad is not None
    # The run directory: the tracker selects iter_0000007. Megatron-LM args carry no HF vocab
    # size, so a padded vocabulary needs the HF config to be trimmed; unpadded, args suffice.
    report = ckpt_ir.convert(suite.saved(arch, lay) / "megatron", tmp_path / "hf", to="hf",
                             hf_config=suite.hf[arch, lay] if padded else None)
    assert report.source_format == "megatron-legacy"
    assert report.source_layout.endswith(ckpt_ir_layout(lay))
    for entry in ("optimizer", "rng_state", "opt_param_scheduler", "args"):
        assert entry in report.dropped
    logits = hf_models.hf_logits(tmp_path / "hf", suite.ids)
    _assert_logits_close(logits, expected[..., :VOCAB] if padded else expected,
                         f"megatron-lm {arch} {lay}")


def ckpt_ir_layout(lay: str) -> str:
    return ckpt_ir.ParallelLayout(**LAYOUTS[lay].fields).describe()
