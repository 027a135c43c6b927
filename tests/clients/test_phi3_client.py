"""phi3 (Phi-3 / Phi-3.5 / Phi-4-mini) with megatron-core 0.16.1 on CPU (gloo).

A tiny random ``Phi3ForCausalLM`` (``dense_tail_models.phi3``: fused ``qkv_proj`` over GQA 4:2,
fused ``gate_up_proj``, ``partial_rotary_factor`` 0.75, untied, plain RoPE: megatron-core has no
LongRoPE, see ``test_dense_tail_client.py`` for the LongRoPE models' round trips), 4 layers.
ckpt-ir's output loads into a GPTModel built from :func:`ckpt_ir.megatron_args` (local spec)
and reproduces transformers' fp32 logits (max abs diff <= 1e-5): ``mcore-dist`` at TP=1 and
TP=2 (vocab padded to 384) through ``dist_checkpointing.load`` under ``raise_all``, and
Megatron-LM rank files at TP=2 through ``load_state_dict(strict=True)``. A QKV split or
interleave in the wrong order, or ``[gate; up]`` cut per rank the wrong way, changes them.
The other direction: a GPTModel randomised by megatron-core at TP=2 and saved with
``dist_checkpointing.save`` converts (with the HF config) to a ``Phi3ForCausalLM`` whose
logits equal megatron's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import ckpt_ir
from tests.clients import dense_tail_models, hf_models
from tests.clients.mcore_harness import HarnessError, job_result, launch
from tests.clients.suites import MegatronSuite, convert_to
from tests.fixtures import attempt, safetensors_bytes

pytestmark = pytest.mark.clients

ATOL = 1e-5
VOCAB = hf_models.VOCAB_SIZE
PAD = 128

# name -> (ckpt_ir.convert keyword arguments, ranks of the megatron-core launch that loads it)
DIST = {
    "dist-tp1": ({"to": "mcore-dist", "mcore_spec": "local"}, 1),
    "dist-tp2": ({"to": "mcore-dist", "mcore_spec": "local", "pad_vocab_to_multiple": PAD}, 2),
}
RANK_LAYOUT = {"tp": 2, "pp": 1}


Suite = MegatronSuite


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    root = tmp_path_factory.mktemp("phi3")
    ids = hf_models.input_ids()
    hf = dense_tail_models.make_model("phi3", root, seed=5, num_hidden_layers=4)
    s = Suite(root=root, hf=hf, ids=ids, ref=hf_models.hf_logits(hf, ids))
    common = {"hf_config": str(hf / "config.json"), "input_ids": ids}
    jobs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for key, (kwargs, ranks) in DIST.items():
        s.written[key] = attempt(lambda key=key, kwargs=kwargs: convert_to(
            hf, root / "written" / key, **kwargs))
        if s.written[key].error is None:
            jobs[ranks].append({
                **common, "command": "load-forward", "ckpt": str(s.written[key].value),
                "tp": ranks, "pad_vocab_to_multiple": kwargs.get("pad_vocab_to_multiple"),
                "strict": "raise_all", "allow_missing": ["common_state"],
                "out": str(root / "logits" / f"{key}.pt")})
    s.written["megatron-legacy-tp2"] = attempt(lambda: convert_to(
        hf, root / "written" / "megatron-legacy-tp2", to="megatron-legacy", layout=RANK_LAYOUT,
        mcore_spec="local", pad_vocab_to_multiple=PAD))
    if s.written["megatron-legacy-tp2"].error is None:
        jobs[2].append({**common, "command": "load-rank-files", "layout": RANK_LAYOUT,
                        "pad_vocab_to_multiple": PAD, "format": "megatron-legacy",
                        "ckpt": str(s.written["megatron-legacy-tp2"].value),
                        "out": str(root / "logits" / "megatron-legacy-tp2.pt")})
    # The other direction: a GPTModel randomised by megatron-core at TP=2, saved by it.
    jobs[2].append({**common, "command": "save-random", "tp": 2, "pad_vocab_to_multiple": PAD,
                    "seed": 23, "out_dir": str(root / "saved"),
                    "logits_out": str(root / "logits" / "saved.pt")})
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(attempt, lambda n=n: launch("batch", jobs[n], world_size=n,
                                                                timeout=400))
                   for n in jobs}
        s.launches = {n: f.result() for n, f in futures.items()}
    return s


def test_the_tiny_model_has_phi3s_fused_tensors(suite: Suite) -> None:
    shapes = {n: s for n, (_, s, _) in safetensors_bytes(suite.hf).items()}
    # [nh*d + 2*G*d, H] = [(4 + 2*2) * 16, 64]; [2F, H].
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (128, 64)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (192, 64)
    assert "model.layers.0.self_attn.q_proj.weight" not in shapes


def test_megatron_args_carry_the_partial_rotary_factor(suite: Suite) -> None:
    import json

    args = ckpt_ir.megatron_args(json.loads((suite.hf / "config.json").read_text()))
    assert args.gpt_model["rotary_percent"] == 0.75


@pytest.mark.parametrize("key", ["dist-tp1", "dist-tp2", "megatron-legacy-tp2"])
def test_megatron_core_reproduces_transformers_logits(suite: Suite, key: str) -> None:
    logits = suite.logits(key, 1 if key == "dist-tp1" else 2)[..., :VOCAB]
    assert logits.shape == suite.ref.shape
    assert suite.ref.std() > 0.1
    diff = (logits - suite.ref).abs().max().item()
    assert diff <= ATOL, f"{key}: max abs logit diff {diff:.3g} > {ATOL}"


def test_a_megatron_saved_checkpoint_converts_to_phi3_with_megatrons_logits(
        suite: Suite, tmp_path: Path) -> None:
    suite.launches[2].get("the megatron-core launch on 2 ranks")
    try:
        expected = job_result(suite.root / "logits" / "saved.pt")
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    report = ckpt_ir.convert(suite.root / "saved", tmp_path / "hf", to="hf",
                             hf_config=suite.hf)
    assert report.source_format == "mcore-dist" and report.architecture == "phi3"
    names = set(safetensors_bytes(tmp_path / "hf"))
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    logits = hf_models.hf_logits(tmp_path / "hf", suite.ids)
    assert expected.std() > 0.1
    diff = (logits - expected[..., :VOCAB]).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff:.3g} > {ATOL}"
