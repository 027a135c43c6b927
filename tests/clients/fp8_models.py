"""Tiny block-FP8 releases built from tiny transformers models, in the releases' file layout.

A transformers model is drawn (``make_hf_model``), then every linear weight the releases
quantize is quantized here, independently of ckpt-ir, with the release formula (per 128x128
block ``S = amax / 448``, ``W_fp8 = e4m3(W / S)``, ``weight_scale_inv = S`` float32 of the
ceil-divided grid); everything else is stored bfloat16 (DeepSeek's ``e_score_correction_bias``
float32), and ``config.json`` gets the release's ``quantization_config``.

- ``deepseek_v3``: ``kv_lora_rank`` 512 + ``qk_rope_head_dim`` 64 make ``kv_a_proj_with_mqa``
  576 rows, as in DeepSeek-V3/R1 (5 row blocks, the last one 64 rows), and an MTP layer is
  added the way the releases store it (its own attention and experts, FP8; ``enorm``,
  ``hnorm``, ``eh_proj``, ``shared_head.norm`` bf16; ``embed_tokens`` and ``shared_head.head``
  copies of the model's).
- ``qwen3``: ``intermediate_size`` 136 makes ``gate_proj`` / ``up_proj`` 136 rows (2 row
  blocks, the last one 8 rows) and ``down_proj`` 136 columns; Qwen's FP8 configs list
  ``modules_to_not_convert``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.clients.hf_models import make_hf_model

__all__ = ["FP8_OVERRIDES", "reference_dequant", "reference_quant", "write_fp8_release"]

BLOCK = 128
FP8_OVERRIDES: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"kv_lora_rank": 512, "qk_rope_head_dim": 64},
    "qwen3": {"intermediate_size": 136},
}
# What the releases keep in high precision (reference §9.2): embeddings, heads, norms, router.
_KEEP = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "eh_proj", "shared_head")


def reference_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release formula, block by block with explicit bounds (ragged edges as they are)."""
    rows, cols = w.shape
    grid = (-(-rows // BLOCK), -(-cols // BLOCK))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(grid, dtype=torch.float32)
    w = w.float()
    for i in range(grid[0]):
        for j in range(grid[1]):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            amax = blk.abs().max()
            scale = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            s[i, j] = scale
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = \
                (blk / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


def reference_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``float32(W_fp8) * S[i // 128, j // 128]`` (reference §9.3), in float32."""
    rows, cols = q.shape
    full = s.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return q.float() * full


def _quantized(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and name.endswith(".weight") and not any(k in name for k in _KEEP)


def _add_mtp(state: dict[str, torch.Tensor], layers: int, hidden: int) -> None:
    """DeepSeek's MTP layer ``layers``: the last decoder layer's tensors under its index, plus
    its own norms / projection and the copies of the embedding and head."""
    gen = torch.Generator().manual_seed(7)
    last, mtp = f"model.layers.{layers - 1}.", f"model.layers.{layers}."
    for name in [n for n in state if n.startswith(last)]:
        state[mtp + name[len(last):]] = state[name].clone()
    state[mtp + "enorm.weight"] = 1 + 0.3 * torch.randn(hidden, generator=gen)
    state[mtp + "hnorm.weight"] = 1 + 0.3 * torch.randn(hidden, generator=gen)
    state[mtp + "eh_proj.weight"] = 0.1 * torch.randn(hidden, 2 * hidden, generator=gen)
    state[mtp + "shared_head.norm.weight"] = 1 + 0.3 * torch.randn(hidden, generator=gen)
    state[mtp + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    state[mtp + "shared_head.head.weight"] = state["lm_head.weight"].clone()


def write_fp8_release(arch: str, tmp_path: Path, *, seed: int = 0,
                      ue8m0: bool = False) -> tuple[Path, Path]:
    """``(fp32 transformers model dir, FP8 release dir)`` of a tiny ``arch``.

    ``ue8m0``: scales rounded up to powers of two (``scale_fmt: ue8m0``, DeepSeek-V3.1/3.2):
    then every dequantized value is exact in bfloat16.
    """
    src = make_hf_model(arch, tmp_path, seed=seed, name=f"{arch}-fp32",
                        **FP8_OVERRIDES[arch])
    config = json.loads((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    if arch == "deepseek_v3":
        _add_mtp(state, config["num_hidden_layers"], config["hidden_size"])
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if _quantized(name, t):
            w = t.float()
            if ue8m0:
                # Power-of-two scales: quantize with amax rounded up to 448 * 2^k.
                q, s = reference_quant(w)
                s = torch.exp2(torch.ceil(torch.log2(s)))
                full = s.repeat_interleave(BLOCK, 0)[:w.shape[0]] \
                    .repeat_interleave(BLOCK, 1)[:, :w.shape[1]]
                q = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
            else:
                q, s = reference_quant(w)
            out[name], out[name + "_scale_inv"] = q, s
        elif name.endswith("e_score_correction_bias"):
            out[name] = t.float()
        else:
            out[name] = t.to(torch.bfloat16)
    qc: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                          "weight_block_size": [BLOCK, BLOCK]}
    if ue8m0:
        qc["scale_fmt"] = "ue8m0"
    if arch == "qwen3":
        qc["modules_to_not_convert"] = ["lm_head", "model.embed_tokens"]
    config["quantization_config"] = qc
    config["dtype"] = "bfloat16"
    dst = tmp_path / f"{arch}-fp8{'-ue8m0' if ue8m0 else ''}"
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return src, dst
