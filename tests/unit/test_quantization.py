"""ckpt_ir.quantization and the dequantizing view: the reference formulas, bit for bit.

Block FP8 against an independent per-block implementation of the reference formula
(tests/clients/fp8_models.py), with ragged shapes drawn by hypothesis; MXFP4 against
transformers 5.23's own dequantization (``integrations/mxfp4.py:_convert_moe_packed_tensors``,
the function its ``Mxfp4Config(dequantize=True)`` load path calls).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckpt_ir import dtypes
from ckpt_ir.converters.storage.quantized import DequantizedView
from ckpt_ir.converters.storage.safetensors_file import SafetensorsFile, read_header
from ckpt_ir.errors import FormatError
from ckpt_ir.ir import TensorSpec
from ckpt_ir.quantization import (
    Quantization,
    dequantize_fp8,
    dequantize_mxfp4,
    fp8_scale_grid,
    is_fp8_linear,
    parse_quantization,
    quantize_fp8,
)
from tests.clients.fp8_models import reference_dequant, reference_quant

FP8 = torch.float8_e4m3fn


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t.view(torch.int32)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-4, 0.02, 3.0]))
def test_fp8_dequantize_and_quantize_match_the_reference_on_ragged_blocks(rows, cols, seed,
                                                                         scale):
    gen = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(rows, cols, generator=gen)
    q_ref, s_ref = reference_quant(w)
    q, s = quantize_fp8(w)
    assert s.shape == fp8_scale_grid((rows, cols), (128, 128)) == tuple(s_ref.shape)
    assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(_bits(s), _bits(s_ref))
    got = dequantize_fp8(q, s)
    assert got.dtype == torch.float32
    assert torch.equal(_bits(got), _bits(reference_dequant(q, s)))
    # Re-quantizing the float32 dequantization gives the same bytes back (the round trip
    # FP8 -> fp32 -> FP8 is the identity for the releases' scales).
    q2, s2 = quantize_fp8(got)
    assert torch.equal(_bits(q2), _bits(q)) and torch.equal(_bits(s2), _bits(s))


_DEQUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _reference_in(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference float32 dequantization, rounded once to ``dtype``."""
    out = reference_dequant(q, s)
    return out if dtype == torch.float32 else out.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN payloads included."""
    wide = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(wide), b.view(wide))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       exponent=st.integers(-40, 12), nan_bytes=st.booleans(),
       dtype=st.sampled_from(_DEQUANT_DTYPES))
def test_fp8_dequantization_of_any_bytes_is_the_reference_in_any_dtype(
        rows, cols, seed, exponent, nan_bytes, dtype):
    """Every e4m3 byte (subnormals, -0, and NaN's 0x7f / 0xff when drawn), scales from 2**-40
    to 2**12 (past the 2**8 where the bit-shift widening hands over to torch's decode): the
    row-block dequantization in float32, bf16 and fp16 is the reference's float32 product
    rounded once, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.uint8)
    if not nan_bytes:
        raw[(raw & 0x7F) == 0x7F] = 0x7E
    q = raw.view(FP8)
    grid = fp8_scale_grid((rows, cols), (128, 128))
    s = torch.rand(grid, generator=gen) * 2.0 ** exponent
    assert _same(dequantize_fp8(q, s, dtype=dtype), _reference_in(q, s, dtype))


def test_fp8_dequantization_is_exact_with_flush_to_zero_on():
    """Shifted e4m3 subnormals are float32 subnormals: a caller's flush-to-zero would zero
    them, so the bit-shift widening steps aside and the result is still the reference's."""
    raw = torch.arange(256, dtype=torch.uint8).repeat(130, 1)  # every byte, two row blocks,
    raw[(raw & 0x7F) == 0x7F] = 0  # but NaN's, whose blocks take torch's decode anyway
    q, s = raw.view(FP8), torch.full((2, 2), 0.75)
    assert torch.set_flush_denormal(True)  # x86-64 (SSE3) and aarch64 both have the mode
    try:
        got = dequantize_fp8(q, s, dtype=torch.bfloat16)
    finally:
        torch.set_flush_denormal(False)
    assert _same(got, _reference_in(q, s, torch.bfloat16))
    assert _same(dequantize_fp8(q, s, dtype=torch.bfloat16), _reference_in(q, s, torch.bfloat16))


def test_fp8_576_rows_has_five_row_blocks_the_last_of_64():
    w = torch.randn(576, 200)
    w[512:] *= 100  # the last, 64-row block has its own scale
    q, s = quantize_fp8(w)
    assert s.shape == (5, 2)
    assert s[4, 0] > 50 * s[3, 0]
    assert torch.equal(dequantize_fp8(q, s), reference_dequant(q, s))


def test_ue8m0_scales_are_powers_of_two_and_uint8_scales_read_as_e8m0():
    w = torch.randn(130, 70)
    q, s = quantize_fp8(w, ue8m0=True)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    assert (q.float().abs().amax() <= 448).item()
    e8m0 = (torch.log2(s).round().to(torch.int32) + 127).to(torch.uint8)
    assert torch.equal(dequantize_fp8(q, e8m0), dequantize_fp8(q, s))


def test_a_scale_of_the_wrong_grid_is_refused():
    q, s = quantize_fp8(torch.randn(576, 64))
    with pytest.raises(FormatError, match=r"expected \[5, 1\]"):
        dequantize_fp8(q, s[:4])


def test_parse_quantization_refuses_what_it_cannot_read_exactly():
    assert parse_quantization({}) is None
    fp8 = parse_quantization({"quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
        "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
        "modules_to_not_convert": ["lm_head"]}})
    assert fp8 == Quantization("fp8", (128, 128), True, ("lm_head",), fp8.raw)
    for bad, what in ((
            {"quant_method": "awq"}, "quant_method 'awq'"),
            ({"quant_method": "fp8", "weight_block_size": None}, "per-tensor"),
            ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, "e5m2"),
            ({"quant_method": "fp8", "weight_block_size": [128, 128],
              "activation_scheme": "static"}, "static"),
            ({"quant_method": "fp8", "weight_block_size": [128, 0]}, "weight_block_size"),
            ({"quant_method": "fp8", "weight_block_size": [128, 128],
              "modules_to_not_convert": ["*" * 20]}, "more than 8 '\\*'")):
        with pytest.raises(FormatError, match=what):
            parse_quantization({"quantization_config": bad})


