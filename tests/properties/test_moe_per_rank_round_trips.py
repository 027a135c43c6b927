"""Mixture-of-experts per-rank files round-trip bit for bit over random MoE configs (mixtral,
qwen2_moe, qwen3_moe, deepseek_v3 with MLA and MTP), TP, EP and pipeline splits, and both
expert module layouts (SequentialMLP ``local_experts.{k}``, TEGroupedMLP ``weight{k}``):

- hf -> verl-legacy / megatron-legacy -> hf reproduces every IR tensor;
- layout A -> layout B -> layout A (``reshard`` across EP, TP and PP) reproduces the rank files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import ckpt_ir
from tests.fixtures import with_mtp_copies, write_hf
from tests.properties.test_per_rank_round_trips import rank_files
from tests.strategies import bits_equal, dtypes, moe_configs, moe_layouts

PER_RANK = st.sampled_from(["verl-legacy", "megatron-legacy"])
EXPERTS = st.sampled_from(["sequential", "grouped"])
SPECS = st.sampled_from(["local", "te"])
PAD = 12


def _layout(layout) -> dict:
    return {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "ep": layout.ep,
            "first_stage_layers": layout.first_stage_layers,
            "last_stage_layers": layout.last_stage_layers}


@settings(max_examples=25)
@given(data=st.data(), config=moe_configs(), dtype=dtypes(), seed=st.integers(0, 1000),
       fmt=PER_RANK, experts=EXPERTS, spec=SPECS)
def test_moe_hf_to_per_rank_to_hf_is_bit_identical(data, config, dtype, seed, fmt, experts,
                                                   spec):
    layout = data.draw(moe_layouts(config))
    note(f"{fmt} {layout.describe()} {experts} {spec}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        want = write_hf(d / "hf", config, dtype=dtype, seed=seed)
        ckpt_ir.convert(d / "hf", d / "ranks", to=fmt, layout=layout, mcore_experts=experts,
                        mcore_spec=spec, pad_vocab_to_multiple=PAD)
        # mp_rank_TT_NNN does not say whether NNN is a pipeline or an expert rank.
        ckpt_ir.convert(d / "ranks", d / "back", to="hf", source_ep=layout.ep)
        got = load_file(d / "back" / "model.safetensors")
        want = with_mtp_copies(config, want)
        assert got.keys() == want.keys()
        for name, t in want.items():
            assert bits_equal(got[name], t), name


@settings(max_examples=15)
@given(data=st.data(), config=moe_configs(max_layers=2), seed=st.integers(0, 1000),
       fmt=PER_RANK, experts=EXPERTS)
def test_moe_per_rank_reshard_round_trips(data, config, seed, fmt, experts):
    a, b = data.draw(moe_layouts(config)), data.draw(moe_layouts(config))
    note(f"{fmt}: {a.describe()} -> {b.describe()} -> {a.describe()}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_hf(d / "hf", config, dtype=torch.bfloat16, seed=seed)
        ckpt_ir.convert(d / "hf", d / "a", to=fmt, layout=a, mcore_experts=experts,
                        mcore_spec="local", pad_vocab_to_multiple=PAD)
        ckpt_ir.convert(d / "a", d / "b", to=fmt, layout=_layout(b), source_ep=a.ep,
                        mcore_experts=experts)
        ckpt_ir.convert(d / "b", d / "a2", to=fmt, layout=_layout(a), source_ep=b.ep,
                        mcore_experts=experts)
        assert rank_files(d / "a2") == rank_files(d / "a")
