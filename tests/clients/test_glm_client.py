"""GLM-4.5 / 4.5-Air (``glm4_moe``), GLM-4.7-Flash (``glm4_moe_lite``), DeepSeek-V3.2
(``deepseek_v32``) and GLM-5 (``glm_moe_dsa``) with real clients: transformers 5.23 and
megatron-core 0.16.1 (CPU, gloo).

Tiny random models (``glm_models``: each family's real config shrunk, every structural flag
kept), fp32:

- Round trips, every family: HF -> ``mcore-dist`` -> HF, HF -> ``verl-legacy`` at TP=2 / PP=2
  -> HF and HF -> ``megatron-legacy`` at EP=2 -> HF reproduce every tensor bit for bit and the
  config, and the reloaded model's logits equal the source's exactly. transformers 5's fused
  expert layout (``--hf-experts fused``) reads back to the same per-expert bytes.
- MTP: an MTP layer written into the safetensors as the hub holds it (transformers neither
  builds nor saves one) round-trips HF -> ``mcore-dist`` -> HF bit for bit for glm4_moe and
  glm_moe_dsa, its embedding / head copies aside (not IR tensors; written back where the
  family has hf copy rows).
- megatron-core: GPTModels built from :func:`ckpt_ir.megatron_args` (local spec, SequentialMLP)
  load ckpt-ir's torch_dist output under ``strict="raise_all"`` and reproduce transformers'
  logits (<= 1e-5): glm4_moe (partial rotary, q/k/v bias, QK norm, sigmoid routing with expert
  bias and scaling, shared expert, dense first layer) at TP=1 with and without its MTP layer,
  and at TP=2 x EP=2 with a padded vocabulary; GLM-4.5-Air; glm4_moe_lite (MLA through the
  harness's test-only core attention); ckpt-ir's megatron-legacy EP=2 rank files of GLM-4.5
  with its MTP layer load with ``strict=True``; megatron-core's own random GLM-4.5 (MTP
  layer, EP=2) converts to HF with megatron's logits and back bit for bit. DSA cannot be
  built by megatron-core 0.16.1 on CPU (its names are pinned by tests/unit/test_glm.py).
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
from tests.clients import glm_models, hf_models
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
FAMILIES = tuple(glm_models.FAMILIES)
MTP_FAMILIES = ("glm4_moe", "glm_moe_dsa")
EPS = "glm4_moe_lite-eps1e-5"

# name -> (ckpt_ir.convert keyword arguments)
WRITES: dict[str, dict[str, Any]] = {
    "dist": {"to": "mcore-dist"},
    "dist-local": {"to": "mcore-dist", "mcore_spec": "local"},
    "verl-tp2-pp2": {"to": "verl-legacy", "mcore_spec": "local", "pad_vocab_to_multiple": PAD,
                     "layout": {"tp": 2, "pp": 2, "first_stage_layers": 1}},
    "megatron-ep2": {"to": "megatron-legacy", "mcore_spec": "local",
                     "layout": {"tp": 1, "ep": 2}},
}
ROUND_TRIPS = ("dist", "verl-tp2-pp2", "megatron-ep2")
# (family, write) loaded on one rank at TP=1.
ONE_RANK = [("glm4_moe", "dist-local"), ("glm4_moe_air", "dist-local"),
            ("glm4_moe_lite", "dist-local"), ("glm4_moe", "mtp")]


@dataclass
class Suite:
    root: Path
    ids: list[list[int]]
    hf: dict[str, Path] = field(default_factory=dict)
    ref: dict[str, torch.Tensor] = field(default_factory=dict)
    written: dict[tuple[str, str], Outcome] = field(default_factory=dict)
    launches: dict[int, Outcome] = field(default_factory=dict)

    def get(self, family: str, write: str) -> Path:
        return self.written[family, write].get(f"ckpt_ir.convert({family}, {write})")

    def logits(self, key: str) -> Path:
        return self.root / "logits" / f"{key}.pt"

    def result(self, world: int, key: str) -> torch.Tensor:
        self.launches[world].get(f"the megatron-core launch on {world} rank(s)")
        try:
            return job_result(self.logits(key))
        except HarnessError as e:
            pytest.fail(str(e), pytrace=False)


def _write(s: Suite, family: str, write: str) -> Path:
    dst = s.root / "written" / f"{family}-{write}"
    if write == "mtp":
        src = glm_models.add_mtp_layer(s.hf[family], s.root / "mtp" / family, seed=5)
        ckpt_ir.convert(src, dst, to="mcore-dist", mcore_spec="local")
    elif write == "fused":
        fused = s.root / "fused" / family
        ckpt_ir.convert(s.hf[family], fused, to="hf", hf_experts="fused")
        ckpt_ir.convert(fused, dst, to="mcore-dist")
    else:
        ckpt_ir.convert(s.hf[family], dst, **WRITES[write])
    return dst


def _convert_to(src: Path, dst: Path, **kwargs: Any) -> Path:
    ckpt_ir.convert(src, dst, **kwargs)
    return dst


def _load_job(s: Suite, family: str, write: str, key: str, *, tp: int = 1, ep: int = 1,
              pad: int | None = None) -> dict[str, Any]:
    dist = s.get(family, write)
    job = {"command": "load-forward", "ckpt": str(dist),
           # The config ckpt-ir wrote beside the weights (MTP layers trimmed when absent).
           "hf_config": str(dist / "hf_config" / "config.json"), "tp": tp,
           "pad_vocab_to_multiple": pad, "input_ids": s.ids, "out": str(s.logits(key)),
           "strict": "raise_all", "allow_missing": ["common_state"]}
    if ep > 1:
        job.update(ep=ep, etp=1)
    return job


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    s = Suite(root=tmp_path_factory.mktemp("glm"), ids=hf_models.input_ids())
    for i, family in enumerate(FAMILIES):
        s.hf[family] = glm_models.make_hf_model(family, s.root / "hf", seed=60 + i)
        s.ref[family] = hf_models.hf_logits(s.hf[family], s.ids)
        for write in (*WRITES, "fused", *(("mtp",) if family in MTP_FAMILIES else ())):
            s.written[family, write] = attempt(lambda f=family, w=write: _write(s, f, w))
    jobs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for family, write in ONE_RANK:
        if s.written[family, write].error is None:
            jobs[1].append(_load_job(s, family, write, f"tp1-{family}-{write}"))
    # GLM-4.7-Flash's own rms_norm_eps (1e-5), which megatron-core also applies to q_a / kv_a.
    s.hf[EPS] = glm_models.make_hf_model("glm4_moe_lite", s.root / "hf", seed=70, name=EPS,
                                         rms_norm_eps=1e-5)
    s.ref[EPS] = hf_models.hf_logits(s.hf[EPS], s.ids)
    s.written[EPS, "dist-local"] = attempt(lambda: _write(s, EPS, "dist-local"))
    if s.written[EPS, "dist-local"].error is None:
        jobs[1].append(_load_job(s, EPS, "dist-local", f"tp1-{EPS}"))
    pad = f"glm4_moe-pad{PAD}"
    s.written["glm4_moe", pad] = attempt(lambda: ckpt_ir.convert(
        s.hf["glm4_moe"], s.root / "written" / pad, to="mcore-dist", mcore_spec="local",
        pad_vocab_to_multiple=PAD) and s.root / "written" / pad)
    if s.written["glm4_moe", pad].error is None:
        jobs[2].append(_load_job(s, "glm4_moe", pad, "tp2-ep2-glm4_moe", tp=2, ep=2, pad=PAD))
    # GLM-4.5 with its MTP layer as megatron-legacy rank files at EP=2.
    s.written["glm4_moe", "mtp-ep2"] = attempt(lambda: _convert_to(
        s.root / "mtp" / "glm4_moe", s.root / "written" / "glm4_moe-mtp-ep2",
        to="megatron-legacy", layout={"tp": 1, "ep": 2}, mcore_spec="local"))
    ep2 = s.written["glm4_moe", "mtp-ep2"]
    if ep2.error is None:
        jobs[2].append({"command": "load-rank-files", "layout": {"tp": 1, "ep": 2},
                        # The config ckpt-ir wrote beside the rank files: one MTP layer.
                        "hf_config": str(sorted(ep2.value.rglob("hf_config/config.json"))[0]),
                        "format": "megatron-legacy", "ckpt": str(ep2.value),
                        "input_ids": s.ids, "out": str(s.logits("ep2-rank-files-glm4_moe"))})
    # megatron-core's own GLM-4.5 (MTP layer included), random weights, EP=2.
    jobs[2].append({"command": "save-random", "hf_config": str(s.hf["glm4_moe"] / "config.json"),
                    "tp": 1, "ep": 2, "etp": 1, "out_dir": str(s.root / "megatron"),
                    "logits_out": str(s.logits("saved-glm4_moe")), "input_ids": s.ids,
                    "seed": 23})
    # The two launches overlap: most of a rank's time is importing megatron-core.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {w: pool.submit(attempt, lambda w=w: launch("batch", jobs[w], world_size=w,
                                                               timeout=400))
                   for w in jobs}
        s.launches = {w: f.result() for w, f in futures.items()}
    return s


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    # Random weights are scaled so the logits are O(1): the tolerance means something.
    assert expected.std() > 0.1, f"{what}: reference logits are nearly constant"
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs logit diff {diff:.3g} > {ATOL}"


def test_the_tiny_models_have_each_familys_tensors(suite: Suite) -> None:
    shapes = {f: {n: s for n, (_, s, _) in safetensors_bytes(suite.hf[f]).items()}
              for f in FAMILIES}
    glm = shapes["glm4_moe"]
    assert glm["model.layers.0.self_attn.q_proj.weight"] == (4 * 24, 64)
    assert glm["model.layers.0.self_attn.q_proj.bias"] == (4 * 24,)
    assert "model.layers.0.self_attn.o_proj.bias" not in glm
    assert glm["model.layers.1.self_attn.q_norm.weight"] == (24,)
    assert "model.layers.0.mlp.gate_proj.weight" in glm  # dense first layer
    assert glm["model.layers.1.mlp.gate.e_score_correction_bias"] == (6,)
    assert glm["model.layers.1.mlp.shared_experts.down_proj.weight"] == (64, 32)
    assert "model.layers.1.self_attn.q_norm.weight" not in shapes["glm4_moe_air"]
    assert shapes["glm4_moe_lite"]["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == \
        (24 + 8, 64)
    for dsa in ("deepseek_v32", "glm_moe_dsa"):
        assert shapes[dsa]["model.layers.2.self_attn.indexer.wq_b.weight"] == (2 * 16, 32)
        assert shapes[dsa]["model.layers.0.self_attn.indexer.k_norm.bias"] == (16,)
    config = json.loads((suite.hf["glm4_moe"] / "config.json").read_text())
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert "partial_rotary_factor" not in config  # transformers 5.23 keeps it only there


@pytest.mark.parametrize("write", ROUND_TRIPS)
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_to_hf_is_bit_identical(suite: Suite, family: str, write: str,
                                           tmp_path: Path) -> None:
    back = tmp_path / "hf"
    # Each output carries the HF config: nothing else is passed.
    ckpt_ir.convert(suite.get(family, write), back, to="hf")
    assert_same_tensors(suite.hf[family], back)
    # The config announces an MTP layer that transformers did not save: ckpt-ir trims the
    # count to what the files hold (ModelConfig.without_mtp), and says nothing else changed.
    expected = {**json.loads((suite.hf[family] / "config.json").read_text()),
                "num_nextn_predict_layers": 0}
    assert json.loads((back / "config.json").read_text()) == expected
    assert torch.equal(hf_models.hf_logits(back, suite.ids), suite.ref[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_hf_experts_read_like_per_expert_ones(suite: Suite, family: str,
                                                   tmp_path: Path) -> None:
    dist = suite.get(family, "fused")
    fused = safetensors_bytes(suite.root / "fused" / family)
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused
    assert not any(".experts.0." in n for n in fused)
    ckpt_ir.convert(dist, tmp_path / "hf", to="hf")
    assert_same_tensors(suite.hf[family], tmp_path / "hf")


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_hf_experts_load_in_transformers(suite: Suite, family: str) -> None:
    suite.get(family, "fused")
    logits = hf_models.hf_logits(suite.root / "fused" / family, suite.ids)
    _assert_logits_close(logits, suite.ref[family], f"transformers on fused {family}")


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_layer_round_trips_bit_for_bit(suite: Suite, family: str, tmp_path: Path) -> None:
    dist = suite.get(family, "mtp")
    keys = load_dcp_tensors(dist)
    assert "mtp.layers.0.eh_proj.weight" in keys
    assert any(k.startswith("mtp.layers.0.transformer_layer.mlp.experts.") for k in keys)
    if family == "glm_moe_dsa":
        assert "mtp.layers.0.transformer_layer.self_attention.core_attention.indexer." \
               "linear_wq_b.weight" in keys
    report = ckpt_ir.convert(dist, tmp_path / "hf", to="hf")
    source = safetensors_bytes(suite.root / "mtp" / family)
    result = safetensors_bytes(tmp_path / "hf")
    # The MTP layer's embedding / head copies are not IR tensors (megatron-core shares the
    # model's): the hf writer's copy rows write them back from the embedding and the head.
    layers = json.loads((suite.hf[family] / "config.json").read_text())["num_hidden_layers"]
    copies = {f"model.layers.{layers}.{c}" for c in glm_models.MTP_COPIES}
    assert copies <= set(result)
    assert sorted(result) == sorted(source)
    changed = [n for n in result if result[n] != source[n]]
    assert not changed, f"tensors differ after the round trip: {changed}"
    assert report.tensors_written == len(result)


@pytest.mark.parametrize(("family", "write"), ONE_RANK, ids=lambda v: v)
def test_megatron_core_loads_strictly_and_matches_transformers(suite: Suite, family: str,
                                                               write: str) -> None:
    logits = suite.result(1, f"tp1-{family}-{write}")
    _assert_logits_close(logits, suite.ref[family], f"{family} {write}")


def test_megatron_core_matches_transformers_at_tp2_ep2(suite: Suite) -> None:
    logits = suite.result(2, "tp2-ep2-glm4_moe")
    assert logits.shape[-1] == 384  # 301 padded to a multiple of 128
    _assert_logits_close(logits[..., :VOCAB], suite.ref["glm4_moe"], "glm4_moe tp2 ep2")


def test_glm_flash_eps_differs_only_by_the_q_kv_norm_epsilon(suite: Suite) -> None:
    """At GLM-4.7-Flash's rms_norm_eps=1e-5 transformers still normalises q_a / kv_a with
    1e-6 and megatron-core cannot: the mapping is the one proven exact above, the logits
    differ by the epsilon alone (2.2e-5 measured), and megatron_args says so."""
    logits = suite.result(1, f"tp1-{EPS}")
    diff = (logits - suite.ref[EPS]).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff:.3g}"
    notes = ckpt_ir.megatron_args(json.loads((suite.hf[EPS] / "config.json").read_text())).notes
    assert any("transformers normalises q_a / kv_a with eps 1e-6" in n for n in notes)


def test_megatron_core_loads_expert_parallel_rank_files(suite: Suite) -> None:
    """megatron-legacy EP=2 of GLM-4.5 with its MTP layer: each rank's GPTModel (MTP block
    included) loads its file with strict=True and gives transformers' logits."""
    suite.get("glm4_moe", "mtp-ep2")
    logits = suite.result(2, "ep2-rank-files-glm4_moe")
    _assert_logits_close(logits, suite.ref["glm4_moe"], "glm4_moe megatron-legacy ep2")


