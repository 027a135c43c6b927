"""gpt-oss's fused experts (:class:`InterleaveExperts`): inverse(apply(parts)) == parts bit for
bit, the shape twin agrees, the slabs are apply's bytes in order, and the layout is the one
transformers' ``GptOssExperts`` computes with (column 2j gate, 2j + 1 up, input-major)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from ckpt_ir.transforms import TENSOR, InterleaveExperts
from tests.properties.test_transforms import _check_round_trip
from tests.strategies import dtypes, tensors


@given(st.data())
def test_interleave_experts_round_trips(data):
    experts = data.draw(st.integers(1, 4))
    names = data.draw(st.sampled_from([(TENSOR,), ("gate", "up")]))
    input_major = data.draw(st.booleans())
    rows = data.draw(st.integers(1, 6))
    shape = (rows,) if data.draw(st.booleans()) else (rows, data.draw(st.integers(1, 6)))
    dtype = data.draw(dtypes())
    op = InterleaveExperts(experts, names, input_major)
    _check_round_trip(op, {role: data.draw(tensors(shape, dtype)) for role in op.roles})


def test_gate_up_is_interleaved_by_column_and_input_major():
    # 2 experts, F = 2 outputs, H = 3 inputs: gate rows are 10x, up rows 100x.
    gate = [torch.arange(6.0).reshape(2, 3) + 10 * (e + 1) for e in range(2)]
    up = [torch.arange(6.0).reshape(2, 3) + 100 * (e + 1) for e in range(2)]
    parts = {f"gate[{e}]": gate[e] for e in range(2)} | {f"up[{e}]": up[e] for e in range(2)}
    native = InterleaveExperts(2, ("gate", "up")).apply(parts)
    assert native.shape == (2, 3, 4)  # [E, H, 2F]
    x = torch.tensor([1.0, -2.0, 0.5])
    for e in range(2):
        # transformers: gate_up = x @ gate_up_proj[e]; gate = [..., ::2], up = [..., 1::2]
        out = x @ native[e]
        assert torch.equal(out[0::2], gate[e] @ x)
        assert torch.equal(out[1::2], up[e] @ x)


def test_down_proj_is_each_experts_weight_transposed():
    down = {f"{TENSOR}[{e}]": torch.randn(5, 3) for e in range(2)}  # [H=5, F=3]
    native = InterleaveExperts(2).apply(down)
    assert native.shape == (2, 3, 5)  # [E, F, H]
    y = torch.randn(3)
    assert torch.allclose(y @ native[1], down[f"{TENSOR}[1]"] @ y)
