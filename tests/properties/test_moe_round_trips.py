"""Mixture-of-experts checkpoints round-trip bit for bit between every format and both HF
expert layouts, over random experts, top-k, shared experts, dense/MoE layer mixes, MLA and MTP.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt_ir
from ckpt_ir.ir import ModelConfig
from ckpt_ir.megatron_config import hf_config_from_megatron, megatron_args
from ckpt_ir.transforms import StackExperts
from tests.fixtures import load_dcp_tensors, load_hf_tensors, with_mtp_copies, write_hf
from tests.strategies import bits_equal, dtypes, moe_configs, tensors

LAYOUTS = st.sampled_from(["per-expert", "fused"])
SPECS = st.sampled_from(["any", "local", "te"])




def _source(d: Path, config: dict, dtype: torch.dtype, seed: int, layout: str
            ) -> tuple[Path, dict[str, torch.Tensor]]:
    """A per-expert HF checkpoint (the IR itself), converted to ``layout``."""
    want = write_hf(d / "hf", config, dtype=dtype, seed=seed)
    if layout == "per-expert":
        return d / "hf", want
    ckpt_ir.convert(d / "hf", d / "hf-fused", to="hf", hf_experts="fused")
    return d / "hf-fused", want


def _assert_ir(path: Path, want: dict[str, torch.Tensor]) -> None:
    with ckpt_ir.open(path) as ckpt:
        assert set(ckpt.tensors) == set(want), set(ckpt.tensors) ^ set(want)
        for name, t in want.items():
            assert bits_equal(ckpt.read(name), t), (path.name, name)


@settings(max_examples=25)
@given(config=moe_configs(), dtype=dtypes(), seed=st.integers(0, 1000), src_layout=LAYOUTS,
       dst_layout=LAYOUTS, spec=SPECS, pad=st.sampled_from([None, 8]))
def test_moe_hf_to_mcore_dist_to_hf_is_bit_identical(config, dtype, seed, src_layout,
                                                     dst_layout, spec, pad):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src, want = _source(d, config, dtype, seed, src_layout)
        ckpt_ir.convert(src, d / "dist", to="mcore-dist", mcore_spec=spec,
                        pad_vocab_to_multiple=pad)
        ckpt_ir.convert(d / "dist", d / "back", to="hf", hf_experts=dst_layout,
                        max_shard_size=3000)
        if dst_layout == "per-expert":
            got = load_hf_tensors(d / "back")
            written = with_mtp_copies(config, want)
            assert got.keys() == written.keys()
            for name, t in written.items():
                assert bits_equal(got[name], t), name
        else:
            fused = load_hf_tensors(d / "back")
            assert any(n.endswith("mlp.experts.gate_up_proj") for n in fused) == \
                bool(ModelConfig.from_hf(config).moe_layers)
        _assert_ir(d / "back", want)


@settings(max_examples=15)
@given(config=moe_configs(), dtype=dtypes(), seed=st.integers(0, 1000), via=LAYOUTS,
       spec=SPECS)
def test_moe_mcore_dist_to_hf_to_mcore_dist_gives_identical_tensors(config, dtype, seed, via,
                                                                    spec):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_hf(d / "hf", config, dtype=dtype, seed=seed)
        ckpt_ir.convert(d / "hf", d / "dist1", to="mcore-dist", mcore_spec=spec)
        ckpt_ir.convert(d / "dist1", d / "hf2", to="hf", hf_experts=via)
        ckpt_ir.convert(d / "hf2", d / "dist2", to="mcore-dist", mcore_spec=spec)
        a, b = load_dcp_tensors(d / "dist1"), load_dcp_tensors(d / "dist2")
        assert a.keys() == b.keys()
        for k in a:
            assert bits_equal(a[k], b[k]), k


@settings(max_examples=15)
@given(config=moe_configs(max_layers=2), seed=st.integers(0, 100))
def test_open_reads_the_same_moe_ir_from_every_format_and_layout(config, seed):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        want = write_hf(d / "hf", config, dtype=torch.float32, seed=seed)
        ckpt_ir.convert(d / "hf", d / "fused", to="hf", hf_experts="fused")
        ckpt_ir.convert(d / "fused", d / "dist", to="mcore-dist", pad_vocab_to_multiple=16)
        for path in (d / "hf", d / "fused", d / "dist"):
            _assert_ir(path, want)


@given(data=st.data())
def test_stack_experts_round_trips(data):
    experts = data.draw(st.integers(1, 5))
    parts = data.draw(st.sampled_from([("gate", "up"), ("tensor",)]))
    shape = data.draw(st.tuples(st.integers(1, 6), st.integers(1, 6)))
    dtype = data.draw(dtypes())
    op = StackExperts(experts, parts)
    values = {role: data.draw(tensors(shape, dtype)) for role in op.roles}
    stacked = op.apply(values)
    assert tuple(stacked.shape) == op.shapes({r: shape for r in op.roles})
    back = op.inverse(stacked)
    assert back.keys() == values.keys()
    assert all(bits_equal(back[r], values[r]) for r in values)


@settings(max_examples=50)
@given(config=moe_configs())
def test_megatron_args_round_trip_keeps_the_schema(config):
    cfg = ModelConfig.from_hf(config)
    args = megatron_args(cfg)
    back = ModelConfig.from_hf(hf_config_from_megatron(
        {**args.transformer_config, **args.gpt_model}, architecture=cfg.architecture))
    assert back.schema() == cfg.schema()
    assert args.decoder_block_spec == (not cfg.has_uniform_layers)
