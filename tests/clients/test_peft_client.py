"""ckpt-ir's adapters, proven with real peft and transformers (fp32, CPU).

For tiny random llama, qwen2 and qwen3 models with LoRA on all seven linear modules and non-zero
B (``init_lora_weights=False``), and each covering a corner of PEFT's scaling:

- llama: ``rank_pattern`` (q at rank 8, the rest 4) and ``alpha_pattern`` (v): q/k/v ranks
  differ, so Megatron needs rank stacking, and modules carry their own scaling;
- qwen2 (q/k/v bias, tied embeddings): rsLoRA (scaling alpha/sqrt(r));
- qwen3 (q/k norm, MQA): a layer-specific rank (``model.layers.1.mlp.down_proj``).

Proven here:

- hf-peft -> {mcore-dist LoRA, mcore-dist CanonicalLoRA, verl adapter files at TP=2 / PP=2}
  -> hf-peft gives back every tensor bit for bit, and ``PeftModel.from_pretrained`` on the
  result gives the original PeftModel's logits;
- an adapter with one A shared by q/k/v and by gate/up (what Megatron's fused LoRA trains)
  round-trips through mcore-dist bit for bit even without ckpt-ir's layout file (a checkpoint
  Megatron-Bridge wrote); a rank-stacked one read that way is exactly the same update at the
  Megatron rank, and PEFT's logits agree;
- ``merge_adapter`` writes an HF model whose logits equal the PeftModel's, with the weights of
  PEFT's own ``merge_and_unload``; merged into mcore-dist it equals the merged HF model
  converted, and equals the merge done in Megatron's layout, per TP shard, from the two
  torch_dist checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckpt_ir
from ckpt_ir.adapter_api import open_adapter
from ckpt_ir.converters.storage.dcp_files import DcpReader
from ckpt_ir.layout import Partition, shard, unshard
from tests.clients import hf_models
from tests.tolerances import (
    assert_logits_close,
    assert_megatron_merge_close,
    assert_merged_close,
    float64_logits,
)

pytestmark = pytest.mark.clients

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LORA: dict[str, dict[str, Any]] = {
    "llama": {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 8},
              "alpha_pattern": {"v_proj": 4}},
    "qwen2": {"r": 4, "lora_alpha": 16, "use_rslora": True},
    "qwen3": {"r": 8, "lora_alpha": 16, "rank_pattern": {"model.layers.1.mlp.down_proj": 2}},
}
ARCHS = tuple(LORA)


@dataclass
class Case:
    base: Path
    adapter: Path          # PEFT adapter with independent A matrices (rank stacking)
    logits: torch.Tensor   # its PeftModel's logits (fp32)
    logits64: torch.Tensor  # the same PeftModel's logits in float64: the exact value
    shared: Path           # PEFT adapter whose q/k/v and gate/up share one A (fused origin)
    shared_logits: torch.Tensor
    shared_logits64: torch.Tensor
    merged: dict[str, torch.Tensor]  # PEFT merge_and_unload weights of `adapter`

    def assert_logits(self, got: torch.Tensor, what: str) -> None:
        assert_logits_close(got, self.logits, self.logits64, what)

    def assert_shared_logits(self, got: torch.Tensor, what: str) -> None:
        assert_logits_close(got, self.shared_logits, self.shared_logits64, what)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(hf_models.input_ids())).logits.float()


def _logits64(model: torch.nn.Module) -> torch.Tensor:
    return float64_logits(model, torch.tensor(hf_models.input_ids()))


def _base_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@torch.no_grad()
def _randomize_lora(peft_model: torch.nn.Module, seed: int) -> None:
    """Non-zero A and B ~ N(0, 0.1), like the base weights: the update matters in the logits
    without dwarfing the base model (fp32 noise then stays far below the tolerance)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def _share_a(peft_model: torch.nn.Module) -> None:
    """Give k/v the A of q and up the A of gate, as Megatron's fused LoRA has them."""
    modules = dict(peft_model.named_modules())
    for name, module in modules.items():
        for src, dsts in (("q_proj", ("k_proj", "v_proj")), ("gate_proj", ("up_proj",))):
            if name.endswith("." + src):
                for dst in dsts:
                    other = modules[name[: -len(src)] + dst]
                    other.lora_A["default"].weight.copy_(module.lora_A["default"].weight)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    from peft import LoraConfig, get_peft_model

    out: dict[str, Case] = {}
    for i, arch in enumerate(ARCHS):
        root = tmp_path_factory.mktemp(f"peft-{arch}")
        base = hf_models.make_hf_model(arch, root, seed=10 + i, name="base")
        model = get_peft_model(_base_model(base), LoraConfig(
            target_modules=ALL_LINEAR, init_lora_weights=False, **LORA[arch])).eval()
        _randomize_lora(model, 100 + i)
        model.save_pretrained(root / "adapter")
        logits, logits64 = _logits(model), _logits64(model)
        merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
        shared = get_peft_model(_base_model(base), LoraConfig(
            r=4, lora_alpha=8, target_modules=ALL_LINEAR, init_lora_weights=False)).eval()
        _randomize_lora(shared, 200 + i)
        _share_a(shared)
        shared.save_pretrained(root / "shared")
        out[arch] = Case(base, root / "adapter", logits, logits64, root / "shared",
                         _logits(shared), _logits64(shared), merged)
    return out


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter_model.safetensors")


