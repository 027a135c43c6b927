"""The dense long tail (phi3, olmo2, gemma2, gemma3_text, ministral3) with transformers 5.23:
round trips.

Each family's tiny random model (``dense_tail_models``: a shrunk copy of its published config,
every structural flag kept) goes HF -> ``mcore-dist`` -> HF and HF -> per-rank (``verl-legacy``
with the TE spec, ``megatron-legacy`` with the local spec, both at TP=2 x PP=2, vocabulary
padded to 384) -> HF. Every tensor comes back bit for bit, the config unchanged (LongRoPE
factors, softcaps, RoPE bases, layer types, YaRN included), no ``lm_head.weight`` appears for a tied
model, and the reloaded model's logits equal the source's exactly.

megatron-core itself loads ckpt-ir's phi3 output in ``test_phi3_client.py``; it cannot build
OLMo 2 or Gemma (reference section 10), whose Megatron names are pinned by
``tests/unit/test_dense_tail_tables.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_ir
from tests.clients import dense_tail_models, hf_models
from tests.fixtures import assert_same_hf, safetensors_bytes

pytestmark = pytest.mark.clients

FAMILIES = ("phi4_mini", "phi3_5_mini", "olmo2", "gemma2", "gemma3_text", "ministral3")
ROUTES: dict[str, dict[str, Any]] = {
    "mcore-dist": {"to": "mcore-dist"},
    "verl-legacy-tp2-pp2": {"to": "verl-legacy", "layout": {"tp": 2, "pp": 2},
                            "pad_vocab_to_multiple": 128},
    "megatron-legacy-tp2-pp2": {"to": "megatron-legacy", "layout": {"tp": 2, "pp": 2},
                                "mcore_spec": "local", "pad_vocab_to_multiple": 128},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.Tensor]]:
    root = tmp_path_factory.mktemp("dense-tail")
    ids = hf_models.input_ids()
    out = {}
    for i, name in enumerate(FAMILIES):
        hf = dense_tail_models.make_model(name, root, seed=11 + i)
        out[name] = (hf, hf_models.hf_logits(hf, ids))
    return out


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_to_hf_is_bit_identical(models, family: str, route: str,
                                           tmp_path: Path) -> None:
    hf, ref = models[family]
    assert ref.std() > 0.1  # O(1) logits: equality below means something
    ckpt_ir.convert(hf, tmp_path / "mid", **ROUTES[route])
    # Every format carries the HF config: nothing else is passed back.
    ckpt_ir.convert(tmp_path / "mid", tmp_path / "back", to="hf")
    assert_same_hf(hf, tmp_path / "back")
    if json.loads((hf / "config.json").read_text()).get("tie_word_embeddings"):
        assert "lm_head.weight" not in safetensors_bytes(tmp_path / "back")
    assert torch.equal(hf_models.hf_logits(tmp_path / "back", hf_models.input_ids()), ref)
