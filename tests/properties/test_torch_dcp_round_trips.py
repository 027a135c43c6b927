"""torch-dcp round-trips bit for bit: hf -> torch-dcp (HF names, and torchtitan's names where
torchtitan has the family) -> hf over random dense and MoE configs, dtypes and expert layouts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt_ir
from tests.fixtures import load_hf_tensors, with_mtp_copies, write_hf
from tests.strategies import bits_equal, dense_configs, dtypes, moe_configs

# The families torchtitan has (ckpt_ir/architectures/torchtitan.py).
TORCHTITAN = ("llama", "qwen3", "qwen3_moe")


def _round_trip(config: dict, dtype, seed: int, *, torchtitan: bool, experts: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        want = write_hf(d / "hf", config, dtype=dtype, seed=seed)
        ckpt_ir.convert(d / "hf", d / "dcp", to="torch-dcp", torchtitan=torchtitan,
                        hf_experts=experts)
        if torchtitan:
            assert (d / "dcp" / "step-0" / ".metadata").is_file()
        ckpt_ir.convert(d / "dcp", d / "back", to="hf")
        got = load_hf_tensors(d / "back")
        # An hf destination writes an MTP layer's embedding / head copies back (DeepSeek's
        # releases hold them); the tiny source does not.
        want = with_mtp_copies(config, want)
        assert got.keys() == want.keys(), set(got) ^ set(want)
        for name, t in want.items():
            assert bits_equal(got[name], t), name


@settings(max_examples=12, deadline=None)
@given(config=dense_configs(), dtype=dtypes(), seed=st.integers(0, 1000), titan=st.booleans())
def test_dense_hf_to_torch_dcp_to_hf_is_bit_identical(config, dtype, seed, titan):
    _round_trip(config, dtype, seed, torchtitan=titan and config["model_type"] in TORCHTITAN,
                experts="per-expert")


@settings(max_examples=8, deadline=None)
@given(config=moe_configs(), dtype=dtypes(), seed=st.integers(0, 1000), titan=st.booleans(),
       experts=st.sampled_from(["per-expert", "fused"]))
def test_moe_hf_to_torch_dcp_to_hf_is_bit_identical(config, dtype, seed, titan, experts):
    _round_trip(config, dtype, seed, torchtitan=titan and config["model_type"] in TORCHTITAN,
                experts=experts)
