"""seed_oss (Seed-OSS-36B) with real clients: transformers 5.23, megatron-core 0.16.1 (CPU, gloo).

A tiny random ``SeedOssForCausalLM`` (``hf_models``: Seed-OSS-36B's config shrunk, its flags
kept: q/k/v biases without an o_proj bias, ``head_dim`` 24 != hidden / heads 16, GQA, untied,
dropouts 0.1), 4 layers.

- Forward: HF -> ckpt-ir -> megatron-core GPTModel built from :func:`ckpt_ir.megatron_args`
  (local spec): ``mcore-dist`` at TP=1 and TP=2 (vocab padded to 384) via
  ``dist_checkpointing.load`` under ``raise_all``, and ``verl-legacy`` / ``megatron-legacy``
  rank files at TP=2 and PP=2 via ``load_state_dict(strict=True)``; the logits equal
  transformers' (fp32, max abs diff <= 1e-5).
- Round trips: HF -> ``mcore-dist`` / ``verl-legacy`` / ``megatron-legacy`` (TP=2, PP=2) -> HF
  reproduces every tensor bit for bit and the config, and the reloaded model's logits equal
  the source's exactly.
- Reverse: GPTModels randomised by megatron-core at TP=2 (vocab padded to 384), saved with
  ``dist_checkpointing.save`` and as verl / Megatron-LM rank files, convert to HF weights whose
  transformers logits equal megatron's.

megatron-core runs in subprocesses (``mcore_harness``): one launch of one rank and one of two,
started together by the module fixture.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_ir
from tests.clients import hf_models
from tests.clients.mcore_harness import launch
from tests.clients.suites import MegatronSuite, convert_to
from tests.fixtures import assert_same_hf, attempt, safetensors_bytes

pytestmark = pytest.mark.clients

ATOL = 1e-5
VOCAB = hf_models.VOCAB_SIZE
PAD = 128
LAYERS = 4
FORMATS = ("verl-legacy", "megatron-legacy")

# name -> (ckpt_ir.convert keyword arguments, ranks of the megatron-core launch that loads it)
DIST = {
    "dist-tp1": ({"mcore_spec": "local"}, 1),
    "dist-tp2": ({"mcore_spec": "local", "pad_vocab_to_multiple": PAD}, 2),
    "dist-default": ({}, None),  # round trip only
}
LAYOUTS: dict[str, tuple[dict[str, int], int | None]] = {
    "tp2": ({"tp": 2, "pp": 1}, PAD),  # 301 rows do not split over 2 ranks
    "pp2": ({"tp": 1, "pp": 2}, None),
}
RANK_CASES = [(fmt, lay) for fmt in FORMATS for lay in LAYOUTS]
LOAD_KEYS = ["dist-tp1", "dist-tp2", *(f"{fmt}-{lay}" for fmt, lay in RANK_CASES)]




Suite = MegatronSuite


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    root = tmp_path_factory.mktemp("seed_oss")
    ids = hf_models.input_ids()
    hf = hf_models.make_hf_model("seed_oss", root / "hf", seed=3, num_hidden_layers=LAYERS)
    s = Suite(root=root, hf=hf, ids=ids, ref=hf_models.hf_logits(hf, ids))
    common = {"hf_config": str(hf / "config.json"), "input_ids": ids}
    jobs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for key, (kwargs, ranks) in DIST.items():
        s.written[key] = attempt(lambda key=key, kwargs=kwargs: convert_to(
            hf, root / "written" / key, to="mcore-dist", **kwargs))
        if ranks is not None and s.written[key].error is None:
            jobs[ranks].append({
                **common, "command": "load-forward", "ckpt": str(s.written[key].value),
                "tp": ranks, "pad_vocab_to_multiple": kwargs.get("pad_vocab_to_multiple"),
                "strict": "raise_all", "allow_missing": ["common_state"],
                "out": str(root / "logits" / f"{key}.pt")})
    for fmt, lay in RANK_CASES:
        key, (fields, pad) = f"{fmt}-{lay}", LAYOUTS[lay]
        s.written[key] = attempt(lambda key=key, fmt=fmt, fields=fields, pad=pad: convert_to(
            hf, root / "written" / key, to=fmt, layout=fields, mcore_spec="local",
            pad_vocab_to_multiple=pad))
        if s.written[key].error is None:
            jobs[2].append({**common, "command": "load-rank-files", "layout": fields,
                            "pad_vocab_to_multiple": pad, "format": fmt,
                            "ckpt": str(s.written[key].value),
                            "out": str(root / "logits" / f"{key}.pt")})
    saved = {**common, "tp": 2, "pad_vocab_to_multiple": PAD}
    jobs[2].append({**saved, "command": "save-random", "seed": 17,
                    "out_dir": str(s.saved("dist")),
                    "logits_out": str(root / "logits" / "saved-dist.pt")})
    jobs[2].append({**saved, "command": "save-rank-files", "layout": LAYOUTS["tp2"][0],
                    "seed": 101, "out_dir": str(s.saved("rank-files")),
                    "logits_out": str(root / "logits" / "saved-rank-files.pt")})
    # The two launches overlap: most of a rank's time is importing megatron-core.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(attempt, lambda n=n: launch("batch", jobs[n], world_size=n,
                                                                timeout=400))
                   for n in jobs}
        s.launches = {n: f.result() for n, f in futures.items()}
    return s



def test_the_tiny_model_has_seed_oss_tensors(suite: Suite) -> None:
    names = set(safetensors_bytes(suite.hf))
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" in names
    shapes = {n: s for n, (_, s, _) in safetensors_bytes(suite.hf).items()}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4 * 24, 64)


@pytest.mark.parametrize("key", LOAD_KEYS)
def test_megatron_core_reproduces_transformers_logits(suite: Suite, key: str) -> None:
    logits = suite.logits(key, 1 if key == "dist-tp1" else 2)[..., :VOCAB]
    assert logits.shape == suite.ref.shape
    # Random weights are scaled so the logits are O(1): the tolerance means something.
    assert suite.ref.std() > 0.1
    diff = (logits - suite.ref).abs().max().item()
    assert diff <= ATOL, f"{key}: max abs logit diff {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("key", ["dist-default", "dist-tp2", *(f"{f}-{lay}"
                                                               for f, lay in RANK_CASES)])
def test_round_trip_to_hf_is_bit_identical(suite: Suite, key: str, tmp_path: Path) -> None:
    src = suite.written[key].get(f"ckpt_ir.convert(hf -> {key})")
    back = tmp_path / "hf"
    # Each output carries the HF config (mcore-dist's metadata, the per-rank formats'
    # hf_config_and_tokenizer/): nothing else is passed.
    ckpt_ir.convert(src, back, to="hf")
    assert_same_hf(suite.hf, back)
    assert torch.equal(hf_models.hf_logits(back, suite.ids), suite.ref)


# Saved by megatron-core -> (path under Suite.saved, the source format ckpt-ir detects,
# --hf-config). Megatron-LM args hold only the padded vocabulary (384 rows), and name no HF
# architecture (ckpt-ir would infer qwen2 from add_qkv_bias): the HF config says both.
REVERSE = {
    "dist": ("dist", "mcore-dist", True),
    "verl": ("rank-files/verl", "verl-legacy", False),  # carries hf_config_and_tokenizer/
    "megatron": ("rank-files/megatron", "megatron-legacy", True),
}


@pytest.mark.parametrize("name", REVERSE)
def test_megatron_saved_checkpoint_to_hf_matches_megatron_logits(
        suite: Suite, name: str, tmp_path: Path) -> None:
    path, fmt, needs_config = REVERSE[name]
    expected = suite.logits("saved-dist" if name == "dist" else "saved-rank-files", 2)
    report = ckpt_ir.convert(suite.saved(path), tmp_path / "hf", to="hf",
                             hf_config=suite.hf if needs_config else None)
    assert report.source_format == fmt
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == \
        ["SeedOssForCausalLM"]
    logits = hf_models.hf_logits(tmp_path / "hf", suite.ids)
    assert expected.std() > 0.1
    diff = (logits - expected[..., :VOCAB]).abs().max().item()
    assert diff <= ATOL, f"{name}: max abs logit diff {diff:.3g} > {ATOL}"