def test_megatron_saved_glm_to_hf_matches_and_converts_back_bit_for_bit(
        suite: Suite, tmp_path: Path) -> None:
    """megatron-core's torch_dist of a random GLM-4.5 with its MTP layer -> HF: transformers
    gives megatron's logits; back to mcore-dist every saved tensor is reproduced, the MTP
    layer's and the routing biases included."""
    expected = suite.result(2, "saved-glm4_moe")
    hf_out = tmp_path / "hf"
    report = ckpt_ir.convert(suite.root / "megatron", hf_out, to="hf",
                             hf_config=suite.hf["glm4_moe"])
    assert report.source_format == "mcore-dist"
    _assert_logits_close(hf_models.hf_logits(hf_out, suite.ids), expected, "saved glm4_moe")
    back = tmp_path / "dist"
    ckpt_ir.convert(hf_out, back, to="mcore-dist", mcore_spec="local")
    saved, ours = load_dcp_tensors(suite.root / "megatron"), load_dcp_tensors(back)
    assert sorted(ours) == sorted(saved)
    changed = [k for k in saved if not torch.equal(saved[k].view(torch.uint8),
                                                   ours[k].view(torch.uint8))]
    assert not changed, f"tensors differ after megatron -> hf -> mcore-dist: {changed}"
    assert "mtp.layers.0.transformer_layer.self_attention.linear_qkv.bias" in saved
    assert "decoder.layers.1.mlp.router.expert_bias" in saved
