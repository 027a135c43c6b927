"""torchtitan's deepseek_v3 naming round-trips bit for bit: hf -> torch-dcp ``--torchtitan``
-> hf over random DeepSeek-V3 configs (q-LoRA or not, dense-first layers, shared experts,
expert groups, 0 or 1 MTP layer, tied or untied) and dtypes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt_ir
from ckpt_ir.converters.storage.dcp_files import DcpReader
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
