"""Mixture-of-experts per-rank files with expert parallelism, proven with megatron-core 0.16.1
``load_state_dict(strict=True)`` on two gloo ranks (TP=1, EP=2; local spec, SequentialMLP).

- HF -> ``verl-legacy`` / ``megatron-legacy`` at EP=2: rank ``mp_rank_00_00e`` holds global
  experts ``e*E/2 ..`` as ``local_experts.0..``; each rank's GPTModel loads its file strictly and
  gives the transformers logits (fp32, <= 1e-5) for mixtral, qwen2_moe, qwen3_moe and
  deepseek_v3 (MLA through the harness's test-only core attention).
- megatron-core's own EP=2 rank files (``state_dict()`` of each rank, random weights, each EP
  rank's experts drawn apart) -> ``hf`` -> transformers gives megatron's logits; read without
  ``--source-ep`` (the experts each file holds say the suffix is the expert rank).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_ir
from tests.clients import hf_models
from tests.clients.mcore_harness import HarnessError, job_result, launch

pytestmark = pytest.mark.clients

ATOL = 1e-5
ARCHS = hf_models.MOE_ARCHITECTURES
LAYOUT = {"tp": 1, "ep": 2}
CASES = [(a, "verl-legacy") for a in ARCHS] + [("qwen3_moe", "megatron-legacy")]


@dataclass
class Suite:
    root: Path
    ids: list[list[int]]
    hf: dict[str, Path] = field(default_factory=dict)
    ref: dict[str, torch.Tensor] = field(default_factory=dict)
    written: dict[tuple[str, str], Any] = field(default_factory=dict)
    launch_error: str | None = None

    def logits(self, key: str) -> Path:
        return self.root / "logits" / f"{key}.pt"

    def result(self, key: str) -> torch.Tensor:
        if self.launch_error is not None:
            pytest.fail(f"megatron-core launch failed:\n{self.launch_error}", pytrace=False)
        try:
            return job_result(self.logits(key))
        except HarnessError as e:
            pytest.fail(str(e), pytrace=False)


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return fn(), None
    except Exception:
        return None, traceback.format_exc()


def _write(suite: Suite, arch: str, fmt: str) -> Path:
    dst = suite.root / fmt / arch
    ckpt_ir.convert(suite.hf[arch], dst, to=fmt, layout=LAYOUT, mcore_spec="local")
    return dst


def _config_of(ckpt: Path, fmt: str) -> Path:
    # The HF config ckpt-ir wrote beside the rank files (MTP layers trimmed when absent).
    sub = "hf_config_and_tokenizer" if fmt == "verl-legacy" else "hf_config"
    found = sorted(ckpt.rglob(f"{sub}/config.json")) or sorted(ckpt.rglob("config.json"))
    return found[0]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    s = Suite(root=tmp_path_factory.mktemp("moe_rank"), ids=hf_models.input_ids())
    for i, arch in enumerate(ARCHS):
        s.hf[arch] = hf_models.make_hf_model(arch, s.root / "hf", seed=40 + i)
        s.ref[arch] = hf_models.hf_logits(s.hf[arch], s.ids)
    jobs = []
    for arch, fmt in CASES:
        s.written[arch, fmt] = _attempt(lambda a=arch, f=fmt: _write(s, a, f))
        ckpt, error = s.written[arch, fmt]
        if error is None:
            jobs.append({"command": "load-rank-files", "hf_config": str(_config_of(ckpt, fmt)),
                         "layout": LAYOUT, "ckpt": str(ckpt), "format": fmt,
                         "input_ids": s.ids, "out": str(s.logits(f"{fmt}-{arch}"))})
    for arch in ARCHS:
        jobs.append({"command": "save-rank-files", "hf_config": str(s.hf[arch] / "config.json"),
                     "layout": LAYOUT, "seed": 31, "out_dir": str(s.root / "saved" / arch),
                     "logits_out": str(s.logits(f"saved-{arch}")), "input_ids": s.ids})
    _, s.launch_error = _attempt(lambda: launch("batch", jobs, world_size=2, timeout=400))
    return s


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert expected.std() > 0.1, f"{what}: reference logits are nearly constant"
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs logit diff {diff:.3g} > {ATOL}"


@pytest.mark.parametrize(("arch", "fmt"), CASES, ids=lambda v: v)
def test_expert_parallel_rank_files_load_strictly_and_match_hf(suite: Suite, arch: str,
                                                              fmt: str) -> None:
    ckpt, error = suite.written[arch, fmt]
    if error is not None:
        pytest.fail(f"ckpt_ir.convert({arch} -> {fmt}, EP=2) failed:\n{error}", pytrace=False)
    dirs = sorted(p.parent.name for p in ckpt.rglob("mp_rank_*/*.pt"))
    assert dirs == ["mp_rank_00_000", "mp_rank_00_001"]
    _assert_logits_close(suite.result(f"{fmt}-{arch}"), suite.ref[arch], f"{fmt}-{arch}")


@pytest.mark.parametrize("arch", ARCHS)
def test_megatron_expert_parallel_rank_files_to_hf_match_megatron(suite: Suite, arch: str,
                                                                 tmp_path: Path) -> None:
    expected = suite.result(f"saved-{arch}")
    out = tmp_path / "hf"
    # No --source-ep: each mp_rank_00_00e file holds E/2 experts of a layer, so the suffix is
    # the expert rank (megatron-core's own files carry no ckpt-ir layout record).
    report = ckpt_ir.convert(suite.root / "saved" / arch / "verl", out, to="hf")
    assert report.source_format == "verl-legacy"
    assert report.source_layout.endswith("tp=1 pp=1 ep=2")
    _assert_logits_close(hf_models.hf_logits(out, suite.ids), expected, f"saved-{arch}")
