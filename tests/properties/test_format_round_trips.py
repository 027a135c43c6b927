"""Every format pair round-trips bit for bit over random dense configs and dtypes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt_ir
from tests.fixtures import load_dcp_tensors, load_hf_tensors, write_hf
from tests.strategies import bits_equal, dense_configs, dtypes


@settings(max_examples=30)
@given(config=dense_configs(), dtype=dtypes(), seed=st.integers(0, 1000),
       pad=st.sampled_from([None, 8, 64]), shard_bytes=st.sampled_from(["5GB", 2000]))
def test_hf_to_mcore_dist_to_hf_is_bit_identical(config, dtype, seed, pad, shard_bytes):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src = d / "hf"
        want = write_hf(src, config, dtype=dtype, seed=seed)
        ckpt_ir.convert(src, d / "dist", to="mcore-dist", pad_vocab_to_multiple=pad)
        ckpt_ir.convert(d / "dist", d / "back", to="hf", max_shard_size=shard_bytes)
        got = load_hf_tensors(d / "back")
        assert got.keys() == want.keys()
        for name, t in want.items():
            assert bits_equal(got[name], t), name


@settings(max_examples=20)
@given(config=dense_configs(), dtype=dtypes(), seed=st.integers(0, 1000),
       pad=st.sampled_from([None, 16]))
def test_mcore_dist_to_hf_to_mcore_dist_gives_identical_tensors(config, dtype, seed, pad):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_hf(d / "hf", config, dtype=dtype, seed=seed)
        ckpt_ir.convert(d / "hf", d / "dist1", to="mcore-dist", pad_vocab_to_multiple=pad)
        ckpt_ir.convert(d / "dist1", d / "hf2", to="hf")
        ckpt_ir.convert(d / "hf2", d / "dist2", to="mcore-dist", pad_vocab_to_multiple=pad)
        a, b = load_dcp_tensors(d / "dist1"), load_dcp_tensors(d / "dist2")
        assert a.keys() == b.keys()
        for k in a:
            assert bits_equal(a[k], b[k]), k


@settings(max_examples=15)
@given(config=dense_configs(max_layers=2), seed=st.integers(0, 100))
def test_open_reads_the_same_ir_from_every_format(config, seed):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        want = write_hf(d / "hf", config, dtype=torch.float32, seed=seed)
        ckpt_ir.convert(d / "hf", d / "dist", to="mcore-dist", pad_vocab_to_multiple=32)
        for path in (d / "hf", d / "dist"):
            with ckpt_ir.open(path) as ckpt:
                assert set(ckpt.tensors) == set(want)
                for name, t in want.items():
                    assert ckpt.tensors[name].shape == tuple(t.shape)
                    assert bits_equal(ckpt.read(name), t), (path.name, name)
