"""Every transform: inverse(apply(parts)) == parts bit for bit, and the shape twin agrees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ckpt_ir.layout import Partition, shard, unshard
from ckpt_ir.transforms import TENSOR, ConcatGateUp, Identity, InterleaveQKV, PadRows
from tests.strategies import bits_equal, dtypes, tensors


def _check_round_trip(op, parts):
    native = op.apply(parts)
    assert tuple(native.shape) == op.shapes({r: tuple(t.shape) for r, t in parts.items()})
    back = op.inverse(native)
    assert set(back) == set(parts)
    for role, t in parts.items():
        assert bits_equal(back[role], t), role


@given(st.data())
def test_identity_round_trips(data):
    shape = data.draw(st.tuples(st.integers(0, 9), st.integers(1, 9)))
    _check_round_trip(Identity(), {TENSOR: data.draw(tensors(shape))})


@given(st.data())
def test_concat_gate_up_round_trips(data):
    f, h = data.draw(st.integers(1, 24)), data.draw(st.integers(1, 24))
    dtype = data.draw(dtypes())
    parts = {r: data.draw(tensors((f, h), dtype)) for r in ("gate", "up")}
    _check_round_trip(ConcatGateUp(), parts)


@given(st.data())
def test_interleave_qkv_round_trips(data):
    groups = data.draw(st.integers(1, 4))
    per_group = data.draw(st.integers(1, 4))
    head_dim = data.draw(st.integers(1, 8))
    dtype = data.draw(dtypes())
    is_bias = data.draw(st.booleans())
    rest = () if is_bias else (data.draw(st.integers(1, 12)),)
    parts = {
        "q": data.draw(tensors((groups * per_group * head_dim, *rest), dtype)),
        "k": data.draw(tensors((groups * head_dim, *rest), dtype)),
        "v": data.draw(tensors((groups * head_dim, *rest), dtype)),
    }
    _check_round_trip(InterleaveQKV(groups, per_group, head_dim), parts)


def test_interleave_qkv_layout_is_group_major():
    # 2 groups, 2 q heads per group, head_dim 1: rows q0 q1 k0 v0 q2 q3 k1 v1
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    fused = InterleaveQKV(2, 2, 1).apply({"q": q, "k": k, "v": v})
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


@given(st.data())
def test_pad_rows_round_trips(data):
    rows = data.draw(st.integers(1, 30))
    padded = rows + data.draw(st.integers(0, 17))
    t = data.draw(tensors((rows, data.draw(st.integers(1, 6)))))
    op = PadRows(rows, padded)
    native = op.apply({TENSOR: t})
    assert native.shape[0] == padded
    assert not native[rows:].any()
    _check_round_trip(op, {TENSOR: t})


@given(st.data())
@pytest.mark.parametrize("partition", list(Partition))
def test_shard_unshard_round_trips(partition, data):
    tp = data.draw(st.sampled_from([1, 2, 4]))
    rows = 2 * tp * data.draw(st.integers(1, 3))
    cols = tp * data.draw(st.integers(1, 3))
    t = data.draw(tensors((rows, cols)))
    pieces = shard(t, partition, tp)
    assert len(pieces) == tp
    assert bits_equal(unshard(pieces, partition), t)


def test_swiglu_shard_holds_gate_and_up_halves():
    gate = torch.arange(4.0).reshape(4, 1)
    up = 10 + torch.arange(4.0).reshape(4, 1)
    pieces = shard(ConcatGateUp().apply({"gate": gate, "up": up}), Partition.SWIGLU, 2)
    assert pieces[0].flatten().tolist() == [0, 1, 10, 11]
    assert pieces[1].flatten().tolist() == [2, 3, 12, 13]
