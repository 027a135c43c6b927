"""torchtitan's deepseek_v3 and gpt_oss namings round-trip bit for bit: hf -> torch-dcp
``--torchtitan`` -> hf over random DeepSeek-V3 configs (q-LoRA or not, dense-first layers,
shared experts, expert groups, 0 or 1 MTP layer, tied or untied), random gpt-oss configs
(experts, GQA, head_dim, sliding / full layers, tied or untied) and dtypes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import ckpt_ir
from ckpt_ir.converters.storage.dcp_files import DcpReader
from ckpt_ir.ir import ModelConfig
from tests.fixtures import load_hf_tensors, with_mtp_copies, write_hf
from tests.strategies import bits_equal, dtypes, moe_configs


@settings(max_examples=10, deadline=None)
@given(config=moe_configs(archs=("deepseek_v3",)), dtype=dtypes(), seed=st.integers(0, 1000))
def test_deepseek_v3_hf_to_torchtitan_to_hf_is_bit_identical(config, dtype, seed):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        want = write_hf(d / "hf", config, dtype=dtype, seed=seed)
        ckpt_ir.convert(d / "hf", d / "titan", to="torch-dcp", torchtitan=True)
        keys = set(DcpReader(d / "titan" / "step-0").index.tensors)
        # torchtitan's names, not HF's: MTP layers under mtp_layers., experts stacked.
        assert "tok_embeddings.weight" in keys and not any(k.startswith("model.") for k in keys)
        assert any(k.startswith("mtp_layers.0.") for k in keys) == bool(
            config["num_nextn_predict_layers"])
        ckpt_ir.convert(d / "titan", d / "back", to="hf")
        got = load_hf_tensors(d / "back")
        want = with_mtp_copies(config, want)
        assert got.keys() == want.keys(), set(got) ^ set(want)
        for name, t in want.items():
            assert bits_equal(got[name], t), name


def _write_gpt_oss(path: Path, config: dict[str, Any], dtype: torch.dtype, seed: int
                   ) -> dict[str, torch.Tensor]:
    """A gpt-oss HF directory as transformers saves one (experts fused: ``gate_up_proj``
    ``[E, H, 2F]`` interleaved, ``down_proj`` ``[E, F, H]``, their biases), random."""
    cfg = ModelConfig.from_hf(config)
    gen = torch.Generator().manual_seed(seed)
    state = {n: torch.randn(shape, generator=gen).to(dtype)
             for n, shape in cfg.schema().items() if ".mlp.experts." not in n}
    e, h, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp.experts."
        for name, shape in (("gate_up_proj", (e, h, 2 * f)), ("gate_up_proj_bias", (e, 2 * f)),
                            ("down_proj", (e, f, h)), ("down_proj_bias", (e, h))):
            state[p + name] = torch.randn(shape, generator=gen).to(dtype)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return state


@st.composite
def gpt_oss_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Small gpt-oss HF config dicts, valid by construction (top-k within the experts)."""
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 4))
    return {
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
        "num_hidden_layers": layers, "hidden_size": draw(st.sampled_from([16, 24])),
        "num_attention_heads": 4, "num_key_value_heads": draw(st.sampled_from([1, 2, 4])),
        "head_dim": draw(st.sampled_from([4, 8])),
        "intermediate_size": draw(st.sampled_from([4, 8, 12])),
        "num_local_experts": experts, "num_experts_per_tok": draw(st.integers(1, experts)),
        "vocab_size": draw(st.integers(5, 41)), "sliding_window": 4,
        "layer_types": draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]),
                                     min_size=layers, max_size=layers)),
        "attention_bias": True, "tie_word_embeddings": draw(st.booleans()),
        "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "hidden_act": "silu",
    }


@settings(max_examples=8, deadline=None)
@given(config=gpt_oss_configs(), dtype=dtypes(), seed=st.integers(0, 1000))
def test_gpt_oss_hf_to_torchtitan_to_hf_is_bit_identical(config, dtype, seed):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        want = _write_gpt_oss(d / "hf", config, dtype, seed)
        ckpt_ir.convert(d / "hf", d / "titan", to="torch-dcp", torchtitan=True)
        keys = set(DcpReader(d / "titan" / "step-0").index.tensors)
        assert "layers.0.moe.routed_experts.inner_experts.mlp1_weight_EGD" in keys
        # gpt-oss's HF model has no routing bias: torchtitan's buffer is written as zeros and
        # listed as dropped on the way back.
        assert "layers.0.moe.expert_bias_E" in keys
        report = ckpt_ir.convert(d / "titan", d / "back", to="hf")
        assert set(report.dropped) == {f"layers.{i}.moe.expert_bias_E"
                                       for i in range(config["num_hidden_layers"])}
        got = load_hf_tensors(d / "back")
        assert got.keys() == want.keys(), set(got) ^ set(want)
        for name, t in want.items():
            assert bits_equal(got[name], t), name
