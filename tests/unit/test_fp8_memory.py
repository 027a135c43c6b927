"""Dequantizing a block-FP8 checkpoint streams per tensor: the peak of an FP8 -> bf16 hf
conversion does not grow with the model, and stays within the usual bound (the weights are
dequantized straight into bf16, row block by row block: no float32 copy of a weight), measured
in a subprocess, as tests/unit/test_memory.py does."""

from __future__ import annotations

import math

from ckpt_ir.ir import ModelConfig
from tests.unit.test_memory import CONFIG, MIB, peak_rss
from tools.make_synthetic_fp8 import write_fp8


def test_fp8_dequantization_peak_does_not_grow_with_the_model(tmp_path):
    peaks, sizes = {}, {}
    for layers in (6, 12):
        src = tmp_path / f"fp8-{layers}"
        write_fp8(src, {**CONFIG, "num_hidden_layers": layers})
        sizes[layers] = sum(f.stat().st_size for f in src.iterdir())
        peaks[layers] = peak_rss("convert", str(src), str(tmp_path / f"bf16-{layers}"),
                                 "--to", "hf")
    assert sizes[12] > 1.6 * sizes[6]  # the bf16 embedding and head are a fixed part
    # Twice the model, about the same peak (test_memory.py's allowance for allocator noise).
    assert peaks[12] - peaks[6] < 48 * MIB, peaks
    cfg = ModelConfig.from_hf({**CONFIG, "num_hidden_layers": 12})
    largest_bf16 = max(math.prod(s) for s in cfg.schema().values()) * 2
    # The usual bound: the largest tensor + 512 MiB of interpreter and torch.
    assert peaks[12] < largest_bf16 + 512 * MIB, (peaks, largest_bf16)
