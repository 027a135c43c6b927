"""Write a synthetic Llama-shaped HF checkpoint of about a requested size (random bf16).

    python tools/make_synthetic.py OUT --gib 1.2

Shapes follow Llama-3 proportions (GQA 4:1, ffn 3.5x hidden, vocab 32000) at a hidden size and
layer count chosen to reach the size. Tensors are written one at a time with ckpt-ir's streaming
safetensors writer, so generating a 16 GB model needs little memory.
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

DTYPES = {"bf16": (torch.bfloat16, "bfloat16"), "fp32": (torch.float32, "float32")}


def llama_config(target_bytes: int, *, hidden: int | None = None, dtype: str = "bf16") -> dict:
    """A Llama-3-proportioned config whose weights in ``dtype`` take about ``target_bytes``."""
    width = torch.finfo(DTYPES[dtype][0]).bits // 8
    target_bytes = target_bytes * 2 // width  # the layer arithmetic below counts 2-byte values
    hidden = hidden or (2048 if target_bytes < 6 * 2**30 else 4096)
    ffn = int(hidden * 3.5) // 256 * 256
    heads = hidden // 128
    vocab = 32000
    per_layer = 2 * (hidden * hidden * 2 + hidden * hidden // 2 + 3 * hidden * ffn + 2 * hidden)
    fixed = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, round((target_bytes - fixed) / per_layer))
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4),
        "head_dim": 128, "vocab_size": vocab, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "dtype": DTYPES[dtype][1],
    }


def write(out: Path, config: dict, *, max_shard_bytes: int = 5 * 10**9, seed: int = 0) -> int:
    out.mkdir(parents=True, exist_ok=False)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    schema = ModelConfig.from_hf(config).schema()
    dtype = {name: t for t, name in DTYPES.values()}[config.get("dtype", "bfloat16")]
    width = torch.finfo(dtype).bits // 8
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in schema.items():
        nbytes = math.prod(shape) * width
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for file, shard in zip(files, shards, strict=True):
        entries = [(name, dtypes.from_torch(dtype), shape) for name, shape in shard]
        with SafetensorsWriter(out / file, entries, {"format": "pt"}) as w:
            for name, shape in shard:
                t = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
                w.write(name, t)
                weight_map[name] = file
                total += t.nbytes
                del t
    if n > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--gib", type=float, default=1.2)
    p.add_argument("--hidden", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = p.parse_args()
    cfg = llama_config(int(args.gib * 2**30), hidden=args.hidden, dtype=args.dtype)
    total = write(args.out, cfg)
    print(f"wrote {total / 2**30:.2f} GiB, {cfg['num_hidden_layers']} layers, hidden "
          f"{cfg['hidden_size']} to {args.out}")


if __name__ == "__main__":
    main()
