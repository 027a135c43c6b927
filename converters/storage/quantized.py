"""Quantized safetensors tensors presented dequantized: which tensor pairs with which scale.

A reader that finds a ``quantization_config`` (or FP8 tensors with ``weight_scale_inv``
siblings, which some exports carry without one) wraps its tensor list in
:class:`DequantizedView`: ``X.weight`` (``float8_e4m3fn``) + ``X.weight_scale_inv`` become one
``X.weight`` and gpt-oss's ``X_blocks`` + ``X_scales`` one ``X``, each reported in the dtype it
becomes (bfloat16) and read as float32 (block FP8, exact before the executor's one cast to the
destination dtype) or bfloat16 (MXFP4, transformers' own dequantization). The pairing is
checked on metadata, when the reader opens, so a missing or misshapen scale is refused before
anything is written. A conversion that knows its destination dtype asks for block FP8 in it
(:meth:`DequantizedView.dequantize_to`): the same single rounding, without a float32 copy of the
weight. Knows no models: only the names the formats use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckpt_ir import dtypes
from ckpt_ir.dtypes import DType
from ckpt_ir.errors import FormatError
from ckpt_ir.ir import TensorSpec
from ckpt_ir.quantization import (
    FP8_DTYPE,
    Quantization,
    dequantize_fp8,
    dequantize_mxfp4,
    fp8_scale_grid,
    mxfp4_shape,
)

if TYPE_CHECKING:
    import torch

__all__ = ["FP8_SCALE_SUFFIX", "DequantizedView"]

FP8_SCALE_SUFFIX = "_scale_inv"
"""``X.weight`` is scaled by ``X.weight_scale_inv``."""
_BLOCKS, _SCALES = "_blocks", "_scales"
_SCALE_DTYPES = (dtypes.FLOAT32, dtypes.BFLOAT16, dtypes.FLOAT16, dtypes.UINT8)
# What a quantized weight becomes when no --dtype is asked (the releases' compute dtype).
PRESENTED_DTYPE = dtypes.BFLOAT16


@dataclass(frozen=True, slots=True)
class _Pair:
    data: str
    scale: str
    kind: str  # "fp8" or "mxfp4"


class DequantizedView:
    """The tensors of a quantized checkpoint as the model's (see the module docstring).

    ``specs``: the raw tensor list; ``read_raw``: reads a raw tensor by name.
    """

    def __init__(self, quant: Quantization | None, specs: Mapping[str, TensorSpec],
                 read_raw: Callable[[str], torch.Tensor]) -> None:
        self._read_raw = read_raw
        self._fp8_dtype: DType = dtypes.FLOAT32
        self._pairs: dict[str, _Pair] = {}
        out: dict[str, TensorSpec] = {}
        fp8 = [n for n, s in specs.items() if s.dtype == FP8_DTYPE]
        scales = [n for n in specs if n.endswith(FP8_SCALE_SUFFIX)]
        if quant is None and (fp8 or scales):
            # The config says nothing, the tensors say block FP8 (reference §9.5 rule 1).
            quant = Quantization("fp8")
        self.quant = quant
        if quant is None:
            self.specs: Mapping[str, TensorSpec] = specs
            return
        if quant.method == "fp8":
            self._pair_fp8(quant, specs, fp8, scales, out)
        else:
            self._pair_mxfp4(specs, out)
        self.specs = out

    def _pair_fp8(self, quant: Quantization, specs: Mapping[str, TensorSpec], fp8: list[str],
                  scales: list[str], out: dict[str, TensorSpec]) -> None:
        for name in scales:
            weight = name[: -len(FP8_SCALE_SUFFIX)]
            if weight not in specs:
                raise FormatError(f"FP8 scale {name} has no weight {weight}", tensor=name)
            if specs[weight].dtype != FP8_DTYPE:
                raise FormatError(f"{name} scales {weight}, which is {specs[weight].dtype}, "
                                  "not float8_e4m3fn", tensor=name)
        for name in fp8:
            scale = name + FP8_SCALE_SUFFIX
            spec = specs[name]
            if scale not in specs:
                raise FormatError(f"FP8 tensor {name} has no {scale}", tensor=name)
            if len(spec.shape) != 2:
                raise FormatError(f"FP8 tensor {name} is {list(spec.shape)}, not 2-D",
                                  tensor=name)
            grid = fp8_scale_grid(spec.shape, quant.block)
            if tuple(specs[scale].shape) != grid:
                raise FormatError(
                    f"{scale} has shape {list(specs[scale].shape)}, but {name} "
                    f"{list(spec.shape)} in {quant.block[0]}x{quant.block[1]} blocks needs "
                    f"{list(grid)}", tensor=scale)
            if specs[scale].dtype not in _SCALE_DTYPES:
                raise FormatError(f"{scale} is {specs[scale].dtype}; FP8 scales are float32, "
                                  "bfloat16 or E8M0 bytes", tensor=scale)
            self._pairs[name] = _Pair(name, scale, "fp8")
        paired = {p.scale for p in self._pairs.values()}
        for name, spec in specs.items():
            if name in paired:
                continue
            if name in self._pairs:
                spec = TensorSpec(name, spec.shape, PRESENTED_DTYPE)
            elif name.endswith(("activation_scale", "input_scale")):
                raise FormatError(f"{name}: static FP8 activation scales are not supported",
                                  tensor=name)
            out[name] = spec

    def _pair_mxfp4(self, specs: Mapping[str, TensorSpec],
                    out: dict[str, TensorSpec]) -> None:
        for name, spec in specs.items():
            if name.endswith(_SCALES):
                base = name[: -len(_SCALES)]
                if base + _BLOCKS not in specs:
                    raise FormatError(f"MXFP4 scales {name} have no {base}{_BLOCKS}",
                                      tensor=name)
                continue
            if not name.endswith(_BLOCKS):
                out[name] = spec
                continue
            base = name[: -len(_BLOCKS)]
            scale = base + _SCALES
            if scale not in specs:
                raise FormatError(f"MXFP4 blocks {name} have no {scale}", tensor=name)
            if spec.dtype != dtypes.UINT8 or specs[scale].dtype != dtypes.UINT8:
                raise FormatError(f"MXFP4 {name} / {scale} must be uint8", tensor=name)
            try:
                shape = mxfp4_shape(spec.shape, specs[scale].shape)
            except FormatError as e:
                raise FormatError(f"{name}: {e}", tensor=name) from None
            if base in specs:
                raise FormatError(f"{base} is stored both plain and as MXFP4", tensor=base)
            self._pairs[base] = _Pair(name, scale, "mxfp4")
            out[base] = TensorSpec(base, shape, PRESENTED_DTYPE)

    @property
    def quantized(self) -> int:
        """How many tensors are dequantized on read."""
        return len(self._pairs)

    def raw_names(self, name: str) -> tuple[str, ...]:
        """The stored tensors ``name`` is read from (a quantized weight and its scale)."""
        pair = self._pairs.get(name)
        return (name,) if pair is None else (pair.data, pair.scale)

    def dequantize_to(self, dtype: DType | None) -> None:
        """Block-FP8 weights are read already rounded to ``dtype`` (None: the dtype they are
        presented in), the destination's: the float32 products are rounded once either way,
        and no float32 copy of a whole weight is held. Until this is called they are read in
        float32 (what re-quantization needs)."""
        self._fp8_dtype = dtype or PRESENTED_DTYPE

    def read(self, name: str) -> torch.Tensor:
        """``name`` as the model holds it; a quantized one dequantized (block FP8 in float32,
        or in the dtype given to :meth:`dequantize_to`)."""
        pair = self._pairs.get(name)
        if pair is None:
            return self._read_raw(name)
        data, scale = self._read_raw(pair.data), self._read_raw(pair.scale)
        if pair.kind == "fp8":
            assert self.quant is not None
            return dequantize_fp8(data, scale, self.quant.block, self._fp8_dtype.torch)
        return dequantize_mxfp4(data, scale, PRESENTED_DTYPE)

    def describe(self) -> str | None:
        """One line for plans and ``inspect``: what the source holds and what it becomes."""
        if self.quant is None:
            return None
        how = ("(float32 math, rounded once to the destination dtype; bfloat16 when none is "
               "asked)")
        if not self.quantized:
            # A config-only directory (--dry-run on a published config): no tensors to pair.
            return f"source config declares {self.quant.describe()}: weights dequantized {how}"
        return f"source is {self.quant.describe()}: {self.quantized} tensors dequantized {how}"
