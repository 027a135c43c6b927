"""LoRA adapters on mixture-of-experts models, proven with real peft 0.21, transformers 5.23 and
megatron-core 0.16.1 (CPU, gloo, fp32).

The adapters are per-expert HF PEFT directories as Megatron-Bridge's ``save_hf_adapter`` writes
them (``base_model.model.model.layers.{l}.mlp.experts.{e}.gate_proj.lora_A.weight``; Mixtral
``block_sparse_moe.experts.{e}.w1``; qwen2_moe's shared expert ``mlp.shared_expert.*`` and its
dense first layer ``mlp.*``), with independent, non-zero A and B for every module, so Megatron
stacks each expert's gate/up ranks. peft 0.21 cannot *write* such files for transformers 5 (it
holds experts fused and saves its ParamWrapper layout), so the tests write them directly.

Proven here:

- hf-peft -> mcore-dist -> hf-peft gives back every tensor and ``adapter_config.json`` exactly,
  and the torch_dist keys and global shapes are megatron-core's (``[L, E, R, H]`` stacked
  experts; per-layer keys with a dense layer);
- ckpt-ir's hf-peft output (converted from mcore-dist) loads with ``PeftModel.from_pretrained``
  and gives the logits of the base model merged by ``ckpt_ir.merge_adapter``, whose weights
  are ``W + scaling · B @ A`` per module; merged in Megatron's layout (from the two torch_dist
  checkpoints) it equals the merged HF model converted;
- the mcore-dist adapter and base load with ``dist_checkpointing.load`` into a GPTModel
  (SequentialMLP experts) whose attention, dense, expert and shared-expert linear layers carry
  Megatron-Bridge's LoRA adapters (tests/clients/mcore_lora.py), and its forward equals the
  merged HF model's logits at TP=1, and for qwen2_moe also at TP=2 and EP=2 (two gloo ranks).

qwen2_moe and peft 0.21: its transformers-5 weight conversion is registered for the models that
*alias* qwen2_moe (qwen3_moe, deepseek_v3, ...) but not for qwen2_moe itself, so peft loads none
of a qwen2_moe adapter's routed-expert tensors (silently); and when the conversion does run it
retargets every ``gate_proj`` / ``up_proj`` to the fused experts, dropping the shared expert's
and dense layers' adapters. PeftModel is therefore checked on a qwen2_moe adapter of attention,
dense layer and shared expert; its routed experts are proven through megatron-core and the merge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_ir
from ckpt_ir.adapter_api import open_adapter
from ckpt_ir.adapters import AdapterConfig
from ckpt_ir.ir import ModelConfig
from tests.clients import hf_models
from tests.clients.mcore_harness import HarnessError, job_result, launch
from tests.fixtures import load_dcp_tensors
from tests.tolerances import (
    assert_logits_close,
    assert_megatron_merge_close,
    assert_merged_close,
    float64_logits,
)

pytestmark = pytest.mark.clients

ATOL = 1e-5
PAD = 128
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# The adapters: every linear module (Mixtral's experts are w1/w3/w2), and for qwen2_moe a
# shared expert with its own scaling (alpha_pattern: B carries a power-of-two ratio in Megatron).
LORA: dict[str, dict[str, Any]] = {
    "mixtral": {"r": 4, "lora_alpha": 8, "target_modules": [*ATTENTION, "w1", "w2", "w3"]},
    "qwen3_moe": {"r": 4, "lora_alpha": 8,
                  "target_modules": [*ATTENTION, "gate_proj", "up_proj", "down_proj"]},
    "qwen2_moe": {"r": 4, "lora_alpha": 8,
                  "target_modules": [*ATTENTION, "gate_proj", "up_proj", "down_proj"],
                  "alpha_pattern": {"shared_expert.down_proj": 16}},
}
ARCHS = tuple(LORA)
# What peft 0.21 can load of a qwen2_moe adapter (see the module docstring).
QWEN2_MOE_PEFT = {"r": 4, "lora_alpha": 8, "target_modules": [
    *ATTENTION, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "shared_expert.gate_proj",
    "shared_expert.up_proj", "shared_expert.down_proj"]}
# (arch, tp, ep) of the megatron-core jobs, all on two gloo ranks (expert TP 1).
MEGATRON = (("mixtral", 1, 1), ("qwen3_moe", 1, 1), ("qwen2_moe", 1, 1), ("qwen2_moe", 2, 1),
            ("qwen2_moe", 1, 2))


def write_peft_adapter(path: Path, base: Path, lora: dict[str, Any], seed: int
                       ) -> dict[str, torch.Tensor]:
    """A per-expert PEFT adapter directory for the model at ``base``: A and B ~ N(0, 0.1)
    (the update matters in the logits without dwarfing the model); returns its tensors."""
    hf = json.loads((base / "config.json").read_text())
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
              "lora_dropout": 0.0, **lora}
    adapter = AdapterConfig.from_peft(config, ModelConfig.from_hf(hf))
    gen = torch.Generator().manual_seed(seed)
    tensors = {"base_model.model." + name: 0.1 * torch.randn(shape, generator=gen)
               for name, shape in adapter.schema().items()}
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors")
    return tensors


@dataclass
class Case:
    base: Path
    adapter: Path           # the PEFT adapter written by the test
    dist: Path              # ckpt-ir: adapter -> mcore-dist
    back: Path              # ckpt-ir: dist -> hf-peft
    merged_logits: torch.Tensor  # transformers on the base merged with `back` by ckpt-ir
    base_logits: torch.Tensor
    layout: dict[str, Any] = field(default_factory=dict)


def _merged_logits(base: Path, adapter: Path, out: Path) -> torch.Tensor:
    ckpt_ir.merge_adapter(base, adapter, out, to="hf")
    return hf_models.hf_logits(out, hf_models.input_ids())


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    out: dict[str, Case] = {}
    for i, arch in enumerate(ARCHS):
        root = tmp_path_factory.mktemp(f"moe-lora-{arch}")
        base = hf_models.make_hf_model(arch, root, seed=40 + i, name="base")
        write_peft_adapter(root / "adapter", base, LORA[arch], seed=400 + i)
        ckpt_ir.convert(root / "adapter", root / "dist", to="mcore-dist", hf_config=base)
        ckpt_ir.convert(root / "dist", root / "back", to="hf-peft")
        layout = json.loads((root / "dist" / "ckpt_ir_lora.json").read_text())["layout"]
        out[arch] = Case(base, root / "adapter", root / "dist", root / "back",
                         _merged_logits(base, root / "back", root / "merged"),
                         hf_models.hf_logits(base, hf_models.input_ids()), layout)
    return out


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"{what}: max |Δlogits| {diff:.3g} > {ATOL}"
    return diff


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_adapter_round_trips_through_mcore_dist_bit_for_bit(cases, arch):
    case = cases[arch]
    want, got = load_file(case.adapter / "adapter_model.safetensors"), \
        load_file(case.back / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    changed = [k for k in want if not torch.equal(got[k].view(torch.uint8),
                                                  want[k].view(torch.uint8))]
    assert not changed, changed
    assert json.loads((case.back / "adapter_config.json").read_text()) == \
        json.loads((case.adapter / "adapter_config.json").read_text())
    # megatron-core 0.16.1's keys and global shapes (SequentialMLP, printed from
    # sharded_state_dict on this machine): experts stacked on a second prepended axis.
    cfg = ModelConfig.from_hf(json.loads((case.base / "config.json").read_text()))
    rank, e, h = case.layout["rank"], cfg.num_experts, cfg.hidden_size
    f = cfg.moe_intermediate_size
    shapes = {k: tuple(t.shape) for k, t in load_dcp_tensors(case.dist).items()}
    x = "mlp.experts.experts."
    if cfg.has_uniform_layers:
        n = cfg.num_layers
        assert shapes[f"decoder.layers.{x}linear_fc1.adapter.linear_in.weight"] == (n, e, rank, h)
        assert shapes[f"decoder.layers.{x}linear_fc1.adapter.linear_out.weight"] == \
            (n, e, 2 * f, rank)
        assert shapes[f"decoder.layers.{x}linear_fc2.adapter.linear_in.weight"] == (n, e, rank, f)
        assert shapes[f"decoder.layers.{x}linear_fc2.adapter.linear_out.weight"] == \
            (n, e, h, rank)
    else:  # qwen2_moe: a dense first layer, so megatron-core keeps one key per layer
        fs = cfg.shared_expert_intermediate_size
        assert shapes[f"decoder.layers.1.{x}linear_fc1.adapter.linear_in.weight"] == (e, rank, h)
        assert shapes[f"decoder.layers.1.{x}linear_fc2.adapter.linear_out.weight"] == (e, h, rank)
        assert shapes["decoder.layers.1.mlp.shared_experts.linear_fc1.adapter.linear_out.weight"] \
            == (2 * fs, rank)
        assert shapes["decoder.layers.0.mlp.linear_fc2.adapter.linear_in.weight"] == \
            (rank, cfg.intermediate_size)
    assert not any("_extra_state" in k for k in shapes)


def _peft_logits(base: Path, adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The PeftModel's logits in fp32 and, as the exact value, in float64."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.tensor(hf_models.input_ids())
    with torch.no_grad():
        return peft_model(input_ids=ids).logits.float(), float64_logits(peft_model, ids)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_peft_loads_ckpt_ir_moe_adapter_with_the_merged_logits(cases, arch):
    """The merged model's logits differ from the PeftModel's by fp32 rounding only
    (tests/tolerances.py)."""
    case = cases[arch]
    assert_logits_close(case.merged_logits, *_peft_logits(case.base, case.back),
                        f"merged vs PeftModel {arch}")
    assert (case.merged_logits - case.base_logits).abs().max() > 0.1  # the adapter matters


def test_peft_loads_qwen2_moe_dense_and_shared_expert_adapter(cases, tmp_path):
    case = cases["qwen2_moe"]
    write_peft_adapter(tmp_path / "adapter", case.base, QWEN2_MOE_PEFT, seed=7)
    ckpt_ir.convert(tmp_path / "adapter", tmp_path / "dist", to="mcore-dist", hf_config=case.base)
    ckpt_ir.convert(tmp_path / "dist", tmp_path / "back", to="hf-peft")
    merged = _merged_logits(case.base, tmp_path / "back", tmp_path / "merged")
    assert_logits_close(merged, *_peft_logits(case.base, tmp_path / "back"),
                        "merged vs PeftModel")
    assert (merged - case.base_logits).abs().max() > 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_moe_weights_are_the_lora_formula(cases, arch, tmp_path):
    case = cases[arch]
    out = tmp_path / "merged"
    ckpt_ir.merge_adapter(case.base, case.back, out, to="hf")
    got = {k: v for p in sorted(out.glob("*.safetensors")) for k, v in load_file(p).items()}
    base = {k: v for p in sorted(case.base.glob("*.safetensors")) for k, v in load_file(p).items()}
    lora = load_file(case.back / "adapter_model.safetensors")
    with open_adapter(case.back) as view:
        adapter = view.adapter
    assert any(".experts.3." in m for m in adapter.modules())
    for module in adapter.modules():
        a = lora[f"base_model.model.{module}.lora_A.weight"]
        b = lora[f"base_model.model.{module}.lora_B.weight"]
        w, scaling = base[module + ".weight"], adapter.scaling(module)
        assert_merged_close(got[module + ".weight"], w + scaling * (b @ a), w, b, a, scaling,
                            module)
    untouched = [k for k in base if k.removesuffix(".weight") not in set(adapter.modules())]
    assert all(torch.equal(got[k], base[k]) for k in untouched)


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_merge_in_megatron_layout_equals_merged_hf(cases, arch, tmp_path):
    """merge-adapter from the two torch_dist checkpoints (base, Bridge LoRA) writes the merged
    HF model's torch_dist: every expert's fc1 as ``[gate'; up']``."""
    case = cases[arch]
    ckpt_ir.convert(case.base, tmp_path / "base-dist", to="mcore-dist")
    ckpt_ir.merge_adapter(tmp_path / "base-dist", case.dist, tmp_path / "merged-dist",
                          to="mcore-dist")
    ckpt_ir.merge_adapter(case.base, case.back, tmp_path / "merged-hf", to="hf")
    ckpt_ir.convert(tmp_path / "merged-hf", tmp_path / "want", to="mcore-dist")
    want, got = load_dcp_tensors(tmp_path / "want"), load_dcp_tensors(tmp_path / "merged-dist")
    assert want.keys() == got.keys()
    assert any(".experts.experts.linear_fc1.weight" in k for k in want)
    base, lora = load_dcp_tensors(tmp_path / "base-dist"), load_dcp_tensors(case.dist)
    # Megatron's scaling is alpha / rank; B carries each module's own factor relative to it.
    scaling = LORA[arch]["lora_alpha"] / LORA[arch]["r"]
    assert_megatron_merge_close(got, want, base, lora, scaling)


# --------------------------------------------------------------------------- megatron-core


@pytest.fixture(scope="module")
def megatron(cases, tmp_path_factory) -> dict[tuple[str, int, int], Path | str]:
    root = tmp_path_factory.mktemp("moe-lora-megatron")
    jobs, out = [], {}
    for arch, tp, ep in MEGATRON:
        case = cases[arch]
        base_dist = root / f"{arch}-base"
        if not base_dist.exists():
            ckpt_ir.convert(case.base, base_dist, to="mcore-dist", mcore_spec="local",
                            pad_vocab_to_multiple=PAD)
        result = root / f"{arch}-tp{tp}-ep{ep}.pt"
        jobs.append({"command": "lora-load-forward",
                     "hf_config": str(case.base / "config.json"), "tp": tp, "ep": ep, "etp": 1,
                     "base_ckpt": str(base_dist), "adapter_ckpt": str(case.dist),
                     "dim": case.layout["rank"], "alpha": case.layout["alpha"],
                     "style": "fused", "pad_vocab_to_multiple": PAD,
                     "input_ids": hf_models.input_ids(), "out": str(result)})
        out[(arch, tp, ep)] = result
    try:
        launch("batch", jobs, world_size=2, timeout=400)
    except HarnessError as e:
        return {key: f"launch failed: {e}" for key in out}
    return out


@pytest.mark.parametrize(("arch", "tp", "ep"), MEGATRON,
                         ids=[f"{a}-tp{t}-ep{e}" for a, t, e in MEGATRON])
def test_megatron_core_with_bridge_expert_lora_matches_merged_hf(cases, megatron, arch, tp, ep):
    result = megatron[(arch, tp, ep)]
    if isinstance(result, str):
        pytest.fail(result, pytrace=False)
    try:
        logits = job_result(result)
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    want = cases[arch].merged_logits
    _assert_close(logits[..., : want.shape[-1]], want, f"megatron {arch} tp={tp} ep={ep}")