def _peft_logits(base: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(_base_model(base), adapter_dir).eval())


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(
            got[name].view(torch.uint8), t.view(torch.uint8)), name


VIAS: dict[str, tuple[str, dict[str, Any]]] = {
    "mcore-dist": ("mcore-dist", {}),
    "mcore-dist-canonical": ("mcore-dist", {"lora_style": "canonical"}),
    "verl-tp2": ("verl-legacy", {"layout": {"tp": 2}}),
    "verl-tp2-pp2": ("verl-legacy", {"layout": {"tp": 2, "pp": 2}}),
}


@pytest.mark.parametrize("via", list(VIAS))
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_the_adapter_back_from_megatron_formats(cases, arch, via, tmp_path):
    case = cases[arch]
    fmt, options = VIAS[via]
    report = ckpt_ir.convert(case.adapter, tmp_path / "via", to=fmt, hf_config=case.base,
                             **options)
    if arch == "llama" and via != "mcore-dist-canonical":
        assert any("ranks stacked" in n for n in report.notes), report.notes
    ckpt_ir.convert(tmp_path / "via", tmp_path / "back", to="hf-peft")
    _assert_same_tensors(_tensors(tmp_path / "back"), _tensors(case.adapter))
    want = json.loads((case.adapter / "adapter_config.json").read_text())
    got = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert got == want
    case.assert_logits(_peft_logits(case.base, tmp_path / "back"), f"{arch} via {via}")


def _as_bridge_checkpoint(dist: Path, alpha: float | None) -> None:
    """What Megatron-Bridge writes: no ckpt-ir layout file; alpha in run_config.yaml."""
    (dist / "ckpt_ir_lora.json").unlink()
    if alpha is not None:
        (dist / "run_config.yaml").write_text(
            f"peft:\n  _target_: megatron.bridge.peft.lora.LoRA\n  alpha: {alpha}\n")


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_origin_adapter_round_trips_bit_for_bit_without_layout_file(cases, arch,
                                                                          tmp_path):
    case = cases[arch]
    report = ckpt_ir.convert(case.shared, tmp_path / "dist", to="mcore-dist",
                             hf_config=case.base)
    assert report.adapter["megatron"]["rank"] == 4  # one A kept: nothing stacked
    _as_bridge_checkpoint(tmp_path / "dist", alpha=8)
    ckpt_ir.extract_adapter(tmp_path / "dist", tmp_path / "back")
    _assert_same_tensors(_tensors(tmp_path / "back"), _tensors(case.shared))
    case.assert_shared_logits(_peft_logits(case.base, tmp_path / "back"), arch)


def test_rank_stacked_adapter_read_as_bridge_is_the_same_update(cases, tmp_path):
    """Without the layout file, a stacked adapter comes back at the Megatron rank (A copied to
    q/k/v, B split, as save_hf_adapter does): every module's A and B hold the original ones in
    their rank block, zeros elsewhere, and PEFT computes the same logits."""
    case = cases["llama"]
    report = ckpt_ir.convert(case.adapter, tmp_path / "dist", to="mcore-dist",
                             hf_config=case.base)
    mega = report.adapter["megatron"]
    _as_bridge_checkpoint(tmp_path / "dist", alpha=None)
    back = ckpt_ir.extract_adapter(tmp_path / "dist", tmp_path / "back",
                                   lora_alpha=mega["alpha"])
    assert back.adapter["source"]["r"] == mega["rank"] == 16  # 8 + 4 + 4
    want, got = _tensors(case.adapter), _tensors(tmp_path / "back")
    assert mega["target_modules"] == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    a_q, a_k = (got[f"base_model.model.model.layers.0.self_attn.{m}.lora_A.weight"]
                for m in ("q_proj", "k_proj"))
    assert torch.equal(a_q, a_k)  # one fused A, copied to each module
    assert torch.equal(a_q[0:8], want["base_model.model.model.layers.0.self_attn.q_proj"
                                      ".lora_A.weight"])
    assert torch.equal(a_q[8:12], want["base_model.model.model.layers.0.self_attn.k_proj"
                                       ".lora_A.weight"])
    b_k = got["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    assert torch.equal(b_k[:, 8:12], want["base_model.model.model.layers.0.self_attn.k_proj"
                                          ".lora_B.weight"])
    assert not b_k[:, :8].any() and not b_k[:, 12:].any()
    case.assert_logits(_peft_logits(case.base, tmp_path / "back"), "rank-stacked as bridge")


