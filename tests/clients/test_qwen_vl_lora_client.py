"""LoRA adapters on the language model of a VL model (peft 0.21 on transformers 5.23), like the
dense ones (tests/clients/test_peft_client.py): tiny Qwen2.5-VL and Qwen3-VL with LoRA on the
seven linear modules of every language-model layer (non-zero B, a module-name pattern that
leaves the vision tower alone: Qwen2.5-VL's tower has gate_proj / up_proj / down_proj too).

PEFT names a VL model's modules as transformers holds them (``model.language_model.layers``,
also for Qwen2.5-VL, whose weights are saved as ``model.layers``); ckpt-ir reads them as the
text family's IR names and writes them back.

- hf-peft -> mcore-dist (Megatron-Bridge LoRA) -> hf-peft gives back every tensor bit for bit,
  and ``PeftModel.from_pretrained`` on it gives the original PeftModel's logits exactly, on
  text and on image + text;
- ``merge_adapter`` writes an HF model whose adapted weights are PEFT's ``merge_and_unload``
  within the fp32 rounding bound of ``W + s * B @ A`` (tests/tolerances.py), whose vision tower
  is the base's bit for bit, and whose logits are the PeftModel's to fp32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir
from tests.clients import qwen_vl_models as vl
from tests.tolerances import assert_merged_close

pytestmark = pytest.mark.clients

ARCHS = ("qwen2_5_vl", "qwen3_vl")
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
R, ALPHA = 4, 8


class Case:
    def __init__(self, arch: str, root: Path) -> None:
        from peft import LoraConfig, get_peft_model

        self.base = vl.save_model(arch, root / "base")
        torch.manual_seed(7)
        peft_model = get_peft_model(vl.load_model(self.base), LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False))
        peft_model.eval()
        self.adapter = root / "adapter"
        peft_model.save_pretrained(self.adapter)
        self.text = vl.logits(peft_model, vl.text_inputs())
        self.image = vl.logits(peft_model, vl.image_inputs())
        self.merged = {k: v.detach().clone()
                       for k, v in peft_model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    return {a: Case(a, tmp_path_factory.mktemp(a)) for a in ARCHS}


def _peft_logits(base: Path, adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(vl.load_model(base), adapter).eval()
    return vl.logits(model, vl.text_inputs()), vl.logits(model, vl.image_inputs())


@pytest.mark.parametrize("arch", ARCHS)
def test_the_adapter_round_trips_through_megatron_bit_for_bit(cases, arch, tmp_path):
    case = cases[arch]
    names = load_file(case.adapter / "adapter_model.safetensors")
    assert len(names) == 4 * 7 * 2
    assert all(n.startswith("base_model.model.model.language_model.layers.") for n in names)
    ckpt_ir.convert(case.adapter, tmp_path / "dist", to="mcore-dist", hf_config=case.base)
    report = ckpt_ir.extract_adapter(tmp_path / "dist", tmp_path / "peft")
    assert report.tensors_written == len(names)
    back = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(back) == sorted(names)
    assert all(torch.equal(back[n], names[n]) for n in names)
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # Leaf names alone would adapt the tower too (Qwen2.5-VL's MLP has the same leaves).
    assert "language_model" in written["target_modules"]
    text, image = _peft_logits(case.base, tmp_path / "peft")
    assert torch.equal(text, case.text) and torch.equal(image, case.image)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_merged_model_is_peft_merge_and_unload(cases, arch, tmp_path):
    case = cases[arch]
    ckpt_ir.merge_adapter(case.base, case.adapter, tmp_path / "merged", to="hf")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(case.base / "model.safetensors")
    adapter = load_file(case.adapter / "adapter_model.safetensors")
    assert sorted(merged) == sorted(base)
    adapted = 0
    for name, w in merged.items():
        # transformers' in-memory name (what merge_and_unload's state dict and PEFT use).
        mem = name if name.startswith(("model.language_model.", "model.visual.", "lm_head")) \
            else name.replace("visual.", "model.visual.", 1) if name.startswith("visual.") \
            else name.replace("model.", "model.language_model.", 1)
        module = mem.removesuffix(".weight")
        a = adapter.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            assert torch.equal(w, base[name]), name  # the tower, norms, embeddings
            assert torch.equal(case.merged[mem], base[name]), name
            continue
        b = adapter[f"base_model.model.{module}.lora_B.weight"]
        assert_merged_close(w, case.merged[mem], base[name], b, a, ALPHA / R, name)
        adapted += 1
    assert adapted == 4 * 7
    unadapted = vl.logits(vl.load_model(case.base), vl.image_inputs())
    assert (case.image - unadapted).abs().max() > 1e-2  # the adapter matters
    model = vl.load_model(tmp_path / "merged")
    for got, want in ((vl.logits(model, vl.text_inputs()), case.text),
                      (vl.logits(model, vl.image_inputs()), case.image)):
        assert (got - want).abs().max() < 1e-4
