"""LoRA adapters on the language model of Gemma 3 VL and Mistral 3 VL (peft 0.21 on
transformers 5.23), like the Qwen VL ones (test_qwen_vl_lora_client.py): LoRA on the seven
linear modules of every language-model layer, non-zero B, with a module-name pattern that
leaves the towers alone (SigLIP's and Pixtral's attention and MLP have the same leaf names).

PEFT names the modules as transformers holds them (``model.language_model.layers``; the
weights are saved as ``language_model.model.layers``); ckpt-ir reads them under the text
family's IR names and writes them back.

- hf-peft -> mcore-dist (Megatron-Bridge LoRA) -> hf-peft gives back every tensor bit for bit,
  and ``PeftModel.from_pretrained`` on it gives the original PeftModel's logits exactly, on
  text and on image + text;
- ``merge_adapter`` writes an HF model whose adapted weights are PEFT's ``merge_and_unload``
  within the fp32 rounding bound (tests/tolerances.py), whose tower and projector are the
  base's bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir
from tests.clients import vl_passthrough_models as vm
from tests.tolerances import assert_merged_close

pytestmark = pytest.mark.clients

ARCHS = ("gemma3", "mistral3")
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
R, ALPHA = 4, 8


class Case:
    def __init__(self, arch: str, root: Path) -> None:
        from peft import LoraConfig, get_peft_model

        self.arch = arch
        self.base = vm.save_model(arch, root / "base")
        torch.manual_seed(7)
        peft_model = get_peft_model(vm.load_model(self.base), LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False))
        peft_model.eval()
        self.adapter = root / "adapter"
        peft_model.save_pretrained(self.adapter)
        self.text = vm.logits(peft_model, vm.text_inputs())
        self.image = vm.logits(peft_model, vm.image_inputs(arch))
        self.merged = {k: v.detach().clone()
                       for k, v in peft_model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    return {a: Case(a, tmp_path_factory.mktemp(a)) for a in ARCHS}


def _layers(arch: str) -> int:
    return vm.config_dict(arch)["text_config"]["num_hidden_layers"]


def _peft_logits(case: Case, adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(vm.load_model(case.base), adapter).eval()
    return vm.logits(model, vm.text_inputs()), vm.logits(model, vm.image_inputs(case.arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_adapter_round_trips_through_megatron_bit_for_bit(cases, arch, tmp_path):
    case = cases[arch]
    names = load_file(case.adapter / "adapter_model.safetensors")
    assert len(names) == _layers(arch) * 7 * 2
    assert all(n.startswith("base_model.model.model.language_model.layers.") for n in names)
    ckpt_ir.convert(case.adapter, tmp_path / "dist", to="mcore-dist", hf_config=case.base)
    report = ckpt_ir.extract_adapter(tmp_path / "dist", tmp_path / "peft")
    assert report.tensors_written == len(names)
    back = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(back) == sorted(names)
    assert all(torch.equal(back[n], names[n]) for n in names)
    text, image = _peft_logits(case, tmp_path / "peft")
    assert torch.equal(text, case.text) and torch.equal(image, case.image)


def _in_memory(name: str) -> str:
    """transformers 5.23's in-memory name of an on-disk one (merge_and_unload's state dict)."""
    if name.startswith("language_model.model."):
        return "model.language_model." + name.removeprefix("language_model.model.")
    if name.startswith("language_model.lm_head."):
        return name.removeprefix("language_model.")
    return "model." + name  # vision_tower.*, multi_modal_projector.*


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
        mem = _in_memory(name)
        module = mem.removesuffix(".weight")
        a = adapter.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            assert torch.equal(w, base[name]), name  # the tower, projector, norms, embeddings
            assert torch.equal(case.merged[mem], base[name]), name
            continue
        b = adapter[f"base_model.model.{module}.lora_B.weight"]
        assert_merged_close(w, case.merged[mem], base[name], b, a, ALPHA / R, name)
        adapted += 1
    assert adapted == _layers(arch) * 7
    unadapted = vm.logits(vm.load_model(case.base), vm.image_inputs(arch))
    assert (case.image - unadapted).abs().max() > 1e-2  # the adapter matters
    model = vm.load_model(tmp_path / "merged")
    for got, want in ((vm.logits(model, vm.text_inputs()), case.text),
                      (vm.logits(model, vm.image_inputs(arch)), case.image)):
        assert (got - want).abs().max() < 1e-4
