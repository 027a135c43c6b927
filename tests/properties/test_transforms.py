"""Every transform: inverse(apply(parts)) == parts bit for bit, the shape twin agrees, and the
slabs a streaming writer puts on disk are apply's bytes in order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ckpt_ir.layout import Partition, shard, shard_shape, unshard, unshard_shape
from ckpt_ir.transforms import (
    TENSOR,
    ConcatGateUp,
    ConcatQKV,
    Identity,
    InterleaveQKV,
    PadRows,
    RopeInterleave,
    StackExperts,
    join_rows,
    rows_shape,
)
from tests.strategies import bits_equal, dtypes, tensors


def _check_slabs(op, parts, native):
    slabs = list(op.slabs(parts))
    assert all(s.dtype == native.dtype for s in slabs)
    flat = torch.cat([s.reshape(-1) for s in slabs]) if slabs else native.new_empty(0)
    assert bits_equal(flat, native.reshape(-1))
    if not op.copies_in_slabs():
        # Views of the parts (only PadRows' zero rows are new): nothing the size of the
        # native tensor is built.
        storages = {t.untyped_storage().data_ptr() for t in parts.values()}
        new = [s for s in slabs if s.numel() and s.untyped_storage().data_ptr() not in storages]
        assert sum(s.numel() for s in new) <= native.numel() - sum(
            t.numel() for t in parts.values())


def _check_round_trip(op, parts):
    native = op.apply(parts)
    _check_slabs(op, parts, native)
    assert tuple(native.shape) == op.shapes({r: tuple(t.shape) for r, t in parts.items()})
    back = op.inverse(native)
    assert set(back) == set(parts)
    for role, t in parts.items():
        assert bits_equal(back[role], t), role
    # The executor's path: parts as row blocks, joined or streamed, are the same bytes.
    rows = op.inverse_rows(native)
    assert set(rows) == set(parts)
    for role, t in parts.items():
        assert rows_shape(rows[role]) == tuple(t.shape), role
        assert bits_equal(join_rows(rows[role]), t), role
    flat = [s.reshape(-1) for s in op.row_slabs(rows)]
    assert bits_equal(torch.cat(flat) if flat else native.new_empty(0), native.reshape(-1))


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


@given(st.data())
def test_stack_experts_round_trips(data):
    experts = data.draw(st.integers(1, 4))
    names = data.draw(st.sampled_from([(TENSOR,), ("gate", "up")]))
    shape = data.draw(st.tuples(st.integers(1, 6), st.integers(1, 6)))
    dtype = data.draw(dtypes())
    op = StackExperts(experts, names)
    _check_round_trip(op, {role: data.draw(tensors(shape, dtype)) for role in op.roles})


def test_interleave_qkv_layout_is_group_major():
    # 2 groups, 2 q heads per group, head_dim 1: rows q0 q1 k0 v0 q2 q3 k1 v1
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    fused = InterleaveQKV(2, 2, 1).apply({"q": q, "k": k, "v": v})
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_interleave_qkv_parts_stream_as_views_of_the_fused_tensor():
    # mcore-dist -> hf: q, k and v are strided in the fused tensor; as row blocks they are
    # views of it (each a range of the source file), and an Identity target streams them
    # without joining.
    fused = torch.arange(3 * (4 + 2) * 2 * 5, dtype=torch.float32).reshape(3 * 6 * 2, 5)
    rows = InterleaveQKV(3, 4, 2).inverse_rows(fused)
    for role, blocks in rows.items():
        assert len(blocks) == 3, role
        assert all(b.is_contiguous() and b.data_ptr() >= fused.data_ptr()
                   and b.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
                   for b in blocks), role
        streamed = list(Identity().row_slabs({TENSOR: blocks}))
        assert [s.data_ptr() for s in streamed] == [b.data_ptr() for b in blocks]
    assert rows["q"][1].data_ptr() == fused[12:20].data_ptr()


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
def test_rope_interleave_round_trips_and_matches_torchtitans_permutation(data):
    heads = data.draw(st.integers(1, 4))
    head_dim = 2 * data.draw(st.integers(1, 6))
    cols = data.draw(st.integers(1, 5))
    t = data.draw(tensors((heads * head_dim, cols)))
    op = RopeInterleave(heads, head_dim)
    _check_round_trip(op, {TENSOR: t})
    # torchtitan's Llama3StateDictAdapter._reverse_permute (HF -> torchtitan), written out.
    rows = heads * head_dim
    want = t.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
    assert bits_equal(op.apply({TENSOR: t}), want)


@given(st.data())
@pytest.mark.parametrize("partition", list(Partition))
def test_shard_unshard_round_trips(partition, data):
    tp = data.draw(st.sampled_from([1, 2, 4]))
    rows = 2 * tp * data.draw(st.integers(1, 3))
    cols = tp * data.draw(st.integers(1, 3))
    blocks = None
    if partition is Partition.BLOCKS:
        # Unequal blocks, each a multiple of tp rows (verl era-A [q; k; v]).
        blocks = tuple(tp * data.draw(st.integers(1, 3)) for _ in range(3))
        rows = sum(blocks)
    t = data.draw(tensors((rows, cols)))
    pieces = shard(t, partition, tp, blocks=blocks)
    assert len(pieces) == tp
    assert all(tuple(p.shape) == shard_shape(t.shape, partition, tp) for p in pieces)
    assert unshard_shape(pieces[0].shape, partition, tp) == tuple(t.shape)
    assert bits_equal(unshard(pieces, partition, blocks=blocks), t)


def test_swiglu_shard_holds_gate_and_up_halves():
    gate = torch.arange(4.0).reshape(4, 1)
    up = 10 + torch.arange(4.0).reshape(4, 1)
    pieces = shard(ConcatGateUp().apply({"gate": gate, "up": up}), Partition.SWIGLU, 2)
    assert pieces[0].flatten().tolist() == [0, 1, 10, 11]
    assert pieces[1].flatten().tolist() == [2, 3, 12, 13]


@given(st.data())
def test_concat_qkv_round_trips(data):
    q_rows, kv_rows = data.draw(st.integers(1, 24)), data.draw(st.integers(1, 12))
    dtype = data.draw(dtypes())
    rest = data.draw(st.sampled_from([(), (5,)]))
    parts = {"q": data.draw(tensors((q_rows, *rest), dtype)),
             "k": data.draw(tensors((kv_rows, *rest), dtype)),
             "v": data.draw(tensors((kv_rows, *rest), dtype))}
    _check_round_trip(ConcatQKV(q_rows, kv_rows), parts)


def test_blocks_shard_holds_each_blocks_slice():
    # verl era A: [q; k; v] with 4 q rows and 2 k/v rows; rank t holds [q_t; k_t; v_t].
    q, k, v = torch.arange(4.0), 10 + torch.arange(2.0), 20 + torch.arange(2.0)
    fused = ConcatQKV(4, 2).apply({"q": q, "k": k, "v": v})
    pieces = shard(fused, Partition.BLOCKS, 2, blocks=(4, 2, 2))
    assert pieces[0].tolist() == [0, 1, 10, 20]
    assert pieces[1].tolist() == [2, 3, 11, 21]


# --- LoRA adapter transforms (issue #4) ---------------------------------------------------------

from ckpt_ir.layout import Partition as _P  # noqa: E402
from ckpt_ir.transforms import MergeLora, RankColumns, StackRanks, lora_roles  # noqa: E402
from tests.strategies import small_ints  # noqa: E402


@st.composite
def _rank_blocks(draw, roles):
    """Blocks of a Megatron LoRA A: every role alone (rank-stacked) or all in one shared block,
    plus zero padding up to the total."""
    if draw(st.booleans()):
        rank = draw(st.integers(1, 5))
        blocks = ((tuple(roles), rank),)
    else:
        blocks = tuple(((r,), draw(st.integers(1, 5))) for r in roles)
    total = sum(rows for _, rows in blocks) + draw(st.integers(0, 3))
    return blocks, total


@given(st.data())
def test_stack_ranks_round_trips(data):
    roles = data.draw(st.sampled_from([("q", "k", "v"), ("gate", "up"), ("q", "v"), (TENSOR,)]))
    blocks, total = data.draw(_rank_blocks(roles))
    cols, dtype = data.draw(st.integers(1, 9)), data.draw(dtypes())
    parts = {}
    for block_roles, rows in blocks:
        t = data.draw(tensors((rows, cols), dtype))
        parts.update((r, t) for r in block_roles)  # a shared block: the same A for each role
    op = StackRanks(blocks, total)
    native = op.apply(parts)
    assert not native[sum(rows for _, rows in blocks):].any()  # the padding is zeros
    _check_round_trip(op, parts)


def _inner_and_rows(data):
    kind = data.draw(st.sampled_from(["identity", "gate_up", "qkv"]))
    if kind == "identity":
        return Identity(), {TENSOR: data.draw(st.integers(1, 12))}
    if kind == "gate_up":
        f = data.draw(st.integers(1, 10))
        return ConcatGateUp(), {"gate": f, "up": f}
    g, n, d = (data.draw(st.integers(1, 3)) for _ in range(3))
    return InterleaveQKV(g, n, d), {"q": g * n * d, "k": g * d, "v": g * d}


def _rank_columns(data, inner, rows):
    present = data.draw(st.lists(st.sampled_from(sorted(rows)), min_size=1, unique=True))
    blocks, total = data.draw(_rank_blocks(present))
    columns, start = [], 0
    for block_roles, width in blocks:
        columns.extend((r, start, width) for r in block_roles)
        start += width
    fill = tuple((r, n) for r, n in rows.items() if r not in present)
    return tuple(columns), total, fill


@given(st.data())
def test_rank_columns_round_trips(data):
    inner, rows = _inner_and_rows(data)
    columns, total, fill = _rank_columns(data, inner, rows)
    dtype = data.draw(dtypes())
    parts = {r: data.draw(tensors((rows[r], w), dtype)) for r, _, w in columns}
    op = RankColumns(inner, columns, total, fill)
    _check_round_trip(op, parts)
    wide = inner.inverse(op.apply(parts))
    for role, n in fill:  # modules without an adapter have zero rows in the fused B
        assert not wide[role].any() and wide[role].shape == (n, total)


@given(st.data())
def test_rank_columns_with_power_of_two_factors_round_trips(data):
    inner, rows = _inner_and_rows(data)
    columns, total, fill = _rank_columns(data, inner, rows)
    dtype = data.draw(dtypes())
    factors = tuple((r, data.draw(st.sampled_from([0.25, 0.5, 2.0, 4.0]))) for r, _, _ in columns)
    # Finite values well inside the range: a power-of-two factor is then exact both ways.
    parts = {r: data.draw(small_ints((rows[r], w), dtype)) / 8 for r, _, w in columns}
    _check_round_trip(RankColumns(inner, columns, total, fill, factors), parts)


@given(st.data())
def test_stacked_lora_reproduces_every_module_update(data):
    """B_fused @ A_fused, de-interleaved, is exactly each module's own B_m @ A_m."""
    g, n, d = (data.draw(st.integers(1, 3)) for _ in range(3))
    hidden = data.draw(st.integers(1, 8))
    rows = {"q": g * n * d, "k": g * d, "v": g * d}
    blocks, total = data.draw(_rank_blocks(("q", "k", "v")))
    a_op = StackRanks(blocks, total)
    columns, start = [], 0
    for block_roles, width in blocks:
        columns.extend((r, start, width) for r in block_roles)
        start += width
    width = {r: w for r, _, w in columns}
    a_parts = {}
    for block_roles, w in blocks:
        t = data.draw(small_ints((w, hidden)))
        a_parts.update((r, t) for r in block_roles)
    b_parts = {r: data.draw(small_ints((rows[r], width[r]))) for r in rows}
    inner = InterleaveQKV(g, n, d)
    fused = RankColumns(inner, tuple(columns), total).apply(b_parts) @ a_op.apply(a_parts)
    expected = inner.apply({r: b_parts[r] @ a_parts[r] for r in rows})
    assert torch.equal(fused, expected)


