"""MoE LoRA as peft 0.21 saves it on transformers 5: ``target_parameters`` (issue #12 item 8).

transformers 5 holds an MoE layer's routed experts as two 3-D parameters
(``mlp.experts.gate_up_proj`` / ``down_proj``); ``get_peft_model`` with Mixtral's ``w1, w2, w3``
(or qwen3_moe's ``gate_proj, up_proj, down_proj``) rewrites the config to ``target_parameters``
and saves one ParamWrapper A/B pair per fused parameter (``mlp.experts[.base_layer].lora_A``,
``[E·r, in]``; ``lora_B`` ``[out, E·r]``), with ``rank_pattern`` / ``alpha_pattern`` giving
``gate_up_proj`` rank 2r and alpha 2·alpha. With real peft 0.21 on transformers 5.23 (fp32,
CPU), for mixtral (attention modules too), qwen3_moe and deepseek_v3 (experts only:
``target_modules`` becomes ``[]``) and a down_proj-only adapter:

- the config and keys are as described (pinned, so a peft change shows up here);
- ``merge_adapter`` writes the weights of peft's own ``merge_and_unload`` bit for bit, and the
  merged model's logits equal the PeftModel's;
- hf-peft -> hf-peft and hf-peft -> mcore-dist -> hf-peft (``extract-adapter``) give back
  every tensor and ``adapter_config.json`` bit for bit, and ``PeftModel.from_pretrained`` on the
  result gives the PeftModel's logits;
- ``inspect`` and ``verify`` read it.
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
from tests.clients import hf_models
from tests.clients.test_peft_client import _base_model, _logits, _randomize_lora

pytestmark = pytest.mark.clients

ATOL = 1e-5
# (arch, target_modules given to get_peft_model) -> what peft 0.21 saves
CASES = {
    "mixtral-all": ("mixtral", ["q_proj", "o_proj", "w1", "w2", "w3"]),
    "qwen3_moe": ("qwen3_moe", ["q_proj", "gate_proj", "up_proj", "down_proj"]),
    "deepseek_v3": ("deepseek_v3", ["gate_proj", "up_proj", "down_proj"]),
    "mixtral-w2": ("mixtral", ["w2"]),
}
SAVED = {  # target_modules, target_parameters as peft 0.21 writes them
    "mixtral-all": (["o_proj", "q_proj"], ["down_proj", "gate_up_proj"]),
    "qwen3_moe": (["q_proj"], ["down_proj", "gate_up_proj"]),
    "deepseek_v3": ([], ["down_proj", "gate_up_proj"]),
    "mixtral-w2": ([], ["down_proj"]),
}


@dataclass
class Case:
    base: Path
    adapter: Path
    logits: torch.Tensor
    merged: dict[str, torch.Tensor]  # merge_and_unload, transformers 5's in-memory names


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    from peft import LoraConfig, get_peft_model

    out: dict[str, Case] = {}
    for i, (key, (arch, targets)) in enumerate(CASES.items()):
        root = tmp_path_factory.mktemp(f"tp-{key}")
        base = hf_models.make_hf_model(arch, root, seed=40 + i, name="base")
        model = get_peft_model(_base_model(base), LoraConfig(
            target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)).eval()
        _randomize_lora(model, 400 + i)
        model.save_pretrained(root / "adapter")
        logits = _logits(model)
        merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
        out[key] = Case(base, root / "adapter", logits, merged)
    return out


@pytest.mark.parametrize("key", CASES)
def test_peft_saves_fused_expert_lora_as_target_parameters(cases, key):
    case = cases[key]
    config = json.loads((case.adapter / "adapter_config.json").read_text())
    modules, params = SAVED[key]
    assert sorted(config["target_modules"]) == modules
    assert sorted(config["target_parameters"]) == params
    keys = load_file(case.adapter / "adapter_model.safetensors").keys()
    experts = "base_model.model.model.layers.1.mlp.experts."
    want = {experts + "lora_A.weight", experts + "lora_B.weight"}
    if "gate_up_proj" in params:
        want |= {experts + "base_layer.lora_A.weight", experts + "base_layer.lora_B.weight"}
        assert config["rank_pattern"] == {r".*\.gate_up_proj": 8}
        assert config["alpha_pattern"] == {r".*\.gate_up_proj": 16}
    assert {k for k in keys if k.startswith(experts)} == want


@pytest.mark.parametrize("key", CASES)
def test_merge_equals_merge_and_unload_and_peft_logits(cases, key, tmp_path):
    case = cases[key]
    ckpt_ir.merge_adapter(case.base, case.adapter, tmp_path / "merged", to="hf")
    model = _base_model(tmp_path / "merged")
    assert (_logits(model) - case.logits).abs().max() <= ATOL
    # the adapter matters (peft's forward merges ParamWrapper updates the same way, so for an
    # experts-only adapter the two logits can agree exactly)
    assert (case.logits - _logits(_base_model(case.base))).abs().max() > 1e-2
    state = model.state_dict()
    assert state.keys() == case.merged.keys()
    for name, w in case.merged.items():
        assert torch.equal(state[name], w), name


@pytest.mark.parametrize("key", CASES)
def test_target_parameters_round_trip_bit_for_bit(cases, key, tmp_path):
    from peft import PeftModel

    case = cases[key]
    want = load_file(case.adapter / "adapter_model.safetensors")
    config = json.loads((case.adapter / "adapter_config.json").read_text())
    ckpt_ir.convert(case.adapter, tmp_path / "peft", to="hf-peft", hf_config=case.base)
    ckpt_ir.convert(case.adapter, tmp_path / "dist", to="mcore-dist", hf_config=case.base)
    ckpt_ir.extract_adapter(tmp_path / "dist", tmp_path / "back")
    for out in (tmp_path / "peft", tmp_path / "back"):
        got = load_file(out / "adapter_model.safetensors")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert json.loads((out / "adapter_config.json").read_text()) == config
    model = PeftModel.from_pretrained(_base_model(case.base), tmp_path / "back").eval()
    assert (_logits(model) - case.logits).abs().max() <= ATOL
    assert ckpt_ir.verify(case.adapter, tmp_path / "dist").equal


def test_inspect_shows_target_parameters(cases, capsys):
    case = cases["mixtral-all"]
    assert main(["inspect", str(case.adapter), "--hf-config", str(case.base), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["format"] == "hf-peft"
    adapter = info["adapter"]
    assert adapter["target_parameters"] == ["down_proj", "gate_up_proj"]
    assert adapter["ranks"] == [4, 8] and adapter["modules"] == 2 * 2 + 2 * 4 * 3
    assert adapter["target_modules"] == ["o_proj", "q_proj", "w1", "w2", "w3"]


# (case, tp, ep) on two gloo ranks, expert TP 1: megatron-core 0.16.1 with Megatron-Bridge's
# LoRA on every linear layer (SequentialMLP experts, tests/clients/mcore_lora.py).
MEGATRON = (("mixtral-all", 1, 1), ("qwen3_moe", 1, 2))
PAD = 128


@pytest.mark.parametrize(("key", "tp", "ep"), MEGATRON,
                         ids=[f"{k}-tp{t}-ep{e}" for k, t, e in MEGATRON])
def test_megatron_core_with_the_converted_adapter_gives_peft_logits(cases, key, tp, ep,
                                                                    tmp_path):
    """peft's target_parameters adapter -> ckpt-ir mcore-dist (gate and up share one A:
    Bridge's fused expert linear_fc1 adapter) -> megatron-core's forward = the PeftModel's."""
    from tests.clients.mcore_harness import job_result, launch

    case = cases[key]
    ckpt_ir.convert(case.base, tmp_path / "base", to="mcore-dist", mcore_spec="local",
                    pad_vocab_to_multiple=PAD)
    report = ckpt_ir.convert(case.adapter, tmp_path / "lora", to="mcore-dist",
                             hf_config=case.base)
    assert not any("ranks stacked" in n for n in report.notes if "linear_fc1" in n)
    layout = json.loads((tmp_path / "lora" / "ckpt_ir_lora.json").read_text())["layout"]
    launch("lora-load-forward", {
        "hf_config": str(case.base / "config.json"), "tp": tp, "ep": ep, "etp": 1,
        "base_ckpt": str(tmp_path / "base"), "adapter_ckpt": str(tmp_path / "lora"),
        "dim": layout["rank"], "alpha": layout["alpha"], "style": "fused",
        "targets": layout["megatron_target_modules"], "pad_vocab_to_multiple": PAD,
        "input_ids": hf_models.input_ids(),
        "out": str(tmp_path / "logits.pt")}, world_size=2, timeout=400)
    logits = job_result(tmp_path / "logits.pt")
    assert (logits[..., : case.logits.shape[-1]] - case.logits).abs().max() <= ATOL
