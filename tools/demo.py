"""`make demo`: a tiny Qwen3 with random weights, HF -> mcore-dist -> HF, checked bit for bit.

Builds the model with transformers (no download), converts it to a Megatron-Core torch_dist
checkpoint and back with ckpt-ir, then checks every tensor of the round trip against the
source and that transformers loads the result with the same logits.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import ckpt_ir


def build_tiny_model(path: Path, arch: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=301,
        max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(path)


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-out", help="working directory (recreated)")
    parser.add_argument("--arch", default="qwen3", choices=["llama", "qwen2", "qwen3"])
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    src, dist, back = out / "hf", out / "mcore-dist", out / "hf-roundtrip"

    build_tiny_model(src, args.arch)
    print(f"built a tiny random {args.arch} in {src}")
    for a, b, fmt in ((src, dist, "mcore-dist"), (dist, back, "hf")):
        r = ckpt_ir.convert(a, b, to=fmt)
        print(f"{a} ({r.source_format}) -> {b} ({r.dest_format}): {r.tensors_written} tensors, "
              f"{r.bytes_written / 2**20:.2f} MiB in {r.seconds:.2f} s; skipped "
              f"{len(r.dropped)} non-weight entries")

    want, got = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    if want.keys() != got.keys():
        print(f"FAIL: tensor names differ: {sorted(want.keys() ^ got.keys())}")
        return 1
    bad = [n for n in want if not torch.equal(want[n].view(torch.uint8),
                                              got[n].view(torch.uint8))]
    if bad:
        print(f"FAIL: {len(bad)} tensors differ, e.g. {bad[0]}")
        return 1
    ids = torch.randint(0, 301, (1, 12), generator=torch.Generator().manual_seed(1))
    diff = (logits(src, ids) - logits(back, ids)).abs().max().item()
    print(f"round trip: {len(want)} tensors bit-identical; transformers logits max |diff| "
          f"= {diff:.1e}")
    with ckpt_ir.open(dist) as ckpt:
        print(f"ckpt_ir.open({dist}) -> {ckpt}")
    return 0 if diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