@given(st.data(), st.sampled_from([1, 2, 4]))
def test_merge_in_megatron_layout_per_tp_shard_equals_hf_merge(data, tp):
    """W + s·B@A merged per HF module then fused equals the fused weight with the fused LoRA
    delta applied per TP shard, Megatron-style (A gathered, B and W split like the base)."""
    g = tp * data.draw(st.integers(1, 2))
    n, d, hidden = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), 4
    rows = {"q": g * n * d, "k": g * d, "v": g * d}
    r = data.draw(st.integers(1, 3))
    a = data.draw(small_ints((r, hidden)))
    w = {x: data.draw(small_ints((rows[x], hidden))) for x in rows}
    b = {x: data.draw(small_ints((rows[x], r))) for x in rows}
    scaling = data.draw(st.sampled_from([0.5, 2.0]))
    inner = InterleaveQKV(g, n, d)
    merge = MergeLora(inner, tuple((x, scaling) for x in rows))
    parts = {**w, **{k: v for x in rows for k, v in zip(lora_roles(x), (a, b[x]), strict=True)}}
    hf_then_fused = merge.apply(parts)
    assert tuple(hf_then_fused.shape) == merge.shapes({k: tuple(v.shape) for k, v in parts.items()})
    w_f = inner.apply(w)
    b_f = RankColumns(inner, tuple((x, 0, r) for x in rows), r).apply(b)
    a_f = StackRanks(((tuple(rows), r),), r).apply({x: a for x in rows})
    shards = [wt + (bt @ a_f) * scaling
              for wt, bt in zip(shard(w_f, _P.QKV, tp), shard(b_f, _P.QKV, tp), strict=True)]
    assert torch.equal(unshard(shards, _P.QKV), hf_then_fused)


