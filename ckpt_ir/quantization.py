"""Quantized HF weights: block FP8 (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8) and MXFP4 (gpt-oss).

Pure functions on tensors and on the ``quantization_config`` of an HF ``config.json``; no files,
no names of architectures. The storage side (which tensor pairs with which scale) is
``converters/storage/quantized.py``.

Block FP8 (``quant_method: fp8``, ``fmt: e4m3``, ``weight_block_size: [128, 128]``): a 2-D
weight ``[R, C]`` is ``float8_e4m3fn`` and its ``weight_scale_inv`` is float32
``[ceil(R/128), ceil(C/128)]``, the *dequantization multiplier* of each block (block amax / 448
when it was quantized). The reference dequantization (DeepSeek's ``weight_dequant``, torch's
``QuantizedHuggingFaceStorageReader``, Megatron-Bridge's ``dequantize_fp8_blockwise``)::

    W[i, j] = float32(W_fp8[i, j]) * S[i // 128, j // 128]      # fp32, cast once to the target

ragged last blocks included (DeepSeek's 576-row ``kv_a_proj_with_mqa`` has 5 row blocks, the
last one 64 rows). Quantization is its inverse as the releases do it: per block
``S = amax / 448`` (a power of two rounded up when ``scale_fmt`` is ``ue8m0``; 1 for an all-zero
block), ``W_fp8 = clamp(W / S, -448, 448)``.

MXFP4 (``quant_method: mxfp4``): ``X_blocks`` uint8 ``[..., R, G, 16]`` (two E2M1 values a byte,
low nibble first) and ``X_scales`` uint8 ``[..., R, G]`` (E8M0, bias 127) for 32 values each;
rows are output features, so the dequantized ``[..., R, 32 G]`` is transposed on its last two
axes into transformers' bf16 layout (``integrations/mxfp4.py:_convert_moe_packed_tensors``).

Facts: /work/shared/reference/architectures-wave2.md §4.3, §9.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckpt_ir import dtypes
from ckpt_ir.errors import FormatError

if TYPE_CHECKING:
    import torch

__all__ = ["DEQUANTIZED_FROM", "FP8_DTYPE", "FP8_MAX", "MXFP4_GROUP", "Quantization",
           "dequantize_fp8", "dequantize_mxfp4", "fp8_scale_grid", "is_fp8_linear", "mxfp4_shape",
           "parse_quantization", "quantize_fp8", "scale_to_float32", "target_quantization"]

FP8_DTYPE = dtypes.FLOAT8_E4M3FN
FP8_MAX = 448.0
"""The largest finite e4m3fn value: a block's amax maps onto it."""
DEQUANTIZED_FROM = "ckpt_ir_dequantized_from"
"""The config key a dequantized checkpoint keeps its source's ``quantization_config`` under, so
that ``--quantize`` can write the source's format back (a loader ignores it)."""
MXFP4_GROUP = 32
"""Values per MXFP4 scale (16 bytes of two E2M1 nibbles)."""
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Modules releases keep in high precision whatever their shape (reference §9.2, §9.4 slime):
# embeddings and heads (an MTP layer's copies too), MTP's eh_proj, routers and gates, norms,
# classification heads. Matched against the module path's components.
_HIGH_PRECISION = ("embed_tokens", "lm_head", "shared_head", "eh_proj", "gate", "router",
                   "shared_expert_gate", "score")


@dataclass(frozen=True, slots=True)
class Quantization:
    """A checkpoint's ``quantization_config``, as ckpt-ir reads and writes it.

    ``method`` is ``fp8`` (block FP8) or ``mxfp4``; for FP8, ``block`` is (rows, cols),
    ``ue8m0`` says the scales are powers of two (``scale_fmt: ue8m0``), and
    ``not_converted`` are module patterns (``modules_to_not_convert`` / ``ignored_layers``)
    kept in high precision.
    """

    method: str
    block: tuple[int, int] = (128, 128)
    ue8m0: bool = False
    not_converted: tuple[str, ...] = ()
    raw: Mapping[str, Any] | None = None

    def describe(self) -> str:
        if self.method == "mxfp4":
            return "MXFP4 (E2M1 values, E8M0 scales per 32)"
        scales = "power-of-two (ue8m0)" if self.ue8m0 else "float32"
        return f"block FP8 e4m3, {self.block[0]}x{self.block[1]} blocks, {scales} scales"

    def to_hf(self) -> dict[str, Any]:
        """The ``quantization_config`` a writer records (the source's own fields kept)."""
        out = dict(self.raw or {})
        out.update({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
                    out.get("activation_scheme", "dynamic"),
                    "weight_block_size": list(self.block)})
        if self.ue8m0:
            out["scale_fmt"] = "ue8m0"
        if self.not_converted:
            out["modules_to_not_convert"] = list(self.not_converted)
        return out


