"""The one source of hypothesis strategies: valid by construction, bounded sizes."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtypes() -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from(FLOAT_DTYPES)


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype | None = None
            ) -> torch.Tensor:
    """Random bits of ``dtype``: NaN payloads, -0.0 and infinities included, so round trips
    are checked on raw bits, not on values."""
    dtype = dtype or draw(dtypes())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    nbytes = max(1, int(torch.Size(shape).numel()) * dtype.itemsize)
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    n = int(torch.Size(shape).numel())
    return raw[: n * dtype.itemsize].view(dtype).reshape(shape)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and raw bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@st.composite
def dense_configs(draw: st.DrawFn, *, max_layers: int = 3) -> dict[str, Any]:
    """Small HF config dicts for llama / mistral / qwen2 / qwen3.

    KV groups are drawn first and heads as a multiple (MHA, GQA and MQA all occur), head_dim
    independently of hidden/heads, odd vocab sizes, tied and untied embeddings.
    """
    arch = draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8, 12]))
    hidden = draw(st.sampled_from([16, 24, 32]))
    return {
        "model_type": arch,
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        "num_hidden_layers": draw(st.integers(1, max_layers)),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": draw(st.sampled_from([8, 20, 48])),
        "vocab_size": draw(st.integers(5, 67)),
        "tie_word_embeddings": draw(st.booleans()),
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
    }
