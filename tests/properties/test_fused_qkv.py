"""InterleaveFusedQKV (Phi-3's ``qkv_proj`` <-> Megatron's ``linear_qkv``): bit-exact round trip,
equal to splitting by the head counts then InterleaveQKV, and a TP rank's QKV shard holds the
q, k and v rows of its own KV groups."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from ckpt_ir.errors import InternalError
from ckpt_ir.layout import Partition, shard
from ckpt_ir.transforms import TENSOR, InterleaveFusedQKV, InterleaveQKV
from tests.properties.test_transforms import _check_round_trip
from tests.strategies import bits_equal, dtypes, tensors


@given(st.data())
def test_interleave_fused_qkv_round_trips_and_is_split_then_interleave(data):
    groups, per_group = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    head_dim = data.draw(st.integers(1, 8))
    rest = data.draw(st.sampled_from([(), (3,), (7,)]))  # a bias or a weight
    rows = (groups * per_group + 2 * groups) * head_dim
    fused = data.draw(tensors((rows, *rest), data.draw(dtypes())))
    op = InterleaveFusedQKV(groups, per_group, head_dim)
    _check_round_trip(op, {TENSOR: fused})
    q, k, v = fused.split((groups * per_group * head_dim, groups * head_dim,
                           groups * head_dim))
    expected = InterleaveQKV(groups, per_group, head_dim).apply({"q": q, "k": k, "v": v})
    assert bits_equal(op.apply({TENSOR: fused}), expected)


@given(st.data())
def test_a_tp_rank_holds_its_groups_q_k_and_v(data):
    tp = data.draw(st.sampled_from([1, 2, 4]))
    groups = tp * data.draw(st.integers(1, 2))
    per_group, head_dim = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    nq, nkv = groups * per_group * head_dim, groups * head_dim
    fused = torch.arange(nq + 2 * nkv, dtype=torch.float32).unsqueeze(1)
    native = InterleaveFusedQKV(groups, per_group, head_dim).apply({TENSOR: fused})
    local = groups // tp
    for rank, piece in enumerate(shard(native, Partition.QKV, tp)):
        g0, g1 = rank * local, (rank + 1) * local
        q = fused[g0 * per_group * head_dim:g1 * per_group * head_dim]
        k = fused[nq + g0 * head_dim:nq + g1 * head_dim]
        v = fused[nq + nkv + g0 * head_dim:nq + nkv + g1 * head_dim]
        expected = InterleaveQKV(local, per_group, head_dim).apply({"q": q, "k": k, "v": v})
        assert bits_equal(piece, expected)


def test_the_layout_is_group_major():
    # 2 groups, 2 q heads per group, head_dim 1. HF rows: q0 q1 q2 q3 k0 k1 v0 v1.
    fused = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0], [20.0], [21.0]])
    native = InterleaveFusedQKV(2, 2, 1).apply({TENSOR: fused})
    assert native.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_rows_that_do_not_split_by_the_head_counts_are_refused():
    try:
        InterleaveFusedQKV(2, 2, 4).apply({TENSOR: torch.zeros(30, 2)})
    except InternalError as e:
        assert "expected 32" in str(e)
    else:
        raise AssertionError("a 30-row qkv_proj was split as if it had 32 rows")