def parse_quantization(hf: Mapping[str, Any]) -> Quantization | None:
    """The quantization an HF config declares (None: not quantized); refuses what ckpt-ir
    cannot dequantize exactly, so a conversion never half-reads a checkpoint."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise FormatError("config.json: quantization_config must be an object")
    method = qc.get("quant_method")
    if method == "mxfp4":
        return Quantization("mxfp4", raw=dict(qc))
    if method != "fp8":
        raise FormatError(f"config.json: quant_method {method!r} is not supported (ckpt-ir "
                          "reads block FP8 'fp8' and 'mxfp4')")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise FormatError(f"config.json: FP8 fmt {fmt!r} is not supported (only e4m3)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list | tuple) and len(block) == 2
            and all(type(b) is int and 0 < b <= 1 << 16 for b in block)):
        raise FormatError(f"config.json: FP8 weight_block_size {block!r} is not supported "
                          "(two positive block sizes; per-tensor FP8 is not read)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise FormatError(f"config.json: FP8 activation_scheme "
                          f"{qc.get('activation_scheme')!r} is not supported (only dynamic)")
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "float", "ue8m0"):
        raise FormatError(f"config.json: FP8 scale_fmt {scale_fmt!r} is not supported")
    skip = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ()
    if not (isinstance(skip, list | tuple) and all(isinstance(s, str) for s in skip)):
        raise FormatError("config.json: modules_to_not_convert must be a list of names")
    # Each pattern is matched against every weight name: bounded, and a few wildcards at most
    # (a pattern of many '*' would backtrack for ever).
    if len(skip) > 4096 or any(len(s) > 512 or s.count("*") > 8 for s in skip):
        raise FormatError("config.json: modules_to_not_convert holds more than 4096 patterns, "
                          "one longer than 512 characters or with more than 8 '*'")
    return Quantization("fp8", (block[0], block[1]), scale_fmt == "ue8m0", tuple(skip),
                        dict(qc))


def target_quantization(hf: Mapping[str, Any]) -> Quantization:
    """The block FP8 format a writer re-quantizes to: the source's (its ``quantization_config``,
    or the one a dequantized copy kept under :data:`DEQUANTIZED_FROM`), else DeepSeek's
    128x128 float32 scales."""
    for key in ("quantization_config", DEQUANTIZED_FROM):
        if isinstance(hf.get(key), Mapping) and hf[key].get("quant_method") == "fp8":
            found = parse_quantization({"quantization_config": hf[key]})
            assert found is not None
            return found
    return Quantization("fp8")


_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def _module_matches(module: str, pattern: str) -> bool:
    """transformers' ``should_convert_module`` rule for ``modules_to_not_convert``: the pattern
    matches from the start of the module path up to a module boundary (``lm_head``,
    ``model.layers.*.self_attn``), or is a suffix of it (``mlp.gate``). The config is untrusted,
    so its only regex syntax honoured is ``*`` (what the releases use), never a full regex."""
    rx = re.escape(pattern).replace(r"\*", ".*")
    return re.match(rf"(?:{rx}){_BOUNDARY}", module) is not None or module.endswith(pattern)


def is_fp8_linear(name: str, shape: tuple[int, ...], quant: Quantization) -> bool:
    """Whether a writer quantizes ``name``: a 2-D linear ``.weight`` that is neither one the
    releases keep in high precision nor listed in ``modules_to_not_convert``."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    module = name[: -len(".weight")]
    parts = module.split(".")
    if any(p in _HIGH_PRECISION for p in parts) or "norm" in parts[-1]:
        return False
    return not any(_module_matches(module, p) for p in quant.not_converted)


