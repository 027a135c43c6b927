"""Tiny random Qwen VL models (transformers 5.23) and their pixel-path inputs, for the VL tests.

Each config is a shrunk copy of a published one with every structural flag kept: Qwen2.5-VL's
q/k/v biases, contiguous mrope sections, RMSNorm tower with a gated MLP, window attention with
full-attention blocks; Qwen3-VL's QK norm, interleaved mrope, LayerNorm tower with patch bias,
learned position embeddings and deepstack taps; Qwen3-VL-MoE's routed experts (fused on disk).
Sizes keep the merger and head-dim arithmetic of the real models (heads x head_dim = hidden,
mrope sections summing to head_dim / 2, out_hidden_size = the language model's hidden size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 300, 301, 302, 303
PATCH, TEMPORAL, MERGE, CHANNELS = 4, 2, 2, 3

_TEXT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "vocab_size": 320,
         "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "hidden_act": "silu",
         "bos_token_id": 1, "eos_token_id": 2}
_TOKENS = {"image_token_id": IMAGE_TOKEN, "video_token_id": VIDEO_TOKEN,
           "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END}


def config_dict(model_type: str, *, tied: bool = False) -> dict[str, Any]:
    """The tiny config of ``model_type`` (qwen2_5_vl, qwen3_vl, qwen3_vl_moe) as a dict."""
    if model_type == "qwen2_5_vl":
        # Qwen2.5-VL-7B: rope mrope_section [16, 24, 24] of head_dim 128 -> [2, 3, 3] of 16.
        text = {**_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                             "mrope_section": [2, 3, 3]}}
        vision = {"depth": 3, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48,
                  "hidden_act": "silu", "in_channels": CHANNELS, "patch_size": PATCH,
                  "temporal_patch_size": TEMPORAL, "spatial_merge_size": MERGE,
                  "out_hidden_size": 64, "tokens_per_second": 2,
                  # 112 px windows of 14 px patches merged 2x2 = 4 merged patches a side; here
                  # 16 px of 4 px patches = 2, so a 4x4 grid has several windows.
                  "window_size": 16, "fullatt_block_indexes": [1]}
    else:
        text = {**_TEXT, "attention_bias": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                    "mrope_section": [4, 2, 2], "mrope_interleaved": True}}
        vision = {"depth": 3, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48,
                  "hidden_act": "gelu_pytorch_tanh", "in_channels": CHANNELS,
                  "patch_size": PATCH, "temporal_patch_size": TEMPORAL,
                  "spatial_merge_size": MERGE, "out_hidden_size": 64,
                  "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 2]}
        if model_type == "qwen3_vl_moe":
            text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 40,
                     "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}
    return {"model_type": model_type, "text_config": text, "vision_config": vision,
            "tie_word_embeddings": tied, **_TOKENS}


def make_model(model_type: str, *, tied: bool = False, seed: int = 0) -> torch.nn.Module:
    """A random fp32 model through ``AutoModelForImageTextToText`` (eval mode)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = config_dict(model_type, tied=tied)
    kind = d.pop("model_type")
    cfg = AutoConfig.for_model(kind, **d)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        # Random norms and biases too: an identity norm or a zero bias hides a swapped tensor.
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name or "ln_q" in name else 0.0, 0.1)
    return model.eval()


def save_model(model_type: str, path: Path, **kw: Any) -> Path:
    make_model(model_type, **kw).save_pretrained(path)
    return path


def load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def image_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """A 16x16 random image (4x4 patches of 4 px, 2 frames) spliced into a short prompt,
    without a processor: ``pixel_values`` [16, 3·2·4·4] and ``image_grid_thw`` [[1, 4, 4]]
    (4 merged image tokens)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 4, 4]])
    patches = int(grid.prod())
    pixels = torch.randn(patches, CHANNELS * TEMPORAL * PATCH * PATCH, generator=g)
    tokens = patches // (MERGE * MERGE)
    ids = [5, 17, 42, VISION_START, *([IMAGE_TOKEN] * tokens), VISION_END, 7, 99, 123, 8]
    # What the processor returns with input_ids: 0 text, 1 image (the 3-D mrope positions).
    types = [[int(i == IMAGE_TOKEN) for i in ids]]
    return {"input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "mm_token_type_ids": torch.tensor(types, dtype=torch.int32),
            "pixel_values": pixels, "image_grid_thw": grid}


def text_inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
