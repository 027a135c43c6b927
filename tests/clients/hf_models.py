"""Tiny random Hugging Face decoder models (fp32) for the real-client tests.

Each architecture exercises a different corner of the mappings:

- ``llama``: GQA (4 query heads, 2 KV heads), ``head_dim`` (24) != hidden / heads (16), untied.
- ``qwen2``: q/k/v biases, tied embeddings, MHA (4 KV heads).
- ``qwen3``: q/k norms, MQA (1 KV head), untied. At TP=2 megatron-core 0.16.1 keeps the one
  KV group whole: it all-gathers ``linear_qkv``'s output and each rank takes its query heads.
- ``mistral``: GQA, untied, ``sliding_window=None`` (Megatron's GPTModel has no sliding window).
- ``seed_oss``: Seed-OSS-36B's flags (q/k/v biases, no o_proj / MLP bias, ``head_dim`` != hidden /
  heads, GQA, untied, dropouts 0.1); for ``tests/clients/test_seed_oss_client.py``.

Mixture-of-experts models (:data:`MOE_ARCHITECTURES`), for ``tests/clients/test_moe_client.py``:

- ``mixtral``: 4 experts, top-2, every layer routed, untied.
- ``qwen2_moe``: 4 experts, top-2 without renormalisation (``norm_topk_prob=False``), a gated
  shared expert, q/k/v biases, 3 layers of which layer 0 is dense (``mlp_only_layers``, so
  megatron-core keeps per-layer keys), tied embeddings.
- ``qwen3_moe``: 6 experts, top-2 renormalised, q/k norms, head_dim 32 != hidden / heads.
- ``deepseek_v3``: multi-latent attention with q-LoRA, 4 experts in 2 groups (top-1 group,
  top-2 experts), sigmoid routing with a random ``e_score_correction_bias``, one shared expert,
  the first layer dense; the config announces one MTP layer, which transformers neither builds
  nor saves.

Every parameter, norms included, is redrawn from a seeded generator: weights ~ N(0, 0.1) so the
logits are O(1) and a 1e-5 tolerance means something; norm weights ~ 1 + N(0, 0.3), biases
~ N(0, 0.3), so a norm or bias that is dropped, swapped or loaded as ones changes the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["ARCHITECTURES", "hf_config", "hf_logits", "input_ids", "make_hf_model"]

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")

VOCAB_SIZE = 301  # odd on purpose: no TP or padding multiple divides it
SEQ_LEN = 7

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
}

_ARCH: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2, "head_dim": 24,
                              "tie_word_embeddings": False,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 4, "tie_word_embeddings": True,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 1, "head_dim": 32,
                              "tie_word_embeddings": False,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": None,
                                  "tie_word_embeddings": False,
                                  "rope_parameters": {"rope_type": "default",
                                                      "rope_theta": 10000.0}}),
    # Seed-OSS-36B's config shrunk, every structural flag kept: q/k/v biases only,
    # head_dim (24) independent of hidden / heads (16), GQA (80:8 there, 4:2 here), untied,
    # rope_theta 1e7, and its non-zero dropouts (inert in eval; megatron_args sets them to 0).
    "seed_oss": ("SeedOssConfig", {"num_key_value_heads": 2, "head_dim": 24,
                                   "attention_bias": True, "attention_out_bias": False,
                                   "mlp_bias": False, "tie_word_embeddings": False,
                                   "attention_dropout": 0.1, "residual_dropout": 0.1,
                                   "rope_parameters": {"rope_type": "default",
                                                       "rope_theta": 1e7}}),
    "mixtral": ("MixtralConfig", {"num_key_value_heads": 2, "intermediate_size": 48,
                                  "num_local_experts": 4, "num_experts_per_tok": 2,
                                  "sliding_window": None, "tie_word_embeddings": False,
                                  "rope_parameters": {"rope_type": "default",
                                                      "rope_theta": 1e6}}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_key_value_heads": 2, "num_hidden_layers": 3,
                                     "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 48,
                                     "norm_topk_prob": False, "mlp_only_layers": [0],
                                     "tie_word_embeddings": True,
                                     "rope_parameters": {"rope_type": "default",
                                                         "rope_theta": 1e6}}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_key_value_heads": 2, "head_dim": 32,
                                     "num_experts": 6, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "norm_topk_prob": True,
                                     "tie_word_embeddings": False,
                                     "rope_parameters": {"rope_type": "default",
                                                         "rope_theta": 1e6}}),
    "deepseek_v3": ("DeepseekV3Config", {"num_key_value_heads": 4, "num_hidden_layers": 3,
                                         "n_routed_experts": 4, "n_shared_experts": 1,
                                         "num_experts_per_tok": 2, "n_group": 2,
                                         "topk_group": 1, "first_k_dense_replace": 1,
                                         "moe_intermediate_size": 32, "q_lora_rank": 32,
                                         "kv_lora_rank": 24, "qk_nope_head_dim": 16,
                                         "qk_rope_head_dim": 8, "v_head_dim": 16,
                                         "routed_scaling_factor": 2.5, "rope_interleave": True,
                                         "num_nextn_predict_layers": 1,
                                         "tie_word_embeddings": False,
                                         "rope_parameters": {"rope_type": "default",
                                                             "rope_theta": 10000.0}}),
}


def hf_config(arch: str, **overrides: Any):
    """A transformers config object for ``arch`` with the tiny sizes above."""
    import transformers

    cls_name, fields = _ARCH[arch]
    kwargs = {**_COMMON, **fields, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from a generator seeded by ``seed`` (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            # DeepSeek's routing bias is a buffer (zeros by default): redraw it too, so a bias
            # that is dropped or misplaced changes which experts are chosen.
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def make_hf_model(arch: str, tmp_path: Path, *, seed: int = 0, name: str | None = None,
                  **overrides: Any) -> Path:
    """Save a random fp32 ``arch`` model under ``tmp_path / (name or arch)``; return the dir."""
    from transformers import AutoModelForCausalLM

    config = hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    out = Path(tmp_path) / (name or arch)
    model.save_pretrained(out)  # safetensors; tied weights are stored once
    return out


def input_ids(vocab_size: int = VOCAB_SIZE, seq_len: int = SEQ_LEN) -> list[list[int]]:
    """A fixed batch of one sequence that touches the first and the last vocabulary rows."""
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab_size, (1, seq_len), generator=gen)
    ids[0, 0], ids[0, -1] = 0, vocab_size - 1
    return ids.tolist()


@torch.no_grad()
def hf_logits(path: Path, ids: list[list[int]]) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the transformers model saved at ``path`` (fp32, eager)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    return model(input_ids=torch.tensor(ids)).logits.float()
