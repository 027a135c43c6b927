"""The dense long tail under random parallel layouts: phi3's fused QKV cut in whole KV groups
and ``[gate; up]`` per rank, olmo2's full-width q/k norms whole on every rank, Gemma's four
norms, at TP 1-4, PP with VPP and uneven stages, both layer specs. HF -> per-rank at layout A
-> layout B -> layout A gives the same rank files, and back to HF the same bytes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import ckpt_ir
from tests.fixtures import write_hf
from tests.properties.test_per_rank_round_trips import PAD, PER_RANK, contents, rank_files
from tests.strategies import DENSE_TAIL, dense_configs, dtypes, layouts


@pytest.mark.parametrize("arch", DENSE_TAIL)
@settings(max_examples=4)
@given(data=st.data(), fmt=st.sampled_from(PER_RANK), dtype=dtypes(),
       seed=st.integers(0, 1000), spec=st.sampled_from(["te", "local"]))
def test_reshard_and_back_is_bit_identical(arch, data, fmt, dtype, seed, spec):
    config = data.draw(dense_configs(max_layers=4, archs=(arch,)))
    a, b = data.draw(layouts(config)), data.draw(layouts(config))
    note(f"{arch} {fmt} {spec}: {a.describe()} -> {b.describe()} -> {a.describe()}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_hf(d / "hf", config, dtype=dtype, seed=seed)
        ckpt_ir.convert(d / "hf", d / "a", to=fmt, layout=a, mcore_spec=spec,
                        pad_vocab_to_multiple=PAD)
        ckpt_ir.convert(d / "a", d / "b", to=fmt, layout=b)
        ckpt_ir.convert(d / "b", d / "a2", to=fmt, layout=a)
        assert rank_files(d / "a2") == rank_files(d / "a")
        ckpt_ir.convert(d / "b", d / "back", to="hf")
        assert contents(d / "back", "hf") == contents(d / "hf", "hf")
