"""LoRA adapters of MoE models round-trip through Megatron-Bridge's torch_dist LoRA.

Hypothesis draws the model (mixtral / qwen2_moe / qwen3_moe / deepseek_v3: expert counts, shared
experts, dense layers, so stacked or per-layer torch_dist keys) and the adapter (expert leaves,
attention leaves except on multi-latent attention, site-specific targets such as a shared
expert's ``down_proj``, ranks and alphas with patterns, rsLoRA, one A shared by each expert's
gate/up and by q/k/v or not). Adapters are PEFT directories written directly, per expert as
Megatron-Bridge's ``save_hf_adapter`` writes them; the real-client proofs are in
tests/clients/test_moe_lora_client.py.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckpt_ir.adapter_api import convert_adapter
from ckpt_ir.adapters import LORA_LAYOUT_FILE, AdapterConfig
from ckpt_ir.ir import ModelConfig
from tests.properties.test_adapter_round_trips import (
    _exact,
    _factors,
    _read,
    _updates,
    _values,
    assert_came_back,
)
from tests.strategies import dtypes, moe_configs, moe_lora_configs


def write_moe_peft(path: Path, hf: dict[str, Any], lora: dict[str, Any], dtype: torch.dtype,
                   seed: int) -> dict[str, torch.Tensor]:
    """A per-expert PEFT adapter directory (with the base config.json); returns its tensors.
    With ``shared_a`` every fused Megatron adapter's modules (q/k/v; each expert's gate/up)
    get one A, as Megatron's fused LoRA trains them."""
    lora = dict(lora)
    shared = lora.pop("shared_a")
    adapter = AdapterConfig.from_peft(lora, ModelConfig.from_hf(hf))
    g = torch.Generator().manual_seed(seed)
    tensors = {name: _values(shape, dtype, g) for name, shape in adapter.schema().items()}
    if shared:
        for members in adapter.units().values():
            first = tensors[members[0].name + ".lora_A.weight"]
            for m in members[1:]:
                tensors[m.name + ".lora_A.weight"] = first.clone()
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf))
    (path / "adapter_config.json").write_text(json.dumps(lora))
    save_file({"base_model.model." + k: v for k, v in tensors.items()},
              path / "adapter_model.safetensors")
    return tensors


@st.composite
def moe_adapters(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    hf = draw(moe_configs(max_layers=3, max_experts=4))
    return hf, draw(moe_lora_configs(hf))


@settings(max_examples=25)
@given(case=moe_adapters(), dtype=dtypes(), seed=st.integers(0, 999))
def test_moe_peft_to_mcore_dist_and_back_round_trips(case, dtype, seed):
    hf, lora = case
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        want = write_moe_peft(d / "peft", hf, lora, dtype, seed)
        convert_adapter(d / "peft", d / "via", "mcore-dist")
        convert_adapter(d / "via", d / "back", "hf-peft")
        assert_came_back(d, want)


@settings(max_examples=15)
@given(case=moe_adapters(), seed=st.integers(0, 999))
def test_moe_megatron_adapter_without_layout_file_keeps_every_update(case, seed):
    """What Megatron-Bridge wrote (no ckpt-ir layout file, alpha given): every module's update
    is the original one; a fused Megatron adapter covers every module of its base layer, so
    modules the source did not target come back with a zero update."""
    hf, lora = case
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_moe_peft(d / "peft", hf, lora, torch.float32, seed)
        report = convert_adapter(d / "peft", d / "via", "mcore-dist")
        factors = _factors(d / "via")
        (d / "via" / LORA_LAYOUT_FILE).unlink()
        mega = report.adapter["megatron"]
        convert_adapter(d / "via", d / "back", "hf-peft", lora_alpha=mega["alpha"])
        src, want = _read(d / "peft")
        back, got = _read(d / "back")
        assert back.r == mega["rank"] and not back.use_rslora
        u_want, u_got = _updates(src, want), _updates(back, got)
        tol = 1e-12 if _exact(factors) else 1e-6
        for m, u in u_want.items():
            assert m in u_got, m
            scale = u.abs().max().item()
            assert torch.allclose(u_got[m], u, rtol=0, atol=tol * scale), m
        for m, u in u_got.items():
            if m not in u_want:
                assert not u.any(), m