def test_which_weights_a_writer_quantizes():
    q = Quantization("fp8", not_converted=("model.layers.0.mlp", "model.layers.*.self_attn.q_a",
                                           "o_proj"))
    # transformers' rule: from the start to a module boundary ('*' any run), or a suffix.
    yes = ["model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
           "model.layers.1.self_attn.q_a_proj.weight", "model.layers.10.mlp.down_proj.weight",
           "model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.1.mlp.gate_proj.weight"]
    no = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
          "model.layers.1.self_attn.kv_a_layernorm.weight", "model.layers.4.eh_proj.weight",
          "model.layers.4.shared_head.head.weight", "model.layers.0.mlp.down_proj.weight",
          "model.layers.1.mlp.experts.gate_up_proj", "model.layers.2.self_attn.q_a.weight",
          "model.layers.1.self_attn.o_proj.weight"]
    assert all(is_fp8_linear(n, (256, 256), q) for n in yes)
    assert not any(is_fp8_linear(n, (256, 256), q) for n in no)
    assert not is_fp8_linear(yes[0], (256,), q)


def _view(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], quant=None):
    # Written with torch's dtypes; the IR's specs hold ckpt-ir's.
    return DequantizedView(quant, {n: TensorSpec(n, s, dtypes.from_torch(d))
                                   for n, (s, d) in specs.items()},
                           lambda n: pytest.fail(f"read {n}"))


@pytest.mark.parametrize(("specs", "message"), [
    ({"a.weight": ((576, 64), FP8), "a.weight_scale_inv": ((4, 1), torch.float32)},
     r"a.weight_scale_inv has shape \[4, 1\], but a.weight \[576, 64\].*needs \[5, 1\]"),
    ({"a.weight": ((576, 64), FP8)}, "FP8 tensor a.weight has no a.weight_scale_inv"),
    ({"a.weight": ((576, 64), torch.bfloat16), "a.weight_scale_inv": ((5, 1), torch.float32)},
     "not float8_e4m3fn"),
    ({"a.weight_scale_inv": ((5, 1), torch.float32)}, "has no weight a.weight"),
])
def test_fp8_pairing_is_checked_on_metadata(specs, message):
    with pytest.raises(FormatError, match=message):
        _view(specs)


def test_mxfp4_blocks_of_the_wrong_length_are_refused():
    mx = Quantization("mxfp4")
    with pytest.raises(FormatError, match=r"do not match scales"):
        _view({"e.gate_up_proj_blocks": ((2, 8, 3, 15), torch.uint8),
               "e.gate_up_proj_scales": ((2, 8, 3), torch.uint8)}, mx)
    with pytest.raises(FormatError, match=r"have no e\.down_proj_scales"):
        _view({"e.down_proj_blocks": ((2, 8, 3, 16), torch.uint8)}, mx)


def test_mxfp4_matches_transformers_bit_for_bit():
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=gen, dtype=torch.uint8)
    # Every exponent a real checkpoint uses and the extremes (subnormal and overflowing
    # products included).
    scales = torch.randint(100, 140, (3, 40, 4), generator=gen, dtype=torch.uint8)
    scales[0, 0] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)
    want = _convert_moe_packed_tensors(blocks.clone(), scales.clone())
    got = dequantize_mxfp4(blocks, scales)
    assert got.shape == want.shape == (3, 128, 40) and got.dtype == want.dtype
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_mxfp4_reader_view_over_a_synthetic_file(tmp_path):
    """gpt-oss's layout: the view presents ``X`` for ``X_blocks`` + ``X_scales``, transposed,
    bf16, and reads it as transformers dequantizes it; plain tensors pass through."""
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(5)
    p = "model.layers.0.mlp.experts."
    state = {p + "gate_up_proj_blocks": torch.randint(0, 256, (2, 12, 2, 16), generator=gen,
                                                      dtype=torch.uint8),
             p + "gate_up_proj_scales": torch.randint(118, 130, (2, 12, 2), generator=gen,
                                                      dtype=torch.uint8),
             p + "gate_up_proj_bias": torch.randn(2, 12).bfloat16()}
    save_file(state, tmp_path / "model.safetensors")
    f = SafetensorsFile(tmp_path / "model.safetensors")
    header = read_header(tmp_path / "model.safetensors")
    specs = {n: TensorSpec(n, tuple(e.shape), e.dtype) for n, e in header.entries.items()}
    view = DequantizedView(Quantization("mxfp4"), specs, f.get)
    assert set(view.specs) == {p + "gate_up_proj", p + "gate_up_proj_bias"}
    assert view.specs[p + "gate_up_proj"].shape == (2, 64, 12)
    want = _convert_moe_packed_tensors(state[p + "gate_up_proj_blocks"],
                                       state[p + "gate_up_proj_scales"])
    assert torch.equal(view.read(p + "gate_up_proj").view(torch.int16), want.view(torch.int16))
    assert torch.equal(view.read(p + "gate_up_proj_bias"), state[p + "gate_up_proj_bias"])
    f.close()
