"""gpt_oss LoRA adapters with real peft 0.21 on transformers 5.23 (fp32, CPU).

On the tiny gpt-oss of ``gpt_oss_models``, two adapters as peft saves them:

- ``attention``: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (o_proj has a bias, which LoRA
  leaves alone);
- ``experts``: attention plus ``target_parameters`` on the fused experts, one ParamWrapper per
  ``mlp.experts.gate_up_proj`` (input-major ``[E, H, 2F]``: A ``[E·r, H]``, B ``[2F, E·r]`` whose
  rows are the parameter's interleaved outputs, row 2j gate j, 2j + 1 up j) and ``down_proj``.

Each converts hf-peft -> mcore-dist (Megatron-Bridge LoRA; CanonicalLoRA for attention) ->
hf-peft bit for bit, config included, and ``PeftModel.from_pretrained`` on the result gives the
PeftModel's logits exactly. ``merge_adapter`` from the hf-peft adapter, and from the mcore-dist
adapter onto the mcore-dist base (Megatron's ``linear_fc1`` adapter with ``[gate; up]`` B rows),
both give models whose logits are the PeftModel's within fp32 rounding (tests/tolerances.py):
an expert adapter read as ``[gate; up]`` instead of interleaved moves them by 1.4 (measured).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir
from tests.clients import gpt_oss_models
from tests.tolerances import assert_logits_close, float64_logits

pytestmark = pytest.mark.clients


@dataclass
class Case:
    base: Path
    adapter: Path
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


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = {
    "attention": {"target_modules": ATTENTION},
    "experts": {"target_modules": ATTENTION,
                "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gpt_oss_lora")
    base = gpt_oss_models.make_gpt_oss(root / "base", seed=9)
    out = {}
    for i, (name, targets) in enumerate(ADAPTERS.items()):
        model = get_peft_model(_base_model(base), LoraConfig(
            r=4, lora_alpha=8, init_lora_weights=False, **targets)).eval()
        _randomize_lora(model, 91 + i)
        model.save_pretrained(root / name)
        out[name] = Case(base, root / name, _logits(model), float64_logits(model, _ids()))
    return out


def _peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(_base_model(base), adapter).eval())


def _bytes(adapter: Path) -> dict[str, bytes]:
    return {k: v.view(torch.uint8).numpy().tobytes()
            for k, v in load_file(adapter / "adapter_model.safetensors").items()}


def test_peft_saves_one_param_wrapper_per_fused_expert_parameter(cases):
    config = json.loads((cases["experts"].adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj",
                                                   "mlp.experts.gate_up_proj"]
    shapes = {k: tuple(v.shape)
              for k, v in load_file(cases["experts"].adapter / "adapter_model.safetensors").items()}
    p = "base_model.model.model.layers.0.mlp.experts."
    # 4 experts, r = 4, H = 64, F = 48: A [E·r, in], B [out, E·r]; gate_up_proj's A [16, H]
    # and B [2F, 16], down_proj's (the nested ParamWrapper, under base_layer) [16, F], [H, 16].
    experts = sorted(s for k, s in shapes.items() if k.startswith(p))
    assert experts == [(16, 48), (16, 64), (64, 16), (96, 16)]


# verl's adapter files refuse every MoE model (converters/verl_adapter.py), and CanonicalLoRA is
# refused on every family's experts (ckpt_ir/adapters.py): gpt_oss is no exception.
@pytest.mark.parametrize(("name", "style"), [("attention", "fused"), ("attention", "canonical"),
                                             ("experts", "fused")])
def test_adapter_round_trips_through_mcore_dist(cases, name, style, tmp_path):
    case = cases[name]
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


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_merged_adapter_gives_the_peft_model_s_logits(cases, name, tmp_path):
    case = cases[name]
    assert case.logits.std() > 0.1
    ckpt_ir.merge_adapter(case.base, case.adapter, tmp_path / "merged", to="hf")
    assert_logits_close(_logits(_base_model(tmp_path / "merged")), case.logits,
                        case.logits64, f"{name}: merged from hf-peft")
    # The same merge in Megatron's layout: the mcore-dist base and Megatron-Bridge adapter.
    ckpt_ir.convert(case.base, tmp_path / "base-dist", to="mcore-dist")
    ckpt_ir.convert(case.adapter, tmp_path / "lora-dist", to="mcore-dist", hf_config=case.base)
    ckpt_ir.merge_adapter(tmp_path / "base-dist", tmp_path / "lora-dist",
                          tmp_path / "merged-dist", to="hf")
    assert_logits_close(_logits(_base_model(tmp_path / "merged-dist")), case.logits,
                        case.logits64, f"{name}: merged in Megatron's layout")
