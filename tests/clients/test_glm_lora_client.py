"""LoRA adapters of GLM-4.5 (``glm4_moe``) and GLM-5 (``glm_moe_dsa``), with real peft 0.21 and
transformers 5.23 (fp32).

The adapters are per-expert HF PEFT directories (Megatron-Bridge's ``save_hf_adapter`` layout,
written by ``test_moe_lora_client.write_peft_adapter``: independent non-zero A and B per
module). The MoE LoRA rows come from each record's ``MoeNames``, so no GLM row is new; what is
new and proven here:

- glm4_moe, every linear module (q/k/v over q/k/v biases, o_proj, the dense first layer, each
  routed expert, the shared expert), and glm_moe_dsa's MLP modules: hf-peft -> mcore-dist ->
  hf-peft reproduces every tensor and ``adapter_config.json`` bit for bit.
- PeftModel loads ckpt-ir's glm4_moe attention adapter (after the round trip) with the logits of
  the base merged by ``ckpt_ir.merge_adapter`` (<= 1e-5). peft 0.21 retargets ``gate_proj`` /
  ``up_proj`` to transformers 5's fused experts and drops the dense and shared-expert adapters
  (as for qwen2_moe, test_moe_lora_client.py), so MLP adapters are not compared through it.
- LoRA on multi-latent attention (GLM-4.7-Flash, DSA) is refused in one line, as for
  deepseek_v3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir
from ckpt_ir.errors import FormatError
from tests.clients import glm_models, hf_models
from tests.clients.test_moe_lora_client import _peft_logits, write_peft_adapter

pytestmark = pytest.mark.clients

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
CASES = {"glm4_moe": [*ATTENTION, *MLP], "glm_moe_dsa": MLP}


def _round_trip(root: Path, base: Path, targets: list[str]) -> tuple[Path, Path]:
    write_peft_adapter(root / "adapter", base, {"r": 4, "lora_alpha": 8,
                                                "target_modules": targets}, seed=9)
    ckpt_ir.convert(root / "adapter", root / "dist", to="mcore-dist", hf_config=base)
    ckpt_ir.convert(root / "dist", root / "back", to="hf-peft")
    return root / "adapter", root / "back"


@pytest.mark.parametrize("family", CASES)
def test_adapter_round_trips_through_mcore_dist_bit_for_bit(family: str, tmp_path: Path
                                                           ) -> None:
    base = glm_models.make_hf_model(family, tmp_path, seed=3, name="base")
    adapter, back = _round_trip(tmp_path, base, CASES[family])
    want, got = load_file(adapter / "adapter_model.safetensors"), \
        load_file(back / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert any(".mlp.experts.5.down_proj." in k for k in want)
    assert any(".mlp.shared_experts.up_proj." in k for k in want)
    assert any(".layers.0.mlp.gate_proj." in k for k in want)  # the dense first layer
    changed = [k for k in want if not torch.equal(got[k].view(torch.uint8),
                                                  want[k].view(torch.uint8))]
    assert not changed, changed
    assert json.loads((back / "adapter_config.json").read_text()) == \
        json.loads((adapter / "adapter_config.json").read_text())


def test_peft_loads_the_glm_attention_adapter_with_the_merged_logits(tmp_path: Path) -> None:
    base = glm_models.make_hf_model("glm4_moe", tmp_path, seed=4, name="base")
    _, back = _round_trip(tmp_path, base, ATTENTION)
    ckpt_ir.merge_adapter(base, back, tmp_path / "merged", to="hf")
    merged = hf_models.hf_logits(tmp_path / "merged", hf_models.input_ids())
    peft, _ = _peft_logits(base, back)
    diff = (peft - merged).abs().max().item()
    assert diff <= 1e-5, f"max |Δlogits| {diff:.3g}"
    base_logits = hf_models.hf_logits(base, hf_models.input_ids())
    assert (merged - base_logits).abs().max() > 0.1  # the adapter matters


def test_lora_on_multi_latent_attention_is_refused(tmp_path: Path) -> None:
    base = glm_models.make_hf_model("glm_moe_dsa", tmp_path, seed=5, name="base")
    with pytest.raises(FormatError, match="LoRA on multi-latent attention"):
        _round_trip(tmp_path, base, ["q_a_proj"])