def _peft_factors(case: Case) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Base-model weight name -> (B, A, scaling) of each module the adapter changes."""
    lora = _tensors(case.adapter)
    adapter = open_adapter(case.adapter, hf_config=case.base).adapter
    return {f"{m}.weight": (lora[f"base_model.model.{m}.lora_B.weight"],
                            lora[f"base_model.model.{m}.lora_A.weight"], adapter.scaling(m))
            for m in adapter.modules()}


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_model_equals_peft(cases, arch, tmp_path):
    """Merged-vs-unmerged logits differ by fp32 rounding only; weights are PEFT's
    merge_and_unload within the rounding bound of W + s * B @ A (tests/tolerances.py)."""
    case = cases[arch]
    ckpt_ir.merge_adapter(case.base, case.adapter, tmp_path / "merged", to="hf")
    model = _base_model(tmp_path / "merged")
    case.assert_logits(_logits(model), f"merged {arch}")
    state = model.state_dict()
    base = _base_model(case.base).state_dict()
    factors = _peft_factors(case)
    assert factors and factors.keys() <= case.merged.keys()
    for name, w in case.merged.items():
        if name in factors:
            b, a, scaling = factors[name]
            assert_merged_close(state[name], w, base[name], b, a, scaling, name)
        else:
            assert torch.equal(state[name], w), name


def _dist_tensors(path: Path) -> dict[str, torch.Tensor]:
    r = DcpReader(path)
    try:
        return {fqn: r.read_region(fqn, (0,) * len(t.shape), t.shape).clone()
                for fqn, t in r.index.tensors.items()}
    finally:
        r.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_in_megatron_layout_equals_merged_hf(cases, arch, tmp_path):
    case = cases[arch]
    ckpt_ir.convert(case.base, tmp_path / "base-dist", to="mcore-dist")
    report = ckpt_ir.convert(case.adapter, tmp_path / "lora-dist", to="mcore-dist",
                             hf_config=case.base)
    ckpt_ir.merge_adapter(case.base, case.adapter, tmp_path / "merged-hf", to="hf")
    ckpt_ir.convert(tmp_path / "merged-hf", tmp_path / "want", to="mcore-dist")
    ckpt_ir.merge_adapter(tmp_path / "base-dist", tmp_path / "lora-dist",
                          tmp_path / "merged-dist", to="mcore-dist")
    want, got = _dist_tensors(tmp_path / "want"), _dist_tensors(tmp_path / "merged-dist")
    assert want.keys() == got.keys()
    base, lora = _dist_tensors(tmp_path / "base-dist"), _dist_tensors(tmp_path / "lora-dist")
    scaling = report.adapter["megatron"]["alpha"] / report.adapter["megatron"]["rank"]
    # Two fp32 merges of one update (per HF module, then fused; or fused): within the rounding
    # bound of W + s * B @ A at Megatron's (stacked) rank; untouched tensors are bit-equal.
    assert_megatron_merge_close(got, want, base, lora, scaling)
    # Megatron's own merge (Megatron-Bridge merge_adapter_weights): fused base weight plus
    # (alpha/dim) * B @ A, one TP shard at a time: B and W split like the base rows, A whole
    # (linear_in gathers its output) for column-parallel layers.
    for module, partition in (("self_attention.linear_qkv", Partition.QKV),
                              ("mlp.linear_fc1", Partition.SWIGLU)):
        w = base[f"decoder.layers.{module}.weight"]
        a = lora[f"decoder.layers.{module}.adapter.linear_in.weight"]
        b = lora[f"decoder.layers.{module}.adapter.linear_out.weight"]
        for layer in range(w.shape[0]):
            shards = [wt + (bt @ a[layer]) * scaling for wt, bt in
                      zip(shard(w[layer], partition, 2), shard(b[layer], partition, 2),
                          strict=True)]
            merged = unshard(shards, partition)
            assert_merged_close(merged, want[f"decoder.layers.{module}.weight"][layer],
                                w[layer], b[layer], a[layer], scaling, f"{module} layer {layer}")


def test_rank_and_alpha_patterns_match_peft(cases):
    """ckpt-ir's per-module rank and scaling are PEFT's own."""
    from peft import PeftModel

    for arch in ARCHS:
        case = cases[arch]
        model = PeftModel.from_pretrained(_base_model(case.base), case.adapter)
        adapter = open_adapter(case.adapter, hf_config=case.base).adapter
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                assert adapter.rank(name) == module.r["default"], name
                assert adapter.scaling(name) == module.scaling["default"], name
