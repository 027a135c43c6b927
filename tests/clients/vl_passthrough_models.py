"""Tiny random Gemma 3 VL and Mistral 3 VL models (transformers 5.23) and their image inputs.

Each config is a shrunk copy of a published one with its structural flags kept:

- ``gemma3``: Gemma-3-4B: the gemma3_text language model of ``dense_tail_models`` (q/k norms,
  sliding and global layers, dual RoPE bases with a linear factor, tied), a SigLIP tower
  without its pooling head (``vision_use_head`` false) and Gemma 3's projector (``(1 + w)``
  soft-embedding norm, average pooling of the patch grid to ``mm_tokens_per_image`` tokens).
- ``mistral3``: Ministral-3-3B: the ministral3 language model (GQA, ``head_dim`` != hidden /
  heads, YaRN with the Llama-4 query temperature), a Pixtral tower (2-D RoPE, gated SiLU
  MLP), the 2x2 patch merger and the bias-free GELU projector; tied (3B) and untied (8B, 14B).

The vocabulary is 320 rows so that TP=2 splits it without padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.clients import hf_models
from tests.clients.dense_tail_models import TAIL

IMAGE_TOKEN, BOI, EOI = 300, 298, 299
IMAGE, PATCH, CHANNELS = 16, 4, 3
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def config_dict(model_type: str, *, tied: bool = True) -> dict[str, Any]:
    """The tiny config of ``gemma3`` or ``mistral3`` as a dict (with ``model_type``)."""
    text_type = {"gemma3": "gemma3_text", "mistral3": "ministral3"}[model_type]
    text = {**hf_models._COMMON, **_TOKENS, **TAIL[text_type][1], "vocab_size": 320,
            "model_type": text_type, "tie_word_embeddings": tied}
    if model_type == "gemma3":
        # 16 px images of 4 px patches: a 4x4 grid pooled 2x2 into 4 image tokens.
        vision = {"model_type": "siglip_vision_model", "hidden_size": 32,
                  "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": IMAGE, "patch_size": PATCH, "num_channels": CHANNELS,
                  "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}
        return {"model_type": "gemma3", "text_config": text, "vision_config": vision,
                "mm_tokens_per_image": 4, "image_token_index": IMAGE_TOKEN,
                "boi_token_index": BOI, "eoi_token_index": EOI, "tie_word_embeddings": tied}
    # Pixtral's head_dim is given (64 of 1024 / 16 there; 16 of 32 / 2 here); its 2-D RoPE
    # assumes hidden / heads.
    vision = {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16,
              "image_size": 32, "patch_size": PATCH, "num_channels": CHANNELS,
              "hidden_act": "silu"}
    return {"model_type": "mistral3", "text_config": text, "vision_config": vision,
            "spatial_merge_size": 2, "image_token_index": IMAGE_TOKEN,
            "projector_hidden_act": "gelu", "multimodal_projector_bias": False,
            "vision_feature_layer": -1, "tie_word_embeddings": tied}


def make_model(model_type: str, *, tied: bool = True, seed: int = 0) -> torch.nn.Module:
    """A random fp32 model through ``AutoModelForImageTextToText`` (eval mode); every
    parameter redrawn (norms ~ 1 + N(0, 0.3): a ``(1 + w)`` norm read as ``w`` shows)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = config_dict(model_type, tied=tied)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    hf_models.randomize_(model, seed)
    return model.eval()


def save_model(model_type: str, path: Path, **kw: Any) -> Path:
    make_model(model_type, **kw).save_pretrained(path)
    return path


def load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def image_inputs(model_type: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random 16x16 image spliced into a short prompt without a processor: 4 image tokens
    (Gemma 3: the 4x4 patch grid pooled 2x2; Mistral 3: merged 2x2)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, CHANNELS, IMAGE, IMAGE, generator=g)
    if model_type == "gemma3":
        ids = [5, 17, BOI, *([IMAGE_TOKEN] * 4), EOI, 7, 99, 123]
        # Gemma 3 attends bidirectionally within an image: token_type_ids 1 marks it.
        types = [[int(i == IMAGE_TOKEN) for i in ids]]
        return {"input_ids": torch.tensor([ids]), "pixel_values": pixels,
                "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "token_type_ids": torch.tensor(types)}
    ids = [5, 17, *([IMAGE_TOKEN] * 4), 7, 99, 123]
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels,
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "image_sizes": torch.tensor([[IMAGE, IMAGE]])}


def text_inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
