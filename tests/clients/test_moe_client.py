"""Mixture-of-experts and DeepSeek-V3 checkpoints, proven with transformers 5.23 and real
megatron-core 0.16.1 (CPU, gloo).

For mixtral, qwen2_moe (dense first layer: per-layer torch_dist keys), qwen3_moe and
deepseek_v3 (MLA, sigmoid routing with a score-correction bias, shared expert, dense first
layer), all fp32 with random weights (routing ties impossible):

- HF -> ``mcore-dist`` -> ``dist_checkpointing.load`` into a GPTModel built from
  :func:`ckpt_ir.megatron_config.megatron_args` (SequentialMLP experts, local spec) gives the
  transformers logits (max abs diff <= 1e-5): at TP=1 under ``strict="raise_all"``, and on two
  gloo ranks at TP=2, at EP=2 and at TP=2 with EP=2 (expert TP 1).
- The default output (``mcore_spec="any"``: both specs' norm keys and extra states) loads under
  megatron-core's default strictness.
- megatron-core ``dist_checkpointing.save`` at EP=2 -> ``hf`` -> transformers gives megatron's
  logits; converting back to ``mcore-dist`` reproduces every saved tensor bit for bit (MTP
  layers and routing biases included for deepseek_v3).
- transformers 5's fused expert layout (``--hf-experts fused``) loads in transformers with the
  same logits, and converts to ``mcore-dist`` like the per-expert one.

DeepSeek-V3's MLA runs on CPU only with a test-only core attention
(:class:`tests.clients.mcore_harness.MlaCoreAttention`): megatron-core 0.16.1's local
``DotProductAttention`` cannot take different key and value head sizes; everything else
(projections, norms, interleaved rope, routing) is megatron-core's own code.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_ir
from tests.clients import hf_models
from tests.clients.mcore_harness import HarnessError, job_result, launch
from tests.fixtures import (
    Outcome,
    assert_same_tensors,
    attempt,
    load_dcp_tensors,
    safetensors_bytes,
)

pytestmark = pytest.mark.clients

ATOL = 1e-5
VOCAB = hf_models.VOCAB_SIZE
PAD = 128
ARCHS = hf_models.MOE_ARCHITECTURES

# (tp, ep, etp) on two ranks; None: expert TP = TP (megatron-core's default).
PARALLEL = {"tp2": (2, 1, None), "ep2": (1, 2, 1), "tp2-ep2": (2, 2, 1)}




@dataclass
class Suite:
    root: Path
    ids: list[list[int]]
    hf: dict[str, Path] = field(default_factory=dict)
    ref: dict[str, torch.Tensor] = field(default_factory=dict)
    dist: dict[tuple[str, str], Outcome] = field(default_factory=dict)
    launches: dict[int, Outcome] = field(default_factory=dict)

    def logits(self, key: str) -> Path:
        return self.root / "logits" / f"{key}.pt"

    def result(self, world: int, key: str, *, needs: tuple[str, str] | None = None
               ) -> torch.Tensor:
        if needs is not None:
            self.dist[needs].get(f"ckpt_ir.convert({needs[0]} -> mcore-dist, {needs[1]})")
        self.launches[world].get(f"megatron-core launch on {world} rank(s)")
        try:
            return job_result(self.logits(key))
        except HarnessError as e:
            pytest.fail(str(e), pytrace=False)

    def saved(self, arch: str) -> Path:
        return self.root / "megatron" / arch


VARIANTS: dict[str, dict[str, Any]] = {
    "local": {"mcore_spec": "local"},
    "pad128": {"mcore_spec": "local", "pad_vocab_to_multiple": PAD},
    "default": {},
}


def _convert(suite: Suite, arch: str, variant: str) -> Path:
    dst = suite.root / "dist" / f"{arch}-{variant}"
    src = suite.hf[arch]
    if variant == "fused":
        fused = suite.root / "fused" / arch
        ckpt_ir.convert(src, fused, to="hf", hf_experts="fused")
        src, options = fused, {"mcore_spec": "local"}
    else:
        options = VARIANTS[variant]
    ckpt_ir.convert(src, dst, to="mcore-dist", **options)
    return dst


def _load_job(suite: Suite, arch: str, variant: str, key: str, *, tp: int = 1, ep: int = 1,
              etp: int | None = None, strict: str = "raise_all") -> dict[str, Any]:
    dist = suite.dist[arch, variant].value
    job = {"command": "load-forward", "ckpt": str(dist),
           # The config ckpt-ir wrote beside the weights (MTP layers trimmed if absent).
           "hf_config": str(dist / "hf_config" / "config.json"), "tp": tp,
           "pad_vocab_to_multiple": PAD if variant == "pad128" else None,
           "input_ids": suite.ids, "out": str(suite.logits(key)), "strict": strict,
           "allow_missing": ["common_state"] if strict == "raise_all" else []}
    if ep > 1 or etp is not None:
        job.update(ep=ep, etp=etp)
    return job


def _save_job(suite: Suite, arch: str) -> dict[str, Any]:
    return {"command": "save-random", "hf_config": str(suite.hf[arch] / "config.json"),
            "tp": 1, "ep": 2, "etp": 1, "out_dir": str(suite.saved(arch)),
            "logits_out": str(suite.logits(f"saved-{arch}")), "input_ids": suite.ids,
            "seed": 23}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    s = Suite(root=tmp_path_factory.mktemp("moe"), ids=hf_models.input_ids())
    for i, arch in enumerate(ARCHS):
        s.hf[arch] = hf_models.make_hf_model(arch, s.root / "hf", seed=10 + i)
        s.ref[arch] = hf_models.hf_logits(s.hf[arch], s.ids)
        for variant in ("local", "pad128", "default", "fused"):
            s.dist[arch, variant] = attempt(lambda a=arch, v=variant: _convert(s, a, v))

    jobs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for arch in ARCHS:
        ok = {v for (a, v), o in s.dist.items() if a == arch and o.error is None}
        if "local" in ok:
            jobs[1].append(_load_job(s, arch, "local", f"tp1-{arch}"))
        if "default" in ok:
            jobs[1].append(_load_job(s, arch, "default", f"default-{arch}",
                                     strict="assume_ok_unexpected"))
        if "fused" in ok:
            jobs[1].append(_load_job(s, arch, "fused", f"fused-{arch}"))
        if "pad128" in ok:
            for name, (tp, ep, etp) in PARALLEL.items():
                jobs[2].append(_load_job(s, arch, "pad128", f"{name}-{arch}", tp=tp, ep=ep,
                                         etp=etp))
        jobs[2].append(_save_job(s, arch))
    # The two launches overlap: most of a rank's time is importing megatron-core.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {w: pool.submit(attempt, lambda w=w: launch("batch", jobs[w], world_size=w,
                                                               timeout=400))
                   for w in jobs}
        s.launches = {w: f.result() for w, f in futures.items()}
    return s


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert expected.std() > 0.1, f"{what}: reference logits are nearly constant"
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs logit diff {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("arch", ARCHS)
def test_mcore_dist_loads_strictly_and_matches_hf_logits(suite: Suite, arch: str) -> None:
    logits = suite.result(1, f"tp1-{arch}", needs=(arch, "local"))
    _assert_logits_close(logits, suite.ref[arch], f"tp1-{arch}")


@pytest.mark.parametrize("layout", PARALLEL)
@pytest.mark.parametrize("arch", ARCHS)
def test_mcore_dist_matches_hf_logits_with_tensor_and_expert_parallelism(
        suite: Suite, arch: str, layout: str) -> None:
    logits = suite.result(2, f"{layout}-{arch}", needs=(arch, "pad128"))
    assert logits.shape[-1] == 384  # 301 padded to a multiple of 128
    _assert_logits_close(logits[..., :VOCAB], suite.ref[arch], f"{layout}-{arch}")


@pytest.mark.parametrize("arch", ARCHS)
def test_default_output_loads_under_default_strictness(suite: Suite, arch: str) -> None:
    logits = suite.result(1, f"default-{arch}", needs=(arch, "default"))
    _assert_logits_close(logits, suite.ref[arch], f"default-{arch}")


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_hf_experts_load_in_transformers_and_megatron(suite: Suite, arch: str) -> None:
    suite.dist[arch, "fused"].get(f"{arch}: hf -> hf --hf-experts fused -> mcore-dist")
    fused = suite.root / "fused" / arch
    names = safetensors_bytes(fused)
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in names)
    assert not any(".experts.0." in n for n in names if not _is_mtp(n, suite.hf[arch]))
    _assert_logits_close(hf_models.hf_logits(fused, suite.ids), suite.ref[arch],
                         f"transformers on fused {arch}")
    logits = suite.result(1, f"fused-{arch}")
    _assert_logits_close(logits, suite.ref[arch], f"megatron on fused {arch}")


def _is_mtp(name: str, hf_dir: Path) -> bool:
    layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    parts = name.split(".")
    return name.startswith("model.layers.") and int(parts[2]) >= layers


@pytest.mark.parametrize("arch", ARCHS)
def test_megatron_saved_moe_to_hf_matches_and_converts_back_bit_for_bit(
        suite: Suite, arch: str, tmp_path: Path) -> None:
    expected = suite.result(2, f"saved-{arch}")
    hf_out = tmp_path / "hf"
    report = ckpt_ir.convert(suite.saved(arch), hf_out, to="hf", hf_config=suite.hf[arch])
    assert report.source_format == "mcore-dist"
    _assert_logits_close(hf_models.hf_logits(hf_out, suite.ids), expected, f"saved-{arch}")
    back = tmp_path / "dist"
    ckpt_ir.convert(hf_out, back, to="mcore-dist", mcore_spec="local")
    saved, ours = load_dcp_tensors(suite.saved(arch)), load_dcp_tensors(back)
    assert sorted(ours) == sorted(saved)
    changed = [k for k in saved if not torch.equal(saved[k].view(torch.uint8),
                                                   ours[k].view(torch.uint8))]
    assert not changed, f"tensors differ after megatron -> hf -> mcore-dist: {changed}"
    if arch == "deepseek_v3":
        assert any(k.startswith("mtp.layers.0.") for k in saved)
        assert any(k.endswith("router.expert_bias") for k in saved)


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_mcore_dist_hf_round_trip_is_bit_identical(suite: Suite, arch: str,
                                                      tmp_path: Path) -> None:
    dist = suite.dist[arch, "default"].get(f"ckpt_ir.convert({arch} -> mcore-dist)")
    back = tmp_path / "hf"
    ckpt_ir.convert(dist, back, to="hf")
    assert_same_tensors(suite.hf[arch], back)



