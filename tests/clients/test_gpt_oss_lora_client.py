"""gpt_oss LoRA adapters with real peft 0.21 on transformers 5.23 (fp32, CPU).

On the tiny gpt-oss of ``gpt_oss_models``:

- an attention adapter (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; o_proj has a bias, which
  LoRA leaves alone) converts hf-peft -> mcore-dist (Megatron-Bridge LoRA and CanonicalLoRA)
  -> hf-peft bit for bit,
  config included, and ``PeftModel.from_pretrained`` on the result gives the PeftModel's logits
  exactly; ``merge_adapter`` gives a model whose logits are the PeftModel's within fp32
  rounding (tests/tolerances.py);
- an adapter on the experts, as peft saves it (``target_parameters`` on the fused
  ``gate_up_proj`` / ``down_proj``), is refused in one line with exit status 2: ckpt-ir has no
  rows for gpt-oss's interleaved, input-major ParamWrappers (a [gate; up] reading would be
  silently wrong).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir
from ckpt_ir.cli import main
from tests.clients import gpt_oss_models
from tests.tolerances import assert_logits_close, float64_logits

pytestmark = pytest.mark.clients


@dataclass
class Case:
    base: Path
    adapter: Path
    experts: Path
    logits: torch.Tensor
    logits64: torch.Tensor


def _ids() -> torch.Tensor:
    return torch.tensor(gpt_oss_models.input_ids())


def _base_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=_ids()).logits.float()


@torch.no_grad()
def _randomize_lora(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gpt_oss_lora")
    base = gpt_oss_models.make_gpt_oss(root / "base", seed=9)
    model = get_peft_model(_base_model(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False)).eval()
    _randomize_lora(model, 91)
    model.save_pretrained(root / "adapter")
    experts = get_peft_model(_base_model(base), LoraConfig(
        r=2, lora_alpha=4, target_modules=[],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).eval()
    experts.save_pretrained(root / "experts")
    return Case(base, root / "adapter", root / "experts", _logits(model),
                float64_logits(model, _ids()))


def _peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(_base_model(base), adapter).eval())


def _bytes(adapter: Path) -> dict[str, bytes]:
    return {k: v.view(torch.uint8).numpy().tobytes()
            for k, v in load_file(adapter / "adapter_model.safetensors").items()}


# verl's adapter files refuse every MoE model (converters/verl_adapter.py), gpt_oss included.
@pytest.mark.parametrize("style", ["fused", "canonical"])
def test_attention_adapter_round_trips_through_mcore_dist(case, style, tmp_path):
    ckpt_ir.convert(case.adapter, tmp_path / "via", to="mcore-dist", hf_config=case.base,
                    lora_style=style)
    ckpt_ir.convert(tmp_path / "via", tmp_path / "back", to="hf-peft")
    want, got = _bytes(case.adapter), _bytes(tmp_path / "back")
    assert got.keys() == want.keys()
    assert any(".o_proj.lora_B." in k for k in want)
    assert [k for k in want if got[k] != want[k]] == []
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text()) == \
        json.loads((case.adapter / "adapter_config.json").read_text())
    assert torch.equal(_peft_logits(case.base, tmp_path / "back"), case.logits)


def test_merged_attention_adapter_gives_the_peft_model_s_logits(case, tmp_path):
    ckpt_ir.merge_adapter(case.base, case.adapter, tmp_path / "merged", to="hf")
    merged = _logits(_base_model(tmp_path / "merged"))
    assert case.logits.std() > 0.1
    assert_logits_close(merged, case.logits, case.logits64, "merged gpt_oss attention LoRA")


def test_an_expert_adapter_is_refused_in_one_line(case, tmp_path, capsys):
    config = json.loads((case.experts / "adapter_config.json").read_text())
    # What peft 0.21 saved: LoRA on the two fused expert parameters, no modules.
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj",
                                                   "mlp.experts.gate_up_proj"]
    dst = tmp_path / "out"
    code = main(["convert", str(case.experts), str(dst), "--to", "mcore-dist",
                 "--hf-config", str(case.base)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "LoRA on gpt_oss's experts is not supported" in err
    assert not dst.exists()