def fp8_scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The ceil-divided block counts of a 2-D weight: its scale's shape."""
    rows, cols = shape
    return -(-rows // block[0]), -(-cols // block[1])


def scale_to_float32(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float32: uint8 / float8_e8m0fnu bytes are E8M0 exponents (``2**(b - 127)``);
    bf16 / fp16 / fp32 widen exactly."""
    import torch

    if scale.dtype == torch.uint8:
        return torch.ldexp(torch.ones(scale.shape, dtype=torch.float32),
                           scale.to(torch.int32) - 127)
    if scale.dtype.is_floating_point:
        return scale.to(torch.float32)
    raise FormatError(f"an FP8 scale of dtype {scale.dtype} is not supported")


# e4m3fn's bits moved into a bfloat16 (sign to bit 15, exponent and mantissa to bits 4-10) are
# the value times 2**-120 exactly, subnormals included (both formats put the binary point in
# the same place; the exponent biases differ by 120). Widening those bits is a shift where
# torch's float8 -> float32 conversion is an element-wise decode, ~3x slower on one thread
# (docs/scale.md). 2**120 goes into the scale instead: the product is the same real number, so
# its one rounding gives the same bits.
_E4M3_BIAS_GAP = 2.0 ** 120
_E4M3_MAGNITUDE = 448.0 / _E4M3_BIAS_GAP  # anything larger came from a NaN byte (0x7f / 0xff)
_SIGN_AND_MAGNITUDE = -0x7810  # 0x87f0 as int16: bit 15 and bits 4-10


def _fast_widening_is_exact() -> bool:
    """The shifted values of e4m3's subnormals are float32 subnormals: exact unless the caller
    turned on flush-to-zero (``torch.set_flush_denormal(True)``), which this detects."""
    import torch

    tiny = torch.tensor([2.0 ** -129], dtype=torch.float32)
    return bool((tiny * _E4M3_BIAS_GAP).item() == 2.0 ** -9)


def _shift_widened(signed: torch.Tensor) -> torch.Tensor | None:
    """e4m3 bytes (viewed as int8) as float32 values times 2**-120, by a shift and a mask;
    None when a NaN byte is among them (it would come out as a finite 480 * 2**-120)."""
    import torch

    bits = signed.to(torch.int16)
    bits.bitwise_left_shift_(4).bitwise_and_(_SIGN_AND_MAGNITUDE)
    wide = bits.view(torch.bfloat16).to(torch.float32)
    lo, hi = torch.aminmax(wide)
    return None if hi > _E4M3_MAGNITUDE or lo < -_E4M3_MAGNITUDE else wide


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor,
                   block: tuple[int, int] = (128, 128), dtype: torch.dtype | None = None,
                   ) -> torch.Tensor:
    """The weight in ``dtype`` (float32 by default): every element times its block's scale
    in float32 (ragged last blocks included), rounded once to ``dtype``.

    One row block at a time (``block[0]`` rows): nothing beyond the result is weight-sized,
    and the result is what widening the whole weight to float32, scaling it and casting it
    would give, bit for bit (tests/unit/test_quantization.py).
    """
    import torch

    if weight.dim() != 2:
        raise FormatError(f"a block-FP8 weight must be 2-D, not {list(weight.shape)}")
    grid = fp8_scale_grid(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != grid:
        raise FormatError(f"scale shape {list(scale_inv.shape)} does not match weight "
                          f"{list(weight.shape)} in {block[0]}x{block[1]} blocks (expected "
                          f"{list(grid)})")
    rows, cols = weight.shape
    out = torch.empty((rows, cols), dtype=dtype or torch.float32)
    scales = scale_to_float32(scale_inv)
    per_col = scales.repeat_interleave(block[1], dim=1)[:, :cols]
    # The fast widening needs the scale times 2**120 to stay finite (scales below 2**8: a
    # block's amax below 114688) and subnormals kept.
    fast = bool(scales.numel()) and bool(scales.abs().amax() < 2.0 ** 8) \
        and _fast_widening_is_exact()
    shifted = per_col * _E4M3_BIAS_GAP if fast else None
    signed = weight.view(torch.int8)
    for i in range(grid[0]):
        r0, r1 = i * block[0], min(rows, (i + 1) * block[0])
        wide = _shift_widened(signed[r0:r1]) if shifted is not None else None
        if wide is None:  # torch's decode: no fast path here, or a NaN byte in this block
            wide, scale = weight[r0:r1].to(torch.float32), per_col[i]
        else:
            scale = shifted[i]
        # The product is computed in float32 and rounded once as it is stored into ``out``.
        torch.mul(wide, scale, out=out[r0:r1])
    return out


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128), *,
                 ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_fp8, weight_scale_inv)`` of a 2-D weight, per block: ``S = amax / 448`` over the
    block's real elements (1 when they are all zero; rounded up to a power of two with
    ``ue8m0``), ``W_fp8 = clamp(W / S, -448, 448)`` computed in float32."""
    import torch

    if weight.dim() != 2:
        raise FormatError(f"only 2-D weights are block-quantized, not {list(weight.shape)}")
    rows, cols = weight.shape
    grid = fp8_scale_grid((rows, cols), block)
    br, bc = block
    scale = torch.empty(grid, dtype=torch.float32)
    q = torch.empty((rows, cols), dtype=FP8_DTYPE.torch)
    for i in range(grid[0]):
        r0, r1 = i * br, min(rows, (i + 1) * br)
        w = weight[r0:r1].to(torch.float32)
        pad = grid[1] * bc - cols
        padded = torch.nn.functional.pad(w.abs(), (0, pad)) if pad else w.abs()
        amax = padded.reshape(r1 - r0, grid[1], bc).amax(dim=(0, 2))
        s = amax / FP8_MAX
        if ue8m0:
            s = torch.exp2(torch.ceil(torch.log2(s)))
        s = torch.where(amax > 0, s, torch.ones_like(s))
        scale[i] = s
        per_col = s.repeat_interleave(bc)[:cols]
        q[r0:r1] = torch.clamp(w / per_col, -FP8_MAX, FP8_MAX).to(FP8_DTYPE.torch)
    return q, scale


def mxfp4_shape(blocks: tuple[int, ...], scales: tuple[int, ...]) -> tuple[int, ...]:
    """The dequantized, transposed shape of an MXFP4 pair, or FormatError when the blocks are
    not 16 bytes per scale."""
    if len(blocks) < 3 or blocks[-1] != MXFP4_GROUP // 2 or tuple(blocks[:-1]) != tuple(scales):
        raise FormatError(f"MXFP4 blocks {list(blocks)} do not match scales {list(scales)} "
                          f"(expected blocks [*scales, {MXFP4_GROUP // 2}])")
    *prefix, rows, groups = scales
    return (*prefix, groups * MXFP4_GROUP, rows)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: dtypes.DType = dtypes.BFLOAT16) -> torch.Tensor:
    """``[..., R, G, 16]`` E2M1 bytes and ``[..., R, G]`` E8M0 scales as ``[..., 32 G, R]``
    (transposed on the last two axes, transformers' bf16 layout), in ``dtype``.

    Each value is ``LUT[nibble] * 2**(scale - 127)``, low nibble first, computed exactly in
    float32 and rounded once; transformers' own dequantization gives the same bits
    (tests/unit/test_quantization.py compares them).
    """
    import torch

    shape = mxfp4_shape(tuple(blocks.shape), tuple(scales.shape))
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise FormatError(f"MXFP4 blocks and scales must be uint8, not {blocks.dtype} / "
                          f"{scales.dtype}")
    lut = torch.tensor(_E2M1, dtype=torch.float32)
    *_, rows, groups, nbytes = blocks.shape
    exp = scales.to(torch.int32) - 127
    # Row by row of the leading axes (one expert at a time): the float32 temporaries stay a
    # fraction of the result.
    flat_b = blocks.reshape(-1, rows, groups, nbytes)
    flat_e = exp.reshape(-1, rows, groups, 1)
    out = torch.empty((flat_b.shape[0], groups * MXFP4_GROUP, rows), dtype=dtype.torch)
    for k in range(flat_b.shape[0]):
        b = flat_b[k].to(torch.int64)
        vals = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1)  # [R, G, 16, 2]
        vals = torch.ldexp(vals, flat_e[k].unsqueeze(-1))
        out[k] = vals.reshape(rows, groups * MXFP4_GROUP).to(dtype.torch).T
    return out.reshape(shape)
