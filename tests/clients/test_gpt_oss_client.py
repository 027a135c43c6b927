"""gpt_oss with real clients: transformers 5.23, megatron-core 0.16.1 (CPU, gloo).

A tiny random ``GptOssForCausalLM`` (``gpt_oss_models``: gpt-oss-20b's config shrunk, every
structural flag kept: sinks, q/k/v/o, router and expert biases, interleaved input-major fused
experts, alternating sliding window, clamped SwiGLU, YaRN), 4 layers, 4 experts, top-2.

- Forward: HF -> ckpt-ir -> megatron-core GPTModel built from :func:`ckpt_ir.megatron_args`
  (local spec, SequentialMLP, ``quick_gelu`` with the clamp and offset, learnable softmax
  offset, YaRN attributes set on the config): ``mcore-dist`` at TP=1 and TP=2 (vocab padded
  to 384) through ``dist_checkpointing.load`` under ``raise_all``, and ``megatron-legacy`` rank
  files at EP=2 through ``load_state_dict(strict=True)``; the logits equal transformers' eager
  fp32 logits within 1e-5 (measured 1e-6 or less; the reference's independent code measured
  1.6e-5 on a larger model). megatron-core's sliding-window mask is built on the CPU by the
  harness's test-only shim (tests/clients/mcore_harness.py).
- Reverse: GPTModels randomised by megatron-core, saved with ``dist_checkpointing`` (TP=1) and
  as verl / Megatron-LM rank files (EP=2), convert to HF weights whose transformers logits
  equal megatron's.
- Round trips: HF -> ``mcore-dist`` / ``verl-legacy`` (TP=2, PP=2) / ``megatron-legacy``
  (EP=2) -> HF reproduces every tensor bit for bit and the config, and the reloaded model's
  logits equal the source's exactly.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_ir
from tests.clients import gpt_oss_models, hf_models
from tests.clients.mcore_harness import launch
from tests.clients.suites import MegatronSuite, convert_to
from tests.fixtures import attempt, safetensors_bytes

pytestmark = pytest.mark.clients

ATOL = 1e-5
VOCAB = gpt_oss_models.VOCAB_SIZE
PAD = 128

# name -> (ckpt_ir.convert keyword arguments, ranks of the megatron-core job that loads it)
WRITES: dict[str, tuple[dict[str, Any], int | None]] = {
    "dist-tp1": ({"to": "mcore-dist", "mcore_spec": "local"}, 1),
    "dist-tp2": ({"to": "mcore-dist", "mcore_spec": "local", "pad_vocab_to_multiple": PAD}, 2),
    "dist-default": ({"to": "mcore-dist"}, None),  # TE spec keys: round trip only
    # Per-rank files: TP=1 (their expert TP is TP, and biased experts need expert TP 1).
    "verl-pp2": ({"to": "verl-legacy", "layout": {"tp": 1, "pp": 2}, "mcore_spec": "local"},
                 None),
    "megatron-ep2": ({"to": "megatron-legacy", "layout": {"tp": 1, "ep": 2},
                      "mcore_spec": "local"}, 2),
}
LOAD_KEYS = [k for k, (_, ranks) in WRITES.items() if ranks]


Suite = MegatronSuite


def _config_of(ckpt: Path) -> Path:
    # The HF config ckpt-ir wrote beside megatron-legacy rank files.
    return sorted(ckpt.rglob("hf_config/config.json"))[0]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    root = tmp_path_factory.mktemp("gpt_oss")
    ids = gpt_oss_models.input_ids()
    hf = gpt_oss_models.make_gpt_oss(root / "hf", seed=5)
    s = Suite(root=root, hf=hf, ids=ids, ref=hf_models.hf_logits(hf, ids))
    common = {"hf_config": str(hf / "config.json"), "input_ids": ids}
    jobs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for key, (kwargs, ranks) in WRITES.items():
        s.written[key] = attempt(lambda key=key, kwargs=kwargs: convert_to(
            hf, root / "written" / key, **kwargs))
        if ranks is None or s.written[key].error is not None:
            continue
        out = str(root / "logits" / f"{key}.pt")
        ckpt = s.written[key].value
        if kwargs["to"] == "mcore-dist":
            # Expert TP 1 (megatron-core: "Bias in Moe is only supported when ETP==1").
            jobs[ranks].append({
                **common, "command": "load-forward", "ckpt": str(ckpt), "tp": ranks,
                "ep": 1, "etp": 1, "pad_vocab_to_multiple": kwargs.get("pad_vocab_to_multiple"),
                "strict": "raise_all", "allow_missing": ["common_state"], "out": out})
        else:
            jobs[ranks].append({
                **common, "command": "load-rank-files", "hf_config": str(_config_of(ckpt)),
                "layout": kwargs["layout"], "format": kwargs["to"], "ckpt": str(ckpt),
                "out": out})
    jobs[1].append({**common, "command": "save-random", "tp": 1, "seed": 23,
                    "out_dir": str(root / "saved" / "dist"),
                    "logits_out": str(root / "logits" / "saved-dist.pt")})
    # megatron-core's own EP=2 rank files (each rank's experts drawn apart).
    jobs[2].append({**common, "command": "save-rank-files", "layout": {"tp": 1, "ep": 2},
                    "seed": 29, "out_dir": str(root / "saved" / "ranks"),
                    "logits_out": str(root / "logits" / "saved-ranks.pt")})
    # The two launches overlap: most of a rank's time is importing megatron-core.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(attempt, lambda n=n: launch("batch", jobs[n], world_size=n,
                                                                timeout=400))
                   for n in jobs}
        s.launches = {n: f.result() for n, f in futures.items()}
    return s


def test_the_tiny_model_has_gpt_oss_tensors(suite: Suite) -> None:
    shapes = {n: s for n, (_, s, _) in safetensors_bytes(suite.hf).items()}
    p = "model.layers.0."
    assert shapes[p + "self_attn.sinks"] == (4,)
    assert shapes[p + "self_attn.o_proj.bias"] == (64,)
    assert shapes[p + "mlp.router.bias"] == (4,)
    # Input-major fused experts: [E, H, 2F], [E, 2F], [E, F, H], [E, H].
    assert shapes[p + "mlp.experts.gate_up_proj"] == (4, 64, 96)
    assert shapes[p + "mlp.experts.gate_up_proj_bias"] == (4, 96)
    assert shapes[p + "mlp.experts.down_proj"] == (4, 48, 64)
    assert shapes[p + "mlp.experts.down_proj_bias"] == (4, 64)
    config = json.loads((suite.hf / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2


@pytest.mark.parametrize("key", LOAD_KEYS)
def test_megatron_core_reproduces_transformers_logits(suite: Suite, key: str) -> None:
    logits = suite.logits(key, WRITES[key][1] or 0)[..., :VOCAB]
    assert logits.shape == suite.ref.shape
    # Random weights are scaled so the logits are O(1): the tolerance means something.
    assert suite.ref.std() > 0.1
    diff = (logits - suite.ref).abs().max().item()
    assert diff <= ATOL, f"{key}: max abs logit diff {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("key", list(WRITES))
def test_round_trip_to_hf_is_bit_identical(suite: Suite, key: str, tmp_path: Path) -> None:
    src = suite.written[key].get(f"ckpt_ir.convert(hf -> {key})")
    back = tmp_path / "hf"
    # Each output carries the HF config (mcore-dist's metadata, the per-rank formats' config
    # directory): nothing else is passed.
    ckpt_ir.convert(src, back, to="hf")
    source, result = safetensors_bytes(suite.hf), safetensors_bytes(back)
    assert sorted(result) == sorted(source)
    changed = [n for n in source if result[n] != source[n]]
    assert not changed, f"tensors differ after the round trip: {changed}"
    assert json.loads((back / "config.json").read_text()) == \
        json.loads((suite.hf / "config.json").read_text())
    assert torch.equal(hf_models.hf_logits(back, suite.ids), suite.ref)


# Saved by megatron-core -> (path under root/saved, launch ranks, the source format ckpt-ir
# detects, --hf-config). Megatron-LM args name no HF architecture (add_bias_linear alone is
# refused): its HF config is passed; verl's files carry theirs.
REVERSE = {
    "dist": ("dist", 1, "mcore-dist", True),
    "verl-ep2": ("ranks/verl", 2, "verl-legacy", False),
    "megatron-ep2": ("ranks/megatron", 2, "megatron-legacy", True),
}


@pytest.mark.parametrize("name", REVERSE)
def test_megatron_saved_checkpoint_to_hf_matches_megatron_logits(suite: Suite, name: str,
                                                                 tmp_path: Path) -> None:
    path, ranks, fmt, needs_config = REVERSE[name]
    expected = suite.logits("saved-dist" if name == "dist" else "saved-ranks", ranks)
    report = ckpt_ir.convert(suite.root / "saved" / path, tmp_path / "hf", to="hf",
                             hf_config=suite.hf if needs_config else None)
    assert report.source_format == fmt
    logits = hf_models.hf_logits(tmp_path / "hf", suite.ids)
    assert expected.std() > 0.1
    diff = (logits - expected[..., :VOCAB]).abs().max().item()
    assert diff <= ATOL, f"{name}: max abs logit diff {diff:.3g} > {ATOL}"
