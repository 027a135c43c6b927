"""Write a synthetic block-FP8 Llama-shaped HF checkpoint (DeepSeek's layout) of about a size.

    python tools/make_synthetic_fp8.py OUT --gib 2

Every linear weight is ``float8_e4m3fn`` with a float32 ``weight_scale_inv`` of 128x128 blocks
(``quantization_config``: fp8, e4m3, dynamic activations); embeddings, head and norms are
bfloat16. Tensors are quantized and written one at a time with ckpt-ir's streaming safetensors
writer, so a large checkpoint needs little memory. Used by ``tools/bench.py --fp8``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ckpt_ir import dtypes
from ckpt_ir.converters.storage.safetensors_file import SafetensorsWriter
from ckpt_ir.ir import ModelConfig
from ckpt_ir.quantization import (
    FP8_DTYPE,
    fp8_scale_grid,
    is_fp8_linear,
    parse_quantization,
    quantize_fp8,
)

QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [128, 128]}


def write_fp8(out: Path, config: dict, *, max_shard_bytes: int = 5 * 10**9,
              seed: int = 0) -> int:
    """Write the checkpoint; returns its tensor bytes."""
    config = {**config, "quantization_config": QUANTIZATION_CONFIG}
    quant = parse_quantization(config)
    assert quant is not None
    out.mkdir(parents=True, exist_ok=False)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    entries: list[tuple[str, dtypes.DType, tuple[int, ...]]] = []
    for name, shape in ModelConfig.from_hf(config).schema().items():
        if is_fp8_linear(name, shape, quant):
            entries.append((name, FP8_DTYPE, shape))
            entries.append((name + "_scale_inv", dtypes.FLOAT32,
                            fp8_scale_grid(shape, quant.block)))
        else:
            entries.append((name, dtypes.BFLOAT16, shape))
    shards: list[list[tuple[str, dtypes.DType, tuple[int, ...]]]] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e[2]) * e[1].itemsize
        # A weight and its scale stay in one shard, as the releases keep them.
        if shards[-1] and size + nbytes > max_shard_bytes and not e[0].endswith("_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for file, shard in zip(files, shards, strict=True):
        # Widest dtypes first: every tensor aligned to its item size in the file.
        shard = sorted(shard, key=lambda e: -e[1].itemsize)
        names = {e[0] for e in shard}
        with SafetensorsWriter(out / file, shard, {"format": "pt"}) as w:
            for name, dtype, shape in shard:
                if name.endswith("_scale_inv"):
                    continue
                t = torch.randn(shape, generator=g, dtype=torch.float32) * 0.02
                if dtype == FP8_DTYPE:
                    q, s = quantize_fp8(t, quant.block)
                    assert name + "_scale_inv" in names
                    w.write(name, q)
                    w.write(name + "_scale_inv", s)
                    total += q.nbytes + s.nbytes
                    weight_map[name + "_scale_inv"] = file
                else:
                    t = t.to(dtype.torch)
                    w.write(name, t)
                    total += t.nbytes
                weight_map[name] = file
                del t
    if n > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def main() -> None:
    from tools.make_synthetic import llama_config

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--gib", type=float, default=2.0)
    args = p.parse_args()
    # llama_config sizes bf16 weights; FP8 linear weights take half of that.
    total = write_fp8(args.out, llama_config(int(2 * args.gib * 2**30)))
    print(f"wrote {total / 2**30:.2f} GiB to {args.out}")


if __name__ == "__main__":
    main()