def test_merge_lora_is_one_way():
    from ckpt_ir.errors import InternalError

    op = MergeLora(Identity(), ((TENSOR, 1.0),))
    with pytest.raises(InternalError, match="cannot be split back"):
        op.inverse(torch.zeros(2, 2))


# -- qwen3_next (Gated DeltaNet, gated attention, zero-centred out_norm) ---------------------

@given(st.data())
def test_group_gdn_in_proj_round_trips_and_shards_by_key_head(data):
    from ckpt_ir.transforms import GroupGDNInProj

    nk, dk = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    r, dv = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    rest = data.draw(st.tuples(st.integers(1, 5)))
    dtype = data.draw(dtypes())
    op = GroupGDNInProj(nk, dk, r, dv)
    parts = {"qkvz": data.draw(tensors((nk * (2 * dk + 2 * r * dv), *rest), dtype)),
             "ba": data.draw(tensors((2 * nk * r, *rest), dtype))}
    _check_round_trip(op, parts)
    # A TP rank's BLOCKS shard is the regrouping of its own key heads' HF rows: the
    # per-rank layout needs no other rule.
    tp = data.draw(st.sampled_from([t for t in (1, 2, 4) if nk % t == 0]))
    native = op.apply(parts)
    blocks = op.tp_blocks({r_: tuple(t.shape) for r_, t in parts.items()})
    local = GroupGDNInProj(nk // tp, dk, r, dv)
    qkvz_t = parts["qkvz"].tensor_split(tp, dim=0)
    ba_t = parts["ba"].tensor_split(tp, dim=0)
    for t, piece in enumerate(shard(native, Partition.BLOCKS, tp, blocks=blocks)):
        assert bits_equal(piece, local.apply({"qkvz": qkvz_t[t], "ba": ba_t[t]}))


@given(st.data())
def test_interleave_gated_qkv_round_trips(data):
    from ckpt_ir.transforms import InterleaveGatedQKV

    groups, per_group, head_dim = (data.draw(st.integers(1, 3)) for _ in range(3))
    rest = data.draw(st.sampled_from([(), (3,)]))
    dtype = data.draw(dtypes())
    parts = {
        "q": data.draw(tensors((2 * groups * per_group * head_dim, *rest), dtype)),
        "k": data.draw(tensors((groups * head_dim, *rest), dtype)),
        "v": data.draw(tensors((groups * head_dim, *rest), dtype)),
    }
    _check_round_trip(InterleaveGatedQKV(groups, per_group, head_dim), parts)


def test_interleave_gated_qkv_layout_puts_the_gates_after_the_group_queries():
    from ckpt_ir.transforms import InterleaveGatedQKV

    # 1 group, 2 heads, head_dim 1: HF q_proj rows q0 g0 q1 g1 -> Megatron q0 q1 g0 g1 k v.
    q = torch.tensor([[0.0], [100.0], [1.0], [101.0]])
    native = InterleaveGatedQKV(1, 2, 1).apply({"q": q, "k": torch.tensor([[10.0]]),
                                                "v": torch.tensor([[20.0]])})
    assert native.reshape(-1).tolist() == [0.0, 1.0, 100.0, 101.0, 10.0, 20.0]


@given(st.data())
def test_row_blocks_is_the_identity_with_tp_blocks(data):
    from ckpt_ir.transforms import RowBlocks

    blocks = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    op = RowBlocks(tuple(blocks))
    t = data.draw(tensors((sum(blocks), 1, 2)))
    _check_round_trip(op, {TENSOR: t})
    assert op.tp_blocks({TENSOR: tuple(t.shape)}) == tuple(blocks)


@given(st.data())
def test_zero_centre_round_trips_where_w_minus_one_is_exact(data):
    from ckpt_ir.transforms import ZeroCentre

    dtype = data.draw(dtypes())
    n = data.draw(st.integers(1, 16))
    seed = data.draw(st.integers(0, 2**31 - 1))
    # Sterbenz: w - 1 is exact for 0.5 <= w <= 2, in every float dtype.
    w = (torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
         * 1.5 + 0.5).to(dtype)
    _check_round_trip(ZeroCentre(), {TENSOR: w})
    assert torch.equal(ZeroCentre().apply({TENSOR: w}).double(), w.double() - 1)


def test_zero_centre_refuses_to_round_a_weight():
    from ckpt_ir.errors import FormatError
    from ckpt_ir.transforms import ZeroCentre

    # bf16 0.302734375 = 155 * 2^-9: w - 1 = -0.697265625 needs 2^-9, bf16 has 2^-8 there.
    w = torch.tensor([1.0, 0.302734375], dtype=torch.bfloat16)
    with pytest.raises(FormatError, match=r"1 norm weight\(s\) .* --dtype fp32"):
        ZeroCentre().apply({TENSOR: w})
    assert ZeroCentre().apply({TENSOR: w.float()}).tolist() == pytest.approx([0.0, -0.697265625])
